--- tamarco.core.logging: levels, profiles, records, secret masking and sinks.
--
-- The policy of logging (DESIGN §6). Encoding and file bytes are in C
-- (tamarco.c.log); this module decides what is logged and where.
--
--     local logging = require "tamarco.core.logging"
--     logging.configure { service_name = "hello", profile = "DEVELOP" }
--     local log = logging.get_logger("hello.redis")
--     log:info("connected", { host = "127.0.0.1", port = 6379 })
--
-- A record is a flat table: @timestamp, level, logger, message, service_name,
-- deploy_name, service_instance_id, the caller's extra fields and, on errors,
-- traceback. An extra field named like one of the standard fields is kept as
-- extra_<name> (extra `message` -> `extra_message`). A sink is any table
--     { name = "...", emit = function(self, record) end,
--       flush = function(self) end, close = function(self) end }
-- (flush and close optional) added with logging.add_sink. A sink may also
-- have emit_parts(self, timestamp, level, logger, message, extra,
-- source_path, source_line, service_name, deploy_name, service_instance_id)
-- -> true | false: while every active sink has one, records whose message
-- and extra fields need no masking reach them in these parts, without a
-- record table (false: this one needs the table after all). stdout and the
-- rotating file are sinks made here; remote sinks (UDP logstash, Redis, HTTP)
-- plug in the same way. A sink that raises is disabled with one line on
-- stderr; logging never raises into its caller.
local backoff = require "tamarco.c.backoff"
local clog = require "tamarco.c.log"
local encode_json_parts = clog.encode_json_parts
local timer = require "tamarco.c.timer"
local errors = require "tamarco.core.errors"
local mask_urls = require("tamarco.core.secrets").mask_urls

local logging = {}

logging.LEVELS = { DEBUG = 10, INFO = 20, WARNING = 30, ERROR = 40, CRITICAL = 50 }
logging.PROFILES = { DEVELOP = "DEBUG", TESTING = "DEBUG", PRODUCTION = "INFO" }
logging.DEFAULT_PROFILE = "DEVELOP"
logging.DEFAULT_FILE_MAX_BYTES = 10485760
logging.DEFAULT_FILE_BACKUP_COUNT = 5
logging.DEFAULT_FLUSH_INTERVAL_MS = 1000
logging.DEFAULT_FILE_BUFFER_BYTES = 65536

local LEVELS = logging.LEVELS
local STANDARD = {
    ["@timestamp"] = true, level = true, logger = true, message = true,
    service_name = true, deploy_name = true, service_instance_id = true,
}
local SECRET_WORDS = { "password", "passwd", "secret", "token", "authorization", "api_key", "apikey" }
local MASK = "***"
local MAX_MASK_DEPTH = 16

-- Module state: one logging configuration per Lua state.
local state = {
    level = LEVELS.INFO,
    profile = nil,
    service_name = nil,
    deploy_name = nil,
    instance_id = nil,
    sinks = {},             -- ordered list of active sinks
    builtin = {},           -- the sinks configure() made: { stdout = s, file = s }
    flush_interval_ms = logging.DEFAULT_FLUSH_INTERVAL_MS,
    wants_source = false,   -- an active sink places the caller's file (logstash layouts)
    by_parts = false,       -- every active sink takes records in parts (emit_parts)
}

-- A sink with `wants_source = true` gets source_path and source_line (the
-- file and line of the logging call) in every record. Looking them up costs
-- more than the rest of a record, so only while such a sink is active.
local function refresh_wants_source()
    local wants, by_parts = false, #state.sinks > 0
    for _, s in ipairs(state.sinks) do
        if s.wants_source then wants = true end
        if type(s.emit_parts) ~= "function" then by_parts = false end
    end
    state.wants_source = wants
    state.by_parts = by_parts
end

local function stderr_line(text)
    pcall(function()
        io.stderr:write("tamarco.logging: ", text, "\n")
        io.stderr:flush()
    end)
