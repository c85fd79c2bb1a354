local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local scheduler = require "tamarco.c.scheduler"

describe("scheduler", function()
    it("runs a task that sleeps and returns its results", function()
        local a, b = testing.run(function(x)
            tamarco.sleep(10)
            return x + 1, "done"
        end, 41)
        assert.are.equal(42, a)
        assert.are.equal("done", b)
    end)

    it("interleaves concurrent tasks by their sleep times", function()
        local order = {}
        testing.run(function()
            local left = 2
            local me = scheduler.current()
            for _, spec in ipairs({ { "slow", 40 }, { "fast", 5 } }) do
                local co = tamarco.spawn(function()
                    tamarco.sleep(spec[2])
                    order[#order + 1] = spec[1]
                end)
                scheduler.on_exit(co, function()
                    left = left - 1
                    if left == 0 then scheduler.wake(me) end
                end)
            end
            scheduler.suspend()
        end)
        assert.are.same({ "fast", "slow" }, order)
    end)

    it("reports a failing task's error with its traceback and keeps going", function()
        local seen
        scheduler.set_error_handler(function(co, err, tb) seen = { err = err, tb = tb } end)
        local ok, err = pcall(testing.run, function()
            tamarco.sleep(1)
            local function deep() error("boom in task") end
            deep()
        end)
        require("tamarco.core.tasks").log_failures_to_stderr()
        assert.is_false(ok)
        assert.matches("boom in task", err)
        assert.matches("boom in task", seen.err)
        assert.matches("deep", seen.tb)
        -- the loop still runs tasks afterwards
        assert.are.equal(3, testing.run(function() tamarco.sleep(1) return 3 end))
    end)

    it("interrupts a sleeping task at once", function()
        local started = tamarco.now()
        local result = testing.run(function()
            local sleeper = tamarco.spawn(function()
                return require("tamarco.c.timer").sleep(60000)
            end)
            local me = scheduler.current()
            local got
            scheduler.on_exit(sleeper, function(ok, a, b) got = { a, b } scheduler.wake(me) end)
            tamarco.sleep(5)
            assert(scheduler.interrupt(sleeper, nil, "cancelled"))
            scheduler.suspend()
            return got
        end)
        assert.are.same({ nil, "cancelled" }, result)
        assert.is_true(tamarco.now() - started < 30000)
    end)

    it("lets timers and other tasks run while a task loops on sleep(0)", function()
        local ticks = 0
        testing.run(function()
            local spinner = tamarco.spawn(function() while true do tamarco.sleep(0) end end)
            tamarco.spawn(function() for _ = 1, 5 do tamarco.sleep(1) ticks = ticks + 1 end end)
            tamarco.sleep(100)
            require("tamarco.core.tasks").cancel(spinner)
        end)
        assert.are.equal(5, ticks)
    end)

    it("refuses to yield outside a task with a clear error", function()
        local ok, err = pcall(tamarco.sleep, 1)
        assert.is_false(ok)
        assert.matches("inside a task", err)
    end)
end)
