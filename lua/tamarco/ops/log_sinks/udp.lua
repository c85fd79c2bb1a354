--- tamarco.log_sinks.udp: logstash over UDP, one JSON datagram per record in
-- Tamarco's logstash layout v0 or v1 (python-logstash's formatters).
--
-- No queue and no sender task: emit() encodes the record in C into a batch
-- of up to 64 datagrams, sent with one sendmmsg(2) when full and at the end
-- of every loop turn. emit_parts() writes the same datagram from the
-- record's parts, without its table (tamarco.logging uses it while every
-- active sink has one). The socket is non-blocking: what the kernel cannot
-- take now is dropped and counted in logging_dropped_records_total, never
-- waited for. The batch bounds the memory (queue_size does not apply).
local logging = require "tamarco.core.logging"
local log_udp = require "tamarco.c.log_udp"

local udp = {}

-- A sender to host:port writing records in the given layout (a name is
-- resolved once, at configuration).
local function open_sender(host, port, version, source_host, message_type, tags)
    local sender = log_udp.open(host, port, version, source_host, message_type, tags)
    if sender then return sender end
    local infos = require("luv").getaddrinfo(host, tostring(port), { socktype = "dgram" })
    if type(infos) ~= "table" or not infos[1] then
        error("logstash sink: cannot resolve " .. tostring(host), 0)
    end
    return assert(log_udp.open(infos[1].addr, port, version, source_host, message_type, tags))
end

--- udp.new(section[, defaults]): defaults.version is the version when the
-- section has none (Tamarco read `system.logging.version` for this sink).
-- The host, type and tags written in every record are encoded once, here.
function udp.new(section, defaults)
    local host, port = section.host or "127.0.0.1", section.port or 5959
    local version = require("tamarco.ops.log_sinks").logstash_version(section, "logstash",
        defaults and defaults.version or 1)
    local source_host = require("tamarco.ops.log_sinks").host_name(section)
    local sender = open_sender(host, port, version, source_host, section.message_type or "logstash",
        section.tags or {})
    local dropped = require("tamarco.ops.log_sinks.queue").dropped_counter("logstash")
    local sink = { name = "logstash", wants_source = true }

    local function count(lost)
        if lost > 0 then dropped:inc(lost) end
    end
    function sink:emit(record)
        local lost = sender:send_logstash(record)
        if lost > 0 then dropped:inc(lost) end
    end
    -- the same datagram from the record's parts (see tamarco.logging)
    function sink:emit_parts(...)
        local lost = sender:send_parts(...)
        if not lost then return false end
        if lost > 0 then dropped:inc(lost) end
        return true
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
