--- tamarco.resources.registry: service discovery in etcd (DESIGN §7).
--
--   local registry = require "tamarco.resources.registry"
--   local svc = tamarco.service { name = "shop", resources = { registry = registry.new() } }
--   local list = svc.registry:instances("stock")     -- { {instance_id=, host=, port=, ...}, ... }
--   local handle = svc.registry:watch("stock", function(event, instance_id, info) end)
--   handle:cancel()
--
-- When the setting `enabled` is true, the instance registers itself (a
-- service that does not list this resource gets it added by the lifecycle,
-- see lifecycle.add_configured_resources) after
-- every resource has started (post_start) as the key
-- `/<path>/<service>/<instance_id>` (path `system.discovery` by default, so
-- `/system/discovery/shop/<uuid>`), whose value is the JSON
--   { "service", "instance_id", "hostname", "pid", "started_at",
--     "host", "port", "endpoints": { <http server resource> = "http://h:p" } }
-- plus the fields of the `address` setting. The key lives under a lease of
-- `ttl` seconds (5) that a task keeps alive every ttl/3: the key is removed
-- on stop (the lease is revoked) and disappears within the TTL after a
-- crash or SIGKILL. When etcd goes away the status turns CONNECTING and
-- the task keeps trying; when the lease expired meanwhile the instance
-- registers again with a new lease.
--
-- instances(service) and watch(service, fn) work with or without `enabled`
-- (they only need etcd's address). watch reports changes from the moment it
-- is called: fn("arrived", id, info) for a new instance, fn("departed", id)
-- when its key goes away (stop, or lease expiry after a crash); call
-- instances() for the ones already there. Watches end when the resource stops.
--
-- Settings under `system.resources.<name>` (name: the resource's name in the
-- service, usually `registry`):
--   enabled     false
--   path        "system.discovery" (dots or slashes)
--   ttl         5 (seconds)
--   etcd_endpoints  a list of cluster members ("h:p"), else etcd_host, else
--               TAMARCO_ETCD_ENDPOINTS, system.etcd.endpoints, TAMARCO_ETCD_HOST
--   etcd_host   (one etcd) else 127.0.0.1
--   etcd_port   else TAMARCO_ETCD_PORT, else 2379
-- With several members the lease keep-alive fails over to the next member
-- when one dies (each try bounded by ttl/3), so the key stays while the
-- cluster has a quorum.
--   host        the address others should use (default: the first HTTP
--               server's bound host, else the host name)
--   port        default: the first HTTP server's port
--   address     a table of extra fields for the registered value
-- etcd user/password come from TAMARCO_ETCD_USER / TAMARCO_ETCD_PASSWORD.
local base = require "tamarco.core.resource"
local errors = require "tamarco.core.errors"
local etcd = require "tamarco.clients.etcd"
local process = require "tamarco.c.process"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"

local STATUS = base.STATUS

local Registry = base.class("registry")

local DEFAULTS = { enabled = false, path = "system.discovery", ttl = 5 }
Registry.defaults = DEFAULTS

--- Registry:init(options): a registry resource with no watches.
function Registry:init(options)
    base.Resource.init(self, options)
    self.watchers = {}
end

local env = etcd.env

--- The etcd client (created on first use from the settings).
function Registry:client()
    if not self._client then
        -- a try must end well within the lease's TTL, leaving time for the
        -- next member
        local ttl_ms = (tonumber(self:setting("ttl")) or DEFAULTS.ttl) * 1000
        local opts = {
            user = env("TAMARCO_ETCD_USER"),
            password = env("TAMARCO_ETCD_PASSWORD"),
            timeout_ms = math.max(500, math.min(5000, math.floor(ttl_ms / 3))),
            connect_timeout_ms = math.max(200, math.min(2000, math.floor(ttl_ms / 6))),
        }
        local endpoints, host = self:setting("etcd_endpoints"), self:setting("etcd_host")
        if endpoints then
            local _, err = etcd.parse_endpoints(endpoints)
            if err then self:settings_error("etcd_endpoints", err) end
            opts.endpoints = endpoints
        elseif host then
            opts.host, opts.port = host, self:setting("etcd_port") or env("TAMARCO_ETCD_PORT")
        else
            local located, err = etcd.locate(type(self.settings) == "table" and self.settings.store or nil)
            if err then errors.raise("settings", "registry: " .. err) end
            if located then for k, v in pairs(located) do opts[k] = v end end
        end
        self._client = etcd.new(opts)
    end
    return self._client
end

--- "/system/discovery/<service>/"
function Registry:prefix(service_name)
    local path = tostring(self:setting("path")):gsub("%.", "/"):gsub("^/+", ""):gsub("/+$", "")
    return "/" .. path .. "/" .. service_name .. "/"
end

--- "/system/discovery/": where every service's instances are.
function Registry:root()
    local path = tostring(self:setting("path")):gsub("%.", "/"):gsub("^/+", ""):gsub("/+$", "")
    return "/" .. path .. "/"
end

--- The key this instance registers under.
function Registry:key()
    return self:prefix(self.service.name) .. self.service.instance_id
end

--- The value this instance registers (a table).
function Registry:address()
    local svc = self.service
    local value = {
        service = svc.name,
        instance_id = svc.instance_id,
        hostname = process.hostname(),
        pid = process.pid(),
        started_at = self.started_at,
        endpoints = {},
    }
    local first_host, first_port
    for _, name in ipairs(svc.resource_names or {}) do
        local resource = svc.resources[name]
        if resource.type_name == "http_server" and type(resource.address) == "function" then
            local host, port = resource:address()
            if host and port then
                if host == "0.0.0.0" or host == "::" then host = value.hostname end
                value.endpoints[name] = ("http://%s:%s"):format(host:find(":", 1, true) and "[" .. host .. "]" or host, port)
                if not first_host then first_host, first_port = host, port end
            end
        end
    end
    value.host = self:setting("host") or first_host or value.hostname
    value.port = self:setting("port") or first_port
    local extra = self:setting("address")
    if type(extra) == "table" then for k, v in pairs(extra) do value[k] = v end end
    return value
end

-- grant + put; returns true or nil, err.
function Registry:_register()
    local client = self:client()
    local lease, err = client:grant(self.ttl)
    if not lease then return nil, err end
    local ok
    ok, err = client:put(self:key(), etcd.encode_json(self:address()), { lease = lease })
    if not ok then
        client:revoke(lease)
        return nil, err
    end
    self.lease = lease
    return true
end

function Registry:_keepalive_loop()
    local interval = math.max(200, math.floor(self.ttl * 1000 / 3))
    local failing = false
    while not self.stopping do
        timer.sleep(failing and math.min(interval, 1000) or interval)
        if self.stopping then break end
        local err
        if self.lease then
            local ttl
            ttl, err = self:client():keepalive(self.lease)
            if ttl == 0 then                  -- the lease expired while we could not reach etcd
                self.lease = nil
                if self.logger then self.logger:warning("registry lease expired; registering again") end
            end
        end
        if not self.stopping and not self.lease and not err then
            local ok
            ok, err = self:_register()
            if ok and self.logger then self.logger:info("registered in etcd as " .. self:key()) end
        end
        if self.stopping then break end
        if err then
            if not failing and self.logger then
                self.logger:warning("registry: etcd unreachable, retrying: " .. tostring(err))
            end
            failing = true
            self:set_status(STATUS.CONNECTING)
        elseif failing then
            failing = false
            self:set_status(STATUS.STARTED)
            if self.logger then self.logger:info("registry: etcd reachable again") end
        end
    end
end

--- Registry:post_start(): when enabled, registers the instance under a lease of `ttl` seconds
-- and keeps the lease alive (re-registering after etcd comes back).
function Registry:post_start()
    if not self:setting("enabled") then return end
    self.ttl = tonumber(self:setting("ttl")) or 5
    self.started_at = timer.time()
    self.stopping = false
    local ok, err = self:_register()
    if ok then
        if self.logger then self.logger:info("registered in etcd as " .. self:key(), { ttl = self.ttl }) end
    else
        if self.logger then
            self.logger:warning("registry: cannot register in etcd yet, retrying: " .. tostring(err))
        end
        self:set_status(STATUS.CONNECTING)
    end
    self.task = scheduler.spawn(function() self:_keepalive_loop() end)
end

--- Registry:stop(): stops the keep-alive and the watches and revokes the lease (the key goes away).
function Registry:stop()
    self.stopping = true
    if self.task then
        scheduler.interrupt(self.task)
        self.task = nil
    end
    for handle in pairs(self.watchers) do handle:cancel() end
    if self.lease then
        local lease = self.lease
        self.lease = nil
        local ok, err = self:client():revoke(lease)
        if not ok and self.logger then
            self.logger:warning("registry: cannot revoke the lease (the key expires within its TTL): " .. tostring(err))
        end
    end
end

local function decode_instance(kv, prefix)
    local info = etcd.decode_json(kv.value)
    if type(info) ~= "table" then info = { value = kv.value } end
    info.instance_id = info.instance_id or kv.key:sub(#prefix + 1)
    return info
end

--- registry:instances(service_name) -> list of instances (their registered
-- values, sorted by instance_id) | nil, err.
function Registry:instances(service_name)
    local prefix = self:prefix(service_name)
    local kvs, err, kind = self:client():range(prefix, { prefix = true })
    if not kvs then return nil, err, kind end
    local list = {}
    for _, kv in ipairs(kvs) do list[#list + 1] = decode_instance(kv, prefix) end
    table.sort(list, function(a, b) return tostring(a.instance_id) < tostring(b.instance_id) end)
    return list
end

--- registry:watch(service_name, fn) -> handle | nil, err. fn(event,
-- instance_id, info) with event "arrived" or "departed" runs in the watch's
-- task, in order, for every change after the call (it yields: it reads the
-- current instances first, so that none is reported twice or missed).
function Registry:watch(service_name, fn)
    assert(type(fn) == "function", "registry:watch: fn must be a function")
    local prefix = self:prefix(service_name)
    local known = nil   -- instance ids, after the first read
    local handle = {}
    local function arrived(id, kv)
        known[id] = true
        fn("arrived", id, decode_instance(kv, prefix))
    end
    local watcher, err, kind = self:client():follow(prefix, {
        -- the first read: what is there now is not news; a read again
        -- after a compaction: what changed meanwhile is
        snapshot = function(kvs)
            local now = {}
            for _, kv in ipairs(kvs) do now[kv.key:sub(#prefix + 1)] = kv end
            if not known then
                known = {}
                for id in pairs(now) do known[id] = true end
                return
            end
            for id in pairs(known) do
                if not now[id] then
                    known[id] = nil
                    fn("departed", id)
                end
            end
            for _, kv in ipairs(kvs) do
                local id = kv.key:sub(#prefix + 1)
                if not known[id] then arrived(id, kv) end
            end
        end,
        events = function(events)
            for _, e in ipairs(events) do
                local id = e.key:sub(#prefix + 1)
                if e.type == "DELETE" then
                    known[id] = nil
                    fn("departed", id)
                elseif not known[id] then
                    arrived(id, e)
                end
            end
        end,
    })
    if not watcher then return nil, err, kind end
    handle.watcher = watcher
    function handle.cancel()
        watcher:close()
        self.watchers[handle] = nil
    end
    self.watchers[handle] = true
    return handle
end

--- Registry:status() -> the base status dict plus `enabled` and `registered`.
function Registry:status()
    local s = base.Resource.status(self)
    s.enabled = self:setting("enabled") and true or false
    s.registered = self.lease ~= nil
    return s
end

return Registry
