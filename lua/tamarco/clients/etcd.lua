--- tamarco.clients.etcd: an etcd v3 client over etcd's JSON gateway (DESIGN §5, §7).
--
--   local etcd = require "tamarco.clients.etcd"
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
-- CLUSTER: `etcd.new { endpoints = "h1:2379,h2:2379,h3:2379" }` (or a list)
-- talks to one member at a time, starting on a random one. A request moves
-- on to the next member (each tried at most once per request, each try
-- bounded by timeout_ms) when the member refuses or resets the connection,
-- times out, or answers that it has no leader / could not commit (kind
-- "unavailable"); requests carry etcd's require-leader flag, so a member
-- cut off from its quorum says so at once. `client.failovers` counts the
-- moves. etcd.locate / etcd.from_env find the members in
-- TAMARCO_ETCD_ENDPOINTS, the setting system.etcd.endpoints, or
-- TAMARCO_ETCD_HOST/_PORT.
--
-- AUTH: with `user` and `password`, the client asks /v3/auth/authenticate
-- for a token on first use, sends it in the Authorization header, and asks
-- for a new one once when etcd says the token is invalid or expired.
--
-- WATCH: a task reads the gateway's streaming /v3/watch response (one JSON
-- object per line). Events are handed to `on_events(events, revision)` in
-- order, one watch response at a time, each event as
--   { type = "PUT" | "DELETE", key =, value =, mod_revision =, create_revision =, version = }
-- When the stream breaks (etcd restarted, connection lost, member without
-- leader) the watch is created again from the last seen revision + 1 — on
-- the next member of a cluster at once, and with a backoff of 100 ms
-- doubling to 1 s once every member failed — so no change is missed and
-- none is delivered twice (revisions are the cluster's, not a member's). When that
-- revision was compacted meanwhile, `on_compacted(compact_revision)` is
-- called (do a full reload there, e.g. client:range, and return the
-- revision of that read + 1 to watch from; return nil when the reload
-- failed: it is called again after a backoff); without it the watch resumes
-- at the compact revision and `on_error` is told that events were lost.
-- `on_state(state, err)` hears "connected" / "disconnected".
--
-- VALUES: Tamarco keeps JSON values in etcd. etcd.encode_json(value) and
-- etcd.decode_json(text) are the codec used by the settings source and the
-- CLI, tamarco.json: numbers are written in their shortest exact form (1000,
-- 0.1), lists decode with the YAML binding's sequence_mt (so `[]` stays a
-- list), and JSON null decodes to etcd.null. Lua numbers cannot tell 1.0 from 1: tools
-- that must keep the difference (etcd write-yml and read) box floats with
-- etcd.float(n), which encodes with a decimal point, and decode with
-- { floats = true }, which boxes every number written as a float.
local backoff = require "tamarco.c.backoff"
local c = require "tamarco.c.http_client"
local json = require "tamarco.core.json"
local process = require "tamarco.c.process"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local yaml = require "tamarco.c.yaml"
local tasks = require "tamarco.core.tasks"

local etcd = {}

etcd.DEFAULT_PORT = 2379
etcd.null = json.null

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

local is_sequence = json.is_sequence
etcd.is_sequence = is_sequence

--- etcd.float(n) -> n boxed as a float (encoded as 1.0, not 1).
etcd.float = json.float
etcd.is_float = json.is_float

--- etcd.encode_json(value) -> text (raises on functions, NaN, ...).
function etcd.encode_json(value)
    return (assert(json.encode(value)))
end

local function key_segment(k)
    if type(k) ~= "number" then return tostring(k) end
    if k % 1 == 0 and math.abs(k) < 2 ^ 53 then return ("%d"):format(k) end
    return ("%.17g"):format(k)
end

