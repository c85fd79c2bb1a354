-- Fault test of the AMQP resource against a real rabbitmq-server: three
-- worker processes (spec/fixtures/amqp/worker.lua) consume 10 000 persistent
-- jobs; in the middle the broker is stopped and started again
-- (scripts/test-services.sh stop-rabbitmq/start-rabbitmq, same port, durable
-- queue and persistent messages survive) and one worker is killed with
-- SIGKILL. Every job must be processed at least once (the workers append
-- each processed id to their own file; the union must hold all 10 000).
-- The spec's own client checks what a service sees during the outage:
-- status FAILED then CONNECTING then STARTED, publishes that fail fast with
-- a clear error, a publish that waits (wait_ms) and succeeds after.
local testing = require "tamarco.testing"
local amqp = require "tamarco.resources.amqp"
local tasks = require "tamarco.core.tasks"
local base = require "tamarco.core.resource"
local timer = require "tamarco.c.timer"
local cli = require "spec.support.cli"

local STATUS = base.STATUS
local HOST = os.getenv("TAMARCO_TEST_AMQP_HOST")
local PORT = tonumber(os.getenv("TAMARCO_TEST_AMQP_PORT") or "")
local SERVICES_DIR = os.getenv("TAMARCO_SERVICES_DIR")
local JOBS = 10000
local WORKERS = 3

local function sh(command)
    local ok, how, code = os.execute(command)
    if type(ok) == "number" then return ok == 0 end   -- Lua 5.1: the status
    return ok == true and how == "exit" and code == 0
end

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function count_ids(paths)
    local seen, lines, unique = {}, 0, 0
    for _, path in ipairs(paths) do
        local f = io.open(path, "r")
        if f then
            for line in f:lines() do
                local id = tonumber(line)
                if id then
                    lines = lines + 1
                    if not seen[id] then
                        seen[id] = true
                        unique = unique + 1
                    end
                end
            end
            f:close()
        end
    end
    return unique, lines, seen
end

local eventually = testing.wait_until

local function script(action)
    local root = debug.getinfo(1, "S").source:match("^@(.*)/spec/[^/]+$") or "."
    return root .. "/scripts/test-services.sh " .. action .. " " .. quote(SERVICES_DIR) .. " >/dev/null 2>&1"
end

