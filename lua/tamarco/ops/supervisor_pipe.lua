--- tamarco.ops.supervisor_pipe: a worker's side of the pipe to its supervisor
-- under `run --workers N` (TAMARCO_NOTIFY_FD, one state per line): readiness
-- for systemd (see tamarco.ops.systemd) and the report server's address (see
-- tamarco.ops.workers_report). The supervisor's side is in tamarco.ops.workers.
local supervisor_pipe = {}

local pipe

--- supervisor_pipe.in_worker() -> true when this process is a worker that
-- reports to a supervisor.
function supervisor_pipe.in_worker()
    return os.getenv("TAMARCO_NOTIFY_FD") ~= nil
end

--- supervisor_pipe.tell(line) -> true | nil, err (in a worker only).
function supervisor_pipe.tell(line)
    if not pipe then
        local uv = require "luv"
        pipe = uv.new_pipe(false)
        local opened, err = pipe:open(tonumber(os.getenv("TAMARCO_NOTIFY_FD")))
        if not opened then return nil, err end
    end
    local written, err = pipe:write(line .. "\n")
    if not written then return nil, err end
    return true
end

return supervisor_pipe
