-- The native example: SHA-256 of request bodies in pure Lua, through the FFI
-- and offloaded to libuv's thread pool, each checked against known digests
-- (FIPS 180-2 vectors) and against the others, directly and over HTTP.
local testing = require "tamarco.testing"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."

local VECTORS = {
    [""] = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ["abc"] = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    ["abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"] =
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
    [string.rep("a", 1000)] = "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3",
}

-- a body that crosses several blocks, with every byte value
local big = {}
for i = 0, 100000 do big[#big + 1] = string.char(i % 251) end
big = table.concat(big)

local function with_service(fn)
    return testing.run(function()
        local running = assert(testing.start_service(here .. "/service.lua",
            { settings = { system = { resources = { api = { port = 0 } } } } }))
        local client = require("tamarco.resources.http_client").new()
        local ok, err = pcall(fn, running, client, "http://127.0.0.1:" .. running.service.api.port)
        running:stop()
        assert(ok, err)
    end)
end

local function post_hash(client, base, way, body)
    local status, response = client:post(base .. "/hash/" .. way, { body = body })
    assert.are.equal(200, status, response)
    local decoded = require("cjson").decode(response)
    assert.are.equal(way, decoded.way)
    return decoded.sha256
end

describe("native example", function()
    local hashing

    setup(function()
        -- load the service once so its directory is on the module paths
        require("tamarco.core.service_file").load(here .. "/service.lua")
        hashing = require "hashing"
    end)

    it("hashes in pure Lua", function()
        for input, digest in pairs(VECTORS) do assert.are.equal(digest, hashing.lua(input)) end
        with_service(function(_, client, base)
            assert.are.equal(VECTORS.abc, post_hash(client, base, "lua", "abc"))
            assert.are.equal(hashing.c(big), post_hash(client, base, "lua", big))
        end)
    end)

    it("hashes in C through the FFI", function()
        for input, digest in pairs(VECTORS) do assert.are.equal(digest, hashing.ffi(input)) end
        assert.are.equal(hashing.lua(big), hashing.ffi(big))
        with_service(function(_, client, base)
            assert.are.equal(VECTORS.abc, post_hash(client, base, "ffi", "abc"))
            assert.are.equal(hashing.lua(big), post_hash(client, base, "ffi", big))
        end)
    end)

    it("hashes in C on the thread pool while the loop keeps running", function()
        testing.run(function()
            for input, digest in pairs(VECTORS) do assert.are.equal(digest, hashing.offload(input)) end
            -- concurrent offloads, and a timer that ticks while they run
            local tamarco = require "tamarco"
            local scheduler = require "tamarco.c.scheduler"
            local ticks, done, results = 0, 0, {}
            local me = scheduler.current()
            local inputs = {}
            for i = 1, 8 do inputs[i] = big:rep(8) .. i end
            for i = 1, 8 do
                tamarco.spawn(function()
                    results[i] = hashing.offload(inputs[i])
                    done = done + 1
                    if done == 8 then scheduler.wake(me) end
                end)
            end
            local ticker = tamarco.spawn(function()
                while true do tamarco.sleep(1); ticks = ticks + 1 end
            end)
            scheduler.suspend()
            scheduler.interrupt(ticker)
            for i = 1, 8 do assert.are.equal(hashing.c(inputs[i]), results[i]) end
            assert.is_true(ticks >= 1, "the loop did not run while hashing")
        end)
        with_service(function(_, client, base)
            assert.are.equal(VECTORS.abc, post_hash(client, base, "offload", "abc"))
            assert.are.equal(hashing.lua(big), post_hash(client, base, "offload", big))
        end)
    end)

    it("offload outside a task is an error, not a crash", function()
        assert.has_error(function() hashing.offload("x") end)
    end)
end)
