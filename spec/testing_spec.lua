-- tamarco.testing.run (tasks.run_until_done underneath): results, errors
-- and the bound on a task that never ends.
local testing = require "tamarco.testing"
local tamarco = require "tamarco"

describe("testing.run", function()
    it("returns every result of the task, nils included", function()
        local a, b, c, n = testing.run(function(x)
            tamarco.sleep(1)
            return x, nil, "c", 4
        end, "a")
        assert.are.same({ "a", nil, "c", 4 }, { a, b, c, n })
    end)

    it("raises the task's error with its traceback", function()
        local ok, err = pcall(testing.run, function() error("boom") end)
        assert.is_false(ok)
        assert.matches("boom", err)
        assert.matches("stack traceback", err)
    end)

    it("counts its bound from when it is called, even after the loop was blocked", function()
        local default_timeout = testing.timeout_ms
        testing.timeout_ms = 300
        finally(function() testing.timeout_ms = default_timeout end)
        os.execute("sleep 0.5")   -- the loop's clock falls 500 ms behind
        assert.are.equal("done", testing.run(function()
            tamarco.sleep(20)
            return "done"
        end))
    end)

    it("gives up on a task that never ends, and wakes it from its wait", function()
        local default_timeout = testing.timeout_ms
        testing.timeout_ms = 50
        finally(function() testing.timeout_ms = default_timeout end)
        local woke = false
        local ok, err = pcall(testing.run, function()
            tamarco.sleep(60000)
            woke = true
        end)
        assert.is_false(ok)
        assert.matches("did not finish within 50 ms", err)
        testing.timeout_ms = default_timeout
        testing.turn(10)
        assert.is_true(woke, "the task still sleeps")
    end)

end)
