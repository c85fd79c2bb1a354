--- tamarco.etcd: an etcd v3 client over etcd's JSON gateway (DESIGN §5, §7).
--
--   local etcd = require "tamarco.etcd"
--   local client = etcd.new { host = "127.0.0.1", port = 2379 }   -- or etcd.from_env()
--   client:put("/system/deploy_name", '"prod"')
--   local value, kv = client:get("/system/deploy_name")           -- '"prod"', {key=..., mod_revision=...}
--   local kvs, revision = client:range("/system/", { prefix = true })
--   local tree = client:read_tree("/system/microservices/shop/") -- nested table
--   client:delete("/system/", { prefix = true })
--   local lease = client:grant(5); client:put(k, v, { lease = lease }); client:keepalive(lease); client:revoke(lease)
--   local w = client:watch("/system/", { prefix = true, on_events = function(events, revision) end })
--   w:close()
--
-- Every call does I/O through libcurl's multi interface on the host's loop
-- (tamarco.c.http_client) and yields the calling task; it returns its result
-- or `nil, message, kind` (kind: the HTTP client's "connect", "timeout", ...
-- or "etcd" for an error etcd reported, "auth" for authentication). Keys and
-- values are Lua strings (any bytes; base64 on the wire). Revisions are Lua
-- numbers; lease IDs are strings (they are 64-bit integers).
--
-- AUTH: with `user` and `password`, the client asks /v3/auth/authenticate
-- for a token on first use, sends it in the Authorization header, and asks
-- for a new one once when etcd says the token is invalid or expired.
--
-- WATCH: a task reads the gateway's streaming /v3/watch response (one JSON
-- object per line). Events are handed to `on_events(events, revision)` in
-- order, one watch response at a time, each event as
--   { type = "PUT" | "DELETE", key =, value =, mod_revision =, create_revision =, version = }
-- When the stream breaks (etcd restarted, connection lost) the watch is
-- created again from the last seen revision + 1 (backoff 100 ms doubling to
-- 1 s), so no change is missed and none is delivered twice. When that
-- revision was compacted meanwhile, `on_compacted(compact_revision)` is
-- called (do a full reload there, e.g. client:range, and return the
-- revision of that read + 1 to watch from; return nil when the reload
-- failed: it is called again after a backoff); without it the watch resumes
-- at the compact revision and `on_error` is told that events were lost.
-- `on_state(state, err)` hears "connected" / "disconnected".
--
-- VALUES: Tamarco keeps JSON values in etcd. etcd.encode_json(value) and
-- etcd.decode_json(text) are the codec used by the settings source and the
-- CLI: numbers are written in their shortest exact form (1000, 0.1), lists
-- decode with the YAML binding's sequence_mt (so `[]` stays a list), and
-- JSON null decodes to etcd.null. Lua numbers cannot tell 1.0 from 1: tools
-- that must keep the difference (etcd write-yml and read) box floats with
-- etcd.float(n), which encodes with a decimal point, and decode with
-- { floats = true }, which boxes every number written as a float.
local c = require "tamarco.c.http_client"
local cjson = require "cjson"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local yaml = require "tamarco.c.yaml"

local etcd = {}

etcd.DEFAULT_PORT = 2379
etcd.null = cjson.null

-- base64 (etcd's JSON gateway carries keys and values in base64)
local codec = require "tamarco.c.codec"
etcd.b64encode = codec.base64_encode
--- etcd.b64decode(s) -> the bytes of base64 text s; raises on invalid base64.
function etcd.b64decode(s) return (assert(codec.base64_decode(s))) end

--- The range_end that selects every key starting with `prefix`.
function etcd.prefix_end(prefix)
    local bytes = { prefix:byte(1, -1) }
    for i = #bytes, 1, -1 do
        if bytes[i] < 255 then
            bytes[i] = bytes[i] + 1
            for j = #bytes, i + 1, -1 do bytes[j] = nil end
            return string.char(unpack(bytes))
        end
    end
    return "\0"   -- every key
end

---------------------------------------------------------------------------
-- JSON values
---------------------------------------------------------------------------

local function is_sequence(t)
    if getmetatable(t) == yaml.sequence_mt then return true end
    local n = #t
    if n == 0 then return false end
    for k in pairs(t) do
        if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then return false end
    end
    return true
end
etcd.is_sequence = is_sequence

local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
    ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }

