--- tamarco.core.settings_schema: the settings the framework itself reads, with
-- their types and ranges, checked before a service starts and before a
-- changed settings source is applied at run time.
--
-- What it refuses (a settings error, exit code 2 at start; at run time the
-- change is logged and the last good settings are kept):
--   * a framework section that is not a mapping (`system: [1,2,3]`,
--     `system.resources: oops`, `system.logging: loud`);
--   * a number out of its range or not a number (`stop_timeout_seconds: 0`,
--     `api.max_connections: 3000000000`, `api.max_body_size: 1e300`): every
--     number has a range that its C type and its meaning allow;
--   * a value of the wrong type where the type is fixed (strings, booleans).
-- What it warns about: an unknown key under a section the framework owns
-- (`system.logging`, `system.resources.<a known resource>`), with where it
-- is and the closest known key ("did you mean `port`?"). In strict mode
-- (`--strict-settings` or `system.strict_settings: true`) a warning is an
-- error too.
--
-- A resource type the framework does not know may declare its own:
--     MyResource.settings_schema = { port = schema.PORT, name = schema.STRING }
-- (its class `defaults` keys are known keys too).
local errors = require "tamarco.core.errors"

local schema = {}

local INT32_MAX = 2147483647
local DAY = 86400

local function number(limits)
    limits.kind = "number"
    return limits
end

schema.STRING = { kind = "string" }
schema.BOOLEAN = { kind = "boolean" }
schema.MAPPING = { kind = "mapping" }
schema.ANY = { kind = "any" }
schema.PORT = number { integer = true, min = 0, max = 65535 }
--- a count held in a C int
schema.COUNT = number { integer = true, min = 0, max = INT32_MAX }
--- milliseconds (timers take at most about 24 days)
schema.MILLISECONDS = number { integer = false, min = 0, max = INT32_MAX }
--- seconds, up to 30 days
schema.SECONDS = number { min = 0, max = 30 * DAY }
--- bytes, up to 1 TiB (exact in a double, fits every size_t)
schema.BYTES = number { integer = true, min = 0, max = 2 ^ 40 }

local function count(min, max) return number { integer = true, min = min, max = max } end
local function seconds(min, max) return number { min = min, max = max or 30 * DAY } end
local function mapping(keys) return { kind = "mapping", keys = keys } end
local function one_of(...) return { kind = "one_of", ... } end

local STRING, BOOLEAN, ANY, PORT = schema.STRING, schema.BOOLEAN, schema.ANY, schema.PORT
local STRING_OR_LIST = one_of(STRING, { kind = "list" })

--- Remote log sinks (tamarco.ops.log_sinks).
local SINK_COMMON = { enabled = BOOLEAN, queue_size = count(1, 10000000) }
local function sink(keys)
    for k, v in pairs(SINK_COMMON) do keys[k] = v end
    return mapping(keys)
end

--- system.logging (and system.microservices.<svc>.logging)
schema.logging = mapping {
    profile = { kind = "profile" },
    stdout = one_of(BOOLEAN, STRING),
    stdout_format = STRING,
    source_path = BOOLEAN,
    version = count(0, 1),
    unhealthy_on_sink_failure = BOOLEAN,
    levels = schema.MAPPING,
    file_path = one_of(STRING, BOOLEAN),
    file_max_bytes = schema.BYTES,
    file_backup_count = count(0, 1000),
    logstash = sink { host = STRING, port = PORT, version = count(0, 1), fqdn = BOOLEAN,
                      message_type = STRING, tags = ANY },
    redis = sink { host = STRING, port = PORT, username = STRING, password = ANY, db = count(0, INT32_MAX),
                   key = STRING, ssl = BOOLEAN, version = count(0, 1), message_type = STRING, tags = ANY,
                   fqdn = BOOLEAN },
    http = sink { url = STRING, user = STRING, password = ANY, max_records = count(1, 1000000),
                  max_time_seconds = seconds(0), version = count(0, 1), message_type = STRING, tags = ANY,
                  fqdn = BOOLEAN },
}

--- Keys directly under system (and system.microservices.<svc>); only
-- their types are checked: other keys there are the services' own.
schema.system = {
    deploy_name = STRING,
    stop_timeout_seconds = number { min = 0, exclusive_min = true, max = DAY },
    strict_settings = BOOLEAN,
    logging = schema.logging,
    resources = schema.MAPPING,
    microservices = schema.MAPPING,
    etcd = schema.MAPPING,
    hot_reload = BOOLEAN,
    console = BOOLEAN,
}

