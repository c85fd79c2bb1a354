local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local settings = require "tamarco.core.settings"
local errors = require "tamarco.core.errors"
local process = require "tamarco.c.process"
local uv = require "luv"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
local fixtures = here .. "/fixtures/settings/"

local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

-- Replaces the file the way editors do: write a temporary file, rename it over.
local function replace(path, text)
    write(path .. ".tmp", text)
    assert(os.rename(path .. ".tmp", path))
end

local function mkdtemp()
    return assert(uv.fs_mkdtemp((os.getenv("TMPDIR") or "/tmp") .. "/tamarco-settings-XXXXXX"))
end

local function rmtree(dir)
    for _, name in ipairs({ "settings.yml", "settings.yml.tmp" }) do os.remove(dir .. "/" .. name) end
    os.remove(dir)
end

-- Sets environment variables for the duration of fn.
local function with_env(vars, fn)
    local old = {}
    for name, value in pairs(vars) do
        old[name] = os.getenv(name) or false
        uv.os_setenv(name, value)
    end
    local ok, err = pcall(fn)
    for name, value in pairs(old) do
        if value then uv.os_setenv(name, value) else uv.os_unsetenv(name) end
    end
    if not ok then error(err, 0) end
end

local function drain_loop()
    for _ = 1, 5 do process.run_loop("nowait") end
end

