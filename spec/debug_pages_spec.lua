-- The /debug pages of a real service under HTTP and Redis traffic. Needs a
-- real redis-server (TAMARCO_TEST_REDIS_HOST/PORT, see scripts/test-services.sh).
local cjson = require "cjson"
local cli = require "spec.support.cli"
local free_port = require("spec.support.net").free_port

local REDIS_HOST = os.getenv("TAMARCO_TEST_REDIS_HOST")
local REDIS_PORT = os.getenv("TAMARCO_TEST_REDIS_PORT")
if not REDIS_HOST or not REDIS_PORT then
    error("debug_pages_spec needs a real redis-server: first\n"
        .. "  eval \"$(TAMARCO_SERVICES=redis scripts/test-services.sh start)\"", 0)
end

local SERVICE = "spec/fixtures/services/debug_service.lua"

local function env(port, report_port, extra)
    local e = {
        TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(port),
        TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = tostring(report_port),
        TAMARCO__SYSTEM__RESOURCES__CACHE__HOST = REDIS_HOST,
        TAMARCO__SYSTEM__RESOURCES__CACHE__PORT = REDIS_PORT,
        TAMARCO__SYSTEM__LOGGING__PROFILE = "PRODUCTION",
    }
    for k, v in pairs(extra or {}) do e[k] = v end
    return e
end

