local tamarco = require "tamarco"
local testing = require "tamarco.testing"

describe("logging example", function()
    it("logs levels, extra fields and the traceback of an error", function()
        local running = testing.run(function()
            local running = assert(testing.start_service("services/examples/logging/service.lua"))
            tamarco.sleep(50)
            running:stop()
            return running
        end)
        local info = running:logged("an info line with extra fields")[1]
        assert.are.equal("INFO", info.level)
        assert.are.equal("alice", info.user)
        assert.are.equal(3, info.items)
        assert.are.equal("logging_service", info.service_name)
        assert.are.equal(running.service.instance_id, info.service_instance_id)
        local err = running:logged("an error with its traceback")[1]
        assert.are.equal("ERROR", err.level)
        assert.matches("stack traceback", err.traceback)
        assert.are.equal(1, #running:logged("debug lines show"))
    end)
end)
