--- Network helpers for specs: free ports and a raw HTTP/1.1 client on luv
-- (inside tasks), so that malformed, pipelined and partial bytes can be sent.
local scheduler = require "tamarco.c.scheduler"
local tamarco = require "tamarco"
local uv = require "luv"

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


local Conn = {}
Conn.__index = Conn

local function wake_waiter(c)
    local w = c.waiter
    if w then
        c.waiter = nil
        scheduler.wake(w)
    end
end

--- net.connect(port) -> a raw HTTP client connection (inside a task), or nil, err.
local function connect(port)
    local me = scheduler.current()
    local tcp = uv.new_tcp()
    local c = setmetatable({ tcp = tcp, buf = "", closed = false }, Conn)
    local err
    tcp:connect("127.0.0.1", port, function(e)
        err = e
        scheduler.wake(me)
    end)
    scheduler.suspend()
    if err then
        tcp:close()
        return nil, err
    end
    tcp:read_start(function(e, chunk)
        if e or not chunk then
            c.closed = true
            c.read_error = e
        else
            c.buf = c.buf .. chunk
        end
        wake_waiter(c)
    end)
    return c
end

function Conn:send(data)
    self.tcp:write(data)
end

--- conn:send_all(data): writes data and waits until the kernel took all of it
-- (a close right after a plain send would cancel what is still queued).
function Conn:send_all(data)
    local me, done, err = scheduler.current(), false, nil
    self.tcp:write(data, function(e)
        done, err = true, e
        scheduler.wake(me)
    end)
    if not done then scheduler.suspend() end
    return err == nil, err
end

-- Waits until pred(self) is true or the peer closed or timeout_ms passed.
function Conn:wait(pred, timeout_ms)
    local deadline = tamarco.now() + (timeout_ms or 5000)
    while not pred(self) do
        if self.closed then return pred(self) end
        local left = deadline - tamarco.now()
        if left <= 0 then return false end
        local me = scheduler.current()
        self.waiter = me
        local guard = uv.new_timer()
        guard:start(left, 0, function()
            guard:close()
            wake_waiter(self)
        end)
        scheduler.suspend()
        if not guard:is_closing() then
            guard:stop()
            guard:close()
        end
    end
    return true
end

-- Parses one response off the front of buf: returns response, rest.
function net.parse_response(buf, head_request)
    local head_end = buf:find("\r\n\r\n", 1, true)
    if not head_end then return nil end
    local head = buf:sub(1, head_end - 1)
    local status_line = head:match("^[^\r\n]*")
    local status = tonumber(status_line:match("^HTTP/1%.%d (%d%d%d)"))
    local headers, raw = {}, {}
    for line in (head .. "\r\n"):gmatch("([^\r\n]*)\r\n") do
        local k, v = line:match("^([^:]+):%s*(.*)$")
        if k then
            headers[k:lower()] = v
            raw[#raw + 1] = k
        end
    end
    local len = tonumber(headers["content-length"] or "0")
    if head_request then len = 0 end
    if #buf < head_end + 3 + len then return nil end
    local body = buf:sub(head_end + 4, head_end + 3 + len)
    return { status = status, headers = headers, body = body, header_names = raw, head = head },
        buf:sub(head_end + 4 + len)
end

--- Reads one complete response (nil on close/timeout).
function Conn:response(head_request, timeout_ms)
    local resp
    self:wait(function(c)
        local r, rest = net.parse_response(c.buf, head_request)
        if r then
            resp = r
            c.buf = rest
            return true
        end
        return false
    end, timeout_ms)
    return resp
end

--- Waits until the server closes the connection; true if it did.
function Conn:wait_closed(timeout_ms)
    return self:wait(function(c) return c.closed end, timeout_ms)
end

function Conn:close()
    if not self.tcp:is_closing() then self.tcp:close() end
end

--- net.ensure_fd_limit(n): raises the soft limit on open files to n if it can.
function net.ensure_fd_limit(wanted)
    local ffi = require "ffi"
    pcall(ffi.cdef, [[
        struct tamarco_spec_rlimit { unsigned long cur, max; };
        int getrlimit(int resource, struct tamarco_spec_rlimit *rl);
        int setrlimit(int resource, const struct tamarco_spec_rlimit *rl);
    ]])
    local RLIMIT_NOFILE = 7
    local rl = ffi.new("struct tamarco_spec_rlimit")
    if ffi.C.getrlimit(RLIMIT_NOFILE, rl) ~= 0 then return false end
    if rl.cur >= wanted then return true end
    rl.cur = math.min(wanted, tonumber(rl.max))
    ffi.C.setrlimit(RLIMIT_NOFILE, rl)
    return rl.cur >= wanted
end

net.connect = connect

--- conn:reset(): closes with a TCP reset (SO_LINGER 0) instead of a FIN.
function Conn:reset()
    if not self.tcp:is_closing() then self.tcp:close_reset() end
end

return net
