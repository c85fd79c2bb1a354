local testing = require "tamarco.testing"

describe("lifecycle example", function()
    it("runs the hooks in Tamarco's order", function()
        local running = testing.run(function()
            local running = assert(testing.start_service("services/examples/lifecycle/service.lua"))
            running:stop()
            return running
        end)
        local seen = {}
        for _, record in ipairs(running.records) do
            if record.message:match("^before ") or record.message:match("^after ") then
                seen[#seen + 1] = record.message
            end
        end
        assert.are.same({
            "before pre_start", "after pre_start", "before start", "after start",
            "before post_start", "after post_start", "before stop", "after stop",
            "before post_stop", "after post_stop",
        }, seen)
    end)
end)
