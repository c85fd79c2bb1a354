--- tamarco.resources.http_client: an HTTP(S) client resource.
--
--   local http = require "tamarco.resources.http"
--   local svc = tamarco.service { name = "shop", resources = { web = http.client() } }
--   local status, body, headers = svc.web:get("http://stock/items/42")
--   local status, body = svc.web:post(url, { json = { id = 42 } })
--   local value, err = svc.web:get_json(url)
--
-- Every call yields the running task until the response is complete (libcurl's
-- multi interface on the host's loop, see bindings/http_client.c) and returns
-- `status, body, headers` (header names lowercased, repeated headers joined
-- with ", ") or `nil, err, kind` (kind: "timeout", "connect", "resolve", "tls",
-- "too_large", "protocol", "error"). A 4xx/5xx is a response, not an error.
-- All clients of a process share one connection pool.
--
-- Settings under `system.resources.<name>` (later wins: built-in default,
-- the options given to `new`, the settings):
--   timeout_ms          whole request, default 30000
--   connect_timeout_ms  default 10000
--   verify_tls          default true
--   ca_file             CA bundle for verify_tls (default: the system's)
--   follow_redirects    default true (at most 10)
--   max_body_bytes      response body limit, default 64 MiB
--   base_url            prefixed to relative URLs ("/x")
--   headers             headers sent with every request
--
-- It also works without a service: `require("tamarco.resources.http_client").new()`
-- used inside any task.
local base = require "tamarco.resources.base"
local c = require "tamarco.c.http_client"
local cjson = require "cjson"

local HttpClient = base.class("http_client")

local DEFAULTS = {
    timeout_ms = 30000,
    connect_timeout_ms = 10000,
    verify_tls = true,
    follow_redirects = true,
    max_body_bytes = 64 * 1024 * 1024,
}
HttpClient.defaults = DEFAULTS

local SETTING_KEYS = { "timeout_ms", "connect_timeout_ms", "verify_tls", "ca_file",
    "follow_redirects", "max_body_bytes", "base_url", "headers" }

--- HttpClient:init(options): a client resource with its request counters at zero.
function HttpClient:init(options)
    base.Resource.init(self, options)
    self.counters = { requests = 0, errors = 0, in_flight = 0 }
end

--- The settings the client uses (for /status and debugging; no secrets).
function HttpClient:config()
    local out = {}
    for _, key in ipairs(SETTING_KEYS) do
        if key ~= "headers" then out[key] = self:setting(key) end
    end
    return out
end

local function has_header(headers, wanted)
    wanted = wanted:lower()
    for k in pairs(headers) do
        if type(k) == "string" and k:lower() == wanted then return true end
    end
    return false
end

local function url_escape(s)
    return (tostring(s):gsub("[^%w%-%._~]", function(ch) return ("%%%02X"):format(ch:byte()) end))
end

--- Encodes a table as a query string (keys sorted; list values repeat the key).
function HttpClient.encode_query(query)
    local keys = {}
    for k in pairs(query) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    local parts = {}
    for _, k in ipairs(keys) do
        local v = query[k]
        if type(v) == "table" then
            for _, item in ipairs(v) do parts[#parts + 1] = url_escape(k) .. "=" .. url_escape(item) end
        elseif v == true then
            parts[#parts + 1] = url_escape(k)
        elseif v ~= false then
            parts[#parts + 1] = url_escape(k) .. "=" .. url_escape(v)
        end
    end
    return table.concat(parts, "&")
end

--- client:request{method, url, headers, body, json, query, timeout, ...}
-- -> status, body, headers | nil, err, kind. `timeout` is in ms; the other
-- keys of the settings list above may be given per request too.
function HttpClient:request(opts)
    if type(opts) ~= "table" then error("http_client:request: options table expected", 2) end
    local url = opts.url
    if type(url) ~= "string" or url == "" then error("http_client:request: 'url' is required", 2) end
    local base_url = self:setting("base_url")
    if base_url and not url:find("^%a[%w+.-]*://") then
        url = base_url:gsub("/+$", "") .. "/" .. url:gsub("^/+", "")
    end
    if opts.query then
        local qs = type(opts.query) == "table" and HttpClient.encode_query(opts.query) or tostring(opts.query)
        if qs ~= "" then url = url .. (url:find("?", 1, true) and "&" or "?") .. qs end
    end

    local headers = {}
    local defaults = self:setting("headers")
    if type(defaults) == "table" then for k, v in pairs(defaults) do headers[k] = v end end
    if opts.headers then for k, v in pairs(opts.headers) do headers[k] = v end end

    local body = opts.body
    if opts.json ~= nil then
        local ok, encoded = pcall(cjson.encode, opts.json)
        if not ok then error("http_client:request: cannot encode 'json': " .. tostring(encoded), 2) end
        body = encoded
        if not has_header(headers, "content-type") then headers["Content-Type"] = "application/json" end
    end
    if body ~= nil and type(body) ~= "string" then
        error("http_client:request: 'body' must be a string (use 'json' for tables)", 2)
    end

    local function pick(key, alias)
        local v = opts[key]
        if v == nil and alias then v = opts[alias] end
        if v == nil then v = self:setting(key) end
        return v
    end
    local counters = self.counters
    counters.requests = counters.requests + 1
    counters.in_flight = counters.in_flight + 1
    local status, rbody, rheaders = c.request {
        method = (opts.method or "GET"):upper(),
        url = url,
        headers = headers,
        body = body,
        timeout_ms = pick("timeout_ms", "timeout"),
        connect_timeout_ms = pick("connect_timeout_ms", "connect_timeout"),
        verify_tls = pick("verify_tls"),
        ca_file = pick("ca_file"),
        follow_redirects = pick("follow_redirects"),
        max_body_bytes = pick("max_body_bytes"),
    }
    counters.in_flight = counters.in_flight - 1
    if not status then counters.errors = counters.errors + 1 end
    return status, rbody, rheaders
end

local function sugar(method)
    return function(self, url, opts)
        local o = {}
        if opts then for k, v in pairs(opts) do o[k] = v end end
        o.method, o.url = method, url
        return self:request(o)
    end
end

HttpClient.get = sugar("GET")
HttpClient.head = sugar("HEAD")
HttpClient.post = sugar("POST")
HttpClient.put = sugar("PUT")
HttpClient.patch = sugar("PATCH")
HttpClient.delete = sugar("DELETE")

--- http_client.resp_json(status, body, headers) -> value, status, headers | nil, err.
-- Composes with any call: `local v, err = http_client.resp_json(client:get(url))`.
-- A transport error passes through; a status >= 400 or a body that is not
-- JSON is an error (the status is the third value then).
function HttpClient.resp_json(status, body, headers)
    if not status then return nil, body, headers end
    if status >= 400 then
        local snippet = #body > 200 and body:sub(1, 200) .. "..." or body
        return nil, ("HTTP %d: %s"):format(status, snippet), status
    end
    if body == "" then return cjson.null, status, headers end
    local ok, value = pcall(cjson.decode, body)
    if not ok then return nil, "invalid JSON in response: " .. tostring(value), status end
    return value, status, headers
end

--- client:get_json(url[, opts]) -> decoded body, status, headers | nil, err.
function HttpClient:get_json(url, opts)
    local o = { headers = { Accept = "application/json" } }
    if opts then
        for k, v in pairs(opts) do o[k] = v end
        if opts.headers then
            o.headers = { Accept = "application/json" }
            for k, v in pairs(opts.headers) do o.headers[k] = v end
        end
    end
    return HttpClient.resp_json(self:get(url, o))
end

--- client:request_json(opts): request() then resp_json().
function HttpClient:request_json(opts)
    return HttpClient.resp_json(self:request(opts))
end

--- HttpClient:status() -> the base status dict plus `requests`, `errors` and `in_flight`.
function HttpClient:status()
    local s = base.Resource.status(self)
    s.requests = self.counters.requests
    s.errors = self.counters.errors
    s.in_flight = self.counters.in_flight
    return s
end

--- Process-wide figures of the shared curl multi handle.
HttpClient.stats = c.stats
HttpClient.curl_version = c.curl_version

return HttpClient
