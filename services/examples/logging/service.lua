-- Tamarco's logging example: levels, extra fields, errors with tracebacks.
-- Run: tamarco-host run services/examples/logging/service.lua
-- With TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION the lines are JSON.
local tamarco = require "tamarco"

local svc = tamarco.service { name = "logging_service" }

svc:task_timer({ interval = 2000, autostart = true }, "report", function(self)
    self.logger:debug("debug lines show in DEVELOP and TESTING profiles only")
    self.logger:info("an info line with extra fields", { user = "alice", items = 3 })
    self.logger:warning("a warning", { disk_free_percent = 7.5 })
    local ok, err = pcall(function() error("something went wrong") end)
    if not ok then
        self.logger:exception("an error with its traceback", err, debug.traceback())
    end
end)

return svc
