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
--   breaker_failures    calling by name: failures in a row that open an
--                       instance's circuit (default 3; a refused connection
--                       opens it at once)
--   breaker_open_ms     how long an open instance is skipped before one
--                       probe call (default 5000)
--   discovery_path      where the registry keeps instances, without a
--                       registry resource in the service (default
--                       "system.discovery")
--
-- CALLING OTHER SERVICES BY NAME. `request{ service = "orders", path =
-- "/items/1", ... }`, or a URL `tamarco://orders/items/1` with any method,
-- calls an instance of the service "orders" as the registry resource
-- (tamarco.resources.registry) records it in etcd: `http://host:port` of its
-- registered value (or `endpoints[endpoint]` with `endpoint = "<http
-- server resource>"`). The instances come from the registry's etcd (or
-- TAMARCO_ETCD_ENDPOINTS / system.etcd.endpoints / TAMARCO_ETCD_HOST
-- without one): read once per service, then kept current by a watch, so a
-- call costs no etcd round trip and a new instance gets calls as soon as it
-- registers. Calls go round-robin over the instances whose circuit is not
-- open (see tamarco.clients.discovery). When the connection to an instance fails
-- (refused, reset, no answer: not a timeout) an idempotent request (GET,
-- HEAD, PUT, DELETE, OPTIONS, or any with `retry = true`; `retry = false`
-- turns it off) is tried once more on another instance. Errors name the
-- service: `nil, "service 'orders': no instance registered (...)",
-- "no_instance"`. Meters: `http_client_service_calls_total{target,
-- instance, outcome}` (outcome "response" or the failure kind) and
-- `http_client_service_call_seconds{target}`. `client:close()` ends the
-- watches (the resource's stop does it).
--
-- It also works without a service: `require("tamarco.resources.http_client").new()`
-- used inside any task.
local base = require "tamarco.core.resource"
local c = require "tamarco.c.http_client"
local json = require "tamarco.core.json"
local discovery = require "tamarco.clients.discovery"
local metrics = require "tamarco.core.metrics"
local ctimer = require "tamarco.c.timer"

local HttpClient = base.class("http_client")

local DEFAULTS = {
    timeout_ms = 30000,
    connect_timeout_ms = 10000,
    verify_tls = true,
    follow_redirects = true,
    max_body_bytes = 64 * 1024 * 1024,
    breaker_failures = discovery.DEFAULTS.failures_to_open,
    breaker_open_ms = discovery.DEFAULTS.open_ms,
    discovery_path = "system.discovery",
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
    if opts.service ~= nil or (type(opts.url) == "string" and opts.url:find("^tamarco://")) then
        return self:_request_service(opts)
    end
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
        local encoded, err = json.encode(opts.json)
        if not encoded then error("http_client:request: cannot encode 'json': " .. tostring(err), 2) end
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

---------------------------------------------------------------------------
-- calling services by name
---------------------------------------------------------------------------

local IDEMPOTENT = { GET = true, HEAD = true, PUT = true, DELETE = true, OPTIONS = true }
-- the connection failed before a response: another instance may do better
local CONNECTION_FAILURES = { connect = true, resolve = true, protocol = true, error = true }

-- The directory of instances: the service's registry resource's etcd, or
-- etcd's address from the environment and settings.
function HttpClient:_directory()
    if self._discovery then return self._discovery end
    local client, root
    local svc = self.service
    for _, name in ipairs(svc and svc.resource_names or {}) do
        local resource = svc.resources[name]
        if resource.type_name == "registry" then
            client, root = resource:client(), resource:root()
            break
        end
    end
    if not client then
        local etcd = require "tamarco.clients.etcd"
        local err
        client, err = etcd.from_env { store = type(self.settings) == "table" and self.settings.store or nil }
        if not client then
            return nil, "calling a service by name needs etcd (TAMARCO_ETCD_ENDPOINTS, system.etcd.endpoints "
                .. "or TAMARCO_ETCD_HOST, or a registry resource): " .. tostring(err or "none is set")
        end
        root = "/" .. tostring(self:setting("discovery_path")):gsub("%.", "/"):gsub("^/+", ""):gsub("/+$", "") .. "/"
    end
    self._discovery = discovery.directory(client, root, {
        failures_to_open = self:setting("breaker_failures"),
        open_ms = self:setting("breaker_open_ms"),
    })
    return self._discovery
end

local call_counter = metrics.counter("http_client_service_calls_total", {
    help = "Calls to other services by name, per target service, instance and outcome" })
local call_seconds = metrics.histogram("http_client_service_call_seconds", {
    help = "Time of calls to other services by name (retries included), per target service" })

-- one series per target, instance and outcome; the label tables are made
-- once per instance, not per call
local function count_call(name, instance, outcome)
    local meters = instance.meters
    if not meters then
        meters = {}
        instance.meters = meters
    end
    local meter = meters[outcome]
    if not meter then
        meter = call_counter:labels({ target = name, instance = instance.id, outcome = outcome })
        meters[outcome] = meter
    end
    meter:inc()
end

-- an instance that left the registry takes its series with it: restarts
-- give new instance ids, which would otherwise add series without end
local function forget_meters(instance)
    for _, meter in pairs(instance.meters or {}) do meter:remove() end
    instance.meters = nil
end

local function instance_url(instance, endpoint)
    if endpoint then
        local endpoints = instance.info.endpoints
        return type(endpoints) == "table" and endpoints[endpoint] or nil
    end
    return instance.url
end

function HttpClient:_request_service(opts)
    local name, path = opts.service, opts.path
    if name == nil then
        name, path = opts.url:match("^tamarco://([^/?#]+)(.*)$")
        if not name then error("http_client:request: bad service URL '" .. opts.url .. "'", 3) end
    end
    if type(name) ~= "string" or name == "" then error("http_client:request: 'service' must be a name", 3) end
    path = path or ""
    if path ~= "" and not path:find("^[/?]") then path = "/" .. path end
    local directory, err = self:_directory()
    if not directory then return nil, err, "no_instance" end
    local pool
    pool, err = directory:service(name)
    if not pool then return nil, err, "no_instance" end
    pool.on_departed = forget_meters
    local method = (opts.method or "GET"):upper()
    local retry = opts.retry
    if retry == nil then retry = IDEMPOTENT[method] or false end
    local started = ctimer.hrtime()
    local tried, status, body, headers
    for attempt = 1, retry and 2 or 1 do
        local instance, why = pool:pick(tried)
        if not instance then
            if attempt == 1 then return nil, why, "no_instance" end
            break   -- no other instance: the first failure stands
        end
        local base_url = instance_url(instance, opts.endpoint)
        if not base_url then
            return nil, ("service '%s': instance %s has no endpoint '%s'"):format(name, instance.id,
                tostring(opts.endpoint)), "no_instance"
        end
        local o = {}
        for k, v in pairs(opts) do o[k] = v end
        o.service, o.path, o.retry, o.endpoint = nil, nil, nil, nil
        o.url = base_url .. path
        status, body, headers = self:request(o)
        if status then
            pool:succeeded(instance)
            count_call(name, instance, "response")
            break
        end
        count_call(name, instance, headers or "error")
        if pool:failed(instance, headers) and self.logger then
            self.logger:warning(("service '%s': instance %s at %s failing (%s); skipping it for %d ms")
                :format(name, instance.id, base_url, tostring(body), pool.directory.open_ms))
        end
        body = ("service '%s': instance %s at %s: %s"):format(name, instance.id, base_url, tostring(body))
        if not CONNECTION_FAILURES[headers] then break end
        tried = instance.id
    end
    if not pool.seconds then pool.seconds = call_seconds:labels({ target = name }) end
    pool.seconds:observe((ctimer.hrtime() - started) / 1e9)
    return status, body, headers
end

--- client:close(): ends the watches that follow the called services.
function HttpClient:close()
    if self._discovery then
        self._discovery:close()
        self._discovery = nil
    end
end

--- HttpClient:stop(): client:close() (ends the discovery watches) at the resource's stop.
function HttpClient:stop()
    self:close()
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
    if body == "" then return json.null, status, headers end
    local value, err = json.decode(body)
    if value == nil then return nil, "invalid JSON in response: " .. tostring(err), status end
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
