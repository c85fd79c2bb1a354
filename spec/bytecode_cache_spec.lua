-- The bytecode cache of the framework's modules (host/bytecode_cache.c).
local cli = require "spec.support.cli"
local process = require "tamarco.c.process"

local cache_dir = process.exepath():match("^(.*)/[^/]*$") .. "/lua_cache"

local function sh(command)
    local pipe = io.popen(command .. " 2>&1; echo \"rc=$?\"")
    local out = pipe:read("*a")
    pipe:close()
    return out
end

describe("bytecode cache", function()
    it("caches the framework's modules next to an uninstalled host", function()
        cli.run({ "version" })
        local source = process.lua_dir() .. "/tamarco/cli/init.lua"
        local cached = cache_dir .. "/" .. source:gsub("/", "%%") .. ".ljbc"
        local f = assert(io.open(cached, "rb"), "no cached bytecode at " .. cached)
        assert.are.equal("\27LJ", f:read(3))   -- LuaJIT bytecode
        f:close()
        -- tracebacks still name the source file
        assert.are.equal("@" .. process.lua_dir() .. "/tamarco/core/tasks.lua",
            debug.getinfo(require("tamarco.core.tasks").sleep, "S").source)
    end)

    it("never serves stale bytecode: an edited module is read again", function()
        local copy = os.tmpname()
        os.remove(copy)
        assert.matches("rc=0", sh("cp -r " .. process.lua_dir() .. " " .. copy))
        local code, out = cli.run({ "version" }, { TAMARCO_LUA_DIR = copy })
        assert.are.equal(0, code)
        assert.matches("^tamarco%-host ", out)
        -- edit the copy's CLI after its bytecode was cached
        local path = copy .. "/tamarco/cli/init.lua"
        local text = assert(io.open(path)):read("*a")
        local f = assert(io.open(path, "w"))
        f:write((text:gsub('print%("tamarco%-host " %.%. process%.version%)',
            'print("tamarco-host (edited) " .. process.version)')))
        f:close()
        code, out = cli.run({ "version" }, { TAMARCO_LUA_DIR = copy })
        sh("rm -rf " .. copy)
        assert.are.equal(0, code)
        assert.matches("^tamarco%-host %(edited%) ", out)
    end)
end)
