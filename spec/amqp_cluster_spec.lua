-- The AMQP resource against a 3-node RabbitMQ cluster (scripts/test-services.sh
-- start-cluster rabbitmq; the spec starts one in a temporary directory unless
-- TAMARCO_TEST_AMQP_CLUSTER names one already running): 5 000 confirmed
-- pushes into a quorum queue, and the node the pusher is connected to is
-- killed with SIGKILL in the middle (the queue's leader is on it too). The
-- pusher and the consumer move to the other nodes; every confirmed message is consumed (0 lost); duplicates
-- (at-least-once) are counted and printed with the figures.
-- TAMARCO_SKIP_AMQP_CLUSTER=1 skips it (three brokers take a while to start).
local testing = require "tamarco.testing"
local amqp = require "tamarco.resources.amqp"
local tasks = require "tamarco.core.tasks"
local base = require "tamarco.core.resource"
local timer = require "tamarco.c.timer"

local STATUS = base.STATUS
local MESSAGES = 5000

local function sh(command)
    local ok, how, code = os.execute(command)
    if type(ok) == "number" then return ok == 0 end
    return ok == true and how == "exit" and code == 0
end

local function quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

local function read_all(path)
    local f = io.open(path, "r")
    if not f then return nil end
    local text = f:read("*a")
    f:close()
    return text
end

local eventually = testing.wait_until

local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/spec/[^/]+$") or "."
local skip = os.getenv("TAMARCO_SKIP_AMQP_CLUSTER") == "1"

describe("amqp resource on a RabbitMQ cluster", function()
    local services_dir, cluster, cluster_dir

    setup(function()
        if skip then return end
        testing.timeout_ms = 240000
        cluster = os.getenv("TAMARCO_TEST_AMQP_CLUSTER")
        cluster_dir = os.getenv("TAMARCO_TEST_AMQP_CLUSTER_DIR")
        if not cluster or not cluster_dir then
            local pipe = io.popen("mktemp -d \"${TMPDIR:-/tmp}/tamarco-services.XXXXXX\"")
            services_dir = pipe:read("*l")
            pipe:close()
            assert(sh(ROOT .. "/scripts/test-services.sh start-cluster rabbitmq " .. quote(services_dir)
                .. " >/dev/null"), "scripts/test-services.sh start-cluster rabbitmq failed")
            local env = assert(read_all(services_dir .. "/env.sh"))
            cluster = env:match("TAMARCO_TEST_AMQP_CLUSTER=(%S+)")
            cluster_dir = env:match("TAMARCO_TEST_AMQP_CLUSTER_DIR=(%S+)")
        end
    end)

    teardown(function()
        if services_dir then
            sh(ROOT .. "/scripts/test-services.sh stop " .. quote(services_dir) .. " >/dev/null 2>&1")
        end
    end)

    -- the cluster node directory whose AMQP port is `port`
    local function node_of(port)
        for _, n in ipairs({ "n1", "n2", "n3" }) do
            if tonumber(read_all(cluster_dir .. "/" .. n .. "/port")) == port then return cluster_dir .. "/" .. n end
        end
    end

    local it_cluster = skip and pending or it
    it_cluster("loses no confirmed message of a quorum queue when the connected node is killed", function()
        testing.run(function()
            local prefix = ("cluster%d%d"):format(os.time() % 100000, math.random(1000, 9999))
            local function client()
                return amqp.client { hosts = cluster, queues_prefix = prefix, queue_type = "quorum", heartbeat = 5,
                    connection_timeout = 5, reconnect_backoff_ms = 100, reconnect_backoff_max_ms = 1000,
                    confirm_timeout_ms = 5000 }
            end
            -- the pusher declares the queue, so its leader is on the pusher's
            -- node: the kill below takes the connection and the leader at once
            local pusher = client()
            pusher:start()
            assert.are.equal(STATUS.STARTED, pusher:status().status)
            local confirmed, next_id, failed_pushes, push_errors = {}, 1, 0, {}
            assert.is_true(pusher:push("cluster_jobs", { id = 1 }))
            confirmed[1] = true
            local n_confirmed = 1
            local seen, deliveries = {}, 0
            local consumer = client()
            consumer:pull("cluster_jobs", function(msg)
                deliveries = deliveries + 1
                seen[msg.id] = (seen[msg.id] or 0) + 1
            end, { prefetch = 50 })
            consumer:start()
            assert.are.equal(STATUS.STARTED, consumer:status().status)

            local pushers = tasks.group()
            for p = 1, 16 do
                pushers:spawn("pusher" .. p, function()
                    while next_id < MESSAGES do
                        next_id = next_id + 1
                        local id = next_id
                        -- retried until confirmed: an unconfirmed push may still
                        -- have reached the queue (a duplicate, never a loss)
                        while true do
                            local ok, err = pusher:push("cluster_jobs", { id = id }, { wait_ms = 60000 })
                            if ok then break end
                            push_errors[err] = (push_errors[err] or 0) + 1
                            failed_pushes = failed_pushes + 1
                            tasks.sleep(50)
                        end
                        confirmed[id] = true
                        n_confirmed = n_confirmed + 1
                    end
                end)
            end
            assert.truthy(eventually(function() return n_confirmed >= MESSAGES * 0.3 end, 120000))
            local killed_port = pusher:status().connection.port
            local node = assert(node_of(killed_port), "no cluster node has port " .. tostring(killed_port))
            local pid = tonumber(read_all(node .. "/rabbitmq.pid"))
            assert(pid, "no pid for " .. node)
            local confirmed_at_kill = n_confirmed
            assert.is_true(sh("kill -KILL " .. pid))
            local finished = pushers:wait(180000)
            if not finished then
                local st = pusher:status().connection
                local errors = {}
                for text, n in pairs(push_errors) do errors[#errors + 1] = n .. " x " .. text end
                error(("the pushes did not finish after the node was killed: %d of %d confirmed, %d failed pushes; "
                    .. "pusher %s on :%s, %d reconnects, last error %s; push errors: %s"):format(n_confirmed, MESSAGES,
                    failed_pushes, tostring(st.state), tostring(st.port), st.reconnects or 0, tostring(st.last_error),
                    table.concat(errors, "; ")))
            end
            local all = eventually(function()
                for id = 1, MESSAGES do if not seen[id] then return false end end
                return true
            end, 120000, 250)
            local lost, missing = 0, {}
            for id = 1, MESSAGES do
                if confirmed[id] and not seen[id] then
                    lost = lost + 1
                    if #missing < 10 then missing[#missing + 1] = id end
                end
            end
            local duplicates = deliveries - MESSAGES
            local moved_to = pusher:status().connection.port
            print(("\n  amqp cluster: %d confirmed pushes into a quorum queue on 3 nodes; node :%d (the pusher's) "
                .. "killed after %d; pusher now on :%d (%d reconnects), %d failed pushes retried; %d delivered, "
                .. "%d lost, %d duplicates"):format(MESSAGES, killed_port, confirmed_at_kill, moved_to,
                pusher:status().connection.reconnects, failed_pushes, deliveries, lost, duplicates))
            assert.are.equal(0, lost, "confirmed and never consumed, e.g.: " .. table.concat(missing, ", "))
            assert.truthy(all)
            assert.are_not.equal(killed_port, moved_to)
            pusher:delete_queue("push_pull", "cluster_jobs")
            pusher:stop()
            consumer:stop()
        end)
    end)
end)
