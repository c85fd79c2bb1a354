--- tamarco.clients.discovery: calling other services by name — the instances the
-- registry has in etcd, kept current by a watch, and which one to call next.
--
--   local directory = discovery.directory(etcd_client, "/system/discovery/")
--   local pool = assert(directory:service("orders"))   -- first use: one etcd read, then a watch
--   local instance, err = pool:pick()                  -- round-robin over the healthy ones
--   ... call instance.url ...
--   pool:succeeded(instance) / pool:failed(instance, kind)
--   directory:close()
--
-- A directory reads `<root><service>/` once, on the first call for that
-- service, and from then on follows the watch (arrivals and departures are
-- seen within milliseconds of etcd's change, no etcd round trip per call).
-- An instance is { id, url, info } where url is "http://host:port" from its
-- registered value (or its `endpoints[endpoint]` when asked for one).
-- `pool.on_departed(instance)`, when set, hears of each instance that left.
--
-- CIRCUIT BREAKER, per instance: `failures_to_open` (3) failures in a row
-- open it — a refused connection opens it at once (nothing listens there) —
-- and an open instance is skipped for `open_ms` (5000); then one call is let
-- through as a probe (half-open): success closes it, failure opens it again.
-- When every instance is open, pick() returns nil and says so.
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local etcd = require "tamarco.clients.etcd"

local discovery = {}

discovery.DEFAULTS = { failures_to_open = 3, open_ms = 5000 }

local Pool = {}
Pool.__index = Pool

local Directory = {}
Directory.__index = Directory

--- discovery.directory(client, root[, options]) -> a directory. root:
-- "/system/discovery/"; options: failures_to_open, open_ms.
function discovery.directory(client, root, options)
    options = options or {}
    return setmetatable({
        client = client,
        root = root:sub(-1) == "/" and root or root .. "/",
        pools = {},
        failures_to_open = tonumber(options.failures_to_open) or discovery.DEFAULTS.failures_to_open,
        open_ms = tonumber(options.open_ms) or discovery.DEFAULTS.open_ms,
        closed = false,
    }, Directory)
end

local function url_of(info)
    local host, port = info.host, tonumber(info.port)
    if type(host) ~= "string" or not port then return nil end
    if host:find(":", 1, true) then host = "[" .. host .. "]" end
    return ("http://%s:%d"):format(host, port)
end

local function decode(kv, prefix)
    local info = etcd.decode_json(kv.value)
    if type(info) ~= "table" then return nil end
    return { id = kv.key:sub(#prefix + 1), info = info, url = url_of(info) }
end

--- directory:service(name) -> pool | nil, err. The first call for a name
-- reads etcd (other tasks asking meanwhile wait for that read).
function Directory:service(name)
    if self.closed then return nil, "discovery: closed" end
    local pool = self.pools[name]
    if pool then
        if pool.loading then
            pool.loading[#pool.loading + 1] = scheduler.current()
            scheduler.suspend("discovery: first read of " .. name)
            return self:service(name)
        end
        return pool
    end
    local prefix = self.root .. name .. "/"
    pool = setmetatable({ name = name, prefix = prefix, directory = self, instances = {}, order = {},
        next = 0, breakers = {}, loading = {} }, Pool)
    self.pools[name] = pool
    local watcher, err = self.client:follow(prefix, {
        snapshot = function(kvs) pool:_fill(kvs) end,
        events = function(events)
            for _, e in ipairs(events) do
                local id = e.key:sub(#prefix + 1)
                if e.type == "DELETE" then
                    pool:_depart(id)
                else
                    pool.instances[id] = decode(e, prefix)
                end
            end
            pool:_reorder()
        end,
    })
    local waiting = pool.loading
    pool.loading = nil
    if not watcher then
        self.pools[name] = nil
        for _, co in ipairs(waiting) do scheduler.wake(co) end
        return nil, ("service '%s': cannot read its instances from etcd (%s)"):format(name, tostring(err))
    end
    pool.watcher = watcher
    for _, co in ipairs(waiting) do scheduler.wake(co) end
    return pool
end

--- directory:close(): ends every watch.
function Directory:close()
    self.closed = true
    for _, pool in pairs(self.pools) do
        if pool.watcher then pool.watcher:close() end
    end
    self.pools = {}
end

-- replaces the instances by those of a full read (breakers of the ones
-- still there are kept)
function Pool:_fill(kvs)
    local instances = {}
    for _, kv in ipairs(kvs) do
        local instance = decode(kv, self.prefix)
        if instance then instances[instance.id] = instance end
    end
    for id in pairs(self.instances) do
        if not instances[id] then self:_depart(id) end
    end
    for id in pairs(self.breakers) do
        if not instances[id] then self.breakers[id] = nil end
    end
    self.instances = instances
    self:_reorder()
end

-- an instance left the registry: forget it, and tell on_departed (the
-- caller's hook, e.g. to drop the instance's metric series)
function Pool:_depart(id)
    local instance = self.instances[id]
    self.instances[id] = nil
    self.breakers[id] = nil
    if instance and self.on_departed then self.on_departed(instance) end
end

function Pool:_reorder()
    local order = {}
    for id in pairs(self.instances) do order[#order + 1] = id end
    table.sort(order)
    self.order = order
end

--- pool:count() -> number of registered instances
function Pool:count() return #self.order end

-- may this instance be called now? (and is it the half-open probe?)
function Pool:_admits(id, now)
    local breaker = self.breakers[id]
    if not breaker or breaker.state == "closed" then return true end
    if breaker.state == "open" and now - breaker.opened_at >= self.directory.open_ms then
        return true, true
    end
    return false
end

--- pool:pick([exclude_id]) -> instance | nil, err: the next healthy instance
-- in round-robin order (skipping exclude_id, the one a retry avoids).
function Pool:pick(exclude_id)
    local order, n = self.order, #self.order
    if n == 0 then
        return nil, ("service '%s': no instance registered (etcd %s)"):format(self.name, self.prefix)
    end
    local now = timer.now()
    for i = 1, n do
        local id = order[(self.next + i - 1) % n + 1]
        local instance = self.instances[id]
        if id ~= exclude_id and instance and instance.url then
            local admitted, probe = self:_admits(id, now)
            if admitted then
                self.next = (self.next + i) % n
                if probe then
                    local breaker = self.breakers[id]
                    breaker.state = "half_open"
                end
                return instance
            end
        end
    end
    if exclude_id and n == 1 then
        return nil, ("service '%s': no other instance to retry on"):format(self.name)
    end
    return nil, ("service '%s': none of its %d instance(s) is healthy (circuit open after failures)")
        :format(self.name, n)
end

--- pool:succeeded(instance): closes its breaker.
function Pool:succeeded(instance)
    self.breakers[instance.id] = nil
end

--- pool:failed(instance, kind) -> true when this opened its breaker.
function Pool:failed(instance, kind)
    if not self.instances[instance.id] then return false end
    local breaker = self.breakers[instance.id]
    if not breaker then
        breaker = { state = "closed", failures = 0 }
        self.breakers[instance.id] = breaker
    end
    breaker.failures = breaker.failures + 1
    if breaker.state == "half_open" or kind == "connect"
        or breaker.failures >= self.directory.failures_to_open then
        local was_open = breaker.state == "open"
        breaker.state = "open"
        breaker.opened_at = timer.now()
        return not was_open
    end
    return false
end

--- pool:state(id) -> "closed" | "open" | "half_open"
function Pool:state(id)
    local breaker = self.breakers[id]
    return breaker and breaker.state or "closed"
end

return discovery
