-- The metrics hot path and /metrics exposition, timed in the host: ops/s of
-- counter:inc, gauge:set, histogram/summary observe, observe_http and
-- labelled inc; and the exposition of 33 800 lines encoded in C against the
-- same text built in Lua (prometheus.exposition_lua), with their ratio.
-- Run by bench/metrics.sh (tamarco-host run bench/metrics_bench.lua).
local tamarco = require "tamarco"
local metrics = require "tamarco.core.metrics"
local prometheus = require "tamarco.core.metrics.prometheus"
local hrtime = require("tamarco.c.timer").hrtime

local N = tonumber(os.getenv("N") or 2000000)

local function hot_path()
    local r = metrics.new_registry()
    local c = r:counter("c_total", { labels = { a = "x" } })
    local g = r:gauge("g")
    local h = r:histogram("h_seconds")
    local s = r:summary("s")
    local values = {}
    for i = 1, 1024 do values[i] = math.random() * 2 end
    local routes = { "/a", "/b/{id}", "/c" }
    local extra = { route = "/x" }
    local cases = {
        { "counter:inc", function(n) for _ = 1, n do c:inc() end end },
        { "gauge:set", function(n) for i = 1, n do g:set(i) end end },
        { "histogram:observe", function(n) for i = 1, n do h:observe(values[i % 1024 + 1]) end end },
        { "summary:observe", function(n) for i = 1, n do s:observe(values[i % 1024 + 1]) end end },
        { "observe_http", function(n)
            for i = 1, n do r:observe_http(routes[i % 3 + 1], "GET", 200, values[i % 1024 + 1]) end
        end },
        { "labels(t):inc", function(n) for _ = 1, n do c:labels(extra):inc() end end },
    }
    print(("%-18s %12s"):format("operation", "M ops/s"))
    for _, case in ipairs(cases) do
        case[2](1000)
        local t0 = hrtime()
        case[2](N)
        print(("%-18s %12.1f"):format(case[1], N / ((hrtime() - t0) * 1e-9) / 1e6))
    end
end

local function exposition()
    local r = metrics.new_registry()
    for f = 1, 200 do
        local c = r:counter("c" .. f .. "_total", { help = "h" })
        local h = r:histogram("h" .. f .. "_seconds", { help = "h" })
        for k = 1, 10 do
            c:labels({ k = "v" .. k }):inc(k * 1.5)
            h:labels({ k = "v" .. k }):observe(k * 0.0123)
        end
    end
    local function ms_per_call(fn)
        fn()
        local t0 = hrtime()
        for _ = 1, 10 do fn() end
        return (hrtime() - t0) * 1e-7
    end
    local text = prometheus.exposition(r, "svc")
    local lines = select(2, text:gsub("\n", ""))
    local c_ms = ms_per_call(function() return prometheus.exposition(r, "svc") end)
    local lua_ms = ms_per_call(function() return prometheus.exposition_lua(r, "svc") end)
    print(("exposition of %d lines (%d KB): C %.2f ms, Lua %.2f ms, ratio Lua/C %.1fx"):format(
        lines, math.floor(#text / 1024), c_ms, lua_ms, lua_ms / c_ms))
end

local svc = tamarco.service { name = "metrics_bench" }
function svc:post_start()
    tamarco.spawn(function()
        hot_path()
        exposition()
        io.stdout:flush()
        svc:stop_service("benchmark done")
    end)
end
return svc