-- Temporary files named after a prefix, removed by cleanup().
local function scratch()
    local base = os.tmpname()
    local made = { base }
    return function(name)
        local path = base .. "." .. name
        made[#made + 1] = path
        return path
    end, function()
        for _, path in ipairs(made) do os.remove(path) end
    end
end

local function read(path) return cli.read_all(path) end

-- `curl -s` with the HTTP status on a last line of its own
local function curl(url, out, extra)
    return ("curl -s --max-time 30 %s -w '\\n%%{http_code}' '%s' > %s"):format(extra or "", url, out)
end

local function body_and_status(path)
    local text = read(path)
    local body, code = text:match("^(.*)\n(%d+)$")
    return body, tonumber(code)
end

describe("debug pages", function()
    it("show a handler blocked in Redis, profile the busy function, and keep the service serving", function()
        local port, report_port = free_port(), free_port()
        local api, report = "http://127.0.0.1:" .. port, "http://127.0.0.1:" .. report_port
        local file, cleanup = scratch()
        local redis_cli = ("redis-cli -h %s -p %s "):format(REDIS_HOST, REDIS_PORT)
        local code, out = cli.run_until({ "run", SERVICE, "--debug" }, "debug pages on", "TERM",
            env(port, report_port), {
                { run = table.concat({
                    redis_cli .. "DEL debug_spec_blocked >/dev/null",
                    -- traffic for the whole step
                    "(for i in $(seq 1 200); do curl -s " .. api .. "/hello/load >/dev/null; done) & load=$!",
                    "curl -s --max-time 30 " .. api .. "/blocked > " .. file("blocked") .. " & blocked=$!",
                    "sleep 0.5",
                    curl(report .. "/debug/tasks", file("tasks.json")),
                    curl(report .. "/debug/tasks?format=text", file("tasks.txt")),
                    curl(report .. "/debug/tasks?tracebacks=0", file("tasks.short")),
                    curl(report .. "/debug/heap", file("heap.json")),
                    curl(report .. "/debug/settings", file("settings.json")),
                    curl(report .. "/debug/", file("page.html")),
                    redis_cli .. "RPUSH debug_spec_blocked released >/dev/null",
                    "wait $blocked",
                    curl(api .. "/burn?seconds=4", file("burn")),
                    "sleep 0.2",
                    "(" .. curl(report .. "/debug/profile?seconds=2&format=folded", file("folded")) .. ") & prof=$!",
                    "sleep 0.5",
                    curl(report .. "/debug/profile?seconds=1", file("busy")),
                    curl(api .. "/hello/during", file("during")),
                    "wait $prof",
                    curl(report .. "/debug/profile?seconds=1", file("svg")),
                    curl(report .. "/debug/profile?seconds=0", file("bad")),
                    "wait $load",
                    "sleep 1.5",   -- the burner is done: the loop mostly waits for I/O
                    curl(report .. "/debug/profile?seconds=0.5&format=folded", file("idle")),
                }, "\n"), wait = "debug pages on" },
            })
        local results = {}
        for _, name in ipairs({ "tasks.json", "tasks.txt", "tasks.short", "heap.json", "settings.json", "page.html", "folded",
                                "busy", "during", "svg", "bad", "idle" }) do
            local body, status = body_and_status(file(name))
            results[name] = { body = body, status = status }
        end
        local blocked = read(file("blocked"))
        cleanup()
        assert.are.equal(0, code, out)

        -- the handler blocked in Redis, with its wait and a line of the service file
        assert.are.equal(200, results["tasks.json"].status, out)
        local tasks = cjson.decode(results["tasks.json"].body).tasks
        local found
        for _, t in ipairs(tasks) do
            if t.name == "http GET /blocked" then found = t end
        end
        assert.is_table(found, results["tasks.json"].body)
        assert.are.equal("handler", found.kind)
        assert.are.equal("waiting", found.state)
        assert.are.equal("redis", found.wait)
        assert.are.equal("BLPOP debug_spec_blocked", found.detail)
        local from_service = false
        for _, line in ipairs(found.traceback_lines) do
            if line:find("debug_service.lua:26", 1, true) then from_service = true end
        end
        assert.is_true(from_service, table.concat(found.traceback_lines, "\n"))
        -- the task doing Redis traffic is there under its name
        local traffic
        for _, t in ipairs(tasks) do if t.name == "redis traffic" then traffic = t end end
        assert.are.equal("task", traffic.kind)
        assert.matches("handler http GET /blocked %[0x%x+%] waiting: redis BLPOP debug_spec_blocked for %d+ ms",
            results["tasks.txt"].body)
        local short = cjson.decode(results["tasks.short"].body).tasks
        assert.is_true(#short >= 3)
        for _, t in ipairs(short) do assert.are.same({}, t.traceback_lines) end
        -- looking did not disturb it: it completed with the pushed value
        assert.matches('"released"', blocked)

        local heap = cjson.decode(results["heap.json"].body)
        assert.is_true(heap.lua.heap_kb > 0)
        assert.is_true(heap.process.rss_kb > 0)
        assert.is_true(heap.libuv_handles.tcp >= 2)
        assert.is_number(heap.resources.cache.pending_replies)

        local origins = {}
        for _, s in ipairs(cjson.decode(results["settings.json"].body).settings) do origins[s.key] = s.origin end
        assert.are.equal("environment variable TAMARCO__SYSTEM__RESOURCES__API__PORT", origins["system.resources.api.port"])
        assert.are.equal("the command line (--debug)", origins["system.resources.tamarco_http_report_server.debug"])

        assert.are.equal(200, results["page.html"].status)
        assert.matches("<table id='tasks'>", results["page.html"].body, 1, true)
        assert.matches("http GET /blocked", results["page.html"].body, 1, true)

        -- the profile of a service busy in burn_cpu has burn_cpu on top
        assert.are.equal(200, results.folded.status, results.folded.body)
        local best, best_count = nil, 0
        local per_leaf = {}
        for stack, count in results.folded.body:gmatch("([^\n]+) (%d+)") do
            local leaf = stack:match("([^;]+)$")
            if leaf ~= "[idle: scheduler waiting for I/O]" then
                per_leaf[leaf] = (per_leaf[leaf] or 0) + tonumber(count)
                if per_leaf[leaf] > best_count then best, best_count = leaf, per_leaf[leaf] end
            end
        end
        assert.matches("debug_service.lua:burn_cpu", best or "", 1, true)
        assert.matches("[idle: scheduler waiting for I/O]", results.idle.body, 1, true)
        -- one profile at a time; the service kept serving meanwhile
        assert.are.equal(409, results.busy.status)
        assert.are.equal(200, results.during.status)
        assert.are.equal(200, results.svg.status)
        assert.matches("^<svg", results.svg.body)
        assert.matches("tamarcoFlame", results.svg.body, 1, true)
        assert.are.equal(400, results.bad.status)
    end)

    it("are off by default (404) and refuse a non-loopback report server without a token (exit 2)", function()
        local port, report_port = free_port(), free_port()
        local file, cleanup = scratch()
        local code, out = cli.run_until({ "run", SERVICE }, "service started", "TERM", env(port, report_port), {
            { run = curl("http://127.0.0.1:" .. report_port .. "/debug/tasks", file("off")), wait = "service started" },
        })
        local _, status = body_and_status(file("off"))
        cleanup()
        assert.are.equal(0, code, out)
        assert.are.equal(404, status)

        code, out = cli.run({ "run", SERVICE, "--debug" }, env(port, report_port, {
            TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__HOST = "0.0.0.0" }))
        assert.are.equal(2, code, out)
        assert.matches("non-loopback address 0.0.0.0 need debug_token", out, 1, true)
    end)

    it("need the bearer token when one is set: 401 without it or with a wrong one", function()
        local port, report_port = free_port(), free_port()
        local url = "http://127.0.0.1:" .. report_port .. "/debug/tasks"
        local file, cleanup = scratch()
        local code, out = cli.run_until({ "run", SERVICE, "--debug" }, "debug pages on", "TERM",
            env(port, report_port, {
                TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__HOST = "0.0.0.0",
                TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__DEBUG_TOKEN = "s3cret-token" }), {
                { run = table.concat({
                    curl(url, file("none")),
                    curl(url, file("wrong"), "-H 'Authorization: Bearer s3cret-tokeN'"),
                    curl(url, file("short"), "-H 'Authorization: Bearer s3cret'"),
                    curl(url, file("right"), "-H 'Authorization: Bearer s3cret-token'"),
                    curl("http://127.0.0.1:" .. report_port .. "/debug/settings?format=text", file("settings"),
                        "-H 'Authorization: Bearer s3cret-token'"),
                }, "\n"), wait = "debug pages on" },
            })
        local results = {}
        for _, name in ipairs({ "none", "wrong", "short", "right", "settings" }) do
            local body, status = body_and_status(file(name))
            results[name] = { body = body, status = status }
        end
        cleanup()
        assert.are.equal(0, code, out)
        assert.are.equal(401, results.none.status)
        assert.are.equal(401, results.wrong.status)
        assert.are.equal(401, results.short.status)
        assert.are.equal(200, results.right.status)
        -- the token itself is a secret: masked on /debug/settings and never logged
        assert.matches("debug_token = \"***\"", results.settings.body, 1, true)
        assert.is_nil(results.settings.body:find("s3cret-token", 1, true))
        assert.is_nil(out:find("s3cret-token", 1, true))
    end)

    it("with --workers: the supervisor lists the workers and forwards each one's pages", function()
        local port, report_port = free_port(), free_port()
        local report = "http://127.0.0.1:" .. report_port
        local file, cleanup = scratch()
        local code, out = cli.run_until({ "run", SERVICE, "--debug", "--workers", "2" }, "all 2 workers ready", "TERM",
            env(port, report_port), {
                { run = table.concat({
                    curl(report .. "/debug/", file("list")),
                    curl(report .. "/debug/w/2/tasks", file("tasks2")),
                    curl(report .. "/debug/w/1/heap", file("heap1")),
                    curl(report .. "/debug/w/3/heap", file("none")),
                }, "\n"), wait = "all 2 workers ready" },
            })
        local results = {}
        for _, name in ipairs({ "list", "tasks2", "heap1", "none" }) do
            local body, status = body_and_status(file(name))
            results[name] = { body = body, status = status }
        end
        cleanup()
        assert.are.equal(0, code, out)
        assert.are.equal(200, results.list.status)
        assert.matches("<a href='w/2/'>", results.list.body, 1, true)
        assert.are.equal(200, results.tasks2.status)
        local names = {}
        for _, t in ipairs(cjson.decode(results.tasks2.body).tasks) do names[t.name] = true end
        assert.is_true(names["redis traffic"], results.tasks2.body)
        assert.are.equal(200, results.heap1.status)
        assert.is_table(cjson.decode(results.heap1.body).lua)
        assert.are.equal(404, results.none.status)
    end)
end)
