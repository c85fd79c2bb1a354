-- The framework's own settings are checked before a service starts (exit 2
-- naming the key and where it comes from) and before a change is applied
-- while it runs (refused, logged, the last good settings kept).
local cli = require "spec.support.cli"
local schema = require "tamarco.core.settings_schema"

local SERVICE = [[
local tamarco = require "tamarco"
local http = require "tamarco.resources.http"
local svc = tamarco.service { name = "checked", resources = { api = http.server { port = 0 } } }
function svc:on_settings_change(key, value)
    self.logger:info("CHANGED " .. key .. "=" .. tostring(value))
end
return svc
]]

local function run_with(yml_text, env)
    local path = cli.write_temp(SERVICE)
    local yml = cli.write_temp(yml_text, ".yml")
    local code, out = cli.run({ "run", path, "--settings", yml }, env)
    os.remove(path)
    os.remove(yml)
    return code, out, yml
end

-- The spec helper's environment puts the report server on a free port
-- (TAMARCO__SYSTEM__RESOURCES__...): that would replace a `system` or
-- `system.resources` that is not a mapping, so refusals run without it.
local NO_REPORT_PORT = { TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = "" }

local function refused(yml_text, expected, env)
    local merged = {}
    for k, v in pairs(NO_REPORT_PORT) do merged[k] = v end
    for k, v in pairs(env or {}) do merged[k] = v end
    local code, out, yml = run_with(yml_text, merged)
    assert.are.equal(2, code, out)
    assert.matches(expected:gsub("YML", yml), out, 1, true)
    assert.not_matches("service started", out, 1, true)
    assert.not_matches("stack traceback", out, 1, true)
end

describe("framework settings checks", function()
    it("refuses a stop budget that is not a positive number, from the file or the environment", function()
        refused("system:\n  stop_timeout_seconds: 0\n",
            "tamarco-host: settings file YML:2: system.stop_timeout_seconds: must be greater than 0, not 0")
        refused("system:\n  stop_timeout_seconds: -5\n",
            "system.stop_timeout_seconds: must be greater than 0, not -5")
        refused("system:\n  stop_timeout_seconds: soon\n",
            'system.stop_timeout_seconds: must be a number, not "soon"')
        for _, value in ipairs({ "0", "-5", "soon" }) do
            refused("system:\n  deploy_name: d\n", "environment variable TAMARCO__SYSTEM__STOP_TIMEOUT_SECONDS: "
                .. "system.stop_timeout_seconds: must be", { TAMARCO__SYSTEM__STOP_TIMEOUT_SECONDS = value })
        end
    end)

    it("refuses numbers beyond what the server can hold", function()
        refused("system:\n  resources:\n    api:\n      max_connections: 3000000000\n",
            "YML:4: system.resources.api.max_connections: must be at most 1000000, not 3000000000")
        refused("system:\n  resources:\n    api:\n      max_headers: 3000000000\n",
            "YML:4: system.resources.api.max_headers: must be at most 65535, not 3000000000")
        refused("system:\n  resources:\n    api:\n      max_body_size: 1e300\n",
            "YML:4: system.resources.api.max_body_size: must be at most 1099511627776, not 1e+300")
        refused("system:\n  resources:\n    tamarco_http_report_server:\n      backlog: 1e12\n",
            "system.resources.tamarco_http_report_server.backlog: must be at most 65535")
        refused("system:\n  logging:\n    file_backup_count: 1.5\n",
            "system.logging.file_backup_count: must be a whole number, not 1.5")
    end)

    it("gives every number the framework reads a range", function()
        local checked = 0
        local function walk(spec, where)
            if spec.kind == "number" then
                assert.is_number(spec.min, where)
                assert.is_number(spec.max, where)
                assert.is_true(spec.max <= 2 ^ 53, where)
                checked = checked + 1
            end
            for k, sub in pairs(spec.keys or {}) do walk(sub, where .. "." .. k) end
            for i, sub in ipairs(spec) do walk(sub, where .. "[" .. i .. "]") end
        end
        for k, spec in pairs(schema.system) do walk(spec, "system." .. k) end
        for type_name, keys in pairs(schema.resources) do
            for k, spec in pairs(keys) do walk(spec, type_name .. "." .. k) end
        end
        assert.is_true(checked >= 40, "numbers checked: " .. checked)
    end)

    it("refuses a framework section that is not a mapping, naming the key", function()
        refused("system: [1, 2, 3]\n", "settings file YML:1: system: must be a mapping of settings, not a list")
        refused("system:\n  resources: oops\n", 'YML:2: system.resources: must be a mapping of settings, not "oops"')
        refused("system:\n  deploy_name: d\n", "environment variable TAMARCO__SYSTEM__RESOURCES: system.resources: "
            .. 'must be a mapping of settings, not "oops"', { TAMARCO__SYSTEM__RESOURCES = "oops" })
        refused("system:\n  logging: loud\n", 'YML:2: system.logging: must be a mapping of settings, not "loud"')
        refused("logging: loud\n", "YML:1: logging: is read under system: did you mean `system.logging`?")
        refused("system:\n  resources:\n    api: 8080\n",
            "YML:3: system.resources.api: must be a mapping of settings, not 8080")
    end)

    it("refuses a changed settings file that would be refused at start, keeping the last good settings", function()
        local path = cli.write_temp(SERVICE)
        local good = "system:\n  logging:\n    profile: PRODUCTION\n  microservices:\n    checked:\n"
            .. "      greeting: hello\n      resources:\n        api:\n          port: 0\n"
        local yml = cli.write_temp(good, ".yml")
        local bad = cli.write_temp(good:gsub("port: 0", "port: notaport"):gsub("hello", "bad-hello"), ".yml")
        local fixed = cli.write_temp(good:gsub("hello", "hi again"), ".yml")
        local code, out = cli.run_until({ "run", path, "--settings", yml }, "service started", "TERM", nil, {
            { run = "mv " .. bad .. " " .. yml, wait = "keeping the last good settings" },
            { run = "mv " .. fixed .. " " .. yml, wait = "CHANGED" },
        })
        os.remove(path)
        os.remove(yml)
        assert.are.equal(0, code, out)
        -- through the service's logger, as a record, naming line and key
        assert.matches('"logger":"checked.settings"', out, 1, true)
        assert.matches("system.microservices.checked.resources.api.port: must be a number, not "
            .. '\\"notaport\\"; keeping the last good settings', out, 1, true)
        -- the hook saw the good change only
        assert.is_nil(out:find("notaport\"", 1, true) and out:find("CHANGED [^\n]*notaport"), out)
        assert.is_nil(out:find("bad-hello", 1, true), out)
        assert.matches("CHANGED system.microservices.checked.greeting=hi again", out, 1, true)
    end)
end)

