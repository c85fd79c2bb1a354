--- tamarco.ops.debug.profile: an on-demand CPU profile of the running service
-- with LuaJIT's sampling profiler (jit.profile), as folded stacks
-- ("root;caller;callee count" lines, what flamegraph.pl and speedscope read).
--
-- The profiler samples CPU time: a sample taken while the VM runs C code
-- (a binding, the JSON encoder, the GC, the JIT compiler) is attributed to
-- the Lua frame that called it, with a leaf frame saying so ("[C code]",
-- "[GC]", "[JIT compiler]"). The time the loop spends waiting for I/O costs
-- no CPU, so the profiler sees none of it: it is measured separately (libuv's
-- idle-time metric) and added as the frame "[idle: scheduler waiting for
-- I/O]", in samples of the same interval, so that the graph shows how busy
-- the service was.
--
-- One profile at a time per process (jit.profile is process-wide): run()
-- answers nil, "busy" while one runs or while the profiler resource samples.
local introspect = require "tamarco.c.introspect"
local tasks = require "tamarco.core.tasks"
local timer = require "tamarco.c.timer"

local profile = {}

profile.MAX_SECONDS = 60
profile.DEFAULT_INTERVAL_MS = 5
profile.IDLE_FRAME = "[idle: scheduler waiting for I/O]"

local VM_LEAF = { C = "[C code]", G = "[GC]", J = "[JIT compiler]" }

local busy = false
local idle_time_on = false

--- profile.busy() -> true while a profile runs.
function profile.busy() return busy end

local function other_profiler_running(svc)
    local resource = svc and svc.resources and svc.resources.profiler
    return resource ~= nil and resource.profile ~= nil
end

--- profile.check(seconds, mode) -> seconds, mode | nil, message (bad input).
function profile.check(seconds, mode)
    seconds = tonumber(seconds)
    if not seconds or seconds <= 0 or seconds ~= seconds then
        return nil, "seconds must be a number > 0"
    end
    if seconds > profile.MAX_SECONDS then
        return nil, ("seconds must be at most %d"):format(profile.MAX_SECONDS)
    end
    mode = mode or "f"
    if mode ~= "f" and mode ~= "l" then return nil, "mode must be f (functions) or l (lines)" end
    return seconds, mode
end

--- profile.run(svc, seconds, mode[, interval_ms]) -> result | nil, "busy".
-- Yields for `seconds` (inside a task) while the service keeps running.
-- result: { folded = { [stack] = samples }, samples, idle_samples,
-- interval_ms, seconds, mode, vmstates = { N =, I =, C =, G =, J = } }.
function profile.run(svc, seconds, mode, interval_ms)
    if busy or other_profiler_running(svc) then return nil, "busy" end
    interval_ms = interval_ms or profile.DEFAULT_INTERVAL_MS
    local jit_profile = require "jit.profile"
    local dumpstack = jit_profile.dumpstack
    -- root first (negative depth), full paths, ';'-separated, no trailing ';'
    local format = mode == "l" and "plZ;" or "pFZ;"
    local folded, vmstates = {}, {}
    local result = { folded = folded, vmstates = vmstates, samples = 0, interval_ms = interval_ms,
        seconds = seconds, mode = mode }
    if not idle_time_on then
        idle_time_on = introspect.enable_idle_time() and true or false
    end
    busy = true
    local idle_before = introspect.loop_idle_ms()
    local started = timer.hrtime()
    jit_profile.start(mode .. "i" .. interval_ms, function(thread, samples, vmstate)
        local stack = dumpstack(thread, format, -100)
        if stack == "" then stack = "[no Lua frame]" end
        local leaf = VM_LEAF[vmstate]
        if leaf then stack = stack .. ";" .. leaf end
        folded[stack] = (folded[stack] or 0) + samples
        vmstates[vmstate] = (vmstates[vmstate] or 0) + samples
        result.samples = result.samples + samples
    end)
    local ok, err = pcall(tasks.sleep, seconds * 1000)
    jit_profile.stop()
    busy = false
    if not ok then error(err, 0) end   -- cancelled: the profiler is off again
    result.elapsed_ms = (timer.hrtime() - started) / 1e6
    if idle_time_on then
        local idle_ms = introspect.loop_idle_ms() - idle_before
        local idle = math.floor(idle_ms / interval_ms + 0.5)
        if idle > 0 then folded[profile.IDLE_FRAME] = idle end
        result.idle_samples = idle
    end
    return result
end

--- profile.folded_text(result) -> the folded stacks, heaviest first.
function profile.folded_text(result)
    local rows = {}
    for stack, n in pairs(result.folded) do rows[#rows + 1] = { stack, n } end
    table.sort(rows, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[1] < b[1]) end)
    local lines = {}
    for i, row in ipairs(rows) do lines[i] = row[1] .. " " .. row[2] end
    return table.concat(lines, "\n") .. "\n"
end

--- profile.top(result, n) -> list of { frame, self_samples, share } of the
-- frames most often on top of the stack (idle left out of the share).
function profile.top(result, n)
    local self_counts, busy_total = {}, 0
    for stack, count in pairs(result.folded) do
        if stack ~= profile.IDLE_FRAME then
            local leaf = stack:match("([^;]+)$") or stack
            if VM_LEAF.C == leaf or VM_LEAF.G == leaf or VM_LEAF.J == leaf then
                leaf = (stack:match("([^;]+);[^;]+$") or "?") .. " " .. leaf
            end
            self_counts[leaf] = (self_counts[leaf] or 0) + count
            busy_total = busy_total + count
        end
    end
    local rows = {}
    for frame, count in pairs(self_counts) do
        rows[#rows + 1] = { frame = frame, samples = count, share = count / math.max(busy_total, 1) }
    end
    table.sort(rows, function(a, b) return a.samples > b.samples or (a.samples == b.samples and a.frame < b.frame) end)
    local out = {}
    for i = 1, math.min(n or 20, #rows) do out[i] = rows[i] end
    return out
end

--- profile.top_text(result[, n]) -> the n (default 20) frames with the most
-- samples of their own, as a text table for a terminal.
function profile.top_text(result, n)
    local lines = { ("%d samples every %d ms in %.1f s (%d idle)"):format(result.samples, result.interval_ms,
        result.seconds, result.idle_samples or 0), "  samples   share  frame" }
    for _, row in ipairs(profile.top(result, n)) do
        lines[#lines + 1] = ("%9d  %5.1f%%  %s"):format(row.samples, 100 * row.share, row.frame)
    end
    return table.concat(lines, "\n") .. "\n"
end

return profile
