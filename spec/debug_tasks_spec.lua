-- The scheduler's wait book-keeping and tamarco.debug.tasks: what every live
-- task waits on, read without waking it. Needs a real redis-server
-- (TAMARCO_TEST_REDIS_HOST/PORT, see scripts/test-services.sh).
local testing = require "tamarco.testing"
local scheduler = require "tamarco.c.scheduler"
local tasks = require "tamarco.core.tasks"
local redis = require "tamarco.resources.redis"
local debug_tasks = require "tamarco.ops.debug.tasks"

local REDIS_HOST = os.getenv("TAMARCO_TEST_REDIS_HOST")
local REDIS_PORT = tonumber(os.getenv("TAMARCO_TEST_REDIS_PORT") or "")
if not REDIS_HOST or not REDIS_PORT then
    error("debug_tasks_spec needs a real redis-server: first\n"
        .. "  eval \"$(TAMARCO_SERVICES=redis scripts/test-services.sh start)\"", 0)
end

local function entry_of(entries, co)
    local id = tostring(co):match("0x%x+")
    for _, e in ipairs(entries) do
        if e.id == id then return e end
    end
end

describe("debug tasks", function()
    it("names what each task waits on: sleep with the time left, a Redis command, a suspend and what for", function()
        testing.run(function()
            local client = assert(redis.client():connect_to { host = REDIS_HOST, port = REDIS_PORT })
            local blocker = assert(redis.client():connect_to { host = REDIS_HOST, port = REDIS_PORT })
            local group = tasks.group()
            local sleeper = group:spawn("sleeper", function() tasks.sleep(60000) end)
            local popper = group:spawn("popper", function()
                local reply = blocker:call("BLPOP", "debug_spec_list", 0)
                return reply
            end)
            local suspended = scheduler.spawn(function() scheduler.suspend() end)
            local labelled = scheduler.spawn(function() scheduler.suspend("amqp rpc orders") end)
            tasks.sleep(50)

            local entries = debug_tasks.snapshot(nil)
            local s = assert(entry_of(entries, sleeper))
            assert.are.equal("task", s.kind)
            assert.are.equal("sleeper", s.name)
            assert.are.equal("waiting", s.state)
            assert.are.equal("sleep", s.wait)
            assert.is_true(s.remaining_ms > 0 and s.remaining_ms <= 60000)
            assert.is_true(s.waited_ms >= 0)
            assert.matches("debug_tasks_spec.lua:%d+", s.traceback)

            local p = assert(entry_of(entries, popper))
            assert.are.equal("redis", p.wait)
            assert.are.equal("BLPOP debug_spec_list", p.detail)
            assert.matches("debug_tasks_spec.lua:%d+", p.traceback)

            local u = assert(entry_of(entries, suspended))
            assert.are.equal("coroutine", u.kind)
            assert.are.equal("suspend", u.wait)
            assert.is_nil(u.detail)
            local l = assert(entry_of(entries, labelled))
            assert.are.equal("suspend", l.wait)
            assert.are.equal("amqp rpc orders", l.detail)

            -- looking did not wake anyone: the Redis call completes only now
            assert.are.equal("waiting", entry_of(debug_tasks.snapshot(nil), popper).state)
            assert(client:call("RPUSH", "debug_spec_list", "x"))
            tasks.sleep(50)
            assert.is_nil(entry_of(debug_tasks.snapshot(nil), popper))
            assert.matches("task sleeper %[0x%x+%] waiting: sleep %(%d+ ms left%)",
                debug_tasks.to_text(debug_tasks.snapshot(nil)))

            tasks.cancel(suspended)
            tasks.cancel(labelled)
            group:cancel_all()
            assert(group:wait(2000))
            assert.is_nil(entry_of(debug_tasks.snapshot(nil), sleeper))
            client:close()
            blocker:close()
        end)
    end)

    it("lists the longest-waiting tasks up to a limit and counts the others by what they wait on", function()
        testing.run(function()
            local group = tasks.group()
            local old = group:spawn("oldest", function() tasks.sleep(60000) end)
            tasks.sleep(30)   -- the others start waiting later
            for i = 1, 50 do group:spawn("young" .. i, function() tasks.sleep(60000) end) end
            tasks.sleep(5)
            local all = debug_tasks.snapshot(nil, { tracebacks = false })
            local entries, omitted = debug_tasks.snapshot(nil, { tracebacks = false, limit = 10 })
            assert.are.equal(10, #entries)
            assert.are.equal(#all - 10, omitted.count)
            assert.is_true(omitted.by_wait.sleep >= 40)
            assert.is_truthy(entry_of(entries, old), "the longest wait is not listed")
            assert.matches("^%d+ more not listed %(waiting shortest%): .*sleep %d+",
                debug_tasks.describe_omitted(omitted))
            assert.matches("more not listed", debug_tasks.to_text(entries, omitted), 1, true)
            assert.is_nil(select(2, debug_tasks.snapshot(nil, { tracebacks = false, limit = #all + 5 })))
            group:cancel_all()
            assert(group:wait(2000))
        end)
    end)

    it("keeps the book-keeping right through thousands of waits that come and go", function()
        testing.run(function()
            local before = scheduler.stats().waits   -- waits of other specs' tasks
            local group = tasks.group()
            local cos = {}
            for i = 1, 3000 do cos[i] = group:spawn("t" .. i, function() tasks.sleep(10 + i % 50) end) end
            local long = group:spawn("long", function() tasks.sleep(60000) end)
            tasks.sleep(5)
            local waiting = 0
            for _, e in ipairs(debug_tasks.snapshot(nil, { tracebacks = false })) do
                if e.wait == "sleep" then waiting = waiting + 1 end
            end
            assert.is_true(waiting >= 1)
            tasks.sleep(200)   -- every short sleep ended: their notes were removed
            local entries = debug_tasks.snapshot(nil, { tracebacks = false })
            local left = {}
            for _, e in ipairs(entries) do
                if e.wait == "sleep" and (e.name == "long" or e.name:find("^t%d+$")) then left[#left + 1] = e end
            end
            assert.are.equal(1, #left)
            assert.are.equal("long", left[1].name)
            assert.are.equal(before + 1, scheduler.stats().waits)
            group:cancel_all()
            assert(group:wait(2000))
            assert.are.equal(before, scheduler.stats().waits)
        end)
    end)

    it("finds the note of every pending wait while waits of far-apart ids come and go (the table's removals)", function()
        testing.run(function()
            math.randomseed(7)
            -- tasks that wait again at once when woken: the live waits end up
            -- with ids spread far wider than the table, so they collide
            local before = scheduler.stats().waits   -- waits of other specs' tasks
            local cos = {}
            for i = 1, 1500 do
                cos[i] = scheduler.spawn(function()
                    while true do
                        scheduler.suspend()
                        tasks.checkpoint()
                    end
                end)
            end
            local ours = {}
            for _, co in ipairs(cos) do ours[tostring(co):match("0x%x+")] = true end
            tasks.sleep(1)
            for _ = 1, 30 do
                for _ = 1, 300 do scheduler.wake(cos[math.random(1, #cos)]) end
                tasks.sleep(1)
                local waiting = 0
                for _, e in ipairs(debug_tasks.snapshot(nil, { tracebacks = false })) do
                    if e.state == "waiting" and ours[e.id] then
                        waiting = waiting + 1
                        assert.are.equal("suspend", e.wait, "a wait without its note: " .. e.name)
                    end
                end
                assert.are.equal(waiting, scheduler.stats().waits - before)
            end
            for _, co in ipairs(cos) do tasks.cancel(co) end
            tasks.sleep(1)
            assert.are.equal(before, scheduler.stats().waits)
        end)
    end)
end)
