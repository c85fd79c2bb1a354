--- tamarco.ops.systemd: sd_notify(3) without libsystemd, for `Type=notify`
-- units. run_command sends READY=1 once post_start has run and STOPPING=1
-- when a stop starts. Without $NOTIFY_SOCKET every call is a no-op.
local c = require "tamarco.c.native"
local supervisor_pipe = require "tamarco.ops.supervisor_pipe"

local systemd = {}

--- notify(state) -> true if sent, false without NOTIFY_SOCKET, or nil, err.
-- state: "READY=1", "STOPPING=1", "STATUS=...", several joined by "\n".
function systemd.notify(state)
    -- a worker of `run --workers N` tells its supervisor instead: systemd
    -- only listens to the main process, which is READY when every worker is
    if supervisor_pipe.in_worker() then return supervisor_pipe.tell(state) end
    if not os.getenv("NOTIFY_SOCKET") then return false end
    local sent, err = c.sd_notify(state)
    if sent == nil then return nil, err end
    return sent == 1
end

return systemd
