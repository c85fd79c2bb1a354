-- `--workers 3` under HTTP load while a worker is killed with SIGKILL: the
-- supervisor restarts it and the service keeps answering. The requests lost
-- with the worker (answered 5xx, reset or refused) are printed.
local testing = require "tamarco.testing"
local tamarco = require "tamarco"
local cli = require "spec.support.cli"
local net = require "spec.support.net"
local uv = require "luv"

local WORKERS, CLIENTS = 3, 8

local function spawn_supervisor(port)
    local child = { output = "" }
    local env = {}
    for k, v in pairs(uv.os_environ()) do env[#env + 1] = k .. "=" .. v end
    env[#env + 1] = "TAMARCO__SYSTEM__RESOURCES__API__PORT=" .. port
    env[#env + 1] = "TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=" .. net.free_port()
    local out, err = uv.new_pipe(false), uv.new_pipe(false)
    child.handle = assert(uv.spawn(cli.host, {
        args = { "run", "spec/fixtures/services/workers_service.lua", "--workers", tostring(WORKERS) },
        env = env, stdio = { 0, out, err },
    }, function(code, signal) child.exit = { code = code, signal = signal } end))
    for _, pipe in ipairs({ out, err }) do
        pipe:read_start(function(_, chunk)
            if chunk then child.output = child.output .. chunk else pipe:close() end
        end)
    end
    return child
end

local function wait_output(child, text, timeout_ms)
    local deadline = tamarco.now() + (timeout_ms or 20000)
    while not child.output:find(text, 1, true) do
        assert(not child.exit and tamarco.now() < deadline, "waiting for '" .. text .. "':\n" .. child.output)
        tamarco.sleep(20)
    end
end

-- One request on a new connection: "ok" (and the worker's pid), "5xx" or "failed".
local function hit(port)
    local c = net.connect(port)
    if not c then return "failed" end
    c:send("GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local r = c:response(false, 3000)
    c:close()
    if not r then return "failed" end
    if r.status >= 500 then return "5xx" end
    if r.status == 200 then return "ok", r.body:match('"pid":(%d+)') end
    return "failed"
end

describe("--workers under load", function()
    it("restarts a worker killed with SIGKILL and keeps serving; failures are bounded", function()
        testing.run(function()
            local port = net.free_port()
            local child = spawn_supervisor(port)
            wait_output(child, "all " .. WORKERS .. " workers ready")
            local victim = tonumber(child.output:match("worker 1 started %(pid (%d+)%)"))
            assert.is_not_nil(victim, child.output)

            local counts = { ok = 0, ["5xx"] = 0, failed = 0 }
            local phase_after = { ok = 0, ["5xx"] = 0, failed = 0 }
            local pids_after = {}
            local loading, restarted = true, false
            local running = CLIENTS
            for _ = 1, CLIENTS do
                tamarco.spawn(function()
                    while loading do
                        local outcome, pid = hit(port)
                        local bucket = restarted and phase_after or counts
                        bucket[outcome] = bucket[outcome] + 1
                        if restarted and pid then pids_after[pid] = true end
                    end
                    running = running - 1
                end)
            end
            tamarco.sleep(500)
            assert.are.equal(0, counts.failed + counts["5xx"], "failures before the kill")
            uv.kill(victim, "sigkill")
            wait_output(child, "worker 1 restarted (pid")
            local new_pid = child.output:match("worker 1 restarted %(pid (%d+)%)")
            tamarco.sleep(300)   -- the new worker listens
            restarted = true
            local deadline = tamarco.now() + 10000
            while (phase_after.ok < 200 or not pids_after[new_pid]) and tamarco.now() < deadline do
                tamarco.sleep(50)
            end
            loading = false
            while running > 0 do tamarco.sleep(20) end

            local total = counts.ok + counts["5xx"] + counts.failed
            print(("\nHTTP load while SIGKILL hit one of %d workers: %d requests until the restart, %d answered 5xx, "
                .. "%d reset or refused; after the restart %d requests, %d failed")
                :format(WORKERS, total, counts["5xx"], counts.failed, phase_after.ok + phase_after["5xx"]
                    + phase_after.failed, phase_after["5xx"] + phase_after.failed))

            child.handle:kill("sigterm")
            deadline = tamarco.now() + 15000
            while not child.exit and tamarco.now() < deadline do tamarco.sleep(20) end
            if not child.handle:is_closing() then child.handle:close() end

            assert.is_true(counts.ok > 0)
            assert.is_true(pids_after[new_pid], "the restarted worker answered")
            assert.are.equal(0, phase_after.failed + phase_after["5xx"], "failures after the restart")
            assert.is_true(phase_after.ok >= 200)
            assert.are.same({ code = 0, signal = 0 }, child.exit, child.output)
        end)
    end)
end)
