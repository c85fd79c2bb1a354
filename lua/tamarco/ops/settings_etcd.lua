--- tamarco.ops.settings_etcd: etcd as a settings source (DESIGN §5).
--
-- Keys are Tamarco's paths (`/system/microservices/<svc>/<key>`,
-- `/system/logging/profile`, ...), values are JSON (`1000`, `"Yes"`,
-- `{"a": 1}`, `[1, 2]`). A value that is not valid JSON is taken as a plain
-- string; a JSON null is an absent key. The source reads every key under
-- `/system/` (except the service registry's keys, `/system/discovery/` by
-- default) and watches that prefix: a change in etcd reaches the store —
-- `svc.settings:watch`, `on_settings_change`, the live log profile —
-- within milliseconds, once per real change. etcd sits above the YAML file
-- and the defaults and below the environment (`TAMARCO__...` variables).
--
-- `tamarco-host run` uses it when etcd's address is known:
--   TAMARCO_ETCD_ENDPOINTS  the members of an etcd cluster, h1:p1,h2:p2,h3:p3
--                           (or the setting system.etcd.endpoints, a list in
--                           the YAML file); requests and the watch fail over
--                           from member to member (see tamarco.clients.etcd)
--   TAMARCO_ETCD_HOST       a single etcd's address (a host name or IP)
--   TAMARCO_ETCD_PORT       default 2379
--   TAMARCO_ETCD_USER, TAMARCO_ETCD_PASSWORD
--                           authentication (a token from /v3/auth/authenticate)
--   ETCD_CHECK_KEY          optional: wait (polling every 500 ms) until this
--                           key exists before reading the settings — for a
--                           deploy that writes the settings then sets the key
--   TAMARCO_ETCD_RETRY=1    when etcd cannot be reached at start, keep trying
--                           (backoff up to 5 s, a warning each time) instead of
--                           exiting; the setting `system.etcd.retry: true`
--                           (YAML file or environment) does the same
-- Without retry, an unreachable etcd at start ends `run` with exit code 2 and
-- a message naming the address and these variables. Once running, losing
-- etcd keeps the last settings; the watch resumes from the last revision
-- seen when etcd is back, and a compacted history means a full reload.
local backoff = require "tamarco.c.backoff"
local errors = require "tamarco.core.errors"
local etcd = require "tamarco.clients.etcd"
local tasks = require "tamarco.core.tasks"

local settings_etcd = {}

settings_etcd.PREFIX = "/system/"
settings_etcd.DEFAULT_EXCLUDE = { "/system/discovery/" }

local function decode(value)
    local decoded, err = etcd.decode_json(value)
    if err then return value end          -- not JSON: a plain string
    if decoded == etcd.null then return nil end
    return decoded
end
settings_etcd.decode = decode

local Source = {}
Source.__index = Source

--- settings_etcd.source{ client =, prefix = "/system/", exclude = {...}, log = fn(level, msg) }
function settings_etcd.source(opts)
    opts = opts or {}
    local client = opts.client or etcd.new(opts)
    return setmetatable({
        name = "etcd",
        client = client,
        prefix = opts.prefix or settings_etcd.PREFIX,
        exclude = opts.exclude or settings_etcd.DEFAULT_EXCLUDE,
        log = opts.log or function(level, message)
            io.stderr:write(("[settings] %s: %s\n"):format(level, message))
        end,
        kvs = {},            -- key -> raw value
        revision = nil,      -- of the last full read
    }, Source)
end

--- Where dotted `key` lives in etcd, for messages (see store:origin).
function Source:locate(key)
    return ("etcd key /%s at %s"):format((key:gsub("%.", "/")), self.client:address())
end

