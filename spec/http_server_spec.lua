-- The HTTP server resource, end to end: a real service in the host, a raw
-- TCP client on the same loop (luv), so that malformed, pipelined and
-- partial bytes can be sent.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local scheduler = require "tamarco.c.scheduler"
local http = require "tamarco.resources.http"
local http_server = require "tamarco.resources.http_server"
local cjson = require "cjson"
local uv = require "luv"
local net = require "spec.support.net"

local connect, ensure_fd_limit = net.connect, net.ensure_fd_limit

local function json_of(resp) return cjson.decode(resp.body) end

-- One request on a new connection.
local function request(port, raw, head_request)
    local c = assert(connect(port))
    c:send(raw)
    local resp = c:response(head_request)
    c:close()
    return resp
end

local function get(port, path, extra)
    return request(port, "GET " .. path .. " HTTP/1.1\r\nHost: test\r\n" .. (extra or "") .. "\r\n")
end

---------------------------------------------------------------------------
-- the service under test
---------------------------------------------------------------------------

local function make_service(name, options)
    local svc = tamarco.service { name = name, report_server = false, resources = { api = http.server(options) } }
    local api = svc.api
    api:get("/hello/{name}", function(req) return 200, { message = "hello " .. req.params.name } end)
    api:get("/users/me", function() return 200, { who = "me" } end)
    api:get("/users/{id}", function(req) return 200, { id = req.params.id } end)
    api:get("/users/{id}/posts/{post}", function(req)
        return 200, { id = req.params.id, post = req.params.post }
    end)
    api:post("/users/{id}", function(req) return 201, { created = req.params.id } end)
    api:get("/query", function(req) return 200, { query = req.query, qs = req.query_string } end)
    api:post("/echo", function(req)
        return 200, req.body, { ["Content-Type"] = req.headers["content-type"] or "application/octet-stream" }
    end)
    api:post("/json", function(req)
        local ok, value = pcall(req.json, req)
        if not ok then return 422, { error = tostring(value) } end
        return 200, { got = value }
    end)
    api:post("/json-strict", function(req) return 200, { got = req:json() } end)
    api:get("/headers", function(req)
        return 200, { agent = req.headers["User-Agent"], custom = req:header("x-CUSTOM") }
    end)
    api:get("/sleep/{ms}", function(req)
        tamarco.sleep(tonumber(req.params.ms))
        return 200, "slept " .. req.params.ms
    end)
    api:get("/text", function() return 200, "plain text" end)
    api:get("/echo-header-names", function(req)
        local copy = {}
        for k, v in pairs(req.headers) do copy[k] = v end
        return 200, copy
    end)
    api:get("/boom", function()
        local function deep_failure() error("kaboom in handler") end
        deep_failure()
    end)
    api:get("/teapot", function() return 418, "short and stout", { ["X-Tea"] = "earl grey" } end)
    api:get("/empty", function() end)
    local big = string.rep("0123456789abcdef", 256 * 1024)   -- 4 MiB
    api:get("/big", function() return 200, big end)
    local counter = 0
    api:get("/cached/{k}", function(req)
        counter = counter + 1
        return 200, { n = counter, k = req.params.k }
    end, { cache_ttl = 0.3, cache_headers = { "x-tenant" } })
    local private_counter = 0
    api:get("/cached-private/{mode}", function(req)
        private_counter = private_counter + 1
        local headers = { ["Cache-Control"] = req.params.mode == "private" and "private, max-age=60" or nil,
            ["Set-Cookie"] = req.params.mode == "cookie" and "session=1" or nil }
        return 200, { n = private_counter }, headers
    end, { cache_ttl = 60 })
    local vary_counter = 0
    api:get("/cached-vary", function(req)
        vary_counter = vary_counter + 1
        return 200, { n = vary_counter, auth = req.headers["authorization"] }
    end, { cache_ttl = 60, cache_headers = { "Authorization" } })
    return svc
