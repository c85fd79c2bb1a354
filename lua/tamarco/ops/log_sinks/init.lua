--- tamarco.ops.log_sinks: remote log sinks, configured from Tamarco's keys under
-- system.logging:
--
--   logstash:  enabled, host, port (5959), version (0 or 1; else
--              system.logging.version, else 1), message_type ("logstash"),
--              tags ([]), fqdn (false)                  -- UDP datagrams
--   redis:     enabled, host, port (6379), username, password, db, key ("logstash"),
--              version (0), message_type ("record"), tags ([])
--                                                       -- RPUSH of logstash JSON
--   http:      enabled, url, user, password, max_records (50),
--              max_time_seconds (1), version (0; 1; or "json" for the
--              host's own records), message_type ("record"), tags ([])
--                                                       -- POST of a JSON array
--   (each)     queue_size (10000); fqdn (false: the host name in `host`,
--              true: the fully qualified name)
--   unhealthy_on_sink_failure (false): a failing sink makes /status 500
--   source_path (true): `path` is the file of the logging call; false: the
--              logger name (saves a debug.getinfo per record)
--
-- Redis and HTTP are fed through a bounded queue off the hot path (see
-- tamarco.ops.log_sinks.queue): a slow or dead sink never blocks the loop or
-- the service; a sink that cannot deliver says so on stderr and in the log,
-- counts what it drops, and shows its state on /status. UDP sends batches
-- on a non-blocking socket within the loop turn (tamarco.ops.log_sinks.udp).
local errors = require "tamarco.core.errors"

local log_sinks = {}

-- The sinks configure_from_settings added and not yet closed (for /status).
local active = {}
local unhealthy_on_failure = false

local function enabled(section)
    return type(section) == "table" and section.enabled == true
end

--- log_sinks.logstash_version(section, kind, default) -> 0 or 1; raises a
-- settings error for anything else.
function log_sinks.logstash_version(section, kind, default)
    local version = section.version
    if version == nil then version = default end
    version = tonumber(version)
    if version ~= 0 and version ~= 1 then
        errors.raise("settings", ("system.logging.%s.version: must be 0 or 1, not %s")
            :format(kind, tostring(section.version)))
    end
    return version
end

--- log_sinks.host_name(section) -> the `host` of the logstash layouts: the
-- host name, or with `fqdn: true` its fully qualified name (as Tamarco's
-- fqdn setting; resolved once, when the sink is made).
function log_sinks.host_name(section)
    local name = require("tamarco.c.process").hostname()
    if section.fqdn == true then
        local ok, infos = pcall(require("luv").getaddrinfo, name, nil, { canonname = true })
        if ok and type(infos) == "table" and infos[1] and infos[1].canonname then name = infos[1].canonname end
    end
    return name
end

-- How a sink says it cannot deliver: one line on stderr (read even when the
-- log goes nowhere else) and the same in the service's own log.
local function reporter(logging)
    return function(level, message, fields)
        pcall(function()
            io.stderr:write("tamarco-host: ", message, "\n")
            io.stderr:flush()
        end)
        local logger = logging.get_logger()
        pcall(logger[level], logger, message, fields)
    end
end

--- log_sinks.configure_from_settings(view, logging) -> the sinks added.
-- view resolves keys under system.* (a service settings view).
function log_sinks.configure_from_settings(view, logging)
    local added = {}
    local kinds = { logstash = "tamarco.log_sinks.udp", redis = "tamarco.log_sinks.redis",
                    http = "tamarco.log_sinks.http" }
    local options = { version = view:get("logging.version", nil), report = reporter(logging),
                      source_path = view:get("logging.source_path", true) ~= false }
    for _, kind in ipairs({ "logstash", "redis", "http" }) do
        local section = view:get("logging." .. kind, nil)
        if enabled(section) then
            local sink = require(kinds[kind]).new(section, options)
            -- the caller's file costs a debug.getinfo per record: it can be turned off
            if not options.source_path then sink.wants_source = false end
            logging.add_sink(sink)
            sink:start()
            added[#added + 1] = sink
            active[#active + 1] = sink
        end
    end
    unhealthy_on_failure = view:get("logging.unhealthy_on_sink_failure", false) == true
    return added
end

--- log_sinks.report() -> { [name] = state } | nil, unhealthy: the state of
-- every active remote sink (state "delivering" or "failing", reason,
-- queued, delivered, dropped), and whether it should make /status 500.
function log_sinks.report()
    if #active == 0 then return nil, false end
    local out, failing = {}, false
    for _, sink in ipairs(active) do
        if sink.queue then
            out[sink.name] = sink.queue:status()
            if sink.queue.state == "failing" then failing = true end
        else
            out[sink.name] = { state = "delivering" }
        end
    end
    return out, failing and unhealthy_on_failure
end

--- Sends what the sinks still hold and stops them: each gets what is left
-- of timeout_ms (default 1000); what could not be sent is counted and said.
-- Runs inside a task.
function log_sinks.close(sinks, logging, timeout_ms)
    local deadline = require("tamarco.c.timer").now() + (timeout_ms or 1000)
    for _, sink in ipairs(sinks) do
        if sink.queue then   -- the UDP sink has none: it sends within the turn
            sink.queue:flush(math.max(0, deadline - require("tamarco.c.timer").now()))
            sink.queue:stop()
        end
        logging.remove_sink(sink)
        if sink.close_connection then sink:close_connection() end
        for i, s in ipairs(active) do
            if s == sink then table.remove(active, i) break end
        end
    end
end

-- /status shows the sinks (tamarco.resources.status asks tamarco.core.health)
require("tamarco.core.health").register("log_sinks", log_sinks.report)

return log_sinks
