-- The public C API (include/tamarco.h) as seen from Lua: tamarco_offload
-- (through tamarco.c.native's probe), the FFI exports tamarco_log,
-- tamarco_loop, tamarco_version and tamarco_wake_ticket (from another OS
-- thread too), and the CMake package a C extension builds against.
local testing = require "tamarco.testing"
local tamarco = require "tamarco"
local native = require "tamarco.core.native"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local logging = require "tamarco.core.logging"

describe("the C extension API", function()
    describe("tamarco_offload", function()
        it("runs work on a pool thread while the loop keeps turning", function()
            testing.run(function()
                local ticks, offloading = 0, true
                local ticker = tamarco.spawn(function()
                    while offloading do timer.sleep(5); ticks = ticks + 1 end
                end)
                assert.is_true(native.offload_sleep(200))   -- true: not on the loop thread
                offloading = false
                assert(testing.wait_until(function() return coroutine.status(ticker) == "dead" end))
                assert.is_true(ticks >= 2, "the loop was blocked: " .. ticks .. " ticks")
            end)
        end)

        it("runs offloads in parallel on the pool", function()
            testing.run(function()
                local me, done, most = scheduler.current(), 0, 0
                for _ = 1, 4 do
                    tamarco.spawn(function()
                        local _, overlapping = native.offload_sleep(150)
                        most = math.max(most, overlapping)
                        done = done + 1
                        if done == 4 then scheduler.wake(me) end
                    end)
                end
                scheduler.suspend()
                -- sequential jobs would never see another one sleeping
                assert.is_true(most >= 2, "at most " .. most .. " offloads ran at once")
            end)
        end)

        it("survives the waiting task being cancelled (done releases, no resume)", function()
            testing.run(function()
                local resumed_with
                local co = tamarco.spawn(function()
                    resumed_with = { native.offload_sleep(100) }
                end)
                timer.sleep(20)
                assert.is_true(scheduler.is_waiting(co))
                scheduler.interrupt(co, "interrupted")
                timer.sleep(200)   -- the work ends meanwhile; its done must not resume co
                assert.are.same({ "interrupted" }, resumed_with)
            end)
        end)

        it("raises outside a task instead of blocking", function()
            assert.has_error(function() native.offload_sleep(1) end)
        end)
    end)

    it("finds LuaJIT's own tools (jit.p profiler, jit.v, jit.dump)", function()
        local jit_p = require "jit.p"
        assert.is_function(jit_p.start)
        assert.is_function(require("jit.v").on)
        assert.is_function(require("jit.dump").on)
    end)

    describe("FFI exports", function()
        it("exposes the version and the loop", function()
            local ffi = require "ffi"
            assert.are.equal(require("tamarco.c.process").version, ffi.string(native.C.tamarco_version()))
            assert.is_true(native.C.tamarco_loop() ~= nil)
            assert.are.equal(1, native.api_version)
        end)

        it("tamarco_log emits a record through the service's logging", function()
            local records = {}
            local sink = { name = "native-spec", emit = function(_, record) records[#records + 1] = record end }
            logging.add_sink(sink)
            assert.are.equal(0, native.C.tamarco_log(native.C.TAMARCO_LOG_WARNING, "my.ext", "from C"))
            assert.are.equal(0, native.C.tamarco_log(native.C.TAMARCO_LOG_ERROR, nil, "no logger"))
            testing.turn(10)
            logging.remove_sink(sink)
            local found = {}
            for _, r in ipairs(records) do found[r.message] = r end
            assert.is_table(found["from C"])
            assert.are.equal("my.ext", found["from C"].logger)
            assert.are.equal("WARNING", found["from C"].level)
            assert.are.equal("native", found["no logger"].logger)
            assert.are.equal("ERROR", found["no logger"].level)
        end)

        it("tamarco_wake_ticket resumes a waiting task with data or an error", function()
            testing.run(function()
                local data = native.wait(function(ticket)
                    assert.are.equal(0, native.C.tamarco_wake_ticket(ticket, 1, "pay\0load", 8))
                end)
                assert.are.equal("pay\0load", data)
                local value, err = native.wait(function(ticket)
                    native.C.tamarco_wake_ticket(ticket, 0, "it failed", 9)
                end)
                assert.is_nil(value)
                assert.are.equal("it failed", err)
                -- an error in fn leaves no wait behind
                assert.has_error(function() native.wait(function() error("boom") end) end, nil)
                -- a stale ticket is ignored
                assert.are.equal(0, native.C.tamarco_wake_ticket(123456, 1, nil, 0))
                timer.sleep(5)
            end)
        end)

        it("tamarco_wake_ticket and tamarco_log work from another OS thread", function()
            testing.run(function()
                local thread = require "tamarco.core.thread"
                local records = {}
                local sink = { name = "native-thread-spec", emit = function(_, r) records[#records + 1] = r end }
                logging.add_sink(sink)
                local t
                local data = native.wait(function(ticket)
                    t = thread.start("waker", function(ctx)
                        local ffi = require "ffi"
                        local n = require "tamarco.core.native"
                        local job = ctx:receive()
                        ctx:sleep(50)
                        n.C.tamarco_log(n.C.TAMARCO_LOG_INFO, "waker", "hello from a thread")
                        local answer = "ticket " .. job.ticket
                        n.C.tamarco_wake_ticket(job.ticket, 1, answer, #answer)
                        return ffi ~= nil
                    end)
                    t:send({ ticket = ticket })
                end)
                t:join(2000)
                timer.sleep(5)
                logging.remove_sink(sink)
                assert.matches("^ticket %d+$", data)
                local logged = false
                for _, r in ipairs(records) do if r.message == "hello from a thread" then logged = true end end
                assert.is_true(logged)
            end)
        end)
    end)

    describe("the CMake package", function()
        it("is in the build tree for uninstalled hosts", function()
            local dir = require("tamarco.cli.test").host_cmake_dir()
            assert.is_string(dir)
            local f = assert(io.open(dir .. "/TamarcoHostConfig.cmake"))
            local text = f:read("*a")
            f:close()
            assert.matches("tamarco_add_extension", text .. io.open(dir .. "/TamarcoHostExtension.cmake"):read("*a"))
        end)
    end)
end)
