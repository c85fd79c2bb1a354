--- tamarco.ops.debug.heap: memory and resource figures of the running service
-- (`/debug/heap` and the console's `heap`): Lua heap and GC, LuaJIT traces,
-- process RSS and open fds, libuv handles by type, the scheduler's tables,
-- and each resource's buffers and queues.
local introspect = require "tamarco.c.introspect"
local scheduler = require "tamarco.c.scheduler"

local heap = {}

-- Counted from enable() on: GC cycles (a finalizer that re-arms itself) and
-- JIT trace events (jit.attach; it only runs when the JIT compiles).
local counters = { gc_cycles = 0, traces_started = 0, traces_stopped = 0, traces_aborted = 0, flushes = 0 }
local enabled = false

local function arm_gc_sentinel()
    -- a userdata with a __gc: collected once per full cycle, then re-armed
    local sentinel = newproxy(true)
    getmetatable(sentinel).__gc = function()
        counters.gc_cycles = counters.gc_cycles + 1
        if enabled then arm_gc_sentinel() end
    end
end

local function on_trace(what)
    if what == "start" then counters.traces_started = counters.traces_started + 1
    elseif what == "stop" then counters.traces_stopped = counters.traces_stopped + 1
    elseif what == "abort" then counters.traces_aborted = counters.traces_aborted + 1
    elseif what == "flush" then counters.flushes = counters.flushes + 1 end
end

--- Starts the counters (idempotent). Costs nothing per request: one object
-- per GC cycle, one call per JIT trace event.
function heap.enable()
    if enabled then return end
    enabled = true
    arm_gc_sentinel()
    if jit and jit.attach then jit.attach(on_trace, "trace") end
end

--- Stops the counters (idempotent).
function heap.disable()
    if not enabled then return end
    enabled = false
    if jit and jit.attach then jit.attach(on_trace) end
end

local function read_file(path)
    local f = io.open(path, "r")
    if not f then return nil end
    local text = f:read("*a")
    f:close()
    return text
end

local function proc_status_kb(field)
    local text = read_file("/proc/self/status") or ""
    local kb = text:match(field .. ":%s*(%d+) kB")
    return kb and tonumber(kb) or nil
end

local function open_fds()
    local uv = require "luv"
    local req = uv.fs_scandir("/proc/self/fd")
    if not req then return nil end
    local n = 0
    while uv.fs_scandir_next(req) do n = n + 1 end
    return n - 1   -- the directory's own fd
end

local function live_traces()
    local ok, util = pcall(require, "jit.util")
    if not ok or not util.traceinfo then return nil end
    local n = 0
    for i = 1, 65535 do
        if util.traceinfo(i) then n = n + 1 elseif i > 4096 and n == 0 then break end
    end
    return n
end

local function gc_parameter(name)
    -- collectgarbage("setpause"/"setstepmul") returns the previous value
    local value = collectgarbage(name, 100)
    collectgarbage(name, value)
    return value
end

-- Buffers and queues of each resource, from what each keeps.
local function resource_figures(svc)
    local out = {}
    for _, name in ipairs(svc and svc.resource_names or {}) do
        local r = svc.resources[name]
        local figures
        if r.server_stats then
            local stats = r:server_stats()
            if stats then
                figures = { connections = stats.connections, in_flight = r.stats and r.stats.in_flight,
                    cache_entries = r._cache_count }
            end
        elseif r.link ~= nil or r.type_name == "redis" then
            local conn = r.link and r.link.conn
            figures = { pending_replies = conn and conn.pending and conn:pending() or 0,
                connected = conn ~= nil }
        elseif r.type_name == "amqp" then
            local info = r.conn and r.conn:info() or {}
            figures = { in_flight = r.in_flight, consumers = r.consumers and #r.consumers,
                unacked = info.delivered and info.acked and info.nacked
                    and (info.delivered - info.acked - info.nacked) or nil }
        end
        if figures then out[name] = figures end
    end
    return out
end

local function sink_figures()
    local ok, logging = pcall(require, "tamarco.core.logging")
    if not ok then return {} end
    local out = {}
    for _, sink in ipairs(logging.sinks()) do
        local entry = { name = sink.name }
        if sink.queue and sink.queue.length then entry.queued = sink.queue:length() end
        out[#out + 1] = entry
    end
    return out
end

--- heap.figures(svc) -> a table of figures (see the module's description).
function heap.figures(svc)
    local stats = scheduler.stats()
    return {
        lua = {
            heap_kb = collectgarbage("count"),
            gc_pause = gc_parameter("setpause"),
            gc_stepmul = gc_parameter("setstepmul"),
            gc_cycles = enabled and counters.gc_cycles or nil,
        },
        jit = {
            on = jit and jit.status and (jit.status()) or false,
            live_traces = live_traces(),
            traces_started = enabled and counters.traces_started or nil,
            traces_stopped = enabled and counters.traces_stopped or nil,
            traces_aborted = enabled and counters.traces_aborted or nil,
            flushes = enabled and counters.flushes or nil,
        },
        process = {
            rss_kb = proc_status_kb("VmRSS"),
            rss_peak_kb = proc_status_kb("VmHWM"),
            open_fds = open_fds(),
        },
        libuv_handles = introspect.handles(),
        scheduler = stats,
        resources = resource_figures(svc),
        log_sinks = sink_figures(),
    }
end

--- A short text form for the console.
function heap.to_text(f)
    local lines = {
        ("Lua heap       %.0f kB (GC pause %d, stepmul %d%s)"):format(f.lua.heap_kb, f.lua.gc_pause,
            f.lua.gc_stepmul, f.lua.gc_cycles and (", " .. f.lua.gc_cycles .. " cycles") or ""),
        ("JIT            %s, %s live traces%s"):format(f.jit.on and "on" or "off", tostring(f.jit.live_traces),
            f.jit.traces_aborted and (", " .. f.jit.traces_aborted .. " aborts") or ""),
        ("process        RSS %s kB (peak %s kB), %s open fds"):format(tostring(f.process.rss_kb),
            tostring(f.process.rss_peak_kb), tostring(f.process.open_fds)),
    }
    local handles = {}
    for kind, n in pairs(f.libuv_handles) do handles[#handles + 1] = kind .. " " .. n end
    table.sort(handles)
    lines[#lines + 1] = "libuv handles  " .. table.concat(handles, ", ")
    local s = f.scheduler
    lines[#lines + 1] = ("scheduler      %d waits, %d ready, %d pooled, %d task entries"):format(
        s.waits, s.ready, s.idle_tasks, s.tasks)
    local names = {}
    for name in pairs(f.resources) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
        local parts = {}
        for k, v in pairs(f.resources[name]) do parts[#parts + 1] = k .. "=" .. tostring(v) end
        table.sort(parts)
        lines[#lines + 1] = ("resource %-6s %s"):format(name, table.concat(parts, " "))
    end
    for _, sink in ipairs(f.log_sinks) do
        lines[#lines + 1] = ("log sink %-6s %s"):format(tostring(sink.name),
            sink.queued and (sink.queued .. " queued") or "")
    end
    return table.concat(lines, "\n") .. "\n"
end

return heap
