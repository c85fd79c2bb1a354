-- The Redis resource (tamarco.resources.redis on bindings/redis.c) against
-- the real redis-server that scripts/test-services.sh starts:
--   eval "$(TAMARCO_SERVICES=redis scripts/test-services.sh start)"
-- exports TAMARCO_TEST_REDIS_HOST/PORT and TAMARCO_SERVICES_DIR (the fault
-- tests restart that server through the same script).
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local scheduler = require "tamarco.c.scheduler"
local process = require "tamarco.c.process"
local base = require "tamarco.core.resource"
local redis = require "tamarco.resources.redis"
local c = require "tamarco.c.redis"
local cjson = require "cjson"
local cli = require "spec.support.cli"

local STATUS = base.STATUS

local REDIS_HOST = os.getenv("TAMARCO_TEST_REDIS_HOST")
local REDIS_PORT = tonumber(os.getenv("TAMARCO_TEST_REDIS_PORT") or "")
local SERVICES_DIR = os.getenv("TAMARCO_SERVICES_DIR")
if not REDIS_HOST or not REDIS_PORT or not SERVICES_DIR then
    error("redis_spec needs a real redis-server: run it through scripts/test.sh, or first\n"
        .. "  eval \"$(TAMARCO_SERVICES=redis scripts/test-services.sh start)\"\n"
        .. "(TAMARCO_TEST_REDIS_HOST, TAMARCO_TEST_REDIS_PORT and TAMARCO_SERVICES_DIR are unset)", 0)
end

local ROOT = (debug.getinfo(1, "S").source:match("^@(.*)/spec/[^/]*$")) or "."
local SERVICES_SCRIPT = ROOT .. "/scripts/test-services.sh"

-- A loopback port where nothing listens. Picked here, on the main state:
-- luv handles made inside a task keep that coroutine as their state.
local CLOSED_PORT
do
    local uv = require "luv"
    local tcp = uv.new_tcp()
    assert(tcp:bind("127.0.0.1", 0))
    CLOSED_PORT = tcp:getsockname().port
    tcp:close()
end
local function closed_port() return CLOSED_PORT end

local function connect(options)
    local o = { host = REDIS_HOST, port = REDIS_PORT }
    for k, v in pairs(options or {}) do o[k] = v end
    return assert(redis.client():connect_to(o))
end

-- Runs `test-services.sh <action> DIR` in the background; returns a
-- function that yields until it has finished and returns its exit code.
local function services_async(action)
    local marker = os.tmpname()
    os.remove(marker)
    os.execute(("(%s %s %s >%s.log 2>&1; echo $? >%s.tmp; mv %s.tmp %s) &"):format(
        SERVICES_SCRIPT, action, SERVICES_DIR, marker, marker, marker, marker))
    return function()
        for _ = 1, 600 do
            local f = io.open(marker)
            if f then
                local code = tonumber(f:read("*a"))
                f:close()
                os.remove(marker)
                os.remove(marker .. ".log")
                return code
            end
            tamarco.sleep(50)
        end
        error("test-services.sh " .. action .. " did not finish")
    end
end

local wait_until = testing.wait_until

-- Starts fn(i) in n tasks and yields until all have ended.
local function run_tasks(n, fn)
    local left, me = n, scheduler.current()
    for i = 1, n do
        local co = tamarco.spawn(fn, i)
        scheduler.on_exit(co, function()
            left = left - 1
            if left == 0 then scheduler.wake(me) end
        end)
    end
    scheduler.suspend()
end

