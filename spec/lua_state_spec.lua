-- What every Lua state of the host starts with.
local cli = require "spec.support.cli"

describe("a new Lua state", function()
    it("seeds math.random per process (instances of a fleet draw differently)", function()
        local service = cli.write_temp([[
            local tamarco = require "tamarco"
            io.stdout:write("draw=", math.random(1, 2 ^ 30), "\n")
            io.stdout:flush()
            local svc = tamarco.service { name = "draws" }
            function svc:post_start() svc:stop_service("done") end
            return svc
        ]])
        local draws = {}
        for i = 1, 2 do
            local code, output = cli.run({ "run", service }, { TAMARCO__SYSTEM__LOGGING__STDOUT = "false" })
            assert.equal(0, code, output)
            draws[i] = output:match("draw=(%d+)")
            assert.is_string(draws[i], output)
        end
        os.remove(service)
        assert.are_not.equal(draws[1], draws[2])
    end)
end)
