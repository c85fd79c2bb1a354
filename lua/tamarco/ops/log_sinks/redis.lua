--- tamarco.ops.log_sinks.redis: RPUSH of logstash JSON records to a Redis list
-- (default key "logstash"), through the Redis resource's connection code
-- (reconnects in the background). As Tamarco's Redis handler: logstash
-- version 0 and type "record" unless `version` / `message_type` say
-- otherwise.
local clog = require "tamarco.c.log"
local queue = require "tamarco.ops.log_sinks.queue"

local redis_sink = {}

-- An error the server answered (a reply like "WRONGPASS ...", "NOAUTH ...",
-- "WRONGTYPE ...") or an authentication that failed: sending the same
-- records again cannot succeed.
local function is_refusal(err)
    err = tostring(err)
    return err:find("^%u+ ") ~= nil or err:find("authentication failed", 1, true) ~= nil
end

--- redis_sink.new(section, options): options.report(level, message, fields).
function redis_sink.new(section, options)
    options = options or {}
    local log_sinks = require "tamarco.ops.log_sinks"
    if section.ssl == true then
        -- never send the logs in clear text to a peer that expects TLS
        require("tamarco.core.errors").raise("settings",
            "system.logging.redis.ssl: TLS to Redis is not supported; set ssl: false or use a local Redis")
    end
    local key = section.key or "logstash"
    local version = log_sinks.logstash_version(section, "redis", 0)
    local message_type = section.message_type or "record"
    local tags = section.tags or {}
    local host_name = require("tamarco.ops.log_sinks").host_name(section)
    local client
    local sink = { name = "redis", wants_source = true }
    sink.queue = queue.new {
        name = "redis",
        capacity = section.queue_size,
        batch = 500,
        report = options.report,
        send = function(lines)
            if not client then
                local redis = require "tamarco.resources.redis"
                local connected, err = redis.client():connect_to {
                    host = section.host or "127.0.0.1", port = section.port or 6379,
                    username = section.username, password = section.password, db = section.db or 0,
                }
                if not connected then return nil, err, is_refusal(err) end
                client = connected
            end
            local ok, err = client:call("RPUSH", key, unpack(lines))
            if ok then return true end
            return nil, err, is_refusal(err)
        end,
    }
    function sink:emit(record)
        self.queue:push(clog.encode_logstash(record, version, host_name, message_type, tags))
    end
    function sink:start() self.queue:start() end
    function sink:close_connection()
        if client then client:close() client = nil end
    end
    return sink
end

return redis_sink
