--- tamarco.core.thread: a Lua function on its own OS thread, in its own LuaJIT
-- state, talking to the service by copied messages.
--
--     local thread = require "tamarco.core.thread"
--     local t = thread.start("summer", function(ctx)
--         local job = ctx:receive()
--         local sum = 0
--         for i = job.from, job.to do sum = sum + i end
--         ctx:send({ sum = sum })
--     end)
--     t:send({ from = 1, to = 1e8 })
--     local result = t:receive(5000)       -- inside a task
--     t:stop()
--
-- The function runs in a fresh state with the same module paths and
-- preloaded bindings as the service's main state, so it may `require` what it
-- needs ("cjson", "tamarco.c.timer", ...). It is transferred with
-- string.dump: it cannot capture upvalues (locals of the enclosing code);
-- globals are those of the new state. `tamarco.sleep` and the scheduler are
-- not available in a thread: use ctx:sleep.
--
-- In the thread, fn(ctx):
--   ctx.name
--   ctx.logger               a logger (`<service>.<thread name>`) whose records
--                               reach the service's sinks, with its level and
--                               identity fields and thread_name; so does
--                               tamarco.core.logging used in the thread
--                               (tamarco.core.thread_logging)
--   ctx:send(msg)            -> true, or nil, "detached" (the service stopped listening)
--   ctx:receive([ms])        -> msg | nil, "timeout" | nil, "stopped"
--                               (blocks the thread; a stop request wakes it)
--   ctx:should_stop()        -> bool
--   ctx:sleep(ms)            -> true, or false when woken early by a stop request
--
-- On the service side (receive/stop/join yield: call them inside a task):
--   t:send(msg)              -> true, or nil, "finished"
--   t:receive([ms])          -> msg | nil, "timeout" | nil, "finished"
--                               (| nil, "detached" after a stop that timed out)
--   t:on_message(fn)         each message is handled by fn(msg) in its own task;
--                               exclusive with t:receive
--   t:on_exit(fn)            fn(status, err) in its own task once the loop stops
--                               tracking the thread: status "finished" | "failed"
--                               (err: message with traceback) | "detached"
--   t:stop([ms = 3000])      requests a cooperative stop and waits: true, or
--                               nil, "timeout". On timeout the OS thread is
--                               detached: it keeps running until it returns by
--                               itself; if it never does, its Lua state is leaked
--                               deliberately (a thread running Lua cannot be
--                               killed safely). t:detached() is then true.
--   t:join([ms])             waits without requesting a stop (no timeout: forever);
--                               true, or nil, "timeout" (not detached)
--   t:status()               "running" | "finished" | "failed"
--   t:error()                the error message with the thread's traceback, or nil
--
-- Messages are deep copies: nil, booleans, numbers, strings (binary-safe)
-- and tables of those, keyed by strings, numbers or booleans. Metatables
-- are not copied. A table containing itself raises "message has a cycle"; a
-- subtable referenced twice is copied twice (sharing is not preserved).
-- Functions, userdata and coroutines raise an error naming the field, e.g.
-- "msg.a.b is a function". Queues are unbounded in both directions.
--
-- A running thread keeps the loop alive; once it ended and its messages were
-- delivered nothing does.
local c = require "tamarco.c.thread"
local scheduler = require "tamarco.c.scheduler"

local thread = {}

thread.DEFAULT_STOP_TIMEOUT_MS = 3000

local Thread = {}
Thread.__index = Thread

local function check_fn(name, fn)
    if type(name) ~= "string" or name == "" then
        error("thread.start: name must be a non-empty string", 3)
    end
    if type(fn) ~= "function" then
        error(("thread.start: thread '%s' needs a function, got %s"):format(name, type(fn)), 3)
    end
    if debug.getinfo(fn, "S").what == "C" then
        error(("thread.start: thread '%s' needs a Lua function, not a C function"):format(name), 3)
    end
    local i = 1
    while true do
        local upname = debug.getupvalue(fn, i)
        if upname == nil then break end
        if upname ~= "_ENV" then
            error(("thread function '%s' captures upvalue '%s'; require what it needs inside the function")
                :format(name, upname), 3)
        end
        i = i + 1
    end
end

--- thread.start(name, fn[, options]) -> thread object, or nil, err when the
-- OS thread cannot be created. Raises on bad arguments. options.logger_name
-- names ctx.logger (default `<service>.<name>`).
function thread.start(name, fn, options)
    check_fn(name, fn)
    local logging = require "tamarco.core.logging"
    local logger_name = options and options.logger_name or (logging.get_logger().name .. "." .. name)
    local handle, err = c.start(name, string.dump(fn), logger_name)
    if not handle then return nil, err end
    handle:set_log_handler(function(record) logging.emit_thread_record(record, name) end)
    return setmetatable({ name = name, _handle = handle }, Thread)
end

function Thread:send(msg)
    return self._handle:send(msg)
end

function Thread:receive(timeout_ms)
    return self._handle:receive(timeout_ms)
end

function Thread:on_message(fn)
    if type(fn) ~= "function" then
        error(("thread '%s': on_message needs a function"):format(self.name), 2)
    end
    local spawn = scheduler.spawn
    self._handle:set_handler(function(msg) spawn(fn, msg) end)
    return self
end

function Thread:on_exit(fn)
    if type(fn) ~= "function" then
        error(("thread '%s': on_exit needs a function"):format(self.name), 2)
    end
    local spawn = scheduler.spawn
    self._handle:set_exit_handler(function(status, err) spawn(fn, status, err) end)
    return self
end

function Thread:stop(timeout_ms)
    self._handle:request_stop()
    return self._handle:join(timeout_ms or thread.DEFAULT_STOP_TIMEOUT_MS, true)
end

function Thread:join(timeout_ms)
    return self._handle:join(timeout_ms)
end

function Thread:status()
    return self._handle:status()
end

function Thread:error()
    return self._handle:error()
end

function Thread:detached()
    return self._handle:detached()
end

Thread.__tostring = function(t)
    return ("tamarco.thread '%s' (%s)"):format(t.name, t:status())
end

--- Encoding used for messages (exposed for tests and tools).
thread.encode = c.encode
thread.decode = c.decode

return thread
