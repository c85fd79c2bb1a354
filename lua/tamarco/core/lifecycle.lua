--- tamarco.core.lifecycle: runs a service through Tamarco's phases.
--
-- Start-up: pre_start -> start -> post_start. In each start-up phase the
-- resources run first (in depends_on order), then the user's hook; tasks,
-- timers and threads start after the start phase. Stop: stop -> post_stop,
-- the user's hook first, then the resources in reverse order; tasks are
-- cancelled and drained and threads joined in the stop phase.
--
-- An error in a start-up phase stops what was started and ends the run
-- with the error's exit code (1 for a failing hook): never a half-started
-- service. Every method here runs inside a task.
local base = require "tamarco.core.resource"
local errors = require "tamarco.core.errors"
local service = require "tamarco.core.service"
local scheduler = require "tamarco.c.scheduler"
local tasks = require "tamarco.core.tasks"

local STATUS = base.STATUS
local START_PHASES = { "pre_start", "start", "post_start" }
local STOP_PHASES = { "stop", "post_stop" }

local lifecycle = {}
lifecycle.START_PHASES = START_PHASES
lifecycle.STOP_PHASES = STOP_PHASES

local Lifecycle = {}
Lifecycle.__index = Lifecycle

--- Orders the service's resources so that each comes after the ones it
-- depends on. Raises a "dependencies" error (exit 12) on an unknown name or
-- a cycle. Ties keep alphabetical order, so the order is reproducible;
-- the report server comes first.
function lifecycle.order_resources(svc)
    local order, state = {}, {}
    local function visit(name, path)
        if state[name] == "done" then return end
        if state[name] == "visiting" then
            path[#path + 1] = name
            errors.raise("dependencies", "resource dependencies form a cycle: " .. table.concat(path, " -> "))
        end
        state[name] = "visiting"
        path[#path + 1] = name
        local deps = svc.resources[name].depends_on or {}
        if type(deps) == "string" then deps = { deps } end
        local sorted = {}
        for _, dep in ipairs(deps) do sorted[#sorted + 1] = dep end
        table.sort(sorted)
        for _, dep in ipairs(sorted) do
            if not svc.resources[dep] then
                errors.raise("dependencies", "resource '" .. name .. "' depends on unknown resource '"
                    .. tostring(dep) .. "' (service '" .. svc.name .. "' has: "
                    .. table.concat(svc.resource_names, ", ") .. ")")
            end
            visit(dep, path)
        end
        path[#path] = nil
        state[name] = "done"
        order[#order + 1] = name
    end
    -- the report server first: /status answers (503) while the others connect
    if svc.resources.tamarco_http_report_server then visit("tamarco_http_report_server", {}) end
    for _, name in ipairs(svc.resource_names) do visit(name, {}) end
    return order
end

--- lifecycle.add_configured_resources(svc, store): adds the resources the
-- settings ask for and the service did not define (through the provider
-- installed in tamarco.core.service, see tamarco.ops.default_resources).
function lifecycle.add_configured_resources(svc, store)
    local provider = service.resource_provider()
    if provider then provider.add_configured(svc, store) end
end

--- lifecycle.new(svc, context) -> lifecycle. context fields:
--   settings  the settings store (tamarco.core.settings)
--   logging   the logging module (tamarco.core.logging)
--   stop_timeout_ms  how long cancelled tasks may take to end (default 30000)
--   on_stop_requested  function(reason) called once when a stop is asked for
-- Binds the service to its settings, logger and resources.
function lifecycle.new(svc, context)
    lifecycle.add_configured_resources(svc, context.settings)
    local self = setmetatable({
        service = svc,
        context = context,
        state = "new",
        order = lifecycle.order_resources(svc),
        entered = {},
        group = tasks.group(),
        -- tasks get half of the stop budget, so resources can still stop
        -- before the watchdog ends the process
        stop_timeout_ms = (context.stop_timeout_ms or 30000) / 2,
    }, Lifecycle)
    self:bind_service(svc)
    for _, name in ipairs(self.order) do self:bind_resource(svc, name, svc.resources[name]) end
    return self
end

--- Gives a service its lifecycle, settings view and logger.
function Lifecycle:bind_service(svc)
    svc.lifecycle = self
    svc.settings = self.context.settings:view(svc.name)
    svc.logger = self.context.logging.get_logger(svc.name)
    tasks.log_failures_to(svc.logger)
end

--- The settings a resource was started with (both of its subtrees), to
-- tell on a reload whether they changed.
function lifecycle.resource_settings(store, service_name, name)
    return {
        shared = store:get("system.resources." .. name, nil),
        own = store:get("system.microservices." .. service_name .. ".resources." .. name, nil),
    }
end

function Lifecycle:bind_resource(svc, name, resource)
    local store = self.context.settings
    resource:bind(svc, name, store:resource_view(svc.name, name),
        self.context.logging.get_logger(svc.name .. "." .. name))
    resource.settings_snapshot = lifecycle.resource_settings(store, svc.name, name)
end

local function capture(err)
    return { error = err, traceback = debug.traceback("", 2) }
end

-- Calls target[phase](target) when defined; returns true or false, failure
-- where failure = { error = ..., traceback = ... }.
local function call_phase(target, phase)
    local fn = target[phase]
    if fn == nil then return true end
    return xpcall(fn, capture, target)
end
lifecycle.call_phase = call_phase

-- Failures whose message says everything (a setting, a port, an order of
-- resources): their traceback would only show the framework's insides.
local SELF_EXPLAINED = { settings = true, bind = true, dependencies = true }

function Lifecycle:log_failure(what, failure)
    local err = failure.error
    if errors.is(err) and SELF_EXPLAINED[err.kind] then
        self.service.logger:error(what .. " failed: " .. tostring(err), { error = tostring(err) })
        return
    end
    self.service.logger:exception(what .. " failed: " .. tostring(err), err, failure.traceback)
end

--- Runs a start-up phase of one resource; returns true or false, failure.
function Lifecycle:start_resource_phase(name, resource, phase)
    self.entered[name] = true
    if phase == "start" and resource.status_code == STATUS.NOT_STARTED then
        resource:set_status(STATUS.CONNECTING)
    end
    local ok, failure = call_phase(resource, phase)
    if not ok then
        resource:set_status(STATUS.FAILED)
        self:log_failure(phase .. " of resource '" .. name .. "'", failure)
        return false, failure
    end
    if phase == "start" and resource.status_code == STATUS.CONNECTING and not resource.manages_status then
        resource:set_status(STATUS.STARTED)
    end
    return true
end

--- Runs a stop phase of one resource; errors are logged.
function Lifecycle:stop_resource_phase(name, resource, phase)
    if phase == "stop" then resource:set_status(STATUS.STOPPING) end
    local ok, failure = call_phase(resource, phase)
    if not ok then self:log_failure(phase .. " of resource '" .. name .. "'", failure) end
    if phase == "stop" then resource:set_status(ok and STATUS.STOPPED or STATUS.FAILED) end
end

-- Runs one start-up phase; returns true or false, failure.
function Lifecycle:run_start_phase(phase)
    local svc = self.service
    for _, name in ipairs(self.order) do
        local ok, failure = self:start_resource_phase(name, svc.resources[name], phase)
        if not ok then return false, failure end
    end
    local ok, failure = call_phase(svc, phase)
    if not ok then
        self:log_failure(phase .. " hook of service '" .. svc.name .. "'", failure)
        return false, failure
    end
    if phase == "start" then
        self.user_started = true
        self:start_tasks()
    end
    return true
end

--- Starts the service. Returns true, or nil and the exit code after having
-- stopped everything that was started.
function Lifecycle:start()
    local svc = self.service
    assert(self.state == "new", "a service lifecycle starts once")
    self.state = "starting"
    svc.logger:info("starting service", { phase = "start" })
    for _, phase in ipairs(START_PHASES) do
        local ok, failure = self:run_start_phase(phase)
        if not ok then
            if self.context.on_stop_requested then self.context.on_stop_requested("start-up failed") end
            self:stop("start-up failed")
            return nil, errors.exit_code_of(failure.error), failure.error
        end
        if self.stop_reason then
            svc.logger:info("stop requested during start-up: " .. self.stop_reason)
            self:stop(self.stop_reason)
            return nil, 0
        end
    end
    self.state = "running"
    svc.logger:info("service started", { instance_id = svc.instance_id })
    return true
end

function Lifecycle:start_tasks()
    local svc = self.service
    self.group = tasks.group()
    for _, def in ipairs(svc.task_definitions) do
        if def.kind == "task" then
            self.group:spawn(def.name, def.fn, svc)
        elseif def.kind == "task_timer" then
            self.group:spawn(def.name, tasks.timer_body(def.options, def.fn, svc))
        elseif def.kind == "thread" then
            local thread = require "tamarco.core.thread"
            local handle, err = thread.start(def.name, def.fn)
            if not handle then error("cannot start thread '" .. def.name .. "': " .. tostring(err), 0) end
            handle:on_exit(function(status, thread_error)
                if status == "failed" then
                    svc.logger:error("thread '" .. def.name .. "' failed: " .. tostring(thread_error),
                        { thread = def.name })
                end
            end)
            svc.threads[def.name] = handle
        end
    end
end

function Lifecycle:stop_tasks()
    local svc = self.service
    self.group:cancel_all()
    local ok, _, names = self.group:wait(self.stop_timeout_ms)
    if not ok then
        svc.logger:warning("tasks still running after " .. self.stop_timeout_ms .. " ms: "
            .. table.concat(names, ", "))
    end
    -- Threads are asked to stop together, so the join budget is 3 s overall.
    local joins = tasks.group()
    for name, thread in pairs(svc.threads) do
        joins:spawn("stop thread " .. name, function()
            local joined, err = thread:stop(3000)
            if not joined then
                svc.logger:warning("thread '" .. name .. "' did not stop within 3 s (" .. tostring(err)
                    .. "); it is left behind")
            end
        end)
    end
    joins:wait()
    svc.threads = {}
end

--- Stops what was started: the user's hook, then tasks and threads, then the
-- resources in reverse order, for stop and post_stop. Errors are logged and
-- do not interrupt the sequence.
function Lifecycle:stop(reason)
    local svc = self.service
    if self.state == "stopping" or self.state == "stopped" then return end
    self.state = "stopping"
    svc.logger:info("stopping service", { reason = reason })
    for _, phase in ipairs(STOP_PHASES) do
        if self.user_started then
            local ok, failure = call_phase(svc, phase)
            if not ok then self:log_failure(phase .. " hook of service '" .. svc.name .. "'", failure) end
        end
        if phase == "stop" then self:stop_tasks() end
        for i = #self.order, 1, -1 do
            local name = self.order[i]
            if self.entered[name] then
                self:stop_resource_phase(name, svc.resources[name], phase)
            end
        end
    end
    self.state = "stopped"
    svc.logger:info("service stopped")
end

--- Stops and starts one resource in place (restart policy). Returns true,
-- or false when it failed to start again (it is then FAILED).
function Lifecycle:restart_resource(name)
    local resource = self.service.resources[name]
    for _, phase in ipairs(STOP_PHASES) do self:stop_resource_phase(name, resource, phase) end
    resource:set_status(STATUS.NOT_STARTED)
    for _, phase in ipairs(START_PHASES) do
        if not self:start_resource_phase(name, resource, phase) then return false end
    end
    return true
end

--- Asks for a stop (signal, or the service itself). Safe to call from any
-- context, several times; the first reason wins.
function Lifecycle:request_stop(reason)
    if self.stop_reason then
        self.service.logger:info("stop already in progress (" .. tostring(reason) .. ")")
        return
    end
    self.stop_reason = reason or "requested"
    if self.context.on_stop_requested then self.context.on_stop_requested(self.stop_reason) end
    -- a resource still waiting for its peer at start-up stops waiting
    if self.state == "starting" then
        for _, name in ipairs(self.order) do
            local resource = self.service.resources[name]
            if resource.cancel_start then resource:cancel_start(self.stop_reason) end
        end
    end
    if self.waiter then scheduler.wake(self.waiter) end
end

--- Starts the service, waits for a stop request, stops it. Returns the exit
-- code: 0 for a clean stop, else the start-up failure's code.
function Lifecycle:run()
    local ok, code, err = self:start()
    if not ok then return code, err end
    if not self.stop_reason then
        self.waiter = scheduler.current()
        scheduler.suspend("service running until stopped")
        self.waiter = nil
    end
    self:stop(self.stop_reason)
    return self.exit_code or 0
end

return lifecycle
