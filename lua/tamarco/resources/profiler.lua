--- tamarco.resources.profiler: LuaJIT's sampling profiler (jit.profile) for
-- the services listed in `system.resources.profiler.microservices_with_profiler`.
--
-- Every `interval_seconds` it rewrites `file` with the functions most often
-- on top of the stack since start (samples, share, and the VM state split:
-- compiled N, interpreted I, C, GC G, JIT compiler J). Off by default: for a
-- service not listed, start() returns at once (jit.profile is not even
-- loaded) and it costs nothing.
--
-- Settings under system.resources.profiler (the resource's name):
--   microservices_with_profiler  list of service names, or "all" (default {})
--   interval_seconds             how often the file is rewritten (10)
--   file                         default /tmp/<service>_profile.txt
--   top                          how many functions are written (30)
--   sample_ms                    the sampling interval in ms (10)
--   mode                         "function" (default) or "line"
local base = require "tamarco.core.resource"
local tasks = require "tamarco.core.tasks"
local timer = require "tamarco.c.timer"

local Profiler = base.class("profiler")

--- listed(list, name) -> true when `name` is in the list (or the list is "all").
function Profiler.listed(list, name)
    if list == "all" then return true end
    if type(list) == "string" then return list == name end
    if type(list) ~= "table" then return false end
    for _, entry in ipairs(list) do
        if entry == name or entry == "all" then return true end
    end
    return false
end

--- Profiler:enabled() -> true when the service is listed in `microservices_with_profiler`.
function Profiler:enabled()
    return Profiler.listed(self:setting("microservices_with_profiler", {}), self.service.name)
end

--- Profiler:start(): when enabled, starts LuaJIT's sampling profiler and writes the top
-- functions (or lines) every `interval_seconds`.
function Profiler:start()
    if not self:enabled() then return end
    local profile = require "jit.profile"
    self.file = self:setting("file", "/tmp/" .. self.service.name .. "_profile.txt")
    self.top = self:setting("top", 30)
    local interval_ms = self:setting("interval_seconds", 10) * 1000
    local sample_ms = self:setting("sample_ms", 10)
    local line_mode = self:setting("mode", "function") == "line"
    local counts, states = {}, {}
    self.counts, self.states, self.samples = counts, states, 0
    self.started_at = timer.time()
    local dumpstack = profile.dumpstack
    local format = line_mode and "pl" or "pF"
    profile.start((line_mode and "l" or "f") .. "i" .. sample_ms, function(thread, samples, vmstate)
        local key = dumpstack(thread, format, 1)
        counts[key] = (counts[key] or 0) + samples
        states[vmstate] = (states[vmstate] or 0) + samples
        self.samples = self.samples + samples
    end)
    self.profile = profile
    self.logger:info("profiler on", { file = self.file, sample_ms = sample_ms })
    self.group = tasks.group()
    self.group:spawn("profiler writer", function()
        while true do
            tasks.sleep(interval_ms)
            self:write()
        end
    end)
end

--- The current report as text.
function Profiler:report()
    local rows = {}
    for key, count in pairs(self.counts or {}) do rows[#rows + 1] = { key, count } end
    table.sort(rows, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[1] < b[1]) end)
    local total = math.max(self.samples or 0, 1)
    local lines = {
        ("# tamarco profiler: service %s, %d samples in %.1f s, written %s"):format(self.service.name,
            self.samples or 0, timer.time() - (self.started_at or timer.time()), os.date("!%Y-%m-%dT%H:%M:%SZ")),
    }
    local state_parts = {}
    for _, s in ipairs({ "N", "I", "C", "G", "J" }) do
        state_parts[#state_parts + 1] = ("%s %.1f%%"):format(s, 100 * (self.states[s] or 0) / total)
    end
    lines[#lines + 1] = "# vm states: " .. table.concat(state_parts, "  ")
    lines[#lines + 1] = "# samples    share  function"
    for i = 1, math.min(#rows, self.top or 30) do
        local key, count = rows[i][1], rows[i][2]
        lines[#lines + 1] = ("%9d  %6.2f%%  %s"):format(count, 100 * count / total, key)
    end
    return table.concat(lines, "\n") .. "\n"
end

--- Rewrites the file (atomically: a temporary file renamed over it).
function Profiler:write()
    if not self.profile then return end
    local tmp = self.file .. ".tmp"
    local f, err = io.open(tmp, "w")
    if not f then
        self.logger:warning("profiler cannot write " .. tmp .. ": " .. tostring(err))
        return
    end
    f:write(self:report())
    f:close()
    os.rename(tmp, self.file)
end

--- Profiler:stop(): stops the profiler and writes the last report.
function Profiler:stop()
    if not self.profile then return end
    self.profile.stop()
    self.group:cancel_all()
    self.group:wait(1000)
    self:write()
    self.profile = nil
end

-- Hot reload: nothing of its own to take over; it keeps running.
Profiler.adopt = base.keep_on_reload

--- Profiler:status() -> { status, enabled, file }.
function Profiler:status()
    return { status = self.status_code, enabled = self.file ~= nil, file = self.file }
end

return Profiler
