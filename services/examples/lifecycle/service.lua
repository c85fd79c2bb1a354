-- Tamarco's lifecycle example: a line before and after each phase.
-- Run: tamarco-host run services/examples/lifecycle/service.lua (Ctrl-C stops it)
local tamarco = require "tamarco"

local svc = tamarco.service { name = "lifecycle_service" }

-- Each hook runs after the resources' part of its phase (start-up phases) or
-- before it (stop phases); the log line marks where the hook ran.
for _, phase in ipairs({ "pre_start", "start", "post_start", "stop", "post_stop" }) do
    svc[phase] = function(self)
        self.logger:info("before " .. phase)
        tamarco.sleep(10)   -- hooks may do I/O: they run in a task
        self.logger:info("after " .. phase)
    end
end

return svc
