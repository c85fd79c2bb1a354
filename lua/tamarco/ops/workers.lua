--- tamarco.ops.workers: `tamarco-host run --workers N` — one supervisor process
-- and N worker processes of the same service.
--
-- Each worker is this binary run again without --workers, with
-- TAMARCO_WORKER=<index> and TAMARCO_REUSE_PORT=1 so that every worker binds
-- the same listening ports (SO_REUSEPORT: the kernel spreads connections).
-- The supervisor restarts a worker that dies (after a back-off that grows
-- when it keeps dying), forwards SIGTERM/SIGINT to all of them, waits for
-- them to drain and exits 0 (1 if a worker had to be killed). SIGHUP is
-- forwarded too: each worker reloads its service code. A worker that exits
-- 2, 11 or 12 before it was ever ready (bad settings, port taken) stops the
-- supervisor with that code rather than being restarted forever.
-- Under systemd (Type=notify) the supervisor sends READY=1 once every worker
-- has reported ready (through a pipe on TAMARCO_NOTIFY_FD, see
-- tamarco.ops.supervisor_pipe) and STOPPING=1 when it stops them. The supervisor also
-- serves the report server (/metrics and /status of all workers, see
-- tamarco.ops.workers_report) on the port the workers would have shared.
local backoff = require "tamarco.c.backoff"
local process = require "tamarco.c.process"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local systemd = require "tamarco.ops.systemd"
local workers_report = require "tamarco.ops.workers_report"

local workers = {}

local RESTART_MIN_MS, RESTART_MAX_MS = 100, 10000
-- exit codes of a worker that are not worth a restart before it ever was
-- ready: 2 service file or settings error, 11 bind failure, 12 dependencies
local START_FAILURES = { [2] = true, [11] = true, [12] = true }

