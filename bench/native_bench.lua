-- The native example's ways to SHA-256 a buffer, timed in the host:
-- pure Lua, FFI into C, the C module on the loop, and offloaded to libuv's
-- pool (one at a time, and CONCURRENCY at once). Prints MB/s, the ratios
-- against pure Lua, and the longest the loop went without turning.
-- Run by bench/native.sh (tamarco-host run bench/native_bench.lua).
local tamarco = require "tamarco"
local timer = require "tamarco.c.timer"
local scheduler = require "tamarco.c.scheduler"

local root = debug.getinfo(1, "S").source:match("^@(.*)/bench/[^/]*$") or "."
require("tamarco.core.service_file").add_module_dir(root .. "/services/examples/native")
local hashing = require "hashing"

local SIZE = tonumber(os.getenv("SIZE") or 65536)
local SECONDS = tonumber(os.getenv("SECONDS_PER_WAY") or 2)
local CONCURRENCY = tonumber(os.getenv("CONCURRENCY") or 4)

local buffer = {}
for i = 1, SIZE do buffer[i] = string.char((i * 31) % 256) end
buffer = table.concat(buffer)

local svc = tamarco.service { name = "native_bench", report_server = false }

-- the loop's longest gap between two 1 ms ticks while fn runs
local function with_stall_probe(fn)
    local worst, last, running = 0, timer.hrtime(), true
    local probe = tamarco.spawn(function()
        while running do
            timer.sleep(1)
            local now = timer.hrtime()
            worst = math.max(worst, (now - last) / 1e6)
            last = now
        end
    end)
    timer.sleep(2)   -- let the probe start and arm its timer
    last = timer.hrtime()
    local result = fn()
    running = false
    scheduler.interrupt(probe)
    return result, worst
end

local function measure(way, hash, concurrency)
    concurrency = concurrency or 1
    local expected = hashing.c(buffer)
    assert(hash(buffer) == expected, way .. " computes a wrong digest")
    local bytes, started = 0, timer.hrtime()
    local deadline = started + SECONDS * 1e9
    local _, stall = with_stall_probe(function()
        if concurrency == 1 then
            while timer.hrtime() < deadline do
                hash(buffer)
                bytes = bytes + SIZE
                if way:match("^lua") or way:match("^ffi") or way == "c" then
                    timer.sleep(0)   -- give the loop (and the probe) a turn between hashes
                end
            end
        else
            local me, live = scheduler.current(), concurrency
            for _ = 1, concurrency do
                tamarco.spawn(function()
                    while timer.hrtime() < deadline do
                        hash(buffer)
                        bytes = bytes + SIZE
                    end
                    live = live - 1
                    if live == 0 then scheduler.wake(me) end
                end)
            end
            scheduler.suspend()
        end
    end)
    local seconds = (timer.hrtime() - started) / 1e9
    return bytes / seconds / 1e6, stall
end

function svc:post_start()
    tamarco.spawn(function()
        local results = {}
        local ways = {
            { "lua", hashing.lua }, { "ffi", hashing.ffi }, { "c", hashing.c },
            { "offload", hashing.offload }, { "offload x" .. CONCURRENCY, hashing.offload, CONCURRENCY },
        }
        print(("SHA-256 of a %d-byte buffer, %g s per way"):format(SIZE, SECONDS))
        print(("%-14s %10s %12s %16s"):format("way", "MB/s", "vs pure Lua", "max loop gap ms"))
        for _, w in ipairs(ways) do
            local mbps, stall = measure(w[1], w[2], w[3])
            results[w[1]] = mbps
            print(("%-14s %10.1f %11.1fx %16.2f"):format(w[1], mbps, mbps / results.lua, stall))
        end
        print(("ratio FFI/Lua %.1f  offload/Lua %.1f  offload x%d/Lua %.1f"):format(results.ffi / results.lua,
            results.offload / results.lua, CONCURRENCY, results["offload x" .. CONCURRENCY] / results.lua))
        io.stdout:flush()
        svc:stop_service("benchmark done")
    end)
end

return svc
