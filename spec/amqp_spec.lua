-- The AMQP resource against a real rabbitmq-server (scripts/test-services.sh
-- starts one; its address comes from TAMARCO_TEST_AMQP_HOST/PORT).
-- Broker restarts are in spec/amqp_fault_spec.lua.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local amqp = require "tamarco.resources.amqp"
local codecs = require "tamarco.core.codecs"
local tasks = require "tamarco.core.tasks"
local base = require "tamarco.core.resource"
local cjson = require "cjson"

local STATUS = base.STATUS
local HOST = os.getenv("TAMARCO_TEST_AMQP_HOST")
local PORT = tonumber(os.getenv("TAMARCO_TEST_AMQP_PORT") or "")

-- every run uses its own names, so runs never see each other's queues
local PREFIX = ("spec%d%d"):format(os.time() % 100000, math.random(1000, 9999))

local function client(extra)
    local options = { host = HOST, port = PORT, queues_prefix = PREFIX, connection_timeout = 5 }
    for k, v in pairs(extra or {}) do options[k] = v end
    return amqp.client(options)
end

local eventually = testing.wait_until

local function run(fn) return testing.run(fn) end

describe("amqp resource", function()
    setup(function()
        assert(HOST and PORT, "TAMARCO_TEST_AMQP_HOST and TAMARCO_TEST_AMQP_PORT must be set "
            .. "(start a broker with: TAMARCO_SERVICES=rabbitmq scripts/test-services.sh start)")
        testing.timeout_ms = 30000
    end)

    describe("codecs", function()
        it("round-trips json, yaml and raw", function()
            local value = { name = "a: b", list = { 1, 2.5, "x" }, nested = { ok = true, no = false },
                text = "line1\nline2", yes = "yes", num = "12", empty = "" }
            for _, name in ipairs({ "json", "yaml" }) do
                local codec = codecs.get(name)
                local bytes = assert(codec.encode(value))
                local back, err = codec.decode(bytes)
                assert.is_nil(err)
                assert.are.same(value.name, back.name)
                assert.are.same({ 1, 2.5, "x" }, { back.list[1], back.list[2], back.list[3] })
                assert.are.same(true, back.nested.ok)
                assert.are.same(false, back.nested.no)
                assert.are.same("line1\nline2", back.text)
                assert.are.same("yes", back.yes)
                assert.are.same("12", back.num)
                assert.are.same("", back.empty)
            end
            assert.are.equal("\0bytes\255", codecs.raw.decode(codecs.raw.encode("\0bytes\255")))
            assert.is_nil((codecs.raw.encode({})))
            assert.is_nil((codecs.json.encode(function() end)))
            local v, err = codecs.json.decode("{not json")
            assert.is_nil(v)
            assert.is_string(err)
            v, err = codecs.yaml.decode("a: [1, 2")
            assert.is_nil(v)
            assert.matches("line", err)
            assert.has_error(function() codecs.get("xml") end)
        end)
    end)

    describe("push/pull", function()
        it("delivers persistent, confirmed messages to competing consumers", function()
            run(function()
                local a, b, producer = client(), client(), client()
                local got_a, got_b, seen = 0, 0, {}
                a:pull("jobs", function(msg, meta)
                    got_a = got_a + 1
                    seen[msg.n] = (seen[msg.n] or 0) + 1
                    assert(meta.properties.delivery_mode == 2, "persistent")
                    assert(meta.properties.content_type == "application/json")
                    tasks.sleep(2)
                end)
                b:pull("jobs", function(msg)
                    got_b = got_b + 1
                    seen[msg.n] = (seen[msg.n] or 0) + 1
                    tasks.sleep(2)
                end)
                a:start(); b:start(); producer:start()
                assert.are.equal(STATUS.STARTED, a.status_code)
                for i = 1, 200 do assert.is_true(producer:push("jobs", { n = i })) end
                assert.truthy(eventually(function() return got_a + got_b >= 200 end))
                tasks.sleep(100)
                assert.are.equal(200, got_a + got_b)   -- each exactly once
                for i = 1, 200 do assert.are.equal(1, seen[i]) end
                assert.is_true(got_a > 20 and got_b > 20, ("both compete: %d/%d"):format(got_a, got_b))
                local info = assert(producer:queue_info("push_pull", "jobs"))
                assert.are.equal(PREFIX .. ".push_pull.jobs", info.queue)
                assert.are.equal(0, info.messages)
                assert.are.equal(2, info.consumers)
                a:stop(); b:stop(); producer:stop()
            end)
        end)

        it("uses the codec of the call and of the consumer", function()
            run(function()
                local cl = client()
                local got = {}
                cl:pull("yaml_jobs", function(msg, meta) got[#got + 1] = { msg, meta.properties.content_type } end,
                    { codec = "yaml" })
                cl:pull("raw_jobs", function(msg) got[#got + 1] = { msg } end, { codec = "raw" })
                cl:start()
                assert.is_true(cl:push("yaml_jobs", { a = { 1, 2 }, b = "c" }, { codec = "yaml" }))
                assert.is_true(cl:push("raw_jobs", "plain \0 bytes", { codec = "raw" }))
                assert.truthy(eventually(function() return #got == 2 end))
                local yaml_msg = got[1][1].a and got[1] or got[2]
                local raw_msg = got[1][1].a and got[2] or got[1]
                assert.are.same({ 1, 2 }, { yaml_msg[1].a[1], yaml_msg[1].a[2] })
                assert.are.equal("c", yaml_msg[1].b)
                assert.are.equal("application/yaml", yaml_msg[2])
                assert.are.equal("plain \0 bytes", raw_msg[1])
                local ok, err = cl:push("raw_jobs", { not_a = "string" }, { codec = "raw" })
                assert.is_nil(ok)
                assert.matches("cannot encode", err)
                cl:stop()
            end)
        end)

        it("rejects a malformed payload to the dead-letter queue and goes on", function()
            run(function()
                local cl, raw = client(), client()
                local good, dead = {}, {}
                cl:pull("strict", function(msg) good[#good + 1] = msg.n end, { dead_letter = true })
                cl:pull("strict.dead_letter", function(msg) dead[#dead + 1] = msg end, { codec = "raw" })
                cl:start(); raw:start()
                assert.is_true(cl:push("strict", { n = 1 }))
                -- bytes that are not JSON, on the JSON queue
                assert.is_true(raw:push("strict", "{this is not json", { codec = "raw" }))
                assert.is_true(cl:push("strict", { n = 2 }))
                assert.truthy(eventually(function() return #good == 2 and #dead == 1 end))
                assert.are.same({ 1, 2 }, good)
                assert.are.equal("{this is not json", dead[1])
                assert.are.equal(1, cl.counters.rejected)
                tasks.sleep(100)
                assert.are.equal(2, #good)   -- not redelivered
                cl:stop(); raw:stop()
            end)
        end)

        it("requeues a message whose handler raises, and it succeeds once fixed", function()
            run(function()
                local cl = client()
                local calls, done, broken = 0, nil, true
                local redelivered
                cl:pull("flaky", function(msg, meta)
                    calls = calls + 1
                    if broken then
                        broken = false
                        error("handler bug")
                    end
                    redelivered = meta.redelivered
                    done = msg.n
                end)
                cl:start()
                assert.is_true(cl:push("flaky", { n = 7 }))
                assert.truthy(eventually(function() return done == 7 end))
                assert.are.equal(2, calls)
                assert.is_true(redelivered)
                assert.are.equal(1, cl.counters.handler_errors)
                cl:stop()
            end)
        end)

        it("bounds the redeliveries of a poison message, with back-off, one log line and metrics", function()
            run(function()
                local logging = require "tamarco.core.logging"
                local metrics = require "tamarco.core.metrics"
                local records = {}
                local sink = { name = "amqp-poison-spec", emit = function(_, r) records[#records + 1] = r end }
                logging.add_sink(sink)
                local cl = client { max_redeliveries = 3, redelivery_backoff_ms = 20, repeated_error_log_ms = 60000 }
                local calls, failures_seen, dead = 0, {}, {}
                cl:pull("poison_bounded", function(_, meta)
                    calls = calls + 1
                    failures_seen[#failures_seen + 1] = meta.failures
                    error("always fails")
                end, { dead_letter = true })
                cl:pull("poison_bounded.dead_letter", function(msg) dead[#dead + 1] = msg end)
                cl:start()
                assert.has_error(function() cl:pull("x", function() end, { max_redeliveries = "many" }) end,
                    "amqp:pull: max_redeliveries must be a number >= 0")
                assert.is_true(cl:push("poison_bounded", { n = 1 }))
                assert.truthy(eventually(function() return #dead == 1 end, 10000))
                tasks.sleep(300)   -- no further delivery
                assert.are.equal(4, calls)                 -- the first try and 3 redeliveries
                assert.are.same({ 0, 1, 2, 3 }, failures_seen)
                assert.are.equal(1, dead[1].n)
                local tracebacks, gave_up = 0, 0
                for _, r in ipairs(records) do
                    if r.message:find("handler for '", 1, true) and r.message:find("poison_bounded", 1, true) then
                        tracebacks = tracebacks + 1
                    end
                    if r.message:find("failed 4 times", 1, true) then
                        gave_up = gave_up + 1
                        assert.matches("dead%-lettered", r.message)
                        assert.matches("always fails", r.message)
                    end
                end
                assert.are.equal(1, tracebacks)   -- the identical ones are counted, not logged
                assert.are.equal(1, gave_up)
                local queue = cl:queue_name("push_pull", "poison_bounded")
                assert.are.equal(4, metrics.counter("amqp_handler_errors_total", { labels = { queue = queue } }):get())
                assert.are.equal(2, metrics.counter("amqp_handler_error_logs_suppressed_total",
                    { labels = { queue = queue } }):get())
                assert.are.equal(1, metrics.counter("amqp_messages_given_up_total",
                    { labels = { queue = queue } }):get())
                local info = assert(cl:queue_info("push_pull", "poison_bounded"))
                assert.are.equal(0, info.messages)
                logging.remove_sink(sink)
                cl:stop()
            end)
        end)

        it("declares quorum queues when asked, and counts their redeliveries with x-delivery-count", function()
            run(function()
                local cl = client { queue_type = "quorum", max_redeliveries = 2, redelivery_backoff_ms = 10 }
                local failures_seen, dead = {}, {}
                cl:pull("quorum_jobs", function(_, meta)
                    failures_seen[#failures_seen + 1] = meta.failures
                    error("always fails")
                end, { dead_letter = true })
                cl:pull("quorum_jobs.dead_letter", function(msg) dead[#dead + 1] = msg end)
                cl:start()
                assert.are.equal(STATUS.STARTED, cl:status().status)
                local queue = cl:queue_name("push_pull", "quorum_jobs")
                -- the broker has it as a quorum queue: a classic declaration is refused
                local classic = amqp.queue_arguments(queue, { dead_letter = true }, false)
                local ok, err = cl.conn:declare_queue(queue, { durable = true, arguments = classic })
                assert.is_nil(ok)
                assert.matches("x%-queue%-type", err)
                assert.truthy(cl.conn:declare_queue(queue, { durable = true,
                    arguments = amqp.queue_arguments(queue, { dead_letter = true }, true) }))
                assert.is_true(cl:push("quorum_jobs", { n = 1 }))
                assert.truthy(eventually(function() return #dead == 1 end, 10000))
                assert.are.same({ 0, 1, 2 }, failures_seen)
                local bad = client { queue_type = "fast" }
                assert.has_error(function() bad:start() end)
                cl:stop()
            end)
        end)

        it("dead-letters a failing message when configured", function()
            run(function()
                local cl = client()
                local calls, dead = 0, {}
                cl:pull("poison", function() calls = calls + 1; error("always fails") end,
                    { on_error = "dead_letter", dead_letter = true })
                cl:pull("poison.dead_letter", function(msg, meta) dead[#dead + 1] = { msg, meta } end)
                cl:start()
                assert.is_true(cl:push("poison", { n = 1 }))
                assert.truthy(eventually(function() return #dead == 1 end))
                tasks.sleep(100)
                assert.are.equal(1, calls)
                assert.are.equal(1, dead[1][1].n)
                cl:stop()
            end)
        end)

        it("honours prefetch: at most that many handlers per consumer", function()
            run(function()
                local cl = client()
                local running, max_running, done = 0, 0, 0
                cl:pull("slow", function()
                    running = running + 1
                    if running > max_running then max_running = running end
                    tasks.sleep(30)
                    running = running - 1
                    done = done + 1
                end, { prefetch = 3 })
                cl:start()
                for i = 1, 30 do assert.is_true(cl:push("slow", { n = i })) end
                assert.truthy(eventually(function() return done == 30 end))
                assert.are.equal(3, max_running)
                cl:stop()
            end)
        end)
    end)

    describe("publish/subscribe", function()
        it("gives every subscriber every message", function()
            run(function()
                local a, b, pub = client(), client(), client()
                local got_a, got_b = {}, {}
                a:subscribe("events", function(msg) got_a[#got_a + 1] = msg.kind end)
                b:subscribe("events", function(msg) got_b[#got_b + 1] = msg.kind end)
                a:start(); b:start(); pub:start()
                for i = 1, 10 do assert.is_true(pub:publish("events", { kind = "k" .. i })) end
                assert.is_true(pub:publish("events", { kind = "confirmed" }, { confirm = true }))
                assert.truthy(eventually(function() return #got_a == 11 and #got_b == 11 end))
                assert.are.equal("k1", got_a[1])
                assert.are.equal("confirmed", got_b[11])
                a:stop(); b:stop(); pub:stop()
            end)
        end)
    end)

    describe("request/response", function()
        it("answers requests, reports remote errors and times out", function()
            run(function()
                local server, caller = client(), client()
                server:respond("prices", function(msg, meta)
                    assert(meta.properties.correlation_id)
                    if msg.item == "boom" then error("no price for boom") end
                    if msg.item == "slow" then tasks.sleep(1000) end
                    return { price = 3, item = msg.item }
                end)
                server:start(); caller:start()
                local reply, err = caller:request("prices", { item = "a" }, { timeout = 5000 })
                assert.is_nil(err)
                assert.are.same({ price = 3, item = "a" }, reply)
                -- concurrent requests are matched by correlation id
                local replies = {}
                local group = tasks.group()
                for i = 1, 20 do
                    group:spawn("req" .. i, function()
                        replies[i] = caller:request("prices", { item = "i" .. i })
                    end)
                end
                assert.is_true(group:wait(10000))
                for i = 1, 20 do assert.are.equal("i" .. i, replies[i].item) end
                reply, err = caller:request("prices", { item = "boom" })
                assert.is_nil(reply)
                assert.matches("remote error: .*no price for boom", err)
                reply, err = caller:request("prices", { item = "slow" }, { timeout = 200 })
                assert.is_nil(reply)
                assert.are.equal("timeout", err)
                reply, err = caller:request("nobody_answers", { item = "x" }, { timeout = 300 })
                assert.is_nil(reply)
                assert.are.equal("timeout", err)
                assert.is_true(caller.counters.timeouts >= 2)
                server:stop(); caller:stop()
            end)
        end)
    end)

    describe("declarations", function()
        it("declares every pattern with exactly tamarco-amqp's arguments", function()
            run(function()
                local cl = client()
                cl:pull("decl_jobs", function() end)
                cl:subscribe("decl_events", function() end)
                cl:respond("decl_prices", function() return 1 end)
                cl:start()
                assert.are.equal(STATUS.STARTED, cl:status().status)
                -- a second declaration with tamarco-amqp's arguments is accepted
                -- only when they are equivalent (406 otherwise)
                local conn = cl.conn
                assert.truthy(conn:declare_exchange(cl:queue_name("publish_subscribe", "decl_events"), "fanout",
                    { durable = false, auto_delete = false }))
                local ok, err = conn:declare_exchange(cl:queue_name("publish_subscribe", "decl_events"), "fanout",
                    { durable = true })
                assert.is_nil(ok)
                assert.matches("406", err)
                assert.truthy(conn:declare_queue(cl:queue_name("push_pull", "decl_jobs"),
                    { durable = true, exclusive = false, auto_delete = false }))
                assert.truthy(conn:declare_queue(cl:queue_name("request_response", "decl_prices"),
                    { durable = false, exclusive = false, auto_delete = false }))
                cl:stop()
            end)
        end)

        it("is FAILED with the broker's reason while a declaration is refused, and retries", function()
            run(function()
                local logging = require "tamarco.core.logging"
                local records = {}
                local sink = { name = "amqp-decl-spec", emit = function(_, r) records[#records + 1] = r end }
                logging.add_sink(sink)
                local admin = client()
                admin:start()
                local queue = admin:queue_name("push_pull", "decl_conflict")
                admin:delete_queue("push_pull", "decl_conflict")
                -- someone declared it not durable: a consumer cannot use it as its own
                assert.truthy(admin.conn:declare_queue(queue, { durable = false }))
                local got = {}
                local cl = client { reconnect_backoff_ms = 50, reconnect_backoff_max_ms = 200 }
                cl:pull("decl_conflict", function(msg) got[#got + 1] = msg.n end)
                cl:start()
                assert.truthy(eventually(function() return cl:status().status == STATUS.FAILED end))
                local status = cl:status()
                assert.matches("PRECONDITION_FAILED", status.error)
                assert.matches(queue, status.error, 1, true)
                local logged
                for _, r in ipairs(records) do
                    if r.level == "ERROR" and r.message:find(queue, 1, true)
                        and r.message:find("PRECONDITION_FAILED", 1, true) then
                        logged = r
                    end
                end
                assert.truthy(logged, "no ERROR line naming the queue and the reason")
                -- the conflict goes away: the retry declares it and consumes
                admin:delete_queue("push_pull", "decl_conflict")
                assert.truthy(eventually(function() return cl:status().status == STATUS.STARTED end))
                assert.is_true(admin:push("decl_conflict", { n = 7 }))
                assert.truthy(eventually(function() return got[1] == 7 end))
                logging.remove_sink(sink)
                cl:stop(); admin:stop()
            end)
        end)
    end)

    describe("as a service resource", function()
        it("sets up consumers declared in the service file, from settings", function()
            run(function()
                local got = {}
                local svc = tamarco.service { name = "worker", resources = { amqp = amqp.client() } }
                svc.amqp:pull("svc_jobs", function(msg) got[#got + 1] = msg.n end)
                local running = assert(testing.start_service(svc, { settings = { system = { resources = {
                    amqp = { host = HOST, port = PORT, queues_prefix = PREFIX, prefetch = 5 },
                } } } }))
                assert.are.equal(STATUS.STARTED, svc.amqp:status().status)
                assert.is_true(svc.amqp:push("svc_jobs", { n = 1 }))
                assert.truthy(eventually(function() return #got == 1 end))
                local status = svc.amqp:status()
                assert.are.equal("connected", status.connection.state)
                assert.are.equal(HOST, status.connection.host)
                assert.is_nil(status.connection.password)
                assert.is_nil(status.password)
                running:stop()
                assert.are.equal(STATUS.STOPPED, svc.amqp.status_code)
            end)
        end)

        it("reports FAILED/CONNECTING with the reason, never the password", function()
            run(function()
                local cl = client { password = "s3cret-pw", connection_timeout = 1,
                    reconnect_backoff_ms = 50, reconnect_backoff_max_ms = 100 }
                local seen = {}
                local set_status = cl.set_status
                cl.set_status = function(self, code)
                    seen[code] = true
                    return set_status(self, code)
                end
                cl:start()   -- does not raise: keeps retrying in the background
                tasks.sleep(300)
                assert.is_true(seen[STATUS.FAILED] or false)
                assert.is_true(seen[STATUS.CONNECTING] or false)
                assert.is_nil(seen[STATUS.STARTED])
                local status = cl:status()
                local text = cjson.encode(status)
                assert.matches("ACCESS_REFUSED", status.connection.last_error)
                assert.is_nil(text:find("s3cret", 1, true))
                local ok, err = cl:push("jobs", { n = 1 })
                assert.is_nil(ok)
                assert.matches("not connected to the AMQP broker", err)
                assert.is_nil(err:find("s3cret", 1, true))
                cl:stop()
            end)
        end)

        it("reports a refused login as such at once: FAILED, user and vhost named", function()
            run(function()
                local logging = require "tamarco.core.logging"
                local records = {}
                local sink = { name = "amqp-login-spec", emit = function(_, r) records[#records + 1] = r end }
                logging.add_sink(sink)
                -- a connection timeout longer than the spec's: start must not wait for it
                testing.timeout_ms = 20000
                local cl = client { user = "nobody-here", password = "wrong", connection_timeout = 60,
                    reconnect_backoff_ms = 50, reconnect_backoff_max_ms = 100 }
                cl:start()
                assert.are.equal(STATUS.FAILED, cl:status().status)
                local line
                for _, r in ipairs(records) do
                    if r.level == "ERROR" and r.message:find("refused user 'nobody-here' on vhost '/'", 1, true) then
                        line = r
                    end
                end
                assert.truthy(line, "no ERROR line naming the user and the vhost")
                assert.matches("403 ACCESS_REFUSED", line.message)
                tasks.sleep(400)   -- retried meanwhile, but said once
                local count = 0
                for _, r in ipairs(records) do
                    if r.message:find("refused user 'nobody-here'", 1, true) then count = count + 1 end
                end
                assert.are.equal(1, count)
                logging.remove_sink(sink)
                cl:stop()
                testing.timeout_ms = 30000
            end)
        end)

        it("says 'Connection refused' when nothing listens", function()
            run(function()
                local cl = amqp.client { host = "127.0.0.1", port = 1, connection_timeout = 1,
                    reconnect_backoff_ms = 50, reconnect_backoff_max_ms = 100 }
                cl:start()
                assert.matches("cannot connect to 127.0.0.1:1: Connection refused", cl:status().connection.last_error)
                cl:stop()
            end)
        end)

        it("takes a list of nodes and connects to one that answers", function()
            run(function()
                local cl = client { hosts = { "127.0.0.1:1", HOST .. ":" .. PORT, { host = "127.0.0.1", port = 1 } },
                    reconnect_backoff_ms = 20, reconnect_backoff_max_ms = 50 }
                local got = {}
                cl:pull("nodes_jobs", function(msg) got[#got + 1] = msg.n end)
                cl:start()
                assert.truthy(eventually(function() return cl:status().status == STATUS.STARTED end))
                assert.are.equal(PORT, cl:status().connection.port)
                assert.is_true(cl:push("nodes_jobs", { n = 1 }))
                assert.truthy(eventually(function() return got[1] == 1 end))
                cl:stop()
                local bad = client { hosts = { "127.0.0.1:notaport" } }
                local ok, err = pcall(bad.start, bad)
                assert.is_false(ok)
                assert.matches("hosts", tostring(err))
            end)
        end)

        it("fails fast when nothing listens, and waits publish_wait_ms when asked", function()
            run(function()
                local cl = amqp.client { host = "127.0.0.1", port = 1, connection_timeout = 1,
                    reconnect_backoff_ms = 50, reconnect_backoff_max_ms = 100 }
                cl:start()
                local timer = require "tamarco.c.timer"
                local turns, ok, err = testing.loop_turns(cl.push, cl, "jobs", { n = 1 })
                assert.is_nil(ok)
                assert.matches("not connected to the AMQP broker 127.0.0.1:1", err)
                assert.are.equal(0, turns, "the push waited for the loop")   -- failed at once
                local t0 = timer.hrtime()
                ok, err = cl:push("jobs", { n = 1 }, { wait_ms = 300 })
                assert.is_nil(ok)
                local waited = (timer.hrtime() - t0) / 1e6
                assert.is_true(waited >= 290, "waited " .. waited)
                cl:stop()
            end)
        end)
    end)

    teardown(function()
        -- remove this run's durable queues and exchanges
        pcall(testing.run, function()
            local cl = client()
            cl:start()
            for _, name in ipairs({ "jobs", "yaml_jobs", "raw_jobs", "strict", "strict.dead_letter", "flaky",
                "poison", "poison.dead_letter", "slow", "svc_jobs", "decl_jobs", "decl_conflict", "poison_bounded",
                "poison_bounded.dead_letter", "nodes_jobs", "quorum_jobs", "quorum_jobs.dead_letter" }) do
                cl:delete_queue("push_pull", name)
            end
            for _, name in ipairs({ "prices", "nobody_answers", "decl_prices" }) do
                cl:delete_queue("request_response", name)
            end
            cl:stop()
        end)
    end)
end)
