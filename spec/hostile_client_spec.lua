-- Clients that attack the HTTP server, against a service running in its own
-- process: a crash shows as the child's exit instead of taking the spec
-- runner with it. After every attack the service must still be running and
-- answer a plain request.
local testing = require "tamarco.testing"
local tamarco = require "tamarco"
local cli = require "spec.support.cli"
local net = require "spec.support.net"
local cjson = require "cjson"
local uv = require "luv"

local SERVICE = "spec/fixtures/services/hostile_service.lua"

-- Starts the service in a child host; returns a table with port, output
-- (stdout and stderr so far) and exit ({code, signal} once it exited).
local function start_child()
    local child = { port = net.free_port(), output = "" }
    local env = {}
    for k, v in pairs(uv.os_environ()) do env[#env + 1] = k .. "=" .. v end
    env[#env + 1] = "TAMARCO__SYSTEM__RESOURCES__API__PORT=" .. child.port
    env[#env + 1] = "TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=0"
    local out, err = uv.new_pipe(false), uv.new_pipe(false)
    child.handle = assert(uv.spawn(cli.host, { args = { "run", SERVICE }, env = env, stdio = { 0, out, err } },
        function(code, signal)
            child.exit = { code = code, signal = signal }
        end))
    for _, pipe in ipairs({ out, err }) do
        pipe:read_start(function(_, chunk)
            if chunk then child.output = child.output .. chunk else pipe:close() end
        end)
    end
    local deadline = tamarco.now() + 20000
    while not child.output:find("http server listening", 1, true) do
        assert(not child.exit and tamarco.now() < deadline, "the service did not start:\n" .. child.output)
        tamarco.sleep(20)
    end
    return child
end

local function describe_exit(child)
    if not child.exit then return "running" end
    return ("exited with code %s, signal %s; output:\n%s"):format(child.exit.code, child.exit.signal,
        child.output:sub(-3000))
end

-- The service is alive and answers a plain request on a new connection.
local function assert_serving(child)
    tamarco.sleep(50)   -- a crash caused by the last bytes has happened by now
    assert.is_nil(child.exit, describe_exit(child))
    local c = assert(net.connect(child.port))
    c:send("GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    local r = c:response()
    c:close()
    assert.is_not_nil(r, describe_exit(child))
    assert.are.equal(200, r.status)
    assert.is_nil(child.exit, describe_exit(child))
end

-- Sends raw bytes (a list is sent as separate writes, 50 ms apart) and
-- returns the response and whether the server closed the connection.
local function exchange(child, parts)
    if type(parts) == "string" then parts = { parts } end
    local c = assert(net.connect(child.port))
    for i, part in ipairs(parts) do
        if i > 1 then tamarco.sleep(50) end
        c:send(part)
    end
    local r = c:response()
    local closed = c:wait_closed(3000)
    c:close()
    return r, closed, c.buf
end

local function get(child, path, headers)
    local r = exchange(child, "GET " .. path .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" .. (headers or "") .. "\r\n")
    return r
end

describe("a service under hostile clients", function()
    local child

    -- a test that killed the service has failed; the next one gets a new one
    before_each(function()
        if not child or child.exit then
            if child and not child.handle:is_closing() then child.handle:close() end
            testing.run(function() child = start_child() end)
        end
    end)

    teardown(function()
        if child and not child.exit then
            testing.run(function()
                child.handle:kill("sigterm")
                local deadline = tamarco.now() + 10000
                while not child.exit and tamarco.now() < deadline do tamarco.sleep(20) end
            end)
        end
        if child and not child.handle:is_closing() then child.handle:close() end
    end)

    it("survives Expect: 100-continue followed by a reset, hundreds of times", function()
        testing.run(function()
            for _ = 1, 400 do
                local c = net.connect(child.port)
                assert.is_not_nil(c, describe_exit(child))
                c:send_all("POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
                c:reset()
                if child.exit then break end
            end
            assert_serving(child)
        end)
    end)

    it("survives clients that close with 2000 pipelined requests unread", function()
        testing.run(function()
            -- answered at once, and by handlers that yield (requests in flight)
            for _, path in ipairs({ "/hello", "/sleep/1", "/hello", "/sleep/1" }) do
                local c = net.connect(child.port)
                assert.is_not_nil(c, describe_exit(child))
                c:send_all(string.rep("GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n", 2000))
                c:close()
                tamarco.sleep(100)
            end
            assert_serving(child)
        end)
    end)

    it("survives a client that leaves while slow pipelined requests are answered", function()
        testing.run(function()
            local c = assert(net.connect(child.port))
            c:send_all(string.rep("GET /sleep/300 HTTP/1.1\r\nHost: x\r\n\r\n", 2))
            tamarco.sleep(20)
            c:close()
            tamarco.sleep(700)   -- both handlers answer into the closed connection
            assert_serving(child)
        end)
    end)

    it("never serves one client's cached response to another with other credentials", function()
        testing.run(function()
            local alice = get(child, "/cached", "Authorization: Bearer alice-secret\r\n")
            assert.are.equal(200, alice.status)
            assert.are.equal("Bearer alice-secret", cjson.decode(alice.body).auth)
            for _, headers in ipairs({ "", "Authorization: Bearer bob\r\n", "Cookie: session=bob\r\n" }) do
                local r = get(child, "/cached", headers)
                assert.are.equal(200, r.status)
                assert.is_nil(r.body:find("alice-secret", 1, true), "served alice's response: " .. r.body)
            end
            local bob = get(child, "/cached", "Authorization: Bearer bob\r\n")
            assert.are.equal("Bearer bob", cjson.decode(bob.body).auth)
            assert_serving(child)
        end)
    end)

    -- Requests two parsers could read differently (RFC 9112): each is
    -- refused and its connection closed, whatever follows it.
    local smuggling = {
        { "a space before the colon of Content-Length", 400,
          "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello" },
        { "a space before the colon of Transfer-Encoding", 400,
          "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n" },
        { "chunk data not followed by CRLF", 400,
          "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX3\r\nabc\r\n0\r\n\r\n" },
        { "chunk data whose CRLF comes in the next read and is wrong", 400,
          { "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello",
            "XX3\r\nabc\r\n0\r\n\r\n" } },
        { "a NUL at the start of a header value", 400,
          "GET /hello HTTP/1.1\r\nHost: x\r\nOrigin: \0http://evil\r\n\r\n" },
        { "a control character inside a header value", 400,
          "GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\1b\r\n\r\n" },
        { "an HTTP/1.1 request without Host", 400, "GET /hello HTTP/1.1\r\n\r\n" },
        { "an HTTP/1.1 request with two Host fields", 400, "GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n" },
        { "a header value folded onto a second line (obs-fold)", 400,
          "GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n" },
        { "two Transfer-Encoding fields", 400,
          "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" },
        { "a transfer coding other than chunked", 501,
          "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" },
        { "an HTTP/2.0 request line", 505, "GET /hello HTTP/2.0\r\nHost: x\r\n\r\n" },
        { "an HTTP/9.9 request line", 505, "GET /hello HTTP/9.9\r\nHost: x\r\n\r\n" },
    }
    for _, case in ipairs(smuggling) do
        local what, status, bytes = case[1], case[2], case[3]
        it("refuses " .. what .. " with " .. status .. " and closes", function()
            testing.run(function()
                -- a valid request pipelined behind it must not be answered
                local parts = type(bytes) == "table" and { bytes[1], bytes[2] } or { bytes }
                parts[#parts] = parts[#parts] .. "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                local r, closed, rest = exchange(child, parts)
                assert.is_not_nil(r, describe_exit(child))
                assert.are.equal(status, r.status, r.head .. "\r\n\r\n" .. r.body)
                assert.is_true(closed)
                assert.are.equal("", rest)
                assert_serving(child)
            end)
        end)
    end

    it("drops the trailer fields of a chunked body: they never join the headers", function()
        testing.run(function()
            local r = exchange(child, "POST /headers HTTP/1.1\r\nHost: good\r\nTransfer-Encoding: chunked\r\n\r\n"
                .. "5\r\nhello\r\n0\r\nHost: evil\r\nX-Trailer: 1\r\nContent-Length: 99\r\n\r\n")
            assert.is_not_nil(r, describe_exit(child))
            assert.are.equal(200, r.status, r.body)
            local seen = cjson.decode(r.body)
            assert.are.equal("good", seen.host)
            assert.are.equal("hello", seen.body)
            assert.are.same({ "host", "transfer-encoding" }, seen.names)
            assert_serving(child)
        end)
    end)

    it("still answers HTTP/1.0 requests without Host", function()
        testing.run(function()
            local r = exchange(child, "GET /hello HTTP/1.0\r\n\r\n")
            assert.are.equal(200, r.status)
        end)
    end)
end)
