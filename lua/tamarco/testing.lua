--- tamarco.testing: run tasks and whole services inside a spec.
--
-- Specs run in `tamarco-host test` on the host's main state, outside the
-- loop. `testing.run(fn)` starts fn as a task and turns the loop until it
-- ends, so a spec reads sequentially while fn sleeps and does I/O.
local scheduler = require "tamarco.c.scheduler"
local process = require "tamarco.c.process"
local timer = require "tamarco.c.timer"

local testing = {}

--- Runs fn(...) as a task until it returns; returns its results or raises its
-- error (with the task's traceback). `testing.timeout_ms` bounds the wait.
testing.timeout_ms = 20000

function testing.run(fn, ...)
    local done, ok, results = false, nil, nil
    local co = scheduler.spawn(fn, ...)
    scheduler.on_exit(co, function(success, ...)
        done, ok, results = true, success, { n = select("#", ...), ... }
    end)
    local deadline = timer.hrtime() + testing.timeout_ms * 1e6
    while not done do
        if timer.hrtime() > deadline then
            scheduler.interrupt(co, nil, "timeout")
            error(("testing.run: task did not finish within %d ms"):format(testing.timeout_ms), 2)
        end
        process.run_loop("once")
    end
    if not ok then
        local err, tb = results[1], results[2]
        error(tostring(err) .. "\n" .. tostring(tb), 0)
    end
    return unpack(results, 1, results.n)
end

--- Turns the loop for about `ms` milliseconds (for callbacks to happen).
function testing.turn(ms)
    testing.run(timer.sleep, ms or 0)
end

return testing