describe("amqp resource under faults", function()
    local dir, pids, outs

    setup(function()
        assert(HOST and PORT and SERVICES_DIR, "TAMARCO_TEST_AMQP_HOST/PORT and TAMARCO_SERVICES_DIR must be set "
            .. "(TAMARCO_SERVICES=rabbitmq scripts/test-services.sh start prints them)")
        testing.timeout_ms = 150000
        dir = os.tmpname()
        os.remove(dir)
        assert(sh("mkdir -p " .. quote(dir)))
        pids, outs = {}, {}
    end)

    teardown(function()
        for _, pid in ipairs(pids or {}) do sh("kill -KILL " .. pid .. " 2>/dev/null") end
        -- the broker must be up again for the specs that follow
        if SERVICES_DIR and not sh(script("status")) then sh(script("start-rabbitmq")) end
        if dir then sh("rm -rf " .. quote(dir)) end
    end)

    it("loses no job when the broker restarts and a worker is killed", function()
        local prefix = ("fault%d%d"):format(os.time() % 100000, math.random(1000, 9999))
        local yml = dir .. "/settings.yml"
        local f = assert(io.open(yml, "w"))
        f:write(([[
system:
  logging:
    profile: PRODUCTION
  resources:
    tamarco_http_report_server:
      port: 0
    amqp:
      host: "%s"
      port: %d
      queues_prefix: "%s"
      prefetch: 10
      heartbeat: 5
      reconnect_backoff_ms: 100
      reconnect_backoff_max_ms: 1000
]]):format(HOST, PORT, prefix))
        f:close()
        local worker = debug.getinfo(1, "S").source:match("^@(.*)/[^/]+$") .. "/fixtures/amqp/worker.lua"
        for i = 1, WORKERS do
            outs[i] = dir .. "/worker" .. i .. ".ids"
            local pidfile = dir .. "/worker" .. i .. ".pid"
            assert(sh(("AMQP_WORKER_OUT=%s AMQP_WORKER_MS=40 %s run %s --settings %s >%s 2>&1 & echo $! >%s")
                :format(quote(outs[i]), quote(cli.host), quote(worker), quote(yml),
                    quote(dir .. "/worker" .. i .. ".log"), quote(pidfile))))
            local pf = assert(io.open(pidfile))
            pids[i] = assert(tonumber(pf:read("*l")))
            pf:close()
        end

        testing.run(function()
            local producer = amqp.client { host = HOST, port = PORT, queues_prefix = prefix,
                reconnect_backoff_ms = 100, reconnect_backoff_max_ms = 1000, heartbeat = 5 }
            local statuses = {}
            local set_status = producer.set_status
            producer.set_status = function(self, code)
                if statuses[#statuses] ~= code then statuses[#statuses + 1] = code end
                return set_status(self, code)
            end
            producer:start()
            assert.are.equal(STATUS.STARTED, producer.status_code)
            -- all workers consuming
            assert.truthy(eventually(function()
                local info = producer:queue_info("push_pull", "fault_jobs")
                return info and info.consumers == WORKERS
            end, 20000), "the three workers did not start consuming")

            -- 10 000 persistent jobs, 20 pushers; a push is retried until confirmed
            local t0 = timer.hrtime()
            local next_id, retries = 0, 0
            local pushers = tasks.group()
            for p = 1, 20 do
                pushers:spawn("pusher" .. p, function()
                    while next_id < JOBS do
                        next_id = next_id + 1
                        local id = next_id
                        while not producer:push("fault_jobs", { id = id, pad = ("x"):rep(100) }, { wait_ms = 30000 }) do
                            retries = retries + 1
                            tasks.sleep(100)
                        end
                    end
                end)
            end
            assert.is_true(pushers:wait(60000))
            local push_s = (timer.hrtime() - t0) / 1e9
            local processed_before = count_ids(outs)
            assert.is_true(processed_before < JOBS * 0.6,
                "the workers were too fast for an outage in the middle: " .. processed_before)

            -- the broker goes away in the middle of the work
            assert.truthy(eventually(function() return count_ids(outs) >= JOBS * 0.25 end, 30000))
            assert.is_true(sh(script("stop-rabbitmq")), "stop-rabbitmq failed")
            local during = count_ids(outs)
            assert.truthy(eventually(function()
                return producer.status_code == STATUS.FAILED or producer.status_code == STATUS.CONNECTING
            end, 10000))
            -- publishes fail fast and say why
            local turns, ok, err = testing.loop_turns(producer.push, producer, "fault_jobs", { id = -1 })
            assert.is_nil(ok)
            assert.matches("not connected to the AMQP broker " .. HOST .. ":" .. PORT, err, 1, true)
            assert.are.equal(0, turns, "a publish during the outage did not fail at once")
            -- ... or wait for the broker when asked to
            local waited_push
            local waiter = tasks.group()
            waiter:spawn("waiting push", function()
                waited_push = { producer:push("fault_probe", { id = 0 }, { wait_ms = 60000 }) }
            end)
            assert.is_true(sh(script("start-rabbitmq")), "start-rabbitmq failed")

            -- work resumes; then a worker dies holding unacked jobs
            assert.truthy(eventually(function() return count_ids(outs) >= during + 1000 end, 60000),
                "the workers did not resume after the broker came back")
            assert.is_true(sh("kill -KILL " .. pids[1]))
            local killed_at = count_ids(outs)

            local unique, lines = eventually(function()
                local u = count_ids(outs)
                return u >= JOBS and u or nil
            end, 90000, 250)
            unique, lines = count_ids(outs)
            local _, _, seen = count_ids(outs)
            local missing = {}
            for id = 1, JOBS do
                if not seen[id] then
                    missing[#missing + 1] = id
                    if #missing >= 10 then break end
                end
            end
            assert.are.equal(JOBS, unique, "jobs never processed, e.g.: " .. table.concat(missing, ", "))
            -- and nothing is left behind
            assert.truthy(eventually(function()
                local info = producer:queue_info("push_pull", "fault_jobs")
                return info and info.messages == 0
            end, 10000))
            assert.is_true(waiter:wait(30000))
            assert.is_true(waited_push[1])
            -- the status went STARTED -> FAILED -> CONNECTING -> ... -> STARTED
            local text = {}
            for i, code in ipairs(statuses) do text[i] = base.status_names[code] end
            local joined = table.concat(text, ",")
            assert.matches("STARTED,FAILED,CONNECTING.*STARTED$", joined)
            print(("\n  amqp fault: %d jobs pushed in %.1f s (%d push retries), %d processed before the outage, "
                .. "%d processed by the kill, %d lines for %d jobs (%d redelivered duplicates); statuses %s")
                :format(JOBS, push_s, retries, during, killed_at, lines, unique, lines - unique, joined))
            producer:delete_queue("push_pull", "fault_jobs")
            producer:delete_queue("push_pull", "fault_probe")
            producer:stop()
        end)

        -- the surviving workers stop cleanly
        for i = 2, WORKERS do
            assert.is_true(sh("kill -TERM " .. pids[i]))
        end
        for i = 2, WORKERS do
            local gone = false
            for _ = 1, 100 do
                if not sh("kill -0 " .. pids[i] .. " 2>/dev/null") then gone = true break end
                sh("sleep 0.1")
            end
            assert.is_true(gone, "worker " .. i .. " did not stop on SIGTERM")
        end
        pids = {}
    end)

    it("fails a push the broker does not confirm within confirm_timeout_ms, and works again after", function()
        local prefix = ("confirm%d%d"):format(os.time() % 100000, math.random(1000, 9999))
        local pid = tonumber((io.open(SERVICES_DIR .. "/rabbitmq/rabbitmq.pid") or error("no broker pid file")):read("*l"))
        testing.run(function()
            -- no heartbeats: only the confirm timeout can notice the frozen broker
            local cl = amqp.client { host = HOST, port = PORT, queues_prefix = prefix, heartbeat = 0,
                confirm_timeout_ms = 500, connection_timeout = 2, reconnect_backoff_ms = 100,
                reconnect_backoff_max_ms = 500 }
            cl:start()
            assert.are.equal(STATUS.STARTED, cl.status_code)
            assert.is_true(cl:push("confirm_probe", { n = 1 }))   -- the queue is declared
            assert.is_true(sh("kill -STOP " .. pid))
            local ok, pushed, err = pcall(cl.push, cl, "confirm_probe", { n = 2 })
            sh("kill -CONT " .. pid)
            assert.is_true(ok, tostring(pushed))
            assert.is_nil(pushed)
            assert.matches("no publisher confirm from the broker for 500 ms", err)
            -- reconnected once the broker runs again
            assert.truthy(eventually(function() return cl:push("confirm_probe", { n = 3 }, { wait_ms = 1000 }) end, 60000))
            assert.are.equal(STATUS.STARTED, cl.status_code)
            assert.is_true(cl.conn:info().reconnects >= 1)
            cl:delete_queue("push_pull", "confirm_probe")
            cl:stop()
        end)
    end)
end)
