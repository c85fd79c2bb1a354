-- A service whose AMQP broker does not answer at start-up: the report
-- server answers /status with 503 while the resource connects, and SIGTERM
-- ends the start-up at once (exit 0, stop hooks run) instead of waiting for
-- the connection timeout - with a broker that refuses connections and with
-- one that accepts them and never answers the handshake.
local cli = require "spec.support.cli"
local net = require "spec.support.net"

local SERVICE = [[
local tamarco = require "tamarco"
local amqp = require "tamarco.resources.amqp"
local svc = tamarco.service { name = "startup_probe", resources = { amqp = amqp.client() } }
svc.amqp:pull("jobs", function() end)
function svc:stop() self.logger:info("stop hook ran") end
return svc
]]

local function run_and_stop(amqp_port)
    local path = cli.write_temp(SERVICE)
    local report_port = net.free_port()
    local env = {
        TAMARCO__SYSTEM__RESOURCES__AMQP__HOST = "127.0.0.1",
        TAMARCO__SYSTEM__RESOURCES__AMQP__PORT = tostring(amqp_port),
        -- far beyond the stop budget: a start-up that waits for it is killed
        -- by the watchdog (exit != 0) and the stop hook never runs
        TAMARCO__SYSTEM__RESOURCES__AMQP__CONNECTION_TIMEOUT = "120",
        TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = tostring(report_port),
        TAMARCO__SYSTEM__STOP_TIMEOUT_SECONDS = "20",
    }
    -- the probe's answer goes to a file of its own (the host's log file
    -- offset would write over lines appended to its output)
    local answer = os.tmpname()
    local probe = ("curl -s -o /dev/null -w 'status=%%{http_code}' --max-time 5 http://127.0.0.1:%d/status >%s"):format(
        report_port, answer)
    local code, output = cli.run_until({ "run", path }, "starting service", "TERM", env, {
        { run = "sleep 1; " .. probe .. "; echo probed >>$out", wait = "probed" },
    })
    output = output .. "\n" .. cli.read_all(answer)
    os.remove(answer)
    os.remove(path)
    return code, output
end

describe("amqp start-up", function()
    it("answers 503 and stops on SIGTERM while the broker refuses connections", function()
        local code, output = run_and_stop(net.free_port())
        assert.matches("status=503", output, 1, true)
        assert.matches("Connection refused", output, 1, true)
        assert.matches("stop hook ran", output, 1, true)
        assert.are.equal(0, code, output)
    end)

    it("answers 503 and stops on SIGTERM while the broker accepts and never answers", function()
        local uv = require "luv"
        local silent = uv.new_tcp()
        assert(silent:bind("127.0.0.1", 0))
        assert(silent:listen(16, function() end))   -- the kernel completes the TCP handshake; nobody speaks
        local port = silent:getsockname().port
        local code, output = run_and_stop(port)
        silent:close()
        assert.matches("status=503", output, 1, true)
        assert.matches("stop hook ran", output, 1, true)
        assert.are.equal(0, code, output)
    end)
end)
