-- Metrics: the registry and meters, the Prometheus exposition (golden text,
-- C against Lua, promtool), the carbon/file/stdout reporters and the
-- `metrics` resource's reporting task.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local metrics = require "tamarco.core.metrics"
local prometheus = require "tamarco.core.metrics.prometheus"
local reporters = require "tamarco.core.metrics.reporters"
local MetricsResource = require "tamarco.resources.metrics"
local cmetrics = require "tamarco.c.metrics"
local ctimer = require "tamarco.c.timer"
local uv = require "luv"
local scheduler = require "tamarco.c.scheduler"

local wait_for = testing.wait_until

local function read_file(path)
    local f = io.open(path, "rb")
    if not f then return nil end
    local data = f:read("*a")
    f:close()
    return data
end

local function errors_with(fn, text)
    local ok, err = pcall(fn)
    assert.is_false(ok)
    assert.is_truthy(tostring(err):find(text, 1, true), "error '" .. tostring(err) .. "' lacks '" .. text .. "'")
end

describe("tamarco.metrics registry", function()
    local r
    before_each(function() r = metrics.new_registry() end)

    it("returns the same meter for the same id and labels, whatever their order", function()
        local a = r:counter("hits_total", { help = "Hits", labels = { a = "1", b = "2" } })
        local b = r:counter("hits_total", { labels = { b = "2", a = 1 } })
        assert.are.equal(a, b)
        assert.are_not.equal(a, r:counter("hits_total", { labels = { a = "1" } }))
        assert.are_not.equal(a, r:counter("hits_total"))
        assert.are.equal(r:gauge("g"), r:gauge("g"))
        -- the module-level functions use the default registry
        metrics.reset()
        assert.are.equal(metrics.counter("x_total", { labels = { k = "v" } }),
                         metrics.counter("x_total", { labels = { k = "v" } }))
        metrics.reset()
    end)

    it("labels() returns the child with the extra labels, the same object each time", function()
        local base = r:counter("req_total", { labels = { method = "GET" } })
        local child = base:labels({ route = "/x" })
        assert.are.equal(child, r:counter("req_total", { labels = { method = "GET", route = "/x" } }))
        assert.are.equal(child, base:labels({ route = "/x" }))
        local same = { route = "/y" }
        assert.are.equal(base:labels(same), base:labels(same))
        assert.are.same({ method = "GET", route = "/x" }, child.label_set)
        -- an extra label overrides a base one
        assert.are.same({ method = "POST" }, base:labels({ method = "POST" }).label_set)
    end)

    it("counts with a counter and refuses to decrease it", function()
        local c = r:counter("c_total")
        c:inc()
        c:inc(2.5)
        c:inc(0)
        assert.are.equal(3.5, c:get())
        errors_with(function() c:inc(-1) end, "can only increase")
    end)

    it("sets, increments and decrements a gauge", function()
        local g = r:gauge("g")
        g:set(10)
        g:inc()
        g:dec(3)
        g:inc(0.5)
        assert.are.equal(8.5, g:get())
        g:set_to_current_time()
        assert.is_true(math.abs(g:get() - os.time()) < 5)
    end)

    it("computes summary quantiles over a sliding window, with sum and count", function()
        local s = r:summary("s")
        for i = 100, 1, -1 do s:observe(i) end
        assert.are.same({ 50, 90, 99 }, s:quantiles())
        assert.are.same({ 5050, 100 }, { s:get() })
        local w = r:summary("w", { quantiles = { 0, 0.5, 1 }, max_samples = 10 })
        local e = w:quantiles()
        assert.is_true(e[1] ~= e[1] and e[3] ~= e[3])   -- NaN when empty
        for i = 1, 25 do w:observe(i) end               -- the window holds 16..25
        assert.are.same({ 16, 20, 25 }, w:quantiles())
        assert.are.same({ 325, 25 }, { w:get() })
    end)

    it("counts histogram observations into cumulative buckets", function()
        local h = r:histogram("h_seconds", { buckets = { 1, 2, 5 } })
        for _, v in ipairs({ 0.5, 1, 1.5, 3, 10, -2 }) do h:observe(v) end
        assert.are.same({ 3, 4, 5, 6 }, h:buckets())
        assert.are.same({ 14, 6 }, { h:get() })
        -- default buckets, and +Inf given explicitly is the same layout
        assert.are.same(metrics.DEFAULT_BUCKETS, r:histogram("d_seconds").bounds)
        assert.are.same({ 1, 2 }, r:histogram("i_seconds", { buckets = { 1, 2, math.huge } }).bounds)
    end)

    it("times functions and spans with a timer", function()
        testing.run(function()
            local t = r:timer("op_seconds", { help = "op" })
            assert.are.equal("histogram", t.family.kind)
            local a, b = t:time(function(x, y)
                tamarco.sleep(20)
                return x + y, "done"
            end, 1, 2)
            assert.are.same({ 3, "done" }, { a, b })
            local sum, count = t:get()
            assert.are.equal(1, count)
            assert.is_true(sum >= 0.015 and sum < 1, "timed " .. sum)
            -- an error is observed and raised again, as is
            local err = {}
            local ok, got = pcall(t.time, t, function() error(err) end)
            assert.is_false(ok)
            assert.are.equal(err, got)
            assert.are.equal(2, select(2, t:get()))
            local stop = t:start()
            tamarco.sleep(10)
            local seconds = stop()
            assert.is_true(seconds >= 0.005)
            stop()   -- observes once
            assert.are.equal(3, select(2, t:get()))
            local st = r:timer("op2_seconds", { kind = "summary" })
            assert.are.equal("summary", st.family.kind)
            assert.are.same({ "x" }, { st:time(function() return "x" end) })
            assert.are.equal(1, select(2, st:get()))
        end)
    end)

    it("validates names, labels and layouts with clear errors", function()
        errors_with(function() r:counter("1abc") end, "invalid metric name '1abc'")
        errors_with(function() r:counter("a-b") end, "invalid metric name 'a-b'")
        errors_with(function() r:counter("") end, "invalid metric name ''")
        errors_with(function() r:counter(nil) end, "invalid metric name nil")
        errors_with(function() r:gauge("g", { labels = { ["bad-name"] = "x" } }) end,
            "invalid label name 'bad-name'")
        errors_with(function() r:gauge("g", { labels = { __reserved = "x" } }) end, "invalid label name '__reserved'")
        errors_with(function() r:gauge("g", { labels = { le = "1" } }) end, "label name 'le' is reserved")
        errors_with(function() r:gauge("g", { labels = { quantile = "1" } }) end, "'quantile' is reserved")
        errors_with(function() r:gauge("g", { labels = { x = {} } }) end, "label 'x' must be a string")
        errors_with(function() r:gauge("g"):labels({ ["1x"] = "v" }) end, "invalid label name '1x'")
        errors_with(function() r:gauge("g"):labels("x") end, "labels() wants a table")
        r:counter("typed_total")
        errors_with(function() r:gauge("typed_total") end, "already registered as a counter, not a gauge")
        r:histogram("hb", { buckets = { 1, 2 } })
        errors_with(function() r:histogram("hb", { buckets = { 1, 3 } }) end, "already registered with other buckets")
        errors_with(function() r:histogram("hx", { buckets = { 2, 1 } }) end, "strictly increasing")
        errors_with(function() r:histogram("hy", { buckets = {} }) end, "non-empty list")
        errors_with(function() r:summary("sq", { quantiles = { 1.5 } }) end, "must be a number in [0, 1]")
        errors_with(function() r:counter("hb_count") end, "collides with the series of histogram 'hb'")
        r:gauge("x_sum")
        errors_with(function() r:summary("x") end, "would collide with metric 'x_sum'")
        errors_with(function() r:timer("t", { kind = "gauge" }) end, "kind must be")
        r:counter("helped_total", { help = "one" })
        errors_with(function() r:counter("helped_total", { help = "two" }) end, "another help text")
    end)

    it("counts HTTP requests per route pattern, method and status", function()
        r:observe_http("/users/{id}", "GET", 200, 0.002)
        r:observe_http("/users/{id}", "GET", 200, 0.02)
        r:observe_http("/users/{id}", "GET", 404, 0.001)
        r:observe_http("/users/{id}", "POST", 201, 0.3)
        local requests = r:get("http_requests_total")
        assert.are.equal("counter", requests.kind)
        assert.are.equal(2, r:counter("http_requests_total",
            { labels = { route = "/users/{id}", method = "GET", status = "200" } }):get())
        assert.are.equal(1, r:counter("http_requests_total",
            { labels = { route = "/users/{id}", method = "GET", status = 404 } }):get())
        local d = r:histogram("http_request_duration_seconds", { labels = { route = "/users/{id}", method = "GET" } })
        assert.are.same({ 3 }, { select(2, d:get()) })
        assert.are.equal(2, d:buckets()[1])    -- <= 0.005: 0.002 and 0.001
        -- only labelled series exist (no empty-label series in the families)
        for key in pairs(requests.children) do assert.are_not.equal("", key) end
    end)
end)

