-- The process's signals, owned by the host (host/signals.c) and delivered
-- through the scheduler: tamarco.c.process.on_signal and wait_signal.
local process = require "tamarco.c.process"
local scheduler = require "tamarco.c.scheduler"
local tasks = require "tamarco.core.tasks"
local testing = require "tamarco.testing"
local uv = require "luv"

-- Whether this process catches signal number n now (/proc's SigCgt mask):
-- a signal nobody listens to must have its default disposition back.
local function catches(n)
    local f = assert(io.open("/proc/self/status"))
    local text = f:read("*a")
    f:close()
    local mask = assert(text:match("SigCgt:%s*(%x+)"))
    local digit = tonumber(mask:sub(-1 - math.floor((n - 1) / 4), -1 - math.floor((n - 1) / 4)), 16)
    return math.floor(digit / 2 ^ ((n - 1) % 4)) % 2 == 1
end

local SIGUSR1, SIGUSR2 = 10, 12

local function send(name) assert(uv.kill(process.pid(), name:lower())) end

describe("process signals", function()
    it("runs a listener as a task at every delivery, in registration order, until it is closed", function()
        local seen = {}
        local first = assert(process.on_signal("SIGUSR1", function(name)
            assert(scheduler.current(), "a listener runs in a task")
            seen[#seen + 1] = "first " .. name
        end))
        local second = assert(process.on_signal("SIGUSR1", function(name)
            tasks.sleep(1)   -- a listener may wait
            seen[#seen + 1] = "second " .. name
        end))
        assert.is_true(catches(SIGUSR1))
        testing.run(function()
            send("SIGUSR1")
            assert.is_truthy(testing.wait_until(function() return #seen == 2 end))
            first:close()
            send("SIGUSR1")
            assert.is_truthy(testing.wait_until(function() return #seen == 3 end))
        end)
        second:close()
        second:close()   -- closing twice is harmless
        assert.are.same({ "first SIGUSR1", "second SIGUSR1", "second SIGUSR1" }, seen)
        assert.is_false(catches(SIGUSR1))
    end)

    it("logs a listener's error and delivers the next signal", function()
        local errors_seen, calls = {}, 0
        scheduler.set_error_handler(function(_, err) errors_seen[#errors_seen + 1] = tostring(err) end)
        local listener = assert(process.on_signal("SIGUSR2", function()
            calls = calls + 1
            if calls == 1 then error("listener failed") end
        end))
        local ok, err = pcall(testing.run, function()
            send("SIGUSR2")
            assert.is_truthy(testing.wait_until(function() return calls == 1 end))
            send("SIGUSR2")
            assert.is_truthy(testing.wait_until(function() return calls == 2 end))
        end)
        listener:close()
        tasks.log_failures_to_stderr()
        assert.is_true(ok, err)
        assert.are.equal(1, #errors_seen)
        assert.matches("listener failed", errors_seen[1], 1, true)
    end)

    it("ends a task's wait with the name of the first signal that arrives", function()
        local got = testing.run(function()
            local result
            local co = scheduler.spawn(function() result = process.wait_signal("SIGUSR1", "SIGUSR2") end)
            assert.is_truthy(testing.wait_until(function() return scheduler.is_waiting(co) end))
            assert.is_true(catches(SIGUSR1) and catches(SIGUSR2))
            local listed
            for _, t in ipairs(scheduler.list()) do
                if t.co == co then listed = t end
            end
            assert.are.equal("signal", listed.wait)
            assert.are.equal("SIGUSR1 SIGUSR2", listed.detail)
            send("SIGUSR2")
            assert.is_truthy(testing.wait_until(function() return result end))
            return result
        end)
        assert.are.equal("SIGUSR2", got)
        -- the woken task waited for SIGUSR1 too: nobody does any more
        assert.is_false(catches(SIGUSR1))
        assert.is_false(catches(SIGUSR2))
    end)

    it("stops watching for a waiting task that is cancelled", function()
        testing.run(function()
            local task = scheduler.spawn(function() process.wait_signal("SIGUSR1") end)
            assert.is_truthy(testing.wait_until(function() return catches(SIGUSR1) end))
            tasks.cancel(task)
            assert.is_truthy(testing.wait_until(function() return not catches(SIGUSR1) end))
        end)
    end)

    it("refuses an unknown signal and a wait outside a task", function()
        local ok, err = pcall(process.on_signal, "SIGKILLME", function() end)
        assert.is_false(ok)
        assert.matches("unknown signal 'SIGKILLME' (one of SIGHUP, SIGINT", err, 1, true)
        ok, err = pcall(process.on_signal, "sigterm", function() end)
        assert.is_false(ok)
        assert.matches("unknown signal 'sigterm'", err, 1, true)
        ok, err = pcall(process.wait_signal, "SIGTERM")
        assert.is_false(ok)
        assert.matches("process.wait_signal yields", err, 1, true)
    end)
end)