local HTTP_SERVER = {
    host = STRING,
    port = PORT,
    backlog = count(1, 65535),
    max_connections = count(1, 1000000),
    max_header_size = count(1, 64 * 1024 * 1024),
    max_headers = count(1, 65535),
    max_body_size = schema.BYTES,
    max_pipeline = count(1, 65535),
    header_timeout = seconds(0),
    body_timeout = seconds(0),
    idle_timeout = seconds(0),
    send_timeout = seconds(0),
    drain_timeout = seconds(0),
    server_name = STRING,
    debug = BOOLEAN,
    debug_token = STRING,
    access_log = BOOLEAN,
    reuse_port = BOOLEAN,
    cors = one_of(BOOLEAN, mapping {
        enabled = BOOLEAN, allow_origins = STRING_OR_LIST, allow_methods = STRING_OR_LIST,
        allow_headers = STRING_OR_LIST, expose_headers = STRING_OR_LIST, allow_credentials = BOOLEAN,
        max_age = count(0, INT32_MAX),
    }),
    cache = mapping { max_entries = count(0, 10000000), header_keys = ANY },
}

--- Resource types by their type_name, and the framework's default resource
-- names (a section under system.resources with such a name is known even
-- when this service does not have the resource).
schema.resources = {
    http_server = HTTP_SERVER,
    redis = {
        host = STRING, port = PORT, username = STRING, password = ANY, db = count(0, INT32_MAX),
        connect_timeout_ms = schema.MILLISECONDS, reconnect_min_ms = schema.MILLISECONDS,
        reconnect_max_ms = schema.MILLISECONDS, fail_on_start = BOOLEAN,
        -- the names before the units rule (deprecated, still read)
        connect_timeout = schema.MILLISECONDS, reconnect_min = schema.MILLISECONDS,
        reconnect_max = schema.MILLISECONDS,
        sentinels = STRING_OR_LIST, master_name = STRING,
    },
    amqp = {
        host = STRING, port = PORT, hosts = STRING_OR_LIST, vhost = STRING, user = STRING, password = ANY,
        connection_timeout = seconds(0), heartbeat = count(0, 65535), queues_prefix = STRING,
        prefetch = count(0, 65535), codec = STRING,
        reconnect_backoff_ms = schema.MILLISECONDS, reconnect_backoff_max_ms = schema.MILLISECONDS,
        publish_wait_ms = schema.MILLISECONDS, request_timeout_ms = schema.MILLISECONDS,
        drain_timeout_ms = schema.MILLISECONDS,
    },
    http_client = {
        timeout_ms = schema.MILLISECONDS, connect_timeout_ms = schema.MILLISECONDS, verify_tls = BOOLEAN,
        ca_file = STRING, follow_redirects = BOOLEAN, max_body_bytes = schema.BYTES, base_url = STRING,
        headers = schema.MAPPING,
    },
    registry = {
        enabled = BOOLEAN, path = STRING, ttl = count(1, DAY), host = STRING, port = PORT,
        address = ANY, etcd_host = STRING, etcd_port = PORT, etcd_endpoints = STRING_OR_LIST,
    },
    metrics = { collect_frequency = seconds(0.001, DAY), handlers = schema.MAPPING, naming = STRING },
    status = { check_interval_ms = count(1, INT32_MAX), restart_policy = schema.MAPPING },
    profiler = {
        microservices_with_profiler = STRING_OR_LIST, file = STRING, interval_seconds = seconds(0.001),
        sample_ms = count(1, 60000), top = count(1, 100000), mode = STRING,
    },
    memory = {
        microservices_with_memory = STRING_OR_LIST, file = STRING, interval_seconds = seconds(0.001),
        warn_growth_mb = number { min = 0, max = 2 ^ 40 },
    },
}
schema.default_resource_types = {
    tamarco_http_report_server = "http_server", status = "status", metrics = "metrics",
    profiler = "profiler", memory = "memory", registry = "registry",
}

---------------------------------------------------------------------------
-- checking values
---------------------------------------------------------------------------

local function describe(value)
    if type(value) == "string" then return ("%q"):format(value) end
    if type(value) == "table" then return "a " .. (value[1] ~= nil and "list" or "mapping") end
    return tostring(value)
end

local function is_list(v)
    return type(v) == "table" and (getmetatable(v) == require("tamarco.c.yaml").sequence_mt or v[1] ~= nil)
end

local function is_mapping(v)
    return type(v) == "table" and not is_list(v)
end

local NOUN = { string = "a string", boolean = "true or false", mapping = "a mapping of settings",
    list = "a list", number = "a number", profile = "DEVELOP, TESTING or PRODUCTION" }