describe("settings", function()
    describe("sources and precedence", function()
        it("has the built-in defaults", function()
            local store = assert(settings.load{ yaml_file = false })
            assert.are.equal("tamarco", store:get("system.deploy_name"))
            assert.are.equal("DEVELOP", store:get("system.logging.profile"))
            assert.are.equal(true, store:get("system.logging.stdout"))
            assert.are.equal(30, store:get("system.stop_timeout_seconds"))
            assert.are.same({ host = "127.0.0.1", port = 5747 },
                store:get("system.resources.tamarco_http_report_server"))
        end)

        it("layers defaults < dict < yaml < environment, deep-merged", function()
            local dir = mkdtemp()
            local path = dir .. "/settings.yml"
            write(path, "system:\n  layer: yaml\n  from_yaml: 3\n")
            with_env({ TAMARCO__SYSTEM__LAYER = "env", TAMARCO__SYSTEM__FROM_ENV = "4" }, function()
                local defaults = { system = { layer = "defaults", from_defaults = 1 } }
                local dict = { system = { layer = "dict", from_dict = 2 } }
                local function layer(opts)
                    return assert(settings.load(opts)):get("system.layer")
                end
                assert.are.equal("defaults", layer{ defaults = defaults, yaml_file = false })
                assert.are.equal("dict", layer{ defaults = defaults, dict = dict, yaml_file = false })
                assert.are.equal("yaml", layer{ defaults = defaults, dict = dict, yaml_file = path })
                assert.are.equal("env", layer{ defaults = defaults, dict = dict, yaml_file = path, environ = true })

                local store = assert(settings.load{ defaults = defaults, dict = dict, yaml_file = path, environ = true })
                assert.are.equal(1, store:get("system.from_defaults"))
                assert.are.equal(2, store:get("system.from_dict"))
                assert.are.equal(3, store:get("system.from_yaml"))
                assert.are.equal(4, store:get("system.from_env"))
                assert.are.equal("tamarco", store:get("system.deploy_name"))
                assert.are.same({ "builtin", "defaults", "dict", "yaml", "environ" }, store:sources())
            end)
            rmtree(dir)
        end)

        it("replaces lists as a whole instead of merging them", function()
            local store = assert(settings.load{
                defaults = { system = { hosts = { "a", "b", "c" } } },
                dict = { system = { hosts = { "x" } } },
                yaml_file = false,
            })
            assert.are.same({ "x" }, store:get("system.hosts"))
        end)

        it("reads the file named by TAMARCO_YML_FILE when yaml_file is nil", function()
            with_env({ TAMARCO_YML_FILE = fixtures .. "settings.yml" }, function()
                local store = assert(settings.load{})
                assert.are.equal("fixture_deploy", store:get("system.deploy_name"))
                assert.are.equal(fixtures .. "settings.yml", store.yaml_file)
                -- yaml_file = false turns the file off
                assert.are.equal("tamarco", assert(settings.load{ yaml_file = false }):get("system.deploy_name"))
            end)
        end)

        it("types environment values as YAML scalars", function()
            with_env({
                TAMARCO__SYSTEM__LOGGING__PROFILE = "PRODUCTION",
                TAMARCO__SYSTEM__STOP_TIMEOUT_SECONDS = "5",
                TAMARCO__SYSTEM__LOGGING__STDOUT = "no",
                TAMARCO__SYSTEM__MICROSERVICES__MY_SVC__RATIO = "0.5",
                TAMARCO_NOT_A_SETTING = "1",
            }, function()
                local store = assert(settings.load{ yaml_file = false, environ = true })
                assert.are.equal("PRODUCTION", store:get("system.logging.profile"))
                assert.are.equal(5, store:get("system.stop_timeout_seconds"))
                assert.are.equal(false, store:get("system.logging.stdout"))
                assert.are.equal(0.5, store:get("system.microservices.my_svc.ratio"))
                assert.is_nil(store:get("tamarco_not_a_setting", nil))
            end)
        end)

        it("ignores the environment unless asked", function()
            with_env({ TAMARCO__SYSTEM__DEPLOY_NAME = "from_env" }, function()
                assert.are.equal("tamarco", assert(settings.load{ yaml_file = false }):get("system.deploy_name"))
            end)
        end)
    end)

    describe("bad settings files", function()
        it("reports a syntax error with file, line and column", function()
            local path = fixtures .. "syntax_error.yml"
            local store, err = settings.load{ yaml_file = path }
            assert.is_nil(store)
            assert.is_true(errors.is(err, "settings"))
            assert.are.equal("settings file " .. path .. ":4:17: mapping values are not allowed in this context",
                err.message)
            assert.are.equal(path, err.file)
            assert.are.equal(4, err.line)
            assert.are.equal(17, err.column)
            assert.are.equal(2, err.exit_code)
        end)

        it("refuses a file whose top level is not a mapping", function()
            local path = fixtures .. "not_a_mapping.yml"
            local store, err = settings.load{ yaml_file = path }
            assert.is_nil(store)
            assert.is_true(errors.is(err, "settings"))
            assert.matches(path, err.message, 1, true)
            assert.matches("must be a mapping", err.message)
        end)

        it("reports a missing file by its path", function()
            local store, err = settings.load{ yaml_file = "/nonexistent/settings.yml" }
            assert.is_nil(store)
            assert.matches("settings file /nonexistent/settings.yml: No such file", err.message, 1, true)
        end)

        it("reads an empty file as no settings", function()
            local dir = mkdtemp()
            write(dir .. "/settings.yml", "# nothing yet\n")
            local store = assert(settings.load{ yaml_file = dir .. "/settings.yml" })
            assert.are.equal("tamarco", store:get("system.deploy_name"))
            rmtree(dir)
        end)

        it("raises on argument mistakes", function()
            assert.has_error(function() settings.load{ dict = "nope" } end)
            assert.has_error(function() settings.load{ yaml_file = 3 } end)
            local store = assert(settings.load{ yaml_file = false })
            assert.has_error(function() store:get(nil) end)
        end)
    end)

    describe("get", function()
        local store = assert(settings.load{ yaml_file = fixtures .. "settings.yml" })

        it("accepts dotted and slash keys", function()
            assert.are.equal("admin", store:get("system.microservices.my_admin.default_user"))
            assert.are.equal("admin", store:get("/system/microservices/my_admin/default_user"))
            assert.are.equal(6379, store:get("/system/resources/redis/port"))
        end)

        it("returns subtrees as copies", function()
            local logging = store:get("system.logging")
            assert.are.equal("TESTING", logging.profile)
            assert.are.equal(true, logging.stdout)
            logging.profile = "CHANGED"
            assert.are.equal("TESTING", store:get("system.logging.profile"))
        end)

        it("raises a settings error naming a missing key and the file", function()
            local ok, err = pcall(store.get, store, "system.x.y")
            assert.is_false(ok)
            assert.is_true(errors.is(err, "settings"))
            assert.are.equal("system.x.y", err.key)
            assert.are.equal("missing setting 'system.x.y' (not in defaults, settings file "
                .. fixtures .. "settings.yml, or environment)", err.message)
            ok, err = pcall(store.get, store, "/system/x/y")
            assert.are.equal("system.x.y", err.key)
            local bare = assert(settings.load{ yaml_file = false })
            ok, err = pcall(bare.get, bare, "system.nothing")
            assert.matches("settings file none", err.message, 1, true)
        end)

        it("returns the default, nil included, for a missing key", function()
            assert.are.equal(7, store:get("system.x.y", 7))
            assert.are.equal(1, select("#", store:get("system.x.y", nil)))
            assert.is_nil(store:get("system.x.y", nil))
            assert.are.equal(false, store:get("system.x.y", false))
        end)
    end)

    describe("views", function()
        local store = assert(settings.load{ yaml_file = fixtures .. "settings.yml" })

        it("reads the service's keys before the system's", function()
            local view = store:view("my_admin")
            assert.are.equal("admin", view:get("default_user"))
            assert.are.equal("PRODUCTION", view:get("logging.profile"))
            assert.are.equal("fixture_deploy", view:get("deploy_name"))
            assert.are.equal("d", view:get("missing", "d"))
            assert.are.equal(store, view.store)
            -- another service sees the system's values
            assert.are.equal("TESTING", store:view("other"):get("logging.profile"))
            assert.are.equal("TESTING", store:view("other"):get("/logging/profile"))
        end)

        it("merges a service's section over the system's", function()
            assert.are.same({ profile = "PRODUCTION", stdout = true }, store:view("my_admin"):get("logging"))
        end)

        it("names the key it reads", function()
            local view = store:view("my_admin")
            assert.are.equal("system.microservices.my_admin.default_user", view:key_of("default_user"))
            assert.are.equal("system.deploy_name", view:key_of("deploy_name"))
            assert.are.equal("system.microservices.my_admin.nope", view:key_of("nope"))
        end)

        it("raises naming both keys when missing", function()
            local view = store:view("my_admin")
            local ok, err = pcall(view.get, view, "nope")
            assert.is_false(ok)
            assert.is_true(errors.is(err, "settings"))
            assert.matches("'system.microservices.my_admin.nope' or 'system.nope'", err.message, 1, true)
            assert.are.equal("system.microservices.my_admin.nope", err.key)
        end)

        it("reads a resource's settings for a service", function()
            local redis = store:resource_view("my_admin", "redis")
            assert.are.equal(6380, redis:get("port"))
            assert.are.equal("127.0.0.1", redis:get("host"))
            assert.are.same({ host = "127.0.0.1", port = 6380 }, redis:get(""))
            assert.are.equal("system.microservices.my_admin.resources.redis.port", redis:key_of("port"))
            assert.are.equal("system.resources.redis.host", redis:key_of("host"))
            local other = store:resource_view("other", "redis")
            assert.are.equal(6379, other:get("port"))
            assert.are.equal(5747, store:resource_view("x", "tamarco_http_report_server"):get("port"))
        end)
    end)

    describe("watching the YAML file", function()
        local dir, path, store, logged

        before_each(function()
            dir = mkdtemp()
            path = dir .. "/settings.yml"
            write(path, "system:\n  logging:\n    profile: TESTING\n  deploy_name: one\n")
            store = assert(settings.load{ yaml_file = path })
            logged = {}
            store.log = function(level, message) logged[#logged + 1] = { level, message } end
        end)

        after_each(function()
            store:stop_watching()
            testing.turn(1)
            rmtree(dir)
        end)

        it("fires a watch exactly once per real change", function()
            local calls, view_calls, changes = {}, {}, {}
            testing.run(function()
                assert(store:start_watching())
                store:watch("system.logging.profile", function(value, key)
                    calls[#calls + 1] = { value, key }
                end)
                store:view("svc"):watch("logging", function(value) view_calls[#view_calls + 1] = value end)
                store:on_change(function(key, value) changes[#changes + 1] = { key, value } end)
                store:watch("/system/deploy_name", function(value) error("deploy_name did not change") end)

                replace(path, "system:\n  logging:\n    profile: PRODUCTION\n  deploy_name: one\n")
                tamarco.sleep(300)
                assert.are.same({ { "PRODUCTION", "system.logging.profile" } }, calls)
                assert.are.equal("PRODUCTION", store:get("system.logging.profile"))
                assert.are.same({ { profile = "PRODUCTION", stdout = true } }, view_calls)
                assert.are.same({ { "system.logging.profile", "PRODUCTION" } }, changes)

                -- the same content again (in place, then by rename): no call
                write(path, "system:\n  logging:\n    profile: PRODUCTION\n  deploy_name: one\n")
                tamarco.sleep(200)
                replace(path, "system:\n  logging: {profile: PRODUCTION}\n  deploy_name: one\n")
                tamarco.sleep(200)
                assert.are.equal(1, #calls)
                assert.are.equal(1, #changes)

                -- a key removed from the file falls back to the defaults
                replace(path, "system:\n  deploy_name: one\n")
                tamarco.sleep(300)
                assert.are.same({ "DEVELOP", "system.logging.profile" }, calls[2])
                assert.are.equal(2, #calls)
            end)
            assert.are.same({}, logged)
        end)

        it("keeps the old values when the file becomes invalid", function()
            local calls = {}
            testing.run(function()
                assert(store:start_watching())
                store:watch("system.logging.profile", function(value) calls[#calls + 1] = value end)

                replace(path, "system:\n  logging:\n    profile: PRODUCTION\n  x: y: z\n")
                tamarco.sleep(300)
                assert.are.same({}, calls)
                assert.are.equal("TESTING", store:get("system.logging.profile"))
                assert.are.equal(1, #logged)
                assert.are.equal("warning", logged[1][1])
                assert.matches("settings file " .. path .. ":4:7:", logged[1][2], 1, true)

                replace(path, "- not a mapping\n")
                tamarco.sleep(300)
                assert.are.equal("TESTING", store:get("system.logging.profile"))
                assert.are.equal(2, #logged)

                -- and recovers on the next valid file
                replace(path, "system:\n  logging:\n    profile: PRODUCTION\n")
                tamarco.sleep(300)
                assert.are.same({ "PRODUCTION" }, calls)
            end)
        end)

        it("stops calling a cancelled watch", function()
            local calls = 0
            testing.run(function()
                assert(store:start_watching())
                local handle = store:watch("system.deploy_name", function() calls = calls + 1 end)
                replace(path, "system:\n  deploy_name: two\n")
                tamarco.sleep(300)
                handle:cancel()
                replace(path, "system:\n  deploy_name: three\n")
                tamarco.sleep(300)
            end)
            assert.are.equal(1, calls)
            assert.are.equal("three", store:get("system.deploy_name"))
        end)

        it("leaves nothing alive after stop_watching", function()
            drain_loop()
            local baseline_alive = uv.loop_alive()
            local calls = 0
            testing.run(function()
                assert(store:start_watching())
                store:watch("system.deploy_name", function() calls = calls + 1 end)
                assert.is_true(uv.loop_alive())
                store:stop_watching()
                replace(path, "system:\n  deploy_name: after_stop\n")
                tamarco.sleep(200)
            end)
            drain_loop()
            assert.are.equal(0, calls)
            assert.are.equal("one", store:get("system.deploy_name"))
            if not baseline_alive then      -- other specs may keep the loop alive
                assert.is_false(uv.loop_alive())
            end
            assert.is_nil(store.entries[2].source._event)
        end)
    end)

    describe("sources", function()
        it("plugs in a backend with load, watch and close (an etcd stand-in)", function()
            local fake = {
                name = "etcd",
                data = { system = { deploy_name = "from_etcd", logging = { profile = "ETCD" } } },
                closed = false,
            }
            function fake:load() return self.data end
            function fake:watch(on_tree_changed) self.push = on_tree_changed return true end
            function fake:close() self.closed = true end

            with_env({ TAMARCO__SYSTEM__LOGGING__PROFILE = "ENV" }, function()
                local store = assert(settings.load{ yaml_file = fixtures .. "settings.yml", environ = true })
                local calls, logged = {}, {}
                store.log = function(level, message) logged[#logged + 1] = message end
                testing.run(function()
                    assert(store:add_source(fake, "environ"))
                    assert.are.same({ "builtin", "yaml", "etcd", "environ" }, store:sources())
                    assert.are.equal("from_etcd", store:get("system.deploy_name"))
                    assert.are.equal("ENV", store:get("system.logging.profile"))

                    store:watch("system.deploy_name", function(value) calls[#calls + 1] = value end)
                    assert(store:start_watching())
                    fake.push({ system = { deploy_name = "changed" } })
                    tamarco.sleep(20)
                    fake.push(nil, "etcd is down")
                    tamarco.sleep(20)
                    store:stop_watching()
                end)
                assert.are.same({ "changed" }, calls)
                assert.are.equal("changed", store:get("system.deploy_name"))
                assert.are.same({ "settings source etcd: etcd is down; keeping the previous settings" }, logged)
                assert.is_true(fake.closed)
            end)
        end)

        it("returns the error of a failing source", function()
            local store = assert(settings.load{ yaml_file = false })
            local ok, err = store:add_source({ name = "broken", load = function() return nil, "no route" end })
            assert.is_nil(ok)
            assert.is_true(errors.is(err, "settings"))
            assert.matches("settings source broken: no route", err.message, 1, true)
        end)

        it("reloads every source on demand", function()
            local dir = mkdtemp()
            local path = dir .. "/settings.yml"
            write(path, "system:\n  deploy_name: one\n")
            local store = assert(settings.load{ yaml_file = path })
            local calls = {}
            testing.run(function()
                store:watch("system.deploy_name", function(value, key) calls[#calls + 1] = { value, key } end)
                assert(store:reload())
                write(path, "system:\n  deploy_name: two\n")
                assert(store:reload())
                tamarco.sleep(20)
            end)
            assert.are.same({ { "two", "system.deploy_name" } }, calls)
            rmtree(dir)
        end)
    end)
end)