describe("Prometheus exposition", function()
    local function small_registry()
        local r = metrics.new_registry()
        r:counter("requests", { help = "Requests.\nSecond line \\ backslash", labels = { method = "GET" } }):inc(3)
        r:counter("requests", { labels = { method = 'PO"ST' } }):inc()
        r:counter("requests", { labels = { method = "X", path = "a\\b\nc" } }):inc(2)
        r:gauge("temperature", { help = "Temp", labels = { z = 1, a = true } }):set(-1.5)
        r:gauge("ratio"):set(0 / 0)
        r:gauge("big"):set(1e20)
        r:gauge("inf"):set(math.huge)
        r:gauge("tiny"):set(0.1)
        local h = r:histogram("latency_seconds", { help = "Latency", buckets = { 0.1, 1 } })
        h:observe(0.25); h:observe(0.5); h:observe(2); h:observe(0.05)
        local s = r:summary("size_bytes", { help = "Sizes", quantiles = { 0.5, 0.9 } })
        for i = 1, 10 do s:observe(i) end
        r:summary("empty", { quantiles = { 0.5 } })
        return r
    end

    local GOLDEN = table.concat({
        "# HELP svc_big big",
        "# TYPE svc_big gauge",
        "svc_big 1e+20",
        "# HELP svc_empty empty",
        "# TYPE svc_empty summary",
        'svc_empty{quantile="0.5"} NaN',
        "svc_empty_sum 0",
        "svc_empty_count 0",
        "# HELP svc_inf inf",
        "# TYPE svc_inf gauge",
        "svc_inf +Inf",
        "# HELP svc_latency_seconds Latency",
        "# TYPE svc_latency_seconds histogram",
        'svc_latency_seconds_bucket{le="0.1"} 1',
        'svc_latency_seconds_bucket{le="1"} 3',
        'svc_latency_seconds_bucket{le="+Inf"} 4',
        "svc_latency_seconds_sum 2.8",
        "svc_latency_seconds_count 4",
        "# HELP svc_ratio ratio",
        "# TYPE svc_ratio gauge",
        "svc_ratio NaN",
        "# HELP svc_requests_total Requests.\\nSecond line \\\\ backslash",
        "# TYPE svc_requests_total counter",
        'svc_requests_total{method="GET"} 3',
        'svc_requests_total{method="PO\\"ST"} 1',
        'svc_requests_total{method="X",path="a\\\\b\\nc"} 2',
        "# HELP svc_size_bytes Sizes",
        "# TYPE svc_size_bytes summary",
        'svc_size_bytes{quantile="0.5"} 5',
        'svc_size_bytes{quantile="0.9"} 9',
        "svc_size_bytes_sum 55",
        "svc_size_bytes_count 10",
        "# HELP svc_temperature Temp",
        "# TYPE svc_temperature gauge",
        'svc_temperature{a="true",z="1"} -1.5',
        "# HELP svc_tiny tiny",
        "# TYPE svc_tiny gauge",
        "svc_tiny 0.1",
        "",
    }, "\n")

    it("writes the exact text format (golden)", function()
        local r = small_registry()
        assert.are.equal(GOLDEN, prometheus.exposition(r, "svc"))
        assert.are.equal(GOLDEN, prometheus.exposition_lua(r, "svc"))
        -- without a namespace, and through the module's namespace
        assert.is_truthy(prometheus.exposition(r):find("\nrequests_total{method=\"GET\"} 3\n", 1, true))
        metrics.set_namespace("my-svc.v2")
        assert.are.equal("my_svc_v2", metrics.namespace())
        assert.is_truthy(metrics.exposition(r):find("\n# TYPE my_svc_v2_big gauge\n", 1, true))
        metrics.set_namespace("9lives")
        assert.are.equal("_9lives", metrics.namespace())
        metrics.set_namespace(nil)
    end)

    it("formats values like the Lua reference, reading back exactly", function()
        local values = { 0, -0.0, 1, -1, 42, 2 ^ 53, -(2 ^ 53), 1e15, 1e18, 9.3e18, 1e20, 1e-7, 0.1, 0.2 + 0.1,
                         1 / 3, -2.5, 123456.789, 5e-324, 1.7976931348623157e308, math.huge, -math.huge, 0 / 0 }
        for _, v in ipairs(values) do assert.are.equal(prometheus.format_value_lua(v), cmetrics.format_value(v)) end
        -- random ones read back exactly (C and Lua may round a tie of the
        -- 17th digit differently, both exact)
        for i = 1, 2000 do values[#values + 1] = (math.random() - 0.5) * 10 ^ math.random(-20, 20) end
        for _, v in ipairs(values) do
            local s = cmetrics.format_value(v)
            assert.is_nil(s:find("e", 1, true) and v == math.floor(v) and math.abs(v) < 9.2e18 or nil)
            if v == v and math.abs(v) ~= math.huge then assert.are.equal(v, tonumber(s)) end
        end
        assert.are.equal("1000000000000000000", cmetrics.format_value(1e18))
        assert.are.equal("0", cmetrics.format_value(-0.0))
    end)

    -- A registry of every kind, with label values full of escapes.
    local function big_registry()
        local r = metrics.new_registry()
        local nasty = { 'quote"d', "back\\slash", "new\nline", "both\\\"\n", "{braces}=,", "ünïcødé ☃",
                        "", " spaced ", "tab\there", "#hash" }
        for f = 1, 20 do
            local c = r:counter("events_" .. f, { help = "Events of kind " .. f .. " with \\ and \n in help" })
            local g = r:gauge("level_" .. f .. "_ratio", { help = "Level " .. f })
            local h = r:histogram("work_" .. f .. "_seconds", { help = "Work " .. f,
                buckets = f % 2 == 0 and { 0.001, 0.01, 0.1, 1, 10 } or nil })
            local s = r:summary("payload_" .. f .. "_bytes", { help = "Payload " .. f })
            for k, v in ipairs(nasty) do
                c:labels({ value = v, k = k }):inc(k * 1.5)
                g:labels({ value = v }):set(k % 3 == 0 and -k / 7 or (k % 3 == 1 and 0 / 0 or math.huge))
                h:labels({ value = v }):observe(k * 0.0123)
                h:labels({ value = v }):observe(k * 12.3)
                if k % 2 == 0 then s:labels({ value = v }):observe(k * 1024) end
            end
        end
        for i = 1, 20 do
            r:observe_http("/items/{id}", i % 2 == 0 and "GET" or "POST", 200 + (i % 3), i / 100)
        end
        return r
    end

    it("merges several processes' expositions, one group per family, each sample labelled", function()
        local a = table.concat({
            "# HELP jobs_total Jobs done",
            "# TYPE jobs_total counter",
            'jobs_total{queue="a}b",kind="say \\"hi\\""} 3',
            "# HELP latency_seconds Latency",
            "# TYPE latency_seconds histogram",
            'latency_seconds_bucket{le="1"} 1',
            'latency_seconds_bucket{le="+Inf"} 2',
            "latency_seconds_sum 1.5",
            "latency_seconds_count 2",
            "# a comment",
            "",
        }, "\n")
        local b = table.concat({
            "# HELP jobs_total Jobs done",
            "# TYPE jobs_total counter",
            "jobs_total 4 1700000000000",
            "# HELP latency_seconds Latency",
            "# TYPE latency_seconds histogram",
            'latency_seconds_bucket{le="1"} 0',
            'latency_seconds_bucket{le="+Inf"} 1',
            "latency_seconds_sum 2",
            "latency_seconds_count 1",
            "up 1",
        }, "\n")
        local merged = prometheus.merge({ { value = 1, text = a }, { value = "x\"y", text = b } }, "w")
        assert.are.equal(table.concat({
            "# HELP jobs_total Jobs done",
            "# TYPE jobs_total counter",
            'jobs_total{w="1",queue="a}b",kind="say \\"hi\\""} 3',
            'jobs_total{w="x\\"y"} 4 1700000000000',
            "# HELP latency_seconds Latency",
            "# TYPE latency_seconds histogram",
            'latency_seconds_bucket{w="1",le="1"} 1',
            'latency_seconds_bucket{w="1",le="+Inf"} 2',
            'latency_seconds_sum{w="1"} 1.5',
            'latency_seconds_count{w="1"} 2',
            'latency_seconds_bucket{w="x\\"y",le="1"} 0',
            'latency_seconds_bucket{w="x\\"y",le="+Inf"} 1',
            'latency_seconds_sum{w="x\\"y"} 2',
            'latency_seconds_count{w="x\\"y"} 1',
            'up{w="x\\"y"} 1',
            "",
        }, "\n"), merged)
        assert.are.equal("", prometheus.merge({}, "w"))
    end)

    it("passes promtool check metrics on a big mixed registry", function()
        local r = big_registry()
        local text = prometheus.exposition(r, "svc-name")
        assert.are.equal(text, prometheus.exposition_lua(r, "svc-name"))
        local path = os.tmpname()
        local f = assert(io.open(path, "wb"))
        f:write(text)
        f:close()
        local p = assert(io.popen("promtool check metrics < " .. path .. " 2>&1; echo \"rc=$?\""))
        local out = p:read("*a")
        p:close()
        os.remove(path)
        assert.are.equal("rc=0\n", out:sub(-5), "promtool said:\n" .. out)
        -- the golden registry passes too
        path = os.tmpname()
        f = assert(io.open(path, "wb"))
        f:write(prometheus.exposition(small_registry(), "svc"))
        f:close()
        p = assert(io.popen("promtool check metrics < " .. path .. " 2>&1; echo \"rc=$?\""))
        out = p:read("*a")
        p:close()
        os.remove(path)
        assert.are.equal("rc=0\n", out:sub(-5), "promtool said:\n" .. out)
    end)
end)

describe("hot path", function()
    -- Speed is measured by bench/metrics.sh; here only that the hot calls
    -- allocate nothing (what keeps them off the GC's books).
    it("allocates nothing per inc/observe", function()
        local r = metrics.new_registry()
        local c = r:counter("c_total", { labels = { a = "x" } })
        local g = r:gauge("g")
        local h = r:histogram("h_seconds")
        local s = r:summary("s")
        local N = 200000
        local function check(name, fn)
            fn(1000)
            collectgarbage()
            collectgarbage("stop")
            local before = collectgarbage("count")
            fn(N)
            local kb = collectgarbage("count") - before
            collectgarbage("restart")
            assert.is_true(kb < 64, name .. " allocated " .. kb .. " KB for " .. N .. " calls")
        end
        local values = {}
        for i = 1, 1024 do values[i] = math.random() * 2 end
        check("counter:inc", function(n) for _ = 1, n do c:inc() end end)
        check("gauge:set", function(n) for i = 1, n do g:set(i) end end)
        check("histogram:observe", function(n) for i = 1, n do h:observe(values[i % 1024 + 1]) end end)
        check("summary:observe", function(n) for i = 1, n do s:observe(values[i % 1024 + 1]) end end)
        local routes = { "/a", "/b/{id}", "/c" }
        check("observe_http", function(n)
            for i = 1, n do r:observe_http(routes[i % 3 + 1], "GET", 200, values[i % 1024 + 1]) end
        end)
        local extra = { route = "/x" }
        check("labels(t):inc", function(n) for _ = 1, n do c:labels(extra):inc() end end)
    end)
end)

---------------------------------------------------------------------------
-- reporters
---------------------------------------------------------------------------

-- A carbon server on the loop: keeps what it receives.
local function listen()
    local server = uv.new_tcp()
    assert(server:bind("127.0.0.1", 0))
    local l = { server = server, port = server:getsockname().port, data = "", clients = {} }
    server:listen(16, function(err)
        assert(not err, err)
        local client = uv.new_tcp()
        server:accept(client)
        l.clients[#l.clients + 1] = client
        client:read_start(function(_, chunk)
            if chunk then
                l.data = l.data .. chunk
            elseif not client:is_closing() then
                client:close()
            end
        end)
    end)
    function l:close()
        for _, c in ipairs(self.clients) do if not c:is_closing() then c:close() end end
        self.server:close()
    end
    return l
end

local free_port = require("spec.support.net").free_port

describe("reporters", function()
    local function registry()
        local r = metrics.new_registry()
        r:counter("hits_total", { labels = { route = "/a b", method = "GET" } }):inc(3)
        r:gauge("temp"):set(21.5)
        local h = r:histogram("lat_seconds", { buckets = { 0.5, 1 } })
        h:observe(0.25); h:observe(2)
        local s = r:summary("sz", { quantiles = { 0.5, 0.999 } })
        s:observe(4)
        return r
    end

    local CARBON = table.concat({
        "svc.hits_total.method.GET.route._a_b 3 1700000000",
        "svc.lat_seconds.count 2 1700000000",
        "svc.lat_seconds.sum 2.25 1700000000",
        "svc.lat_seconds.bucket.le_0_5 1 1700000000",
        "svc.lat_seconds.bucket.le_1 1 1700000000",
        "svc.lat_seconds.bucket.le_inf 2 1700000000",
        "svc.sz.count 1 1700000000",
        "svc.sz.sum 4 1700000000",
        "svc.sz.p50 4 1700000000",
        "svc.sz.p99_9 4 1700000000",
        "svc.temp 21.5 1700000000",
        "",
    }, "\n")

    it("encodes carbon plaintext lines", function()
        assert.are.equal(CARBON, reporters.carbon_lines(registry(), "svc", 1700000000.7))
    end)

    it("refuses a carbon reconnect delay that is not a number of seconds", function()
        local ok, err = pcall(reporters.carbon, { reconnect_min = "soon" })
        assert.is_false(ok)
        assert.matches("carbon reporter: reconnect_min must be a number of seconds >= 0 (got soon)", err, 1, true)
        ok, err = pcall(reporters.carbon, { reconnect_max = -1 })
        assert.is_false(ok)
        assert.matches("reconnect_max must be a number of seconds >= 0", err, 1, true)
    end)

    it("sends to a carbon server over TCP, reconnecting when the peer goes away", function()
        testing.run(function()
            local l = listen()
            local r = registry()
            local rep = reporters.carbon { host = "localhost", port = l.port, reconnect_min = 0.02 }
            rep:open()
            assert.is_true(wait_for(function() return rep.state == "connected" end))
            assert.is_true(rep:report(r, "svc", 1700000000))
            assert.is_true(wait_for(function() return #l.data >= #CARBON end))
            assert.are.equal(CARBON, l.data)
            -- the server drops the connection: the reporter reconnects
            l.clients[1]:close()
            assert.is_true(wait_for(function() return rep.state ~= "connected" end))
            assert.is_true(wait_for(function() return rep.state == "connected" end))
            assert.are.equal(2, rep.connects)
            l.data = ""
            assert.is_true(rep:report(r, "svc", 1700000000))
            assert.is_true(wait_for(function() return #l.data >= #CARBON end))
            assert.are.equal(CARBON, l.data)
            assert.are.same({ state = "connected", sent = 2, dropped = 0, host = "localhost", port = l.port },
                rep:status())
            rep:close()
            l:close()
        end)
    end)

    it("drops batches without blocking while the carbon server is down", function()
        testing.run(function()
            local port = free_port()
            local warnings = {}
            local logger = { warning = function(_, m) warnings[#warnings + 1] = m end, info = function() end }
            local rep = reporters.carbon { host = "127.0.0.1", port = port, reconnect_min = 0.02, logger = logger }
            local turns, reported = testing.loop_turns(rep.report, rep, registry(), "svc")
            assert.is_false(reported)
            assert.are.equal(0, turns, "the report waited for the loop")
            assert.are.equal(1, rep.dropped)
            assert.is_true(wait_for(function() return rep.state == "waiting" end))
            assert.is_truthy(warnings[1]:find("cannot connect", 1, true))
            -- a server appears on that port: the reporter connects on its own
            local server = uv.new_tcp()
            assert(server:bind("127.0.0.1", port))
            local got = ""
            server:listen(4, function()
                local client = uv.new_tcp()
                server:accept(client)
                client:read_start(function(_, chunk)
                    if chunk then got = got .. chunk else client:close() end
                end)
            end)
            assert.is_true(wait_for(function() return rep.state == "connected" end))
            assert.is_true(rep:report(registry(), "svc", 1700000000))
            assert.is_true(wait_for(function() return #got >= #CARBON end))
            assert.are.equal(CARBON, got)
            rep:close()
            server:close()
            assert.is_nil(rep.timer)
        end)
    end)

    it("appends batches to a file", function()
        testing.run(function()
            local path = os.tmpname()
            os.remove(path)
            local rep = reporters.file { path = path }
            local r = registry()
            rep:report(r, "svc", 1700000000)
            rep:report(r, "svc", 1700000010)
            assert.is_true(wait_for(function() return rep.written == 2 end))
            local expo = prometheus.exposition(r, "svc")
            assert.are.equal("# tamarco metrics at 1700000000\n" .. expo .. "# tamarco metrics at 1700000010\n"
                .. expo, read_file(path))
            os.remove(path)
            local crep = reporters.file { path = path, format = "carbon", prefix = "svc" }
            crep:report(r, "ignored", 1700000000)
            assert.is_true(wait_for(function() return crep.written == 1 end))
            assert.are.equal(CARBON, read_file(path))
            os.remove(path)
            -- an unwritable path is counted, not raised
            local bad = reporters.file { path = "/nonexistent-dir/x/metrics" }
            bad:report(r, "svc")
            assert.is_true(wait_for(function() return bad.dropped == 1 end))
            errors_with(function() reporters.file {} end, "path must be a non-empty string")
            errors_with(function() reporters.stdout { format = "xml" } end, "format must be")
        end)
    end)

    it("writes batches to stdout (or a given stream)", function()
        local out = {}
        local stream = { write = function(_, s) out[#out + 1] = s end }
        local rep = reporters.stdout { stream = stream }
        rep:report(registry(), "svc", 1700000000)
        assert.are.equal(CARBON, table.concat(out))
    end)
end)

describe("naming modes", function()
    local function registry()
        local r = metrics.new_registry()
        r:counter("orders.created", { unit = "orders", labels = { shop = "a b" } }):inc(3)
        r:gauge("temp", { unit = "celsius" }):set(21.5)
        local s = r:summary("latency", { unit = "seconds" })
        for i = 1, 4 do s:observe(i) end
        r:summary("idle", { unit = "seconds" })
        return r
    end

    it("maps dots in ids to _ in both modes (the same meter)", function()
        local r = metrics.new_registry()
        local dotted = r:counter("orders.created")
        assert.are.equal(dotted, r:counter("orders_created"))
        dotted:inc(2)
        assert.is_truthy(prometheus.exposition(r, "svc"):find("\nsvc_orders_created_total 2\n", 1, true))
        r:set_naming("tamarco")
        assert.is_truthy(prometheus.exposition(r, "svc"):find("\nsvc_orders_created 2\n", 1, true))
        errors_with(function() r:counter("orders..x-y") end, "invalid metric name 'orders..x-y'")
    end)

    it("tamarco: counters without _total, Tamarco's quantiles, the unit as help", function()
        local r = registry()
        r:set_naming("tamarco")
        local text = prometheus.exposition(r, "svc")
        assert.is_truthy(text:find("# HELP svc_orders_created units orders\n# TYPE svc_orders_created counter\n"
            .. 'svc_orders_created{shop="a b"} 3\n', 1, true), text)
        assert.is_nil(text:find("_total", 1, true))
        for _, q in ipairs({ "0.5", "0.75", "0.9", "0.95", "0.99" }) do
            assert.is_truthy(text:find('svc_latency{quantile="' .. q .. '"}', 1, true), q)
        end
        assert.is_truthy(text:find("\nsvc_latency_sum 10\nsvc_latency_count 4\n", 1, true))
        -- explicit quantiles stay; the default mode keeps its own
        local own = metrics.new_registry()
        own:summary("s", { quantiles = { 0.3 } }):observe(1)
        own:summary("d"):observe(1)
        assert.are.same({ 0.5, 0.9, 0.99 }, own:get("d").quantiles)
        own:set_naming("tamarco")
        assert.are.same({ 0.3 }, own:get("s").quantiles)
        assert.are.same({ 0.5, 0.75, 0.9, 0.95, 0.99 }, own:get("d").quantiles)
        assert.is_truthy(prometheus.exposition(own, "x"):find('x_d{quantile="0.75"} 1', 1, true))
        errors_with(function() own:set_naming("graphite") end, "naming mode must be")
    end)

    it("tamarco: carbon lines <prefix>.<id>_<type>_<labels>__<unit> value timestamp", function()
        local r = registry()
        r:set_naming("tamarco")
        assert.are.equal(table.concat({
            "dep.svc.host.idle_sum_summary___seconds 0 1700000000.25",
            "dep.svc.host.idle_count_summary___seconds 0 1700000000.25",
            "dep.svc.host.latency_sum_summary___seconds 10 1700000000.25",
            "dep.svc.host.latency_count_summary___seconds 4 1700000000.25",
            "dep.svc.host.latency_summary_quantile_0.5__seconds 2 1700000000.25",
            "dep.svc.host.latency_summary_quantile_0.75__seconds 3 1700000000.25",
            "dep.svc.host.latency_summary_quantile_0.9__seconds 4 1700000000.25",
            "dep.svc.host.latency_summary_quantile_0.95__seconds 4 1700000000.25",
            "dep.svc.host.latency_summary_quantile_0.99__seconds 4 1700000000.25",
            "dep.svc.host.orders.created_counter_shop_a_b__orders 3 1700000000.25",
            "dep.svc.host.temp_gauge___celsius 21.5 1700000000.25",
            "",
        }, "\n"), reporters.tamarco_carbon_lines(r, "dep.svc.host", 1700000000.25))
    end)

    it("the resource: naming tamarco prefixes stdout with deploy.service.host and serves /metrics only when enabled",
        function()
        testing.run(function()
            for _, case in ipairs({ { handlers = {}, served = false },
                                    { handlers = { prometheus = { enabled = true } }, served = true } }) do
                local out = {}
                local reg = metrics.new_registry()
                reg:counter("jobs", { unit = "jobs" }):inc(7)
                local resource = MetricsResource.new { registry = reg,
                    stdout_stream = { write = function(_, s) out[#out + 1] = s end } }
                local svc = tamarco.service { name = "named", report_server = false,
                                              resources = { metrics = resource } }
                case.handlers.stdout = { enabled = true }
                local running = assert(testing.start_service(svc, { settings = { system = {
                    deploy_name = "prod", resources = { metrics = {
                        naming = "tamarco", collect_frequency = 0.02, handlers = case.handlers } } } } }))
                assert.is_true(wait_for(function() return #out >= 1 end))
                running:stop()
                local host = require("tamarco.c.process").hostname()
                assert.matches("^prod%.named%." .. host:gsub("%p", "%%%0") .. "%.jobs_counter___jobs 7 %d+",
                    out[1])
                assert.are.equal(case.served, resource.prometheus_enabled)
                assert.are.equal(case.served and 200 or 404, (resource:http_response()))
            end
        end)
    end)
end)

describe("the metrics resource", function()
    it("reports every collect_frequency from a task that ends at stop", function()
        testing.run(function()
            local path = os.tmpname()
            os.remove(path)
            local l = listen()
            local out = {}
            local reg = metrics.new_registry()
            reg:counter("jobs_total"):inc(7)
            local resource = MetricsResource.new { registry = reg,
                stdout_stream = { write = function(_, s) out[#out + 1] = s end } }
            local svc = tamarco.service { name = "metered-svc", report_server = false,
                                          resources = { metrics = resource } }
            local running = assert(testing.start_service(svc, { settings = { system = { resources = { metrics = {
                collect_frequency = 0.03,
                handlers = {
                    prometheus = { enabled = true },
                    carbon = { host = "127.0.0.1", port = l.port },
                    file = { path = path },
                    stdout = { enabled = true, format = "prometheus" },
                    ignored = { enabled = true },
                },
            } } } } }))
            assert.are.equal("metered_svc", resource.namespace)
            assert.are.equal(0.03, resource.collect_frequency)
            assert.are.equal(3, #resource.reporters)
            assert.are.equal("# HELP metered_svc_jobs_total jobs_total\n# TYPE metered_svc_jobs_total counter\n"
                .. "metered_svc_jobs_total 7\n", resource:exposition())
            assert.is_true(wait_for(function() return resource.collects >= 3 end))
            assert.is_true(wait_for(function() return l.data:find("metered_svc.jobs_total 7 ", 1, true) ~= nil end))
            assert.is_truthy(table.concat(out):find("metered_svc_jobs_total 7\n", 1, true))
            assert.is_true(wait_for(function() return (read_file(path) or ""):find("jobs_total 7", 1, true) ~= nil end))
            local st = resource:status()
            assert.are.equal("connected", st.reporters.carbon.state)
            running:stop()
            assert.are.equal(0, resource.group.count)
            local collects = resource.collects
            tamarco.sleep(100)
            assert.are.equal(collects, resource.collects)
            assert.are.equal("closed", resource.reporters[1].state)
            l:close()
            os.remove(path)
        end)
    end)

    it("serves GET /metrics on the service's report server", function()
        testing.run(function()
            metrics.reset()
            local svc = tamarco.service { name = "routed" }
            local running = assert(testing.start_service(svc, { settings = { system = { resources = {
                tamarco_http_report_server = { port = 0 } } } } }))
            metrics.counter("jobs_total", { help = "Jobs" }):inc(2)
            metrics.observe_http("/x/{id}", "GET", 200, 0.01)
            local _, port = svc.tamarco_http_report_server:address()
            local me = scheduler.current()
            local tcp, response = uv.new_tcp(), ""
            tcp:connect("127.0.0.1", port, function(err)
                assert(not err, err)
                tcp:read_start(function(_, chunk)
                    if chunk then
                        response = response .. chunk
                    else
                        tcp:close()
                        scheduler.wake(me)
                    end
                end)
                tcp:write("GET /metrics HTTP/1.0\r\n\r\n")
            end)
            scheduler.suspend()
            running:stop()
            local head, body = response:match("^(.-\r\n)\r\n(.*)$")
            assert.is_truthy(head:find("^HTTP/1.1 200"))
            assert.is_truthy(head:find("Content-Type: text/plain; version=0.0.4; charset=utf-8", 1, true))
            assert.is_truthy(body:find("^# HELP routed_"))
            assert.is_truthy(body:find('\nrouted_jobs_total 2\n', 1, true))
            assert.is_truthy(body:find('\nrouted_http_requests_total{method="GET",route="/x/{id}",status="200"} 1\n',
                1, true))
            metrics.reset()
            metrics.set_namespace(nil)
        end)
    end)

    it("has no task without reporters and rejects a bad collect_frequency", function()
        testing.run(function()
            local resource = MetricsResource.new { registry = metrics.new_registry() }
            local svc = tamarco.service { name = "quiet", report_server = false, resources = { metrics = resource } }
            local running = assert(testing.start_service(svc))
            assert.are.equal(10, resource.collect_frequency)
            assert.is_true(resource.prometheus_enabled)
            assert.are.equal(0, resource.group.count)
            running:stop()
            local bad = MetricsResource.new { registry = metrics.new_registry() }
            local svc2 = tamarco.service { name = "bad", report_server = false, resources = { metrics = bad } }
            local ok, _, code = testing.start_service(svc2, { settings = { system = { resources = { metrics = {
                collect_frequency = 0 } } } } })
            assert.is_nil(ok)
            assert.is_number(code)
            -- a handler section may be just false
            local off = MetricsResource.new { registry = metrics.new_registry() }
            local svc3 = tamarco.service { name = "off", report_server = false, resources = { metrics = off } }
            running = assert(testing.start_service(svc3, { settings = { system = { resources = { metrics = {
                handlers = { prometheus = false } } } } } }))
            assert.is_false(off.prometheus_enabled)
            assert.are.equal(404, (off:http_response()))
            running:stop()
        end)
    end)
end)