-- problem(spec, value) -> nil when value fits spec, else the problem text.
local function problem(spec, value)
    local kind = spec.kind
    if kind == "any" then return nil end
    if kind == "one_of" then
        local nouns = {}
        for i, alternative in ipairs(spec) do
            if not problem(alternative, value) then return nil end
            nouns[i] = NOUN[alternative.kind]
        end
        return "must be " .. table.concat(nouns, " or ") .. ", not " .. describe(value)
    end
    if kind == "string" then
        if type(value) == "string" then return nil end
    elseif kind == "boolean" then
        if type(value) == "boolean" then return nil end
    elseif kind == "mapping" then
        if is_mapping(value) then return nil end
    elseif kind == "list" then
        if is_list(value) then return nil end
    elseif kind == "profile" then
        local logging = require "tamarco.core.logging"
        if type(value) == "string" and logging.PROFILES[value:upper()] then return nil end
    elseif kind == "number" then
        if type(value) ~= "number" or value ~= value then
            return "must be a number, not " .. describe(value)
        elseif spec.integer and value % 1 ~= 0 then
            return "must be a whole number, not " .. value
        elseif spec.exclusive_min and value <= spec.min then
            return ("must be greater than %s, not %s"):format(spec.min, value)
        elseif spec.min and value < spec.min then
            return ("must be at least %s, not %s"):format(spec.min, value)
        elseif spec.max and value > spec.max then
            return ("must be at most %.15g, not %.15g"):format(spec.max, value)
        end
        return nil
    end
    return "must be " .. NOUN[kind] .. ", not " .. describe(value)
end
schema.problem = problem

local function error_at(store, key, text)
    local where, fields = store:origin(key)
    local e = { key = key }
    for k, v in pairs(fields or {}) do e[k] = v end
    return errors.new("settings", (where and where .. ": " or "") .. key .. ": " .. text, e)
end

