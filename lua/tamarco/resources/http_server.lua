--- tamarco.resources.http_server: the HTTP server resource (the policy side).
--
--   local http = require "tamarco.resources.http"
--   local svc = tamarco.service { name = "hello", resources = { api = http.server() } }
--   svc.api:get("/hello/{name}", function(req)
--       return 200, { message = "hello " .. req.params.name }
--   end)
--
-- Bytes, sockets, limits and timeouts are C (tamarco.c.http_server); this
-- file routes, builds the `req` object lazily, encodes JSON, adds CORS
-- headers, caches responses and keeps counters for the metrics resource.
--
-- Settings under system.resources.<name> (seconds for times; the options
-- given to http.server{...} are the defaults):
--   host ("127.0.0.1"), port (8080; 0 picks a free port), backlog (511),
--   reuse_port (false; TAMARCO_REUSE_PORT=1 makes it true), max_connections
--   (10000), max_header_size (8192), max_headers (100), max_body_size
--   (1048576), max_pipeline (64), header_timeout (10), body_timeout (30),
--   idle_timeout (60), send_timeout (60), drain_timeout (5), server_name
--   ("tamarco"), access_log (false),
--   cors.enabled (true; `cors: false` for short), cors.allow_origins ("*" or a list),
--   cors.allow_methods (the route's), cors.allow_headers (echoes the
--   request's), cors.expose_headers, cors.allow_credentials (false),
--   cors.max_age, cache.max_entries (1000), cache.header_keys ({}).
--
-- Handlers get `req` and return `status, body[, headers]`: a table body is
-- sent as JSON, a string as text/plain unless a content-type header says
-- otherwise, nil as an empty body. An error becomes a 500 with a JSON body
-- (the traceback goes to the log); `http_server.error(status, message)`
-- and `req:json()` on a bad body raise errors that become their own status.
local base = require "tamarco.core.resource"
local errors = require "tamarco.core.errors"
local chttp = require "tamarco.c.http_server"
local timer = require "tamarco.c.timer"

local json = require "tamarco.core.json"

local hrtime = timer.hrtime
local now_ms = timer.now
local setmetatable, rawget, rawset, type, tostring, pairs, ipairs, xpcall, pcall =
    setmetatable, rawget, rawset, type, tostring, pairs, ipairs, xpcall, pcall
local find, sub = string.find, string.sub
local traceback = debug.traceback

local HttpServer = base.class("http_server")

HttpServer.METHODS = { "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS" }

local TEXT = "text/plain; charset=utf-8"
local JSON = "application/json"

---------------------------------------------------------------------------
-- HTTP errors a handler can raise (and pcall)
---------------------------------------------------------------------------

local HttpError = {}
HttpError.__index = HttpError
HttpError.__tostring = function(e) return e.message end
HttpServer.HttpError = HttpError

--- http_server.new_error(status, message[, body]) -> an error value that,
-- when it escapes a handler, is answered with `status` and a JSON body
-- `{"error": message}` (or `body`).
function HttpServer.new_error(status, message, body)
    return setmetatable({ status = status, message = message, body = body }, HttpError)
end

--- http_server.error(status, message[, body]): raises such an error.
function HttpServer.error(status, message, body)
    error(HttpServer.new_error(status, message, body), 2)
end

--- http_server.is_error(value) -> true when value was made by http_server.new_error.
function HttpServer.is_error(value)
    return getmetatable(value) == HttpError
end

---------------------------------------------------------------------------
-- URL decoding
---------------------------------------------------------------------------

local function hex_char(h) return string.char(tonumber(h, 16)) end

local function url_decode(s)
    if s:find("%", 1, true) then s = s:gsub("%%(%x%x)", hex_char) end
    return s
end
HttpServer.url_decode = url_decode

local function form_decode(s)
    if s:find("+", 1, true) then s = s:gsub("+", " ") end
    return url_decode(s)
end

--- Decodes "a=1&b=x+y&a=2" into { a = { "1", "2" }, b = "x y" }; a key
-- without "=" gets "".
local function decode_query(qs)
    local query = {}
    if not qs or qs == "" then return query end
    for pair in qs:gmatch("[^&;]+") do
        local eq = pair:find("=", 1, true)
        local k, v
        if eq then
            k, v = form_decode(pair:sub(1, eq - 1)), form_decode(pair:sub(eq + 1))
        else
            k, v = form_decode(pair), ""
        end
        local old = query[k]
        if old == nil then
            query[k] = v
        elseif type(old) == "table" then
            old[#old + 1] = v
        else
            query[k] = { old, v }
        end
    end
    return query
end
HttpServer.decode_query = decode_query

---------------------------------------------------------------------------
-- the request object: every field but method/path/params is lazy
---------------------------------------------------------------------------

local Request = {}

local ci_headers_mt = {
    __index = function(t, k)
        if type(k) == "string" then
            local lower = k:lower()
            if lower ~= k then return rawget(t, lower) end
        end
        return nil
    end,
}

local lazy = {
    query = function(req) return decode_query(req._h:query_string()) end,
    query_string = function(req) return req._h:query_string() or "" end,
    headers = function(req) return setmetatable(req._h:headers(), ci_headers_mt) end,
    body = function(req) return req._h:body() end,
    url = function(req) return req._h:url() end,
    version = function(req) return req._h:version() end,
    keep_alive = function(req) return req._h:keep_alive() end,
    remote_addr = function(req) return (req._h:remote_address()) end,
    params = function() return {} end,
}

local request_mt = {
    __index = function(req, k)
        local get = lazy[k]
        if get then
            local v = get(req)
            rawset(req, k, v)
            return v
        end
        return Request[k]
    end,
    __tostring = function(req) return "http request " .. req.method .. " " .. req.path end,
}

--- req:header(name) -> value or nil (case-insensitive, no table built).
function Request:header(name)
    return self._h:header(name)
end

--- req:json() -> the decoded body. Raises an HttpError (status 400) on an
-- empty or invalid body: pcall it to answer yourself, or let it escape and
-- the client gets a 400 with the reason.
function Request:json()
    local cached = rawget(self, "_json")
    if cached ~= nil then return cached end
    local body = self.body
    if body == "" then
        error(HttpServer.new_error(400, "invalid JSON body: the body is empty"), 2)
    end
    local value, err = json.decode(body)
    if value == nil then
        error(HttpServer.new_error(400, "invalid JSON body: " .. tostring(err)), 2)
    end
    rawset(self, "_json", value)
    return value
end

--- req:connected() -> false when the client went away.
function Request:connected()
    return self._h:connected()
end

HttpServer.Request = Request

---------------------------------------------------------------------------
-- routes
---------------------------------------------------------------------------

local function new_node()
    return { children = {}, param = nil, methods = {}, nmethods = 0 }
end

-- Parses "/users/{id}/posts" into segments and parameter names.
local function parse_pattern(pattern)
    if type(pattern) ~= "string" or pattern:sub(1, 1) ~= "/" then
        error("route pattern must be a string starting with '/' (got " .. tostring(pattern) .. ")", 4)
    end
    local segments, names, seen = {}, {}, {}
    local rest = pattern:sub(2)
    for seg in (rest .. "/"):gmatch("([^/]*)/") do
        -- {name}, or Sanic's <name> (and <name:str>) as Tamarco services write it
        local name = seg:match("^{([%a_][%w_]*)}$") or seg:match("^<([%a_][%w_]*)>$")
        local typed_name, kind = seg:match("^<([%a_][%w_]*):([%w_]+)>$")
        if typed_name then
            if kind ~= "str" and kind ~= "string" then
                error("route pattern '" .. pattern .. "': typed parameter <" .. typed_name .. ":" .. kind
                    .. "> is not supported; write <" .. typed_name .. "> and convert it in the handler", 4)
            end
            name = typed_name
        end
        if name then
            if seen[name] then error("route pattern '" .. pattern .. "' repeats {" .. name .. "}", 4) end
            seen[name] = true
            segments[#segments + 1] = { param = name }
            names[#names + 1] = name
        elseif seg:find("[{}<>]") then
            error("route pattern '" .. pattern .. "': a segment is either literal or a whole {name} or <name>", 4)
        else
            segments[#segments + 1] = seg
        end
    end
    return segments, names
end

-- Depth-first with backtracking: a literal child wins over a parameter.
-- The segment of `node` starts at `pos` (after a '/') and runs to the next
-- '/' or the end; the parameters met on the way go to captured[depth + 1...].
-- Positions, not a table of segments: no table per request, and the loop
-- stays one trace.
local function walk(node, path, pos, captured, depth)
    local slash = find(path, "/", pos, true)
    local seg = sub(path, pos, (slash or 0) - 1)
    local child = node.children[seg]
    if child then
        local found
        if slash then
            found = walk(child, path, slash + 1, captured, depth)
        elseif child.nmethods > 0 then
            found = child
        end
        if found then return found end
    end
    local pchild = node.param
    if pchild and seg ~= "" then
        captured[depth + 1] = seg
        local found
        if slash then
            found = walk(pchild, path, slash + 1, captured, depth + 1)
        elseif pchild.nmethods > 0 then
            found = pchild
        end
        if found then return found end
        captured[depth + 1] = nil
    end
    return nil
end

local function route_stats(self, method, pattern)
    local key = method .. " " .. pattern
    local stat = self.stats.routes[key]
    if not stat then
        stat = { method = method, pattern = pattern, count = 0, statuses = {},
                 duration_sum = 0, duration_max = 0 }
        self.stats.routes[key] = stat
    end
    return stat
end

--- server:route(method, pattern, handler[, options]) -> server. options:
-- cache_ttl (seconds: cache 2xx GET/HEAD responses), cache_headers (request
-- headers that are part of the cache key; a request with Authorization or
-- Cookie bypasses the cache unless that header is listed here or in
-- cache.header_keys). Defining a route again replaces it.
function HttpServer:route(method, pattern, handler, options)
    if type(method) ~= "string" or not method:match("^[%u%-]+$") then
        error("route method must be an upper-case HTTP method (got " .. tostring(method) .. ")", 2)
    end
    if type(handler) ~= "function" then
        error("route " .. method .. " " .. tostring(pattern) .. " needs a handler function", 2)
    end
    if options ~= nil and type(options) ~= "table" then
        error("route options must be a table", 2)
    end
    local segments, names = parse_pattern(pattern)
    local node = self._root
    for _, seg in ipairs(segments) do
        if type(seg) == "table" then
            node.param = node.param or new_node()
            node = node.param
        else
            node.children[seg] = node.children[seg] or new_node()
            node = node.children[seg]
        end
    end
    if #names == 0 then self._static[pattern] = node end
    options = options or {}
    local route = {
        method = method,
        pattern = pattern,
        handler = handler,
        param_names = names,
        cache_ttl = options.cache_ttl,
        cache_headers = options.cache_headers,
        stat = route_stats(self, method, pattern),
    }
    if not node.methods[method] then node.nmethods = node.nmethods + 1 end
    node.methods[method] = route
    node.allow = nil   -- recomputed on demand
    return self
end

for _, method in ipairs(HttpServer.METHODS) do
    HttpServer[method:lower()] = function(self, pattern, handler, options)
        return self:route(method, pattern, handler, options)
    end
end

--- server:match(path) -> node, captured (for tests and tools)
function HttpServer:match(path)
    local node = self._static[path]
    if node then return node, nil end
    local captured = {}
    node = walk(self._root, path, 2, captured, 0)
    return node, captured
end

local function allow_of(node)
    local allow = node.allow
    if allow then return allow end
    local list, has = {}, {}
    for m in pairs(node.methods) do has[m] = true end
    if has.GET then has.HEAD = true end
    has.OPTIONS = true
    for _, m in ipairs(HttpServer.METHODS) do
        if has[m] then list[#list + 1] = m; has[m] = nil end
    end
    local extra = {}
    for m in pairs(has) do extra[#extra + 1] = m end
    table.sort(extra)
    for _, m in ipairs(extra) do list[#list + 1] = m end
    allow = table.concat(list, ", ")
    node.allow = allow
    return allow
end

---------------------------------------------------------------------------
-- construction and settings
---------------------------------------------------------------------------

--- HttpServer:init(options): an empty route tree, response cache and request counters.
function HttpServer:init(options)
    base.Resource.init(self, options)
    self._root = new_node()
    self._static = {}
    self._cache = {}
    self._cache_count = 0
    self.stats = {
        requests = 0,          -- answered requests
        in_flight = 0,
        errors = 0,            -- handler errors (500)
        routes = {},           -- "METHOD pattern" -> { count, statuses, duration_sum, duration_max }
        unmatched = { method = "*", pattern = "<unmatched>", count = 0, statuses = {},
                      duration_sum = 0, duration_max = 0 },
        cache_hits = 0,
        cache_misses = 0,
    }
end

local COUNT = { integer = true, min = 1 }
local SECONDS = { min = 0 }
local SETTINGS = {
    -- key, default, C option name, number limits (nil: a string), scale to C units
    { "host", "127.0.0.1", "host" },
    { "port", 8080, "port", { integer = true, min = 0, max = 65535 } },
    { "backlog", 511, "backlog", COUNT },
    { "max_connections", 10000, "max_connections", COUNT },
    { "max_header_size", 8192, "max_header_size", COUNT },
    { "max_headers", 100, "max_headers", COUNT },
    { "max_body_size", 1024 * 1024, "max_body_size", { integer = true, min = 0 } },
    { "max_pipeline", 64, "max_pipeline", COUNT },
    { "header_timeout", 10, "header_timeout", SECONDS, 1000 },
    { "body_timeout", 30, "body_timeout", SECONDS, 1000 },
    { "idle_timeout", 60, "idle_timeout", SECONDS, 1000 },
    { "send_timeout", 60, "send_timeout", SECONDS, 1000 },
    { "server_name", "tamarco", "server_name" },
}

--- HttpServer:setting(key, default) -> the settings view's value, else the options given
-- to http.server{}, else the default.
function HttpServer:setting(key, default)
    local fallback = self.options[key]
    if fallback == nil then
        local dot = key:find(".", 1, true)
        if dot then
            local section = self.options[key:sub(1, dot - 1)]
            if type(section) == "table" then fallback = section[key:sub(dot + 1)] end
        end
    end
    if fallback == nil then fallback = default end
    if self.settings then return self.settings:get(key, fallback) end
    return fallback
end

local function as_set(list)
    if list == nil or list == "*" then return nil end
    if type(list) == "string" then list = { list } end
    local set = {}
    for _, v in ipairs(list) do set[v] = true end
    return set
end

local function as_header_list(v)
    if v == nil then return nil end
    if type(v) == "table" then return table.concat(v, ", ") end
    return tostring(v)
end

function HttpServer:_configure()
    local c_options = {}
    for _, s in ipairs(SETTINGS) do
        local v
        if s[4] then v = self:number_setting(s[1], s[2], s[4]) else v = self:typed_setting(s[1], s[2], "string") end
        if s[5] then v = v * s[5] end
        c_options[s[3]] = v
    end
    local reuse_default = os.getenv("TAMARCO_REUSE_PORT") == "1"
    c_options.reuse_port = self:setting("reuse_port", reuse_default) and true or false
    -- a --workers worker's report server listens privately (tamarco.ops.workers_report)
    local override = self.listen_override
    if override then
        self.public_host, self.public_port = c_options.host, c_options.port
        for k, v in pairs(override) do c_options[k] = v end
    end
    self.drain_timeout = self:number_setting("drain_timeout", 5, SECONDS)
    self.access_log = self:typed_setting("access_log", false, "boolean")

    -- `cors: false` (or true) is the short form of cors.enabled
    local cors_section = self:setting("cors", nil)
    local enabled
    if type(cors_section) == "boolean" then
        enabled = cors_section
    elseif cors_section ~= nil and type(cors_section) ~= "table" then
        self:settings_error("cors", "must be true, false or a mapping of CORS settings")
    else
        enabled = self:typed_setting("cors.enabled", true, "boolean")
    end
    local cors = {
        enabled = enabled,
        origins = self:setting("cors.allow_origins", "*"),
        methods = as_header_list(self:setting("cors.allow_methods", nil)),
        headers = as_header_list(self:setting("cors.allow_headers", nil)),
        expose = as_header_list(self:setting("cors.expose_headers", nil)),
        credentials = self:setting("cors.allow_credentials", false),
        max_age = self:setting("cors.max_age", nil),
    }
    cors.origin_set = as_set(cors.origins)
    self._cors = cors.enabled and cors or nil

    self._cache_max = self:setting("cache.max_entries", 1000)
    local keys = self:setting("cache.header_keys", {})
    if type(keys) == "string" then keys = { keys } end
    self._cache_header_keys = keys
    return c_options
end

---------------------------------------------------------------------------
-- CORS
---------------------------------------------------------------------------

-- Adds the CORS response headers for `origin` to headers (a new table).
local function cors_headers(cors, origin, headers)
    local allow
    if cors.origin_set then
        if not cors.origin_set[origin] then return headers end
        allow = origin
    elseif cors.credentials then
        allow = origin
    else
        allow = "*"
    end
    local out = {}
    if headers then for k, v in pairs(headers) do out[k] = v end end
    out["Access-Control-Allow-Origin"] = allow
    if allow ~= "*" then out["Vary"] = "Origin" end
    if cors.credentials then out["Access-Control-Allow-Credentials"] = "true" end
    if cors.expose then out["Access-Control-Expose-Headers"] = cors.expose end
    return out
end

local function preflight_headers(cors, h, origin, node)
    local headers = cors_headers(cors, origin, nil)
    if not headers["Access-Control-Allow-Origin"] then return headers end
    headers["Access-Control-Allow-Methods"] = cors.methods or allow_of(node)
    local asked = h:header("access-control-request-headers")
    local allow_headers = cors.headers or asked
    if allow_headers then headers["Access-Control-Allow-Headers"] = allow_headers end
    if cors.max_age then headers["Access-Control-Max-Age"] = tostring(cors.max_age) end
    return headers
end

---------------------------------------------------------------------------
-- dispatch: one task per request
---------------------------------------------------------------------------

local function capture_error(err)
    if getmetatable(err) == HttpError then return err end
    return { error = err, traceback = traceback(tostring(err), 2) }
end

local observe_http = require("tamarco.core.metrics").observe_http

local function account(self, stat, status, t0)
    local stats = self.stats
    stats.requests = stats.requests + 1
    stats.in_flight = stats.in_flight - 1
    stat.count = stat.count + 1
    local statuses = stat.statuses
    statuses[status] = (statuses[status] or 0) + 1
    local d = (hrtime() - t0) * 1e-9
    stat.duration_sum = stat.duration_sum + d
    if d > stat.duration_max then stat.duration_max = d end
    -- Prometheus meters per route pattern, method and status
    observe_http(stat.pattern, stat.method, status, d)
end

-- Encodes a handler's body: returns body string, content type.
local function encode_body(body)
    local t = type(body)
    if t == "string" then return body, TEXT end
    if t == "table" then return assert(json.encode(body)), JSON end
    if body == nil then return nil, nil end
    return tostring(body), TEXT
end

local function error_body(message)
    return (json.encode({ error = message }))
end

-- Answers; a bad header from the handler becomes a 500.
local function respond(self, h, status, headers, body, ctype)
    local ok, err = pcall(h.respond, h, status, headers, body, ctype)
    if ok then return status end
    self.logger:error("invalid response from handler: " .. tostring(err))
    self.stats.errors = self.stats.errors + 1
    local ok2 = pcall(h.respond, h, 500, nil, error_body("internal server error"), JSON)
    if not ok2 then return status end
    return 500
end

function HttpServer:_cache_key(h, route)
    local parts = { h:info(), h:url() }
    for _, name in ipairs(self._cache_header_keys) do parts[#parts + 1] = h:header(name) or "" end
    if route.cache_headers then
        for _, name in ipairs(route.cache_headers) do parts[#parts + 1] = h:header(name) or "" end
    end
    return table.concat(parts, "\n")
end

-- Credentials a shared cache must not mix up between users. A request that
-- carries one is neither answered from nor stored into the cache, unless
-- the route's key varies on that header (cache_headers, cache.header_keys).
local CREDENTIAL_HEADERS = { "authorization", "cookie" }

local function lists_header(list, name)
    if not list then return false end
    for _, item in ipairs(list) do
        if type(item) == "string" and item:lower() == name then return true end
    end
    return false
end

function HttpServer:_cacheable_request(h, route)
    for _, name in ipairs(CREDENTIAL_HEADERS) do
        if h:header(name) and not lists_header(route.cache_headers, name)
            and not lists_header(self._cache_header_keys, name) then
            return false
        end
    end
    return true
end

-- A handler keeps its response out of the shared cache with Cache-Control
-- private, no-store or no-cache (there is no revalidation here), or by
-- setting a cookie, which must never reach another client.
local function storable_response(headers)
    if not headers then return true end
    for name, value in pairs(headers) do
        if type(name) == "string" then
            local lname = name:lower()
            if lname == "set-cookie" then return false end
            if lname == "cache-control" then
                local text = (type(value) == "table" and table.concat(value, ",") or tostring(value)):lower()
                for directive in text:gmatch("[^,%s][^,]*") do
                    local token = directive:match("^([%w%-]+)")
                    if token == "private" or token == "no-store" or token == "no-cache" then return false end
                end
            end
        end
    end
    return true
end

function HttpServer:_cache_store(key, entry)
    if self._cache[key] == nil then
        if self._cache_count >= self._cache_max then
            -- evict expired entries, then any
            local now = now_ms()
            for k, e in pairs(self._cache) do
                if e.expires <= now then self._cache[k] = nil; self._cache_count = self._cache_count - 1 end
            end
            if self._cache_count >= self._cache_max then
                local k = next(self._cache)
                if k then self._cache[k] = nil; self._cache_count = self._cache_count - 1 end
            end
        end
        self._cache_count = self._cache_count + 1
    end
    self._cache[key] = entry
end

--- Empties the response cache.
function HttpServer:clear_cache()
    self._cache = {}
    self._cache_count = 0
end

local function with_header(headers, name, value)
    local out = { [name] = value }
    if headers then for k, v in pairs(headers) do out[k] = v end end
    return out
end

function HttpServer:_not_routed(h, method, path, origin, node, stat, t0)
    local cors = self._cors
    local status, headers
    if node then
        origin = cors and origin
        if method == "OPTIONS" then
            -- CORS preflight, or a plain OPTIONS: 204 with what the path allows
            if origin and h:header("access-control-request-method") then
                headers = preflight_headers(cors, h, origin, node)
            else
                headers = {}
            end
            headers.Allow = allow_of(node)
            status = 204
            respond(self, h, status, headers, nil, nil)
        else
            status = 405
            headers = { Allow = allow_of(node) }
            if origin then headers = cors_headers(cors, origin, headers) end
            status = respond(self, h, status, headers, error_body("method not allowed"), JSON)
        end
    else
        status = respond(self, h, 404, nil, error_body("not found"), JSON)
    end
    account(self, stat, status, t0)
    if self.access_log then
        self.logger:info("http request", { method = method, path = path, status = status })
    end
end

-- The parameters of the route being matched: filled and emptied before any
-- handler runs, so one table serves every request.
local captured = {}

-- h: the request handle; method, path (without the query) and the Origin
-- header (or nil) come with it from C.
function HttpServer:_dispatch(h, method, path, origin)
    local t0 = hrtime()
    local stats = self.stats
    stats.in_flight = stats.in_flight + 1

    local node = self._static[path]
    if not node then node = walk(self._root, path, 2, captured, 0) end
    local route = node and (node.methods[method] or (method == "HEAD" and node.methods.GET))
    local params
    if route then
        local names = route.param_names
        local n = #names
        if n > 0 then
            params = {}
            for i = 1, n do params[names[i]] = url_decode(captured[i]) end
        end
    end
    for i = #captured, 1, -1 do captured[i] = nil end
    if not route then
        return self:_not_routed(h, method, path, origin, node, stats.unmatched, t0)
    end

    -- params in the constructor: the table is made with room for it
    local req = setmetatable({ _h = h, method = method, path = path, route = route.pattern, params = params },
        request_mt)

    local cache_key, cors = nil, self._cors
    if route.cache_ttl and (method == "GET" or method == "HEAD") and self:_cacheable_request(h, route) then
        cache_key = self:_cache_key(h, route)
        local hit = self._cache[cache_key]
        if hit and hit.expires > now_ms() then
            stats.cache_hits = stats.cache_hits + 1
            local headers = with_header(hit.headers, "x-cache", "HIT")
            if cors and origin then headers = cors_headers(cors, origin, headers) end
            local status = respond(self, h, hit.status, headers, hit.body, hit.ctype)
            return account(self, route.stat, status, t0)
        end
        stats.cache_misses = stats.cache_misses + 1
    end

    local ok, status, body, headers = xpcall(route.handler, capture_error, req)
    local ctype
    if ok then
        if type(status) ~= "number" then
            if status == nil and body == nil then
                status = 204
            else
                status, body, headers = 200, status, body
            end
        end
        if headers ~= nil and type(headers) ~= "table" then
            ok, status = false, { error = "handler returned headers that are not a table", traceback = "" }
        else
            local encoded
            ok, encoded, ctype = pcall(encode_body, body)
            if ok then
                body = encoded
            else
                status = { error = "cannot encode the response body: " .. tostring(encoded), traceback = "" }
            end
        end
    end
    if not ok then
        local err = status
        if getmetatable(err) == HttpError then
            status = err.status
            body = err.body ~= nil and encode_body(err.body) or error_body(err.message)
            ctype, headers = JSON, nil
        else
            stats.errors = stats.errors + 1
            self.logger:exception("handler of " .. method .. " " .. route.pattern .. " failed: "
                .. tostring(err.error), err.error, err.traceback, { method = method, path = path })
            status, body, ctype, headers = 500, error_body("internal server error"), JSON, nil
        end
    elseif cache_key and status >= 200 and status < 300 and storable_response(headers) then
        self:_cache_store(cache_key, { expires = now_ms() + route.cache_ttl * 1000, status = status,
            body = body, headers = headers, ctype = ctype })
        headers = with_header(headers, "x-cache", "MISS")
    end

    if cors and origin then headers = cors_headers(cors, origin, headers) end
    status = respond(self, h, status, headers, body, ctype)
    account(self, route.stat, status, t0)
    if self.access_log then
        self.logger:info("http request", { method = method, path = path, status = status,
            route = route.pattern, duration = (hrtime() - t0) * 1e-9 })
    end
end

---------------------------------------------------------------------------
-- phases
---------------------------------------------------------------------------

--- HttpServer:start(): listens on the configured address (a failure raises a "bind" error:
-- exit 11) and records the bound host and port.
function HttpServer:start()
    local c_options = self:_configure()
    local server, err, code = chttp.listen(c_options, function(h, method, path, origin)
        return self:_dispatch(h, method, path, origin)
    end)
    if not server then
        errors.raise("bind", "http server '" .. tostring(self.name) .. "': " .. tostring(err), { code = code })
    end
    self._server = server
    local host, port = server:address()
    self.host, self.port = host, port
    if self.logger then
        self.logger:info("http server listening on " .. host .. ":" .. port, { host = host, port = port })
    end
    if self.on_listen then self:on_listen(host, port, self.public_host, self.public_port) end
end

--- Hot reload: keeps the listener and its connections, takes the routes of
-- `new` (the same server defined by the reloaded code). Requests in flight
-- finish on the handlers they started with. Route counters carry over.
function HttpServer:adopt(new)
    local saved_root, saved_static = self._root, self._static
    local function repoint(node)
        for method, route in pairs(node.methods) do route.stat = route_stats(self, method, route.pattern) end
        for _, child in pairs(node.children) do repoint(child) end
        if node.param then repoint(node.param) end
    end
    repoint(new._root)
    self._root, self._static = new._root, new._static
    self:clear_cache()
    return function()
        self._root, self._static = saved_root, saved_static
        self:clear_cache()
    end
end

--- Graceful stop: stop accepting, let in-flight requests finish within
-- drain_timeout seconds, then close every connection.
function HttpServer:stop()
    local server = self._server
    if not server then return end
    local ok = server:shutdown((self.drain_timeout or 5) * 1000)
    if not ok and self.logger then
        self.logger:warning("http server: connections still busy after the drain timeout of "
            .. tostring(self.drain_timeout) .. " s were closed")
    end
    server:close()
    self._server = nil
end

--- server:address() -> host, port while listening.
function HttpServer:address()
    return self.host, self.port
end

--- Connection-level counters of the C server (connections, accepted,
-- rejected, bad_requests, timeouts, bytes...), or nil when not running.
function HttpServer:server_stats()
    return self._server and self._server:stats() or nil
end

--- HttpServer:status() -> the base status dict plus the bound `host` and `port`.
function HttpServer:status()
    local s = base.Resource.status(self)
    s.host, s.port = self.host, self.port
    return s
end

return HttpServer