describe("misspelled framework settings", function()
    local MISSPELLED = "system:\n  loging:\n    profile: PRODUCTION\n  logging:\n    profle: DEVELOP\n"
        .. "  resources:\n    api:\n      prot: 18082\n      port: 0\n"

    it("are warned about at start with file:line and the closest known key", function()
        local path = cli.write_temp(SERVICE)
        local yml = cli.write_temp(MISSPELLED, ".yml")
        local code, out = cli.run_until({ "run", path, "--settings", yml }, "service started", "TERM")
        os.remove(path)
        os.remove(yml)
        assert.are.equal(0, code, out)
        assert.matches(yml .. ":2: system.loging: unknown setting (did you mean `logging`?)", out, 1, true)
        assert.matches(yml .. ":5: system.logging.profle: unknown setting (did you mean `profile`?)", out, 1, true)
        assert.matches(yml .. ":8: system.resources.api.prot: unknown setting (did you mean `port`?)", out, 1, true)
        assert.matches("WARNING", out, 1, true)
    end)

    it("are errors (exit 2) with --strict-settings or system.strict_settings", function()
        local path = cli.write_temp(SERVICE)
        local yml = cli.write_temp(MISSPELLED, ".yml")
        local code, out = cli.run({ "run", path, "--settings", yml, "--strict-settings" })
        assert.are.equal(2, code, out)
        assert.matches(yml .. ":8: system.resources.api.prot: unknown setting (did you mean `port`?)", out, 1, true)
        assert.matches("3 unknown settings", out, 1, true)
        assert.not_matches("service started", out, 1, true)
        code, out = cli.run({ "run", path, "--settings", yml }, { TAMARCO__SYSTEM__STRICT_SETTINGS = "true" })
        os.remove(path)
        os.remove(yml)
        assert.are.equal(2, code, out)
        assert.matches("system.logging.profle: unknown setting", out, 1, true)
    end)
end)

describe("testing.start_service", function()
    local testing = require "tamarco.testing"
    local tamarco = require "tamarco"

    it("fails an assert with the reason and the exit code", function()
        local svc = tamarco.service { name = "needs_setting" }
        function svc:start() self.settings:get("api_url") end
        local ok, message = pcall(testing.run, function()
            return assert(testing.start_service(svc))
        end)
        assert.is_false(ok)
        assert.matches("missing setting 'system.microservices.needs_setting.api_url'", message, 1, true)
        assert.matches("(exit code 2)", message, 1, true)
        -- the failure keeps what it is made of
        local running, failure, code = testing.run(function() return testing.start_service(svc) end)
        assert.is_nil(running)
        assert.are.equal(2, code)
        assert.are.equal(2, failure.exit_code)
        assert.are.equal("settings", failure.kind)
        assert.are.equal("system.microservices.needs_setting.api_url", failure.key)
    end)
end)
