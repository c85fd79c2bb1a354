local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local process = require "tamarco.c.process"
local thread = require "tamarco.core.thread"

-- Handles that other spec files left alive (a sleeping task's timer, say)
-- are not the thread module's: count only what appears after this file starts.
local baseline = #process.active_handles()

-- Turns the loop without blocking until no handle of ours keeps it alive
-- (or gives up).
local function loop_settles()
    for _ = 1, 50 do
        if not process.run_loop("nowait") or #process.active_handles() <= baseline then return true end
    end
    return false
end

describe("thread", function()
    it("runs real CPU work on another OS thread and returns the result by message", function()
        local t = thread.start("summer", function(ctx)
            local job = ctx:receive()
            local sum = 0
            for i = job.from, job.to do sum = sum + i end
            ctx:send({ sum = sum, name = ctx.name })
        end)
        local result = testing.run(function()
            assert(t:send({ from = 1, to = 3e7 }))
            local r = t:receive(10000)
            assert.is_true(t:join(3000))
            return r
        end)
        assert.are.equal(3e7 * (3e7 + 1) / 2, result.sum)
        assert.are.equal("summer", result.name)
        assert.are.equal("finished", t:status())
        assert.is_nil(t:error())
        assert.is_true(loop_settles())
    end)

    it("gives a thread a logger whose records reach the service's sinks, with the service's level", function()
        local logging = require "tamarco.core.logging"
        logging.configure { service_name = "threads", deploy_name = "spec", instance_id = "i-7",
            profile = "PRODUCTION", stdout = false }
        local records = {}
        local sink = logging.add_sink { name = "mem", emit = function(_, r) records[#records + 1] = r end }
        local t = thread.start("logger", function(ctx)
            ctx.logger:info("from ctx.logger", { n = 1 })
            ctx.logger:debug("below the service's level")
            local log = require("tamarco.core.logging").get_logger("threads.lib")
            log:warning("from tamarco.logging", { password = "hunter2", fn = print })
            ctx.logger:exception("failed", "bad thing")
            ctx:send("done")
        end)
        testing.run(function()
            assert.are.equal("done", t:receive(5000))
            assert.is_true(t:join(3000))
        end)
        logging.remove_sink(sink)
        assert.is_nil(t:error())
        assert.are.equal(3, #records)
        local first, second, third = records[1], records[2], records[3]
        assert.are.equal("from ctx.logger", first.message)
        assert.are.equal("threads.logger", first.logger)
        assert.are.equal("INFO", first.level)
        assert.are.equal(1, first.n)
        assert.are.equal("threads", first.service_name)
        assert.are.equal("spec", first.deploy_name)
        assert.are.equal("i-7", first.service_instance_id)
        assert.are.equal("logger", first.thread_name)
        assert.are.equal("from tamarco.logging", second.message)
        assert.are.equal("threads.lib", second.logger)
        assert.are.equal("***", second.password)
        assert.matches("^function", second.fn)   -- a function travels as its text
        assert.are.equal("ERROR", third.level)
        assert.are.equal("bad thing", third.error)
        assert.matches("stack traceback", third.traceback)
        assert.is_true(loop_settles())
    end)

    it("svc:thread's ctx.logger is <service>.<thread> and reaches the service's sinks", function()
        local logging = require "tamarco.core.logging"
        local records = {}
        local sink = { name = "mem", emit = function(_, r) if r.thread_name then records[#records + 1] = r end end }
        testing.run(function()
            local svc = tamarco.service { name = "threaded", report_server = false }
            svc:thread("worker", function(ctx)
                ctx.logger:warning("hello from the worker")
                while not ctx:should_stop() do ctx:sleep(20) end
            end)
            logging.add_sink(sink)
            local running = assert(testing.start_service(svc))
            local waited = 0
            while #records == 0 and waited < 5000 do tamarco.sleep(10) waited = waited + 10 end
            running:stop()
        end)
        logging.remove_sink(sink)
        assert.are.equal(1, #records)
        assert.are.equal("threaded.worker", records[1].logger)
        assert.are.equal("hello from the worker", records[1].message)
        assert.are.equal("worker", records[1].thread_name)
        assert.is_true(loop_settles())
    end)

    it("ping-pongs 1000 messages both ways with the values intact", function()
        local t = thread.start("echo", function(ctx)
            while true do
                local msg, err = ctx:receive()
                if msg == nil then return err end
                if msg == "bye" then return end
                ctx:send({ echo = msg, n = msg.i * 2 })
            end
        end)
        local function message(i)
            return {
                i = i,
                float = i / 7,
                neg = -i - 0.25,
                flags = { true, false, i % 2 == 0 },
                bin = "a\0b" .. string.char(i % 256) .. "\0",
                nested = { deep = { deeper = { list = { i, "x", { y = i } } } } },
                [3.5] = "float key",
                [true] = "bool key",
                empty = {},
                huge = math.huge,
            }
        end
        testing.run(function()
            for i = 1, 1000 do
                assert(t:send(message(i)))
                local back = t:receive(5000)
                assert.are.same(message(i), back.echo)
                assert.are.equal(i * 2, back.n)
            end
            t:send("bye")
            assert.is_true(t:join(3000))
        end)
        assert.are.equal("finished", t:status())
        assert.is_nil(t:error())
    end)

    it("keeps message order when many are queued before they are read", function()
        local t = thread.start("burst", function(ctx)
            for i = 1, 500 do ctx:send(i) end
        end)
        testing.run(function()
            assert.is_true(t:join(3000))
            for i = 1, 500 do assert.are.equal(i, t:receive(1000)) end
            assert.are.same({ nil, "finished" }, { t:receive(1000) })
        end)
        local ok, err = t:send("late")
        assert.is_nil(ok)
        assert.are.equal("finished", err)
        assert.is_true(loop_settles())
    end)

    it("times out a receive on both sides", function()
        local t = thread.start("quiet", function(ctx)
            local started = require("tamarco.c.timer").hrtime()
            local msg, err = ctx:receive(30)
            local waited = (require("tamarco.c.timer").hrtime() - started) / 1e6
            ctx:send({ msg = msg, err = err, waited = waited })
            ctx:receive()   -- until stopped
        end)
        testing.run(function()
            local started = tamarco.now()
            -- the thread's own report arrives after ~30 ms; a 5 ms wait misses it
            local msg, err = t:receive(5)
            assert.is_nil(msg)
            assert.are.equal("timeout", err)
            local report = t:receive(3000)
            assert.is_nil(report.msg)
            assert.are.equal("timeout", report.err)
            assert.is_true(report.waited >= 25)
            assert.is_true(tamarco.now() - started < 3000)
            assert.is_true(t:stop())
        end)
    end)

    it("wakes a thread blocked in receive on stop and joins it in time", function()
        local t = thread.start("blocked", function(ctx)
            ctx:send("ready")
            local msg, err = ctx:receive()
            ctx:send({ msg = msg, err = err, should_stop = ctx:should_stop(), slept = ctx:sleep(10000) })
        end)
        local started
        local report = testing.run(function()
            assert.are.equal("ready", t:receive(3000))
            started = tamarco.now()
            assert.is_true(t:stop(2000))
            return t:receive(1000)
        end)
        assert.is_true(tamarco.now() - started < 1000)
        assert.are.same({ err = "stopped", should_stop = true, slept = false }, report)
        assert.are.equal("finished", t:status())
        assert.is_false(t:detached())
        assert.is_true(loop_settles())
    end)

    it("gives up on a thread that ignores stop and keeps the service working", function()
        local t = thread.start("stubborn", function(ctx)
            local hrtime = require("tamarco.c.timer").hrtime
            ctx:send("spinning")
            local t0 = hrtime()
            while hrtime() - t0 < 1.2e9 do end   -- checks nothing
            ctx:send("too late")                -- nobody listens any more
        end)
        local exit_status
        t:on_exit(function(status) exit_status = status end)
        testing.run(function()
            assert.are.equal("spinning", t:receive(3000))
            local started = tamarco.now()
            local ok, err = t:stop(200)
            assert.is_nil(ok)
            assert.are.equal("timeout", err)
            local waited = tamarco.now() - started
            assert.is_true(waited >= 150 and waited < 1000, "waited " .. waited)
            assert.is_true(t:detached())
            assert.are.same({ nil, "detached" }, { t:receive(10) })
            assert.are.same({ nil, "detached" }, { t:join(10) })
            -- the service keeps working
            local ticks = 0
            for _ = 1, 5 do tamarco.sleep(2) ticks = ticks + 1 end
            assert.are.equal(5, ticks)
            assert.are.equal("detached", exit_status)
        end)
        -- the detached thread does not keep the loop alive
        assert.is_true(loop_settles())
        -- and cleans itself up when it ends by itself
        testing.run(function()
            local deadline = tamarco.now() + 5000
            while t:status() == "running" and tamarco.now() < deadline do tamarco.sleep(20) end
        end)
        assert.are.equal("finished", t:status())
    end)

    it("reports a thread's error with its traceback", function()
        local t = thread.start("crasher", function(ctx)
            local function explode(x) error("boom in thread " .. x) end
            local function work() explode(ctx.name) end
            work()
        end)
        testing.run(function()
            assert.is_true(t:join(3000))
            assert.are.same({ nil, "finished" }, { t:receive(100) })
        end)
        assert.are.equal("failed", t:status())
        local err = t:error()
        assert.matches("boom in thread crasher", err)
        assert.matches("stack traceback", err)
        assert.matches("explode", err)
        assert.matches("thread_spec.lua", err)
    end)

    it("reports a non-string error", function()
        local t = thread.start("tablethrower", function() error({ code = 7 }) end)
        testing.run(function() assert.is_true(t:join(3000)) end)
        assert.are.equal("failed", t:status())
        assert.matches("table: ", t:error())
    end)

    it("refuses a function that captures upvalues, naming the upvalue", function()
        local counter = 0
        local ok, err = pcall(thread.start, "capturer", function(ctx) counter = counter + 1 end)
        assert.is_false(ok)
        assert.matches("thread function 'capturer' captures upvalue 'counter'; require what it needs", err, 1, true)
        assert.has_error(function() thread.start("", function() end) end)
        assert.has_error(function() thread.start("x", "not a function") end)
        assert.has_error(function() thread.start("x", print) end)
    end)

    it("refuses non-copyable messages with the field's path", function()
        local t = thread.start("sink", function(ctx) ctx:receive() end)
        local ok, err = pcall(t.send, t, { a = { b = function() end } })
        assert.is_false(ok)
        assert.matches("msg.a.b is a function", err, 1, true)
        ok, err = pcall(t.send, t, { list = { 1, 2, coroutine.create(print) } })
        assert.matches("msg.list[3] is a thread", err, 1, true)
        ok, err = pcall(t.send, t, { ["two words"] = io.stdout })
        assert.matches('msg["two words"] is a userdata', err, 1, true)
        local cyclic = { a = {} }
        cyclic.a.back = cyclic
        ok, err = pcall(t.send, t, cyclic)
        assert.matches("message has a cycle: msg.a.back", err, 1, true)
        ok, err = pcall(t.send, t, { [{}] = 1 })
        assert.matches("msg has a table key", err, 1, true)
        -- a shared (acyclic) subtable is copied twice
        local shared = { 1 }
        local copy = thread.decode(thread.encode({ x = shared, y = shared }))
        assert.are.same({ x = { 1 }, y = { 1 } }, copy)
        assert.are_not.equal(copy.x, copy.y)
        -- the thread reports its own bad message as an error naming the field
        local bad = thread.start("badsender", function(ctx) ctx:send({ f = print }) end)
        testing.run(function()
            assert.is_true(t:stop())
            assert.is_true(bad:join(3000))
        end)
        assert.matches("msg.f is a function", bad:error(), 1, true)
    end)

    it("round-trips values through the message encoding", function()
        for _, v in ipairs({ 0, -1.5, 1e308, "", "\0\1\255", true, false, { {}, { {} } }, { [1] = 1, [3] = 3 } }) do
            assert.are.same(v, thread.decode(thread.encode(v)))
        end
        assert.is_nil(thread.decode(thread.encode(nil)))
        local nan = thread.decode(thread.encode(0 / 0))
        assert.is_true(nan ~= nan)
        assert.has_error(function() thread.decode("\6\1\0") end)
        assert.has_error(function() thread.decode("") end)
        local deep = {}
        local cur = deep
        for _ = 1, 150 do cur.n = {} cur = cur.n end
        assert.has_error(function() thread.encode(deep) end, nil)
    end)

    it("does not block the loop while a thread computes", function()
        local t = thread.start("busy", function(ctx)
            local hrtime = require("tamarco.c.timer").hrtime
            local t0, n = hrtime(), 0
            while hrtime() - t0 < 300e6 do n = n + 1 end
            ctx:send(n)
        end)
        local ticks = 0
        local n = testing.run(function()
            local ticker = tamarco.spawn(function()
                while t:status() == "running" do
                    tamarco.sleep(10)
                    ticks = ticks + 1
                end
            end)
            local result = t:receive(5000)
            assert.is_true(t:join(3000))
            tamarco.sleep(30)   -- lets the ticker see the end and finish
            return result
        end)
        assert.is_true(n > 0)
        assert.is_true(ticks >= 10, "ticks: " .. ticks)
    end)

    it("hands each message to on_message in its own task", function()
        local t = thread.start("producer", function(ctx)
            for i = 1, 20 do ctx:send({ i = i }) end
            ctx:receive()   -- until stopped
        end)
        local seen = {}
        testing.run(function()
            local me = require("tamarco.c.scheduler").current()
            t:on_message(function(msg)
                tamarco.sleep(1)   -- a handler is a task: it may yield
                seen[#seen + 1] = msg.i
                if #seen == 20 then require("tamarco.c.scheduler").wake(me) end
            end)
            require("tamarco.c.scheduler").suspend()
            assert.has_error(function() t:receive(10) end)
            assert.is_true(t:stop())
        end)
        table.sort(seen)
        for i = 1, 20 do assert.are.equal(i, seen[i]) end
        assert.is_true(loop_settles())
    end)

    it("lets a thread require modules and use cjson", function()
        local t = thread.start("json", function(ctx)
            local cjson = require "cjson"
            local timer = require "tamarco.c.timer"
            ctx:send({ json = cjson.encode({ a = 1 }), now = timer.now() > 0, has_sleep = pcall(require("tamarco").sleep, 1) })
        end)
        local r = testing.run(function() return t:receive(3000) end)
        assert.are.equal('{"a":1}', r.json)
        assert.is_true(r.now)
        assert.is_false(r.has_sleep)
    end)

    it("calls on_exit with the status and error once the thread ended", function()
        local ok_t = thread.start("fine", function(ctx) ctx:receive() end)
        local bad_t = thread.start("bad", function() error("exit boom") end)
        local seen = {}
        testing.run(function()
            ok_t:on_exit(function(status, err) seen.fine = { status, err } end)
            bad_t:on_exit(function(status, err) seen.bad = { status, err } end)
            assert.is_true(ok_t:stop())
            assert.is_true(bad_t:join(3000))
            tamarco.sleep(5)
            -- registered after the end: called at once
            bad_t:on_exit(function(status) seen.late = status end)
            tamarco.sleep(5)
        end)
        assert.are.same({ "finished" }, seen.fine)
        assert.are.equal("failed", seen.bad[1])
        assert.matches("exit boom", seen.bad[2])
        assert.matches("stack traceback", seen.bad[2])
        assert.are.equal("failed", seen.late)
    end)

    it("keeps messages for the next receive when a receiving task is interrupted", function()
        local scheduler = require "tamarco.c.scheduler"
        local t = thread.start("later", function(ctx)
            ctx:receive()          -- "go"
            ctx:send("first")
            ctx:send("second")
            ctx:receive()          -- until stopped
        end)
        local got = testing.run(function()
            local receiver = tamarco.spawn(function() return t:receive() end)
            tamarco.sleep(5)
            assert.is_true(scheduler.interrupt(receiver, nil, "cancelled"))
            -- a task woken without cancelling leaves a stale wait behind
            local waker = tamarco.spawn(function() return t:receive() end)
            tamarco.sleep(5)
            assert.is_true(scheduler.wake(waker, nil, "woken"))
            tamarco.sleep(5)
            t:send("go")
            local a = t:receive(3000)
            local b = t:receive(3000)
            assert.is_true(t:stop())
            return { a, b }
        end)
        assert.are.same({ "first", "second" }, got)
    end)

    it("refuses to wait outside a task", function()
        local t = thread.start("idle", function(ctx) ctx:receive() end)
        local ok, err = pcall(t.receive, t)
        assert.is_false(ok)
        assert.matches("inside a task", err)
        testing.run(function() assert.is_true(t:stop()) end)
    end)
end)
