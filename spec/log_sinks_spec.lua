-- Remote log sinks against real receivers: a UDP listener, a Redis list and
-- an HTTP server, all on loopback.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local logging = require "tamarco.core.logging"
local log_sinks = require "tamarco.ops.log_sinks"
local settings = require "tamarco.core.settings"
local metrics = require "tamarco.core.metrics"
local cjson = require "cjson"

local function view_with(logging_section)
    local store = assert(settings.load { dict = { system = { logging = logging_section } },
        yaml_file = false, environ = false })
    return store:view("sinky")
end

local free_port = require("spec.support.net").free_port

local function dropped(sink_name)
    return require("tamarco.ops.log_sinks.queue").dropped_counter(sink_name):get()
end

before_each(function()
    logging.configure { service_name = "sinky", deploy_name = "spec", instance_id = "i-1",
        profile = "TESTING", stdout = false }
end)

-- A UDP socket on loopback that keeps every datagram: server, port, list.
local function udp_listener()
    local uv = require "luv"
    local received = {}
    local server = uv.new_udp()
    server:bind("127.0.0.1", 0)
    server:recv_start(function(_, data) if data then received[#received + 1] = data end end)
    return server, server:getsockname().port, received
end

describe("remote log sinks", function()
    it("sends logstash v1 records over UDP", function()
        local server, port, received = udp_listener()
        testing.run(function()
            local sinks = log_sinks.configure_from_settings(
                view_with { logstash = { enabled = true, host = "127.0.0.1", port = port, version = 1 } }, logging)
            local log = logging.get_logger("sinky")
            for i = 1, 20 do log:info("udp record", { n = i, tags = { "orders" } }) end
            local waited = 0
            while #received < 20 and waited < 2000 do tamarco.sleep(10) waited = waited + 10 end
            log_sinks.close(sinks, logging)
        end)
        server:close()
        assert.are.equal(20, #received)
        local first = cjson.decode(received[1])
        assert.are.equal("udp record", first.message)
        assert.are.equal("1", tostring(first["@version"]))
        assert.are.equal(1, first.n)
        -- Tamarco's fields: the user's tags, type "logstash", path = the file that logged
        assert.are.same({ "orders" }, first.tags)
        assert.are.equal("logstash", first.type)
        assert.are.equal(debug.getinfo(1, "S").source:sub(2), first.path)
        assert.is_nil(first.source_path)
    end)

    it("takes the logstash version from system.logging.version when the sink has none (Tamarco's key)", function()
        local server, port, received = udp_listener()
        testing.run(function()
            local sinks = log_sinks.configure_from_settings(
                view_with { version = 0, logstash = { enabled = true, host = "127.0.0.1", port = port } }, logging)
            logging.get_logger("sinky"):warning("v0 record", { tags = "one" })
            local waited = 0
            while #received < 1 and waited < 2000 do tamarco.sleep(10) waited = waited + 10 end
            log_sinks.close(sinks, logging)
        end)
        server:close()
        local v0 = cjson.decode(received[1])
        assert.are.equal("v0 record", v0["@message"])
        assert.are.equal(require("tamarco.c.process").hostname(), v0["@source_host"])
        assert.are.same({ "one" }, v0["@tags"])
        assert.are.equal("logstash", v0["@type"])
        assert.are.equal("WARNING", v0["@fields"].levelname)
        assert.are.equal(debug.getinfo(1, "S").source:sub(2), v0["@source_path"])
        -- source_path: false puts the logger name in the path (no debug.getinfo per record)
        local plain = log_sinks.configure_from_settings(view_with { source_path = false,
            logstash = { enabled = true, host = "127.0.0.1", port = 9 } }, logging)
        assert.is_false(plain[1].wants_source)
        log_sinks.close(plain, logging)
        assert.has_error(function()
            log_sinks.configure_from_settings(view_with { logstash = { enabled = true, version = 3 } }, logging)
        end, "system.logging.logstash.version: must be 0 or 1, not 3")
    end)

    it("sends the same UDP datagrams whether a record reaches the sink in parts or as a table", function()
        -- The UDP sink alone takes plain records in parts (emit_parts, no
        -- record table); with a second sink that needs tables, every record
        -- is a table. The datagrams must not differ by one byte.
        local many = {}
        for i = 1, 60 do many["k" .. i] = i end   -- more keys than the encoder keeps on the stack
        local cases = {   -- message, extra, taken in parts?
            { "plain", { user = "alice", n = 7, path = "/hello", ok = true, ratio = 1.5, big = 2 ^ 53 }, true },
            { "no extra fields", nil, true },
            { "escapes \"q\"\n\t", { quote = 'a"b', nl = "x\ny", utf = "caf\195\169", bad = "\255",
                                      sep = "\226\128\168" }, true },
            { "layout names", { host = "h", type = "t", lineno = 3, process = 9, thread_name = "w",
                                tags = "solo", levelname = "l", stack_trace = "s", logger_name = "n" }, true },
            { "many fields", many, true },
            { "tags array", { tags = { "a", "b" } }, false },            -- a table: masked copy
            { "secret", { password = "hunter2", user = "bob" }, false },
            { "url http://user:pw@db:5432/x", { n = 1 }, false },
            { "url value", { dsn = "redis://:pw@cache:6379/0" }, false },
            { "standard names", { message = "m2", level = "x", service_name = "s" }, true },   -- the sink says no
            { "source fields", { source_path = "mine", source_line = 1 }, true },                -- the sink says no
            { "traceback field", { traceback = "tb" }, true },                                     -- the sink says no
            { "number key", { [1] = "one", [2.5] = "x" }, false },
            { 42, { n = 1 }, false },                                                            -- not a string
        }
        local function run(version, source_path, with_table_sink)
            local server, port, received = udp_listener()
            local in_parts, as_tables = 0, 0
            testing.run(function()
                local sinks = log_sinks.configure_from_settings(view_with { source_path = source_path,
                    logstash = { enabled = true, host = "127.0.0.1", port = port, version = version,
                                 message_type = "mt", tags = { "svc" } } }, logging)
                local udp_sink = sinks[1]
                local emit, emit_parts = udp_sink.emit, udp_sink.emit_parts
                function udp_sink:emit(record) as_tables = as_tables + 1 return emit(self, record) end
                function udp_sink:emit_parts(...)
                    local done = emit_parts(self, ...)
                    if done then in_parts = in_parts + 1 end
                    return done
                end
                local table_sink = with_table_sink and logging.add_sink { name = "tables", emit = function() end }
                local log = logging.get_logger("sinky.parts")
                for _, case in ipairs(cases) do log:info(case[1], case[2]) end
                log:error("an error", { n = 1 })
                testing.wait_until(function() return #received >= #cases + 1 end)
                if table_sink then logging.remove_sink(table_sink) end
                log_sinks.close(sinks, logging)
            end)
            server:close()
            for i, datagram in ipairs(received) do   -- records of different milliseconds
                received[i] = datagram:gsub('^{"@timestamp":"[^"]*"', '{"@timestamp":"T"')
            end
            return received, in_parts, as_tables
        end
        local taken_in_parts = 0
        for _, case in ipairs(cases) do
            if case[3] and not (case[2] and (case[2].message or case[2].source_path or case[2].traceback)) then
                taken_in_parts = taken_in_parts + 1
            end
        end
        for _, version in ipairs({ 0, 1 }) do
            for _, source_path in ipairs({ true, false }) do
                local parts, in_parts, as_tables = run(version, source_path, false)
                local tables, none_in_parts = run(version, source_path, true)
                assert.are.equal(#cases + 1, #parts)
                assert.are.equal(taken_in_parts + 1, in_parts)     -- the error record too
                assert.are.equal(#cases - taken_in_parts, as_tables)
                assert.are.equal(0, none_in_parts)
                for i = 1, #cases + 1 do
                    assert.are.equal(tables[i], parts[i])
                end
            end
        end
    end)

    it("pushes logstash records to a Redis list", function()
        local host, port = os.getenv("TAMARCO_TEST_REDIS_HOST"), tonumber(os.getenv("TAMARCO_TEST_REDIS_PORT"))
        assert(host and port, "needs TAMARCO_TEST_REDIS_HOST/PORT (scripts/test.sh starts Redis)")
        testing.run(function()
            local redis = require "tamarco.resources.redis"
            local reader = assert(redis.client():connect_to { host = host, port = port })
            reader:del("spec_logs")
            local sinks = log_sinks.configure_from_settings(
                view_with { redis = { enabled = true, host = host, port = port, key = "spec_logs" } }, logging)
            local log = logging.get_logger("sinky")
            for i = 1, 100 do log:info("redis record", { n = i }) end
            local waited = 0
            while (reader:llen("spec_logs") or 0) < 100 and waited < 3000 do tamarco.sleep(10) waited = waited + 10 end
            local lines = reader:lrange("spec_logs", 0, -1)
            assert.are.equal(100, #lines)
            -- Tamarco's Redis handler: logstash v0, type "record"
            local last = cjson.decode(lines[100])
            assert.are.equal("redis record", last["@message"])
            assert.are.equal("record", last["@type"])
            assert.are.equal(100, last["@fields"].n)
            assert.are.equal("sinky", last["@fields"].service_name)
            reader:del("spec_logs")
            log_sinks.close(sinks, logging)
            reader:close()
        end)
    end)

    it("posts batches of records to an HTTP endpoint with basic auth, and a sink that comes back resumes", function()
        local http = require "tamarco.resources.http"
        local port = free_port()
        local batches, auth = {}, nil
        testing.run(function()
            local sinks = log_sinks.configure_from_settings(view_with { http = {
                enabled = true, url = "http://127.0.0.1:" .. port .. "/logs", user = "logger",
                password = "s3cret", max_records = 10, max_time_seconds = 0.05 } }, logging)
            local log = logging.get_logger("sinky")
            -- the receiver is not there yet: records wait in the queue
            for i = 1, 25 do log:info("http record", { n = i }) end
            tamarco.sleep(100)
            local svc = tamarco.service { name = "receiver", resources = { api = http.server { port = port } },
                report_server = false }
            svc.api:post("/logs", function(req)
                auth = req.headers.authorization
                batches[#batches + 1] = req:json()
                return 204
            end)
            local running = assert(testing.start_service(svc))
            local total, waited = 0, 0
            while total < 25 and waited < 10000 do
                tamarco.sleep(20)
                waited = waited + 20
                total = 0
                for _, batch in ipairs(batches) do
                    for _, record in ipairs(batch) do
                        if record["@message"] == "http record" then total = total + 1 end
                    end
                end
            end
            log_sinks.close(sinks, logging)
            running:stop()
            assert.are.equal(25, total)
        end)
        for _, batch in ipairs(batches) do assert.is_true(#batch <= 10) end
        assert.are.equal("Basic " .. require("tamarco.c.codec").base64_encode("logger:s3cret"), auth)
        -- Tamarco's HTTP handler: an array of logstash v0 records, type "record"
        assert.are.equal("http record", batches[1][1]["@message"])
        assert.are.equal("record", batches[1][1]["@type"])
        assert.are.equal(1, batches[1][1]["@fields"].n)
    end)

    it("a Redis sink with a version setting sends that layout", function()
        local host, port = os.getenv("TAMARCO_TEST_REDIS_HOST"), tonumber(os.getenv("TAMARCO_TEST_REDIS_PORT"))
        testing.run(function()
            local reader = assert(require("tamarco.resources.redis").client():connect_to { host = host, port = port })
            reader:del("spec_logs_v1")
            local sinks = log_sinks.configure_from_settings(view_with { redis = { enabled = true, host = host,
                port = port, key = "spec_logs_v1", version = 1, message_type = "logstash", fqdn = true } }, logging)
            logging.get_logger("sinky"):info("v1 please", { n = 7 })
            log_sinks.close(sinks, logging)
            local v1 = cjson.decode(reader:lrange("spec_logs_v1", 0, -1)[1])
            assert.are.equal("v1 please", v1.message)
            assert.are.equal("1", v1["@version"])
            assert.are.equal("logstash", v1.type)
            assert.are.equal(7, v1.n)
            -- fqdn: the host's fully qualified name, as the resolver gives it
            local infos = require("luv").getaddrinfo(require("tamarco.c.process").hostname(), nil, { canonname = true })
            assert.are.equal(infos[1].canonname, v1.host)
            -- the talk's settings say ssl: false; true is refused, not ignored
            assert.has_error(function()
                log_sinks.configure_from_settings(view_with { redis = { enabled = true, ssl = true } }, logging)
            end, "system.logging.redis.ssl: TLS to Redis is not supported; set ssl: false or use a local Redis")
            reader:del("spec_logs_v1")
            reader:close()
        end)
    end)

    -- Records of what the sinks report, through a sink of the spec's own.
    local function capture_reports()
        local lines = {}
        local sink = logging.add_sink { name = "capture", emit = function(_, record)
            if record.sink then lines[#lines + 1] = record end
        end }
        return lines, function() logging.remove_sink(sink) end
    end

    local wait_for = testing.wait_until

    for _, case in ipairs({
        { what = "a password the server does not need", password = "nope", reason = "without any password configured" },
        { what = "a wrong password", username = "spec_logsink", password = "wrong", reason = "WRONGPASS" },
    }) do
        it("a Redis sink with " .. case.what .. " says so once, with the reason, and counts the dropped records", function()
            local host, port = os.getenv("TAMARCO_TEST_REDIS_HOST"), tonumber(os.getenv("TAMARCO_TEST_REDIS_PORT"))
            testing.run(function()
                local admin = assert(require("tamarco.resources.redis").client():connect_to { host = host, port = port })
                assert(admin:call("ACL", "SETUSER", "spec_logsink", "on", ">right", "~*", "+@all"))
                local reports, stop_capture = capture_reports()
                local before = dropped("redis")
                local sinks = log_sinks.configure_from_settings(view_with { redis = { enabled = true, host = host,
                    port = port, key = "spec_logs_auth", username = case.username, password = case.password } }, logging)
                local log = logging.get_logger("sinky")
                for i = 1, 10 do log:info("lost", { n = i }) end
                wait_for(function() return dropped("redis") - before >= 10 end)
                for i = 1, 10 do log:info("lost again", { n = i }) end
                wait_for(function() return dropped("redis") - before >= 20 end)
                local state = log_sinks.report().redis
                log_sinks.close(sinks, logging)
                stop_capture()
                admin:call("ACL", "DELUSER", "spec_logsink")
                assert.are.equal(0, admin:llen("spec_logs_auth"))
                admin:close()
                assert.is_true(dropped("redis") - before >= 20)
                assert.are.equal("failing", state.state)
                assert.matches(case.reason, state.reason, 1, true)
                -- said once (rate-limited), as a WARNING with the reason
                local said = 0
                for _, record in ipairs(reports) do
                    if record.message:find("log sink redis cannot deliver", 1, true) then
                        said = said + 1
                        assert.are.equal("WARNING", record.level)
                        assert.matches(case.reason, record.reason, 1, true)
                    end
                end
                assert.are.equal(1, said)
            end)
        end)
    end

    it("an HTTP sink to a closed port says so, shows it on /status (200 unless the setting says otherwise)", function()
        local port = free_port()   -- nothing listens there
        testing.run(function()
            local reports, stop_capture = capture_reports()
            for _, unhealthy in ipairs({ false, true }) do
                local sinks = log_sinks.configure_from_settings(view_with { unhealthy_on_sink_failure = unhealthy,
                    http = { enabled = true, url = "http://127.0.0.1:" .. port .. "/logs", max_time_seconds = 0.01 } },
                    logging)
                local svc = tamarco.service { name = "sinky" }
                local running = assert(testing.start_service(svc))
                logging.get_logger("sinky"):info("nobody hears this")
                wait_for(function() local r = log_sinks.report() return r and r.http.state == "failing" end)
                local host, report_port = svc.tamarco_http_report_server:address()
                local status, body = require("tamarco.resources.http_client").new():request {
                    method = "GET", url = ("http://%s:%d/status"):format(host, report_port) }
                running:stop()
                local before = dropped("http")
                log_sinks.close(sinks, logging, 200)
                local sink_state = cjson.decode(body).log_sinks.http
                assert.are.equal("failing", sink_state.state)
                assert.matches("Couldn't connect", sink_state.reason, 1, true)
                assert.is_true(sink_state.queued >= 1)
                assert.are.equal(unhealthy and 500 or 200, status)
                -- what was never delivered is counted at stop
                assert.is_true(dropped("http") - before >= 1)
            end
            stop_capture()
            local cannot, at_stop = 0, 0
            for _, record in ipairs(reports) do
                if record.message:find("log sink http cannot deliver", 1, true) then cannot = cannot + 1 end
                if record.message:find("not delivered at stop", 1, true) then at_stop = at_stop + 1 end
            end
            assert.are.equal(2, cannot)
            assert.are.equal(2, at_stop)
        end)
    end)

    it("an HTTP sink whose endpoint refuses the records (4xx) says so with the status and drops them", function()
        local http = require "tamarco.resources.http"
        local port = free_port()
        testing.run(function()
            local svc = tamarco.service { name = "refuser", resources = { api = http.server { port = port } },
                report_server = false }
            local posts = 0
            svc.api:post("/logs", function() posts = posts + 1 return 401 end)
            local running = assert(testing.start_service(svc))
            local reports, stop_capture = capture_reports()
            local before = dropped("http")
            local sinks = log_sinks.configure_from_settings(view_with { http = { enabled = true,
                url = "http://127.0.0.1:" .. port .. "/logs", max_records = 5, max_time_seconds = 0.01 } }, logging)
            for i = 1, 5 do logging.get_logger("sinky"):info("refused", { n = i }) end
            wait_for(function() return dropped("http") - before >= 5 end)
            local state = log_sinks.report().http
            log_sinks.close(sinks, logging, 200)
            stop_capture()
            running:stop()
            assert.is_true(posts >= 1)
            assert.is_true(dropped("http") - before >= 5)
            assert.are.equal("failing", state.state)
            assert.matches("answered HTTP 401", state.reason, 1, true)
            assert.matches("records dropped", reports[1].message, 1, true)
        end)
    end)

    it("never stalls the service when the sink is dead: overflow is dropped and counted", function()
        local port = free_port()   -- nothing listens there
        local ticks = 0
        testing.run(function()
            local before = dropped("http")
            local sinks = log_sinks.configure_from_settings(view_with { http = {
                enabled = true, url = "http://127.0.0.1:" .. port .. "/logs", max_records = 100,
                max_time_seconds = 0.01, queue_size = 1000 } }, logging)
            local ticker = tamarco.spawn(function() while true do tamarco.sleep(1) ticks = ticks + 1 end end)
            local log = logging.get_logger("sinky")
            for round = 1, 20 do
                for i = 1, 1000 do log:info("flood", { n = i }) end
                tamarco.sleep(2)   -- the loop keeps turning between bursts
            end
            assert.is_true(dropped("http") - before >= 19000 - 1000)
            require("tamarco.core.tasks").cancel(ticker)
            log_sinks.close(sinks, logging, 50)
        end)
        assert.is_true(ticks >= 20)
    end)
end)

describe("remote log sinks at stop", function()
    -- A real service process with an HTTP sink that batches for 15 s (the
    -- talk's value), stopped by SIGINT 2 s after it started: every record
    -- reaches the receiver, the stop messages included.
    it("flush everything whatever the batching interval", function()
        local uv = require "luv"
        local cli = require "spec.support.cli"
        local http = require "tamarco.resources.http"
        local receiver_port = free_port()
        local dir = os.tmpname()
        os.remove(dir)
        assert(uv.fs_mkdir(dir, tonumber("755", 8)))
        local service_path, settings_path, out_path = dir .. "/service.lua", dir .. "/settings.yml", dir .. "/out.log"
        local function write(path, text)
            local f = assert(io.open(path, "w"))
            f:write(text)
            f:close()
        end
        write(service_path, [[
local tamarco = require "tamarco"
local svc = tamarco.service { name = "flushy" }
function svc:start() for i = 1, 30 do self.logger:info("record " .. i) end end
return svc
]])
        write(settings_path, ([[
system:
  logging:
    profile: PRODUCTION
    http: { enabled: true, url: "http://127.0.0.1:%d/logs", max_time_seconds: 15, max_records: 1000 }
]]):format(receiver_port))
        local messages = {}
        local exit_code
        testing.run(function()
            local receiver = tamarco.service { name = "receiver", report_server = false,
                resources = { api = http.server { port = receiver_port } } }
            receiver.api:post("/logs", function(req)
                for _, record in ipairs(req:json()) do messages[#messages + 1] = record["@message"] end
                return 204
            end)
            local running = assert(testing.start_service(receiver))
            local out_fd = assert(uv.fs_open(out_path, "w", tonumber("644", 8)))
            local child = assert(uv.spawn(cli.host, {
                args = { "run", service_path, "--settings", settings_path },
                env = { "TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=0", "PATH=" .. os.getenv("PATH") },
                stdio = { nil, out_fd, out_fd },
            }, function(code) exit_code = code end))
            local waited = 0
            while not cli.read_all(out_path):find("service started", 1, true) and waited < 20000 do
                tamarco.sleep(50)
                waited = waited + 50
            end
            tamarco.sleep(2000)
            child:kill("sigint")
            waited = 0
            while exit_code == nil and waited < 20000 do tamarco.sleep(20) waited = waited + 20 end
            tamarco.sleep(100)   -- the last POST's handler has run
            running:stop()
            child:close()
            uv.fs_close(out_fd)
        end)
        local output = cli.read_all(out_path)
        for _, name in ipairs({ service_path, settings_path, out_path }) do os.remove(name) end
        uv.fs_rmdir(dir)
        assert.are.equal(0, exit_code, output)
        local seen = {}
        for _, message in ipairs(messages) do seen[message] = (seen[message] or 0) + 1 end
        for i = 1, 30 do assert.are.equal(1, seen["record " .. i], "record " .. i) end
        for _, message in ipairs({ "starting service", "service started", "received SIGINT",
                                   "stopping service", "service stopped" }) do
            assert.are.equal(1, seen[message], message .. " not delivered; got: " .. table.concat(messages, " | "))
        end
    end)
end)
