--- tamarco.ops.log_sinks.udp: logstash over UDP, one JSON datagram per record in
-- Tamarco's logstash layout v0 or v1 (python-logstash's formatters).
--
-- No queue and no sender task: emit() encodes the record in C into a batch
-- of up to 64 datagrams, sent with one sendmmsg(2) when full and at the end
-- of every loop turn. The socket is non-blocking: what the kernel cannot
-- take now is dropped and counted in logging_dropped_records_total, never
-- waited for. The batch bounds the memory (queue_size does not apply).
local logging = require "tamarco.core.logging"
local log_udp = require "tamarco.c.log_udp"

local udp = {}

-- A sender to host (a name is resolved once, at configuration).
local function open_sender(host, port)
    local sender = log_udp.open(host, port)
    if sender then return sender end
    local infos = require("luv").getaddrinfo(host, tostring(port), { socktype = "dgram" })
    if type(infos) ~= "table" or not infos[1] then
        error("logstash sink: cannot resolve " .. tostring(host), 0)
    end
    return assert(log_udp.open(infos[1].addr, port))
end

--- udp.new(section[, defaults]): defaults.version is the version when the
-- section has none (Tamarco read `system.logging.version` for this sink).
function udp.new(section, defaults)
    local host, port = section.host or "127.0.0.1", section.port or 5959
    local version = require("tamarco.ops.log_sinks").logstash_version(section, "logstash",
        defaults and defaults.version or 1)
    local source_host = require("tamarco.ops.log_sinks").host_name(section)
    local message_type = section.message_type or "logstash"
    local tags = section.tags or {}
    local sender = open_sender(host, port)
    local dropped = require("tamarco.ops.log_sinks.queue").dropped_counter("logstash")
    local sink = { name = "logstash", wants_source = true }

    local function count(lost)
        if lost > 0 then dropped:inc(lost) end
    end
    function sink:emit(record)
        count(sender:send_logstash(record, version, source_host, message_type, tags))
    end
    function sink:flush()
        count(sender:flush())
    end
    function sink:start()
        self.turn = self.turn or logging.every_loop_turn(function() self:flush() end)
    end
    function sink:close_connection()
        logging.stop_handle(self.turn)
        self.turn = nil
        self:flush()
        sender:close()
    end
    return sink
end

return udp