end

local function start(svc, resource_settings)
    local settings = { system = { resources = { api = resource_settings } } }
    local running, err, code = testing.start_service(svc, { settings = settings })
    assert(running, "service did not start: " .. tostring(code) .. " " .. tostring(err))
    return running
end

describe("http_server resource", function()
    local running, svc, port

    setup(function()
        testing.run(function()
            svc = make_service("httptest")
            running = start(svc, { port = 0, max_body_size = 4096, max_header_size = 2048 })
            port = svc.api.port
        end)
    end)

    teardown(function()
        if running then testing.run(function() running:stop() end) end
    end)

    it("routes with path parameters; exact segments win over parameters", function()
        testing.run(function()
            local r = get(port, "/hello/world")
            assert.are.equal(200, r.status)
            assert.are.equal("application/json", r.headers["content-type"])
            assert.are.same({ message = "hello world" }, json_of(r))
            assert.are.same({ who = "me" }, json_of(get(port, "/users/me")))
            assert.are.same({ id = "42" }, json_of(get(port, "/users/42")))
            assert.are.same({ id = "a b", post = "7" }, json_of(get(port, "/users/a%20b/posts/7")))
            r = request(port, "POST /users/9 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert.are.equal(201, r.status)
            assert.are.same({ created = "9" }, json_of(r))
        end)
    end)

    it("decodes the query string lazily", function()
        testing.run(function()
            local r = get(port, "/query?a=1&b=x+y&a=2&c=%2F%20&flag")
            assert.are.same({ query = { a = { "1", "2" }, b = "x y", c = "/ ", flag = "" },
                qs = "a=1&b=x+y&a=2&c=%2F%20&flag" }, json_of(r))
            assert.are.same({ query = {}, qs = "" }, json_of(get(port, "/query")))
        end)
    end)

    it("answers 404 for no route and 405 with Allow for a wrong method", function()
        testing.run(function()
            local r = get(port, "/nope")
            assert.are.equal(404, r.status)
            assert.are.same({ error = "not found" }, json_of(r))
            r = request(port, "DELETE /users/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert.are.equal(405, r.status)
            assert.are.equal("GET, POST, HEAD, OPTIONS", r.headers["allow"])
        end)
    end)

    it("sends tables as JSON, strings as text, custom statuses and headers", function()
        testing.run(function()
            local r = get(port, "/text")
            assert.are.equal("text/plain; charset=utf-8", r.headers["content-type"])
            assert.are.equal("plain text", r.body)
            r = get(port, "/teapot")
            assert.are.equal(418, r.status)
            assert.are.equal("earl grey", r.headers["x-tea"])
            r = get(port, "/empty")
            assert.are.equal(204, r.status)
            assert.is_nil(r.headers["content-length"])
            assert.is_truthy(r.headers["date"]:match("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$"))
        end)
    end)

    it("keeps header names longer than 255 bytes whole", function()
        testing.run(function()
            local long = "X-" .. string.rep("Long", 100)
            local r = get(port, "/echo-header-names", long .. ": yes\r\n")
            assert.are.equal(200, r.status)
            assert.are.equal("yes", json_of(r)[long:lower()])
        end)
    end)

    it("reads headers case-insensitively", function()
        testing.run(function()
            local r = get(port, "/headers", "User-Agent: spec/1.0\r\nX-Custom: yes\r\n")
            assert.are.same({ agent = "spec/1.0", custom = "yes" }, json_of(r))
        end)
    end)

    it("decodes JSON bodies; req:json() raises a catchable error on bad JSON", function()
        testing.run(function()
            local body = '{"x":[1,2],"y":"z"}'
            local r = request(port, "POST /json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                .. "Content-Length: " .. #body .. "\r\n\r\n" .. body)
            assert.are.equal(200, r.status)
            assert.are.same({ got = { x = { 1, 2 }, y = "z" } }, json_of(r))
            body = "{not json"
            r = request(port, "POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body)
            assert.are.equal(422, r.status)
            assert.matches("invalid JSON body", json_of(r).error)
            -- not caught by the handler: a 400 with the reason
            r = request(port, "POST /json-strict HTTP/1.1\r\nHost: x\r\nContent-Length: " .. #body .. "\r\n\r\n" .. body)
            assert.are.equal(400, r.status)
            assert.matches("invalid JSON body", json_of(r).error)
        end)
    end)

    it("keeps a connection alive for several requests", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("GET /hello/one HTTP/1.1\r\nHost: x\r\n\r\n")
            local r1 = c:response()
            c:send("GET /hello/two HTTP/1.1\r\nHost: x\r\n\r\n")
            local r2 = c:response()
            assert.are.same({ message = "hello one" }, json_of(r1))
            assert.are.same({ message = "hello two" }, json_of(r2))
            assert.is_nil(r1.headers["connection"])
            assert.is_false(c.closed)
            c:close()
        end)
    end)

    it("answers pipelined requests in order even when the first is slowest", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("GET /sleep/80 HTTP/1.1\r\nHost: x\r\n\r\n"
                .. "GET /sleep/1 HTTP/1.1\r\nHost: x\r\n\r\n"
                .. "GET /hello/third HTTP/1.1\r\nHost: x\r\n\r\n")
            local a, b, d = c:response(), c:response(), c:response()
            assert.are.equal("slept 80", a.body)
            assert.are.equal("slept 1", b.body)
            assert.are.same({ message = "hello third" }, json_of(d))
            c:close()
        end)
    end)

    it("pauses reading beyond max_pipeline requests in flight and catches up", function()
        testing.run(function()
            local c = assert(connect(port))
            local parts = {}
            for i = 1, 150 do parts[i] = "GET /sleep/" .. (i % 3) .. " HTTP/1.1\r\nHost: x\r\n\r\n" end
            c:send(table.concat(parts))
            for i = 1, 150 do
                local r = c:response()
                assert.are.equal("slept " .. (i % 3), r and r.body)
            end
            c:close()
        end)
    end)

    it("writes large responses to slow readers completely", function()
        testing.run(function()
            local c = assert(connect(port))
            c.tcp:read_stop()
            c:send("GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /text HTTP/1.1\r\nHost: x\r\n\r\n")
            tamarco.sleep(50)   -- the kernel buffers fill up: the rest waits in uv_write
            c.tcp:read_start(function(e, chunk)
                if chunk then c.buf = c.buf .. chunk else c.closed = true end
                local w = c.waiter
                if w then c.waiter = nil scheduler.wake(w) end
            end)
            local r = c:response(false, 10000)
            assert.are.equal(4 * 1024 * 1024, #r.body)
            assert.are.equal("plain text", c:response().body)
            c:close()
        end)
    end)

    it("reads chunked request bodies", function()
        testing.run(function()
            local r = request(port, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                .. "Content-Type: text/x-test\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            assert.are.equal(200, r.status)
            assert.are.equal("hello world", r.body)
            assert.are.equal("text/x-test", r.headers["content-type"])
        end)
    end)

    it("answers Expect: 100-continue before the body is sent", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            assert.is_true(c:wait(function(conn) return conn.buf:find("\r\n\r\n", 1, true) ~= nil end))
            assert.are.equal("HTTP/1.1 100 Continue\r\n\r\n", c.buf)
            c.buf = ""
            c:send("hello")
            assert.are.equal("hello", c:response().body)
            c:close()
        end)
    end)

    it("rejects invalid chunked encoding with a 400", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
            local r = c:response()
            assert.are.equal(400, r.status)
            assert.is_true(c:wait_closed())
            c:close()
        end)
    end)

    it("answers HEAD with the headers of GET and no body", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("HEAD /hello/head HTTP/1.1\r\nHost: x\r\n\r\n")
            local r = c:response(true)
            assert.are.equal(200, r.status)
            assert.are.equal(tostring(#'{"message":"hello head"}'), r.headers["content-length"])
            -- no body bytes came: the next response starts right away
            c:send("GET /text HTTP/1.1\r\nHost: x\r\n\r\n")
            local r2 = c:response()
            assert.are.equal("plain text", r2.body)
            c:close()
        end)
    end)

    it("closes HTTP/1.0 connections without keep-alive, keeps them with it", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("GET /text HTTP/1.0\r\n\r\n")
            local r = c:response()
            assert.are.equal("plain text", r.body)
            assert.are.equal("close", r.headers["connection"])
            assert.is_true(c:wait_closed())
            c:close()
            c = assert(connect(port))
            c:send("GET /text HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            r = c:response()
            assert.are.equal("keep-alive", r.headers["connection"])
            c:send("GET /hello/again HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert.are.same({ message = "hello again" }, json_of(c:response()))
            c:close()
        end)
    end)

    it("answers a malformed request line with 400, closes, and keeps serving", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("THIS IS NOT HTTP\r\n\r\n")
            local r = c:response()
            assert.are.equal(400, r.status)
            assert.are.same({ error = "bad request" }, json_of(r))
            assert.is_true(c:wait_closed())
            c:close()
            assert.are.equal(200, get(port, "/hello/after").status)
        end)
    end)

    it("answers an oversize header with 431", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("GET /hello/x HTTP/1.1\r\nHost: x\r\nX-Big: " .. string.rep("a", 4000) .. "\r\n\r\n")
            local r = c:response()
            assert.are.equal(431, r.status)
            assert.is_true(c:wait_closed())
            c:close()
        end)
    end)

    it("answers an oversize body with 413 (declared or chunked)", function()
        testing.run(function()
            local c = assert(connect(port))
            c:send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n")
            local r = c:response()
            assert.are.equal(413, r.status)
            assert.is_true(c:wait_closed())
            c:close()
            c = assert(connect(port))
            c:send("POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ = 1, 3 do c:send("800\r\n" .. string.rep("b", 2048) .. "\r\n") end
            r = c:response()
            assert.are.equal(413, r.status)
            c:close()
        end)
    end)

    it("survives a client that disconnects before its response", function()
        testing.run(function()
            local before = svc.api:server_stats()
            -- closing with unread bytes makes the kernel reset the connection:
            -- the server sees it gone while the handler still sleeps
            local c = assert(connect(port))
            c.tcp:read_stop()
            c:send("GET /text HTTP/1.1\r\nHost: x\r\n\r\nGET /sleep/60 HTTP/1.1\r\nHost: x\r\n\r\n")
            tamarco.sleep(15)
            c:close()
            tamarco.sleep(100)
            local after = svc.api:server_stats()
            assert.are.equal(before.dropped_responses + 1, after.dropped_responses)
            assert.are.equal(before.connections, after.connections)
            -- a client that half-closes after its request still gets the answer
            c = assert(connect(port))
            c:send("GET /sleep/20 HTTP/1.1\r\nHost: x\r\n\r\n")
            c.tcp:shutdown()
            assert.are.equal("slept 20", c:response().body)
            assert.is_true(c:wait_closed())
            c:close()
            assert.are.equal(200, get(port, "/hello/still").status)
        end)
    end)

    it("turns a handler error into a 500 JSON body and logs the traceback", function()
        testing.run(function()
            local r = get(port, "/boom")
            assert.are.equal(500, r.status)
            assert.are.same({ error = "internal server error" }, json_of(r))
            assert.is_nil(r.body:find("kaboom"))
            local logged = running:logged("handler of GET /boom failed")
            assert.are.equal(1, #logged)
            assert.matches("kaboom in handler", logged[1].extra and logged[1].extra.error
                or tostring(logged[1].error))
            assert.matches("deep_failure", tostring(logged[1].traceback))
        end)
    end)

    it("answers CORS preflights and adds CORS headers", function()
        testing.run(function()
            local r = request(port, "OPTIONS /users/5 HTTP/1.1\r\nHost: x\r\nOrigin: http://app.example\r\n"
                .. "Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\r\n")
            assert.are.equal(204, r.status)
            assert.are.equal("*", r.headers["access-control-allow-origin"])
            assert.are.equal("GET, POST, HEAD, OPTIONS", r.headers["access-control-allow-methods"])
            assert.are.equal("content-type", r.headers["access-control-allow-headers"])
            r = get(port, "/hello/cors", "Origin: http://app.example\r\n")
            assert.are.equal("*", r.headers["access-control-allow-origin"])
            r = get(port, "/hello/nocors")
            assert.is_nil(r.headers["access-control-allow-origin"])
        end)
    end)

    it("caches responses for cache_ttl, keyed by URL and selected headers", function()
        testing.run(function()
            local r1 = get(port, "/cached/a")
            local r2 = get(port, "/cached/a")
            assert.are.equal("MISS", r1.headers["x-cache"])
            assert.are.equal("HIT", r2.headers["x-cache"])
            assert.are.equal(r1.body, r2.body)
            local r3 = get(port, "/cached/a", "X-Tenant: other\r\n")
            assert.are.equal("MISS", r3.headers["x-cache"])
            assert.are_not.equal(r1.body, r3.body)
            tamarco.sleep(350)
            local r4 = get(port, "/cached/a")
            assert.are.equal("MISS", r4.headers["x-cache"])
        end)
    end)

    it("never serves or stores a request with Authorization or Cookie unless the key varies on it", function()
        testing.run(function()
            local alice = get(port, "/cached/creds", "Authorization: Bearer alice-secret\r\n")
            assert.is_nil(alice.headers["x-cache"])
            local anonymous = get(port, "/cached/creds")
            assert.are.equal("MISS", anonymous.headers["x-cache"])
            assert.are_not.equal(alice.body, anonymous.body)
            local bob = get(port, "/cached/creds", "Authorization: Bearer bob\r\n")
            assert.is_nil(bob.headers["x-cache"])
            assert.are_not.equal(anonymous.body, bob.body)
            local cookie = get(port, "/cached/creds", "Cookie: session=carol\r\n")
            assert.is_nil(cookie.headers["x-cache"])
            assert.are_not.equal(anonymous.body, cookie.body)
            assert.are.equal("HIT", get(port, "/cached/creds").headers["x-cache"])
            -- a route whose key varies on Authorization caches per credential
            local a1 = get(port, "/cached-vary", "Authorization: Bearer alice\r\n")
            local a2 = get(port, "/cached-vary", "authorization: Bearer alice\r\n")
            local b1 = get(port, "/cached-vary", "Authorization: Bearer bob\r\n")
            assert.are.equal("MISS", a1.headers["x-cache"])
            assert.are.equal("HIT", a2.headers["x-cache"])
            assert.are.equal(a1.body, a2.body)
            assert.are.equal("MISS", b1.headers["x-cache"])
            assert.are.equal("Bearer bob", json_of(b1).auth)
        end)
    end)

    it("keeps responses marked Cache-Control private or setting a cookie out of the cache", function()
        testing.run(function()
            for _, mode in ipairs({ "private", "cookie" }) do
                local r1 = get(port, "/cached-private/" .. mode)
                local r2 = get(port, "/cached-private/" .. mode)
                assert.is_nil(r1.headers["x-cache"])
                assert.is_nil(r2.headers["x-cache"])
                assert.are_not.equal(r1.body, r2.body)
            end
            local p1 = get(port, "/cached-private/public")
            local p2 = get(port, "/cached-private/public")
            assert.are.equal("HIT", p2.headers["x-cache"])
            assert.are.equal(p1.body, p2.body)
        end)
    end)

    it("keeps counters per route, method and status", function()
        local stat = svc.api.stats.routes["GET /hello/{name}"]
        assert.is_true(stat.count >= 5)
        assert.is_true(stat.statuses[200] >= 5)
        assert.is_true(stat.duration_sum > 0)
        assert.is_true(svc.api.stats.unmatched.statuses[404] >= 1)
        assert.are.equal(0, svc.api.stats.in_flight)
    end)

    it("keeps a bounded pool of request structs after a burst of concurrent requests", function()
        testing.run(function()
            local chttp = require "tamarco.c.http_server"
            assert.is_true(ensure_fd_limit(4500), "needs ulimit -n >= 4500")
            local conns = {}
            for i = 1, 600 do
                conns[i] = assert(connect(port))
                conns[i]:send("GET /sleep/500 HTTP/1.1\r\nHost: x\r\n\r\n")
            end
            for i = 1, 600 do
                assert.are.equal(200, conns[i]:response().status)
                conns[i]:close()
            end
            collectgarbage()
            assert.is_true(chttp.pool_stats() <= 256, "pooled request structs: " .. chttp.pool_stats())
        end)
    end)

    it("holds 2000 idle connections and still serves", function()
        testing.run(function()
            assert.is_true(ensure_fd_limit(4500), "needs ulimit -n >= 4500")
            local conns = {}
            for i = 1, 2000 do conns[i] = assert(connect(port)) end
            tamarco.sleep(50)
            assert.is_true(svc.api:server_stats().connections >= 2000)
            assert.are.equal(200, get(port, "/hello/busy").status)
            for _, c in ipairs(conns) do c:close() end
            tamarco.sleep(50)
            assert.is_true(svc.api:server_stats().connections < 10)
        end)
    end)
end)

describe("http_server limits and timeouts", function()
    it("drops a client that sends its header too slowly, one byte at a time", function()
        testing.run(function()
            local svc = make_service("slowtest")
            local running = start(svc, { port = 0, header_timeout = 0.3, idle_timeout = 0.5 })
            local port = svc.api.port
            local c = assert(connect(port))
            local started = tamarco.now()
            local msg = "GET /hello/slow HTTP/1.1\r\nHost: x\r\n\r\n"
            for i = 1, #msg do
                if c.closed then break end
                c:send(msg:sub(i, i))
                tamarco.sleep(50)
            end
            assert.is_true(c:wait_closed(2000))
            local took = tamarco.now() - started
            assert.is_true(took >= 250 and took < 1500, "closed after " .. took .. " ms")
            assert.matches("^HTTP/1.1 408 Request Timeout\r\n", c.buf)
            c:close()
            -- an idle keep-alive connection is closed after idle_timeout
            c = assert(connect(port))
            c:send("GET /text HTTP/1.1\r\nHost: x\r\n\r\n")
            assert.are.equal(200, c:response().status)
            started = tamarco.now()
            assert.is_true(c:wait_closed(2000))
            took = tamarco.now() - started
            assert.is_true(took >= 400 and took < 1500, "idle close after " .. took .. " ms")
            c:close()
            assert.is_true(svc.api:server_stats().timeouts >= 2)
            running:stop()
        end)
    end)

    it("refuses connections beyond max_connections", function()
        testing.run(function()
            local svc = make_service("maxconn")
            local running = start(svc, { port = 0, max_connections = 2 })
            local port = svc.api.port
            local a, b = assert(connect(port)), assert(connect(port))
            tamarco.sleep(20)
            local c = assert(connect(port))
            assert.is_true(c:wait_closed(1000))
            c:close()
            a:send("GET /text HTTP/1.1\r\nHost: x\r\n\r\n")
            assert.are.equal(200, a:response().status)
            a:close()
            b:close()
            assert.is_true(svc.api:server_stats().rejected >= 1)
            running:stop()
        end)
    end)

    it("stops gracefully: in-flight requests finish, new connections are refused", function()
        testing.run(function()
            local svc = make_service("draintest")
            local running = start(svc, { port = 0, drain_timeout = 2 })
            local port = svc.api.port
            local c = assert(connect(port))
            c:send("GET /sleep/150 HTTP/1.1\r\nHost: x\r\n\r\n")
            local idle = assert(connect(port))
            tamarco.sleep(20)
            local stopped = false
            local me = scheduler.current()
            scheduler.on_exit(tamarco.spawn(function() running:stop() end), function()
                stopped = true
                scheduler.wake(me)
            end)
            local r = c:response()
            assert.are.equal(200, r.status)
            assert.are.equal("slept 150", r.body)
            assert.are.equal("close", r.headers["connection"])
            assert.is_true(c:wait_closed(1000))
            assert.is_true(idle:wait_closed(1000))
            if not stopped then scheduler.suspend() end
            assert.is_true(stopped)
            local refused = connect(port)
            assert.is_nil(refused)
            c:close()
            idle:close()
        end)
    end)

    it("force-closes connections still busy after the drain timeout", function()
        testing.run(function()
            local svc = make_service("draintimeout")
            local running = start(svc, { port = 0, drain_timeout = 0.1 })
            local c = assert(connect(svc.api.port))
            c:send("GET /sleep/400 HTTP/1.1\r\nHost: x\r\n\r\n")
            tamarco.sleep(20)
            local started = tamarco.now()
            running:stop()
            local took = tamarco.now() - started
            assert.is_true(took < 350, "stop took " .. took .. " ms")
            assert.is_true(c:wait_closed(1000))
            assert.are.equal("", c.buf)
            c:close()
            tamarco.sleep(450)   -- the handler finishes into a closed connection
        end)
    end)

    it("fails to start with a bind error (exit code 11) when the port is taken", function()
        testing.run(function()
            local blocker = uv.new_tcp()
            assert(blocker:bind("127.0.0.1", 0))
            assert(blocker:listen(16, function() end))
            local port = blocker:getsockname().port
            local svc = make_service("bindtest")
            local running, err, code = testing.start_service(svc,
                { settings = { system = { resources = { api = { port = port } } } } })
            blocker:close()
            assert.is_nil(running)
            assert.are.equal(11, code)
            assert.matches("cannot listen on 127.0.0.1:" .. port .. ": address already in use", tostring(err))
            assert.are.equal("bind", err.kind)
            assert.are.equal("EADDRINUSE", err.code)
        end)
    end)

    it("exposes http_server.error for handlers", function()
        local ok, err = pcall(http_server.error, 409, "conflict!")
        assert.is_false(ok)
        assert.is_true(http_server.is_error(err))
        assert.are.equal(409, err.status)
        assert.are.equal("conflict!", tostring(err))
    end)
end)

describe("route patterns", function()
    it("accepts Sanic-style <name> parameters and refuses typed ones at definition", function()
        testing.run(function()
            local svc = tamarco.service { name = "sanic", report_server = false, resources = { api = http.server() } }
            svc.api:get("/users/<id>", function(req) return 200, { id = req.params.id } end)
            svc.api:get("/orgs/<org:str>/teams/{team}", function(req)
                return 200, { org = req.params.org, team = req.params.team }
            end)
            local ok, err = pcall(svc.api.get, svc.api, "/items/<n:int>", function() end)
            assert.is_false(ok)
            assert.matches("typed parameter <n:int> is not supported", err)
            ok, err = pcall(svc.api.get, svc.api, "/items/x<n>", function() end)
            assert.is_false(ok)
            assert.matches("a segment is either literal or a whole", err)
            local running = start(svc, { port = 0 })
            local p = svc.api.port
            assert.are.same({ id = "5" }, json_of(get(p, "/users/5")))
            assert.are.same({ org = "acme", team = "core" }, json_of(get(p, "/orgs/acme/teams/core")))
            assert.are.equal(404, get(p, "/users/5/extra").status)
            running:stop()
        end)
    end)
end)

    it("matches literal segments first, backtracks to parameters, and keeps empty segments apart", function()
        local api = http.server()
        local function h() end
        api:get("/", h)
        api:get("/a/b/c", h)
        api:get("/a/{x}/d", h)
        api:get("/{p}/b/e", h)
        api:get("/a/", h)
        api:get("/files/{name}/", h)
        api:get("/{one}/{two}", h)
        local function match(path)
            local node, captured = api:match(path)
            if not node then return nil end
            local route = node.methods.GET
            return route.pattern, captured or {}
        end
        assert.are.same({ "/", {} }, { match("/") })
        assert.are.same({ "/a/b/c", {} }, { match("/a/b/c") })
        -- the literal "b" leads nowhere for ".../d": back to {x}
        assert.are.same({ "/a/{x}/d", { "b" } }, { match("/a/b/d") })
        -- the literal "a" leads nowhere for ".../e": back to {p}
        assert.are.same({ "/{p}/b/e", { "a" } }, { match("/a/b/e") })
        assert.are.same({ "/a/", {} }, { match("/a/") })
        assert.are.same({ "/files/{name}/", { "x" } }, { match("/files/x/") })
        assert.are.same({ "/{one}/{two}", { "files", "x" } }, { match("/files/x") })
        -- an empty segment never fills a parameter
        assert.is_nil(match("/files//"))
        assert.is_nil(match("//x"))
        -- a literal path that ends too early falls back to the parameters
        assert.are.same({ "/{one}/{two}", { "a", "b" } }, { match("/a/b") })
        assert.is_nil(match("/a/b/c/"))
        assert.is_nil(match("/a/b/c/d"))
    end)

describe("handler coroutines", function()
    it("are reused after a normal return, never once Lua code saw them", function()
        testing.run(function()
            local svc = tamarco.service { name = "reuse", report_server = false, resources = { api = http.server() } }
            local seen = {}
            svc.api:get("/seen", function()
                seen[#seen + 1] = coroutine.running()
                return 200, "ok"
            end)
            svc.api:get("/plain", function() return 200, "ok" end)
            local running = start(svc, { port = 0 })
            local port = svc.api.port
            for _ = 1, 5 do assert.are.equal(200, get(port, "/plain").status) end
            assert.is_true(scheduler.stats().idle_tasks >= 1, "nothing went back to the pool")
            for _ = 1, 5 do assert.are.equal(200, get(port, "/seen").status) end
            -- a handler that got hold of its coroutine had one of its own:
            -- whatever it kept can never wake a later request's handler
            local distinct = 0
            for i, co in ipairs(seen) do
                distinct = distinct + 1
                for j = 1, i - 1 do assert.are_not.equal(seen[j], co) end
            end
            assert.are.equal(5, distinct)
            running:stop()
        end)
    end)
end)

describe("http_server settings", function()
    it("turns CORS off with `cors: false` and rejects a CORS value that is not a mapping", function()
        testing.run(function()
            local svc = tamarco.service { name = "nocors", report_server = false, resources = { api = http.server() } }
            svc.api:get("/x", function() return 200, "x" end)
            local running = start(svc, { port = 0, cors = false })
            local r = get(svc.api.port, "/x", "Origin: http://app.example\r\n")
            assert.are.equal(200, r.status)
            assert.is_nil(r.headers["access-control-allow-origin"])
            running:stop()

            local bad = tamarco.service { name = "badcors", report_server = false, resources = { api = http.server() } }
            local started, err, code = testing.start_service(bad, { settings = { system = { resources = {
                api = { port = 0, cors = "sometimes" } } } } })
            assert.is_nil(started)
            assert.are.equal(2, code)
            assert.matches("system.resources.api.cors: must be true, false or a mapping", tostring(err), 1, true)
        end)
    end)
end)