--- etcd.flatten(tree[, prefix]) -> sorted list of {key, json}: one etcd key
-- a leaf (scalar, sequence or empty table), its path the keys above it
-- joined by "/". Raises when a key holds a "/".
function etcd.flatten(tree, prefix)
    local out = {}
    local function walk(node, path)
        if type(node) == "table" and not etcd.is_float(node) and not etcd.is_sequence(node)
            and getmetatable(node) ~= yaml.sequence_mt and next(node) ~= nil then
            for k, v in pairs(node) do
                local segment = key_segment(k)
                if segment:find("/", 1, true) then
                    error(("key '%s' contains '/', which etcd paths cannot hold"):format(segment), 0)
                end
                walk(v, path .. "/" .. segment)
            end
        else
            out[#out + 1] = { key = path, json = etcd.encode_json(node) }
        end
    end
    walk(tree, prefix or "")
    table.sort(out, function(a, b) return a.key < b.key end)
    return out
end

--- etcd.decode_json(text[, options]) -> value | nil, err. JSON null is
-- etcd.null; options.floats boxes numbers written as floats (etcd.float).
function etcd.decode_json(text, options)
    if type(text) ~= "string" then return nil, "not a string" end
    return json.decode(text, options)
end

---------------------------------------------------------------------------
-- the client
---------------------------------------------------------------------------

local Client = {}
Client.__index = Client
etcd.Client = Client

local function base_url(host, port)
    return ("http://%s:%d"):format(host:find(":", 1, true) and "[" .. host .. "]" or host, port)
end

--- etcd.parse_endpoints(value) -> list of base URLs | nil, err. value: a
-- list or a comma-separated string of "host:port", "host" (port 2379),
-- "[v6]:port" or "http(s)://host:port".
function etcd.parse_endpoints(value)
    local items = {}
    if type(value) == "string" then
        for item in value:gmatch("[^,%s]+") do items[#items + 1] = item end
    elseif type(value) == "table" then
        for i, item in ipairs(value) do items[i] = tostring(item) end
    else
        return nil, "etcd endpoints: a list or a comma-separated string expected"
    end
    if #items == 0 then return nil, "etcd endpoints: the list is empty" end
    local urls = {}
    for i, item in ipairs(items) do
        local url
        if item:find("^https?://") then
            url = (item:gsub("/+$", ""))
        else
            local host, port = item:match("^%[([^%]]+)%]:?(%d*)$")
            if not host then host, port = item:match("^([^:]+):?(%d*)$") end
            if not host then
                return nil, ("etcd endpoints: '%s' is not host:port"):format(item)
            end
            port = tonumber(port) or etcd.DEFAULT_PORT
            if port < 1 or port > 65535 then
                return nil, ("etcd endpoints: bad port in '%s'"):format(item)
            end
            url = base_url(host, port)
        end
        urls[i] = url
    end
    return urls
end

--- etcd.new{ endpoints | host, port | url, user, password, timeout_ms,
-- connect_timeout_ms }. With several endpoints (members of one cluster)
-- every request fails over to the next member (see call); a client starts
-- on a random member so that a fleet spreads over the cluster.
function etcd.new(opts)
    opts = opts or {}
    local endpoints
    if opts.endpoints ~= nil then
        endpoints = assert(etcd.parse_endpoints(opts.endpoints))
    else
        local host = opts.host or "127.0.0.1"
        local port = tonumber(opts.port) or etcd.DEFAULT_PORT
        endpoints = { ((opts.url or base_url(host, port)):gsub("/+$", "")) }
    end
    -- a random start member (from a UUID: math.random is not seeded per process)
    local current = 1
    if #endpoints > 1 then current = tonumber(process.uuid4():sub(1, 8), 16) % #endpoints + 1 end
    local host, port = endpoints[current]:match("^%a+://%[?([^%]/]-)%]?:(%d+)")
    return setmetatable({
        host = host,
        port = tonumber(port),
        endpoints = endpoints,
        current = current,
        url = endpoints[current],
        user = opts.user,
        password = opts.password,
        timeout_ms = opts.timeout_ms or 5000,
        connect_timeout_ms = opts.connect_timeout_ms or 2000,
        token = nil,
        failovers = 0,
    }, Client)
end

--- etcd.env(name) -> the environment variable's value, nil when unset or empty.
local function env(name)
    local v = os.getenv(name)
    if v == "" then return nil end
    return v
end
etcd.env = env

--- etcd.locate([store]) -> options for etcd.new ({endpoints =} or {host =,
-- port =}) | nil when etcd is not configured | nil, err for a bad list.
-- Looks at, in order: TAMARCO_ETCD_ENDPOINTS, the setting
-- system.etcd.endpoints (when a settings store is given), and
-- TAMARCO_ETCD_HOST / TAMARCO_ETCD_PORT.
function etcd.locate(store)
    local list = env("TAMARCO_ETCD_ENDPOINTS")
    local origin = "TAMARCO_ETCD_ENDPOINTS"
    if not list and store then
        list = store:get("system.etcd.endpoints", nil)
        origin = "system.etcd.endpoints"
    end
    if list ~= nil then
        local urls, err = etcd.parse_endpoints(list)
        if not urls then return nil, origin .. ": " .. err end
        return { endpoints = urls }
    end
    local host = env("TAMARCO_ETCD_HOST")
    if host then return { host = host, port = env("TAMARCO_ETCD_PORT") } end
    return nil
end

--- etcd.from_env([overrides]): where etcd.locate() says (TAMARCO_ETCD_ENDPOINTS,
-- else TAMARCO_ETCD_HOST and TAMARCO_ETCD_PORT (2379)), with
-- TAMARCO_ETCD_USER and TAMARCO_ETCD_PASSWORD; `overrides` wins (host,
-- port, endpoints, store, ...). Returns nil when no address is known, and
-- nil, err when the endpoints list is malformed.
function etcd.from_env(overrides)
    overrides = overrides or {}
    local opts = {}
    if overrides.endpoints or overrides.host then
        opts.endpoints, opts.host, opts.port = overrides.endpoints, overrides.host, overrides.port
    else
        local located, err = etcd.locate(overrides.store)
        if not located then return nil, err end
        for k, v in pairs(located) do opts[k] = v end
        opts.port = overrides.port or opts.port
    end
    opts.user = overrides.user or env("TAMARCO_ETCD_USER")
    opts.password = overrides.password or env("TAMARCO_ETCD_PASSWORD")
    for k, v in pairs(overrides) do
        if opts[k] == nil and k ~= "store" then opts[k] = v end
    end
    return etcd.new(opts)
end

--- client:address() -> the member in use ("http://h:p"); with several,
-- followed by the others: "http://a:1 (cluster: also http://b:2, ...)".
function Client:address()
    if #self.endpoints == 1 then return self.url end
    local others = {}
    for _, url in ipairs(self.endpoints) do
        if url ~= self.url then others[#others + 1] = url end
    end
    return ("%s (cluster: also %s)"):format(self.url, table.concat(others, ", "))
end

-- The request failed on `url` in a way another member may not share: move
-- on to the next member (unless another task did already). A token from
-- one member's simple-token auth is not valid on the others.
function Client:_failover(url)
    if #self.endpoints < 2 or self.url ~= url then return end
    self.current = self.current % #self.endpoints + 1
    self.url = self.endpoints[self.current]
    self.host, self.port = self.url:match("^%a+://%[?([^%]/]-)%]?:(%d+)")
    self.port = tonumber(self.port)
    self.failovers = self.failovers + 1
    if self.user then self.token = nil end
end

local function gateway_error(status, body)
    local decoded = json.decode(body)
    local message, code = body, nil
    if type(decoded) == "table" then
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

-- Failures another member may not have: transport errors, and a member
-- that lost its leader (no quorum) or could not commit in time.
local MEMBER_FAILURES = { connect = true, timeout = true, resolve = true, error = true,
    protocol = true, unavailable = true }
local NO_QUORUM_MESSAGES = { "no leader", "request timed out", "leader changed",
    "not capable", "stopped", "timed out", "deadline exceeded" }
local function is_member_unavailable(status, code, message)
    -- gRPC Unavailable (14) / DeadlineExceeded (4); HTTP 503 from the gateway
    if status == 503 or code == 14 or code == 4 then return true end
    for _, text in ipairs(NO_QUORUM_MESSAGES) do
        if message and message:find(text, 1, true) then return true end
    end
    return false
end
etcd.MEMBER_FAILURES = MEMBER_FAILURES

-- Every request asks etcd to refuse it when the member has no leader (the
-- gateway turns this header into gRPC metadata "hasleader"): a member cut
-- off from its quorum answers "no leader" at once instead of hanging, and
-- cancels its watches, so the client moves on to another member.
local REQUIRE_LEADER = "Grpc-Metadata-hasleader"

function Client:authenticate()
    local status, body, kind = c.request {
        method = "POST",
        url = self.url .. "/v3/auth/authenticate",
        body = etcd.encode_json({ name = self.user, password = self.password }),
        headers = { ["Content-Type"] = "application/json" },
        timeout_ms = self.timeout_ms,
        connect_timeout_ms = self.connect_timeout_ms,
    }
    if not status then return nil, "etcd at " .. self.url .. ": " .. tostring(body), kind end
    if status ~= 200 then
        local message = gateway_error(status, body)
        return nil, "etcd authentication failed: " .. message, "auth"
    end
    local decoded = json.decode(body)
    if type(decoded) ~= "table" or type(decoded.token) ~= "string" then
        return nil, "etcd authentication: no token in the answer", "auth"
    end
    self.token = decoded.token
    return true
end

function Client:_headers()
    local headers = { ["Content-Type"] = "application/json", [REQUIRE_LEADER] = "true" }
    if self.token then headers.Authorization = self.token end
    return headers
end

--- client:call(path, request_table) -> decoded answer | nil, err, kind.
-- Tries each member at most once (each try bounded by timeout_ms), starting
-- with the one in use, moving on when a member is unreachable, too slow or
-- without quorum (kind "unavailable"). etcd's operations here are
-- idempotent (put of the same value, delete, keep-alive) except grant,
-- where a retry after a lost answer leaves an unused lease to expire.
function Client:call(path, request)
    local answer, err, kind
    for _ = 1, #self.endpoints do
        local url = self.url
        answer, err, kind = self:_call_member(path, request)
        if answer or not MEMBER_FAILURES[kind] then return answer, err, kind end
        self:_failover(url)
    end
    return nil, err, kind
end

function Client:_call_member(path, request, retried)
    if self.user and not self.token then
        local ok, err, kind = self:authenticate()
        if not ok then return nil, err, kind end
    end
    local status, body, kind = c.request {
        method = "POST",
        url = self.url .. path,
        body = etcd.encode_json(request),
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
            return self:_call_member(path, request, true)
        end
        if is_member_unavailable(status, code, message) then return nil, message, "unavailable" end
        return nil, message, is_auth_failure(status, code, message) and "auth" or "etcd"
    end
    local decoded = json.decode(body)
    if type(decoded) ~= "table" then
        return nil, "etcd: invalid JSON answer: " .. tostring(body):sub(1, 200), "etcd"
    end
    -- stream endpoints (lease keep-alive) answer 200 and put errors in the body
    local e = decoded.error
    if type(e) == "table" then
        local message = tostring(e.message or e.error)
        local code = tonumber(e.code)
        if is_member_unavailable(0, code, message) then return nil, "etcd: " .. message, "unavailable" end
        return nil, "etcd: " .. message, is_auth_failure(0, code, message) and "auth" or "etcd"
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

-- The watch's reconnect delays, on the runtime's shared back-off.
local WATCH_BACKOFF = { min_ms = 100, max_ms = 1000, factor = 2 }

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
        self.backoff:reset()
        self.members_tried = 0
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
    return etcd.encode_json({ create_request = request })
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
            -- the gateway ends a stream with its last message unterminated
            -- (e.g. the error of a member that lost its leader)
            if not read_err and buffer:find("%S") then
                local msg = json.decode(buffer)
                if type(msg) == "table" then
                    local action, why = self:_message(msg)
                    if action == "break" and why then reason = why end
                end
            end
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
                local msg = json.decode(line)
                if type(msg) == "table" then
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
    local client = self.client
    while not self.closed do
        local url = client.url
        local reason = self:_connect()
        if self.closed then break end
        -- A member that is alive and has its quorum does not end a watch:
        -- resume on the next member (from next_revision: revisions are the
        -- cluster's, so nothing is missed or repeated), at once while some
        -- member has not been tried since the last good stream.
        local try_next = false
        if #client.endpoints > 1 then
            client:_failover(url)
            self.members_tried = (self.members_tried or 0) + 1
            try_next = self.members_tried < #client.endpoints
            if not try_next then self.members_tried = 0 end
        end
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
                    timer.sleep(self.backoff:next())
                    self.sleeping = false
                end
            else
                self:_report("on_error", reason .. "; events between were lost")
                self.next_revision = compact
            end
        else
            self:_report("on_error", ("%s (%s)"):format(tostring(reason), url))
            if not try_next then
                self.sleeping = true
                timer.sleep(self.backoff:next())
                self.sleeping = false
            end
        end
    end
end

--- client:follow(prefix, handlers) -> watcher | nil, err, kind: every key
-- under prefix, then every change to them. `handlers.snapshot(kvs)` gets
-- the keys of a full read (client:range); `handlers.events(events)` the
-- changes after it, from the next revision on, so that none is missed or
-- given twice. When that history was compacted meanwhile, the keys are read
-- again and given to `snapshot` again. Yields for the first read.
function Client:follow(prefix, handlers)
    local kvs, revision, kind = self:range(prefix, { prefix = true })
    if not kvs then return nil, revision, kind end
    handlers.snapshot(kvs)
    return self:watch(prefix, {
        prefix = true,
        start_revision = revision + 1,
        on_events = function(events) handlers.events(events) end,
        on_compacted = function()
            local fresh, at = self:range(prefix, { prefix = true })
            if not fresh then return nil end
            handlers.snapshot(fresh)
            return at + 1
        end,
    })
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
        backoff = backoff.new(WATCH_BACKOFF),
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
    local ok, results = tasks.run_until_done(fn, nil, ...)
    if not ok then error(results, 0) end
    return unpack(results, 1, results.n)
end

return etcd