function Source:_excluded(key)
    for _, prefix in ipairs(self.exclude) do
        if key:sub(1, #prefix) == prefix then return true end
    end
    return false
end

function Source:_tree()
    local list = {}
    for key, value in pairs(self.kvs) do list[#list + 1] = { key = key, value = value } end
    table.sort(list, function(a, b) return a.key < b.key end)
    return etcd.tree_of(list, "/", decode)
end

-- Full read: replaces kvs; returns the revision read.
function Source:_read()
    local kvs, revision, kind = self.client:range(self.prefix, { prefix = true })
    if not kvs then return nil, revision, kind end
    local map = {}
    for _, kv in ipairs(kvs) do
        if not self:_excluded(kv.key) then map[kv.key] = kv.value end
    end
    self.kvs = map
    self.revision = revision
    return revision
end

--- source:write(key, value) -> true | nil, err: replaces dotted `key` and
-- everything below it with `value` (one etcd key per leaf, JSON values, as
-- `tamarco-host etcd write-yml` writes them); value nil removes them. Used by
-- settings:set / settings:delete. Runs inside a task.
function Source:write(key, value)
    local path = "/" .. tostring(key):gsub("^/+", ""):gsub("%.", "/")
    if (path .. "/"):sub(1, #self.prefix) ~= self.prefix or path .. "/" == self.prefix then
        return nil, ("only keys below %s are settings (got %s)"):format(self.prefix, path)
    end
    if self:_excluded(path .. "/") then
        return nil, ("%s belongs to the service registry, not to the settings"):format(path)
    end
    local leaves = {}
    if value ~= nil then
        local ok, flat = pcall(require("tamarco.clients.etcd").flatten, value, path)
        if not ok then return nil, flat end
        leaves = flat
    end
    -- remove only what the new value does not overwrite, so that watchers
    -- never see the key missing in between
    local has_children, replaced_by_leaf = false, #leaves == 1 and leaves[1].key == path
    for k in pairs(self.kvs) do
        if k:sub(1, #path + 1) == path .. "/" then has_children = true end
    end
    local deleted, err = true, nil
    if self.kvs[path] ~= nil and not replaced_by_leaf then deleted, err = self.client:delete(path) end
    if deleted and has_children then deleted, err = self.client:delete(path .. "/", { prefix = true }) end
    if not deleted then return nil, err end
    for k in pairs(self.kvs) do
        if k == path or k:sub(1, #path + 1) == path .. "/" then self.kvs[k] = nil end
    end
    for _, leaf in ipairs(leaves) do
        local revision, put_err = self.client:put(leaf.key, leaf.json)
        if not revision then return nil, put_err end
        self.kvs[leaf.key] = leaf.json
    end
    return true
end

function Source:load()
    local ok, err, kind = self:_read()
    if not ok then
        self.last_error_kind = kind
        return nil, err
    end
    return self:_tree()
end

function Source:watch(on_tree_changed)
    self:close()
    if not self.revision then
        local ok, err = self:_read()
        if not ok then return nil, err end
    end
    self.watcher = self.client:watch(self.prefix, {
        prefix = true,
        start_revision = self.revision + 1,
        on_events = function(events)
            local changed = false
            for _, event in ipairs(events) do
                if not self:_excluded(event.key) then
                    if event.type == "DELETE" then
                        if self.kvs[event.key] ~= nil then changed = true end
                        self.kvs[event.key] = nil
                    else
                        if self.kvs[event.key] ~= event.value then changed = true end
                        self.kvs[event.key] = event.value
                    end
                end
            end
            if changed then on_tree_changed(self:_tree()) end
        end,
        on_compacted = function(compact_revision)
            self.log("warning", ("etcd history compacted at revision %d: reloading every setting")
                :format(compact_revision))
            local revision, err = self:_read()
            if not revision then
                self.log("warning", "etcd settings reload failed, retrying: " .. tostring(err))
                return nil
            end
            on_tree_changed(self:_tree())
            return revision + 1
        end,
        on_state = function(state, err)
            if state == "disconnected" then
                self.log("warning", ("lost the etcd settings watch (%s); keeping the current settings, reconnecting")
                    :format(tostring(err)))
            elseif self.was_disconnected then
                self.log("info", "etcd settings watch resumed")
            end
            self.was_disconnected = state == "disconnected"
        end,
    })
    return true
end

function Source:close()
    if self.watcher then
        self.watcher:close()
        self.watcher = nil
    end
end

---------------------------------------------------------------------------
-- start-up (tamarco-host run)
---------------------------------------------------------------------------

local function truthy(v)
    if v == nil then return false end
    if type(v) == "string" then
        v = v:lower()
        return v == "1" or v == "true" or v == "yes" or v == "on"
    end
    return v == true or v == 1
end

local run_in_task = etcd.run_sync

local UNREACHABLE = { connect = true, resolve = true, timeout = true, error = true, unavailable = true }

local function path_prefix(dotted)
    return "/" .. tostring(dotted):gsub("^/+", ""):gsub("/+$", ""):gsub("%.", "/") .. "/"
end

--- settings_etcd.attach(store[, opts]) -> source | nil, err (a settings error:
-- exit code 2). Reads etcd (after the ETCD_CHECK_KEY wait) and adds it to the
-- store just below the environment. opts: host, port, user, password (else
-- the environment), retry (else TAMARCO_ETCD_RETRY / system.etcd.retry),
-- check_key (else ETCD_CHECK_KEY), log = fn(level, message).
-- Works inside a task or outside the loop (it turns the loop then).
function settings_etcd.attach(store, opts)
    opts = opts or {}
    local client, where_err = opts.client, nil
    if not client then
        local located = { store = store }
        for k, v in pairs(opts) do located[k] = v end
        client, where_err = etcd.from_env(located)
    end
    if not client then
        return nil, errors.new("settings", "etcd settings: " .. (where_err
            or "no etcd address (TAMARCO_ETCD_ENDPOINTS, system.etcd.endpoints or TAMARCO_ETCD_HOST)"))
    end
    local log = opts.log or store.log
    local retry = opts.retry
    if retry == nil then
        retry = truthy(os.getenv("TAMARCO_ETCD_RETRY")) or truthy(store:get("system.etcd.retry", false))
    end
    local check_key = opts.check_key
    if check_key == nil then check_key = os.getenv("ETCD_CHECK_KEY") end
    if check_key == "" then check_key = nil end
    local registry_path = store:get("system.resources.registry.path", "system.discovery")
    local source = settings_etcd.source {
        client = client,
        exclude = { path_prefix(registry_path) },
        log = log,
    }

    local function unreachable(err)
        return errors.new("settings", ("etcd at %s is unreachable (%s). Check TAMARCO_ETCD_ENDPOINTS or TAMARCO_ETCD_HOST/TAMARCO_ETCD_PORT, "
            .. "or set TAMARCO_ETCD_RETRY=1 to wait for it"):format(client:address(), tostring(err)))
    end

    return run_in_task(function()
        local delays, attempts = backoff.new { min_ms = 500, max_ms = 5000, factor = 2 }, 0
        local function wait_or_fail(err, kind)
            if not (retry and UNREACHABLE[kind]) then
                if UNREACHABLE[kind] then return nil, unreachable(err) end
                return nil, errors.new("settings", "etcd settings: " .. tostring(err))
            end
            attempts = attempts + 1
            local delay = delays:next()
            log("warning", ("etcd at %s is unreachable (%s); retrying in %d ms (attempt %d)")
                :format(client:address(), tostring(err), delay, attempts))
            tasks.sleep(delay)
            return true
        end
        if check_key then
            local waited = false
            while true do
                local value, err, kind = client:get(check_key)
                tasks.checkpoint()
                if value ~= nil then break end
                if err then
                    local ok, failure = wait_or_fail(err, kind)
                    if not ok then return nil, failure end
                else
                    if not waited then
                        log("info", ("waiting for etcd key %s (ETCD_CHECK_KEY)"):format(check_key))
                        waited = true
                    end
                    tasks.sleep(500)
                end
            end
        end
        while true do
            local tree, err = source:load()
            tasks.checkpoint()
            if tree then break end
            local ok, failure = wait_or_fail(err, source.last_error_kind)
            if not ok then return nil, failure end
        end
        local position
        for _, name in ipairs(store:sources()) do
            if name == "environ" then position = "environ" end
        end
        local ok, err = store:add_source(source, position)
        if not ok then return nil, err end
        return source
    end)
end

return settings_etcd
