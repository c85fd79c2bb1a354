--- tamarco.ops.workers_report: the report server of `tamarco-host run --workers N`.
--
-- Workers sharing the report port would answer a Prometheus scrape one at a
-- time, each with its own counters. Instead each worker's report server
-- listens on a private loopback port and tells the supervisor where (a line
-- "X_TAMARCO_REPORT=<private host:port> <public host:port>" on the
-- supervisor pipe, see tamarco.ops.supervisor_pipe), and the supervisor listens on the
-- configured address (system.resources.tamarco_http_report_server) for all:
--   GET /metrics  every worker's exposition merged into one, each sample
--                 labelled tamarco_worker="<index>"
--   GET /status   { workers = { ["1"] = { pid, http_status, resources }, ... } }
--                 200 when every worker answers 200, 500 when one answers
--                 500, else 503 (a worker restarting or silent: not ready)
--   /debug/...    each worker's /debug pages (tamarco.ops.debug.workers_proxy)
local HttpServer = require "tamarco.resources.http_server"
local json = require "tamarco.core.json"
local prometheus = require "tamarco.core.metrics.prometheus"
local tasks = require "tamarco.core.tasks"

local workers_report = {}

local STATE = "X_TAMARCO_REPORT"
local FETCH_TIMEOUT_MS = 2000
workers_report.WORKER_LABEL = "tamarco_worker"

--- Worker side: `server` (the worker's report server) listens on a private
-- loopback port and announces it to the supervisor once listening.
function workers_report.make_private(server)
    server.listen_override = { host = "127.0.0.1", port = 0, reuse_port = false }
    server.on_listen = function(_, host, port, public_host, public_port)
        require("tamarco.ops.supervisor_pipe").tell(("%s=%s:%d %s:%d"):format(STATE, host, port,
            public_host, public_port))
    end
end

--- Supervisor side: a state line -> private address, public host, public
-- port; nil for other lines.
function workers_report.parse_state(line)
    local private, host, port = line:match("^" .. STATE .. "=(%S+) (%S+):(%d+)$")
    if not private then return nil end
    return private, host, tonumber(port)
end

--- workers_report.serve(host, port, list_workers) -> server | nil, err.
-- list_workers() -> list of { index =, pid =, address = (nil: not running) }.
-- Stop with server:stop() inside a task.
function workers_report.serve(host, port, list_workers)
    -- The HTTP client (libcurl and its TLS, Kerberos, LDAP... libraries, some
    -- 6 MB resident) is loaded at the first scrape, not with this module:
    -- workers load this module too, and would all carry it for nothing.
    local client
    local function http_client()
        client = client or require("tamarco.resources.http_client").new()
        return client
    end
    local server = HttpServer.new { host = host, port = port, reuse_port = false, drain_timeout = 1,
        cors = { enabled = false } }

    -- every worker's answer to `path`, fetched at the same time
    local function fetch_all(path)
        local client = http_client()
        local group, results = tasks.group(), {}
        for _, worker in ipairs(list_workers()) do
            local result = { worker = worker }
            results[#results + 1] = result
            if worker.address then
                group:spawn("report of worker " .. worker.index, function()
                    result.status, result.body = client:get("http://" .. worker.address .. path,
                        { timeout_ms = FETCH_TIMEOUT_MS })
                end)
            end
        end
        group:wait(FETCH_TIMEOUT_MS + 1000)
        return results
    end

    server:get("/metrics", function()
        local parts = {}
        for _, result in ipairs(fetch_all("/metrics")) do
            if result.status == 200 then
                parts[#parts + 1] = { value = result.worker.index, text = result.body }
            end
        end
        return 200, prometheus.merge(parts, workers_report.WORKER_LABEL),
            { ["Content-Type"] = prometheus.CONTENT_TYPE }
    end)

    server:get("/status", function()
        local workers, overall = {}, 200
        for _, result in ipairs(fetch_all("/status")) do
            local entry = { pid = result.worker.pid, http_status = result.status }
            if result.status then
                entry.resources = json.decode(result.body)
                if result.status == 500 then
                    overall = 500
                elseif result.status ~= 200 and overall ~= 500 then
                    overall = 503
                end
            else
                entry.error = result.worker.address and tostring(result.body) or "not running"
                if overall ~= 500 then overall = 503 end
            end
            workers[tostring(result.worker.index)] = entry
        end
        return overall, { workers = workers }
    end)

    require("tamarco.ops.debug.workers_proxy").define(server, http_client, list_workers)   -- /debug/w/<n>/...

    local ok, err = pcall(server.start, server)
    if not ok then return nil, tostring(err) end
    return server
end

return workers_report
