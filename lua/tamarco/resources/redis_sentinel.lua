--- tamarco.resources.redis_sentinel: finding (and following) the master of
-- a Redis behind Sentinel, for the redis resource's connections.
--
-- With the settings `sentinels` (a list of "host:port", or one
-- comma-separated string) and `master_name`, the redis resource does not
-- connect to `host`/`port`: every (re)connect asks the sentinels, in turn,
-- `SENTINEL get-master-addr-by-name <master_name>`, connects there and
-- checks with ROLE that the server is a master. A task stays subscribed to
-- `+switch-master` on one sentinel (the next one when it goes away); when
-- the master of `master_name` changes, the connections to the old one are
-- dropped and made again to the new one at once. A READONLY reply (the old
-- master turned replica) does the same. While no master is known, calls
-- fail at once with "redis <name>: not connected (<why>)", and work again
-- as soon as the new master is connected: no restart needed.
local backoff = require "tamarco.c.backoff"
local c = require "tamarco.c.redis"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local tasks = require "tamarco.core.tasks"

local sentinel = {}

--- sentinel.parse(list) -> { {host =, port =}, ... } | nil, err
function sentinel.parse(list)
    local items = {}
    if type(list) == "string" then
        for item in list:gmatch("[^,%s]+") do items[#items + 1] = item end
    elseif type(list) == "table" then
        for i, item in ipairs(list) do items[i] = tostring(item) end
    else
        return nil, "must be a list of host:port"
    end
    if #items == 0 then return nil, "must list at least one sentinel" end
    local out = {}
    for i, item in ipairs(items) do
        local host, port = item:match("^%[([^%]]+)%]:(%d+)$")
        if not host then host, port = item:match("^([^:]+):(%d+)$") end
        port = tonumber(port)
        if not host or not port or port < 1 or port > 65535 then
            return nil, ("'%s' is not host:port"):format(item)
        end
        out[i] = { host = host, port = port }
    end
    return out
end

--- sentinel.enabled(owner) -> true when the resource has sentinels set.
function sentinel.enabled(owner)
    local list = owner:setting("sentinels")
    return list ~= nil and list ~= false and list ~= ""
end

local function timeout_of(owner)
    return tonumber(owner:setting("connect_timeout_ms")) or 5000
end

-- Sentinels in the order to try: starting with the last one that answered.
local function ordered(owner)
    local list = assert(sentinel.parse(owner:setting("sentinels")))
    local first = owner.sentinel_index or 1
    local out = {}
    for i = 0, #list - 1 do
        local index = (first - 1 + i) % #list + 1
        out[#out + 1] = { index = index, host = list[index].host, port = list[index].port }
    end
    return out
end

--- sentinel.master_address(owner) -> host, port | nil, err: asks the
-- sentinels in turn where the master of `master_name` is.
function sentinel.master_address(owner)
    local name = tostring(owner:setting("master_name"))
    local errors = {}
    for _, s in ipairs(ordered(owner)) do
        local conn, err = c.connect(s.host, s.port, { connect_timeout_ms = timeout_of(owner) })
        tasks.checkpoint()
        if conn then
            local reply, command_err = conn:command("SENTINEL", "get-master-addr-by-name", name)
            conn:close()
            tasks.checkpoint()
            if type(reply) == "table" and reply[1] and tonumber(reply[2]) then
                owner.sentinel_index = s.index
                return reply[1], tonumber(reply[2])
            end
            err = command_err or ("knows no master named '" .. name .. "'")
        end
        errors[#errors + 1] = ("sentinel %s:%d: %s"):format(s.host, s.port, tostring(err))
    end
    return nil, "no sentinel gave the master of '" .. name .. "' (" .. table.concat(errors, "; ") .. ")"
end

--- sentinel.check_master(conn) -> true | nil, err: the server we reached is
-- a master (a failover may have demoted it since the sentinel answered).
function sentinel.check_master(conn)
    local role, err = conn:command("ROLE")
    tasks.checkpoint()
    if type(role) ~= "table" then return nil, "ROLE failed: " .. tostring(err) end
    if role[1] ~= "master" then return nil, "the server is a " .. tostring(role[1]) .. ", not the master yet" end
    return true
end

-- The master changed (or the one we talk to refused a write): drop the
-- connections to the old one and reconnect now.
local function follow(owner, why)
    for _, link in ipairs({ owner.link, owner.pubsub }) do
        if link and not link.closed then
            local conn = link.conn
            if conn then
                link:lost(conn, why)
                conn:close()
            end
            -- a reconnect waiting out its back-off tries at once
            link.delay = nil
            if link.reconnecting and link.state == "connecting" then scheduler.interrupt(link.reconnecting) end
        end
    end
end

--- sentinel.on_switch(owner, host, port): +switch-master for our master.
function sentinel.on_switch(owner, host, port)
    local address = host .. ":" .. port
    owner.counters.switches = (owner.counters.switches or 0) + 1
    owner:log():warning(owner:label() .. ": sentinels switched the master to " .. address,
        { resource = owner.name })
    if owner.link and owner.link.address ~= address then
        follow(owner, "the master moved to " .. address)
    end
end

--- sentinel.on_readonly(owner): a READONLY reply (we still talk to a master
-- that was demoted): find the master again, once per connection.
function sentinel.on_readonly(owner, conn)
    if owner.link and owner.link.conn == conn then
        follow(owner, "the server turned read-only (a replica now)")
    end
end

--- sentinel.watch(owner) -> handle with :close(): a task subscribed to
-- +switch-master on one sentinel at a time.
function sentinel.watch(owner)
    local handle = { closed = false }
    local name = tostring(owner:setting("master_name"))
    local function run()
        local delays = backoff.new { min_ms = 100, max_ms = 2000 }
        while not handle.closed do
            local lost = false
            for _, s in ipairs(ordered(owner)) do
                if handle.closed then return end
                local conn = c.connect(s.host, s.port, {
                    connect_timeout_ms = timeout_of(owner),
                    on_disconnect = function()
                        lost = true
                        if handle.sleeping then scheduler.interrupt(handle.task) end
                    end,
                })
                if conn then
                    if handle.closed then conn:close() return end
                    handle.conn = conn
                    lost = false
                    conn:on_message(function(kind, channel, payload)
                        if kind ~= "message" or channel ~= "+switch-master" then return end
                        -- "<name> <old-ip> <old-port> <new-ip> <new-port>"
                        local master, host, port = payload:match("^(%S+) %S+ %d+ (%S+) (%d+)$")
                        if master == name then sentinel.on_switch(owner, host, tonumber(port)) end
                    end)
                    conn:send_pubsub("SUBSCRIBE", "+switch-master")
                    delays:reset()
                    while not handle.closed and not lost do
                        handle.sleeping = true
                        timer.sleep(60000)
                        handle.sleeping = false
                    end
                    handle.conn = nil
                    conn:close()
                end
            end
            if handle.closed then return end
            handle.sleeping = true
            timer.sleep(delays:next())
            handle.sleeping = false
        end
    end
    handle.task = scheduler.spawn(run)
    function handle.close()
        if handle.closed then return end
        handle.closed = true
        if handle.conn then handle.conn:close() end
        if handle.sleeping and handle.task then scheduler.interrupt(handle.task) end
    end
    return handle
end

return sentinel