local function encode_string(s)
    return '"' .. s:gsub('[%c"\\]', function(ch)
        return escapes[ch] or ("\\u%04x"):format(ch:byte())
    end) .. '"'
end

local function encode_number(n)
    if n ~= n or n == math.huge or n == -math.huge then
        error("cannot encode " .. tostring(n) .. " as JSON", 0)
    end
    if n % 1 == 0 and math.abs(n) < 2 ^ 53 then return ("%d"):format(n) end
    for precision = 14, 17 do
        local text = ("%." .. precision .. "g"):format(n)
        if tonumber(text) == n then return text end
    end
    return ("%.17g"):format(n)
end

local Float = {}
--- etcd.float(n) -> n boxed as a float (encoded as 1.0, not 1).
function etcd.float(n) return setmetatable({ value = n }, Float) end
--- etcd.is_float(v) -> true when v was boxed by etcd.float.
function etcd.is_float(v) return getmetatable(v) == Float end

local function encode(v, out)
    local t = type(v)
    if getmetatable(v) == Float then
        local text = encode_number(v.value)
        out[#out + 1] = text:find("[.eE]") and text or text .. ".0"
    elseif v == nil or v == cjson.null then
        out[#out + 1] = "null"
    elseif t == "boolean" then
        out[#out + 1] = v and "true" or "false"
    elseif t == "number" then
        out[#out + 1] = encode_number(v)
    elseif t == "string" then
        out[#out + 1] = encode_string(v)
    elseif t == "table" then
        if is_sequence(v) then
            out[#out + 1] = "["
            for i = 1, #v do
                if i > 1 then out[#out + 1] = "," end
                encode(v[i], out)
            end
            out[#out + 1] = "]"
        else
            local keys = {}
            for k in pairs(v) do keys[#keys + 1] = k end
            table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
            out[#out + 1] = "{"
            for i, k in ipairs(keys) do
                if i > 1 then out[#out + 1] = "," end
                out[#out + 1] = encode_string(tostring(k))
                out[#out + 1] = ":"
                encode(v[k], out)
            end
            out[#out + 1] = "}"
        end
    else
        error("cannot encode a " .. t .. " as JSON", 0)
    end
end

--- etcd.encode_json(value) -> text (raises on functions, NaN, ...).
function etcd.encode_json(value)
    local out = {}
    encode(value, out)
    return table.concat(out)
end

-- A small JSON decoder: cjson 2.1.0 cannot tell [] from {}.
local decode_value

local function skip(s, i)
    return s:find("[^ \t\r\n]", i) or #s + 1
end

local function utf8_char(cp)
    if cp < 0x80 then return string.char(cp) end
    if cp < 0x800 then return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64) end
    if cp < 0x10000 then
        return string.char(0xE0 + math.floor(cp / 4096), 0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
    end
    return string.char(0xF0 + math.floor(cp / 262144), 0x80 + math.floor(cp / 4096) % 64,
        0x80 + math.floor(cp / 64) % 64, 0x80 + cp % 64)
end

local unescapes = { b = "\b", f = "\f", n = "\n", r = "\r", t = "\t", ['"'] = '"', ["\\"] = "\\", ["/"] = "/" }

local function decode_string(s, i)
    local parts, j = {}, i + 1
    while true do
        local k = s:find('["\\]', j)
        if not k then error("unterminated string", 0) end
        parts[#parts + 1] = s:sub(j, k - 1)
        if s:sub(k, k) == '"' then return table.concat(parts), k + 1 end
        local e = s:sub(k + 1, k + 1)
        if e == "u" then
            local cp = tonumber(s:sub(k + 2, k + 5), 16)
            if not cp then error("bad \\u escape", 0) end
            j = k + 6
            if cp >= 0xD800 and cp <= 0xDBFF and s:sub(j, j + 1) == "\\u" then
                local low = tonumber(s:sub(j + 2, j + 5), 16)
                if low and low >= 0xDC00 and low <= 0xDFFF then
                    cp = 0x10000 + (cp - 0xD800) * 1024 + (low - 0xDC00)
                    j = j + 6
                end
            end
            parts[#parts + 1] = utf8_char(cp)
        elseif unescapes[e] then
            parts[#parts + 1] = unescapes[e]
            j = k + 2
        else
            error("bad escape \\" .. e, 0)
        end
    end
end

decode_value = function(s, i, depth, options)
    if depth > 200 then error("nesting too deep", 0) end
    i = skip(s, i)
    local ch = s:sub(i, i)
    if ch == "{" then
        local obj = {}
        i = skip(s, i + 1)
        if s:sub(i, i) == "}" then return obj, i + 1 end
        while true do
            if s:sub(i, i) ~= '"' then error("expected a key at " .. i, 0) end
            local key
            key, i = decode_string(s, i)
            i = skip(s, i)
            if s:sub(i, i) ~= ":" then error("expected ':' at " .. i, 0) end
            local value
            value, i = decode_value(s, i + 1, depth + 1, options)
            obj[key] = value
            i = skip(s, i)
            local sep = s:sub(i, i)
            if sep == "}" then return obj, i + 1 end
            if sep ~= "," then error("expected ',' or '}' at " .. i, 0) end
            i = skip(s, i + 1)
        end
    elseif ch == "[" then
        local arr = setmetatable({}, yaml.sequence_mt)
        i = skip(s, i + 1)
        if s:sub(i, i) == "]" then return arr, i + 1 end
        local n = 0
        while true do
            local value
            value, i = decode_value(s, i, depth + 1, options)
            n = n + 1
            arr[n] = value
            i = skip(s, i)
            local sep = s:sub(i, i)
            if sep == "]" then return arr, i + 1 end
            if sep ~= "," then error("expected ',' or ']' at " .. i, 0) end
            i = i + 1
        end
    elseif ch == '"' then
        return decode_string(s, i)
    elseif s:sub(i, i + 3) == "true" then
        return true, i + 4
    elseif s:sub(i, i + 4) == "false" then
        return false, i + 5
    elseif s:sub(i, i + 3) == "null" then
        return cjson.null, i + 4
    else
        local text = s:match("^-?%d+%.?%d*[eE]?[-+]?%d*", i)
        local n = text and tonumber(text)
        if not n then error("unexpected '" .. ch .. "' at " .. i, 0) end
        if options and options.floats and text:find("[.eE]") then n = etcd.float(n) end
        return n, i + #text
    end
end

--- etcd.decode_json(text[, options]) -> value | nil, err. JSON null is
-- etcd.null; options.floats boxes numbers written as floats (etcd.float).
function etcd.decode_json(text, options)
    if type(text) ~= "string" then return nil, "not a string" end
    local ok, value, i = pcall(decode_value, text, 1, 0, options)
    if not ok then return nil, value end
    if skip(text, i) <= #text then return nil, "trailing characters at " .. i end
    return value
end

---------------------------------------------------------------------------
-- the client
---------------------------------------------------------------------------

local Client = {}
Client.__index = Client
etcd.Client = Client

--- etcd.new{ host, port, user, password, timeout_ms, connect_timeout_ms, url }
function etcd.new(opts)
    opts = opts or {}
    local host = opts.host or "127.0.0.1"
    local port = tonumber(opts.port) or etcd.DEFAULT_PORT
    local url = opts.url or ("http://%s:%d"):format(host:find(":", 1, true) and "[" .. host .. "]" or host, port)
    return setmetatable({
        host = host,
        port = port,
        url = url:gsub("/+$", ""),
        user = opts.user,
        password = opts.password,
        timeout_ms = opts.timeout_ms or 5000,
        connect_timeout_ms = opts.connect_timeout_ms or 2000,
        token = nil,
    }, Client)
end

--- etcd.from_env([overrides]): TAMARCO_ETCD_HOST, TAMARCO_ETCD_PORT (2379),
-- TAMARCO_ETCD_USER, TAMARCO_ETCD_PASSWORD; returns nil when no host is set.
function etcd.from_env(overrides)
    overrides = overrides or {}
    local function env(name)
        local v = os.getenv(name)
        if v == "" then return nil end
        return v
    end
    local opts = {
        host = overrides.host or env("TAMARCO_ETCD_HOST"),
        port = overrides.port or env("TAMARCO_ETCD_PORT"),
        user = overrides.user or env("TAMARCO_ETCD_USER"),
        password = overrides.password or env("TAMARCO_ETCD_PASSWORD"),
    }
    if not opts.host then return nil end
    for k, v in pairs(overrides) do if opts[k] == nil then opts[k] = v end end
    return etcd.new(opts)
end

function Client:address()
    return self.url
end

local function gateway_error(status, body)
    local ok, decoded = pcall(cjson.decode, body)
    local message, code = body, nil
    if ok and type(decoded) == "table" then
        local e = type(decoded.error) == "table" and decoded.error or decoded
        message = e.message or (type(e.error) == "string" and e.error) or body
        code = tonumber(e.code)
    end
    return ("etcd: %s (HTTP %d)"):format(tostring(message), status), code
end

-- gRPC Unauthenticated (16), PermissionDenied (7), or etcd's auth messages
-- (an invalid or expired token, no token while auth is enabled).
local AUTH_MESSAGES = { "invalid auth token", "user name is empty", "permission denied", "authentication failed" }
local function is_auth_failure(status, code, message)
    if status == 401 or status == 403 or code == 16 or code == 7 then return true end
    for _, text in ipairs(AUTH_MESSAGES) do
        if message and message:find(text, 1, true) then return true end
    end
    return false
end

function Client:authenticate()
    local status, body, kind = c.request {
        method = "POST",
        url = self.url .. "/v3/auth/authenticate",
        body = cjson.encode({ name = self.user, password = self.password }),
        headers = { ["Content-Type"] = "application/json" },
        timeout_ms = self.timeout_ms,
        connect_timeout_ms = self.connect_timeout_ms,
    }
    if not status then return nil, "etcd at " .. self.url .. ": " .. tostring(body), kind end
    if status ~= 200 then
        local message = gateway_error(status, body)
        return nil, "etcd authentication failed: " .. message, "auth"
    end
    local ok, decoded = pcall(cjson.decode, body)
    if not ok or type(decoded) ~= "table" or type(decoded.token) ~= "string" then
        return nil, "etcd authentication: no token in the answer", "auth"
    end
    self.token = decoded.token
    return true
end

function Client:_headers()
    local headers = { ["Content-Type"] = "application/json" }
    if self.token then headers.Authorization = self.token end
    return headers
end

--- client:call(path, request_table) -> decoded answer | nil, err, kind.
function Client:call(path, request, retried)
    if self.user and not self.token then
        local ok, err, kind = self:authenticate()
        if not ok then return nil, err, kind end
    end
    local status, body, kind = c.request {
        method = "POST",
        url = self.url .. path,
        body = cjson.encode(request),
        headers = self:_headers(),
        timeout_ms = self.timeout_ms,
        connect_timeout_ms = self.connect_timeout_ms,
    }
    if not status then
        return nil, ("etcd at %s: %s"):format(self.url, tostring(body)), kind
    end
    if status ~= 200 then
        local message, code = gateway_error(status, body)
        if self.user and not retried and is_auth_failure(status, code, message) then
            self.token = nil
            return self:call(path, request, true)
        end
        return nil, message, is_auth_failure(status, code, message) and "auth" or "etcd"
    end
    local ok, decoded = pcall(cjson.decode, body)
    if not ok or type(decoded) ~= "table" then
        return nil, "etcd: invalid JSON answer: " .. tostring(body):sub(1, 200), "etcd"
    end
    return decoded
end

local function header_revision(answer)
    return tonumber(answer.header and answer.header.revision) or 0
end

local function convert_kv(kv)
    return {
        key = etcd.b64decode(kv.key or ""),
        value = etcd.b64decode(kv.value or ""),
        create_revision = tonumber(kv.create_revision) or 0,
        mod_revision = tonumber(kv.mod_revision) or 0,
        version = tonumber(kv.version) or 0,
        lease = kv.lease,
    }
end
etcd.convert_kv = convert_kv

--- client:range(key[, {prefix, limit, keys_only, revision}]) -> kvs, revision | nil, err, kind.
-- kvs: a list sorted by key of {key, value, create_revision, mod_revision, version, lease}.
function Client:range(key, opts)
    opts = opts or {}
    local request = { key = etcd.b64encode(key) }
    if opts.prefix then request.range_end = etcd.b64encode(etcd.prefix_end(key)) end
    if opts.limit then request.limit = opts.limit end
    if opts.keys_only then request.keys_only = true end
    if opts.revision then request.revision = opts.revision end
    local answer, err, kind = self:call("/v3/kv/range", request)
    if not answer then return nil, err, kind end
    local kvs = {}
    for i, kv in ipairs(answer.kvs or {}) do kvs[i] = convert_kv(kv) end
    return kvs, header_revision(answer)
end

--- client:get(key) -> value (nil when missing), kv, revision | nil, err, kind.
function Client:get(key)
    local kvs, revision, kind = self:range(key)
    if not kvs then return nil, revision, kind end
    local kv = kvs[1]
    return kv and kv.value, kv, revision
end

--- client:get_prefix(prefix) -> kvs, revision (as range with prefix = true).
function Client:get_prefix(prefix)
    return self:range(prefix, { prefix = true })
end

--- etcd.tree_of(kvs, prefix[, decode]) -> nested table: the keys below
-- `prefix`, split on "/" (empty segments skipped), values passed through
-- decode (default: kept as strings). A key that is both a value and a
-- "directory" keeps the directory.
function etcd.tree_of(kvs, prefix, decode)
    prefix = prefix or ""
    local tree = {}
    for _, kv in ipairs(kvs) do
        if kv.key:sub(1, #prefix) == prefix then
            local path = {}
            for segment in kv.key:sub(#prefix + 1):gmatch("[^/]+") do path[#path + 1] = segment end
            local value = kv.value
            if decode then value = decode(value, kv) end
            if #path > 0 and value ~= nil then
                local node = tree
                for i = 1, #path - 1 do
                    if type(node[path[i]]) ~= "table" or is_sequence(node[path[i]]) then
                        node[path[i]] = {}
                    end
                    node = node[path[i]]
                end
                local last = path[#path]
                if not (type(node[last]) == "table" and not is_sequence(node[last])) then
                    node[last] = value
                end
            end
        end
    end
    return tree
end

--- client:read_tree(prefix[, decode]) -> tree, revision | nil, err, kind.
function Client:read_tree(prefix, decode)
    local kvs, revision, kind = self:range(prefix, { prefix = true })
    if not kvs then return nil, revision, kind end
    return etcd.tree_of(kvs, prefix, decode), revision
end

--- client:put(key, value[, {lease}]) -> revision | nil, err, kind.
function Client:put(key, value, opts)
    assert(type(value) == "string", "etcd put: value must be a string")
    local request = { key = etcd.b64encode(key), value = etcd.b64encode(value) }
    if opts and opts.lease then request.lease = tostring(opts.lease) end
    local answer, err, kind = self:call("/v3/kv/put", request)
    if not answer then return nil, err, kind end
    return header_revision(answer)
end

--- client:delete(key[, {prefix}]) -> deleted count, revision | nil, err, kind.
function Client:delete(key, opts)
    local request = { key = etcd.b64encode(key) }
    if opts and opts.prefix then request.range_end = etcd.b64encode(etcd.prefix_end(key)) end
    local answer, err, kind = self:call("/v3/kv/deleterange", request)
    if not answer then return nil, err, kind end
    return tonumber(answer.deleted) or 0, header_revision(answer)
end

--- client:grant(ttl_seconds) -> lease id (string), ttl | nil, err, kind.
function Client:grant(ttl)
    local answer, err, kind = self:call("/v3/lease/grant", { TTL = ttl })
    if not answer then return nil, err, kind end
    if answer.error and answer.error ~= "" then return nil, "etcd: " .. tostring(answer.error), "etcd" end
    return answer.ID, tonumber(answer.TTL)
end

--- client:keepalive(id) -> remaining ttl (0: the lease is gone) | nil, err, kind.
function Client:keepalive(id)
    local answer, err, kind = self:call("/v3/lease/keepalive", { ID = tostring(id) })
    if not answer then return nil, err, kind end
    local result = answer.result or answer
    if answer.error then
        return nil, "etcd: " .. tostring(answer.error.message or answer.error), "etcd"
    end
    return tonumber(result.TTL) or 0
end

--- client:revoke(id) -> true | nil, err, kind (revoking a lease deletes its keys).
function Client:revoke(id)
    local answer, err, kind = self:call("/v3/lease/revoke", { ID = tostring(id) })
    if not answer then
        if err and err:find("requested lease not found", 1, true) then return true end
        return nil, err, kind
    end
    return true
end

--- client:status() -> {version, leader, ...} (GET-like liveness probe).
function Client:status()
    return self:call("/v3/maintenance/status", {})
end

---------------------------------------------------------------------------
-- watch
---------------------------------------------------------------------------

local Watcher = {}
Watcher.__index = Watcher

local BACKOFF_MIN, BACKOFF_MAX = 100, 1000

local function event_of(e)
    local kv = convert_kv(e.kv or {})
    kv.type = e.type == "DELETE" and "DELETE" or "PUT"
    if e.prev_kv then kv.prev_value = etcd.b64decode(e.prev_kv.value or "") end
    return kv
end

function Watcher:_report(what, ...)
    local fn = self.opts[what]
    if fn then
        local ok, err = pcall(fn, ...)
        if not ok then
            io.stderr:write("tamarco.etcd watch: ", what, " failed: ", tostring(err), "\n")
        end
    end
end

-- Handles one decoded message of the stream; returns "break" to reconnect.
function Watcher:_message(msg)
    if msg.error then
        local e = msg.error
        local message = type(e) == "table" and (e.message or e.error) or tostring(e)
        if self.client.user and type(e) == "table" and is_auth_failure(0, tonumber(e.code), message) then
            self.client.token = nil
        end
        return "break", "etcd watch: " .. tostring(message)
    end
    local result = msg.result
    if type(result) ~= "table" then return end
    if result.created then
        self.connected = true
        self.backoff = BACKOFF_MIN
        if not self.next_revision then
            self.next_revision = header_revision(result) + 1
        end
        self:_report("on_state", "connected")
    end
    local compact = tonumber(result.compact_revision)
    if result.canceled then
        if compact and compact > 0 then
            self.compacted = compact
            return "break", ("etcd watch: revision %d was compacted (now at %d)")
                :format(self.next_revision or 0, compact)
        end
        return "break", "etcd watch canceled: " .. tostring(result.cancel_reason or "")
    end
    if result.events then
        local events = {}
        for _, e in ipairs(result.events) do
            local event = event_of(e)
            if event.mod_revision >= (self.next_revision or 0) then events[#events + 1] = event end
        end
        if #events > 0 then
            self.next_revision = events[#events].mod_revision + 1
            self.revision = events[#events].mod_revision
            self:_report("on_events", events, self.revision)
        end
    end
end

function Watcher:_body()
    local request = { key = etcd.b64encode(self.key) }
    if self.opts.prefix then request.range_end = etcd.b64encode(etcd.prefix_end(self.key)) end
    if self.next_revision then request.start_revision = self.next_revision end
    if self.opts.prev_kv then request.prev_kv = true end
    return cjson.encode({ create_request = request })
end

-- One connection: returns when the stream ends; the reason as a string.
function Watcher:_connect()
    local client = self.client
    if client.user and not client.token then
        local ok, err = client:authenticate()
        if not ok then return err end
    end
    local stream, err = c.stream {
        method = "POST",
        url = client.url .. "/v3/watch",
        body = self:_body(),
        headers = client:_headers(),
        connect_timeout_ms = client.connect_timeout_ms,
    }
    if not stream then return err end
    self.stream = stream
    local status, headers_or_err = stream:response()
    if not status then
        stream:close()
        return headers_or_err
    end
    local buffer, reason = "", nil
    if status ~= 200 then
        local body = {}
        while true do
            local chunk = stream:read()
            if not chunk then break end
            body[#body + 1] = chunk
        end
        local message, code = gateway_error(status, table.concat(body))
        if client.user and is_auth_failure(status, code, message) then client.token = nil end
        stream:close()
        return message
    end
    while not self.closed do
        local chunk, read_err = stream:read()
        if not chunk then
            reason = read_err or "etcd closed the watch stream"
            break
        end
        buffer = buffer .. chunk
        local stop
        while true do
            local nl = buffer:find("\n", 1, true)
            if not nl then break end
            local line = buffer:sub(1, nl - 1)
            buffer = buffer:sub(nl + 1)
            if line:find("%S") then
                local ok, msg = pcall(cjson.decode, line)
                if ok and type(msg) == "table" then
                    local action, why = self:_message(msg)
                    if action == "break" then stop, reason = true, why break end
                end
            end
        end
        if stop then break end
    end
    stream:close()
    self.stream = nil
    return reason
end

function Watcher:_run()
    while not self.closed do
        local reason = self:_connect()
        if self.closed then break end
        if self.connected then
            self.connected = false
            self:_report("on_state", "disconnected", reason)
        end
        if self.compacted then
            local compact = self.compacted
            self.compacted = nil
            if self.opts.on_compacted then
                local ok, next_revision = pcall(self.opts.on_compacted, compact)
                if ok and tonumber(next_revision) then
                    self.next_revision = tonumber(next_revision)
                else
                    -- the reload failed (etcd gone again?): try it again later
                    self:_report("on_error", "reload after compaction failed: " .. tostring(next_revision))
                    self.compacted = compact
                    self.sleeping = true
                    timer.sleep(self.backoff)
                    self.sleeping = false
                    self.backoff = math.min(self.backoff * 2, BACKOFF_MAX)
                end
            else
                self:_report("on_error", reason .. "; events between were lost")
                self.next_revision = compact
            end
        else
            self:_report("on_error", reason)
            self.sleeping = true
            timer.sleep(self.backoff)
            self.sleeping = false
            self.backoff = math.min(self.backoff * 2, BACKOFF_MAX)
        end
    end
end

--- client:watch(key, opts) -> watcher. opts: prefix, start_revision,
-- prev_kv, on_events(events, revision), on_compacted(compact_revision)
-- -> revision to resume from, on_state(state, err), on_error(message).
-- watcher:close() stops it; watcher.revision is the last revision seen.
function Client:watch(key, opts)
    opts = opts or {}
    local self = setmetatable({
        client = self,
        key = key,
        opts = opts,
        next_revision = opts.start_revision,
        backoff = BACKOFF_MIN,
        closed = false,
        connected = false,
    }, Watcher)
    self.task = scheduler.spawn(function() self:_run() end)
    return self
end

--- watcher:close(): ends the watch (its task ends on the next loop turn).
function Watcher:close()
    if self.closed then return end
    self.closed = true
    if self.stream then self.stream:close() end
    if self.sleeping and self.task then scheduler.interrupt(self.task) end
end

---------------------------------------------------------------------------

--- etcd.run_sync(fn, ...) -> fn's results. Inside a task: calls fn. Outside
-- the loop (command-line tools, start-up): runs fn in a task and turns the
-- loop until it ends; its error is raised again.
function etcd.run_sync(fn, ...)
    if scheduler.current() then return fn(...) end
    local process = require "tamarco.c.process"
    local done, results = false, nil
    local co = scheduler.spawn(fn, ...)
    scheduler.on_exit(co, function(success, ...)
        done = true
        results = { n = select("#", ...) + 1, success, ... }
    end)
    while not done do process.run_loop("once") end
    if not results[1] then error(results[2], 0) end
    return unpack(results, 2, results.n)
end

return etcd
