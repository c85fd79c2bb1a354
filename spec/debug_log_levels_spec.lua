-- Log levels changed while a real service runs: PUT /debug/loglevel, then
-- the settings file (system.logging.levels), which reverts what was set at
-- run time. Needs a real redis-server (the service's cache).
local cjson = require "cjson"
local cli = require "spec.support.cli"
local free_port = require("spec.support.net").free_port

local REDIS_HOST = os.getenv("TAMARCO_TEST_REDIS_HOST")
local REDIS_PORT = os.getenv("TAMARCO_TEST_REDIS_PORT")
if not REDIS_HOST or not REDIS_PORT then
    error("debug_log_levels_spec needs a real redis-server: first\n"
        .. "  eval \"$(TAMARCO_SERVICES=redis scripts/test-services.sh start)\"", 0)
end

local function shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function yaml(levels)
    local lines = { "system:", "  logging:", "    profile: PRODUCTION", "    stdout: true" }
    if levels then
        lines[#lines + 1] = "    levels:"
        for logger, level in pairs(levels) do lines[#lines + 1] = ("      %s: %s"):format(logger, level) end
    end
    return table.concat(lines, "\n") .. "\n"
end

-- writes the settings file by renaming a new one over it (as editors do)
local function write_yaml(path, levels)
    return ("printf %%s %s > %s.new && mv %s.new %s"):format(shell_quote(yaml(levels)), path, path, path)
end

-- requests /hello/<name> until the log holds the debug record for it
local function hello_until_logged(api, name)
    return ("for i in $(seq 1 100); do curl -s %s/hello/%s >/dev/null; grep -q '\"name\":\"%s\"' $out && break; "
        .. "sleep 0.1; done"):format(api, name, name)
end

describe("log levels at run time", function()
    it("change with PUT /debug/loglevel at once and are reverted by the next settings change", function()
        local port, report_port = free_port(), free_port()
        local api = "http://127.0.0.1:" .. port
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -m 700 " .. dir) == 0)
        local settings_file = dir .. "/settings.yml"
        local f = assert(io.open(settings_file, "w"))
        f:write(yaml(nil))
        f:close()
        local put = ("curl -s -X PUT -d '{\"level\":\"debug\",\"logger\":\"debugged.api\"}' "
            .. "http://127.0.0.1:%d/debug/loglevel > %s/put"):format(report_port, dir)
        local code, out = cli.run_until(
            { "run", "spec/fixtures/services/debug_service.lua", "--debug", "--settings", settings_file },
            "service started", "TERM", {
                TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(port),
                TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = tostring(report_port),
                TAMARCO__SYSTEM__RESOURCES__CACHE__HOST = REDIS_HOST,
                TAMARCO__SYSTEM__RESOURCES__CACHE__PORT = REDIS_PORT,
            }, {
                -- INFO: no debug record; after the PUT the very next request logs one
                { run = "curl -s " .. api .. "/hello/before >/dev/null; " .. put .. "; curl -s " .. api
                        .. "/hello/after >/dev/null", wait = '"name":"after"' },
                -- a settings change of the levels: the settings rule again
                { run = write_yaml(settings_file, { ["debugged.cache"] = "WARNING" }),
                  wait = '"target_logger":"debugged.cache"' },
                { run = "curl -s " .. api .. "/hello/reverted >/dev/null; "
                        .. write_yaml(settings_file, { ["debugged.api"] = "DEBUG" }) .. "; "
                        .. hello_until_logged(api, "from-settings"),
                  wait = '"name":"from-settings"' },
            })
        local put_answer = cli.read_all(dir .. "/put")
        os.execute("rm -rf " .. dir)
        assert.are.equal(0, code, out)
        assert.are.same({ logger = "debugged.api", old = "INFO", new = "DEBUG" }, cjson.decode(put_answer))

        local changes, hellos = {}, {}
        for line in out:gmatch("[^\n]+") do
            local ok, record = pcall(cjson.decode, line)
            if ok and type(record) == "table" then
                if record.message == "log level changed" then changes[#changes + 1] = record end
                if record.message == "saying hello" then hellos[#hellos + 1] = record.name end
            end
        end
        -- debug records only while the level said so
        assert.are.same({ "after", "from-settings" }, { hellos[1], hellos[#hellos] })
        for _, name in ipairs(hellos) do
            assert.are_not.equal("before", name)
            assert.are_not.equal("reverted", name)
        end
        -- each change logged: logger, old, new, source, who
        assert.are.equal("debugged.api", changes[1].target_logger)
        assert.are.equal("INFO", changes[1].old_level)
        assert.are.equal("DEBUG", changes[1].new_level)
        assert.are.equal("http", changes[1].source)
        assert.matches("PUT /debug/loglevel from 127.0.0.1", changes[1].by, 1, true)
        local reverted, from_settings = false, false
        for _, c in ipairs(changes) do
            if c.target_logger == "debugged.api" and c.by == "settings" and c.old_level == "DEBUG" then reverted = true end
            if c.target_logger == "debugged.api" and c.by == "settings" and c.new_level == "DEBUG" then
                from_settings = true
                assert.matches("settings change settings file " .. settings_file, c.source, 1, true)
            end
        end
        assert.is_true(reverted, out)
        assert.is_true(from_settings, out)
    end)

    it("follow system.logging.levels in etcd, through the settings watch", function()
        local etcd_host, etcd_port = os.getenv("TAMARCO_TEST_ETCD_HOST"), os.getenv("TAMARCO_TEST_ETCD_PORT")
        assert(etcd_host and etcd_port, "needs etcd: TAMARCO_TEST_ETCD_HOST / TAMARCO_TEST_ETCD_PORT")
        local etcdctl = ("ETCDCTL_API=3 etcdctl --endpoints=http://%s:%s "):format(etcd_host, etcd_port)
        local prefix = "/system/microservices/debugged/logging/levels/"
        local port = free_port()
        local api = "http://127.0.0.1:" .. port
        os.execute(etcdctl .. "del --prefix /system/microservices/debugged/ >/dev/null")
        local code, out = cli.run_until(
            { "run", "spec/fixtures/services/debug_service.lua" }, "service started", "TERM", {
                TAMARCO_ETCD_HOST = etcd_host, TAMARCO_ETCD_PORT = etcd_port,
                TAMARCO__SYSTEM__LOGGING__PROFILE = "PRODUCTION",
                TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(port),
                TAMARCO__SYSTEM__RESOURCES__CACHE__HOST = REDIS_HOST,
                TAMARCO__SYSTEM__RESOURCES__CACHE__PORT = REDIS_PORT,
            }, {
                { run = "curl -s " .. api .. "/hello/before >/dev/null; " .. etcdctl .. "put " .. prefix
                        .. "debugged.api '\"DEBUG\"' >/dev/null; " .. hello_until_logged(api, "from-etcd"),
                  wait = '"name":"from-etcd"' },
                { run = etcdctl .. "del " .. prefix .. "debugged.api >/dev/null",
                  wait = "(service's INFO)" },
                { run = "curl -s " .. api .. "/hello/after-delete >/dev/null; curl -s " .. api
                        .. "/hello/marker >/dev/null", wait = "debugged.api" },
            })
        os.execute(etcdctl .. "del --prefix /system/microservices/debugged/ >/dev/null")
        assert.are.equal(0, code, out)
        assert.is_nil(out:find('"name":"before"', 1, true))
        assert.is_nil(out:find('"name":"after-delete"', 1, true))
        assert.matches("etcd key /system/microservices/debugged/logging/levels", out, 1, true)
    end)
end)
