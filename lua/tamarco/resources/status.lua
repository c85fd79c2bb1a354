--- tamarco.resources.status: `GET /status` on the report server and the
-- restart policies.
--
-- The body maps each resource's name to its status dict (`{status = code}`
-- plus what the resource adds; never secrets). HTTP status: 200 when every
-- resource is STARTED, 500 when any is STOPPED or FAILED, and 503 while any
-- is still CONNECTING or STOPPING. `log_sinks` (when remote log sinks are
-- on) shows each sink's state; see tamarco.ops.log_sinks. (Tamarco answered 102 in that case; 102 is
-- an interim response in HTTP/1.1 that clients and Kubernetes probes wait
-- past, so a final 503 says "not ready" without hanging them.)
--
-- Restart policies, checked every second (settings under
-- system.resources.status.restart_policy.resources):
--   restart_microservice_on_failure  list of resource names or "all": when one
--       is FAILED the service stops with exit code 1, for its supervisor
--       (systemd, Kubernetes, --workers) to start it again;
--   restart_resource_on_failure      list or "all": a FAILED resource is
--       stopped and started again in place.
local base = require "tamarco.core.resource"
local health = require "tamarco.core.health"
local logging = require "tamarco.core.logging"
local tasks = require "tamarco.core.tasks"

local STATUS = base.STATUS

local Status = base.class("status")

--- Status:init(options): depends on the report server.
function Status:init(options)
    base.Resource.init(self, options)
    self.depends_on = { "tamarco_http_report_server" }
end

--- The report server's `GET /status` answer (the route is defined with the
-- service, see tamarco.ops.default_resources).
function Status:http_response()
    return self:report()
end

--- The statuses of every resource of the service: name -> dict, and the
-- HTTP status that summarises them.
function Status:report()
    local body, any_down, all_started = {}, false, true
    local svc = self.service
    for _, name in ipairs(svc.resource_names) do
        local resource = svc.resources[name]
        local dict = resource:status()
        body[name] = logging.mask(dict)   -- a URL with a password in it, a mistaken field
        local code = dict.status
        if code == STATUS.STOPPED or code == STATUS.FAILED then any_down = true end
        if code ~= STATUS.STARTED then all_started = false end
    end
    -- the process's other parts (the remote log sinks: unhealthy only when
    -- the settings say so, system.logging.unhealthy_on_sink_failure)
    local parts, parts_unhealthy = health.report()
    for name, part in pairs(parts or {}) do
        if body[name] == nil then body[name] = part end
    end
    if parts_unhealthy then any_down = true end
    local http_status = any_down and 500 or (all_started and 200 or 503)
    return http_status, body
end

-- Hot reload: nothing of its own to take over; it keeps running.
Status.adopt = base.keep_on_reload

local function listed(policy, name)
    if policy == "all" then return true end
    if type(policy) ~= "table" then return false end
    for _, entry in ipairs(policy) do
        if entry == name or entry == "all" then return true end
    end
    return false
end

--- Status:check_policies(): applies the restart policies to the FAILED resources (stop the
-- service with exit 1, or restart the resource in place).
function Status:check_policies()
    local svc = self.service
    local restart_service = self.settings:get("restart_policy.resources.restart_microservice_on_failure", {})
    local restart_resource = self.settings:get("restart_policy.resources.restart_resource_on_failure", {})
    for _, name in ipairs(svc.resource_names) do
        local resource = svc.resources[name]
        if resource.status_code == STATUS.FAILED then
            if listed(restart_service, name) then
                self.logger:error("resource '" .. name .. "' failed: stopping the service to be restarted",
                    { resource = name })
                svc.lifecycle.exit_code = 1
                svc.lifecycle:request_stop("resource " .. name .. " failed")
                return
            elseif listed(restart_resource, name) then
                self.logger:warning("resource '" .. name .. "' failed: restarting it", { resource = name })
                svc.lifecycle:restart_resource(name)
            end
        end
    end
end

--- Status:post_start(): checks the restart policies every `check_interval_ms`.
function Status:post_start()
    local interval = self.settings:get("check_interval_ms", 1000)
    self.checker = require("tamarco.c.scheduler").spawn(function()
        while true do
            tasks.sleep(interval)
            self:check_policies()
        end
    end)
end

--- Status:stop(): stops checking the restart policies.
function Status:stop()
    if self.checker then tasks.cancel(self.checker) end
    self.checker = nil
end

return Status
