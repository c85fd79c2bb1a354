--- tamarco.ops.reload: hot reload of a running service's Lua code.
--
-- The new code is loaded and validated first; nothing of the old service is
-- touched until it is. Then, in order:
--   1. resources that are new, or whose type or settings changed, run their
--      start-up phases (the old ones keep serving meanwhile);
--   2. the old user hooks stop (stop, post_stop) and its tasks, timers and
--      threads are cancelled and drained;
--   3. resources that stay take over the new definitions (routes, handlers)
--      and keep their connections (Resource:adopt);
--   4. the new start hooks run and the new tasks start;
--   5. the old resources that were replaced or removed stop.
-- If 1 or 4 fails, everything new is stopped, adopted definitions are given
-- back, and the old code's start hooks and tasks run again: the old version
-- keeps serving. Requests in flight finish on the code they started on (their
-- coroutines hold the old handler functions).
local errors = require "tamarco.core.errors"
local lifecycle = require "tamarco.core.lifecycle"
local scheduler = require "tamarco.c.scheduler"
local service_file = require "tamarco.core.service_file"

local reload = {}

local function same(a, b)
    if a == b then return true end
    if type(a) ~= "table" or type(b) ~= "table" then return false end
    for k, v in pairs(a) do if not same(v, b[k]) then return false end end
    for k in pairs(b) do if a[k] == nil then return false end end
    return true
end

-- Forgets the modules loaded from the service's directory so that the new
-- code's `require`s load their new versions.
local function forget_service_modules(dir)
    local template = dir .. "/?.lua;" .. dir .. "/?/init.lua"
    for name in pairs(package.loaded) do
        if type(name) == "string" and package.searchpath(name, template) then
            package.loaded[name] = nil
        end
    end
end

-- Classifies each resource of the new service: "adopt" (same type, same
-- settings, adoptable), or "start" (new or changed). Old ones missing from
-- the plan's adopt list are stopped at the end.
local function plan(cycle, new_svc)
    local old_svc = cycle.service
    local store = cycle.context.settings
    local decisions = {}
    for _, name in ipairs(new_svc.resource_names) do
        local old, new = old_svc.resources[name], new_svc.resources[name]
        -- same type by name: the class itself may come from a reloaded module
        local unchanged = old and old.type_name == new.type_name
            and same(old.options, new.options)
            and same(old.settings_snapshot, lifecycle.resource_settings(store, new_svc.name, name))
        decisions[name] = unchanged and "adopt" or "start"
    end
    return decisions
end

local function run_user_phases(cycle, svc, phases)
    for _, phase in ipairs(phases) do
        local ok, failure = lifecycle.call_phase(svc, phase)
        if not ok then
            cycle:log_failure(phase .. " hook of service '" .. svc.name .. "' (reload)", failure)
            return false, failure
        end
        if phase == "start" then cycle:start_tasks() end
    end
    return true
end