end

local function profile_level(profile, where)
    local level_name = logging.PROFILES[profile]
    if not level_name then
        errors.raise("settings", ("%s: unknown logging profile %q (expected DEVELOP, TESTING or PRODUCTION)")
            :format(where or "logging", tostring(profile)))
    end
    return LEVELS[level_name]
end

-- ---- secrets ----

--- logging.is_secret_key(key) -> true when a value under key must be masked.
local function secret_word_in(key)
    local k = key:lower():gsub("-", "_")
    for _, word in ipairs(SECRET_WORDS) do
        if k:find(word, 1, true) then return true end
    end
    return false
end

-- The answer per key string, cached: records repeat the same few keys, and
-- lowering and searching them is most of the cost of a record. Bounded, as
-- keys may be made up at run time.
local secret_cache, secret_cache_size = {}, 0
local SECRET_CACHE_MAX = 4096

--- logging.is_secret_key(key) -> true when a value under key must be masked
-- (the key names a password, token, secret, authorization, ...).
function logging.is_secret_key(key)
    if type(key) ~= "string" then return false end
    local secret = secret_cache[key]
    if secret == nil then
        secret = secret_word_in(key)
        if secret_cache_size >= SECRET_CACHE_MAX then
            secret_cache, secret_cache_size = {}, 0
        end
        secret_cache[key] = secret
        secret_cache_size = secret_cache_size + 1
    end
    return secret
end
local is_secret_key = logging.is_secret_key

-- A copy of a table value with every secret-keyed value masked (the caller's
-- table is never changed). Cycles and deep tables are left to the encoder's
-- own limits, but never recursed into forever here.
local function masked(value, depth, seen)
    if type(value) ~= "table" then return mask_urls(value) end
    if depth > MAX_MASK_DEPTH or seen[value] then return value end
    seen[value] = true
    local copy = {}
    for k, v in pairs(value) do
        if is_secret_key(k) then
            copy[k] = MASK
        else
            copy[k] = masked(v, depth + 1, seen)
        end
    end
    seen[value] = nil
    return copy
end

--- logging.mask(table) -> a copy with secret-keyed values replaced by "***"
-- and the credentials inside URLs masked (tamarco.core.secrets).
function logging.mask(value)
    return masked(value, 1, {})
end

-- ---- records and sinks ----

local function disable_sink(sink, what, err)
    for i, s in ipairs(state.sinks) do
        if s == sink then
            table.remove(state.sinks, i)
            break
        end
    end
    for k, s in pairs(state.builtin) do
        if s == sink then state.builtin[k] = nil end
    end
    refresh_wants_source()
    stderr_line(("sink %q disabled: %s raised: %s"):format(tostring(sink.name), what, tostring(err)))
end

local function dispatch(record)
    local sinks = state.sinks
    -- iterate over a snapshot: a failing sink removes itself from the list
    local n = #sinks
    if n == 1 then
        local sink = sinks[1]
        local ok, err = pcall(sink.emit, sink, record)
        if not ok then disable_sink(sink, "emit", err) end
        return
    end
    local snapshot = { unpack(sinks, 1, n) }
    for i = 1, n do
        local sink = snapshot[i]
        local ok, err = pcall(sink.emit, sink, record)
        if not ok then disable_sink(sink, "emit", err) end
    end
end

-- The formatted timestamp of the current millisecond: records come many
-- per millisecond under load, formatting one costs more than the rest.
local floor = math.floor
local now = timer.time
local last_ms, last_timestamp = nil, nil

local function timestamp()
    local t = now()
    local ms = floor(t * 1000 + 0.5)   -- as clog.timestamp rounds
    if ms ~= last_ms then
        last_ms, last_timestamp = ms, clog.timestamp(t)
    end
    return last_timestamp
end

