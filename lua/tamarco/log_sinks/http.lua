--- tamarco.log_sinks.http: batched POST of a JSON array of records to
-- `url`, sent when max_records are waiting or max_time_seconds passed, with
-- basic auth when user/password are set.
local clog = require "tamarco.c.log"
local queue = require "tamarco.log_sinks.queue"

local http_sink = {}

function http_sink.new(section)
    assert(type(section.url) == "string", "system.logging.http.url must be set when the http sink is enabled")
    local max_records = section.max_records or 50
    local headers = { ["Content-Type"] = "application/json" }
    if section.user then
        headers.Authorization = "Basic " .. require("tamarco.c.codec").base64_encode(section.user .. ":" .. (section.password or ""))
    end
    local client
    local sink = { name = "http" }
    sink.queue = queue.new {
        name = "http",
        capacity = section.queue_size,
        batch = max_records,
        max_delay_ms = (section.max_time_seconds or 1) * 1000,
        send = function(lines)
            client = client or require("tamarco.resources.http_client").new()
            local status, body = client:request {
                method = "POST", url = section.url, headers = headers,
                body = "[" .. table.concat(lines, ",") .. "]", timeout = 10000,
            }
            if not status then return nil, body end
            if status >= 300 then return nil, "http sink: " .. section.url .. " answered " .. status end
            return true
        end,
    }
    function sink:emit(record)
        self.queue:push(clog.encode_json(record))
    end
    function sink:start() self.queue:start() end
    return sink
end

return http_sink