--- reload.reload(cycle, path) -> true, or nil, message. Runs inside a task.
function reload.reload(cycle, path)
    local old_svc = cycle.service
    local logger = old_svc.logger
    if cycle.state ~= "running" then
        return nil, "service is " .. cycle.state .. ", not running"
    end
    logger:info("reloading service code", { file = path })

    -- Load and validate the new code; the old service is untouched so far.
    local dir = path:match("^(.*)/[^/]*$") or "."
    local saved_loaded = {}
    for k, v in pairs(package.loaded) do saved_loaded[k] = v end
    forget_service_modules(dir)
    local ok, new_svc = pcall(service_file.load, path)
    local order
    if ok then
        if new_svc.name ~= old_svc.name then
            ok, new_svc = false, errors.new("service_file", "the reloaded file defines service '" .. new_svc.name
                .. "', not '" .. old_svc.name .. "'")
        else
            lifecycle.add_configured_resources(new_svc, cycle.context.settings)
            ok, order = pcall(lifecycle.order_resources, new_svc)
            if not ok then new_svc = order end
        end
    end
    if not ok then
        for k in pairs(package.loaded) do package.loaded[k] = nil end
        for k, v in pairs(saved_loaded) do package.loaded[k] = v end
        local message = errors.is(new_svc) and new_svc.message or tostring(new_svc)
        logger:error("reload failed, the old code keeps running: " .. message)
        return nil, message
    end

    cycle.state = "reloading"
    new_svc.instance_id = old_svc.instance_id
    local decisions = plan(cycle, new_svc)
    local old_order, old_entered, old_group = cycle.order, cycle.entered, cycle.group

    -- 1. Start the resources that are new or changed, beside the old ones.
    cycle.service, cycle.order, cycle.entered = new_svc, order, {}
    cycle:bind_service(new_svc)
    local started = {}
    local failure
    for _, name in ipairs(order) do
        if decisions[name] == "start" then cycle:bind_resource(new_svc, name, new_svc.resources[name]) end
    end
    for _, phase in ipairs(lifecycle.START_PHASES) do
        for _, name in ipairs(order) do
            if decisions[name] == "start" and not failure then
                started[name] = true
                local phase_ok, phase_failure = cycle:start_resource_phase(name, new_svc.resources[name], phase)
                if not phase_ok then failure = phase_failure end
            end
        end
    end

    -- 2. Stop the old user code.
    local undo = {}
    local old_stopped = false
    if not failure then
        old_stopped = true
        cycle.service = old_svc
        cycle.group = old_group
        for _, phase in ipairs(lifecycle.STOP_PHASES) do
            local hook_ok, hook_failure = lifecycle.call_phase(old_svc, phase)
            if not hook_ok then cycle:log_failure(phase .. " hook of the old code (reload)", hook_failure) end
            if phase == "stop" then cycle:stop_tasks() end
        end
        cycle.service = new_svc
        cycle:bind_service(new_svc)

        -- 3. Resources that stay take the new definitions.
        for _, name in ipairs(order) do
            if decisions[name] == "adopt" then
                local old_resource, new_resource = old_svc.resources[name], new_svc.resources[name]
                local undo_fn = old_resource:adopt(new_resource)
                if undo_fn then
                    undo[name] = undo_fn
                    new_svc.resources[name] = old_resource
                    new_svc[name] = old_resource
                    old_resource.service = new_svc
                    cycle.entered[name] = true
                else
                    decisions[name] = "start"
                    cycle:bind_resource(new_svc, name, new_resource)
                    for _, phase in ipairs(lifecycle.START_PHASES) do
                        if not failure then
                            started[name] = true
                            local phase_ok, phase_failure = cycle:start_resource_phase(name, new_resource, phase)
                            if not phase_ok then failure = phase_failure end
                        end
                    end
                end
            end
        end

        -- 4. The new start hooks and tasks.
        if not failure then
            local hooks_ok, hooks_failure = run_user_phases(cycle, new_svc, lifecycle.START_PHASES)
            if not hooks_ok then failure = hooks_failure end
        end
    end

    if failure then
        -- Roll back to the old code.
        if old_stopped then cycle:stop_tasks() end
        for name, undo_fn in pairs(undo) do
            undo_fn()
            old_svc.resources[name].service = old_svc
        end
        for i = #order, 1, -1 do
            local name = order[i]
            if started[name] then
                for _, phase in ipairs(lifecycle.STOP_PHASES) do
                    cycle:stop_resource_phase(name, new_svc.resources[name], phase)
                end
            end
        end
        cycle.service, cycle.order, cycle.entered = old_svc, old_order, old_entered
        cycle:bind_service(old_svc)
        if old_stopped then
            -- the old hooks were stopped: run them again
            run_user_phases(cycle, old_svc, lifecycle.START_PHASES)
        end
        for k in pairs(package.loaded) do package.loaded[k] = nil end
        for k, v in pairs(saved_loaded) do package.loaded[k] = v end
        cycle.state = "running"
        local message = tostring(failure.error)
        logger:error("reload failed, the old code keeps running: " .. message)
        return nil, message
    end

    -- 5. Stop the old resources that were replaced or removed.
    for i = #old_order, 1, -1 do
        local name = old_order[i]
        if old_entered[name] and not undo[name] then
            for _, phase in ipairs(lifecycle.STOP_PHASES) do
                cycle:stop_resource_phase(name, old_svc.resources[name], phase)
            end
        end
    end
    cycle.reloads = (cycle.reloads or 0) + 1
    cycle.state = "running"
    new_svc.logger:info("service code reloaded", { reloads = cycle.reloads })
    return true
end

--- reload.request(cycle, path, reason): asks for a reload from any context
-- (signal handler, file watch, settings change). Reloads never overlap:
-- requests that arrive during one are merged into one more reload after it.
function reload.request(cycle, path, reason)
    if cycle.reload_running then
        cycle.reload_pending = reason
        return
    end
    cycle.reload_running = true
    scheduler.spawn(function()
        local current = reason
        while current do
            cycle.service.logger:info("reload requested: " .. tostring(current))
            reload.reload(cycle, path)
            current, cycle.reload_pending = cycle.reload_pending, nil
        end
        cycle.reload_running = false
    end)
end

--- reload.watch_files(dir, on_change) -> watcher with :close(). Calls
-- on_change(filename) (outside a task) when a .lua file in dir changes, at
-- most once per 100 ms burst of events (editors write in several steps).
function reload.watch_files(dir, on_change)
    local uv = require "luv"
    local event = uv.new_fs_event()
    local debounce = uv.new_timer()
    local changed
    event:start(dir, {}, function(err, filename)
        if err or not filename or not filename:match("%.lua$") then return end
        changed = filename
        debounce:stop()
        debounce:start(100, 0, function() on_change(changed) end)
    end)
    return {
        close = function()
            if not event:is_closing() then event:close() end
            if not debounce:is_closing() then debounce:close() end
        end,
    }
end

--- Does a settings key fall under one of the service's reload-worthy keys?
-- reload_on lists full keys ("system.x.y") or keys relative to the service
-- ("feature" = system.microservices.<svc>.feature or system.feature).
function reload.is_reload_key(svc, key)
    for _, watched in ipairs(svc.definition.reload_on or {}) do
        local candidates = watched:match("^system%.") and { watched }
            or { "system.microservices." .. svc.name .. "." .. watched, "system." .. watched }
        for _, prefix in ipairs(candidates) do
            if key == prefix or key:sub(1, #prefix + 1) == prefix .. "." then return true end
        end
    end
    return false
end

return reload
