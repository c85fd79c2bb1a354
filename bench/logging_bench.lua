-- Logging throughput of the host: N records through the rotating file sink,
-- then N through the logstash UDP sink. Prints records/s for each and stops.
-- Run by bench/logging_throughput.sh.
local tamarco = require "tamarco"
local logging = require "tamarco.core.logging"
local log_sinks = require "tamarco.ops.log_sinks"
local timer = require "tamarco.c.timer"

local N = tonumber(os.getenv("RECORDS") or "200000")
local FILE = os.getenv("LOG_FILE") or "/tmp/tamarco-bench.log"
local UDP_PORT = tonumber(os.getenv("UDP_PORT") or "5959")

local svc = tamarco.service { name = "logbench", report_server = false }

local function rate(fn)
    local t0 = timer.hrtime()
    fn()
    return N / ((timer.hrtime() - t0) / 1e9)
end

function svc:post_start()
    tamarco.spawn(function()
        local log = logging.get_logger("bench")
        os.remove(FILE)
        local file_sink = logging.file_sink { path = FILE, max_bytes = 1e12, backup_count = 0 }
        logging.add_sink(file_sink)
        local file_rate = rate(function()
            for i = 1, N do log:info("request handled", { user = "alice", n = i, path = "/hello" }) end
        end)
        logging.remove_sink(file_sink)
        file_sink:close()

        local store = require("tamarco.core.settings").load { yaml_file = false, environ = false, dict = {
            system = { logging = { logstash = { enabled = true, host = "127.0.0.1", port = UDP_PORT,
                                                queue_size = N } } } } }
        local sinks = log_sinks.configure_from_settings(store:view("logbench"), logging)
        local udp_rate = rate(function()
            for i = 1, N do log:info("request handled", { user = "alice", n = i, path = "/hello" }) end
            log_sinks.close(sinks, logging, 60000)   -- until every datagram is out
        end)
        io.stderr:write(("tamarco-host file %.0f records/s\ntamarco-host udp %.0f records/s\n")
            :format(file_rate, udp_rate))
        self:stop_service("benchmark done")
    end)
end

return svc
