--- tamarco: the public entry point of the framework's Lua side.
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local process = require "tamarco.c.process"
local tasks = require "tamarco.core.tasks"

local tamarco = {
    VERSION = process.version,
    --- Yields the running task for `ms` milliseconds (a cancellation point).
    sleep = tasks.sleep,
    --- Raises when the running task was cancelled (for long loops).
    checkpoint = tasks.checkpoint,
    --- Starts `fn(...)` in a new task (coroutine) on the next loop turn; returns it.
    spawn = scheduler.spawn,
    --- Milliseconds of the loop's monotonic clock.
    now = timer.now,
    --- Wall clock seconds.
    time = timer.time,
}

--- Creates a service table: `tamarco.service { name = "hello", resources = {...} }`.
function tamarco.service(definition)
    return require("tamarco.core.service").new(definition)
end

return tamarco
