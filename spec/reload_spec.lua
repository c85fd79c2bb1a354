-- Hot reload of service code (tamarco.reload), in-process and through SIGHUP.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local reload = require "tamarco.ops.reload"
local cli = require "spec.support.cli"

local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

-- A service whose version shows in a global probe: its start hook, a timer
-- counting per version, and a resource that keeps its "connection" across
-- reloads while taking the new definition.
local function service_source(version, extra)
    return ([[
local tamarco = require "tamarco"
local probe_resource = require "probe_resource"
local svc = tamarco.service { name = "reloadable", resources = { conn = probe_resource.new() } }
svc.conn:greet("%s")
function svc:start()
    _G.reload_probe.started = "%s"
    %s
end
function svc:stop() _G.reload_probe.last_stopped = "%s" end
svc:task_timer({ interval = 5, autostart = true }, "count", function()
    _G.reload_probe.ticks["%s"] = (_G.reload_probe.ticks["%s"] or 0) + 1
end)
return svc
]]):format(version, version, extra or "", version, version, version)
end

local RESOURCE = [[
local base = require "tamarco.core.resource"
local Probe = base.class("probe")
local connections = 0
function Probe:start() connections = connections + 1; self.connection = connections end
function Probe:greet(greeting) self.greeting = greeting end
function Probe:adopt(new)
    local old = self.greeting
    self.greeting = new.greeting
    return function() self.greeting = old end
end
return Probe
]]

describe("hot reload", function()
    local dir, path

    before_each(function()
        dir = os.tmpname()
        os.remove(dir)
        assert(require("luv").fs_mkdir(dir, tonumber("755", 8)))
        path = dir .. "/service.lua"
        write(dir .. "/probe_resource.lua", RESOURCE)
        write(path, service_source("v1"))
        _G.reload_probe = { ticks = {}, stopped = {} }
    end)

    after_each(function()
        os.remove(dir .. "/probe_resource.lua")
        os.remove(path)
        os.remove(dir)
    end)

    it("switches hooks, tasks and definitions to the new code and keeps connections", function()
        testing.run(function()
            local running = assert(testing.start_service(path))
            tamarco.sleep(30)
            local conn = running.service.conn
            write(path, service_source("v2"))
            assert(reload.reload(running.lifecycle, path))
            local ticks_v1 = _G.reload_probe.ticks.v1
            tamarco.sleep(40)
            local svc = running.lifecycle.service
            assert.are.equal("v2", _G.reload_probe.started)
            assert.are.equal("v1", _G.reload_probe.last_stopped)
            assert.are.equal(ticks_v1, _G.reload_probe.ticks.v1)   -- the old timer is gone
            assert.is_true(_G.reload_probe.ticks.v2 > 0)
            assert.are.equal(conn, svc.conn)                        -- same resource object,
            assert.are.equal(1, svc.conn.connection)                -- same connection,
            assert.are.equal("v2", svc.conn.greeting)               -- new definition
            assert.are.equal(running.service.instance_id, svc.instance_id)
            running.lifecycle:stop("test")
        end)
    end)

    it("keeps the old code running when the new file has a syntax error", function()
        testing.run(function()
            local running = assert(testing.start_service(path))
            tamarco.sleep(20)
            write(path, "local x = = 1")
            local ok, err = reload.reload(running.lifecycle, path)
            assert.is_nil(ok)
            assert.matches("syntax error", err)
            local before = _G.reload_probe.ticks.v1
            tamarco.sleep(30)
            assert.is_true(_G.reload_probe.ticks.v1 > before)
            assert.is_nil(_G.reload_probe.last_stopped)
            assert.are.equal(1, #running:logged("reload failed, the old code keeps running"))
            running.lifecycle:stop("test")
        end)
    end)

    it("rolls back to the old code when a new start hook fails", function()
        testing.run(function()
            local running = assert(testing.start_service(path))
            local conn = running.service.conn
            write(path, service_source("v2", 'error("v2 cannot start")'))
            local ok, err = reload.reload(running.lifecycle, path)
            assert.is_nil(ok)
            assert.matches("v2 cannot start", err)
            assert.are.equal(running.service, running.lifecycle.service)
            assert.are.equal("v1", _G.reload_probe.started)       -- old start hook ran again
            assert.are.equal("v1", conn.greeting)                  -- definition given back
            local before = _G.reload_probe.ticks.v1
            tamarco.sleep(30)
            assert.is_true(_G.reload_probe.ticks.v1 > before)
            local failure = running:logged("v2 cannot start")[1]
            assert.matches("stack traceback", failure.traceback)
            running.lifecycle:stop("test")
        end)
    end)

    it("does not grow memory across reloads", function()
        -- 1600 reloads: a slow (sanitizer) build on a busy machine needs
        -- more than the default bound, which is not what this checks
        local default_timeout = testing.timeout_ms
        testing.timeout_ms = 120000
        finally(function() testing.timeout_ms = default_timeout end)
        testing.run(function()
            local running = assert(testing.start_service(path))
            local function heap_after_reloads(n)
                for i = 1, n do
                    write(path, service_source(i % 2 == 0 and "even" or "odd"))
                    assert(reload.reload(running.lifecycle, path))
                end
                tamarco.sleep(20)
                for i = #running.records, 1, -1 do running.records[i] = nil end
                collectgarbage()
                collectgarbage()
                return collectgarbage("count")
            end
            -- Caches and tables grow to their working size during the first
            -- few hundred reloads (the heap levels off by ~1000). After that a
            -- leak grows the heap in every batch of reloads, while a one-off
            -- step (a table of the whole test process doubling its capacity)
            -- shows in one batch only: the smaller of two batches' growth
            -- must stay near zero.
            local warm = heap_after_reloads(1000)
            local first = heap_after_reloads(300)
            local second = heap_after_reloads(300)
            running.lifecycle:stop("test")
            local growth_kib = math.min(first - warm, second - first)
            print(("reload heap: %.0f KiB after 1000 reloads, %.0f KiB after 1300, %.0f KiB after 1600")
                :format(warm, first, second))
            assert.is_true(growth_kib < 32, ("heap grew by %.0f KiB per 300 reloads"):format(growth_kib))
        end)
    end)

    it("reloads on SIGHUP in a running host", function()
        local changed = path .. ".new"
        write(changed, (service_source("v2"):gsub('_G.reload_probe.started = "v2"',
            'self.logger:info("v2 is live")')))
        write(path, (service_source("v1"):gsub("_G.reload_probe.started = \"v1\"", "_G.reload_probe = { ticks = {}, stopped = {} }")
            :gsub("^", "_G.reload_probe = { ticks = {}, stopped = {} }\n")))
        local code, out = cli.run_until({ "run", path }, "service started", "TERM", nil, {
            { run = "mv " .. changed .. " " .. path .. "; kill -HUP $pid", wait = "v2 is live" },
        })
        assert.are.equal(0, code, out)
        assert.matches("reload requested: SIGHUP", out, 1, true)
        assert.matches("service code reloaded", out, 1, true)
    end)
end)
