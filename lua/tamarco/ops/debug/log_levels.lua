--- tamarco.ops.debug.log_levels: log levels changed while the service runs —
-- of the whole service or of one logger ("hello.api") — from the console,
-- `PUT /debug/loglevel` or the settings (`system.logging.levels.<logger>:
-- LEVEL`, per service under system.microservices.<svc>.logging.levels).
--
-- Every change is logged at INFO (before it applies, so that lowering the
-- level never hides the line saying so) with the logger, the old and new
-- level, where it came from and who asked. A change of the settings'
-- `logging.levels` makes the settings authoritative again: loggers listed
-- there get their level, the others set at run time go back to the
-- service's level.
local logging = require "tamarco.core.logging"

local log_levels = {}

log_levels.SERVICE = "*"   -- the name that means the whole service

local function level_name(level)
    if type(level) ~= "string" then return nil end
    level = level:upper()
    if level == "WARN" then level = "WARNING" end
    return logging.LEVELS[level] and level or nil
end
log_levels.level_name = level_name

--- log_levels.current(logger_name | nil) -> the effective level name.
function log_levels.current(logger_name)
    if logger_name == nil or logger_name == log_levels.SERVICE then return logging.level() end
    local own = logging.logger_levels()
    local name = logger_name
    while name do
        if own[name] then return own[name] end
        name = name:match("^(.*)%.[^.]*$")
    end
    return logging.level()
end

--- log_levels.set(svc, logger_name | nil, level | nil, source, who) -> old,
-- new | nil, message. logger nil or "*" is the whole service; level nil
-- gives a logger the service's level back.
function log_levels.set(svc, logger_name, level, source, who)
    local new
    if level ~= nil then
        new = level_name(level)
        if not new then
            return nil, ("unknown log level '%s' (DEBUG, INFO, WARNING, ERROR, CRITICAL)"):format(tostring(level))
        end
    end
    if logger_name ~= nil and (type(logger_name) ~= "string" or not logger_name:match("^[%w_%-%.%*]+$")) then
        return nil, "bad logger name '" .. tostring(logger_name) .. "'"
    end
    local whole = logger_name == nil or logger_name == log_levels.SERVICE
    if whole and not new then return nil, "the service's level cannot be unset" end
    local old = log_levels.current(logger_name)
    local logger = svc and svc.logger or logging.get_logger()
    logger:info("log level changed", { target_logger = whole and "(service)" or logger_name, old_level = old,
        new_level = new or ("(service's " .. logging.level() .. ")"), source = source, by = who })
    if whole then
        logging.set_level(new)
    else
        logging.set_logger_level(logger_name, new)
    end
    return old, new or logging.level()
end

--- log_levels.apply_settings(svc, levels, source): makes `levels` (logger ->
-- level, from the settings) the run-time levels of single loggers.
function log_levels.apply_settings(svc, levels, source)
    levels = type(levels) == "table" and levels or {}
    local logger = svc and svc.logger or logging.get_logger()
    for name in pairs(logging.logger_levels()) do
        if levels[name] == nil then log_levels.set(svc, name, nil, source, "settings") end
    end
    local names = {}
    for name in pairs(levels) do names[#names + 1] = tostring(name) end
    table.sort(names)
    for _, name in ipairs(names) do
        local wanted = level_name(levels[name])
        if not wanted then
            logger:warning(("ignoring logging.levels.%s: unknown level '%s'"):format(name, tostring(levels[name])))
        elseif logging.logger_levels()[name] ~= wanted then
            log_levels.set(svc, name, wanted, source, "settings")
        end
    end
end

--- log_levels.watch_settings(svc) -> handle (handle:cancel()). Applies the
-- settings' levels now and on every change of them.
function log_levels.watch_settings(svc)
    local view = svc.settings
    -- "settings file x.yml:12", "etcd key /system/...", else the key
    local function where()
        local full, origin = view:origin("logging.levels")
        return origin or full
    end
    local initial = view:get("logging.levels", nil)
    if initial ~= nil then log_levels.apply_settings(svc, initial, "settings " .. where()) end
    return view:watch("logging.levels", function(value)
        log_levels.apply_settings(svc, value, "settings change " .. where())
    end)
end

return log_levels
