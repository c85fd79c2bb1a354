--- Network helpers for specs.
local net = {}

--- A loopback TCP port that was free a moment ago (bound, then released).
function net.free_port()
    local uv = require "luv"
    local tcp = uv.new_tcp()
    assert(tcp:bind("127.0.0.1", 0))
    local port = tcp:getsockname().port
    tcp:close()
    return port
end

return net
