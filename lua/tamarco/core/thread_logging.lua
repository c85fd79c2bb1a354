--- tamarco.core.thread_logging: logging inside a thread (svc:thread,
-- tamarco.core.thread). Runs in the thread's own Lua state before its function:
-- tamarco.core.logging there gets one sink that sends every record to the
-- service's loop over the thread's message channel (ctx:log), where the
-- service's level, identity fields and sinks apply (see
-- logging.emit_thread_record). ctx.logger is the logger `<service>.<thread>`.
--
-- A record is never dropped silently: a value a message cannot carry (a
-- function, userdata) is sent as its text, and once the service no longer
-- listens (a stop that timed out detached the thread) records go to stderr
-- as JSON lines.
local clog = require "tamarco.c.log"
local logging = require "tamarco.core.logging"

local MAX_DEPTH = 16

-- A copy that a message can carry: other values become their text.
local function plain(value, depth, seen)
    local kind = type(value)
    if kind == "nil" or kind == "boolean" or kind == "number" or kind == "string" then return value end
    if kind ~= "table" then return tostring(value) end
    if depth > MAX_DEPTH or seen[value] then return "<" .. tostring(value) .. ">" end
    seen[value] = true
    local copy = {}
    for k, v in pairs(value) do
        local key_kind = type(k)
        if key_kind ~= "string" and key_kind ~= "number" and key_kind ~= "boolean" then k = tostring(k) end
        copy[k] = plain(v, depth + 1, seen)
    end
    seen[value] = nil
    return copy
end

return function(ctx)
    local send = ctx.log
    -- every level goes to the loop: the service's live profile filters there
    logging.configure { profile = "DEVELOP", stdout = false, tty = false }
    logging.add_sink {
        name = "service",
        emit = function(_, record)
            local ok, sent = pcall(send, ctx, record)
            if not ok then ok, sent = pcall(send, ctx, plain(record, 1, {})) end
            if not (ok and sent) then
                record.thread_name = record.thread_name or ctx.name
                io.stderr:write(clog.encode_json(record), "\n")
            end
        end,
    }
    ctx.logger = logging.get_logger(ctx.logger_name or ctx.name)
end
