--- tamarco.systemd: sd_notify(3) without libsystemd, for `Type=notify`
-- units. run_command sends READY=1 once post_start has run and STOPPING=1
-- when a stop starts. Without $NOTIFY_SOCKET every call is a no-op.
local c = require "tamarco.c.native"

local systemd = {}

-- A worker of `run --workers N` tells its supervisor instead (a pipe on
-- TAMARCO_NOTIFY_FD, one state per line): systemd only listens to the main
-- process, and the supervisor is READY when every worker is.
local supervisor_pipe

local function tell_supervisor(fd, state)
    if not supervisor_pipe then
        local uv = require "luv"
        supervisor_pipe = uv.new_pipe(false)
        local opened, err = supervisor_pipe:open(fd)
        if not opened then return nil, err end
    end
    local written, err = supervisor_pipe:write(state .. "\n")
    if not written then return nil, err end
    return true
end

--- notify(state) -> true if sent, false without NOTIFY_SOCKET, or nil, err.
-- state: "READY=1", "STOPPING=1", "STATUS=...", several joined by "\n".
function systemd.notify(state)
    local supervisor_fd = tonumber(os.getenv("TAMARCO_NOTIFY_FD") or "")
    if supervisor_fd then return tell_supervisor(supervisor_fd, state) end
    if not os.getenv("NOTIFY_SOCKET") then return false end
    local sent, err = c.sd_notify(state)
    if sent == nil then return nil, err end
    return sent == 1
end

return systemd
