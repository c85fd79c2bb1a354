-- tamarco.json against lua-cjson, timed in the host (run by bench/json.sh):
-- the best of 5 alternating rounds each, SECONDS_PER_CASE in all per op.
local tamarco = require "tamarco"
local timer = require "tamarco.c.timer"
local json = require "tamarco.core.json"
local cjson = require("cjson").new()

local SECONDS = tonumber(os.getenv("SECONDS_PER_CASE") or 2)

local function api_body()
    return '{"id": 12345, "name": "tamarco-host", "tags": ["c", "lua", "libuv"], "price": 10.0, '
        .. '"ratio": 0.25, "active": true, "owner": null, "items": [], "meta": {"created": '
        .. '"2024-01-01T00:00:00Z", "labels": {}, "counts": [1, 2, 3, 4, 5, 6, 7, 8]}}'
end

local function records()
    local parts = {}
    for i = 1, 400 do
        parts[i] = ('{"id": %d, "user": "user-%d", "score": %d.5, "ok": %s, "path": "/a/b/%d", "list": [%d, %d, %d]}')
            :format(i, i, i, i % 2 == 0 and "true" or "false", i, i, i * 2, i * 3)
    end
    return "[" .. table.concat(parts, ", ") .. "]"
end

local function text()
    local parts = {}
    for i = 1, 200 do
        parts[i] = ('"line %d: caf\\u00e9 \\"quoted\\" \\t tab \\n newline \226\130\172 euro \240\159\152\128"'):format(i)
    end
    return "[" .. table.concat(parts, ", ") .. "]"
end

local ROUNDS = 5

-- MB/s of fn(arg) over `seconds` (bytes: the JSON text's size)
local function rate(fn, arg, bytes, seconds)
    local n, t0 = 0, timer.hrtime()
    local deadline = t0 + seconds * 1e9
    local now = t0
    while now < deadline do
        for _ = 1, 20 do fn(arg) end
        n = n + 20
        now = timer.hrtime()
    end
    return bytes * n / ((now - t0) / 1e9) / 1e6
end

-- The best MB/s of each over ROUNDS alternating rounds (a shared machine
-- slows one round or another; the best round is the codec's own speed).
local function compare(f1, a1, f2, a2, bytes)
    local best1, best2 = 0, 0
    for _ = 1, ROUNDS do
        best1 = math.max(best1, rate(f1, a1, bytes, SECONDS / ROUNDS))
        best2 = math.max(best2, rate(f2, a2, bytes, SECONDS / ROUNDS))
    end
    return best1, best2
end

local svc = tamarco.service { name = "json_bench", report_server = false }

function svc:post_start()
    tamarco.spawn(function()
        local cases = { { "api body", api_body() }, { "records 100KB", records() }, { "text", text() } }
        print(("%-14s %8s %12s %12s %8s"):format("payload", "op", "tamarco MB/s", "cjson MB/s", "ratio"))
        for _, case in ipairs(cases) do
            local name, payload = case[1], case[2]
            local ours_value, theirs_value = assert(json.decode(payload)), cjson.decode(payload)
            local bytes = #payload
            local d1, d2 = compare(json.decode, payload, cjson.decode, payload, bytes)
            print(("%-14s %8s %12.1f %12.1f %7.2fx"):format(name .. " " .. bytes, "decode", d1, d2, d1 / d2))
            local e1, e2 = compare(json.encode, ours_value, cjson.encode, theirs_value, bytes)
            print(("%-14s %8s %12.1f %12.1f %7.2fx"):format("", "encode", e1, e2, e1 / e2))
        end
        local sample = '{"items": [], "meta": {}, "one": 1.0}'
        local ours = json.encode(json.decode(sample))
        local theirs = cjson.encode(cjson.decode(sample))
        print(("round trip of %s: tamarco.json %s, cjson %s"):format(sample, ours, theirs))
        io.stdout:flush()
        svc:stop_service("benchmark done")
    end)
end

return svc
