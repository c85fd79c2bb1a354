--- tamarco.core.tasks: named tasks and timers of a service, with cancellation.
--
-- A task is a function run in its own coroutine. Cancelling a task wakes it
-- from whatever it waits on; the next cancellation point (tamarco.sleep and
-- every resource call that yields) raises `tasks.CANCELLED`, which ends the
-- task quietly. Any other error ends the task with a log line and leaves the
-- service running.
local process = require "tamarco.c.process"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"

local tasks = {}

-- Process-wide state, kept in the registry: a test runner that loads this
-- module afresh for each spec file must not make a second kind of
-- cancellation that the first error handler does not recognise.
local registry = debug.getregistry()
local shared = registry["tamarco.tasks"]
if not shared then
    shared = {
        CANCELLED = setmetatable({}, { __tostring = function() return "task cancelled" end }),
        cancelled = setmetatable({}, { __mode = "k" }),
        names = setmetatable({}, { __mode = "k" }),
    }
    registry["tamarco.tasks"] = shared
end

--- The error value raised inside a cancelled task.
tasks.CANCELLED = shared.CANCELLED

local cancelled = shared.cancelled

--- Names of running named tasks (coroutine -> name), for error reports.
tasks.names = shared.names

--- The scheduler's error handler until a service installs its logger:
-- failures go to stderr with their traceback; cancellations are not failures.
function tasks.log_failures_to_stderr()
    scheduler.set_error_handler(function(co, err, traceback)
        if err == tasks.CANCELLED then return end
        io.stderr:write("tamarco: task failed: ", tostring(err), "\n", tostring(traceback), "\n")
    end)
end
tasks.log_failures_to_stderr()

--- Installs the scheduler's error handler: every failing task is logged once
-- with its traceback through `logger`; cancellations are not failures.
function tasks.log_failures_to(logger)
    scheduler.set_error_handler(function(co, err, traceback)
        if err == tasks.CANCELLED then return end
        local name = tasks.names[co]
        local what = name and ("task '" .. name .. "'") or "task"
        logger:exception(what .. " failed: " .. tostring(err), err, traceback, { task = name })
    end)
end

--- Raises tasks.CANCELLED when the running task was cancelled. Call it after
-- every yield in code that loops.
function tasks.checkpoint()
    -- Nothing cancelled (the usual case): no need to ask which task runs.
    -- Asking would also keep its coroutine out of the scheduler's reuse pool,
    -- which every handler making a resource call would then pay for.
    if next(cancelled) == nil then return end
    local co = scheduler.current()
    if co and cancelled[co] then error(tasks.CANCELLED, 0) end
end

--- Yields the running task for `ms` milliseconds; a cancellation point.
function tasks.sleep(ms)
    timer.sleep(ms)
    tasks.checkpoint()
end

--- Cancels coroutine co (a task): wakes it now if it waits.
function tasks.cancel(co)
    cancelled[co] = true
    scheduler.interrupt(co, nil, "cancelled")
end

--- tasks.is_cancelled(co) -> true once tasks.cancel(co) was called.
function tasks.is_cancelled(co)
    return cancelled[co] == true
end

--- A group of named tasks that can be cancelled and awaited together.
local Group = {}
Group.__index = Group

--- tasks.group() -> group.
function tasks.group()
    return setmetatable({ running = {}, count = 0, waiters = {} }, Group)
end

local function notify_waiters(group)
    if group.count > 0 then return end
    local waiters = group.waiters
    group.waiters = {}
    for _, co in ipairs(waiters) do scheduler.wake(co) end
end

--- group:spawn(name, fn, ...) -> co. fn runs in a new task; its end (return,
-- error or cancellation) is accounted for; errors reach the scheduler's
-- error handler (see log_failures_to).
function Group:spawn(name, fn, ...)
    local co = scheduler.spawn(fn, ...)
    tasks.names[co] = name
    self.running[co] = name
    self.count = self.count + 1
    scheduler.on_exit(co, function()
        self.running[co] = nil
        self.count = self.count - 1
        notify_waiters(self)
    end)
    return co
end

--- Cancels every task of the group.
function Group:cancel_all()
    for co in pairs(self.running) do tasks.cancel(co) end
end

--- Yields until every task of the group has ended or `timeout_ms` passed.
-- Returns true, or nil, "timeout", names_still_running.
function Group:wait(timeout_ms)
    if self.count == 0 then return true end
    local me = assert(scheduler.current(), "Group:wait must run inside a task")
    local guard
    if timeout_ms then
        -- a cancelled guard ends at its sleep and never wakes `me` later
        guard = scheduler.spawn(function()
            tasks.sleep(timeout_ms)
            scheduler.wake(me, "timeout")
        end)
    end
    self.waiters[#self.waiters + 1] = me
    local why = scheduler.suspend("task group")
    if guard then tasks.cancel(guard) end
    if why == "timeout" then
        for i, co in ipairs(self.waiters) do
            if co == me then table.remove(self.waiters, i) break end
        end
        local names = {}
        for _, name in pairs(self.running) do names[#names + 1] = name end
        table.sort(names)
        return nil, "timeout", names
    end
    return true
end

--- A timer body with Tamarco's semantics. options: interval (ms),
-- autostart (run at once, then sleep after each run), one_shot (sleep,
-- run once, end). An error ends the timer (the group logs it).
function tasks.timer_body(options, fn, ...)
    local interval = options.interval
    local args = { n = select("#", ...), ... }
    return function()
        if options.one_shot then
            tasks.sleep(interval)
            return fn(unpack(args, 1, args.n))
        end
        if not options.autostart then tasks.sleep(interval) end
        while true do
            fn(unpack(args, 1, args.n))
            tasks.sleep(interval)
        end
    end
end

--- tasks.run_until_done(fn, timeout_ms, ...) -> true, results | false,
-- err, traceback | nil, "timeout". For code outside the loop (a command, a
-- test): runs fn(...) as a task and turns the loop until the task ends;
-- `results` is the list of its return values (with `n`). With a timeout
-- (milliseconds, nil for none) the task is interrupted when it runs out.
function tasks.run_until_done(fn, timeout_ms, ...)
    local done, ok, results = false, nil, nil
    local co = scheduler.spawn(fn, ...)
    scheduler.on_exit(co, function(success, ...)
        done, ok, results = true, success, { n = select("#", ...), ... }
    end)
    local timed_out, alarm = false, nil
    if timeout_ms then
        -- the alarm both marks the timeout and makes the loop turn then,
        -- even when the task waits on something that never comes (a clock
        -- read after the turn could fall a hair short of the deadline)
        local uv = require "luv"
        uv.update_time()   -- the loop's clock is stale after a blocking call
        alarm = uv.new_timer()
        alarm:start(timeout_ms, 0, function() timed_out = true end)
    end
    while not done do
        if timed_out then
            alarm:close()
            scheduler.interrupt(co, nil, "timeout")
            return nil, "timeout"
        end
        process.run_loop("once")
    end
    if alarm then alarm:close() end
    if not ok then return false, results[1], results[2] end
    return true, results
end

return tasks
