--- tamarco.testing: run tasks and whole services inside a spec.
--
-- Specs run in `tamarco-host test` on the host's main state, outside the
-- loop. `testing.run(fn)` starts fn as a task and turns the loop until it
-- ends, so a spec reads sequentially while fn sleeps and does I/O.
local scheduler = require "tamarco.c.scheduler"
local process = require "tamarco.c.process"
local timer = require "tamarco.c.timer"
local tasks = require "tamarco.core.tasks"

local testing = {}

--- Runs fn(...) as a task until it returns; returns its results or raises its
-- error (with the task's traceback). `testing.timeout_ms` bounds the wait.
testing.timeout_ms = 20000

--- testing.run(fn, ...) -> fn's results. Runs fn(...) as a task and turns the loop until it
-- returns; raises its error (with the task's traceback), or after `testing.timeout_ms`.
function testing.run(fn, ...)
    local ok, results, traceback = tasks.run_until_done(fn, testing.timeout_ms, ...)
    if ok == nil then
        error(("testing.run: task did not finish within %d ms"):format(testing.timeout_ms), 2)
    end
    if not ok then error(tostring(results) .. "\n" .. tostring(traceback), 0) end
    return unpack(results, 1, results.n)
end

--- Turns the loop for about `ms` milliseconds (for callbacks to happen).
function testing.turn(ms)
    testing.run(timer.sleep, ms or 0)
end

--- testing.wait_until(condition[, ms[, step_ms]]) -> the truthy value
-- condition() returned, or false when it stayed falsy for ms milliseconds
-- (default 5000), polled every step_ms (default 10). Call inside a task.
function testing.wait_until(condition, ms, step_ms)
    local deadline = timer.now() + (ms or 5000)
    while true do
        local value = condition()
        if value then return value end
        if timer.now() >= deadline then return false end
        require("tamarco.core.tasks").sleep(step_ms or 10)
    end
end

--- testing.loop_turns(fn, ...) -> the number of loop turns fn(...) took,
-- then fn's results. 0 means it returned without ever yielding to the loop:
-- how a spec says "fails at once" without timing it.
function testing.loop_turns(fn, ...)
    local uv = require "luv"
    local turns = 0
    local check = uv.new_check()
    check:start(function() turns = turns + 1 end)
    local results = (function(...) return { n = select("#", ...), ... } end)(fn(...))
    check:stop()
    check:close()
    return turns, unpack(results, 1, results.n)
end

--- A service started in-process by start_service.
local Running = {}
Running.__index = Running

--- testing.start_service(svc_or_path[, options]) -> running, or nil, failure,
-- exit_code. failure is a tamarco error whose message says why and with
-- which exit code (`missing setting '...' (exit code 2)`), so that
-- `assert(testing.start_service(svc))` fails with the reason; failure.kind,
-- failure.exit_code and the original error's fields (key, file, line) are kept.
-- Call inside testing.run. Runs the service's start-up phases with its own
-- settings dict under `options.settings` (a nested table in Tamarco's
-- layout) and an optional `options.yaml_file`. Log records are kept in
-- `running.records` (and printed when options.log_stdout is true).
function testing.start_service(svc, options)
    options = options or {}
    local lifecycle = require "tamarco.core.lifecycle"
    local logging = require "tamarco.core.logging"
    local settings = require "tamarco.core.settings"
    if type(svc) == "string" then svc = require("tamarco.core.service_file").load(svc) end
    -- Test defaults < the service's own dict < the YAML file < the spec's
    -- settings. The report server takes a free port so that specs and a
    -- running service never compete for 5747.
    local store = assert(settings.load {
        defaults = { system = { resources = { tamarco_http_report_server = { port = 0 } } } },
        dict = svc.definition.settings,
        yaml_file = options.yaml_file or false,
        environ = false,
    })
    if options.settings then
        assert(store:add_source(settings.static_source("spec", options.settings)))
    end
    local records = {}
    logging.configure {
        service_name = svc.name,
        deploy_name = store:get("system.deploy_name", "tamarco"),
        instance_id = svc.instance_id,
        profile = options.profile or "TESTING",
        stdout = options.log_stdout or false,
    }
    -- one capturing sink at a time: the last started service's records
    if testing.sink then logging.remove_sink(testing.sink) end
    testing.sink = { name = "testing", emit = function(_, record) records[#records + 1] = record end }
    logging.add_sink(testing.sink)
    local cycle = lifecycle.new(svc, { settings = store, logging = logging,
        stop_timeout_ms = options.stop_timeout_ms or 5000 })
    local ok, code, err = cycle:start()
    if not ok then return nil, testing.start_failure(code, err), code end
    return setmetatable({ service = svc, lifecycle = cycle, settings = store, records = records }, Running)
end

--- testing.start_failure(code, err) -> the failure start_service returns.
function testing.start_failure(code, err)
    local errors = require "tamarco.core.errors"
    local message
    if errors.is(err) then
        message = err.message
    elseif type(err) == "table" and err.error ~= nil then   -- { error =, traceback = }
        message = tostring(err.error) .. (err.traceback and ("\n" .. tostring(err.traceback)) or "")
    elseif err == nil then
        message = "the start-up was stopped"
    else
        message = tostring(err)
    end
    local failure = errors.new(errors.is(err) and err.kind or "runtime",
        ("%s (exit code %s)"):format(message, tostring(code)))
    if errors.is(err) then
        for k, v in pairs(err) do
            if failure[k] == nil then failure[k] = v end
        end
    end
    failure.exit_code = code
    failure.error = err
    return failure
end

--- Stops the service: stop and post_stop phases, tasks drained.
function Running:stop(reason)
    self.lifecycle:stop(reason or "test finished")
end

--- The log records whose message contains `text` (plain match).
function Running:logged(text)
    local found = {}
    for _, record in ipairs(self.records) do
        if tostring(record.message):find(text, 1, true) then found[#found + 1] = record end
    end
    return found
end

return testing
