-- The logstash UDP sender (bindings/log_udp.c) when nobody listens yet: its
-- socket is connected, so the kernel reports an earlier datagram's ICMP "port
-- unreachable" on a later send; that must neither stop the sender nor lose
-- the records sent once logstash listens.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local log_udp = require "tamarco.c.log_udp"

describe("logstash UDP sender", function()
    it("keeps sending after the port refused datagrams, and delivers once a listener is there", function()
        local uv = require "luv"
        -- a port nobody listens on (yet)
        local probe = uv.new_udp()
        probe:bind("127.0.0.1", 0)
        local port = probe:getsockname().port
        probe:close()

        local sender = assert(log_udp.open("127.0.0.1", port, 1, "host", "Logstash", {}))
        local record = { ["@timestamp"] = "2026-11-30T10:00:00.000Z", level = "INFO", logger = "udp",
                         message = "nobody listens" }
        local refused
        testing.run(function()
            for _ = 1, 3 do
                for _ = 1, 10 do sender:send_logstash(record) end
                local _, err = sender:flush()
                refused = refused or err
                tamarco.sleep(20)   -- the ICMP answers arrive
            end
        end)
        assert.matches("refused", tostring(refused))

        local received = {}
        local server = uv.new_udp()
        assert(server:bind("127.0.0.1", port))
        server:recv_start(function(_, data) if data then received[#received + 1] = data end end)
        record.message = "heard"
        testing.run(function()
            for _ = 1, 100 do sender:send_logstash(record) end
            local dropped = sender:flush()
            assert.are.equal(0, dropped)
            local waited = 0
            while #received < 100 and waited < 2000 do tamarco.sleep(10) waited = waited + 10 end
        end)
        server:close()
        sender:close()
        assert.are.equal(100, #received)
        assert.matches('"heard"', received[100], 1, true)
    end)
end)
