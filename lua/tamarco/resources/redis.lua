--- tamarco.resources.redis: a Redis client resource (hiredis async on the
-- host's loop, see bindings/redis.c).
--
--   local redis = require "tamarco.resources.redis"
--   local svc = tamarco.service { name = "cache", resources = { cache = redis.client() } }
--   svc.cache:set("k", "v")                  -- "OK"
--   local v = svc.cache:get("k")             -- "v" (nil when missing)
--   svc.cache:call("HSET", "h", "f", "1")    -- any command by name
--   svc.cache:hgetall("h")                   -- any command as a lowercase method
--   svc.cache:subscribe("news", function(message, channel) ... end)
--   svc.cache:psubscribe("news.*", function(message, channel, pattern) ... end)
--
-- Every call yields the running task until the reply and returns it, or
-- `nil, err`. Reply mapping: status -> string ("OK"), integer -> number,
-- bulk -> string (binary safe), nil -> nil (one value; an error is always
-- two: nil, "ERR ..."), array -> table whose nil elements are `redis.null`
-- (a NULL lightuserdata, equal to cjson.null) and whose error elements are
-- {err = "..."}. Arguments are strings or numbers (pass integers beyond
-- 1e14 as strings). Server errors come back as Redis wrote them
-- ("WRONGTYPE ...", "ERR ..."); connection errors are prefixed with the
-- resource: "redis cache: not connected (connection refused)",
-- "redis cache: connection lost (...)".
--
-- All tasks share one connection: commands issued in the same loop turn are
-- written together (automatic pipelining) and replies come back in order.
-- For the same reason MULTI/EXEC issued as separate calls would interleave
-- with other tasks: use EVAL, or `:transaction{{"SET","a","1"}, {"INCR","n"}}`
-- which sends MULTI, the commands and EXEC back to back and returns EXEC's
-- reply. SELECT at run time would change the database for every task: use
-- the `db` setting. Pub/sub runs on a second connection, opened by the first
-- subscribe.
--
-- Settings under `system.resources.<name>` (later wins: built-in default,
-- the options given to `redis.client`, the settings):
--   host             default 127.0.0.1 (a name is resolved off the loop)
--   port             default 6379
--   password         AUTH on every (re)connect; never shown by status()
--   username         AUTH username (Redis 6 ACL), optional
--   db               SELECT on every (re)connect when not 0 (default 0)
--   connect_timeout_ms  default 5000 (also bounds AUTH/SELECT and the wait
--                    for a subscription's confirmation)
--   reconnect_min_ms    first reconnect delay (default 100); doubled after
--   reconnect_max_ms    each failed attempt up to this (default 5000)
--   (the names without _ms still work, deprecated)
--   sentinels        Redis behind Sentinel: a list of "host:port" (or one
--   master_name      comma-separated string) and the master's name; host
--                    and port are then ignored and the master is found and
--                    followed through failovers (see redis_sentinel.lua).
--                    Redis Cluster is not supported.
--   fail_on_start    default false: when Redis is unreachable at start the
--                    service starts anyway with the resource CONNECTING and
--                    a background reconnect (what production frameworks do:
--                    a cache that comes up later must not keep a service
--                    down). true: start-up fails (exit 1) instead.
--
-- Status: CONNECTING while connecting (and while reconnecting, between
-- attempts too), STARTED when up, FAILED right after the connection is lost
-- (before the reconnect task takes over). While not connected every call
-- fails at once with `nil, "redis <name>: not connected (<last error>)"`;
-- once Redis is back calls succeed again, no restart needed. Subscriptions
-- are made again on the new connection. Pending calls when the connection
-- drops return `nil, "redis <name>: connection lost (...)"`.
--
-- Without a service (tools, tests), inside a task:
--   local cache = assert(redis.client():connect_to { host = "127.0.0.1", port = 6379 })
--   cache:set("k", "v") ... cache:close()
-- connect_to(options) takes the settings above as a table, connects once
-- (returning nil, err when that fails, whatever fail_on_start says) and then
-- reconnects in the background like the resource does.
local backoff = require "tamarco.c.backoff"
local base = require "tamarco.core.resource"
local c = require "tamarco.c.redis"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local tasks = require "tamarco.core.tasks"
local sentinel = require "tamarco.resources.redis_sentinel"

local STATUS = base.STATUS

local redis = {}

--- The nil element of array replies (a NULL lightuserdata, == cjson.null).
redis.null = c.null

local Redis = base.class("redis")
redis.Redis = Redis

local DEFAULTS = {
    host = "127.0.0.1",
    port = 6379,
    db = 0,
    connect_timeout_ms = 5000,
    reconnect_min_ms = 100,
    reconnect_max_ms = 5000,
    fail_on_start = false,
}
Redis.defaults = DEFAULTS
Redis.renamed_settings = { connect_timeout = "connect_timeout_ms", reconnect_min = "reconnect_min_ms",
    reconnect_max = "reconnect_max_ms" }

local SETTING_KEYS = { "host", "port", "username", "password", "db", "connect_timeout_ms",
    "reconnect_min_ms", "reconnect_max_ms", "fail_on_start", "sentinels", "master_name" }

local null_logger = setmetatable({}, { __index = function() return function() end end })

--- redis.client([options]) -> a resource. options: any setting above, and
-- depends_on.
function redis.client(options)
    return Redis.new(options)
end

function Redis:init(options)
    base.Resource.init(self, options)
    self.manages_status = true
    self.channels = {}        -- channel -> handler
    self.patterns = {}        -- pattern -> handler
    self.confirm_waiters = {} -- "subscribe:<name>" -> {co, ...}
    self.counters = { reconnects = 0, lost = 0 }
    -- Fields read before they are set are false, not nil: a nil field
    -- would be looked up in __index and turn into a command method.
    self.link, self.pubsub, self.stopping = false, false, false
    self.sentinel_watch = false
    self.logger, self.settings, self.name, self.service = false, false, false, false
end

function Redis:log()
    return self.logger or null_logger
end

function Redis:label()
    return "redis " .. (self.name or "redis")
end

-- Lowercases the first letter of hiredis' messages ("Connection refused").
local function lower_first(message)
    return (tostring(message):gsub("^%u%l", string.lower))
end

---------------------------------------------------------------------------
-- links: one connection each (commands, pub/sub) with its own reconnect
---------------------------------------------------------------------------

local Link = {}
Link.__index = Link

local function new_link(owner, kind)
    return setmetatable({ owner = owner, kind = kind, state = "down", conn = nil,
        last_error = "not connected yet" }, Link)
end

-- Opens a connection, authenticates and selects the database. For the
-- pub/sub link also installs the message handler and subscribes again.
function Link:open()
    local owner = self.owner
    local timeout = tonumber(owner:setting("connect_timeout_ms"))
    local conn_ref = {}
    local host, port = owner:setting("host"), tonumber(owner:setting("port"))
    if owner.sentinel_watch then
        host, port = sentinel.master_address(owner)
        if not host then return nil, port end
    end
    self.next_address = host .. ":" .. tostring(port)
    local conn, err = c.connect(host, port, {
        connect_timeout_ms = timeout,
        on_disconnect = function(message) self:lost(conn_ref.conn, message) end,
    })
    tasks.checkpoint()
    if not conn then
        -- behind sentinels, say which master the sentinels named
        if owner.sentinel_watch then return nil, "master at " .. self.next_address .. ": " .. lower_first(err) end
        return nil, lower_first(err)
    end
    conn_ref.conn = conn
    local password = owner:setting("password")
    if password ~= nil and password ~= "" then
        local username = owner:setting("username")
        local ok, auth_err
        if username ~= nil and username ~= "" then
            ok, auth_err = conn:command("AUTH", username, tostring(password))
        else
            ok, auth_err = conn:command("AUTH", tostring(password))
        end
        tasks.checkpoint()
        if not ok then
            conn:close()
            return nil, "authentication failed: " .. tostring(auth_err)
        end
    end
    local db = tonumber(owner:setting("db")) or 0
    if db ~= 0 then
        local ok, select_err = conn:command("SELECT", db)
        tasks.checkpoint()
        if not ok then
            conn:close()
            return nil, "SELECT " .. db .. " failed: " .. tostring(select_err)
        end
    end
    if owner.sentinel_watch then
        local ok, role_err = sentinel.check_master(conn)
        if not ok then
            conn:close()
            return nil, self.next_address .. ": " .. role_err
        end
    end
    if self.kind == "pubsub" then
        conn:on_message(function(kind, a, b, d) owner:dispatch(kind, a, b, d) end)
        local channels, patterns = {}, {}
        for name in pairs(owner.channels) do channels[#channels + 1] = name end
        for name in pairs(owner.patterns) do patterns[#patterns + 1] = name end
        table.sort(channels)
        table.sort(patterns)
        if #channels > 0 then conn:send_pubsub("SUBSCRIBE", unpack(channels)) end
        if #patterns > 0 then conn:send_pubsub("PSUBSCRIBE", unpack(patterns)) end
    end
    return conn
end

function Link:up(conn)
    self.conn = conn
    self.address = self.next_address
    self.state = "up"
    self.last_error = nil
    self.delays = nil   -- the next outage starts from reconnect_min_ms again
    self.owner:update_status()
end

-- The connection went away (called in its own task by the binding).
function Link:lost(conn, message)
    if self.closed or conn == nil or conn ~= self.conn then return end
    self.conn = nil
    self.state = "failed"
    self.last_error = lower_first(message)
    local owner = self.owner
    owner.counters.lost = owner.counters.lost + 1
    owner:log():warning(owner:label() .. ": " .. self.last_error .. "; reconnecting",
        { resource = owner.name, link = self.kind })
    owner:update_status()
    if self.kind == "pubsub" then owner:fail_confirm_waiters(self.last_error) end
    self:start_reconnect()
end

function Link:start_reconnect()
    if self.closed or self.reconnecting then return end
    self.reconnecting = scheduler.spawn(function() self:reconnect_loop() end)
    scheduler.on_exit(self.reconnecting, function() self.reconnecting = nil end)
end

function Link:reconnect_loop()
    local owner = self.owner
    if not self.delays then
        self.delays = backoff.new {
            min_ms = tonumber(owner:setting("reconnect_min_ms")) or DEFAULTS.reconnect_min_ms,
            max_ms = tonumber(owner:setting("reconnect_max_ms")) or DEFAULTS.reconnect_max_ms,
            factor = 2,
        }
    end
    local attempts = 0
    while not self.closed do
        self.state = "connecting"
        owner:update_status()
        -- jitter spreads the reconnects of many instances: ±20 % around
        -- the delay (the shared policy's jitter only shortens it)
        timer.sleep(self.delays:next() * (0.8 + 0.4 * math.random()))
        if self.closed then return end
        attempts = attempts + 1
        local conn, err = self:open()
        if self.closed then
            if conn then conn:close() end
            return
        end
        if conn then
            owner.counters.reconnects = owner.counters.reconnects + 1
            owner:log():info(owner:label() .. ": reconnected after " .. attempts .. " attempt(s)",
                { resource = owner.name, link = self.kind })
            self:up(conn)
            return
        end
        self.last_error = err
        owner:log():debug(owner:label() .. ": reconnect failed: " .. err, { resource = owner.name, link = self.kind })
    end
end

function Link:close()
    self.closed = true
    -- the loop checks `closed` after each wait: interrupting it ends it
    -- without raising tasks.CANCELLED (which would be logged standalone)
    if self.reconnecting then scheduler.interrupt(self.reconnecting) end
    self.reconnecting = nil
    if self.conn then self.conn:close() end
    self.conn = nil
    self.state = "down"
end

---------------------------------------------------------------------------
-- phases
---------------------------------------------------------------------------

function Redis:update_status()
    if self.stopping then return end
    local worst = "up"
    for _, link in ipairs({ self.link, self.pubsub }) do
        if link then
            if link.state == "failed" then
                worst = "failed"
            elseif link.state ~= "up" and worst == "up" then
                worst = "connecting"
            end
        end
    end
    local code = worst == "up" and STATUS.STARTED or worst == "failed" and STATUS.FAILED or STATUS.CONNECTING
    self:set_status(code)
end

--- Connects the command link. Returns true, or nil, err after having
-- started a background reconnect (unless fail_on_start).
function Redis:open_links(fail_on_start)
    self.stopping = false
    self.link = new_link(self, "commands")
    self.link.state = "connecting"
    self:set_status(STATUS.CONNECTING)
    local conn, err = self.link:open()
    if conn then
        self.link:up(conn)
        self:log():info(self:label() .. ": connected to " .. self:address(), { resource = self.name })
        return true
    end
    self.link.last_error = err
    local message = self:label() .. ": cannot connect to " .. self:address() .. ": " .. err
    if fail_on_start then
        self.link.closed = true
        self:set_status(STATUS.FAILED)
        return nil, message
    end
    self:log():warning(message .. "; retrying in the background", { resource = self.name })
    self.link:start_reconnect()
    return nil, message
end

function Redis:address()
    if self.sentinel_watch then
        return ("master '%s' (via sentinels %s)"):format(tostring(self:setting("master_name")),
            table.concat(type(self:setting("sentinels")) == "table" and self:setting("sentinels")
                or { tostring(self:setting("sentinels")) }, ","))
    end
    return tostring(self:setting("host")) .. ":" .. tostring(self:setting("port"))
end

-- With sentinels: check the settings and follow +switch-master.
function Redis:start_sentinel_watch()
    if not sentinel.enabled(self) then return end
    local _, err = sentinel.parse(self:setting("sentinels"))
    if err then self:settings_error("sentinels", err) end
    local name = self:setting("master_name")
    if type(name) ~= "string" or name == "" then
        self:settings_error("master_name", "is required with sentinels (the name the sentinels monitor)")
    end
    self.sentinel_watch = sentinel.watch(self)
end

function Redis:start()
    self:check_settings { port = base.PORT, db = base.COUNT, connect_timeout_ms = base.DURATION,
        reconnect_min_ms = base.DURATION, reconnect_max_ms = base.DURATION }
    self:start_sentinel_watch()
    local ok, err = self:open_links(self:setting("fail_on_start"))
    if not ok and self:setting("fail_on_start") then error(err, 0) end
end

function Redis:stop()
    self:close()
end

--- Standalone use inside a task: connect_to{host=, port=, password=, db=, ...}
-- -> self | nil, err.
function Redis:connect_to(options)
    for k, v in pairs(options or {}) do self.options[k] = v end
    self:start_sentinel_watch()
    local ok, err = self:open_links(false)
    if not ok then
        self:close()
        return nil, err
    end
    return self
end

--- Closes the connections and cancels the reconnect tasks.
function Redis:close()
    self.stopping = true
    if self.sentinel_watch then
        self.sentinel_watch.close()
        self.sentinel_watch = false
    end
    if self.link then self.link:close() end
    if self.pubsub then self.pubsub:close() end
    self:fail_confirm_waiters("closed")
end

--- Tamarco's status dict (never the password).
function Redis:status()
    local link = self.link
    local out = {
        status = self.status_code,
        host = self:setting("host"),
        port = self:setting("port"),
        db = self:setting("db"),
        connected = (link and link.conn) and true or false,
        reconnects = self.counters.reconnects,
        connections_lost = self.counters.lost,
    }
    if self.sentinel_watch then
        out.host, out.port = nil, nil   -- not used: the sentinels name the master
        out.master_name = self:setting("master_name")
        out.master = link and link.conn and link.address or nil
        out.master_switches = self.counters.switches or 0
    end
    if link and link.last_error then out.last_error = link.last_error end
    if self.pubsub then
        local n = 0
        for _ in pairs(self.channels) do n = n + 1 end
        for _ in pairs(self.patterns) do n = n + 1 end
        out.subscriptions = n
        out.pubsub_connected = self.pubsub.conn and true or false
    end
    return out
end

--- The settings in use (for debugging), without the password.
function Redis:effective_settings()
    local out = {}
    for _, key in ipairs(SETTING_KEYS) do
        if key ~= "password" then out[key] = self:setting(key) end
    end
    out.password = self:setting("password") and "***" or nil
    return out
end

---------------------------------------------------------------------------
-- commands
---------------------------------------------------------------------------

function Redis:not_connected(link)
    local why = link and link.last_error or "not started"
    return nil, self:label() .. ": not connected (" .. why .. ")"
end

--- cache:call(name, ...) -> reply | nil, err
function Redis:call(...)
    local link = self.link
    local conn = link and link.conn
    if not conn then return self:not_connected(link) end
    local reply, err, kind = conn:command(...)
    tasks.checkpoint()
    if err and kind == "connection" then
        return nil, self:label() .. ": " .. err
    end
    if err and self.sentinel_watch and err:find("^READONLY") then sentinel.on_readonly(self, conn) end
    return reply, err
end

--- cache:transaction{{name, ...}, ...} -> EXEC's reply (a table of replies)
-- | nil, err. MULTI, the commands and EXEC are sent in one go, so no other
-- task's command gets in between.
function Redis:transaction(commands)
    assert(type(commands) == "table", "transaction: a list of commands expected")
    local link = self.link
    local conn = link and link.conn
    if not conn then return self:not_connected(link) end
    local results, n = {}, #commands + 2
    local left, me = n, scheduler.current()
    assert(me, "redis transaction must run inside a task")
    local function send(i, cmd)
        scheduler.spawn(function()
            local reply, err, kind = conn:command(cmd)
            results[i] = { reply, err, kind }
            left = left - 1
            if left == 0 then scheduler.wake(me) end
        end)
    end
    -- spawned tasks start in order on the next turn, so the commands are
    -- queued back to back, before any other task runs
    send(1, { "MULTI" })
    for i, cmd in ipairs(commands) do send(i + 1, cmd) end
    send(n, { "EXEC" })
    scheduler.suspend("redis transaction")
    tasks.checkpoint()
    for i = 1, n - 1 do
        local r = results[i]
        if r[3] == "connection" then return nil, self:label() .. ": " .. r[2] end
    end
    local exec = results[n]
    if exec[2] then
        if exec[3] == "connection" then return nil, self:label() .. ": " .. exec[2] end
        -- EXECABORT: report the first queued command's error
        for i = 2, n - 1 do
            if results[i][2] then return nil, exec[2] .. " (" .. results[i][2] .. ")" end
        end
        return nil, exec[2]
    end
    return exec[1]
end

-- Commands by method name: cache:hset("h", "f", "1") == cache:call("HSET", ...).
local command_methods = {}

local function new_command_method(key)
    -- only plain lowercase words: probes for optional hooks such as
    -- `on_settings_change` or `__close` stay nil
    if type(key) ~= "string" or not key:find("^%l+$") then return nil end
    local name = key:upper()
    local method = function(self, ...) return self:call(name, ...) end
    command_methods[key] = method
    return method
end

-- Makes no closure itself: a function that does cannot be JIT-compiled
-- (closing its upvalues is not), and every `cache:get(...)` passes here.
Redis.__index = function(_, key)
    local value = Redis[key]
    if value ~= nil then return value end
    return command_methods[key] or new_command_method(key)   -- a command seen before: the hot path
end

---------------------------------------------------------------------------
-- pub/sub
---------------------------------------------------------------------------

function Redis:dispatch(kind, a, b, d)
    if kind == "message" then
        local handler = self.channels[a]
        if handler then handler(b, a) end
    elseif kind == "pmessage" then
        local handler = self.patterns[a]
        if handler then handler(d, b, a) end
    elseif kind == "subscribe" or kind == "psubscribe" then
        local key = kind .. ":" .. tostring(a)
        local waiters = self.confirm_waiters[key]
        self.confirm_waiters[key] = nil
        for _, co in ipairs(waiters or {}) do scheduler.wake(co, true) end
    end
end

function Redis:fail_confirm_waiters(err)
    local all = self.confirm_waiters
    self.confirm_waiters = {}
    for _, waiters in pairs(all) do
        for _, co in ipairs(waiters) do scheduler.wake(co, nil, err) end
    end
end

function Redis:ensure_pubsub()
    local link = self.pubsub
    if link then
        if link.opening then   -- another task is opening it: wait for it
            link.opening[#link.opening + 1] = scheduler.current()
            scheduler.suspend("redis pubsub connection")
            tasks.checkpoint()
        end
        return true
    end
    link = new_link(self, "pubsub")
    self.pubsub = link
    link.state = "connecting"
    link.opening = {}
    self:update_status()
    local conn, err = link:open()
    local waiters = link.opening
    link.opening = nil
    for _, co in ipairs(waiters) do scheduler.wake(co) end
    if self.stopping then
        if conn then conn:close() end
        return nil, self:label() .. ": closed"
    end
    if not conn then
        link.last_error = err
        link.state = "failed"
        self:update_status()
        link:start_reconnect()
        return nil, self:label() .. ": pub/sub not connected (" .. err .. ")"
    end
    link:up(conn)
    return true
end

local function add_subscription(self, command, registry, name, handler)
    assert(type(name) == "string", command:lower() .. ": channel name (string) expected")
    assert(type(handler) == "function", command:lower() .. ": handler function expected")
    registry[name] = handler
    local ok, err = self:ensure_pubsub()
    if not ok then return nil, err end
    local conn = self.pubsub.conn
    if not conn then return self:not_connected(self.pubsub) end
    local me = assert(scheduler.current(), command:lower() .. " must run inside a task")
    local key = command:lower() .. ":" .. name
    local waiters = self.confirm_waiters[key] or {}
    self.confirm_waiters[key] = waiters
    waiters[#waiters + 1] = me
    local sent, send_err = conn:send_pubsub(command, name)
    if not sent then
        for i, co in ipairs(waiters) do if co == me then table.remove(waiters, i) break end end
        return nil, self:label() .. ": " .. tostring(send_err)
    end
    local timeout = tonumber(self:setting("connect_timeout_ms")) or DEFAULTS.connect_timeout_ms
    local done = false
    local guard = scheduler.spawn(function()
        timer.sleep(timeout)
        if not done then scheduler.wake(me, nil, "no confirmation within " .. timeout .. " ms") end
    end)
    local confirmed, wait_err = scheduler.suspend("redis subscription confirmation")
    done = true
    scheduler.interrupt(guard)
    tasks.checkpoint()
    if not confirmed then
        local list = self.confirm_waiters[key]
        if list then
            for i, co in ipairs(list) do if co == me then table.remove(list, i) break end end
        end
        return nil, self:label() .. ": " .. command:lower() .. " " .. name .. ": " .. tostring(wait_err)
    end
    return true
end

--- cache:subscribe(channel, handler) -> true | nil, err. handler(message,
-- channel) runs in its own task for every message. Returns once Redis has
-- confirmed the subscription. The subscription is kept (and made again
-- after a reconnect) even when this call fails because Redis is down.
function Redis:subscribe(channel, handler)
    return add_subscription(self, "SUBSCRIBE", self.channels, channel, handler)
end

--- cache:psubscribe(pattern, handler) -> true | nil, err; handler(message,
-- channel, pattern).
function Redis:psubscribe(pattern, handler)
    return add_subscription(self, "PSUBSCRIBE", self.patterns, pattern, handler)
end

local function same_keys(a, b)
    for k in pairs(a) do if b[k] == nil then return false end end
    for k in pairs(b) do if a[k] == nil then return false end end
    return true
end

--- Hot reload: keeps the connections; takes the new code's subscription
-- handlers when it subscribes to the same channels and patterns (otherwise
-- the resource is replaced: new connections, new subscriptions).
function Redis:adopt(new)
    if not (same_keys(self.channels, new.channels) and same_keys(self.patterns, new.patterns)) then
        return nil
    end
    local channels, patterns = self.channels, self.patterns
    self.channels, self.patterns = new.channels, new.patterns
    return function() self.channels, self.patterns = channels, patterns end
end

--- cache:unsubscribe(channel) / cache:punsubscribe(pattern): stops delivering.
function Redis:unsubscribe(channel)
    self.channels[channel] = nil
    local conn = self.pubsub and self.pubsub.conn
    if conn then conn:send_pubsub("UNSUBSCRIBE", channel) end
    return true
end

function Redis:punsubscribe(pattern)
    self.patterns[pattern] = nil
    local conn = self.pubsub and self.pubsub.conn
    if conn then conn:send_pubsub("PUNSUBSCRIBE", pattern) end
    return true
end

return redis
