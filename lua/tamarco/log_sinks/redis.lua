--- tamarco.log_sinks.redis: RPUSH of logstash v1 JSON records to a Redis
-- list (default key "logstash"), through the Redis resource's connection
-- code (reconnects in the background).
local clog = require "tamarco.c.log"
local queue = require "tamarco.log_sinks.queue"

local redis_sink = {}

function redis_sink.new(section)
    local process = require "tamarco.c.process"
    local key = section.key or "logstash"
    local host_name = process.hostname()
    local client
    local sink = { name = "redis" }
    sink.queue = queue.new {
        name = "redis",
        capacity = section.queue_size,
        batch = 500,
        send = function(lines)
            if not client then
                local redis = require "tamarco.resources.redis"
                local connected, err = redis.client():connect_to {
                    host = section.host or "127.0.0.1", port = section.port or 6379,
                    password = section.password, db = section.db or 0,
                }
                if not connected then return nil, err end
                client = connected
            end
            return client:call("RPUSH", key, unpack(lines))
        end,
    }
    function sink:emit(record)
        self.queue:push(clog.encode_logstash(record, 1, host_name, "Logstash", {}))
    end
    function sink:start() self.queue:start() end
    function sink:close_connection()
        if client then client:close() client = nil end
    end
    return sink
end

return redis_sink