-- Edit distance counting a swap of two neighbours as one edit ("prot" is
-- one edit from "port"), for "did you mean".
local function distance(a, b)
    local d = {}
    for i = 0, #a do d[i] = { [0] = i } end
    for j = 0, #b do d[0][j] = j end
    for i = 1, #a do
        for j = 1, #b do
            local cost = a:byte(i) == b:byte(j) and 0 or 1
            local best = math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a:byte(i) == b:byte(j - 1) and a:byte(i - 1) == b:byte(j) then
                best = math.min(best, d[i - 2][j - 2] + 1)
            end
            d[i][j] = best
        end
    end
    return d[#a][#b]
end

--- schema.closest(word, known_keys) -> the known key nearest to word, or nil
-- when none is close (at most a third of the letters differ, and at most 3).
function schema.closest(word, keys)
    local best, best_distance
    for key in pairs(keys) do
        local d = distance(word, key)
        if not best_distance or d < best_distance or (d == best_distance and key < best) then
            best, best_distance = key, d
        end
    end
    if best and best_distance <= math.min(3, math.max(1, math.floor(#word / 3))) then return best end
    return nil
end

local function sorted_keys(t)
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    return keys
end

-- Checks the value at dotted `key` (every layer of it that a source sets,
-- i.e. the merged value) against `spec`; recurses into known mappings;
-- unknown keys of a mapping with a key list go to `warnings` when `spelling`.
local function check(store, key, value, spec, spelling, warnings)
    if value == nil then return end
    local text = problem(spec, value)
    if text then error(error_at(store, key, text), 0) end
    local keys = spec.keys
    if spec.kind == "one_of" then
        for _, alternative in ipairs(spec) do
            if not problem(alternative, value) then keys = alternative.keys break end
        end
    end
    if not keys or type(value) ~= "table" then return end
    for _, k in ipairs(sorted_keys(value)) do
        local sub = keys[k]
        local full = key .. "." .. tostring(k)
        if sub then
            check(store, full, value[k], sub, spelling, warnings)
        elseif spelling then
            local hint = type(k) == "string" and schema.closest(k, keys)
            warnings[#warnings + 1] = error_at(store, full, "unknown setting"
                .. (hint and (" (did you mean `" .. hint .. "`?)") or ""))
        end
    end
end

-- The known keys of a resource: the schema's, the class's own
-- settings_schema and its defaults (any type).
local function resource_spec(resource, type_name)
    local keys = {}
    for k, v in pairs(schema.resources[type_name] or {}) do keys[k] = v end
    if resource then
        for k, v in pairs(rawget(getmetatable(resource) or {}, "settings_schema")
            or resource.settings_schema or {}) do keys[k] = v end
        for k in pairs(resource.defaults or {}) do keys[k] = keys[k] or ANY end
    end
    if next(keys) == nil then return nil end
    return mapping(keys)
end

local SECTIONS = { logging = true, resources = true, microservices = true }

local function type_of(svc, name)
    local resource = svc and svc.resources and svc.resources[name]
    if resource and resource.type_name then return resource, resource.type_name end
    return resource, schema.default_resource_types[name]
end

--- schema.check(store[, svc]) -> warnings (a list of settings errors, each
-- an unknown key), or raises the first settings error (exit code 2).
-- svc (a service) tells which resources exist and of which type.
function schema.check(store, svc)
    local warnings = {}
    local function get(key) return store:get(key, nil) end
    -- Tamarco reads everything under `system`: a framework section at the
    -- top level (`logging: loud`) is never read, so it is an error
    for _, k in ipairs({ "deploy_name", "logging", "microservices", "resources", "stop_timeout_seconds" }) do
        if store:get(k, nil) ~= nil then
            error(error_at(store, k, "is read under system: did you mean `system." .. k .. "`?"), 0)
        end
    end
    local system = get("system")
    if system == nil then return warnings end
    if not is_mapping(system) then
        error(error_at(store, "system", "must be a mapping of settings, not " .. describe(system)), 0)
    end
    -- the keys of system and of each service's section
    local sections = { "system" }
    local microservices = get("system.microservices")
    if is_mapping(microservices) then
        for _, name in ipairs(sorted_keys(microservices)) do
            local section = "system.microservices." .. tostring(name)
            local value = microservices[name]
            if not is_mapping(value) then
                error(error_at(store, section, "must be a mapping of settings, not " .. describe(value)), 0)
            end
            sections[#sections + 1] = section
        end
    end
    for _, section in ipairs(sections) do
        local tree = get(section)
        -- under a service's own section only what the framework reads there
        local keys = section == "system" and sorted_keys(schema.system) or { "hot_reload", "logging", "resources" }
        for _, k in ipairs(keys) do
            check(store, section .. "." .. k, tree[k], schema.system[k], k == "logging", warnings)
        end
        -- other keys here may be a service's own; one that is a near miss of
        -- a framework section (`loging`) is almost surely a typo
        for _, k in ipairs(sorted_keys(tree)) do
            local hint = type(k) == "string" and not schema.system[k] and schema.closest(k, SECTIONS)
            if hint then
                warnings[#warnings + 1] = error_at(store, section .. "." .. k,
                    "unknown setting (did you mean `" .. hint .. "`?)")
            end
        end
        local resources = tree.resources
        if is_mapping(resources) then
            for _, name in ipairs(sorted_keys(resources)) do
                local full = section .. ".resources." .. tostring(name)
                local value = resources[name]
                local resource, type_name = type_of(svc, name)
                local spec = resource_spec(resource, type_name)
                if spec then
                    check(store, full, value, spec, true, warnings)
                elseif not is_mapping(value) and type(value) ~= "boolean" then
                    error(error_at(store, full, "must be a mapping of settings, not " .. describe(value)), 0)
                end
            end
        end
    end
    return warnings
end

-- true when `key` (dotted) names a setting under `spec`: a known key at each
-- level, or anything below a value whose keys are not listed.
local function knows(spec, key)
    for part in key:gmatch("[^.]+") do
        if not spec then return false end
        local keys = spec.keys
        if spec.kind == "one_of" then
            for _, alternative in ipairs(spec) do keys = keys or alternative.keys end
        end
        if not keys then return true end
        spec = keys[part]
        if spec == nil then return false end
    end
    return true
end

--- schema.knows_resource_setting(resource, key) -> true when `key` (dotted,
-- below `system.resources.<name>`) is a setting of that resource (its type's
-- schema, its class's settings_schema and defaults).
function schema.knows_resource_setting(resource, key)
    return knows(resource_spec(resource, resource.type_name), key)
end

--- schema.knows_logging_setting(key) -> true when `key` (dotted, below
-- `system.logging`) is a logging setting.
function schema.knows_logging_setting(key)
    return knows(schema.logging, key)
end

--- schema.strict(store, options) -> true when unknown keys are errors:
-- `--strict-settings` (options.strict) or the setting system.strict_settings.
function schema.strict(store, options)
    return (options and options.strict) or store:get("system.strict_settings", false) == true
end

--- schema.validator(svc) -> a function(store) -> true | nil, err for the
-- settings store's run-time checks (store.validate).
function schema.validator(svc)
    return function(candidate)
        local ok, err = pcall(schema.check, candidate, svc)
        if ok then return true end
        if errors.is(err) then return nil, err end
        return nil, errors.new("settings", tostring(err))
    end
end

return schema
