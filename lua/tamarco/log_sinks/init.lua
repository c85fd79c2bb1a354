--- tamarco.log_sinks: remote log sinks, configured from Tamarco's keys under
-- system.logging:
--
--   logstash:  enabled, host, port (5959), version (0 or 1; else
--              system.logging.version, else 1), message_type ("logstash"),
--              tags ([])                                -- UDP datagrams
--   redis:     enabled, host, port (6379), password, db, key ("logstash")
--                                                       -- RPUSH of logstash v1 JSON
--   http:      enabled, url, user, password, max_records (50),
--              max_time_seconds (1)                     -- POST of a JSON array
--   (each)     queue_size (10000)
--
-- Redis and HTTP are fed through a bounded queue off the hot path (see
-- tamarco.log_sinks.queue): a slow or dead sink never blocks the loop or
-- the service; overflow drops records and counts them. UDP sends batches
-- on a non-blocking socket within the loop turn (tamarco.log_sinks.udp).
local log_sinks = {}

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
        require("tamarco.errors").raise("settings", ("system.logging.%s.version: must be 0 or 1, not %s")
            :format(kind, tostring(section.version)))
    end
    return version
end

--- log_sinks.configure_from_settings(view, logging) -> the sinks added.
-- view resolves keys under system.* (a service settings view).
function log_sinks.configure_from_settings(view, logging)
    local added = {}
    local kinds = { logstash = "tamarco.log_sinks.udp", redis = "tamarco.log_sinks.redis",
                    http = "tamarco.log_sinks.http" }
    for _, kind in ipairs({ "logstash", "redis", "http" }) do
        local section = view:get("logging." .. kind, nil)
        if enabled(section) then
            local sink = require(kinds[kind]).new(section, { version = view:get("logging.version", nil) })
            logging.add_sink(sink)
            sink:start()
            added[#added + 1] = sink
        end
    end
    return added
end

--- Sends what the sinks still hold (up to timeout_ms) and stops them.
-- Runs inside a task.
function log_sinks.close(sinks, logging, timeout_ms)
    for _, sink in ipairs(sinks) do
        if sink.queue then   -- the UDP sink has none: it sends within the turn
            sink.queue:flush(timeout_ms or 1000)
            sink.queue:stop()
        end
        logging.remove_sink(sink)
        if sink.close_connection then sink:close_connection() end
    end
end

return log_sinks
