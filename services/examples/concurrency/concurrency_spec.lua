local tamarco = require "tamarco"
local testing = require "tamarco.testing"

describe("concurrency example", function()
    it("runs its task, its autostart timer and its thread, and stops them", function()
        local svc = testing.run(function()
            local running = assert(testing.start_service("services/examples/concurrency/service.lua"))
            tamarco.sleep(1300)
            running:stop()
            return running.service
        end)
        -- autostart: one tick at once, one after 1000 ms
        assert.are.equal(2, svc.ticks)
        assert.is_table(svc.last_sum)
        assert.is_true(svc.last_sum.round >= 1)
        assert.are.equal(0, svc.lifecycle.group.count)
        assert.is_nil(next(svc.threads))
    end)
end)