-- The record made at time `ts` (a timestamp string), see make_record.
local function record_at(ts, name, level_name, message, extra, traceback)
    local record = {
        ["@timestamp"] = ts,
        level = level_name,
        logger = name,
        message = mask_urls(type(message) == "string" and message or tostring(message)),
        service_name = state.service_name,
        deploy_name = state.deploy_name,
        service_instance_id = state.instance_id,
    }
    if type(extra) == "table" then
        for k, v in pairs(extra) do
            local key = type(k) == "string" and k or tostring(k)
            if key == "traceback" and traceback == nil then
                traceback = v
            else
                if is_secret_key(key) then
                    v = MASK
                elseif type(v) == "table" then
                    v = masked(v, 1, {})
                else
                    v = mask_urls(v)
                end
                record[STANDARD[key] and "extra_" .. key or key] = v
            end
        end
    elseif extra ~= nil then
        record.extra = mask_urls(tostring(extra))
    end
    if traceback ~= nil then record.traceback = mask_urls(tostring(traceback)) end
    return record
end

--- logging.make_record(logger_name, level_name, message[, extra[, traceback]])
-- -> record table (secrets masked; extra can't override standard fields).
function logging.make_record(name, level_name, message, extra, traceback)
    return record_at(timestamp(), name, level_name, message, extra, traceback)
end
local make_record = logging.make_record

local find = string.find

-- true when record_at would take message and extra as they are: no URL
-- credentials to mask, no secret-named key, no table to copy, no key to
-- turn into a string. Such a record can go to the sinks in parts.
local function plain_parts(message, extra)
    if type(message) ~= "string" or find(message, "://", 1, true) then return false end
    if extra == nil then return true end
    if type(extra) ~= "table" then return false end
    for k, v in pairs(extra) do
        if type(k) ~= "string" then return false end
        local secret = secret_cache[k]   -- is_secret_key, its cache first
        if secret or (secret == nil and is_secret_key(k)) then return false end
        local t = type(v)
        if t == "table" or (t == "string" and find(v, "://", 1, true)) then return false end
    end
    return true
end

-- The record in parts to every sink (all have emit_parts); one that says
-- it needs the table gets it, made once.
local function dispatch_parts(name, level_name, message, extra, path, line)
    local ts = timestamp()
    local sinks = state.sinks
    local n = #sinks
    if n > 1 then sinks = { unpack(sinks, 1, n) } end   -- a failing sink leaves the list
    local record
    for i = 1, n do
        local sink = sinks[i]
        local ok, done = pcall(sink.emit_parts, sink, ts, level_name, name, message, extra, path, line,
            state.service_name, state.deploy_name, state.instance_id)
        if ok and not done then
            if not record then
                record = record_at(ts, name, level_name, message, extra)
                if path then record.source_path, record.source_line = path, line end
            end
            ok, done = pcall(sink.emit, sink, record)
        end
        if not ok then disable_sink(sink, "emit", done) end
    end
end

local caller = clog.caller

-- Called by the logger methods only: level 3 is the code that logged.
local function log(name, level_name, message, extra, traceback)
    if state.by_parts and traceback == nil and plain_parts(message, extra) then
        local path, line
        if state.wants_source then path, line = caller(3) end
        return dispatch_parts(name, level_name, message, extra, path, line)
    end
    local ok, record = pcall(make_record, name, level_name, message, extra, traceback)
    if not ok then
        stderr_line("cannot build a log record: " .. tostring(record))
        return
    end
    if state.wants_source then
        local path, line = caller(3)
        if path then
            record.source_path = path
            record.source_line = line
        end
    end
    dispatch(record)
end

--- logging.emit_thread_record(record, thread_name): a record a thread made
-- with its own tamarco.core.logging (see tamarco.core.thread_logging) enters the
-- service's logging: the service's level applies, the identity fields are
-- the service's, thread_name says which thread logged it.
function logging.emit_thread_record(record, thread_name)
    if type(record) ~= "table" then return end
    local level = LEVELS[record.level]
    if not level or level < state.level then return end
    record.service_name = state.service_name
    record.deploy_name = state.deploy_name
    record.service_instance_id = state.instance_id
    if record.thread_name == nil then record.thread_name = thread_name end
    dispatch(record)
end

--- logging.add_sink(sink): sink.emit(self, record) is called for each record.
function logging.add_sink(sink)
    assert(type(sink) == "table" and type(sink.emit) == "function",
        "logging.add_sink: a sink is a table with an emit(self, record) method")
    for _, s in ipairs(state.sinks) do
        if s == sink then return sink end
    end
    state.sinks[#state.sinks + 1] = sink
    refresh_wants_source()
    return sink
end

--- logging.remove_sink(sink) -> true when it was active (it is not closed).
function logging.remove_sink(sink)
    for i, s in ipairs(state.sinks) do
        if s == sink then
            table.remove(state.sinks, i)
            refresh_wants_source()
            return true
        end
    end
    return false
end

--- logging.sinks() -> a copy of the list of active sinks.
function logging.sinks()
    return { unpack(state.sinks) }
end

local function call_each(method)
    for _, sink in ipairs({ unpack(state.sinks) }) do
        local fn = sink[method]
        if type(fn) == "function" then
            local ok, err = pcall(fn, sink)
            if not ok then disable_sink(sink, method, err) end
        end
    end
end

--- logging.flush(): flushes every sink (the host calls it periodically, every
-- logging.flush_interval_ms(), and at stop).
function logging.flush()
    call_each("flush")
end

--- logging.close(): flushes and closes every sink and removes them.
function logging.close()
    call_each("flush")
    call_each("close")
    state.sinks = {}
    state.builtin = {}
    refresh_wants_source()
end

-- ---- built-in sinks ----

local function stdout_is_tty()
    if not io.stdout then return false end
    local ok, luv = pcall(require, "luv")
    return ok and type(luv) == "table" and luv.guess_handle and luv.guess_handle(1) == "tty" or false
end
logging.stdout_is_tty = stdout_is_tty

--- logging.stdout_sink{ format = "text"|"json", color = bool, tty = bool,
-- stream = io.stdout } -> sink. stdout is line-buffered: each record
-- reaches its reader (terminal, pipe, journald) at once, in one write.
function logging.stdout_sink(opts)
    opts = opts or {}
    local tty = opts.tty
    if tty == nil then tty = stdout_is_tty() end
    local sink = {
        name = "stdout",
        format = opts.format or "json",
        color = opts.color and true or false,
        tty = tty,
        stream = opts.stream or io.stdout,
    }
    if sink.stream == io.stdout then io.stdout:setvbuf("line") end
    if sink.format ~= "text" and sink.format ~= "json" then
        errors.raise("settings", ("logging: stdout format must be \"text\" or \"json\", not %q")
            :format(tostring(sink.format)))
    end
    function sink:emit(record)
        local line
        if self.format == "json" then
            line = clog.encode_json(record)
        else
            line = clog.format_text(record, self.color)
        end
        self.stream:write(line, "\n")
        if self.tty then self.stream:flush() end
    end
    -- the same line from a record's parts (see add_sink)
    function sink:emit_parts(...)
        local line = self.format == "json" and encode_json_parts(...)
        if not line then return false end
        self.stream:write(line, "\n")
        if self.tty then self.stream:flush() end
        return true
    end
    if sink.format ~= "json" then sink.emit_parts = nil end
    function sink:flush() self.stream:flush() end
    function sink:close() self.stream:flush() end
    return sink
end

-- The host's loop (luv shares it), or nil where there is none to ask.
local function loop()
    local ok, uv = pcall(require, "luv")
    if ok and type(uv) == "table" and uv.new_prepare then return uv end
    return nil
end

--- logging.every_loop_turn(fn) -> handle | nil: runs fn(handle) at the end
-- of every loop turn, before the loop waits for I/O (a libuv prepare
-- handle, unref'd: it never keeps the service alive). For sinks that gather
-- records and must hand them over within one turn. nil without a loop.
function logging.every_loop_turn(fn)
    local uv = loop()
    if not uv then return nil end
    local handle = uv.new_prepare()
    handle:start(function() fn(handle) end)
    handle:unref()
    return handle
end
local every_loop_turn = logging.every_loop_turn

--- logging.stop_handle(handle): closes what every_loop_turn returned.
function logging.stop_handle(handle)
    if handle and not handle:is_closing() then handle:close() end
end
local stop_handle = logging.stop_handle

logging.FILE_RETRY_MIN_MS = 100
logging.FILE_RETRY_MAX_MS = 5000

--- logging.file_sink{ path, max_bytes, backup_count, buffer_bytes = 65536 }
-- -> sink | nil, message. JSON lines appended to a rotating file, gathered
-- in a buffer written when it passes buffer_bytes, at the end of every loop
-- turn (a record reaches the file within one turn), at once for ERROR and
-- CRITICAL records, at logging.flush() and at close. Without a loop, one
-- write per line.
--
-- A write that fails (a full disk, say) never disables the sink: records
-- are dropped and counted (sink:dropped(), the metric
-- logging_dropped_records_total{sink="file"}) and writing is tried again
-- after a back-off (100 ms doubling to 5 s; ERROR and CRITICAL records are
-- always tried at once). When a write succeeds again a WARNING record says
-- how many records were lost.
function logging.file_sink(opts)
    local buffer_bytes = loop() and (opts.buffer_bytes or logging.DEFAULT_FILE_BUFFER_BYTES) or 0
    local file, err = clog.open_file(opts.path,
        opts.max_bytes or logging.DEFAULT_FILE_MAX_BYTES,
        opts.backup_count or logging.DEFAULT_FILE_BACKUP_COUNT, buffer_bytes)
    if not file then return nil, err end
    local sink = { name = "file", path = opts.path, file = file }
    local skipped = 0          -- records not even tried during a back-off
    local retry_at             -- set while failing
    local delays = backoff.new { min_ms = logging.FILE_RETRY_MIN_MS, max_ms = logging.FILE_RETRY_MAX_MS }
    local reported = 0         -- drops already counted in the metric

    local function count_drops()
        local total = skipped + file:dropped()
        if total > reported then
            local ok, metrics = pcall(require, "tamarco.core.metrics")
            if ok then
                metrics.counter("logging_dropped_records_total", {
                    help = "Log records dropped because a remote sink's queue was full",
                    labels = { sink = "file" },
                }):inc(total - reported)
            end
            reported = total
        end
    end
    local function failed(werr)
        count_drops()
        if not retry_at then
            delays:reset()
            stderr_line(("sink \"file\" failing (records are dropped, retried with back-off): %s")
                :format(tostring(werr)))
        end
        sink.failure = tostring(werr)
        retry_at = timer.now() + delays:next()
    end
    local function written()
        if not retry_at then return end
        retry_at = nil
        count_drops()
        local lost, why = reported - (sink.resumed_after or 0), sink.failure
        sink.resumed_after = reported
        -- through every sink: the file shows where its gap is
        logging.get_logger("tamarco.logging"):warning("file sink resumed", {
            dropped_records = lost, error = why, path = sink.path,
        })
    end
    local function backing_off()
        return retry_at ~= nil and timer.now() < retry_at
    end
    local function try_flush()
        local ok, werr = file:flush()
        if ok then written() else failed(werr) end
        return ok
    end

    if buffer_bytes > 0 then
        sink.turn = every_loop_turn(function()
            if not backing_off() then try_flush() end
        end)
    end
    function sink:emit(record)
        local level = record.level
        -- errors go to the disk at once: they are the lines a crash or the
        -- watchdog's exit must not take with it
        local urgent = level == "ERROR" or level == "CRITICAL"
        if not urgent and backing_off() then
            skipped = skipped + 1
            return
        end
        local ok, werr = file:write_json(record)
        if not ok then return failed(werr) end
        if urgent then try_flush() end
    end
    -- the same line from a record's parts (see add_sink)
    function sink:emit_parts(ts, level, ...)
        local urgent = level == "ERROR" or level == "CRITICAL"
        if not urgent and backing_off() then
            skipped = skipped + 1
            return true
        end
        local ok, werr = file:write_json_parts(ts, level, ...)
        if ok == false then return false end
        if not ok then
            failed(werr)
        elseif urgent then
            try_flush()
        end
        return true
    end
    function sink:flush() try_flush() end
    --- sink:dropped() -> records lost since the sink was made.
    function sink:dropped() return skipped + file:dropped() end
    function sink:reopen() return file:reopen() end
    function sink:close()
        stop_handle(self.turn)
        file:close()
        count_drops()
    end
    return sink
end

-- ---- configuration ----

local function check_positive(name, value)
    if type(value) ~= "number" or value < 0 then
        errors.raise("settings", ("logging: %s must be a number >= 0, not %s"):format(name, tostring(value)))
    end
    return value
end

--- logging.configure{ service_name, deploy_name, instance_id, profile,
--   stdout = true, stdout_format = "text"|"json" (text in DEVELOP on a
--   terminal, else json),
--   color = nil (auto: stdout is a tty), file_path, file_max_bytes = 10485760,
--   file_backup_count = 5, flush_interval_ms = 1000,
--   tty = nil (auto), stream = io.stdout (a stand-in for specs) }
-- Replaces the stdout and file sinks of a previous call; sinks added with
-- add_sink stay. Bad values raise a "settings" error.
function logging.configure(opts)
    opts = opts or {}
    local profile = opts.profile or logging.DEFAULT_PROFILE
    if type(profile) == "string" then profile = profile:upper() end
    local level = profile_level(profile, "logging.configure")
    local tty = opts.tty
    if tty == nil then tty = stdout_is_tty() end
    -- text only for a person at a terminal; a pipe (journald, a collector)
    -- gets JSON lines with every field
    local stdout_format = opts.stdout_format or ((profile == "DEVELOP" and tty) and "text" or "json")
    local flush_interval = check_positive("flush_interval_ms",
        opts.flush_interval_ms or logging.DEFAULT_FLUSH_INTERVAL_MS)

    -- Build the new sinks before dropping the old ones: a bad file path leaves
    -- the previous configuration in place.
    local new = {}
    if opts.stdout ~= false then
        local color = opts.color
        if color == nil then color = tty end
        new.stdout = logging.stdout_sink {
            format = stdout_format, color = color, tty = tty, stream = opts.stream,
        }
    end
    if opts.file_path and opts.file_path ~= "" then
        local sink, err = logging.file_sink {
            path = opts.file_path,
            max_bytes = check_positive("file_max_bytes", opts.file_max_bytes or logging.DEFAULT_FILE_MAX_BYTES),
            backup_count = check_positive("file_backup_count",
                opts.file_backup_count or logging.DEFAULT_FILE_BACKUP_COUNT),
        }
        if not sink then
            errors.raise("settings", "logging.file_path: " .. tostring(err))
        end
        new.file = sink
    end

    for _, key in ipairs({ "stdout", "file" }) do
        local old = state.builtin[key]
        if old then
            logging.remove_sink(old)
            pcall(old.flush, old)
            pcall(old.close, old)
        end
    end
    state.builtin = new
    state.profile = profile
    state.level = level
    state.service_name = opts.service_name
    state.deploy_name = opts.deploy_name
    state.instance_id = opts.instance_id
    state.flush_interval_ms = flush_interval
    -- built-in sinks first, then the remote ones in the order they came
    local sinks = {}
    if new.stdout then sinks[#sinks + 1] = new.stdout end
    if new.file then sinks[#sinks + 1] = new.file end
    for _, s in ipairs(state.sinks) do sinks[#sinks + 1] = s end
    state.sinks = sinks
    refresh_wants_source()
end

--- logging.configure_from_settings(view, identity): Tamarco's keys through a
-- settings view (`view:get(key, default)`, resolved under system.*):
-- logging.profile, logging.stdout, logging.stdout_format (text | json),
-- logging.file_path, logging.file_max_bytes,
-- logging.file_backup_count. identity = { service_name, deploy_name, instance_id }.
function logging.configure_from_settings(view, identity)
    identity = identity or {}
    local function get(key, default)
        local value = view:get(key, default)
        if value == nil then return default end
        return value
    end
    -- a bad value is reported with where it comes from (file and line, ...)
    local function fail(key, problem)
        if type(view.error) == "function" then error(view:error(key, problem), 0) end
        errors.raise("settings", key .. ": " .. problem)
    end
    local profile = get("logging.profile", logging.DEFAULT_PROFILE)
    if type(profile) ~= "string" or not logging.PROFILES[profile:upper()] then
        fail("logging.profile", ("must be DEVELOP, TESTING or PRODUCTION, not %q"):format(tostring(profile)))
    end
    local function size(key, default)
        local raw = get(key, default)
        local value = tonumber(raw)
        if not value or value < 0 then fail(key, ("must be a number >= 0, not %q"):format(tostring(raw))) end
        return value
    end
    local stdout = get("logging.stdout", true)
    if type(stdout) == "string" then stdout = stdout:lower() ~= "false" end
    local stdout_format = get("logging.stdout_format", nil)
    if stdout_format ~= nil and stdout_format ~= "text" and stdout_format ~= "json" then
        fail("logging.stdout_format", ("must be text or json, not %q"):format(tostring(stdout_format)))
    end
    local file_path = get("logging.file_path", nil)
    if file_path == false then file_path = nil end
    if file_path ~= nil and type(file_path) ~= "string" then
        fail("logging.file_path", "must be a path, not " .. type(file_path))
    end
    local options = {
        service_name = identity.service_name,
        deploy_name = identity.deploy_name,
        instance_id = identity.instance_id,
        profile = profile,
        stdout = stdout ~= false,
        stdout_format = stdout_format,
        file_path = file_path,
        file_max_bytes = size("logging.file_max_bytes", logging.DEFAULT_FILE_MAX_BYTES),
        file_backup_count = size("logging.file_backup_count", logging.DEFAULT_FILE_BACKUP_COUNT),
    }
    local ok, err = pcall(logging.configure, options)
    if not ok then
        -- the file cannot be opened: say which setting named it
        if file_path and errors.is(err, "settings") then
            fail("logging.file_path", (tostring(err):gsub("^logging%.file_path: ", "")))
        end
        error(err, 0)
    end
end

--- logging.provisional(service_name): stdout logging before the settings are
-- loaded: INFO and up, colored text on a tty, JSON lines otherwise.
function logging.provisional(service_name)
    local tty = stdout_is_tty()
    logging.configure {
        service_name = service_name,
        profile = "PRODUCTION",
        stdout_format = tty and "text" or "json",
        tty = tty,
    }
    return logging.get_logger(service_name)
end

--- logging.set_profile(profile): changes the level live (not the formats).
function logging.set_profile(profile)
    if type(profile) == "string" then profile = profile:upper() end
    state.level = profile_level(profile, "logging.set_profile")
    state.profile = profile
end

--- logging.set_level(level_name): the level of the whole service, live
-- (loggers with a level of their own keep it).
function logging.set_level(level_name)
    local level = LEVELS[level_name]
    if not level then error("unknown log level: " .. tostring(level_name), 2) end
    state.level = level
end

--- logging.level() -> the name of the service's current level.
function logging.level()
    for name, level in pairs(LEVELS) do
        if level == state.level then return name end
    end
end

--- logging.profile() -> the current profile name (nil before configure).
function logging.profile()
    return state.profile
end

--- logging.is_enabled(level_name) -> true when records of that level are kept.
function logging.is_enabled(level_name)
    local level = LEVELS[level_name]
    return level ~= nil and level >= state.level
end

--- logging.flush_interval_ms() -> how often the host should call logging.flush().
function logging.flush_interval_ms()
    return state.flush_interval_ms
end

-- ---- loggers ----

local Logger = {}
Logger.__index = Logger
Logger.__tostring = function(l) return "tamarco.logger (" .. l.name .. ")" end

-- The level is checked before anything else, so a disabled call costs one
-- comparison and no allocation.
local function method(level_name)
    local level = LEVELS[level_name]
    return function(self, message, extra)
        if level < (self.level or state.level) then return end
        log(self.name, level_name, message, extra)
    end
end

Logger.debug = method("DEBUG")
Logger.info = method("INFO")
Logger.warning = method("WARNING")
Logger.warn = Logger.warning
Logger.error = method("ERROR")
Logger.critical = method("CRITICAL")

--- logger:exception(message, err, traceback, extra): an ERROR record with the
-- error (field `error`) and its traceback (else extra.traceback, else the
-- traceback of this call).
function Logger:exception(message, err, traceback, extra)
    if LEVELS.ERROR < (self.level or state.level) then return end
    if traceback == nil and type(extra) == "table" then traceback = extra.traceback end
    if traceback == nil then traceback = debug.traceback("", 2) end
    if err ~= nil then
        local copy = {}
        if type(extra) == "table" then
            for k, v in pairs(extra) do copy[k] = v end
        end
        if copy.error ~= nil then copy.extra_error, copy.error = copy.error, nil end
        copy.error = tostring(err)
        extra = copy
    end
    log(self.name, "ERROR", message, extra, traceback)
end

--- logger:log(level_name, message, extra)
function Logger:log(level_name, message, extra)
    local level = LEVELS[level_name]
    if not level then error("unknown log level: " .. tostring(level_name), 2) end
    if level < (self.level or state.level) then return end
    log(self.name, level_name, message, extra)
end

function Logger:is_enabled_for(level_name)
    local level = LEVELS[level_name]
    return level ~= nil and level >= (self.level or state.level)
end

local loggers = setmetatable({}, { __mode = "v" })

-- Levels of single loggers set at run time (name -> level number): a logger
-- takes the one of its nearest ancestor ("hello.api" for "hello.api.v1")
-- as its field `level`; nil means the service's level.
local logger_levels = {}

local function level_for(name)
    while name do
        local level = logger_levels[name]
        if level then return level end
        name = name:match("^(.*)%.[^.]*$")
    end
    return nil
end

--- logging.set_logger_level(name, level_name | nil): the level of logger
-- `name` and its descendants, live; nil gives them the service's level back.
function logging.set_logger_level(name, level_name)
    local level = nil
    if level_name ~= nil then
        level = LEVELS[level_name]
        if not level then error("unknown log level: " .. tostring(level_name), 2) end
    end
    logger_levels[name] = level
    for logger_name, logger in pairs(loggers) do logger.level = level_for(logger_name) end
end

--- logging.logger_levels() -> { [logger name] = level name } set at run time.
function logging.logger_levels()
    local out = {}
    for name, level in pairs(logger_levels) do
        for level_name, n in pairs(LEVELS) do
            if n == level then out[name] = level_name end
        end
    end
    return out
end

--- logging.get_logger(name) -> logger ("hello", "hello.redis"); defaults to
-- the service name.
function logging.get_logger(name)
    name = name or state.service_name or "tamarco"
    name = tostring(name)
    local logger = loggers[name]
    if not logger then
        logger = setmetatable({ name = name, level = level_for(name) }, Logger)
        loggers[name] = logger
    end
    return logger
end

--- logger:child("redis") -> the logger "<name>.redis".
function Logger:child(suffix)
    return logging.get_logger(self.name .. "." .. suffix)
end

return logging
