-- Where `require` looks: the host's and the system's modules first, the
-- service's directory after them, never the current directory.
local cli = require "spec.support.cli"
local uv = require "luv"

local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

-- A module that, if it ever runs, ends the process with a code naming it.
local function trap(code)
    return ("io.stdout:write('TRAP %d\\n') io.stdout:flush() os.exit(%d)\n"):format(code, code)
end

describe("module paths", function()
    local dir

    before_each(function()
        dir = assert(uv.fs_mkdtemp((os.getenv("TMPDIR") or "/tmp") .. "/tamarco-modpath-XXXXXX"))
        for _, sub in ipairs({ "/tamarco", "/tamarco/resources", "/svc", "/svc/tamarco",
                               "/svc/tamarco/resources", "/spec" }) do
            assert(uv.fs_mkdir(dir .. sub, 493))
        end
        -- in the current directory
        write(dir .. "/cjson.lua", trap(91))
        write(dir .. "/tamarco/init.lua", trap(92))
        write(dir .. "/tamarco/resources/memory.lua", trap(93))
        write(dir .. "/only_in_cwd.lua", trap(94))
        -- in the service's directory
        write(dir .. "/svc/cjson.lua", trap(95))
        write(dir .. "/svc/tamarco/init.lua", trap(96))
        write(dir .. "/svc/tamarco/resources/memory.lua", trap(97))
        write(dir .. "/svc/helper.lua", "return { name = 'own-module' }\n")
        write(dir .. "/svc/service.lua", [[
local tamarco = require "tamarco"
local helper = require "helper"
local cjson = require "cjson"
local memory = require "tamarco.resources.memory"
local cwd_only = pcall(require, "only_in_cwd")
local svc = tamarco.service { name = "paths" }
function svc:start()
    io.stdout:write("probe ", helper.name, " ", cjson.encode({ 1 }), " ", type(memory.new),
        " cwd-module-found=", tostring(cwd_only), "\n")
    io.stdout:flush()
end
function svc:post_start() self.lifecycle:request_stop("probe done") end
return svc
]])
    end)

    after_each(function()
        os.execute("rm -rf '" .. dir .. "'")
    end)

    it("never runs a module from the current directory or one shadowing the framework", function()
        local code, out = cli.run({ "run", "svc/service.lua" }, {}, dir)
        assert.not_matches("TRAP", out, 1, true)
        assert.matches("probe own-module [1] function cwd-module-found=false", out, 1, true)
        assert.are.equal(0, code, out)
        -- the same with the service given by its absolute path
        code, out = cli.run({ "run", dir .. "/svc/service.lua" }, {}, dir)
        assert.not_matches("TRAP", out, 1, true)
        assert.matches("probe own-module [1] function", out, 1, true)
        assert.are.equal(0, code, out)
    end)

    it("keeps a project's own modules reachable from its specs, behind the installed ones", function()
        write(dir .. "/spec/probe_spec.lua", [[
describe("probe", function()
    it("loads", function()
        assert.are.equal("[1]", require("cjson").encode({ 1 }))
        assert.are.equal("own-module", require("svc.helper").name)
        assert.is_function(require("tamarco.resources.memory").new)
    end)
end)
]])
        local code, out = cli.run({ "test", "--no-build", "spec" }, {}, dir)
        assert.not_matches("TRAP", out, 1, true)
        assert.are.equal(0, code, out)
    end)
end)
