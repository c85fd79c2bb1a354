-- systemd Type=notify: a child host sends READY=1 after post_start and
-- STOPPING=1 when it stops, to a real AF_UNIX datagram socket (made here
-- through LuaJIT's FFI into libc).
local cli = require "spec.support.cli"
local ffi = require "ffi"

pcall(ffi.cdef, [[
int socket(int domain, int type, int protocol);
int bind(int fd, const void *addr, unsigned int len);
long recv(int fd, void *buf, size_t len, int flags);
int close(int fd);
int unlink(const char *path);
]])

local AF_UNIX, SOCK_DGRAM, MSG_DONTWAIT = 1, 2, 0x40

-- listen(path) -> receiver with :drain() -> { datagrams } and :close()
local function listen(path)
    local fd = ffi.C.socket(AF_UNIX, SOCK_DGRAM, 0)
    assert(fd >= 0, "socket() failed")
    local addr = ffi.new("char[110]")   -- struct sockaddr_un
    ffi.cast("unsigned short *", addr)[0] = AF_UNIX
    ffi.copy(addr + 2, path, #path)
    if path:sub(1, 1) == "@" then addr[2] = 0 else ffi.C.unlink(path) end
    assert(ffi.C.bind(fd, addr, 2 + #path) == 0, "bind() failed for " .. path)
    local buf = ffi.new("char[4096]")
    return {
        drain = function()
            local got = {}
            while true do
                local n = tonumber(ffi.C.recv(fd, buf, 4096, MSG_DONTWAIT))
                if n < 0 then break end
                got[#got + 1] = ffi.string(buf, n)
            end
            return got
        end,
        close = function()
            ffi.C.close(fd)
            if path:sub(1, 1) ~= "@" then ffi.C.unlink(path) end
        end,
    }
end

local SERVICE = [[
local tamarco = require "tamarco"
local svc = tamarco.service { name = "notified", report_server = false }
function svc:post_start() self.logger:info("post_start ran") end
return svc
]]

describe("systemd notify", function()
    local service_path
    setup(function() service_path = cli.write_temp(SERVICE) end)
    teardown(function() os.remove(service_path) end)

    for _, kind in ipairs({ "path", "abstract" }) do
        it("sends READY=1 after post_start and STOPPING=1 on SIGTERM (" .. kind .. " socket)", function()
            local name = os.tmpname()
            os.remove(name)
            local path = kind == "path" and name .. ".sock" or "@tamarco-spec-" .. name:match("[^/]+$")
            local receiver = listen(path)
            local code, output = cli.run_until({ "run", service_path }, "service started", "TERM",
                { NOTIFY_SOCKET = path })
            local got = receiver.drain()
            receiver.close()
            assert.are.equal(0, code, output)
            assert.are.same({ "READY=1", "STOPPING=1" }, got)
            -- READY came after post_start: the log says so before "service started"
            assert.is_truthy(output:find("post_start ran", 1, true))
        end)
    end

    it("with --workers, the supervisor alone sends READY=1 once every worker is ready", function()
        local path = os.tmpname() .. ".sock"
        local receiver = listen(path)
        local code, output = cli.run_until({ "run", service_path, "--workers", "2" }, "all 2 workers ready", "TERM",
            { NOTIFY_SOCKET = path })
        local got = receiver.drain()
        receiver.close()
        os.remove(path:sub(1, -6))
        assert.are.equal(0, code, output)
        assert.are.same({ "READY=1", "STOPPING=1" }, got)
        local ready_at = assert(output:find("all 2 workers ready", 1, true), output)
        local _, post_starts = output:sub(1, ready_at):gsub("post_start ran", "")
        assert.are.equal(2, post_starts, output)
    end)

    it("is a no-op without NOTIFY_SOCKET, and reports a bad socket", function()
        local systemd = require "tamarco.ops.systemd"
        if os.getenv("NOTIFY_SOCKET") == nil then
            assert.is_false(systemd.notify("READY=1"))
        end
        local native = require "tamarco.core.native"
        local code, output = cli.run({ "test", cli.write_temp([[
            describe("x", function() it("y", function()
                local ok, err = require("tamarco.ops.systemd").notify("READY=1")
                assert.is_nil(ok)
                assert.is_string(err)
            end) end)
        ]], "_spec.lua") }, { NOTIFY_SOCKET = "/nonexistent/socket" })
        assert.are.equal(0, code, output)
        assert.are.equal(0, native.C.tamarco_sd_notify("READY=1") ~= 0 and os.getenv("NOTIFY_SOCKET") == nil and 1 or 0)
    end)
end)
