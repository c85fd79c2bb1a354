--- tamarco.core.resource: the resource type every resource builds on.
--
-- A resource has Tamarco's phases (pre_start, start, post_start, stop,
-- post_stop), a status code, a settings view under
-- `system.resources.<name>` (overridable per service under
-- `system.microservices.<svc>.resources.<name>`), a logger, and may name
-- other resources it needs in `depends_on`. The lifecycle sets the
-- transitional statuses around each phase; a resource only sets FAILED or
-- CONNECTING itself when its peer goes away or comes back.
local errors = require "tamarco.core.errors"

local base = {}

base.STATUS = {
    NOT_STARTED = 0,
    CONNECTING = 1,
    STARTED = 2,
    STOPPING = 3,
    STOPPED = 4,
    FAILED = 5,
}

local status_names = {}
for name, code in pairs(base.STATUS) do status_names[code] = name end
base.status_names = status_names

local Resource = {}
Resource.__index = Resource
base.Resource = Resource

--- base.class(type_name[, parent]) -> a new resource class. Instances are made
-- with `class.new(options)`; override the phases you need.
function base.class(type_name, parent)
    parent = parent or Resource
    local class = setmetatable({}, { __index = parent })
    class.__index = class
    class.type_name = type_name
    class.new = function(options)
        local self = setmetatable({}, class)
        self:init(options or {})
        return self
    end
    return class
end

function Resource:init(options)
    self.options = options
    self.depends_on = options.depends_on or {}
    self.status_code = base.STATUS.NOT_STARTED
end

--- Called by the service before any phase: the resource learns its name,
-- service, settings view and logger.
function Resource:bind(service, name, settings_view, logger)
    self.name = name
    self.service = service
    self.settings = settings_view
    self.logger = logger
end

--- The effective value of a setting: the settings view (which reads
-- system.microservices.<svc>.resources.<name>.<key>, then
-- system.resources.<name>.<key>), then the options given to the
-- constructor, then `default`, then the class's `defaults[key]`.
-- Works before bind (no view) and for resources used without a service.
-- A class's `renamed_settings` maps an old setting name to its new one (e.g.
-- `connect_timeout = "connect_timeout_ms"`): the old name still works, with
-- one deprecation warning per resource.
local function given(self, key)
    local view = self.settings
    if type(view) == "table" then
        local value
        if type(view.get) == "function" then value = view:get(key, nil) else value = view[key] end
        if value ~= nil then return value end
    end
    return self.options[key]
end

local function renamed_value(self, key)
    for old, new in pairs(self.renamed_settings or {}) do
        if new == key then
            local value = given(self, old)
            if value ~= nil then
                self._warned_renamed = self._warned_renamed or {}
                if not self._warned_renamed[old] and self.logger then
                    self._warned_renamed[old] = true
                    self.logger:warning(("setting `%s` of resource '%s' is deprecated: use `%s`")
                        :format(old, tostring(self.name), new), { setting = old, use = new })
                end
                return value
            end
        end
    end
end

function Resource:setting(key, default)
    local value = given(self, key)
    if value ~= nil then return value end
    value = renamed_value(self, key)
    if value ~= nil then return value end
    if default ~= nil then return default end
    local defaults = self.defaults
    return defaults and defaults[key]
end

--- resource:settings_error(key, problem): raises a settings error (the
-- service stops starting, exit code 2) that names where the value of `key`
-- comes from (settings file and line, environment variable, etcd key), the
-- full key and the problem.
function Resource:settings_error(key, problem)
    local view = self.settings
    if type(view) == "table" and type(view.error) == "function" then error(view:error(key, problem), 0) end
    errors.raise("settings", ("resource '%s': %s: %s"):format(tostring(self.name), key, problem), { key = key })
end

local function describe(value)
    if type(value) == "string" then return ("%q"):format(value) end
    if type(value) == "table" then return "a " .. (value[1] ~= nil and "list" or "mapping") end
    return tostring(value)
end

--- resource:number_setting(key, default[, limits]) -> the setting, checked:
-- a number within limits { min =, max =, integer = true }, else a settings
-- error (see settings_error).
function Resource:number_setting(key, default, limits)
    local value = self:setting(key, default)
    limits = limits or {}
    if type(value) ~= "number" or value ~= value then
        self:settings_error(key, "must be a number, not " .. describe(value))
    elseif limits.integer and value % 1 ~= 0 then
        self:settings_error(key, "must be a whole number, not " .. value)
    elseif limits.min and value < limits.min then
        self:settings_error(key, ("must be at least %s, not %s"):format(limits.min, value))
    elseif limits.max and value > limits.max then
        self:settings_error(key, ("must be at most %s, not %s"):format(limits.max, value))
    end
    return value
end

--- Limits for number_setting.
base.PORT = { integer = true, min = 0, max = 65535 }
base.COUNT = { integer = true, min = 0 }
base.DURATION = { min = 0 }

--- resource:check_settings{ key = limits, ... }: number_setting for each
-- key (defaults from the class's `defaults`); raises on the first bad one,
-- in key order, so that the message is the same on every run.
function Resource:check_settings(spec)
    local keys = {}
    for key in pairs(spec) do keys[#keys + 1] = key end
    table.sort(keys)
    for _, key in ipairs(keys) do self:number_setting(key, nil, spec[key]) end
end

--- resource:typed_setting(key, default, lua_type) -> the setting when it is
-- of that Lua type ("string", "boolean", "table"), else a settings error.
function Resource:typed_setting(key, default, lua_type)
    local value = self:setting(key, default)
    if value ~= nil and type(value) ~= lua_type then
        local wanted = lua_type == "table" and "a mapping or list" or "a " .. lua_type
        self:settings_error(key, "must be " .. wanted .. ", not " .. describe(value))
    end
    return value
end

function Resource:pre_start() end
function Resource:start() end
function Resource:post_start() end
function Resource:stop() end
function Resource:post_stop() end

--- Hot reload: takes the definitions (routes, handlers, subscriptions) of
-- `new`, the same resource as defined by the reloaded service file, while
-- keeping this resource's live connections. Returns a function that undoes
-- the take-over (used when the new code fails to start), or nil when this
-- resource type cannot adopt: then the reload starts `new` and stops this one.
-- Only called when the resource's settings did not change.
function Resource:adopt(new)
    return nil
end

--- The adopt of a resource whose code defines nothing (no routes, no
-- handlers): it keeps running as it is. `MyResource.adopt = base.keep_on_reload`.
function base.keep_on_reload()
    return function() end
end

--- Changes the status; logs the transition at debug level.
function Resource:set_status(code)
    assert(status_names[code], "unknown status code " .. tostring(code))
    if self.status_code ~= code and self.logger then
        self.logger:debug("resource status " .. status_names[code], { resource = self.name })
    end
    self.status_code = code
end

--- Tamarco's status dict. Subclasses may add fields; never secrets.
function Resource:status()
    return { status = self.status_code }
end

return base