describe("redis binding (tamarco.c.redis)", function()
    it("maps every reply type", function()
        testing.run(function()
            local conn = assert(c.connect(REDIS_HOST, REDIS_PORT))
            conn:command("DEL", "spec:r:int", "spec:r:list", "spec:r:str")
            -- status
            assert.are.equal("OK", conn:command("SET", "spec:r:str", "v"))
            assert.are.equal("PONG", conn:command("PING"))
            -- integer
            assert.are.equal(1, conn:command("INCR", "spec:r:int"))
            assert.are.equal(42, conn:command({ "INCRBY", "spec:r:int", 41 }))
            -- bulk and nil (nil is one value, an error two)
            assert.are.equal("v", conn:command("GET", "spec:r:str"))
            local n = select("#", conn:command("GET", "spec:r:missing"))
            assert.are.equal(1, n)
            assert.is_nil((conn:command("GET", "spec:r:missing")))
            local r, err = conn:command("INCR", "spec:r:str")
            assert.is_nil(r)
            assert.matches("^ERR value is not an integer", err)
            local r2, err2 = conn:command("NOSUCHCOMMAND", "x")
            assert.is_nil(r2)
            assert.matches("^ERR unknown command", err2)
            r, err = conn:command("LPUSH", "spec:r:str", "x")
            assert.is_nil(r)
            assert.matches("^WRONGTYPE", err)
            -- arrays with nil elements
            local arr = conn:command("MGET", "spec:r:str", "spec:r:missing", "spec:r:int")
            assert.are.same({ "v", c.null, "42" }, arr)
            assert.are.equal(cjson.null, arr[2])
            assert.are.same({}, conn:command("LRANGE", "spec:r:list", 0, -1))
            -- nested arrays and error elements (EVAL)
            local nested = conn:command("EVAL", [[
                return {1, "two", false, {3, {"four", false}}, redis.error_reply("BOOM inner")}
            ]], 0)
            assert.are.same({ 1, "two", c.null, { 3, { "four", c.null } }, { err = "BOOM inner" } }, nested)
            -- a script error at top level is an error reply
            r, err = conn:command("EVAL", "return redis.error_reply('MYERR bad')", 0)
            assert.is_nil(r)
            assert.are.equal("MYERR bad", err)
            conn:close()
            local gone, why, kind = conn:command("PING")
            assert.is_nil(gone)
            assert.are.equal("connection closed", why)
            assert.are.equal("connection", kind)
        end)
    end)

    it("is binary safe in keys and values", function()
        testing.run(function()
            local conn = assert(c.connect(REDIS_HOST, REDIS_PORT))
            local key = "spec:bin:\0\1\255"
            local value = "a\0b\r\n\0" .. string.rep("\255\0", 1000)
            assert.are.equal("OK", conn:command("SET", key, value))
            local got = conn:command("GET", key)
            assert.are.equal(#value, #got)
            assert.are.equal(value, got)
            assert.are.equal(1, conn:command("DEL", key))
            conn:close()
        end)
    end)

    it("sends a command the kernel takes in parts, with other tasks' commands around it in order", function()
        testing.run(function()
            local conn = assert(c.connect(REDIS_HOST, REDIS_PORT))
            -- 16 MiB: far more than a loopback socket buffer, so the write of
            -- the turn stops short and the rest waits for "writable"
            local big = string.rep("0123456789abcdef", 1024 * 1024)
            local results, left, me = {}, 41, scheduler.current()
            local function run(i, ...)
                local args = { ... }
                tamarco.spawn(function()
                    results[i] = { conn:command(unpack(args)) }
                    left = left - 1
                    if left == 0 then scheduler.wake(me) end
                end)
            end
            for i = 1, 20 do run(i, "SET", "spec:part:" .. i, i) end
            run(21, "SET", "spec:part:big", big)
            for i = 22, 41 do run(i, "INCRBY", "spec:part:" .. (i - 21), 100) end
            scheduler.suspend()
            for i = 1, 21 do assert.are.same({ "OK" }, results[i]) end
            for i = 22, 41 do assert.are.same({ i - 21 + 100 }, results[i]) end
            local got = conn:command("GET", "spec:part:big")
            assert.are.equal(#big, #got)
            assert.is_true(got == big)
            local keys = { "DEL", "spec:part:big" }
            for i = 1, 20 do keys[#keys + 1] = "spec:part:" .. i end
            assert.are.equal(21, conn:command(unpack(keys)))
            conn:close()
        end)
    end)

    it("gives an HTTP handler that called Redis its coroutine back to the reuse pool", function()
        testing.run(function()
            local http = require "tamarco.resources.http"
            local svc = tamarco.service { name = "redis-reuse", report_server = false,
                resources = { api = http.server(), cache = redis.client() } }
            svc.api:get("/get", function()
                return 200, svc.cache:get("spec:reuse:missing") or "none"
            end)
            local running = assert(testing.start_service(svc, { settings = { system = { resources = {
                api = { host = "127.0.0.1", port = 0 },
                cache = { host = REDIS_HOST, port = REDIS_PORT } } } } }))
            local client = require("tamarco.resources.http_client").new()
            local url = "http://127.0.0.1:" .. svc.api.port .. "/get"
            local before = scheduler.stats().idle_tasks
            for _ = 1, 5 do assert.are.equal(200, (client:get(url))) end
            -- a handler whose coroutine was seen by Lua code (the resource's
            -- cancellation check asking for the running task) never returns it
            local after = scheduler.stats().idle_tasks
            assert.is_true(after >= 1 and after >= before, ("idle tasks %d -> %d"):format(before, after))
            running:stop("done")
        end)
    end)

    it("reports a refused connection and a host that cannot be resolved", function()
        testing.run(function()
            local conn, err = c.connect("127.0.0.1", closed_port())
            assert.is_nil(conn)
            assert.matches("[Cc]onnection refused", err)
            conn, err = c.connect("no-such-host.invalid", REDIS_PORT)
            assert.is_nil(conn)
            assert.matches("cannot resolve", err)
            -- a name that resolves
            conn = assert(c.connect("localhost", REDIS_PORT))
            assert.are.equal("PONG", conn:command("PING"))
            conn:close()
        end)
    end)

    it("does not resume a cancelled task with a late reply", function()
        testing.run(function()
            local conn = assert(c.connect(REDIS_HOST, REDIS_PORT))
            local got
            local waiter = tamarco.spawn(function()
                got = { conn:command("BLPOP", "spec:cancel:list", 1) }
                got.after = true
            end)
            tamarco.sleep(20)
            assert.is_true(scheduler.interrupt(waiter, nil, "cancelled"))
            tamarco.sleep(5)
            assert.are.same({ nil, "cancelled" }, { got[1], got[2] })
            -- the late reply (BLPOP timing out after 1 s) finds a stale id
            assert.are.equal(1, conn:pending())
            tamarco.sleep(1200)
            assert.are.equal(0, conn:pending())
            assert.are.equal("PONG", conn:command("PING"))
            conn:close()
        end)
    end)

    it("survives a cancelled connect, collected connections and close from a reply", function()
        testing.run(function()
            -- cancelled while connecting (by IP and by name)
            for _, host in ipairs({ REDIS_HOST, "localhost" }) do
                local result
                local co = tamarco.spawn(function() result = { c.connect(host, REDIS_PORT) } end)
                -- runs right after it, in the same loop turn
                tamarco.spawn(function() scheduler.interrupt(co, nil, "cancelled") end)
                tamarco.sleep(20)
                assert.are.same({ nil, "cancelled" }, result)
            end
            -- connections dropped without close, one of them subscribed with
            -- handlers, one with commands in flight in another task
            do
                local a = assert(c.connect(REDIS_HOST, REDIS_PORT))
                a:on_message(function() end)
                assert(a:send_pubsub("SUBSCRIBE", "spec:gc"))
                local b = assert(c.connect(REDIS_HOST, REDIS_PORT))
                assert.are.equal("PONG", b:command("PING"))
            end
            collectgarbage()
            collectgarbage()
            tamarco.sleep(10)
            -- a task woken by a reply closes the connection while other
            -- replies of the same read are still to be delivered
            local conn = assert(c.connect(REDIS_HOST, REDIS_PORT))
            local results = {}
            run_tasks(20, function(i)
                local r, err = conn:command("INCR", "spec:close:n")
                results[i] = r or err
                if i == 5 then conn:close() end
            end)
            local closed = 0
            for i = 1, 20 do
                if results[i] == "connection closed" then closed = closed + 1 end
            end
            assert.is_true(closed > 0 and closed < 20)
            conn = assert(c.connect(REDIS_HOST, REDIS_PORT))
            conn:command("DEL", "spec:close:n")
            conn:close()
        end)
        collectgarbage()
    end)

    it("fails commands pending at close with 'connection closed'", function()
        testing.run(function()
            local conn = assert(c.connect(REDIS_HOST, REDIS_PORT))
            local results = {}
            run_tasks(2, function(i)
                if i == 1 then
                    results[1] = { conn:command("BLPOP", "spec:close:list", 5) }
                else
                    tamarco.sleep(20)
                    conn:close()
                end
            end)
            assert.are.same({ nil, "connection closed", "connection" }, results[1])
        end)
    end)

    -- busted insulates spec files: package.loaded is restored after each
    -- file, so the next file loads tamarco.c.redis again and the first
    -- module table (with its __gc_owner) becomes garbage. Collecting it
    -- once marked the main state as closing: every later connect and reply
    -- was silently dropped and tasks hung (log_sinks_spec, then this file).
    it("keeps connecting after the module is loaded again and the old copy collected", function()
        testing.run(function()
            local tasks = require "tamarco.core.tasks"
            -- a client owned by a task that is cancelled, then closed (what
            -- the Redis log sink does), with a fresh copy of the binding
            local saved = package.loaded["tamarco.c.redis"]
            package.loaded["tamarco.c.redis"] = nil
            local fresh = require "tamarco.c.redis"
            package.loaded["tamarco.c.redis"] = saved
            assert.are_not.equal(saved, fresh)
            local owned
            local sender = tamarco.spawn(function()
                owned = assert(fresh.connect(REDIS_HOST, REDIS_PORT))
                assert.are.equal("PONG", owned:command("PING"))
                tamarco.sleep(60000)
            end)
            assert.is_true(wait_until(function() return owned ~= nil end, 2000))
            tasks.cancel(sender)
            tamarco.sleep(10)
            owned:close()
            owned, sender, fresh = nil, nil, nil
            -- connections dropped without close, then a full collection,
            -- which also collects the second module table
            do
                local a = assert(c.connect(REDIS_HOST, REDIS_PORT))
                assert.are.equal("PONG", a:command("PING"))
            end
            collectgarbage()
            collectgarbage()
            tamarco.sleep(10)
            -- connects, replies and close failures still reach their tasks
            local conn = assert(c.connect(REDIS_HOST, REDIS_PORT, { connect_timeout_ms = 2000 }))
            assert.are.equal("PONG", conn:command("PING"))
            local result
            run_tasks(2, function(i)
                if i == 1 then
                    result = { conn:command("BLPOP", "spec:reload:list", 5) }
                else
                    tamarco.sleep(20)
                    conn:close()
                end
            end)
            assert.are.same({ nil, "connection closed", "connection" }, result)
            local client = connect()
            assert.are.equal("PONG", client:ping())
        end)
    end)
end)

describe("redis resource", function()
    it("reads durations in milliseconds by their _ms names, the old names with a deprecation warning", function()
        local redis = require "tamarco.resources.redis"
        local warnings = {}
        local old = redis.client { connect_timeout = 1234, reconnect_max = 777 }
        old.logger = { warning = function(_, message) warnings[#warnings + 1] = message end }
        assert.are.equal(1234, old:setting("connect_timeout_ms"))
        assert.are.equal(1234, old:setting("connect_timeout_ms"))   -- warned once
        assert.are.equal(777, old:setting("reconnect_max_ms"))
        assert.are.equal(100, old:setting("reconnect_min_ms"))      -- the default
        assert.are.equal(2, #warnings)
        assert.matches("`connect_timeout` of resource '.-' is deprecated: use `connect_timeout_ms`", warnings[1])
        local new = redis.client { connect_timeout_ms = 99 }
        new.logger = old.logger
        assert.are.equal(99, new:setting("connect_timeout_ms"))
        assert.are.equal(2, #warnings)
    end)

    it("runs commands by method name and through call", function()
        testing.run(function()
            local cache = connect()
            cache:del("spec:m:h", "spec:m:k")
            assert.are.equal("OK", cache:set("spec:m:k", "v"))
            assert.are.equal("v", cache:get("spec:m:k"))
            assert.are.equal(1, cache:call("HSET", "spec:m:h", "f", "1"))
            assert.are.equal(2, cache:hincrby("spec:m:h", "f", 1))
            assert.are.same({ "f", "2" }, cache:hgetall("spec:m:h"))
            assert.is_nil(cache:get("spec:m:missing"))
            local r, err = cache:lpush("spec:m:k", "x")
            assert.is_nil(r)
            assert.matches("^WRONGTYPE", err)
            -- a transaction is sent in one go
            local replies = assert(cache:transaction {
                { "SET", "spec:m:t", "1" }, { "INCR", "spec:m:t" }, { "GET", "spec:m:t" } })
            assert.are.same({ "OK", 2, "2" }, replies)
            cache:close()
            local gone, why = cache:get("spec:m:k")
            assert.is_nil(gone)
            assert.matches("^redis redis: not connected", why)
        end)
    end)

    it("pipelines 200 concurrent tasks on one connection with correct results", function()
        testing.run(function()
            local cache = connect()
            local clients_before = tonumber(cache:info("clients"):match("connected_clients:(%d+)"))
            local bad, done = 0, 0
            run_tasks(200, function(i)
                for round = 1, 5 do
                    local key, value = "spec:p:" .. i, ("v%d.%d"):format(i, round)
                    if cache:set(key, value) ~= "OK" then bad = bad + 1 end
                    if cache:get(key) ~= value then bad = bad + 1 end
                    done = done + 1
                end
            end)
            assert.are.equal(0, bad)
            assert.are.equal(1000, done)
            -- no new connection for all these tasks
            local clients_after = tonumber(cache:info("clients"):match("connected_clients:(%d+)"))
            assert.is_true(clients_after <= clients_before)
            local keys = {}
            for i = 1, 200 do keys[i] = "spec:p:" .. i end
            assert.are.equal(200, cache:del(unpack(keys)))
            cache:close()
        end)
    end)

    it("delivers subscribe and psubscribe messages to handlers, each in a task", function()
        testing.run(function()
            local cache = connect()
            local got, me, waiting = {}, scheduler.current(), false
            local function note(entry)
                got[#got + 1] = entry
                if #got == 3 and waiting then scheduler.wake(me) end
            end
            assert(cache:subscribe("spec:news", function(message, channel)
                tamarco.sleep(1)   -- handlers may yield: each runs in its own task
                note({ "sub", message, channel })
            end))
            assert(cache:psubscribe("spec:ev.*", function(message, channel, pattern)
                note({ "psub", message, channel, pattern })
            end))
            assert.are.equal(1, cache:publish("spec:news", "hello\0world"))
            assert.are.equal(1, cache:publish("spec:ev.one", "e1"))
            assert.are.equal(1, cache:publish("spec:ev.two", "e2"))
            local done = false
            local guard = tamarco.spawn(function()
                require("tamarco.c.timer").sleep(3000)
                if not done then scheduler.wake(me) end
            end)
            if #got < 3 then
                waiting = true
                scheduler.suspend()
                waiting = false
            end
            done = true
            scheduler.interrupt(guard)
            table.sort(got, function(a, b) return a[2] < b[2] end)
            assert.are.same({
                { "psub", "e1", "spec:ev.one", "spec:ev.*" },
                { "psub", "e2", "spec:ev.two", "spec:ev.*" },
                { "sub", "hello\0world", "spec:news" },
            }, got)
            assert.are.equal(2, cache:status().subscriptions)
            cache:unsubscribe("spec:news")
            tamarco.sleep(20)
            assert.are.equal(0, cache:publish("spec:news", "nobody"))
            cache:close()
        end)
    end)

    it("selects the configured db on connect", function()
        testing.run(function()
            local db0 = connect()
            local db3 = connect({ db = 3 })
            db3:del("spec:db:k")
            assert.are.equal("OK", db3:set("spec:db:k", "three"))
            assert.is_nil(db0:get("spec:db:k"))
            assert.are.equal("three", db3:get("spec:db:k"))
            local raw = assert(c.connect(REDIS_HOST, REDIS_PORT))
            assert.are.equal("OK", raw:command("SELECT", 3))
            assert.are.equal("three", raw:command("GET", "spec:db:k"))
            raw:command("DEL", "spec:db:k")
            raw:close()
            db0:close()
            db3:close()
        end)
    end)

    it("authenticates with a password and reports a wrong one", function()
        testing.run(function()
            local admin = connect()
            assert.are.equal("OK", admin:config("SET", "requirepass", "spec-secret"))
            local ok, failure = pcall(function()
                -- a good password works
                local good = connect({ password = "spec-secret", db = 1 })
                assert.are.equal("PONG", good:ping())
                assert.is_nil(good:status().password)
                assert.is_nil(tostring(cjson.encode(good:status())):find("spec-secret", 1, true))
                good:close()
                -- a wrong one is reported
                local bad, err = redis.client():connect_to({ host = REDIS_HOST, port = REDIS_PORT,
                    password = "wrong" })
                assert.is_nil(bad)
                assert.matches("authentication failed: WRONGPASS", err)
                -- no password at all: commands are refused by the server
                local none = connect()
                local r, nerr = none:get("x")
                assert.is_nil(r)
                assert.matches("^NOAUTH", nerr)
                none:close()
            end)
            -- the admin connection authenticated before requirepass was set
            assert.are.equal("OK", admin:config("SET", "requirepass", ""))
            admin:close()
            assert(ok, failure)
        end)
    end)
end)

describe("redis resource in a service", function()
    local function service(settings_for_cache, extra)
        local svc = tamarco.service { name = "redis_spec", resources = { cache = redis.client() } }
        local settings = { system = { resources = { cache = settings_for_cache } } }
        for k, v in pairs(extra or {}) do settings[k] = v end
        return svc, settings
    end

    it("goes through the lifecycle's status codes and never shows the password", function()
        testing.run(function()
            local svc, settings = service({ host = REDIS_HOST, port = REDIS_PORT, db = 2,
                connect_timeout_ms = 2000 })
            assert.are.equal(STATUS.NOT_STARTED, svc.cache:status().status)
            local running = assert(testing.start_service(svc, { settings = settings }))
            assert.are.equal(STATUS.STARTED, svc.cache:status().status)
            local status = svc.cache:status()
            assert.is_true(status.connected)
            assert.are.equal(2, status.db)
            assert.are.equal("OK", svc.cache:set("spec:svc:k", "1"))
            assert.are.equal("1", svc.cache:get("spec:svc:k"))
            running:stop()
            assert.are.equal(STATUS.STOPPED, svc.cache:status().status)
            local r, err = svc.cache:get("spec:svc:k")
            assert.is_nil(r)
            assert.matches("redis cache: not connected", err)
        end)
    end)

    it("starts CONNECTING when Redis is unreachable and fails calls fast", function()
        testing.run(function()
            local svc, settings = service({ host = "127.0.0.1", port = closed_port(),
                reconnect_min_ms = 50, reconnect_max_ms = 100 })
            local running = assert(testing.start_service(svc, { settings = settings }))
            assert.are.equal(STATUS.CONNECTING, svc.cache:status().status)
            local turns, r, err = testing.loop_turns(svc.cache.get, svc.cache, "k")
            assert.is_nil(r)
            assert.are.equal("redis cache: not connected (connection refused)", err)
            assert.are.equal(0, turns, "the call waited for the loop")   -- failed at once
            tamarco.sleep(300)   -- a few reconnect attempts
            assert.are.equal(STATUS.CONNECTING, svc.cache:status().status)
            running:stop()
            assert.are.equal(STATUS.STOPPED, svc.cache:status().status)
        end)
    end)

    it("fails start-up when fail_on_start is set and Redis is unreachable", function()
        testing.run(function()
            local svc, settings = service({ host = "127.0.0.1", port = closed_port(), fail_on_start = true })
            local running, err, code = testing.start_service(svc, { settings = settings })
            assert.is_nil(running)
            assert.are.equal(1, code)
            assert.matches("redis cache: cannot connect to 127.0.0.1:%d+: connection refused", tostring(err))
        end)
    end)

    it("stays CONNECTING on a wrong password with a clear error", function()
        testing.run(function()
            local admin = connect()
            assert.are.equal("OK", admin:config("SET", "requirepass", "spec-secret2"))
            local ok, failure = pcall(function()
                local svc, settings = service({ host = REDIS_HOST, port = REDIS_PORT, password = "nope",
                    reconnect_min_ms = 50 })
                local running = assert(testing.start_service(svc, { settings = settings }))
                assert.are.equal(STATUS.CONNECTING, svc.cache:status().status)
                local r, err = svc.cache:get("k")
                assert.is_nil(r)
                assert.matches("^redis cache: not connected %(authentication failed: WRONGPASS", err)
                assert.is_nil(tostring(cjson.encode(svc.cache:status())):find("nope", 1, true))
                running:stop()
            end)
            assert.are.equal("OK", admin:config("SET", "requirepass", ""))
            admin:close()
            assert(ok, failure)
        end)
    end)

    it("FAULT: survives stop-redis/start-redis: FAILED, fast failures, back without restart", function()
        testing.run(function()
            local svc, settings = service({ host = REDIS_HOST, port = REDIS_PORT,
                reconnect_min_ms = 50, reconnect_max_ms = 200 })
            local running = assert(testing.start_service(svc, { settings = settings }))
            local seen = {}
            svc.cache.set_status = function(self, code)   -- records every transition
                seen[code] = true
                return base.Resource.set_status(self, code)
            end
            assert.are.equal(0, services_async("stop-redis")())
            assert.is_true(wait_until(function() return not svc.cache:status().connected end, 3000))
            local slowest, failures = 0, 0   -- slowest: loop turns a call took
            for _ = 1, 20 do
                local turns, r, err = testing.loop_turns(svc.cache.get, svc.cache, "k")
                slowest = math.max(slowest, turns)
                if not r then
                    failures = failures + 1
                    assert.matches("^redis cache: not connected %(", err)
                end
                tamarco.sleep(10)
            end
            assert.are.equal(20, failures)
            assert.are.equal(0, slowest, "calls during the outage waited for the loop")
            assert.are.equal(0, services_async("start-redis")())
            assert.is_true(wait_until(function() return svc.cache:status().status == STATUS.STARTED end, 5000))
            assert.are.equal("OK", svc.cache:set("spec:fault:k", "back"))
            assert.are.equal("back", svc.cache:get("spec:fault:k"))
            assert.is_true(seen[STATUS.FAILED] or false)
            assert.is_true(seen[STATUS.CONNECTING] or false)
            assert.is_true(svc.cache:status().reconnects >= 1)
            running:stop()
        end)
    end)

    it("FAULT: restart-redis while 50 tasks loop on GET/SET: errors only during the outage", function()
        testing.timeout_ms = 60000
        testing.run(function()
            local svc, settings = service({ host = REDIS_HOST, port = REDIS_PORT,
                reconnect_min_ms = 50, reconnect_max_ms = 500 })
            local running = assert(testing.start_service(svc, { settings = settings }))
            -- subscribed before the restart, re-subscribed after it
            local messages = {}
            assert(svc.cache:subscribe("spec:fault:chan", function(m) messages[#messages + 1] = m end))
            local phase = "before"   -- before | outage | after
            local stats = {
                before = { ok = 0, err = 0 }, outage = { ok = 0, err = 0 }, after = { ok = 0, err = 0 } }
            local slowest_failure, wrong = 0, 0
            local stop = false
            local group = {}
            for i = 1, 50 do
                group[i] = tamarco.spawn(function()
                    local n = 0
                    while not stop do
                        n = n + 1
                        local key, value = "spec:fault:" .. i, tostring(n)
                        local t0 = tamarco.now()
                        local r, err = svc.cache:set(key, value)
                        if r == "OK" then
                            r, err = svc.cache:get(key)
                            if r ~= nil and r ~= value then wrong = wrong + 1 end
                        end
                        local s = stats[phase]
                        if r ~= nil then
                            s.ok = s.ok + 1
                        else
                            s.err = s.err + 1
                            slowest_failure = math.max(slowest_failure, tamarco.now() - t0)
                            tamarco.sleep(5)   -- do not spin while Redis is down
                        end
                    end
                end)
            end
            tamarco.sleep(300)
            phase = "outage"
            local restarted = services_async("restart-redis")
            assert.are.equal(0, restarted())
            assert.is_true(wait_until(function() return svc.cache:status().status == STATUS.STARTED end, 5000))
            tamarco.sleep(20)
            phase = "after"
            tamarco.sleep(1000)
            local publish_count = svc.cache:publish("spec:fault:chan", "after restart")
            tamarco.sleep(50)
            stop = true
            tamarco.sleep(50)
            running:stop()
            assert.is_true(stats.before.ok > 100, "before: " .. stats.before.ok)
            assert.are.equal(0, stats.before.err)
            assert.is_true(stats.outage.err > 0, "the restart caused no error at all")
            assert.is_true(stats.after.ok > 100, "after: " .. stats.after.ok)
            assert.are.equal(0, stats.after.err)
            assert.are.equal(0, wrong)
            assert.is_true(slowest_failure < 500, "a failing call took " .. slowest_failure .. " ms")
            assert.are.equal(1, publish_count)
            assert.are.same({ "after restart" }, messages)
            print(("\n    fault test: %d ok before, %d ok / %d errors during the restart, %d ok after, "
                .. "slowest failure %d ms"):format(stats.before.ok, stats.outage.ok, stats.outage.err,
                stats.after.ok, slowest_failure))
        end)
        testing.timeout_ms = 20000
    end)

    it("leaves no handle that keeps the loop alive after stop", function()
        local path = cli.write_temp(([[
            local tamarco = require "tamarco"
            local testing = require "tamarco.testing"
            local process = require "tamarco.c.process"
            local redis = require "tamarco.resources.redis"
            it("stops", function()
                testing.run(function()
                    local svc = tamarco.service { name = "loop", resources = { cache = redis.client() } }
                    local running = assert(testing.start_service(svc, { settings = { system = { resources = {
                        cache = { host = %q, port = %d } } } } }))
                    assert(svc.cache:subscribe("x", function() end))
                    tamarco.spawn(function() svc.cache:blpop("spec:loop:list", 5) end)
                    assert(svc.cache:set("spec:loop:k", "v"))
                    tamarco.sleep(10)
                    running:stop()
                end)
                testing.turn(10)
                assert(process.run_loop("nowait") == false, "the loop is still alive")
                print("LOOP-ENDED")
            end)
        ]]):format(REDIS_HOST, REDIS_PORT), "_spec.lua")
        local t0 = os.time()
        local code, output = cli.run({ "test", path })
        os.remove(path)
        assert.are.equal(0, code, output)
        assert.matches("LOOP%-ENDED", output)
        assert.is_true(os.time() - t0 < 5)
    end)
end)
