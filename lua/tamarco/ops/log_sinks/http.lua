--- tamarco.ops.log_sinks.http: batched POST of a JSON array of records to
-- `url`, sent when max_records are waiting or max_time_seconds passed, with
-- basic auth when user/password are set. As Tamarco's HTTP handler: each
-- record in the logstash version 0 layout with type "record", unless
-- `version` (0, 1, or "json" for the host's own JSON records) and
-- `message_type` say otherwise.
local clog = require "tamarco.c.log"
local queue = require "tamarco.ops.log_sinks.queue"

local http_sink = {}

--- http_sink.new(section, options): options.report(level, message, fields).
function http_sink.new(section, options)
    options = options or {}
    assert(type(section.url) == "string", "system.logging.http.url must be set when the http sink is enabled")
    local log_sinks = require "tamarco.ops.log_sinks"
    local json_records = section.version == "json"
    local version = not json_records and log_sinks.logstash_version(section, "http", 0) or nil
    local message_type = section.message_type or "record"
    local tags = section.tags or {}
    local host_name = require("tamarco.ops.log_sinks").host_name(section)
    local max_records = section.max_records or 50
    local headers = { ["Content-Type"] = "application/json" }
    if section.user then
        headers.Authorization = "Basic " .. require("tamarco.c.codec").base64_encode(section.user .. ":" .. (section.password or ""))
    end
    local client
    local sink = { name = "http", wants_source = not json_records }
    sink.queue = queue.new {
        name = "http",
        capacity = section.queue_size,
        batch = max_records,
        max_delay_ms = (section.max_time_seconds or 1) * 1000,
        report = options.report,
        send = function(lines)
            client = client or require("tamarco.resources.http_client").new()
            local status, body, kind = client:request {
                method = "POST", url = section.url, headers = headers,
                body = "[" .. table.concat(lines, ",") .. "]", timeout = 10000,
            }
            if not status then
                -- kind: "connect" (refused, unreachable), "timeout", "resolve", "tls", ...
                return nil, ("%s: %s: %s"):format(section.url, kind == "connect" and "cannot connect"
                    or tostring(kind or "failed"), tostring(body))
            end
            if status >= 300 then
                -- a 4xx (but timeout and too-many-requests) refuses these records for good
                local refused = status >= 400 and status < 500 and status ~= 408 and status ~= 429
                return nil, section.url .. " answered HTTP " .. status, refused
            end
            return true
        end,
    }
    function sink:emit(record)
        if json_records then
            self.queue:push(clog.encode_json(record))
        else
            self.queue:push(clog.encode_logstash(record, version, host_name, message_type, tags))
        end
    end
    function sink:start() self.queue:start() end
    return sink
end

return http_sink
