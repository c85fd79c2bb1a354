-- The redis resource behind Sentinel (scripts/test-services.sh
-- start-cluster redis-sentinel: master, replica, three sentinels): finds the
-- master, follows SENTINEL FAILOVER and the death of the master. Prints
-- its figures.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local redis = require "tamarco.resources.redis"
local sentinel = require "tamarco.resources.redis_sentinel"
local c = require "tamarco.c.redis"
local cluster = require "spec.support.cluster"

local SERVERS = { "master", "replica" }

local wait_until = testing.wait_until

-- Sends one command to the first sentinel that answers.
local function ask_sentinels(list, ...)
    local reply, err
    for _, s in ipairs(assert(sentinel.parse(list))) do
        local conn = c.connect(s.host, s.port, { connect_timeout_ms = 2000 })
        if conn then
            reply, err = conn:command(...)
            conn:close()
            if reply ~= nil or err then return reply, err end
        end
    end
    return reply, err
end

describe("redis sentinels", function()
    it("parses the sentinels list and refuses a bad one", function()
        assert.same({ { host = "a", port = 1 }, { host = "b", port = 2 } }, sentinel.parse("a:1, b:2"))
        assert.same({ { host = "::1", port = 3 } }, sentinel.parse({ "[::1]:3" }))
        assert.is_nil((sentinel.parse("a")))
        assert.is_nil((sentinel.parse({})))
    end)

    it("connects to the master the sentinels name, wherever host/port point", function()
        local list, name = cluster.sentinels()
        testing.run(function()
            local cache = assert(redis.client():connect_to { sentinels = list, master_name = name,
                host = "127.0.0.1", port = 1 })
            assert.equal("OK", cache:set("sentinel-spec", "v"))
            assert.equal("v", cache:get("sentinel-spec"))
            local where = assert(ask_sentinels(list, "SENTINEL", "get-master-addr-by-name", name))
            assert.equal(where[1] .. ":" .. where[2], cache:status().master)
            assert.equal(name, cache:status().master_name)
            assert.is_nil(cache:status().port)   -- the ignored host/port are not shown
            cache:del("sentinel-spec")
            cache:close()
        end)
    end)

    it("refuses sentinels without master_name, or a bad sentinels list, as a settings error", function()
        testing.run(function()
            local ok, err = pcall(function() return redis.client():connect_to { sentinels = "127.0.0.1:1" } end)
            assert.is_false(ok)
            assert.matches("master_name: is required with sentinels", tostring(err.message or err), 1, true)
            ok, err = pcall(function()
                return redis.client():connect_to { sentinels = "nohost", master_name = "m" }
            end)
            assert.is_false(ok)
            assert.matches("sentinels: 'nohost' is not host:port", tostring(err.message or err), 1, true)
        end)
    end)

    it("names the master when no sentinel knows it", function()
        local list = cluster.sentinels()
        testing.run(function()
            local cache, err = redis.client():connect_to { sentinels = list, master_name = "nobody",
                reconnect_min_ms = 50 }
            assert.is_nil(cache)
            assert.matches("no sentinel gave the master of 'nobody'", err, 1, true)
        end)
    end)
end)

describe("redis sentinel faults", function()
    it("recovers from SIGKILL of the master and from SENTINEL FAILOVER during a loop of writes", function()
        local list, name = cluster.sentinels()
        testing.timeout_ms = 120000
        local figures = {}
        local ok, err = pcall(testing.run, function()
            local cache = assert(redis.client():connect_to { sentinels = list, master_name = name,
                connect_timeout_ms = 1000 })
            local writes, failed, crashes, running = 0, 0, 0, true
            local last_ok_at, last_error = 0, nil
            local stopped = false
            tamarco.spawn(function()
                local n = 0
                while running do
                    n = n + 1
                    local t0 = tamarco.now()
                    local fine, reply, call_err = pcall(cache.set, cache, "sentinel-loop", tostring(n))
                    local took = tamarco.now() - t0
                    if not fine then
                        crashes = crashes + 1
                    elseif reply == "OK" then
                        writes = writes + 1
                        last_ok_at = tamarco.now()
                    else
                        failed = failed + 1
                        last_error = call_err
                        figures.slowest_failure = math.max(figures.slowest_failure or 0, took)
                        local kind = tostring(call_err):gsub("%d+%.%d+%.%d+%.%d+:%d+", "<addr>")
                        figures.errors = figures.errors or {}
                        figures.errors[kind] = (figures.errors[kind] or 0) + 1
                    end
                    tamarco.sleep(5)
                end
                stopped = true
            end)
            -- recovery: from the fault to the first write acknowledged by a
            -- master other than the old one
            local function measure(fault)
                local old = cache:status().master
                local failed_before = failed
                local t0 = tamarco.now()
                fault(old)
                assert(wait_until(function()
                    return cache:status().master ~= nil and cache:status().master ~= old and last_ok_at > t0
                end, 60000), "no write reached a new master (last error: " .. tostring(last_error) .. ")")
                return tamarco.now() - t0, failed - failed_before, old
            end
            assert(wait_until(function() return writes > 50 end, 10000))

            local kill_ms, kill_failed = measure(function(old)
                local member = cluster.member_of("redis-sentinel", SERVERS, old:match(":(%d+)$"))
                figures.killed = member
                cluster.member("kill", "redis-sentinel", member)
            end)
            figures.kill_ms, figures.kill_failed = kill_ms, kill_failed
            -- the old master comes back; the sentinels make it a replica
            cluster.member("start", "redis-sentinel", figures.killed)
            -- wait until a failover is possible again (a synced replica)
            local failover_ms, failover_failed = measure(function()
                assert(wait_until(function()
                    local reply = ask_sentinels(list, "SENTINEL", "FAILOVER", name)
                    return reply == "OK"
                end, 60000), "SENTINEL FAILOVER never accepted")
            end)
            figures.failover_ms, figures.failover_failed = failover_ms, failover_failed
            local before = writes
            assert(wait_until(function() return writes > before + 50 end, 10000))
            running = false
            assert(wait_until(function() return stopped end, 5000))
            figures.writes, figures.failed, figures.crashes = writes, failed, crashes
            figures.switches = cache:status().master_switches
            figures.value = cache:get("sentinel-loop")
            cache:del("sentinel-loop")
            cache:close()
        end)
        testing.timeout_ms = 20000
        print(("\nredis sentinel faults: SIGKILL of the master (%s): recovered in %s ms, %s calls failed; "
            .. "SENTINEL FAILOVER: recovered in %s ms, %s calls failed; %s writes acknowledged, %s crashes, "
            .. "%s +switch-master seen")
            :format(tostring(figures.killed), tostring(figures.kill_ms), tostring(figures.kill_failed),
                tostring(figures.failover_ms), tostring(figures.failover_failed), tostring(figures.writes),
                tostring(figures.crashes), tostring(figures.switches)))
        local kinds = {}
        for text, n in pairs(figures.errors or {}) do kinds[#kinds + 1] = ("  %5d x %s"):format(n, text) end
        table.sort(kinds)
        print(("slowest failed call: %s ms; errors the failed calls returned:\n%s")
            :format(tostring(figures.slowest_failure), table.concat(kinds, "\n")))
        assert(ok, err)
        assert.equal(0, figures.crashes)
        assert.is_true(figures.switches >= 2)
        assert.is_string(figures.value)
    end)
end)
