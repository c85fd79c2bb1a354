-- Remote log sinks against real receivers: a UDP listener, a Redis list and
-- an HTTP server, all on loopback.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local logging = require "tamarco.logging"
local log_sinks = require "tamarco.log_sinks"
local settings = require "tamarco.settings"
local metrics = require "tamarco.metrics"
local cjson = require "cjson"

local function view_with(logging_section)
    local store = assert(settings.load { dict = { system = { logging = logging_section } },
        yaml_file = false, environ = false })
    return store:view("sinky")
end

local free_port = require("spec.support.net").free_port

local function dropped(sink_name)
    return metrics.counter("logging_dropped_records_total", {
        help = "Log records dropped because a remote sink's queue was full",
        labels = { sink = sink_name } }):get()
end

before_each(function()
    logging.configure { service_name = "sinky", deploy_name = "spec", instance_id = "i-1",
        profile = "TESTING", stdout = false }
end)

describe("remote log sinks", function()
    it("sends logstash v1 records over UDP", function()
        local uv = require "luv"
        local received = {}
        local server = uv.new_udp()
        server:bind("127.0.0.1", 0)
        local port = server:getsockname().port
        server:recv_start(function(err, data) if data then received[#received + 1] = data end end)
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
        local uv = require "luv"
        local received = {}
        local server = uv.new_udp()
        server:bind("127.0.0.1", 0)
        local port = server:getsockname().port
        server:recv_start(function(err, data) if data then received[#received + 1] = data end end)
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
        assert.are.same({ "one" }, v0["@tags"])
        assert.are.equal("logstash", v0["@type"])
        assert.are.equal("WARNING", v0["@fields"].levelname)
        assert.are.equal(debug.getinfo(1, "S").source:sub(2), v0["@source_path"])
        assert.has_error(function()
            log_sinks.configure_from_settings(view_with { logstash = { enabled = true, version = 3 } }, logging)
        end, "system.logging.logstash.version: must be 0 or 1, not 3")
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
            local last = cjson.decode(lines[100])
            assert.are.equal("redis record", last.message)
            assert.are.equal(100, last.n)
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
                        if record.message == "http record" then total = total + 1 end
                    end
                end
            end
            log_sinks.close(sinks, logging)
            running:stop()
            assert.are.equal(25, total)
        end)
        for _, batch in ipairs(batches) do assert.is_true(#batch <= 10) end
        assert.are.equal("Basic " .. require("tamarco.c.codec").base64_encode("logger:s3cret"), auth)
        assert.are.equal("http record", batches[1][1].message)
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
            require("tamarco.tasks").cancel(ticker)
            log_sinks.close(sinks, logging, 50)
        end)
        assert.is_true(ticks >= 20)
    end)
end)
