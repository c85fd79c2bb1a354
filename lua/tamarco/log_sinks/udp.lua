--- tamarco.log_sinks.udp: logstash over UDP, one JSON datagram per record in
-- Tamarco's logstash layout v0 or v1 (python-logstash's formatters).
local clog = require "tamarco.c.log"
local queue = require "tamarco.log_sinks.queue"

local udp = {}

function udp.new(section)
    local uv = require "luv"
    local process = require "tamarco.c.process"
    local host, port = section.host or "127.0.0.1", section.port or 5959
    local version = section.version or 1
    local source_host = section.fqdn and process.hostname() or process.hostname()
    local socket = uv.new_udp()
    socket:unref()   -- a log sink never keeps the service alive
    local sink = { name = "logstash" }
    sink.queue = queue.new {
        name = "logstash",
        capacity = section.queue_size,
        batch = 64,
        send = function(lines)
            for _, line in ipairs(lines) do
                -- try_send does not queue in libuv: a datagram the kernel
                -- cannot take now is lost, as UDP logging accepts
                local ok, err = socket:try_send(line, host, port)
                if not ok and err and not tostring(err):match("EAGAIN") then
                    return nil, "udp " .. host .. ":" .. port .. ": " .. tostring(err)
                end
            end
            return true
        end,
    }
    function sink:emit(record)
        self.queue:push(clog.encode_logstash(record, version, source_host,
            section.message_type or "Logstash", section.tags or {}))
    end
    function sink:start() self.queue:start() end
    function sink:close_connection()
        if not socket:is_closing() then socket:close() end
    end
    return sink
end

return udp
