-- The HTTP client resource against real servers started by the spec itself:
-- a small luv HTTP/1.1 server in this process (canned routes, echo, a route
-- that never answers), Debian's python3 http.server, and openssl s_server
-- for TLS.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local scheduler = require "tamarco.c.scheduler"
local timer = require "tamarco.c.timer"
local c = require "tamarco.c.http_client"
local http_client = require "tamarco.resources.http_client"
local http = require "tamarco.resources.http"
local cjson = require "cjson"
local uv = require "luv"

local PYTHON = "/usr/bin/python3"

-- ---- a canned HTTP/1.1 server on the host's loop (luv) ----

local function start_server(routes)
    local srv = { connections = 0, closed = 0, clients = {}, requests = {} }
    local tcp = uv.new_tcp()
    assert(tcp:bind("127.0.0.1", 0))
    assert(tcp:listen(1024, function(err)
        if err then return end
        local client = uv.new_tcp()
        tcp:accept(client)
        srv.connections = srv.connections + 1
        srv.clients[client] = true
        local buf = ""
        local function close()
            if srv.clients[client] then
                srv.clients[client] = nil
                srv.closed = srv.closed + 1
                if not client:is_closing() then client:close() end
            end
        end
        client:read_start(function(rerr, chunk)
            if rerr or not chunk then return close() end
            buf = buf .. chunk
            while true do
                local hend = buf:find("\r\n\r\n", 1, true)
                if not hend then break end
                local head = buf:sub(1, hend - 1)
                local method, target = head:match("^(%S+) (%S+)")
                local headers = {}
                for k, v in head:gmatch("\r\n([^:\r\n]+):[ \t]*([^\r\n]*)") do headers[k:lower()] = v end
                local len = tonumber(headers["content-length"]) or 0
                if #buf < hend + 3 + len then break end
                local req = { method = method, target = target, path = target:match("^[^?]*"),
                    headers = headers, body = buf:sub(hend + 4, hend + 3 + len) }
                buf = buf:sub(hend + 4 + len)
                srv.requests[#srv.requests + 1] = req
                local route = routes[req.path] or routes.default
                route(req, function(status, body, rheaders)
                    if client:is_closing() then return end
                    local out = { ("HTTP/1.1 %d Canned\r\n"):format(status) }
                    for _, h in ipairs(rheaders or {}) do out[#out + 1] = h[1] .. ": " .. h[2] .. "\r\n" end
                    out[#out + 1] = "Content-Length: " .. #body .. "\r\n\r\n"
                    if method ~= "HEAD" then out[#out + 1] = body end
                    client:write(table.concat(out))
                end)
            end
        end)
    end))
    srv.port = tcp:getsockname().port
    srv.url = "http://127.0.0.1:" .. srv.port
    function srv.close()
        for client in pairs(srv.clients) do
            if not client:is_closing() then client:close() end
        end
        srv.clients = {}
        tcp:close()
    end
    return srv
end

local routes = {
    ["/hello"] = function(req, reply)
        reply(200, "hello world", { { "Content-Type", "text/plain" }, { "X-Multi", "a" },
            { "X-Multi", "b" }, { "X-Path", req.target } })
    end,
    ["/echo"] = function(req, reply)
        reply(200, req.body, { { "Content-Type", req.headers["content-type"] or "application/octet-stream" },
            { "X-Method", req.method }, { "X-Token", req.headers["x-token"] or "" },
            { "X-Expect", req.headers["expect"] or "none" } })
    end,
    ["/json"] = function(req, reply)
        reply(200, '{"ok":true,"items":[1,2,3]}', { { "Content-Type", "application/json" } })
    end,
    ["/missing-json"] = function(req, reply) reply(404, '{"error":"nope"}') end,
    ["/redirect"] = function(req, reply) reply(302, "", { { "Location", "/hello" } }) end,
    ["/big"] = function(req, reply) reply(200, ("x"):rep(100000)) end,
    ["/slow"] = function(req, reply) end,   -- never answers
    default = function(req, reply) reply(404, "not found") end,
}

local function free_port()
    local t = uv.new_tcp()
    assert(t:bind("127.0.0.1", 0))
    local port = t:getsockname().port
    t:close()
    return port
end

--- Runs each function in its own task; returns their {ok, results...} in order.
local function run_all(fns)
    local results, left, me = {}, #fns, scheduler.current()
    for i, fn in ipairs(fns) do
        local co = tamarco.spawn(fn)
        scheduler.on_exit(co, function(...)
            results[i] = { ... }
            left = left - 1
            if left == 0 then scheduler.wake(me) end
        end)
    end
    if left > 0 then scheduler.suspend() end
    return results
end

local wait_for = testing.wait_until

local function shell(cmd)
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    return out
end

describe("http_client", function()
    local srv, client
    setup(function()
        srv = start_server(routes)
        client = http_client.new()
    end)
    teardown(function()
        srv.close()
        testing.turn(1)
    end)

    it("is the client of the http facade", function()
        assert.are.equal("http_client", http.client().type_name)
        assert.is_string(c.curl_version)
    end)

    it("GETs status, body and lowercased headers with repeats joined", function()
        local status, body, headers = testing.run(function() return client:get(srv.url .. "/hello") end)
        assert.are.equal(200, status)
        assert.are.equal("hello world", body)
        assert.are.equal("text/plain", headers["content-type"])
        assert.are.equal("a, b", headers["x-multi"])
        assert.are.equal("11", headers["content-length"])
        assert.is_nil(headers["Content-Type"])
    end)

    it("returns 4xx as a response, not an error", function()
        local status, body = testing.run(function() return client:get(srv.url .. "/nowhere") end)
        assert.are.equal(404, status)
        assert.are.equal("not found", body)
    end)

    it("POSTs a JSON body and gets it echoed back", function()
        local value = { name = "tamarco", list = { 1, 2, 3 }, nested = { ok = true } }
        local status, body, headers = testing.run(function()
            return client:post(srv.url .. "/echo", { json = value, headers = { ["X-Token"] = "abc" } })
        end)
        assert.are.equal(200, status)
        assert.are.same(value, cjson.decode(body))
        assert.are.equal("application/json", headers["content-type"])
        assert.are.equal("POST", headers["x-method"])
        assert.are.equal("abc", headers["x-token"])
        assert.are.equal("none", headers["x-expect"])   -- no 100-continue round trip
    end)

    it("sends PUT/PATCH/DELETE/HEAD with the right method and a raw body", function()
        local r = testing.run(function()
            local out = {}
            for _, m in ipairs({ "put", "patch", "delete" }) do
                local status, body, headers = client[m](client, srv.url .. "/echo",
                    { body = "raw-" .. m, headers = { ["Content-Type"] = "text/plain" } })
                out[m] = { status, body, headers["x-method"], headers["content-type"] }
            end
            local status, body, headers = client:head(srv.url .. "/hello")
            out.head = { status, body, headers["content-length"] }
            local s2, b2, h2 = client:post(srv.url .. "/echo")
            out.empty_post = { s2, b2, h2["x-method"] }
            return out
        end)
        assert.are.same({ 200, "raw-put", "PUT", "text/plain" }, r.put)
        assert.are.same({ 200, "raw-patch", "PATCH", "text/plain" }, r.patch)
        assert.are.same({ 200, "raw-delete", "DELETE", "text/plain" }, r.delete)
        assert.are.same({ 200, "", "11" }, r.head)
        assert.are.same({ 200, "", "POST" }, r.empty_post)
    end)

    it("decodes JSON responses with get_json and resp_json", function()
        local r = testing.run(function()
            local v, status = client:get_json(srv.url .. "/json")
            local missing, err, code = client:get_json(srv.url .. "/missing-json")
            local bad, bad_err = http_client.resp_json(client:get(srv.url .. "/hello"))
            local v2 = http_client.resp_json(client:post(srv.url .. "/echo", { json = { a = 1 } }))
            local down, down_err = http_client.resp_json(nil, "boom")
            return { v = v, status = status, missing = missing, err = err, code = code,
                bad = bad, bad_err = bad_err, v2 = v2, down = down, down_err = down_err }
        end)
        assert.are.same({ ok = true, items = { 1, 2, 3 } }, r.v)
        assert.are.equal(200, r.status)
        assert.is_nil(r.missing)
        assert.matches("HTTP 404", r.err)
        assert.are.equal(404, r.code)
        assert.is_nil(r.bad)
        assert.matches("invalid JSON", r.bad_err)
        assert.are.same({ a = 1 }, r.v2)
        assert.is_nil(r.down)
        assert.are.equal("boom", r.down_err)
    end)

    it("adds a query string, a base_url and default headers", function()
        local status, _, headers = testing.run(function()
            local c2 = http_client.new { base_url = srv.url .. "/", headers = { ["X-Token"] = "dflt" } }
            return c2:post("/echo", { query = { b = "x y", a = 1 }, body = "q" })
        end)
        assert.are.equal(200, status)
        assert.are.equal("dflt", headers["x-token"])
        assert.are.equal("/echo?a=1&b=x%20y", srv.requests[#srv.requests].target)
    end)

    it("follows redirects by default and not when told", function()
        local s1, b1, s2, h2 = testing.run(function()
            local s1, b1 = client:get(srv.url .. "/redirect")
            local s2, _, h2 = client:get(srv.url .. "/redirect", { follow_redirects = false })
            return s1, b1, s2, h2
        end)
        assert.are.equal(200, s1)
        assert.are.equal("hello world", b1)
        assert.are.equal(302, s2)
        assert.are.equal("/hello", h2.location)
    end)

    it("limits the response body with max_body_bytes", function()
        local r = testing.run(function()
            local ok_status, ok_body = client:get(srv.url .. "/big")
            local none, err, kind = client:get(srv.url .. "/big", { max_body_bytes = 1000 })
            return { ok_status, #ok_body, none, err, kind }
        end)
        assert.are.equal(200, r[1])
        assert.are.equal(100000, r[2])
        assert.is_nil(r[3])
        assert.matches("max_body_bytes", r[4])
        assert.are.equal("too_large", r[5])
    end)

    it("runs 100 concurrent requests from 100 tasks and reuses connections", function()
        local results, before, after = testing.run(function()
            local fns = {}
            for i = 1, 100 do
                fns[i] = function() return client:get(srv.url .. "/hello?i=" .. i) end
            end
            local results = run_all(fns)
            local before = srv.connections
            for _ = 1, 20 do assert(client:get(srv.url .. "/hello") == 200) end
            return results, before, srv.connections
        end)
        for i = 1, 100 do
            local ok, status, body, headers = unpack(results[i], 1, 4)
            assert.is_true(ok)
            assert.are.equal(200, status)
            assert.are.equal("hello world", body)
            assert.are.equal("/hello?i=" .. i, headers["x-path"])
        end
        assert.is_true(after - before <= 1, "20 sequential requests opened " .. (after - before) .. " connections")
        assert.are.equal(0, c.stats().in_flight)
    end)

    it("times out with nil + a timeout error without blocking other tasks", function()
        local r = testing.run(function()
            local order = {}
            local t0 = timer.now()
            local results = run_all {
                function()
                    local s, err, kind = client:get(srv.url .. "/slow", { timeout = 300 })
                    order[#order + 1] = "slow"
                    return s, err, kind, timer.now() - t0
                end,
                function()
                    for _ = 1, 5 do assert(client:get(srv.url .. "/hello") == 200) end
                    order[#order + 1] = "fast"
                    return timer.now() - t0
                end,
            }
            return { order = order, slow = results[1], fast = results[2] }
        end)
        assert.are.same({ "fast", "slow" }, r.order)
        local _, s, err, kind, elapsed = unpack(r.slow, 1, 5)
        assert.is_nil(s)
        assert.matches("timeout", err)
        assert.are.equal("timeout", kind)
        assert.is_true(elapsed >= 250 and elapsed < 3000, "timed out after " .. elapsed .. " ms")
        assert.is_true(r.fast[2] < 250, "fast task took " .. r.fast[2] .. " ms")
    end)

    it("takes its timeout from the settings view under the resource", function()
        local r = testing.run(function()
            local web = http.client { timeout_ms = 60000 }
            web:bind({ name = "svc" }, "web", { get = function(_, key, ...)
                local v = ({ timeout_ms = 150 })[key]
                if v == nil and select("#", ...) == 0 then error("missing " .. key) end
                return v
            end })
            local t0 = timer.now()
            local s, err = web:get(srv.url .. "/slow")
            return { s, err, timer.now() - t0, web:setting("connect_timeout_ms"), web:status() }
        end)
        assert.is_nil(r[1])
        assert.matches("timeout", r[2])
        assert.is_true(r[3] < 2000)
        assert.are.equal(10000, r[4])
        assert.are.same({ status = 0, requests = 1, errors = 1, in_flight = 0 }, r[5])
    end)

    it("is a service resource configured under system.resources.<name>", function()
        local r = testing.run(function()
            local svc = tamarco.service { name = "caller", resources = { web = http.client() } }
            local running, err, code = testing.start_service(svc, { settings = { system = {
                resources = { web = { timeout_ms = 100, base_url = srv.url } },
                microservices = { caller = { resources = { web = { connect_timeout_ms = 500 } } } },
            } } })
            assert(running, tostring(code) .. " " .. tostring(err))
            local status, body = svc.web:get("/hello")
            local t0 = timer.now()
            local none, terr = svc.web:get("/slow")
            local out = { status = status, body = body, none = none, terr = terr, elapsed = timer.now() - t0,
                config = svc.web:config(), resource_status = svc.web:status() }
            running:stop()
            return out
        end)
        assert.are.equal(200, r.status)
        assert.are.equal("hello world", r.body)
        assert.is_nil(r.none)
        assert.matches("timeout", r.terr)
        assert.is_true(r.elapsed < 2000)
        assert.are.equal(100, r.config.timeout_ms)
        assert.are.equal(500, r.config.connect_timeout_ms)
        assert.are.equal(true, r.config.verify_tls)
        assert.are.equal(2, r.resource_status.status)
        assert.are.equal(2, r.resource_status.requests)
    end)

    it("gives nil + an error on connection refused", function()
        local s, err, kind = testing.run(function()
            return client:get("http://127.0.0.1:" .. free_port() .. "/")
        end)
        assert.is_nil(s)
        assert.matches("onnect", err)
        assert.are.equal("connect", kind)
    end)

    it("gives a clean error for https://127.0.0.1:1/", function()
        local s, err, kind = testing.run(function() return client:get("https://127.0.0.1:1/") end)
        assert.is_nil(s)
        assert.is_string(err)
        assert.is_true(#err > 0)
        assert.are.equal("connect", kind)
    end)

    it("rejects non-HTTP schemes and bad arguments", function()
        local s, err = testing.run(function() return client:get("file:///etc/passwd") end)
        assert.is_nil(s)
        assert.is_string(err)
        scheduler.set_error_handler(function() end)   -- the failing tasks below are expected
        assert.has_error(function()
            testing.run(function() return client:get(srv.url, { headers = { ["X-Bad"] = "a\r\nInjected: 1" } }) end)
        end)
        assert.has_error(function() testing.run(function() return client:request("nope") end) end)
        scheduler.set_error_handler(nil)
        assert.has_error(function() client:get(srv.url .. "/hello") end, nil)   -- not in a task
        assert.are.equal(0, c.stats().in_flight)
    end)

    it("frees a request whose task is cancelled while it is in flight", function()
        local r = testing.run(function()
            local closed_before, requests_before = srv.closed, #srv.requests
            local me = scheduler.current()
            local got
            local co = tamarco.spawn(function()
                return client:get(srv.url .. "/slow", { timeout = 60000 })
            end)
            scheduler.on_exit(co, function(...) got = { ... } scheduler.wake(me) end)
            assert(wait_for(function() return #srv.requests > requests_before end))
            assert.are.equal("/slow", srv.requests[#srv.requests].path)
            local in_flight = c.stats().in_flight
            scheduler.interrupt(co, nil, "cancelled")
            scheduler.suspend()
            -- curl closed the half-used connection: the server sees it go
            local server_saw_close = wait_for(function() return srv.closed > closed_before end)
            return { got = got, in_flight = in_flight, after = c.stats(), server_saw_close = server_saw_close }
        end)
        assert.are.equal(1, r.in_flight)
        assert.are.same({ true, nil, "cancelled" }, { r.got[1], r.got[2], r.got[3] })
        assert.are.equal(0, r.after.in_flight)
        assert.is_true(r.server_saw_close)
        -- the client still works afterwards
        assert.are.equal(200, (testing.run(function() return client:get(srv.url .. "/hello") end)))
    end)

    it("fetches files from python3 -m http.server", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. dir) == 0)
        local f = assert(io.open(dir .. "/file.txt", "w"))
        f:write(("0123456789"):rep(1000))
        f:close()
        local port = free_port()
        local pid = shell(("cd %s && exec %s -m http.server --bind 127.0.0.1 %d >/dev/null 2>&1 & echo $!")
            :format(dir, PYTHON, port)):match("%d+")
        local ok, r = pcall(testing.run, function()
            local url = "http://127.0.0.1:" .. port
            assert(wait_for(function() return client:get(url .. "/", { timeout = 500 }) == 200 end, 5000),
                "python http.server did not start")
            local s, body, headers = client:get(url .. "/file.txt")
            local s404 = client:get(url .. "/missing.txt")
            return { s, #body, headers["content-length"], s404 }
        end)
        os.execute("kill " .. pid)
        os.execute("rm -rf " .. dir)
        assert(ok, r)
        assert.are.same({ 200, 10000, "10000", 404 }, r)
    end)

    it("speaks TLS with verification on by default (openssl s_server)", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. dir) == 0)
        local made = os.execute(("openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost "
            .. "-addext subjectAltName=IP:127.0.0.1,DNS:localhost -keyout %s/key.pem -out %s/cert.pem "
            .. ">/dev/null 2>&1"):format(dir, dir))
        assert.are.equal(0, made)
        local port = free_port()
        local pid = shell(("exec openssl s_server -quiet -www -accept 127.0.0.1:%d -cert %s/cert.pem "
            .. "-key %s/key.pem >/dev/null 2>&1 & echo $!"):format(port, dir, dir)):match("%d+")
        local ok, r = pcall(testing.run, function()
            local url = "https://127.0.0.1:" .. port .. "/"
            assert(wait_for(function()
                local s, _, kind = client:get(url, { timeout = 500 })
                return s ~= nil or kind == "tls"
            end, 5000), "openssl s_server did not start")
            local out = {}
            out.verified = { client:get(url) }
            out.insecure = { client:get(url, { verify_tls = false }) }
            out.with_ca = { client:get(url, { ca_file = dir .. "/cert.pem" }) }
            return out
        end)
        os.execute("kill " .. pid)
        os.execute("rm -rf " .. dir)
        assert(ok, r)
        assert.is_nil(r.verified[1])
        assert.are.equal("tls", r.verified[3])
        assert.matches("certificate", r.verified[2])
        assert.are.equal(200, r.insecure[1])
        assert.matches("s_server", r.insecure[2])
        assert.are.equal(200, r.with_ca[1])
    end)

    it("keeps nothing alive: the loop ends once no request is in flight", function()
        -- In a fresh host process, so that no other spec's handle counts.
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. dir) == 0)
        local script = dir .. "/loop_end_spec.lua"
        local f = assert(io.open(script, "w"))
        f:write(([[
            local tamarco = require "tamarco"
            local testing = require "tamarco.testing"
            local scheduler = require "tamarco.c.scheduler"
            local process = require "tamarco.c.process"
            local c = require "tamarco.c.http_client"
            local client = require("tamarco.resources.http_client").new()
            local uv = require "luv"
            it("ends", function()
                local srv = uv.new_tcp()
                srv:bind("127.0.0.1", 0)
                local held = {}
                srv:listen(64, function()
                    local cl = uv.new_tcp(); srv:accept(cl); held[#held + 1] = cl
                    cl:read_start(function(err, chunk)
                        if not chunk then return cl:close() end
                        if chunk:find("GET /hello", 1, true) then
                            cl:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
                        end
                    end)
                end)
                local url = "http://127.0.0.1:" .. srv:getsockname().port
                testing.run(function()
                    for _ = 1, 3 do assert(client:get(url .. "/hello") == 200) end
                    local co = tamarco.spawn(function() return client:get(url .. "/slow") end)
                    tamarco.sleep(50)
                    scheduler.interrupt(co, nil, "cancelled")
                    assert(client:get(url .. "/slow", { timeout = 50 }) == nil)
                end)
                for _, cl in ipairs(held) do if not cl:is_closing() then cl:close() end end
                srv:close()
                -- idle keep-alive connections stay in curl's cache, unreferenced
                local s = c.stats()
                assert(s.in_flight == 0, "in flight")
                process.run_loop("default")
                print("LOOP ENDED sockets=" .. c.stats().sockets)
            end)
        ]]))
        f:close()
        local exe = uv.exepath()
        local out = shell(("timeout 20 %s test %s 2>&1; echo EXIT=$?"):format(exe, script))
        os.execute("rm -rf " .. dir)
        if os.getenv("TAMARCO_SPEC_VERBOSE") then print(out) end
        assert.matches("LOOP ENDED", out)
        assert.matches("EXIT=0", out)
    end)

    it("shuts the shared multi handle down when idle and starts a new one on demand", function()
        local r = testing.run(function()
            local ok = c.shutdown()
            local gone = c.stats().multi
            local status = client:get(srv.url .. "/hello")
            return { ok, gone, status, c.stats().multi }
        end)
        assert.are.same({ true, false, 200, true }, r)
    end)
end)
