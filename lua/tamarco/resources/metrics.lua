--- tamarco.resources.metrics: the `metrics` resource every service has.
--
-- It names the metrics after the service (metrics.set_namespace(service
-- name), or options.namespace), serves the Prometheus text exposition
-- (resource:exposition(), GET /metrics on the report server) and, every
-- collect_frequency seconds, hands the registry to the enabled reporters
-- from a task started at start and cancelled at stop.
--
-- Settings under system.resources.metrics (Tamarco's layout):
--   collect_frequency: 10            seconds between two reports (> 0)
--   naming: prometheus               or tamarco: Tamarco's metric names,
--                                    quantiles and carbon lines (see
--                                    tamarco.metrics); then /metrics is
--                                    served only with prometheus enabled:
--                                    true, as Tamarco did, carbon and stdout
--                                    lines are prefixed
--                                    <deploy_name>.<service>.<hostname>
--                                    unless a prefix is set, and the file
--                                    reporter writes carbon lines
--   handlers:
--     prometheus: { enabled: true }  GET /metrics (defined with the service;
--                                    when the service has a
--                                    tamarco_http_report_server)
--     carbon: { host: 127.0.0.1, port: 2003, prefix: <service>,
--               format: carbon, enabled: true }
--     file: { path: /tmp/tamarco_metrics, format: prometheus, enabled: true }
--     stdout: { format: carbon, enabled: true }
-- carbon, file and stdout are on when their section is present and
-- `enabled` is not false; prometheus is on unless `enabled` is false. A
-- section may also be just `true` or `false` (`prometheus: false`).
-- Formats and paths: see tamarco.core.metrics.reporters.
--
-- options of metrics_resource.new{...}: registry (default: the default
-- registry), namespace (default: the service name), stdout_stream (in
-- place of io.stdout, for tests).
local base = require "tamarco.core.resource"
local metrics = require "tamarco.core.metrics"
local prometheus = require "tamarco.core.metrics.prometheus"
-- reporters load only when a service turns one on
local reporters = setmetatable({}, { __index = function(_, k) return require("tamarco.core.metrics.reporters")[k] end })
local tasks = require "tamarco.core.tasks"

local Metrics = base.class("metrics")

Metrics.CONTENT_TYPE = prometheus.CONTENT_TYPE

--- Metrics:init(options): options.registry (default: the default registry), options.namespace.
function Metrics:init(options)
    base.Resource.init(self, options)
    self.registry = options.registry or metrics.default_registry
    self.reporters = {}
    self.collects = 0
    self.group = tasks.group()
end

--- Metrics:bind(service, name, settings_view, logger): also sets the name prefix (the
-- service's name unless options.namespace).
function Metrics:bind(service, name, settings_view, logger)
    base.Resource.bind(self, service, name, settings_view, logger)
    self.namespace = metrics.sanitize_name(self.options.namespace or service.name)
    if self.registry == metrics.default_registry then metrics.set_namespace(self.namespace) end
end

-- A handler's section: a mapping (on unless enabled: false), or just
-- true/false.
local function enabled(section, default)
    if type(section) == "boolean" then return section end
    if type(section) ~= "table" then return default end
    if section.enabled == nil then return true end
    return section.enabled == true or section.enabled == "true"
end

--- Reads the settings; builds the reporters (not connected yet).
function Metrics:_configure()
    local frequency = tonumber(self.settings:get("collect_frequency", 10))
    if not frequency or frequency <= 0 then
        error("system.resources." .. self.name .. ".collect_frequency must be a number of seconds > 0 (got "
            .. tostring(self.settings:get("collect_frequency", nil)) .. ")", 0)
    end
    self.collect_frequency = frequency
    local naming = self.settings:get("naming", "prometheus")
    if not metrics.NAMING_MODES[naming] then
        error("system.resources." .. self.name .. ".naming must be prometheus or tamarco (got "
            .. tostring(naming) .. ")", 0)
    end
    self.naming = naming
    self.registry:set_naming(naming)
    local tamarco_names = naming == "tamarco"
    local handlers = self.settings:get("handlers", {})
    if type(handlers) ~= "table" then handlers = {} end
    -- Tamarco served /metrics only when its prometheus handler was enabled
    self.prometheus_enabled = enabled(handlers.prometheus, not tamarco_names)
    if tamarco_names and type(handlers.prometheus) == "table" and handlers.prometheus.enabled == nil then
        self.prometheus_enabled = false
    end
    local list = {}
    local tamarco_prefix
    if tamarco_names then
        local svc = self.service
        local deploy = svc and svc.settings and svc.settings:get("deploy_name", nil) or "tamarco"
        tamarco_prefix = ("%s.%s.%s"):format(tostring(deploy), svc and svc.name or self.namespace,
            require("tamarco.c.process").hostname())
    end
    if enabled(handlers.carbon, false) then
        local c = handlers.carbon
        list[#list + 1] = reporters.carbon { host = c.host, port = c.port, prefix = c.prefix or tamarco_prefix,
                                             format = c.format, logger = self.logger }
    end
    if enabled(handlers.file, false) then
        local f = handlers.file
        list[#list + 1] = reporters.file { path = f.path or "/tmp/tamarco_metrics",
                                           format = f.format or (tamarco_names and "carbon" or nil),
                                           prefix = f.prefix, logger = self.logger }
    end
    if enabled(handlers.stdout, false) then
        local s = handlers.stdout
        list[#list + 1] = reporters.stdout { format = s.format, prefix = s.prefix or tamarco_prefix,
                                             stream = self.options.stdout_stream }
    end
    self.reporters = list
end

--- Metrics:pre_start(): reads the settings (naming, handlers, collect frequency).
function Metrics:pre_start()
    self:_configure()
end

--- The report server's `GET /metrics` answer (the route is defined with the
-- service, see tamarco.ops.default_resources, so that it survives
-- hot reloads): 404 when the prometheus handler is disabled.
function Metrics:http_response()
    if self.prometheus_enabled == false then return 404, { error = "prometheus metrics are disabled" } end
    return 200, self:exposition(), { ["Content-Type"] = prometheus.CONTENT_TYPE }
end

-- Hot reload: nothing of its own to take over; it keeps running.
Metrics.adopt = base.keep_on_reload

--- One report to every reporter now (the task calls it; so may tests).
function Metrics:collect()
    self.collects = self.collects + 1
    for _, reporter in ipairs(self.reporters) do
        local ok, err = pcall(reporter.report, reporter, self.registry, self.namespace)
        if not ok then
            self.logger:error("metrics reporter " .. reporter.name .. " failed: " .. tostring(err),
                { reporter = reporter.name })
        end
    end
end

--- Metrics:start(): opens the reporters and reports every `collect_frequency` seconds.
function Metrics:start()
    if not self.collect_frequency then self:_configure() end
    if #self.reporters == 0 then return end
    for _, reporter in ipairs(self.reporters) do reporter:open() end
    local interval_ms = self.collect_frequency * 1000
    self.task = self.group:spawn("metrics reporter", function()
        while true do
            tasks.sleep(interval_ms)
            self:collect()
        end
    end)
end

--- Metrics:stop(): stops the reporting task and closes the reporters.
function Metrics:stop()
    self.group:cancel_all()
    self.group:wait(2000)
    self.task = nil
    for _, reporter in ipairs(self.reporters) do reporter:close() end
end

--- The Prometheus text (format 0.0.4) of the registry, names prefixed with
-- the namespace; served with Metrics.CONTENT_TYPE.
function Metrics:exposition()
    return prometheus.exposition(self.registry, self.namespace)
end

--- Metrics:status() -> { status, collects, reporters = { name = status } }.
function Metrics:status()
    local dict = { status = self.status_code, collects = self.collects }
    if #self.reporters > 0 then
        dict.reporters = {}
        for _, reporter in ipairs(self.reporters) do dict.reporters[reporter.name] = reporter:status() end
    end
    return dict
end

return Metrics
