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

    it("serves one /metrics and /status for all workers from the supervisor", function()
        local port, report_port = free_port(), free_port()
        local base = "http://127.0.0.1:" .. report_port
        local metrics_file, status_file, maps_file = os.tmpname(), os.tmpname(), os.tmpname()
        local code, out = cli.run_until(
            { "run", "spec/fixtures/services/workers_report_service.lua", "--workers", "2" },
            "all 2 workers ready", "TERM",
            { TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(port),
              TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = tostring(report_port) },
            {
                -- a worker does not carry the supervisor's HTTP client (libcurl and
                -- its libraries: megabytes of resident memory per worker)
                { run = "for w in $(pgrep -P $pid); do echo \"$w $(grep -c libcurl /proc/$w/maps)\"; done > "
                        .. maps_file .. "; "
                        .. "for i in $(seq 1 50); do curl -s http://127.0.0.1:" .. port .. "/hit >/dev/null; done; "
                        .. "curl -s " .. base .. "/metrics > " .. metrics_file .. "; "
                        .. "curl -s -w '\\n%{http_code}' " .. base .. "/status > " .. status_file,
                  wait = "all 2 workers ready" },
            })
        assert.are.equal(0, code, out)
        local exposition = cli.read_all(metrics_file)
        local status_text = cli.read_all(status_file)
        local maps = cli.read_all(maps_file)
        os.remove(metrics_file)
        os.remove(status_file)
        os.remove(maps_file)
        local workers_seen = 0
        for pid, curl_maps in maps:gmatch("(%d+) (%d+)") do
            workers_seen = workers_seen + 1
            assert.are.equal("0", curl_maps, "worker " .. pid .. " has libcurl mapped")
        end
        assert.are.equal(2, workers_seen, maps)

        -- one family, both workers' series, and the hits add up to 50
        local _, help_lines = exposition:gsub("# HELP counted_hits_total ", "")
        assert.are.equal(1, help_lines, exposition)
        local total, seen = 0, {}
        for worker, value in exposition:gmatch('counted_hits_total{tamarco_worker="(%d)"} (%d+)') do
            seen[worker] = true
            total = total + tonumber(value)
        end
        assert.are.same({ ["1"] = true, ["2"] = true }, seen)
        assert.are.equal(50, total)
        local path = os.tmpname()
        local f = assert(io.open(path, "wb"))
        f:write(exposition)
        f:close()
        local p = assert(io.popen("promtool check metrics < " .. path .. " 2>&1; echo \"rc=$?\""))
        local lint = p:read("*a")
        p:close()
        os.remove(path)
        assert.are.equal("rc=0\n", lint:sub(-5), "promtool said:\n" .. lint)

        local body, http_code = status_text:match("^(.*)\n(%d+)$")
        assert.are.equal("200", http_code, status_text)
        local status = require("cjson").decode(body)
        for _, index in ipairs({ "1", "2" }) do
            local worker = status.workers[index]
            assert.are.equal(200, worker.http_status)
            assert.is_number(worker.pid)
            assert.are.equal(2, worker.resources.api.status)   -- STARTED
        end
        assert.matches("report server of 2 workers on 127.0.0.1:" .. report_port, out, 1, true)
    end)

    it("forwards SIGHUP: every worker reloads its code, the supervisor keeps running", function()
        local port = free_port()
        local source = cli.read_all("spec/fixtures/services/workers_service.lua")
        local path = cli.write_temp(source)
        local changed = path .. ".v2"
        local f = assert(io.open(changed, "w"))
        f:write((source:gsub("worker = os.getenv%(\"TAMARCO_WORKER\"%)", "worker = os.getenv(\"TAMARCO_WORKER\"), v = 2")))
        f:close()
        local answers = os.tmpname()
        local code, out = cli.run_until({ "run", path, "--workers", "2" }, "all 2 workers ready", "TERM",
            { TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(port) },
            {
                { run = "mv " .. changed .. " " .. path .. "; kill -HUP $pid", wait = "received SIGHUP" },
                { run = "i=0; while [ $i -lt 100 ] && [ $(grep -c 'service code reloaded' $out) -lt 2 ]; do "
                        .. "sleep 0.05; i=$((i+1)); done; for i in $(seq 1 40); do curl -s http://127.0.0.1:"
                        .. port .. "/pid; echo; done > " .. answers,
                  wait = "service code reloaded" },
            })
        os.remove(path)
        local replies = cli.read_all(answers)
        os.remove(answers)
        assert.are.equal(0, code, out)
        local _, reloads = out:gsub("service code reloaded", "")
        assert.are.equal(2, reloads, out)
        local _, new_code = replies:gsub('"v":2', "")
        assert.are.equal(40, new_code, replies)
        assert.matches("all workers stopped", out, 1, true)
    end)

    it("exits with the code of a worker that cannot start (bad settings: 2) instead of restarting it", function()
        local settings = cli.write_temp("system:\n  resources: [unclosed\n", ".yml")
        local code, out = cli.run({ "run", "spec/fixtures/services/workers_service.lua", "--workers", "2",
            "--settings", settings })
        os.remove(settings)
        assert.are.equal(2, code, out)
        assert.matches(settings, out, 1, true)               -- the worker named the file
        assert.matches("could not start (exit code 2", out, 1, true)
        assert.not_matches("restarting in", out, 1, true)
    end)

    it("exits 11 when the workers' report server cannot listen, like a single process", function()
        local uv = require "luv"
        local holder = uv.new_tcp()
        assert(holder:bind("127.0.0.1", 0))
        assert(holder:listen(1, function() end))
        local taken = holder:getsockname().port
        local code, out = cli.run({ "run", "spec/fixtures/services/workers_report_service.lua", "--workers", "2" },
            { TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(free_port()),
              TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = tostring(taken) })
        holder:close()
        assert.are.equal(11, code, out)
        assert.matches("report server of the workers: .*" .. taken, out)
        assert.matches("all workers stopped", out, 1, true)
    end)
end)
