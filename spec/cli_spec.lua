-- The host's command line and its exit codes, run as a child process.
local cli = require "spec.support.cli"

local function service_source(body)
    return 'local tamarco = require "tamarco"\n' .. body
end

describe("tamarco-host CLI", function()
    it("prints its version", function()
        local code, out = cli.run({ "version" })
        assert.are.equal(0, code)
        assert.matches("^tamarco%-host %d+%.%d+%.%d+", out)
    end)

    it("prints help for each command", function()
        for _, command in ipairs({ "run", "test", "version" }) do
            local code, out = cli.run({ command, "--help" })
            assert.are.equal(0, code)
            assert.matches("usage: tamarco%-host " .. command, out)
        end
    end)

    it("lists every option of run in the top-level help", function()
        local code, out = cli.run({ "--help" })
        assert.are.equal(0, code)
        for _, option in ipairs({ "--settings", "--watchdog", "--watch", "--workers", "--strict-settings" }) do
            assert.matches(option, out, 1, true)
        end
    end)

    it("says a usage mistake of test with exit 2", function()
        local code, out = cli.run({ "test", "--bogus" })
        assert.are.equal(2, code, out)
        assert.matches("tamarco-host test: unknown/bad flag: --bogus", out, 1, true)
        assert.matches("usage: tamarco-host test", out, 1, true)
    end)

    it("test removes the scratch directory of a killed run, not that of a running one", function()
        local base = os.tmpname()
        os.remove(base)
        assert(os.execute("mkdir -p " .. base .. "/tamarco-test-Dead01 " .. base .. "/tamarco-test-Live01 "
            .. base .. "/project/spec") == 0)
        -- a pid no process has (above the kernel's pid_max) and this process's own
        local function owner(dir, pid)
            local f = assert(io.open(base .. "/" .. dir .. "/.owner_pid", "w"))
            f:write(pid, "\n")
            f:close()
        end
        owner("tamarco-test-Dead01", 4194305)
        owner("tamarco-test-Live01", require("luv").os_getpid())
        local spec = assert(io.open(base .. "/project/spec/one_spec.lua", "w"))
        spec:write('it("runs", function() assert.is_true(true) end)\n')
        spec:close()
        local code, out = cli.run({ "test", "--no-build" }, { TMPDIR = base }, base .. "/project")
        local dead = io.open(base .. "/tamarco-test-Dead01/.owner_pid")
        local live = io.open(base .. "/tamarco-test-Live01/.owner_pid")
        if dead then dead:close() end
        if live then live:close() end
        os.execute("rm -rf " .. base)
        assert.are.equal(0, code, out)
        assert.is_nil(dead, "the killed run's directory is still there")
        assert.is_truthy(live, "the running run's directory was removed")
    end)

    it("rejects an unknown command and an unknown option with exit 2", function()
        local code, out = cli.run({ "frobnicate" })
        assert.are.equal(2, code)
        assert.matches("unknown command 'frobnicate'", out, 1, true)
        code, out = cli.run({ "run", "x.lua", "--frob" })
        assert.are.equal(2, code)
        assert.matches("unknown option '--frob'", out, 1, true)
    end)

    it("names a missing service file (exit 2)", function()
        local code, out = cli.run({ "run", "/nonexistent/service.lua" })
        assert.are.equal(2, code)
        assert.matches("service file '/nonexistent/service.lua' not found", out, 1, true)
    end)

    it("names the file and line of a syntax error (exit 2)", function()
        local path = cli.write_temp("local x = = 1\n")
        local code, out = cli.run({ "run", path })
        os.remove(path)
        assert.are.equal(2, code)
        assert.matches("syntax error", out, 1, true)
        assert.matches(path:match("[^/]+$") .. ":1:", out, 1, true)
    end)

    it("says when the file returns no service table (exit 2)", function()
        local path = cli.write_temp("return 42\n")
        local code, out = cli.run({ "run", path })
        os.remove(path)
        assert.are.equal(2, code)
        assert.matches("did not return a service table (it returned a number)", out, 1, true)
    end)

    it("rejects a duplicate task name at definition (exit 2)", function()
        local path = cli.write_temp(service_source([[
local svc = tamarco.service { name = "dup" }
svc:task("same", function() end)
svc:task("same", function() end)
return svc
]]))
        local code, out = cli.run({ "run", path })
        os.remove(path)
        assert.are.equal(2, code)
        assert.matches("duplicate task name 'same'", out, 1, true)
        assert.matches(":4: duplicate", out, 1, true)
    end)

    it("names the file, line and column of malformed YAML (exit 2)", function()
        local path = cli.write_temp(service_source('return tamarco.service { name = "y" }\n'))
        local yml = cli.write_temp("system:\n  deploy_name: x\n  bad: [1, 2\n", ".yml")
        local code, out = cli.run({ "run", path, "--settings", yml })
        os.remove(path)
        os.remove(yml)
        assert.are.equal(2, code)
        assert.matches((yml:gsub("%p", "%%%0")) .. ":%d+:%d+", out)   -- the path as plain text
    end)

    it("names the file, line and key of a setting with a bad value (exit 2)", function()
        local path = cli.write_temp(service_source([[
local http = require "tamarco.resources.http"
return tamarco.service { name = "typed", resources = { api = http.server() } }
]]))
        local cases = {
            { "system:\n  resources:\n    api:\n      port: abc\n",
              ':4: system.resources.api.port: must be a number, not "abc"' },
            { "system:\n  microservices:\n    typed:\n      resources:\n        api:\n          port: 70000\n",
              ":6: system.microservices.typed.resources.api.port: must be at most 65535, not 70000" },
            { "system:\n  deploy_name: x\n  logging:\n    profile: LOUD\n",
              ':4: system.logging.profile: must be DEVELOP, TESTING or PRODUCTION, not "LOUD"' },
        }
        for _, case in ipairs(cases) do
            local yml = cli.write_temp(case[1], ".yml")
            local code, out = cli.run({ "run", path, "--settings", yml })
            os.remove(yml)
            assert.are.equal(2, code, out)
            assert.matches("tamarco-host: settings file " .. yml .. case[2], out, 1, true)
            assert.not_matches("stack traceback", out, 1, true)
        end
        -- from the environment: the variable is named
        local code, out = cli.run({ "run", path }, { TAMARCO__SYSTEM__RESOURCES__API__MAX_BODY_SIZE = "-1" })
        os.remove(path)
        assert.are.equal(2, code, out)
        assert.matches("environment variable TAMARCO__SYSTEM__RESOURCES__API__MAX_BODY_SIZE: "
            .. "system.resources.api.max_body_size: must be at least 0, not -1", out, 1, true)
    end)

    it("names a missing setting without default (exit 2)", function()
        local path = cli.write_temp(service_source([[
local svc = tamarco.service { name = "needs" }
function svc:start() self.settings:get("api_url") end
return svc
]]))
        local code, out = cli.run({ "run", path })
        os.remove(path)
        assert.are.equal(2, code)
        assert.matches("system.microservices.needs.api_url", out, 1, true)
    end)

    it("exits 1 with the traceback when a start-up hook raises, after stopping what started", function()
        local path = cli.write_temp(service_source([[
local svc = tamarco.service { name = "raiser" }
function svc:pre_start() self.logger:info("pre_start ran") end
local function explode() error("hook exploded") end
function svc:post_start() explode() end
function svc:stop() self.logger:info("stop hook ran") end
return svc
]]))
        local code, out = cli.run({ "run", path })
        os.remove(path)
        assert.are.equal(1, code)
        assert.matches("hook exploded", out, 1, true)
        assert.matches("explode", out, 1, true)
        assert.matches("stop hook ran", out, 1, true)
        assert.matches("service stopped", out, 1, true)
    end)

    it("exits 12 when resource dependencies form a cycle or name an unknown resource", function()
        local path = cli.write_temp(service_source([[
local base = require "tamarco.core.resource"
local R = base.class("test")
return tamarco.service { name = "deps", resources = {
    a = R.new { depends_on = { "b" } }, b = R.new { depends_on = { "a" } } } }
]]))
        local code, out = cli.run({ "run", path })
        assert.are.equal(12, code)
        assert.matches("cycle: a -> b -> a", out, 1, true)
        os.remove(path)
        path = cli.write_temp(service_source([[
local base = require "tamarco.core.resource"
local R = base.class("test")
return tamarco.service { name = "deps", resources = { a = R.new { depends_on = { "nope" } } } }
]]))
        code, out = cli.run({ "run", path })
        os.remove(path)
        assert.are.equal(12, code)
        assert.matches("unknown resource 'nope'", out, 1, true)
    end)

    it("exits 11 when a resource cannot bind", function()
        local path = cli.write_temp(service_source([[
local base = require "tamarco.core.resource"
local errors = require "tamarco.core.errors"
local R = base.class("binder")
function R:start() errors.raise("bind", "cannot bind 127.0.0.1:1: permission denied") end
return tamarco.service { name = "binds", resources = { listener = R.new {} } }
]]))
        local code, out = cli.run({ "run", path })
        os.remove(path)
        assert.are.equal(11, code)
        assert.matches("cannot bind 127.0.0.1:1", out, 1, true)
    end)

    it("stops cleanly on SIGTERM and SIGINT (exit 0) with the stop hooks run", function()
        for _, signal in ipairs({ "TERM", "INT" }) do
            local code, out = cli.run_until({ "run", "services/examples/lifecycle/service.lua" },
                "service started", signal)
            assert.are.equal(0, code, out)
            assert.matches("after post_stop", out, 1, true)
            assert.matches("service stopped", out, 1, true)
        end
    end)

    it("keeps running when a task raises, logging the traceback", function()
        local path = cli.write_temp(service_source([[
local svc = tamarco.service { name = "flaky" }
local function fail_deep() error("task went wrong") end
svc:task("fails", function() tamarco.sleep(1) fail_deep() end)
svc:task_timer({ interval = 20 }, "alive", function(self)
    self.n = (self.n or 0) + 1
    if self.n == 5 then self.logger:info("still alive after the failure") end
end)
return svc
]]))
        local code, out = cli.run_until({ "run", path }, "still alive after the failure", "TERM")
        os.remove(path)
        assert.are.equal(0, code, out)
        assert.matches("task 'fails' failed", out, 1, true)
        assert.matches("fail_deep", out, 1, true)
    end)

    it("applies a settings file change while running: hook called, log profile changed", function()
        local yml = cli.write_temp([[
system:
  logging:
    profile: PRODUCTION
  microservices:
    my_admin:
      default_user: admin
      default_password: secret
]], ".yml")
        local changed = yml .. ".new"
        local f = assert(io.open(changed, "w"))
        f:write([[
system:
  logging:
    profile: DEVELOP
  microservices:
    my_admin:
      default_user: root
      default_password: secret
]])
        f:close()
        local code, out = cli.run_until({ "run", "services/examples/settings/service.lua", "--settings", yml },
            "service started", "TERM", nil, {
                { run = "mv " .. changed .. " " .. yml, wait = "system.microservices.my_admin.default_user" },
            })
        os.remove(yml)
        assert.are.equal(0, code, out)
        assert.matches('"key":"system.microservices.my_admin.default_user"', out, 1, true)
        assert.matches('"value":"root"', out, 1, true)
        -- the profile went from PRODUCTION to DEVELOP: debug records now pass
        assert.matches('"level":"DEBUG"', out, 1, true)
        assert.matches("setting change handled", out, 1, true)
        assert.is_nil(out:find("secret", 1, true))
    end)

    it("ends a stop that hangs with the watchdog (exit 1)", function()
        local path = cli.write_temp(service_source([[
local svc = tamarco.service { name = "stuck" }
function svc:stop() while true do end end
return svc
]]))
        local code, out = cli.run_until({ "run", path, "--watchdog", "1" }, "service started", "TERM")
        os.remove(path)
        assert.are.equal(1, code)
        assert.matches("did not stop within 1 s", out, 1, true)
    end)
end)
