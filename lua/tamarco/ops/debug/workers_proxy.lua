--- tamarco.ops.debug.workers_proxy: the /debug pages of `run --workers N`.
--
-- Each worker is a process of its own, with its own tasks, heap and
-- profile: its /debug pages are served by its own report server (on its
-- private loopback port) and the supervisor forwards them:
--   /debug/                 the list of workers, with links
--   /debug/w/<n>/...        worker n's /debug/... (query and the
--                           Authorization header passed on)
-- Whether the pages are on and the token are the workers' business (their
-- settings): the supervisor answers what worker 1 answers when it is not a
-- 200 (404 off, 401 without the token).
local flamegraph = require "tamarco.ops.debug.flamegraph"

local workers_proxy = {}

local PAGES = { "", "tasks", "profile", "heap", "settings" }

local function forward(client, worker, method, page, req)
    local query = req.query_string ~= "" and ("?" .. req.query_string) or ""
    local seconds = tonumber(req.query.seconds) or 10
    local status, body, headers = client:request {
        method = method,
        url = ("http://%s/debug/%s%s"):format(worker.address, page, query),
        headers = { Authorization = req:header("authorization") },
        body = method == "PUT" and req.body or nil,
        timeout = page == "profile" and (seconds + 10) * 1000 or 5000,
    }
    if not status then return 502, { error = "worker " .. worker.index .. ": " .. tostring(body) } end
    local content_type = headers and (headers["content-type"] or headers["Content-Type"]) or "application/json"
    return status, body, { ["Content-Type"] = content_type }
end

local function worker_of(list_workers, index)
    for _, worker in ipairs(list_workers()) do
        if tostring(worker.index) == index then return worker end
    end
end

--- workers_proxy.define(server, http_client, list_workers): http_client()
-- gives the HTTP client (made at the first use: the supervisor does not load
-- libcurl until it needs it).
function workers_proxy.define(server, http_client, list_workers)
    server:get("/debug/", function(req)
        local first = worker_of(list_workers, "1")
        if not (first and first.address) then return 503, { error = "worker 1 is not running" } end
        local status, body, headers = forward(http_client(), first, "GET", "heap", req)
        if status ~= 200 then return status, body, headers end
        local rows = {}
        for _, worker in ipairs(list_workers()) do
            rows[#rows + 1] = ("<tr><td>%d</td><td>%s</td><td>%s</td></tr>"):format(worker.index,
                tostring(worker.pid or "-"), worker.address
                    and ("<a href='w/%d/'>debug page</a>"):format(worker.index) or "not running")
        end
        return 200, "<!DOCTYPE html><html><head><meta charset='utf-8'><title>workers — debug</title></head><body>"
            .. "<h1>" .. #rows .. " workers</h1><table border='1'><tr><th>worker</th><th>pid</th><th></th></tr>"
            .. table.concat(rows) .. "</table></body></html>", { ["Content-Type"] = "text/html; charset=utf-8" }
    end)
    server:get("/debug", function() return 301, "", { Location = "/debug/" } end)
    for _, page in ipairs(PAGES) do
        server:get("/debug/w/{n}/" .. page, function(req)
            local worker = worker_of(list_workers, req.params.n)
            if not (worker and worker.address) then
                return 404, { error = "no running worker " .. flamegraph.escape(req.params.n) }
            end
            return forward(http_client(), worker, "GET", page, req)
        end)
    end
    server:put("/debug/w/{n}/loglevel", function(req)
        local worker = worker_of(list_workers, req.params.n)
        if not (worker and worker.address) then return 404, { error = "no running worker " .. req.params.n } end
        return forward(http_client(), worker, "PUT", "loglevel", req)
    end)
end

return workers_proxy
