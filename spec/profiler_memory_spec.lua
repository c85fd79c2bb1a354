-- The profiler and memory resources: off by default (nothing loaded, no
-- file), and when the service is listed, periodic files with the busiest
-- functions and the Lua heap / RSS growth.
local testing = require "tamarco.testing"
local tamarco = require "tamarco"
local cjson = require "cjson"
local Profiler = require "tamarco.resources.profiler"
local Memory = require "tamarco.resources.memory"

local function read(path)
    local f = io.open(path, "r")
    if not f then return nil end
    local text = f:read("*a")
    f:close()
    return text
end

-- a CPU-bound function the profiler must find
local bxor = require("bit").bxor
local function busy_checksum(n)
    local sum = 0
    for i = 1, n do sum = (sum + i * 7 + bxor(i, sum)) % 1000003 end
    return sum
end

local function make_service(name)
    local svc = tamarco.service { name = name, report_server = false,
        resources = { profiler = Profiler.new(), memory = Memory.new() } }
    svc.hoard = {}
    svc:task("crunch", function(self)
        while true do
            busy_checksum(2e5)
            self.hoard[#self.hoard + 1] = ("x"):rep(1024) .. #self.hoard   -- some heap growth
            tamarco.sleep(1)
        end
    end)
    return svc
end

describe("profiler and memory resources", function()
    local dir
    setup(function()
        dir = os.tmpname()
        os.remove(dir)
        os.execute("mkdir -p " .. dir)
    end)
    teardown(function() os.execute("rm -rf " .. dir) end)

    it("are off by default: no profiler loaded, no files, cheap", function()
        testing.run(function()
            local svc = make_service("quiet")
            local running = assert(testing.start_service(svc, { settings = { system = { resources = {
                profiler = { file = dir .. "/quiet_profile.txt", interval_seconds = 0.05 },
                memory = { file = dir .. "/quiet_memory.jsonl", interval_seconds = 0.05 } } } } }))
            tamarco.sleep(150)
            running:stop()
            assert.is_nil(read(dir .. "/quiet_profile.txt"))
            assert.is_nil(read(dir .. "/quiet_memory.jsonl"))
            assert.is_false(svc.profiler:status().enabled)
            assert.is_false(svc.memory:status().enabled)
            assert.is_nil(svc.profiler.profile)
        end)
    end)

    it("write the top functions and the memory growth for listed services", function()
        testing.run(function()
            local svc = make_service("busy")
            local running = assert(testing.start_service(svc, { settings = { system = { resources = {
                profiler = { microservices_with_profiler = { "other", "busy" }, file = dir .. "/busy_profile.txt",
                    interval_seconds = 0.1, sample_ms = 1 },
                memory = { microservices_with_memory = "all", file = dir .. "/busy_memory.jsonl",
                    interval_seconds = 0.05 } } } } }))
            assert.is_true(svc.profiler:status().enabled)
            tamarco.sleep(400)
            local periodic = read(dir .. "/busy_profile.txt")
            assert.is_string(periodic, "the profile was not written periodically")
            running:stop()
            local profile = read(dir .. "/busy_profile.txt")
            assert.matches("^# tamarco profiler: service busy, %d+ samples", profile)
            -- the busiest function is this spec's busy_checksum
            local first = profile:match("# samples    share  function\n([^\n]+)")
            assert.is_string(first, profile)
            assert.matches("profiler_memory_spec", first, 1, true)

            local lines = {}
            for line in read(dir .. "/busy_memory.jsonl"):gmatch("[^\n]+") do lines[#lines + 1] = cjson.decode(line) end
            assert.is_true(#lines >= 4, "expected periodic memory lines, got " .. #lines)
            local last = lines[#lines]
            assert.are.equal("busy", last.service)
            assert.is_true(last.rss_kb > 0 and last.lua_kb > 0)
            assert.is_true(last.lua_growth_kb > 0, "the hoard should show as Lua heap growth")
            assert.are.equal(0, lines[1].lua_growth_kb)
        end)
    end)
end)
