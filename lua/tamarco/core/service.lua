--- tamarco.core.service: the service table a service file returns.
--
--   local svc = tamarco.service { name = "hello", resources = { ... }, settings = { ... } }
--   function svc:start() ... end
--   svc:task("name", fn); svc:task_timer({ interval = 1000 }, "tick", fn); svc:thread("t", fn)
--   return svc
--
-- Definition only: running it is tamarco.core.lifecycle's job.
local errors = require "tamarco.core.errors"
local process = require "tamarco.c.process"

local service = {}

-- What a service gets beyond its definition (the report server, /status,
-- /metrics, ...) is the host's composition, not the core's: the run and test
-- commands install tamarco.ops.default_resources here.
local resource_provider = nil

local Service = {}
Service.__index = Service
service.Service = Service

service.HOOKS = { "pre_start", "start", "post_start", "stop", "post_stop", "on_settings_change" }
local hook_set = {}
for _, hook in ipairs(service.HOOKS) do hook_set[hook] = true end

-- Fields of the service table a resource name may not shadow.
local reserved = {
    name = true, instance_id = true, settings = true, logger = true, resources = true,
    definition = true, threads = true, lifecycle = true, resource_names = true, report_server = true,
    task_definitions = true, task_names = true,
}
for k in pairs(Service) do reserved[k] = true end

local function caller_position(level)
    local info = debug.getinfo(level + 1, "Sl")
    if info and info.currentline and info.currentline > 0 then
        return info.short_src .. ":" .. info.currentline .. ": "
    end
    return ""
end

local function definition_error(message, level)
    errors.raise("service_file", caller_position(level + 1) .. message)
end

--- service.new{ name = ..., resources = { name = resource }, settings = dict }
function service.new(definition)
    if type(definition) ~= "table" then
        definition_error("tamarco.service expects a table { name = ..., resources = {...} }", 2)
    end
    local name = definition.name
    if type(name) ~= "string" or not name:match("^[%a][%w_%-]*$") then
        definition_error("service name must be a string of letters, digits, '_' or '-' starting with a letter (got "
            .. tostring(name) .. ")", 2)
    end
    local self = setmetatable({
        name = name,
        instance_id = process.uuid4(),
        definition = definition,
        resources = {},
        resource_names = {},
        task_definitions = {},
        task_names = {},
        threads = {},
    }, Service)
    for resource_name, resource in pairs(definition.resources or {}) do
        if type(resource_name) ~= "string" or not resource_name:match("^[%a_][%w_]*$") then
            definition_error("resource names must be identifiers (got " .. tostring(resource_name) .. ")", 2)
        end
        if reserved[resource_name] or hook_set[resource_name] then
            definition_error("resource name '" .. resource_name .. "' clashes with a field of the service table", 2)
        end
        if type(resource) ~= "table" or type(resource.bind) ~= "function" then
            definition_error("resource '" .. resource_name .. "' is not a tamarco resource", 2)
        end
        self.resources[resource_name] = resource
        self.resource_names[#self.resource_names + 1] = resource_name
        self[resource_name] = resource
    end
    if definition.report_server ~= false and resource_provider then resource_provider.add_defaults(self) end
    table.sort(self.resource_names)
    return self
end

--- service.set_resource_provider(provider): `provider.add_defaults(svc)`
-- runs for every service defined from now on (unless its definition says
-- `report_server = false`); `provider.add_configured(svc, store)` when one
-- starts, with its settings. nil removes it.
function service.set_resource_provider(provider)
    resource_provider = provider
end

--- service.resource_provider() -> the installed provider, or nil.
function service.resource_provider()
    return resource_provider
end

--- service.add_resource(svc, name, resource): adds a resource to a defined
-- service (as if its definition had listed it), e.g. one its settings ask
-- for. Before the service starts.
function service.add_resource(self, name, resource)
    assert(not self.resources[name], "service.add_resource: the service already has a resource '" .. name .. "'")
    self.resources[name] = resource
    self.resource_names[#self.resource_names + 1] = name
    table.sort(self.resource_names)
    if self[name] == nil then self[name] = resource end
end

--- service.is_service(value) -> true when value is a service table made by service.new.
function service.is_service(value)
    return getmetatable(value) == Service
end

local function add_task(self, kind, name, fn, options)
    if type(name) ~= "string" or name == "" then
        definition_error(kind .. " name must be a non-empty string", 3)
    end
    if type(fn) ~= "function" then
        definition_error(kind .. " '" .. name .. "' needs a function", 3)
    end
    if self.task_names[name] then
        definition_error("duplicate task name '" .. name .. "' in service '" .. self.name .. "'", 3)
    end
    self.task_names[name] = kind
    self.task_definitions[#self.task_definitions + 1] = { kind = kind, name = name, fn = fn, options = options }
end

--- svc:task(name, fn): fn(svc) runs in its own task after start.
function Service:task(name, fn)
    add_task(self, "task", name, fn)
    return self
end

--- svc:task_timer({ interval = ms, autostart = bool, one_shot = bool }, name, fn)
function Service:task_timer(options, name, fn)
    if type(options) ~= "table" or type(options.interval) ~= "number" or options.interval < 0 then
        definition_error("task_timer needs options { interval = milliseconds >= 0 }", 2)
    end
    add_task(self, "task_timer", name, fn, options)
    return self
end

--- svc:thread(name, fn): fn(ctx) on its own OS thread and Lua state.
function Service:thread(name, fn)
    add_task(self, "thread", name, fn)
    return self
end

--- Asks the running service to stop (as SIGTERM does).
function Service:stop_service(reason)
    if self.lifecycle then self.lifecycle:request_stop(reason or "requested by the service") end
end

return service
