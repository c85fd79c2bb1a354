--- tamarco.core.metrics.reporters: where collected metrics go besides /metrics.
--
--   local reporters = require "tamarco.core.metrics.reporters"
--   local r = reporters.carbon { host = "127.0.0.1", port = 2003, logger = logger }
--   r:report(registry, namespace)     -- once per collect_frequency (the resource does it)
--   r:close()
--
-- Every reporter has report(registry, namespace[, now_seconds]) and close(),
-- and a `format`: "carbon" (Graphite plaintext lines, `path value
-- timestamp\n`) or "prometheus" (the text exposition).
--
-- carbon {host, port, prefix, format = "carbon", max_queue_bytes = 4 MiB,
--   reconnect_min = 0.5, reconnect_max = 30 (seconds)}: a TCP connection on
--   the host's loop (luv), opened by open() or the first report, reconnected
--   with exponential backoff when it fails or the peer closes it. Nothing
--   ever blocks the loop: a batch is written when connected (and dropped,
--   counted in `dropped`, while disconnected or when the socket's write
--   queue already holds max_queue_bytes).
-- file {path, format = "prometheus"}: appends each batch to path
--   (asynchronous open/write/close on the loop, one write per batch, in
--   order; at most 100 batches wait, more are dropped and counted). The
--   prometheus format is preceded by a "# tamarco metrics at <unix time>"
--   comment line.
-- stdout {format = "carbon", stream = io.stdout}: writes each batch.
--
-- Carbon paths: `<prefix>.<id>` then `.<label>.<value>` for each label in
-- name order (characters other than [A-Za-z0-9_-] in values become "_");
-- counters and gauges one line; histograms `.count`, `.sum` and
-- `.bucket.le_<bound>` (cumulative; "." in the bound becomes "_", +Inf is
-- "inf"); summaries `.count`, `.sum` and `.p<quantile*100>` (p50, p90, p99,
-- p99_9). The prefix defaults to the namespace (the service name).
--
-- With a registry in the "tamarco" naming mode, carbon lines are Tamarco's:
-- `<prefix>.<id>_<type>_<labels>__<unit> <value> <timestamp>`, the id as
-- given (its dots kept), labels `name_value` joined by "." (sorted by name;
-- whitespace in values becomes "_"), the unit of the meter, the timestamp
-- in seconds with its fraction; a summary writes `<id>_sum`, `<id>_count`
-- then `<id>` with a `quantile_<q>` label per quantile (none while it has
-- no samples), a histogram `<id>_sum`, `<id>_count` and `<id>_bucket` with
-- an `le_<bound>` label. The metrics resource makes the prefix Tamarco's
-- `<deploy_name>.<service>.<hostname>` for carbon and stdout.
local backoff = require "tamarco.c.backoff"
local metrics = require "tamarco.core.metrics"
local prometheus = require "tamarco.core.metrics.prometheus"
local ctimer = require "tamarco.c.timer"

local format_value = metrics.format_value
local concat = table.concat
local floor = math.floor

local reporters = {}

---------------------------------------------------------------------------
-- carbon plaintext encoding
---------------------------------------------------------------------------

local function path_part(v)
    return (tostring(v):gsub("[^%w_%-]", "_"))
end

