--- tamarco.ops.default_resources: the resources every service run by the
-- host gets without listing them, and those its settings ask for. The run
-- and test commands install this module into tamarco.core.service
-- (`install()`), so the core names no resource.
local service = require "tamarco.core.service"

local default_resources = {}

--- Tamarco's resources every service gets unless it defines them itself or
-- says `report_server = false`: the report HTTP server (settings
-- system.resources.tamarco_http_report_server.{host,port}, default
-- 127.0.0.1:5747), `status` (GET /status), `metrics` (GET /metrics), and
-- `profiler` and `memory` (off unless the service is listed in their
-- settings; nothing is loaded when off), and `tamarco_debug` (the /debug
-- pages and the console, off unless turned on; run-time log levels).
function default_resources.add_defaults(self)
    local defaults = {
        tamarco_http_report_server = function() return require("tamarco.resources.http_server").new() end,
        status = function() return require("tamarco.resources.status").new() end,
        metrics = function() return require("tamarco.resources.metrics").new() end,
        profiler = function() return require("tamarco.resources.profiler").new() end,
        memory = function() return require("tamarco.resources.memory").new() end,
        tamarco_debug = function() return require("tamarco.ops.debug.resource").new() end,
    }
    for _, name in ipairs({ "tamarco_http_report_server", "status", "metrics", "profiler", "memory",
                            "tamarco_debug" }) do
        if not self.resources[name] then
            local resource = defaults[name]()
            self.resources[name] = resource
            self.resource_names[#self.resource_names + 1] = name
            self[name] = resource
        end
    end
    -- Routes are part of the definition (they move to the running server on
    -- a hot reload); resources are looked up when a request comes.
    local server = self.resources.tamarco_http_report_server
    if os.getenv("TAMARCO_WORKER") and os.getenv("TAMARCO_NOTIFY_FD") and server.listen_override == nil then
        require("tamarco.ops.workers_report").make_private(server)   -- the supervisor serves for all
    end
    if server.get then
        server:get("/status", function() return self.resources.status:http_response() end)
        server:get("/metrics", function() return self.resources.metrics:http_response() end)
        require("tamarco.ops.debug.routes").define(server, self)   -- 404 unless turned on
    end
end

--- default_resources.add_configured(svc, store): adds what the settings
-- ask for and the service did not define: the service registry when
-- `system.resources.registry.enabled` (or the service's own
-- `system.microservices.<svc>.resources.registry.enabled`) is true.
function default_resources.add_configured(svc, store)
    if svc.resources.registry then return end
    local enabled = store:get("system.microservices." .. svc.name .. ".resources.registry.enabled", nil)
    if enabled == nil then enabled = store:get("system.resources.registry.enabled", false) end
    if enabled == true then
        service.add_resource(svc, "registry", require("tamarco.resources.registry").new())
    end
end

--- default_resources.install(): services defined from now on get these.
function default_resources.install()
    service.set_resource_provider(default_resources)
end

return default_resources
