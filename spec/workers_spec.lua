-- `tamarco-host run --workers N`: shared port, supervision, drain.
local cli = require "spec.support.cli"

local free_port = require("spec.support.net").free_port

describe("--workers", function()
    it("runs N workers on one port, restarts a killed one, and stops them all on SIGTERM", function()
        local port = free_port()
        local url = "http://127.0.0.1:" .. port .. "/pid"
        local pids_file = os.tmpname()
        local code, out = cli.run_until(
            { "run", "spec/fixtures/services/workers_service.lua", "--workers", "2" },
            "http server listening", "TERM",
            { TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(port) },
            {
                -- both workers answer on the one port
                { run = "sleep 0.5; for i in $(seq 1 200); do curl -s --max-time 2 " .. url
                        .. "; echo; done > " .. pids_file,
                  wait = "worker 2 started" },
                -- kill one worker hard: the supervisor starts a new one
                { run = "kill -KILL $(pgrep -P $pid | head -n 1)", wait = "restarting in" },
                { run = "true", wait = "restarted (pid" },
            })
        assert.are.equal(0, code, out)
        local pids = {}
        for line in io.lines(pids_file) do
            local pid = line:match('"pid":(%d+)')
            if pid then pids[pid] = true end
        end
        os.remove(pids_file)
        local distinct = 0
        for _ in pairs(pids) do distinct = distinct + 1 end
        assert.are.equal(2, distinct, "answers came from " .. distinct .. " processes")
        assert.matches("exited (code", out, 1, true)
        assert.matches("stopping 2 workers", out, 1, true)
        assert.matches("all workers stopped", out, 1, true)
    end)
end)