--- workers.supervise(count, worker_args, log) -> exit code. worker_args are
-- the `run` arguments without --workers; log(level, message).
function workers.supervise(count, worker_args, log)
    local uv = require "luv"
    local exe = process.exepath()
    local stopping = false
    local children = {}
    local running = 0
    local exit_code = 0
    local ready_count, announced_ready = 0, false
    local report_server, report_failed
    local start_worker, stop_all     -- defined below

    local function list_workers()
        local list = {}
        for index = 1, count do
            local child = children[index] or {}
            list[index] = { index = index, pid = child.pid, address = child.pid and child.report_address }
        end
        return list
    end

    -- The first worker to announce its report server says where the
    -- service's report server belongs: the supervisor listens there.
    local function on_report_address(index, private, host, port)
        children[index].report_address = private
        if report_server or report_failed then return end
        local server, err = workers_report.serve(host, port, list_workers)
        if not server then
            -- as a single process would: a port that cannot be bound ends it
            report_failed = true
            log("error", "report server of the workers: " .. tostring(err))
            exit_code = 11
            stop_all("the report server cannot listen")
            return
        end
        report_server = server
        log("info", ("report server of %d workers on %s:%d (/status, /metrics)"):format(count, server:address()))
    end

    local function environment(index)
        local env = {}
        for name, value in pairs(uv.os_environ()) do
            if name ~= "TAMARCO_WORKER" and name ~= "TAMARCO_REUSE_PORT" and name ~= "TAMARCO_NOTIFY_FD"
                and name ~= "NOTIFY_SOCKET" then
                env[#env + 1] = name .. "=" .. value
            end
        end
        env[#env + 1] = "TAMARCO_WORKER=" .. index
        env[#env + 1] = "TAMARCO_REUSE_PORT=1"
        env[#env + 1] = "TAMARCO_NOTIFY_FD=3"
        return env
    end

    local function on_worker_state(index, state)
        local child = children[index]
        local private, host, port = workers_report.parse_state(state)
        if private then return on_report_address(index, private, host, port) end
        if state ~= "READY=1" or child.ready then return end
        child.ready = true
        ready_count = ready_count + 1
        if ready_count == count and not announced_ready and not stopping then
            announced_ready = true
            log("info", ("all %d workers ready"):format(count))
            systemd.notify("READY=1")
        end
    end

    -- One state per line from the worker's end of the pipe.
    local function read_states(index, pipe)
        local pending = ""
        pipe:read_start(function(err, data)
            if err or not data then
                pipe:read_stop()
                if not pipe:is_closing() then pipe:close() end
                return
            end
            pending = pending .. data
            for line in pending:gmatch("([^\n]*)\n") do on_worker_state(index, line) end
            pending = pending:match("[^\n]*$")
        end)
    end

    local function on_exit(index, code, signal)
        local child = children[index]
        child.handle:close()
        child.handle, child.pid, child.report_address = nil, nil, nil
        running = running - 1
        if stopping then
            if running == 0 then process.stop_loop() end
            return
        end
        -- A worker that could not start because of its service file, its
        -- settings, a port or its resources' dependencies would fail again
        -- on every restart: stop, and exit with its code.
        if not child.ready and START_FAILURES[code] then
            log("error", ("worker %d could not start (exit code %d, see above): stopping")
                :format(index, code))
            exit_code = code
            stop_all("worker " .. index .. " could not start")
            return
        end
        -- A worker that lived long was healthy: restart it at once; one that
        -- keeps dying is restarted less and less often.
        local lived_ms = timer.now() - child.started_at
        child.restarts = child.restarts or backoff.new { min_ms = RESTART_MIN_MS, max_ms = RESTART_MAX_MS }
        if lived_ms > 10000 then child.restarts:reset() end
        local delay = child.restarts:next()
        log("warning", ("worker %d (pid %s) exited (code %s, signal %s); restarting in %d ms")
            :format(index, tostring(child.last_pid), tostring(code), tostring(signal), delay))
        child.timer = child.timer or uv.new_timer()
        child.timer:start(delay, 0, function() start_worker(index) end)
    end

    start_worker = function(index)
        if stopping then return end
        local child = children[index] or {}
        children[index] = child
        local states = uv.new_pipe(false)
        local handle, pid = uv.spawn(exe, {
            args = worker_args,
            env = environment(index),
            stdio = { 0, 1, 2, states },
        }, function(code, signal) on_exit(index, code, signal) end)
        if handle then
            read_states(index, states)
        else
            states:close()
        end
        if not handle then
            log("error", "cannot start worker " .. index .. ": " .. tostring(pid))
            child.started_at = timer.now()
            child.last_pid = nil
            running = running + 1
            on_exit(index, nil, nil)
            return
        end
        local restarted = child.last_pid ~= nil
        child.handle, child.pid, child.last_pid, child.started_at = handle, pid, pid, timer.now()
        running = running + 1
        log("info", ("worker %d %s (pid %d)"):format(index, restarted and "restarted" or "started", pid))
    end

    local listeners = {}
    stop_all = function(reason)
        if stopping then return end
        stopping = true
        log("info", reason .. ": stopping " .. running .. " workers")
        systemd.notify("STOPPING=1")
        if report_server then
            local server = report_server
            report_server = nil
            scheduler.spawn(function() server:stop() end)
        end
        for _, child in pairs(children) do
            if child.timer then child.timer:close() child.timer = nil end
            if child.handle then child.handle:kill("sigterm") end
        end
        if running == 0 then process.stop_loop() end
        -- the workers have their own watchdog; this one covers a worker
        -- that ignores SIGTERM altogether
        local guard = uv.new_timer()
        guard:start(60000, 0, function()
            for _, child in pairs(children) do
                if child.handle then child.handle:kill("sigkill") exit_code = 1 end
            end
        end)
        guard:unref()
    end
    -- The host delivers the signals (each in a task of its own); here they
    -- are forwarded to the workers.
    for _, name in ipairs({ "SIGTERM", "SIGINT" }) do
        listeners[#listeners + 1] = assert(process.on_signal(name, function() stop_all("received " .. name) end))
    end
    -- SIGHUP (systemctl reload): every worker reloads its code in place
    listeners[#listeners + 1] = assert(process.on_signal("SIGHUP", function()
        if stopping then return end
        log("info", "received SIGHUP: reloading the code of " .. running .. " workers")
        for _, child in pairs(children) do
            if child.handle then child.handle:kill("sighup") end
        end
    end))

    for index = 1, count do start_worker(index) end
    process.run_loop()
    for _, listener in ipairs(listeners) do listener:close() end
    log("info", "all workers stopped")
    return exit_code
end

return workers
