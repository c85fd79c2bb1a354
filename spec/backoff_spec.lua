-- The runtime's reconnect back-off, shared by the C clients and Lua
-- (tamarco.c.backoff).
local backoff = require "tamarco.c.backoff"

describe("tamarco.c.backoff", function()
    it("publishes the framework's defaults", function()
        assert.are.same({ min_ms = 200, max_ms = 5000, factor = 2, jitter = 0 }, backoff.defaults)
    end)

    it("grows by the factor up to the maximum and starts over after a reset", function()
        local b = backoff.new { min_ms = 100, max_ms = 500, factor = 2 }
        local got = {}
        for i = 1, 5 do got[i] = b:next() end
        assert.are.same({ 100, 200, 400, 500, 500 }, got)
        b:reset()
        assert.are.equal(100, b:next())
    end)

    it("takes the defaults for the options it is not given", function()
        local b = backoff.new()
        assert.are.equal(200, b:next())
        assert.are.equal(400, b:peek())
    end)

    it("retries at once, every time, with a minimum of 0", function()
        local b = backoff.new { min_ms = 0, max_ms = 1000 }
        assert.are.same({ 0, 0, 0 }, { b:next(), b:next(), b:next() })
    end)

    it("takes at most the jitter's fraction off each delay", function()
        local b = backoff.new { min_ms = 1000, max_ms = 1000, jitter = 0.5 }
        local below = 0
        for _ = 1, 200 do
            local d = b:next()
            assert.is_true(d > 500 and d <= 1000, tostring(d))
            if d < 1000 then below = below + 1 end
        end
        assert.is_true(below > 0)
    end)

    it("refuses options out of range with the option's name", function()
        local ok, err = pcall(backoff.new, { jitter = 2 })
        assert.is_false(ok)
        assert.matches("backoff.new: 'jitter' must be a number in 0..1", err, 1, true)
        ok, err = pcall(backoff.new, { min_ms = "soon" })
        assert.is_false(ok)
        assert.matches("'min_ms' must be a number", err, 1, true)
    end)
end)
