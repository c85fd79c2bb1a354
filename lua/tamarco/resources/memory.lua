--- tamarco.resources.memory: Lua heap and process RSS, periodically, for the
-- services listed in `system.resources.memory.microservices_with_memory`.
--
-- Every `interval_seconds` it appends one JSON line to `file`:
--   {"time":..., "service":..., "lua_kb":..., "rss_kb":...,
--    "lua_growth_kb":..., "rss_growth_kb":...}   (growth since start)
-- and logs a warning when the RSS grew by more than `warn_growth_mb` since
-- start. Off by default: for a service not listed, start() returns at once.
--
-- Settings under system.resources.memory (the resource's name):
--   microservices_with_memory  list of service names, or "all" (default {})
--   interval_seconds           (10)
--   file                       default /tmp/<service>_memory.jsonl
--   warn_growth_mb             (0: never warn)
local base = require "tamarco.core.resource"
local process = require "tamarco.c.process"
local tasks = require "tamarco.core.tasks"
local timer = require "tamarco.c.timer"
local Profiler = require "tamarco.resources.profiler"

local Memory = base.class("memory")

--- Memory:enabled() -> true when the service is listed in `microservices_with_memory`.
function Memory:enabled()
    return Profiler.listed(self:setting("microservices_with_memory", {}), self.service.name)
end

--- sample() -> { lua_kb =, rss_kb = } now.
function Memory.sample()
    local rss = process.rss()
    return { lua_kb = collectgarbage("count"), rss_kb = rss and rss / 1024 or 0 }
end

--- Memory:start(): when enabled, writes a baseline line and then one every `interval_seconds`.
function Memory:start()
    if not self:enabled() then return end
    self.file = self:setting("file", "/tmp/" .. self.service.name .. "_memory.jsonl")
    self.warn_growth_kb = self:setting("warn_growth_mb", 0) * 1024
    local interval_ms = self:setting("interval_seconds", 10) * 1000
    self.first = Memory.sample()
    self:write(self.first)   -- the baseline line: growth 0 by definition
    self.logger:info("memory resource on", { file = self.file })
    self.group = tasks.group()
    self.group:spawn("memory writer", function()
        while true do
            tasks.sleep(interval_ms)
            self:write()
        end
    end)
end

--- write([sample]): appends one line for `sample` (default: now).
function Memory:write(sample)
    local now = sample or Memory.sample()
    local record = {
        time = timer.time(),
        service = self.service.name,
        lua_kb = math.floor(now.lua_kb + 0.5),
        rss_kb = math.floor(now.rss_kb + 0.5),
        lua_growth_kb = math.floor(now.lua_kb - self.first.lua_kb + 0.5),
        rss_growth_kb = math.floor(now.rss_kb - self.first.rss_kb + 0.5),
    }
    self.last = record
    local f, err = io.open(self.file, "a")
    if not f then
        self.logger:warning("memory resource cannot write " .. self.file .. ": " .. tostring(err))
        return
    end
    f:write(assert(require("tamarco.core.json").encode(record)), "\n")
    f:close()
    if self.warn_growth_kb > 0 and record.rss_growth_kb > self.warn_growth_kb then
        self.logger:warning("RSS grew by " .. record.rss_growth_kb .. " kB since start", record)
    end
end

--- Memory:stop(): stops the sampling task and writes a last line.
function Memory:stop()
    if not self.group then return end
    self.group:cancel_all()
    self.group:wait(1000)
    self:write()
    self.group = nil
end

-- Hot reload: nothing of its own to take over; it keeps running.
Memory.adopt = base.keep_on_reload

--- Memory:status() -> { status, enabled, file } (as the profiler's).
Memory.status = Profiler.status

return Memory
