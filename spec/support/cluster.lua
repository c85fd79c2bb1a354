--- The clusters of scripts/test-services.sh (start-cluster etcd|redis-sentinel)
-- seen from a spec: their addresses, their members, and members killed and
-- started again without blocking the loop.
local uv = require "luv"
local timer = require "tamarco.c.timer"

local cluster = {}

cluster.dir = os.getenv("TAMARCO_SERVICES_DIR")

local function need(variable, kind)
    local value = os.getenv(variable)
    assert(value and value ~= "" and cluster.dir, variable .. " is not set: start the cluster with "
        .. "`scripts/test-services.sh start-cluster " .. kind .. " DIR` and source DIR/env.sh "
        .. "(scripts/test.sh does this)")
    return value
end

--- cluster.etcd() -> "h:p,h:p,h:p" (TAMARCO_TEST_ETCD_CLUSTER)
function cluster.etcd() return need("TAMARCO_TEST_ETCD_CLUSTER", "etcd") end

--- cluster.sentinels() -> "h:p,h:p,h:p", master name
function cluster.sentinels()
    return need("TAMARCO_TEST_REDIS_SENTINELS", "redis-sentinel"),
        need("TAMARCO_TEST_REDIS_SENTINEL_MASTER", "redis-sentinel")
end

--- cluster.port(kind, member) -> the member's port (number)
function cluster.port(kind, member)
    local f = assert(io.open(("%s/%s-cluster/%s/port"):format(cluster.dir, kind, member)))
    local port = tonumber(f:read("*l"))
    f:close()
    return port
end

--- cluster.member_of(kind, members, port) -> the name of the member on `port`
function cluster.member_of(kind, members, port)
    for _, m in ipairs(members) do
        if cluster.port(kind, m) == tonumber(port) then return m end
    end
end

--- cluster.script(args...) -> exit code. Runs scripts/test-services.sh in
-- a child process and waits for it inside the calling task (the loop, and
-- the service under test, keep running meanwhile).
function cluster.script(...)
    local code
    local args = { ... }
    local handle = uv.spawn("scripts/test-services.sh", { args = args, stdio = { nil, nil, 2 } },
        function(status)
            code = status
        end)
    assert(handle, "cannot run scripts/test-services.sh")
    while code == nil do timer.sleep(20) end
    handle:close()
    return code
end

--- cluster.member(action, kind, member): action kill|stop|start; raises when
-- the script fails.
function cluster.member(action, kind, member)
    local code = cluster.script(action .. "-member", kind, member, cluster.dir)
    assert(code == 0, ("test-services.sh %s-member %s %s failed (exit %s)"):format(action, kind, member, tostring(code)))
end

return cluster