local function carbon_suffix(s)
    local suffix = s.carbon_suffix
    if not suffix then
        local parts = {}
        for _, name in ipairs(s.label_names) do
            parts[#parts + 1] = "." .. name .. "." .. path_part(s.label_set[name])
        end
        suffix = concat(parts)
        s.carbon_suffix = suffix
    end
    return suffix
end

local function bucket_names(f)
    local names = f.carbon_buckets
    if not names then
        names = {}
        for i, b in ipairs(f.bounds) do names[i] = ".bucket.le_" .. format_value(b):gsub("[.+]", "_") end
        names[#f.bounds + 1] = ".bucket.le_inf"
        f.carbon_buckets = names
    end
    return names
end

local function quantile_names(f)
    local names = f.carbon_quantiles
    if not names then
        names = {}
        for i, q in ipairs(f.quantiles) do names[i] = ".p" .. format_value(floor(q * 1e8 + 0.5) / 1e6):gsub("[.+]", "_") end
        f.carbon_quantiles = names
    end
    return names
end

--- reporters.carbon_lines(registry, prefix, timestamp) -> text
function reporters.carbon_lines(registry, prefix, timestamp)
    local buf, n = {}, 0
    local ts = " " .. format_value(floor(timestamp)) .. "\n"
    prefix = (prefix and prefix ~= "") and (prefix .. ".") or ""
    local function line(path, v)
        buf[n + 1] = path
        buf[n + 2] = " "
        buf[n + 3] = format_value(v)
        buf[n + 4] = ts
        n = n + 4
    end
    for _, f in ipairs(registry:sorted_families()) do
        local base = prefix .. f.id
        local kind = f.kind
        for _, s in ipairs(f:sorted_series()) do
            local path = base .. carbon_suffix(s)
            if kind == "counter" or kind == "gauge" then
                line(path, s.value)
            elseif kind == "histogram" then
                line(path .. ".count", s.count)
                line(path .. ".sum", s.sum)
                local names, cum = bucket_names(f), s:buckets()
                for i = 1, #cum do line(path .. names[i], cum[i]) end
            else
                line(path .. ".count", s.count)
                line(path .. ".sum", s.sum)
                local names, values = quantile_names(f), s:quantiles()
                for i = 1, #values do line(path .. names[i], values[i]) end
            end
        end
    end
    return concat(buf, "", 1, n)
end

-- Tamarco's label part: name_value joined by "." (a value's whitespace,
-- which would break the line, becomes "_").
local function tamarco_labels(s)
    local labels = s.tamarco_labels
    if not labels then
        local parts = {}
        for _, name in ipairs(s.label_names) do
            parts[#parts + 1] = name .. "_" .. tostring(s.label_set[name]):gsub("%s", "_")
        end
        labels = concat(parts, ".")
        s.tamarco_labels = labels
    end
    return labels
end

local function with_label(labels, extra)
    return labels == "" and extra or (labels .. "." .. extra)
end

--- reporters.tamarco_carbon_lines(registry, prefix, timestamp) -> text in
-- Tamarco's layout (see the module header).
function reporters.tamarco_carbon_lines(registry, prefix, timestamp)
    local buf, n = {}, 0
    local ts = " " .. format_value(timestamp) .. "\n"
    prefix = (prefix and prefix ~= "") and (prefix .. ".") or ""
    for _, f in ipairs(registry:sorted_families()) do
        local id, kind, unit = f.source_id or f.id, f.kind, f.unit or ""
        local tail = "__" .. unit
        local function line(name, labels, v)
            buf[n + 1] = prefix .. name .. "_" .. kind .. "_" .. labels .. tail .. " " .. format_value(v) .. ts
            n = n + 1
        end
        for _, s in ipairs(f:sorted_series()) do
            local labels = tamarco_labels(s)
            if kind == "counter" or kind == "gauge" then
                line(id, labels, s.value)
            else
                line(id .. "_sum", labels, s.sum)
                line(id .. "_count", labels, s.count)
                if kind == "summary" then
                    if s.size > 0 then
                        local values = s:quantiles()
                        for i, q in ipairs(f.quantiles) do
                            line(id, with_label(labels, "quantile_" .. format_value(q)), values[i])
                        end
                    end
                else
                    local cum = s:buckets()
                    for i = 1, #cum do
                        local bound = f.bounds[i] and format_value(f.bounds[i]) or "+Inf"
                        line(id .. "_bucket", with_label(labels, "le_" .. bound), cum[i])
                    end
                end
            end
        end
    end
    return concat(buf, "", 1, n)
end

local function encode(self, registry, namespace, now)
    now = now or ctimer.time()
    if self.format == "prometheus" then
        local text = prometheus.exposition(registry, namespace)
        if self.stamp then text = ("# tamarco metrics at %d\n"):format(floor(now)) .. text end
        return text
    end
    local prefix = self.prefix
    if registry.naming == "tamarco" then return reporters.tamarco_carbon_lines(registry, prefix, now) end
    if prefix == nil then prefix = namespace or metrics.namespace() end
    return reporters.carbon_lines(registry, prefix, now)
end

local function check_format(format, default)
    format = format or default
    if format ~= "carbon" and format ~= "prometheus" then
        error("metrics reporter format must be \"carbon\" or \"prometheus\" (got " .. tostring(format) .. ")", 3)
    end
    return format
end

---------------------------------------------------------------------------
-- carbon over TCP
---------------------------------------------------------------------------

local Carbon = {}
Carbon.__index = Carbon

--- reporters.carbon(options) -> reporter (see the module header).
function reporters.carbon(options)
    options = options or {}
    local port = tonumber(options.port or 2003)
    if not port or port < 1 or port > 65535 or port ~= floor(port) then
        error("carbon reporter: port must be an integer in 1..65535 (got " .. tostring(options.port) .. ")", 2)
    end
    local reconnect_min = options.reconnect_min or 0.5
    local reconnect_max = options.reconnect_max or 30
    for name, value in pairs({ reconnect_min = reconnect_min, reconnect_max = reconnect_max }) do
        if type(value) ~= "number" or value < 0 then
            error("carbon reporter: " .. name .. " must be a number of seconds >= 0 (got " .. tostring(value) .. ")", 2)
        end
    end
    return setmetatable({
        name = "carbon",
        host = options.host or "127.0.0.1",
        port = port,
        prefix = options.prefix,
        format = check_format(options.format, "carbon"),
        logger = options.logger,
        max_queue_bytes = options.max_queue_bytes or 4 * 1024 * 1024,
        reconnect_min = reconnect_min,
        reconnect_max = reconnect_max,
        state = "disconnected",    -- connecting, connected, waiting (backoff), closed
        -- the settings are in seconds, the shared back-off counts milliseconds
        backoff = backoff.new { min_ms = reconnect_min * 1000, max_ms = reconnect_max * 1000, factor = 2 },
        sent = 0,                  -- batches handed to the socket
        dropped = 0,               -- batches dropped
        connects = 0,
    }, Carbon)
end

function Carbon:_log(level, message, fields)
    if self.logger then self.logger[level](self.logger, message, fields) end
end

function Carbon:_retry_later()
    if self.state == "closed" then return end
    self.state = "waiting"
    local delay_ms = self.backoff:next()
    local uv = require "luv"
    if not self.timer then self.timer = uv.new_timer() end
    self.timer:start(floor(delay_ms), 0, function()
        if self.state == "waiting" then self:open() end
    end)
end

function Carbon:_failed(what, err)
    if self.tcp then
        local tcp = self.tcp
        self.tcp = nil
        if not tcp:is_closing() then tcp:close() end
    end
    if self.state == "closed" then return end
    local was_connected = self.state == "connected"
    if was_connected or not self.warned then
        self:_log("warning", "carbon reporter: " .. what .. " " .. self.host .. ":" .. self.port .. ": "
            .. tostring(err), { reporter = "carbon" })
        self.warned = true
    end
    self:_retry_later()
end

--- reporter:open(): starts connecting (also done by the first report).
function Carbon:open()
    if self.state == "connecting" or self.state == "connected" or self.state == "closed" then return end
    local uv = require "luv"
    self.state = "connecting"
    local ok, err = pcall(uv.getaddrinfo, self.host, tostring(self.port), { socktype = "stream" },
        function(gai_err, addresses)
            if self.state ~= "connecting" then return end
            local addr = addresses and addresses[1]
            if gai_err or not addr then
                return self:_failed("cannot resolve", gai_err or "no address")
            end
            local tcp = uv.new_tcp()
            self.tcp = tcp
            tcp:connect(addr.addr, addr.port or self.port, function(conn_err)
                if self.tcp ~= tcp then return end   -- closed meanwhile
                if conn_err then return self:_failed("cannot connect to", conn_err) end
                self.state = "connected"
                self.backoff:reset()
                self.warned = false
                self.connects = self.connects + 1
                self:_log("info", "carbon reporter connected to " .. self.host .. ":" .. self.port,
                    { reporter = "carbon" })
                -- carbon never talks: a read ends only with EOF or an error
                tcp:read_start(function(read_err, chunk)
                    if self.tcp ~= tcp then return end
                    if read_err or chunk == nil then
                        self:_failed("connection lost to", read_err or "closed by peer")
                    end
                end)
            end)
        end)
    if not ok then self:_failed("cannot resolve", err) end
end

--- reporter:report(registry, namespace[, now]) -> true when handed to the
-- socket, false when dropped.
function Carbon:report(registry, namespace, now)
    if self.state ~= "connected" then
        self.dropped = self.dropped + 1
        if self.state == "disconnected" then self:open() end
        return false
    end
    local tcp = self.tcp
    if tcp:get_write_queue_size() > self.max_queue_bytes then
        self.dropped = self.dropped + 1
        return false
    end
    tcp:write(encode(self, registry, namespace, now), function(err)
        if err and self.tcp == tcp then self:_failed("cannot write to", err) end
    end)
    self.sent = self.sent + 1
    return true
end

function Carbon:close()
    self.state = "closed"
    if self.timer then
        if not self.timer:is_closing() then self.timer:close() end
        self.timer = nil
    end
    if self.tcp then
        local tcp = self.tcp
        self.tcp = nil
        -- let queued batches go out, then close
        if not tcp:is_closing() then
            local ok = pcall(tcp.shutdown, tcp, function()
                if not tcp:is_closing() then tcp:close() end
            end)
            if not ok and not tcp:is_closing() then tcp:close() end
        end
    end
end

function Carbon:status()
    return { state = self.state, sent = self.sent, dropped = self.dropped, host = self.host, port = self.port }
end

---------------------------------------------------------------------------
-- file and stdout
---------------------------------------------------------------------------

local File = {}
File.__index = File

--- reporters.file(options) -> reporter (see the module header).
function reporters.file(options)
    options = options or {}
    if type(options.path) ~= "string" or options.path == "" then
        error("file reporter: path must be a non-empty string", 2)
    end
    return setmetatable({
        name = "file", path = options.path, format = check_format(options.format, "prometheus"),
        prefix = options.prefix, logger = options.logger, stamp = true,
        written = 0, dropped = 0, state = "open", queue = {}, busy = false, max_queue = 100,
    }, File)
end

function File:open() end

-- Writes the queued batches one after the other (so they land in order).
function File:_write_next()
    local text = table.remove(self.queue, 1)
    if not text then
        self.busy = false
        return
    end
    self.busy = true
    local uv = require "luv"
    local function done(err)
        if err then
            self.dropped = self.dropped + 1
            if self.logger then
                self.logger:warning("file reporter: cannot write " .. self.path .. ": " .. tostring(err),
                    { reporter = "file" })
            end
        else
            self.written = self.written + 1
        end
        self:_write_next()
    end
    uv.fs_open(self.path, "a", tonumber("644", 8), function(open_err, fd)
        if open_err or not fd then return done(open_err or "open failed") end
        uv.fs_write(fd, text, -1, function(write_err)
            uv.fs_close(fd, function() end)
            done(write_err)
        end)
    end)
end

function File:report(registry, namespace, now)
    if self.state == "closed" then return false end
    if #self.queue >= self.max_queue then
        self.dropped = self.dropped + 1
        return false
    end
    self.queue[#self.queue + 1] = encode(self, registry, namespace, now)
    if not self.busy then self:_write_next() end
    return true
end

function File:close() self.state = "closed" end

function File:status()
    return { state = self.state, written = self.written, dropped = self.dropped, path = self.path }
end

local Stdout = {}
Stdout.__index = Stdout

--- reporters.stdout(options) -> reporter (see the module header).
function reporters.stdout(options)
    options = options or {}
    return setmetatable({
        name = "stdout", stream = options.stream or io.stdout,
        format = check_format(options.format, "carbon"), prefix = options.prefix,
        written = 0, state = "open",
    }, Stdout)
end

function Stdout:open() end

function Stdout:report(registry, namespace, now)
    if self.state == "closed" then return false end
    self.stream:write(encode(self, registry, namespace, now))
    if self.stream.flush then self.stream:flush() end
    self.written = self.written + 1
    return true
end

function Stdout:close() self.state = "closed" end

function Stdout:status() return { state = self.state, written = self.written } end

return reporters
