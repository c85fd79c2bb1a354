-- tamarco.etcd, the etcd settings source and `tamarco-host etcd`, against the
-- real etcd that scripts/test-services.sh starts (TAMARCO_TEST_ETCD_HOST and
-- TAMARCO_TEST_ETCD_PORT; scripts/test.sh exports them). The restart test
-- also needs TAMARCO_SERVICES_DIR (restart-etcd keeps the port and data).
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local etcd = require "tamarco.clients.etcd"
local settings = require "tamarco.core.settings"
local settings_etcd = require "tamarco.ops.settings_etcd"
local etcd_command = require "tamarco.cli.etcd"
local process = require "tamarco.c.process"
local timer = require "tamarco.c.timer"
local yaml = require "tamarco.c.yaml"
local cli = require "spec.support.cli"

local HOST, PORT = os.getenv("TAMARCO_TEST_ETCD_HOST"), os.getenv("TAMARCO_TEST_ETCD_PORT")
local SERVICES_DIR = os.getenv("TAMARCO_SERVICES_DIR")
local ENDPOINT = HOST and PORT and ("http://%s:%s"):format(HOST, PORT)

local function need_etcd()
    assert(HOST and PORT, "TAMARCO_TEST_ETCD_HOST / TAMARCO_TEST_ETCD_PORT are not set: start etcd with "
        .. "`TAMARCO_SERVICES=etcd scripts/test-services.sh start` and source the env.sh it prints "
        .. "(scripts/test.sh does this)")
end

local function client()
    need_etcd()
    return etcd.new { host = HOST, port = PORT }
end

local function unique(name)
    return name .. "_" .. process.uuid4():sub(1, 8)
end

local function sh(command)
    local ok = os.execute(command .. " >/dev/null 2>&1")
    return ok == 0 or ok == true
end

local function etcdctl(args)
    return sh("ETCDCTL_API=3 etcdctl --endpoints=" .. ENDPOINT .. " " .. args)
end

local wait_until = testing.wait_until

describe("tamarco.etcd codec", function()
    it("round-trips base64 of any bytes", function()
        for _, s in ipairs({ "", "a", "ab", "abc", "abcd", "/system/x", "\0\255\128bin" }) do
            assert.equal(s, etcd.b64decode(etcd.b64encode(s)))
        end
        assert.equal("Zm9v", etcd.b64encode("foo"))
    end)

    it("computes prefix range ends", function()
        assert.equal("/b", etcd.prefix_end("/a"))
        assert.equal("b", etcd.prefix_end("a\255"))
        assert.equal("\0", etcd.prefix_end(""))
    end)

    it("encodes and decodes JSON values keeping their types", function()
        assert.equal("1000", etcd.encode_json(1000))
        assert.equal("0.1", etcd.encode_json(0.1))
        assert.equal('"Yes"', etcd.encode_json("Yes"))
        assert.equal('"a/b \\"q\\"\\n"', etcd.encode_json('a/b "q"\n'))
        assert.equal("[]", etcd.encode_json(setmetatable({}, yaml.sequence_mt)))
        assert.equal("{}", etcd.encode_json({}))
        assert.equal('{"a":[1,true,null]}', etcd.encode_json({ a = { 1, true, etcd.null } }))
        local v = assert(etcd.decode_json('{"a": [1, 2.5, "x", false, null, []], "b": {}, "u": "\\u00e9\\ud83d\\ude00"}'))
        assert.same({ 1, 2.5, "x", false, etcd.null, {} }, v.a)
        assert.is_true(yaml.is_sequence(v.a[6]))
        assert.is_false(yaml.is_sequence(v.b))
        assert.equal("é😀", v.u)
        assert.is_nil(etcd.decode_json("{bad"))
        assert.is_nil(etcd.decode_json("hello"))
    end)

    it("emits YAML that reads back to the same values", function()
        local value = { n = 1000, f = 0.1, t = true, s = "Yes", q = "1000", e = "", nl = "null",
            colon = "a: b", l = { 1, "two", { x = 1 } }, m = { deep = { k = "v" } } }
        local text = etcd_command.to_yaml(value)
        local back = yaml.parse(text)
        assert.same(value, back)
        assert.matches('s: "Yes"', text, 1, true)
        assert.matches('q: "1000"', text, 1, true)
    end)
end)

describe("tamarco.c.http_client stream (used by the etcd watch)", function()
    local c = require "tamarco.c.http_client"
    local uv = require "luv"

    -- A loopback server: answers every request with `head` then calls
    -- feed(write, close) to send the body.
    local function serve(head, feed)
        local srv = uv.new_tcp()
        assert(srv:bind("127.0.0.1", 0))
        local clients = {}
        assert(srv:listen(16, function()
            local client = uv.new_tcp()
            srv:accept(client)
            clients[#clients + 1] = client
            local started = false
            client:read_start(function(err, chunk)
                if err or not chunk then
                    if not client:is_closing() then client:close() end
                    return
                end
                if started then return end
                started = true
                client:write(head)
                feed(function(data) if not client:is_closing() then client:write(data) end end,
                    function() if not client:is_closing() then client:close() end end)
            end)
        end))
        local port = srv:getsockname().port
        return "http://127.0.0.1:" .. port .. "/", function()
            for _, client in ipairs(clients) do if not client:is_closing() then client:close() end end
            srv:close()
        end
    end

    local CHUNKED = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Test: yes\r\n\r\n"
    local function chunk(data) return ("%x\r\n%s\r\n"):format(#data, data) end

    it("reads a chunked response as it arrives, then its end", function()
        local url, stop = serve(CHUNKED, function(write)
            local n, t = 0, uv.new_timer()
            t:start(20, 20, function()
                n = n + 1
                if n <= 3 then write(chunk("part" .. n)) else write("0\r\n\r\n"); t:close() end
            end)
        end)
        testing.run(function()
            local s = c.stream { url = url }
            local status, headers = s:response()
            assert.equal(200, status)
            assert.equal("yes", headers["x-test"])
            local got = {}
            while true do
                local data, err = s:read()
                assert.is_nil(err)
                if not data then break end
                got[#got + 1] = data
            end
            assert.equal("part1part2part3", table.concat(got))
            assert.is_true(#got >= 2)          -- not one body at the end
            assert.is_nil(s:read())            -- stays at its end
            s:close()
        end)
        stop()
        assert.equal(0, c.stats().in_flight)
    end)

    it("pauses a fast sender when the reader lags (max_buffer_bytes) and loses nothing", function()
        local piece = ("x"):rep(16384)
        local url, stop = serve("HTTP/1.1 200 OK\r\nContent-Length: " .. (#piece * 64) .. "\r\n\r\n",
            function(write) for _ = 1, 64 do write(piece) end end)
        testing.run(function()
            local s = c.stream { url = url, max_buffer_bytes = 32768 }
            local total, paused = 0, false
            while true do
                tamarco.sleep(2)
                if s:info().paused then paused = true end
                local data = s:read()
                if not data then break end
                assert.is_true(#data <= 32768 + 16384)
                total = total + #data
            end
            assert.equal(#piece * 64, total)
            assert.is_true(paused)
        end)
        stop()
    end)

    it("resumes a paused transfer for a reader that waited for its data", function()
        -- the reader is always waiting when the bytes come in: it is woken
        -- with them, and the transfer paused meanwhile must go on after it
        local piece = ("y"):rep(16384)
        local url, stop = serve("HTTP/1.1 200 OK\r\nContent-Length: " .. (#piece * 64) .. "\r\n\r\n",
            function(write) for _ = 1, 64 do write(piece) end end)
        testing.run(function()
            local s = c.stream { url = url, max_buffer_bytes = 32768 }
            local total = 0
            while true do
                local data = s:read()
                if not data then break end
                total = total + #data
            end
            assert.equal(#piece * 64, total)
        end)
        stop()
    end)

    it("wakes a waiting reader with 'closed' when another task closes the stream", function()
        local url, stop = serve(CHUNKED, function(write) write(chunk("hello")) end)
        testing.run(function()
            local s = c.stream { url = url }
            assert.equal("hello", s:read())
            tamarco.spawn(function() tamarco.sleep(30); s:close() end)
            local data, err, kind = s:read()
            assert.is_nil(data)
            assert.equal("stream closed", err)
            assert.equal("closed", kind)
        end)
        stop()
        assert.equal(0, c.stats().in_flight)
    end)

    it("reports a broken transfer and a refused connection as errors", function()
        local url, stop = serve(CHUNKED, function(write, close) write(chunk("a")); close() end)
        testing.run(function()
            local s = c.stream { url = url }
            assert.equal("a", s:read())
            local data, err, kind = s:read()
            assert.is_nil(data)
            assert.is_string(err)
            assert.is_string(kind)
            local refused = c.stream { url = "http://127.0.0.1:1/", connect_timeout_ms = 1000 }
            local status, message, why = refused:response()
            assert.is_nil(status)
            assert.is_string(message)
            assert.equal("connect", why)
        end)
        stop()
    end)

    it("aborts the transfer of a stream that is collected unclosed", function()
        local url, stop = serve(CHUNKED, function(write) write(chunk("x")) end)
        testing.run(function()
            local s = c.stream { url = url }
            assert.equal("x", s:read())
            assert.equal(1, c.stats().in_flight)
            s = nil
            collectgarbage()
            collectgarbage()
            assert.equal(0, c.stats().in_flight)
        end)
        stop()
    end)
end)

describe("tamarco.etcd client", function()
    local c, root
    before_each(function()
        c = client()
        root = "/" .. unique("etcdspec")
    end)
    after_each(function()
        testing.run(function() c:delete(root .. "/", { prefix = true }) end)
    end)

    it("puts, gets, ranges by prefix as a nested table, deletes", function()
        testing.run(function()
            local rev = assert(c:put(root .. "/a", "1"))
            assert.is_true(rev > 0)
            assert(c:put(root .. "/b/c", '"x"'))
            assert(c:put(root .. "/b/d/e", "true"))
            local value, kv = c:get(root .. "/a")
            assert.equal("1", value)
            assert.equal(rev, kv.mod_revision)
            assert.is_nil((c:get(root .. "/missing")))
            local kvs = assert(c:range(root .. "/", { prefix = true }))
            assert.equal(3, #kvs)
            assert.equal(root .. "/a", kvs[1].key)
            local tree = assert(c:read_tree(root .. "/"))
            assert.same({ a = "1", b = { c = '"x"', d = { e = "true" } } }, tree)
            local decoded = assert(c:read_tree(root .. "/", settings_etcd.decode))
            assert.same({ a = 1, b = { c = "x", d = { e = true } } }, decoded)
            assert.equal(1, c:delete(root .. "/a"))
            assert.equal(0, c:delete(root .. "/a"))
            assert.equal(2, c:delete(root .. "/b/", { prefix = true }))
            assert.same({}, (c:range(root .. "/", { prefix = true })))
        end)
    end)

    it("grants, keeps alive and revokes leases", function()
        testing.run(function()
            local lease, ttl = c:grant(5)
            assert.is_string(lease)
            assert.equal(5, ttl)
            assert(c:put(root .. "/leased", "1", { lease = lease }))
            local _, kv = c:get(root .. "/leased")
            assert.equal(lease, kv.lease)
            assert.is_true(c:keepalive(lease) > 0)
            assert.is_true(c:revoke(lease))
            assert.is_nil((c:get(root .. "/leased")))
            assert.equal(0, c:keepalive(lease))
        end)
    end)

    it("authenticates with user and password, renews an invalid token, watches with it", function()
        local admin = "--user root:tamarco-spec-pw"
        assert(etcdctl("user add root --new-user-password=tamarco-spec-pw"))
        assert(etcdctl("user grant-role root root"))
        assert(etcdctl("auth enable"))
        local ok, err = pcall(function()
            testing.run(function()
                local anonymous = client()
                local value, message, kind = anonymous:put(root .. "/x", "1")
                assert.is_nil(value)
                assert.equal("auth", kind, message)
                local bad = etcd.new { host = HOST, port = PORT, user = "root", password = "wrong" }
                value, message, kind = bad:get(root .. "/x")
                assert.is_nil(value)
                assert.equal("auth", kind)
                assert.matches("authentication failed", message, 1, true)
                local authed = etcd.new { host = HOST, port = PORT, user = "root", password = "tamarco-spec-pw" }
                assert(authed:put(root .. "/x", "1"))
                assert.is_string(authed.token)
                authed.token = "not-a-valid-token"           -- as after the token's TTL
                assert.equal("1", (authed:get(root .. "/x")))
                local seen = {}
                local w = authed:watch(root .. "/", { prefix = true, on_events = function(events)
                    for _, e in ipairs(events) do seen[#seen + 1] = e.value end
                end })
                assert(wait_until(function() return w.connected end))
                assert(authed:put(root .. "/x", "2"))
                assert(wait_until(function() return #seen == 1 end))
                w:close()
                assert(authed:delete(root .. "/", { prefix = true }))
            end)
        end)
        etcdctl(admin .. " auth disable")
        etcdctl("user delete root")
        assert(ok, err)
    end)

    it("reports an unreachable etcd as an error, not a raise", function()
        testing.run(function()
            local dead = etcd.new { host = "127.0.0.1", port = 1, connect_timeout_ms = 500 }
            local value, err, kind = dead:get("/x")
            assert.is_nil(value)
            assert.matches("127.0.0.1:1", err, 1, true)
            assert.equal("connect", kind)
        end)
    end)

    it("watches a prefix: puts and deletes in order, once each", function()
        testing.run(function()
            local seen = {}
            local w = c:watch(root .. "/", { prefix = true, on_events = function(events)
                for _, e in ipairs(events) do seen[#seen + 1] = e.type .. " " .. e.key .. " " .. e.value end
            end })
            assert(wait_until(function() return w.connected end))
            assert(c:put(root .. "/k1", "1"))
            assert(c:put(root .. "/k2", "2"))
            assert(c:delete(root .. "/k1"))
            assert(etcdctl("put " .. root .. "/k3 3"))
            assert(wait_until(function() return #seen >= 4 end))
            tamarco.sleep(100)
            w:close()
            assert.same({ "PUT " .. root .. "/k1 1", "PUT " .. root .. "/k2 2", "DELETE " .. root .. "/k1 ",
                "PUT " .. root .. "/k3 3" }, seen)
        end)
    end)

    it("keeps watching across an etcd restart: changes made while it was down arrive once", function()
        assert(SERVICES_DIR, "TAMARCO_SERVICES_DIR is not set (restart-etcd needs it)")
        local seen, states = {}, {}
        local w
        testing.run(function()
            w = c:watch(root .. "/", { prefix = true,
                on_events = function(events)
                    for _, e in ipairs(events) do seen[#seen + 1] = e.key:sub(#root + 2) .. "=" .. e.value end
                end,
                on_state = function(state) states[#states + 1] = state end })
            assert(wait_until(function() return w.connected end))
            assert(c:put(root .. "/before", "0"))
            assert(wait_until(function() return #seen == 1 end))
        end)
        -- The loop does not turn during these commands: the watch cannot
        -- reconnect before the changes below are made.
        assert(sh("scripts/test-services.sh stop-etcd " .. SERVICES_DIR))
        assert(sh("scripts/test-services.sh start-etcd " .. SERVICES_DIR))
        for i = 1, 5 do assert(etcdctl("put " .. root .. "/while_down_" .. i .. " " .. i)) end
        assert(etcdctl("del " .. root .. "/before"))
        testing.run(function()
            assert(wait_until(function() return #seen >= 7 end, 10000))
            for i = 1, 5 do assert(c:put(root .. "/after_" .. i, tostring(i))) end
            assert(wait_until(function() return #seen >= 12 end, 5000))
            tamarco.sleep(200)
            w:close()
        end)
        local expected = { "before=0" }
        for i = 1, 5 do expected[#expected + 1] = "while_down_" .. i .. "=" .. i end
        expected[#expected + 1] = "before="
        for i = 1, 5 do expected[#expected + 1] = "after_" .. i .. "=" .. i end
        assert.same(expected, seen)
        assert.same({ "connected", "disconnected", "connected" }, states)
    end)

    it("reloads fully when the revision to resume from was compacted", function()
        testing.run(function()
            local first = assert(c:put(root .. "/k", "1"))
            assert(c:put(root .. "/k", "2"))
            local last = assert(c:put(root .. "/k", "3"))
            assert(etcdctl("compact " .. last))
            local compacted_at, seen = nil, {}
            local w = c:watch(root .. "/", { prefix = true, start_revision = first + 1,
                on_compacted = function(revision)
                    compacted_at = revision
                    local _, kv, read_revision = c:get(root .. "/k")
                    seen[#seen + 1] = "reload " .. kv.value
                    return read_revision + 1
                end,
                on_events = function(events)
                    for _, e in ipairs(events) do seen[#seen + 1] = e.value end
                end })
            assert(wait_until(function() return compacted_at ~= nil end))
            assert(wait_until(function() return w.connected end))
            assert(c:put(root .. "/k", "4"))
            assert(wait_until(function() return #seen >= 2 end))
            w:close()
            assert.equal(last, compacted_at)
            assert.same({ "reload 3", "4" }, seen)
        end)
    end)
end)

describe("etcd settings source", function()
    local c, svc_name
    before_each(function()
        c = client()
        svc_name = unique("etcdsvc")
    end)
    after_each(function()
        testing.run(function() c:delete("/system/microservices/" .. svc_name .. "/", { prefix = true }) end)
    end)

    local function key(k) return "/system/microservices/" .. svc_name .. "/" .. k end

    it("overrides the YAML file and the defaults, below the environment", function()
        local yml = cli.write_temp(("system:\n  microservices:\n    %s:\n      from_yaml: yaml\n"
            .. "      both: yaml\n      env_wins: yaml\n"):format(svc_name), ".yml")
        testing.run(function()
            assert(c:put(key("both"), '"etcd"'))
            assert(c:put(key("env_wins"), '"etcd"'))
            assert(c:put(key("number"), "1000"))
            assert(c:put(key("string"), '"Yes"'))
            assert(c:put(key("plain"), "not json"))
            assert(c:put(key("nested/a"), "[1,2]"))
            assert(c:put(key("nothing"), "null"))
        end)
        local store = assert(settings.load {
            defaults = { system = { microservices = { [svc_name] = { default = "d", both = "default" } } } },
            yaml_file = yml,
            environ = false,
        })
        -- an environment source above: what `run` does with environ = true
        assert(store:add_source(settings.static_source("environ",
            { system = { microservices = { [svc_name] = { env_wins = "env" } } } })))
        testing.run(function()
            assert(settings_etcd.attach(store, { client = c, retry = false }))
        end)
        os.remove(yml)
        assert.same({ "builtin", "defaults", "yaml", "etcd", "environ" }, store:sources())
        local view = store:view(svc_name)
        assert.equal("d", view:get("default"))
        assert.equal("yaml", view:get("from_yaml"))
        assert.equal("etcd", view:get("both"))
        assert.equal("env", view:get("env_wins"))
        assert.equal(1000, view:get("number"))
        assert.equal("Yes", view:get("string"))
        assert.equal("not json", view:get("plain"))
        assert.same({ 1, 2 }, view:get("nested.a"))
        assert.is_nil(view:get("nothing", nil))
        -- where each value comes from, for messages about bad values
        local full, where = view:origin("both")
        assert.equal("system.microservices." .. svc_name .. ".both", full)
        assert.equal("etcd key /system/microservices/" .. svc_name .. "/both at " .. c:address(), where)
        assert.equal("settings file " .. yml .. ":4", select(2, view:origin("from_yaml")))
        assert.equal("the defaults", select(2, view:origin("default")))
        assert.matches("^etcd key /system/microservices/" .. svc_name:gsub("%-", "%%-") .. "/number at .*: "
            .. "system%.microservices%." .. svc_name:gsub("%-", "%%-") .. "%.number: must be small$",
            view:error("number", "must be small").message)
        store:stop_watching()
    end)

    it("waits for ETCD_CHECK_KEY before reading", function()
        local store = assert(settings.load { yaml_file = false })
        local check = key("ready")
        local done = false
        testing.run(function()
            local waiter = tamarco.spawn(function()
                assert(settings_etcd.attach(store, { client = c, check_key = check, retry = false }))
                done = true
            end)
            assert(waiter)
            tamarco.sleep(300)
            assert.is_false(done)
            assert(c:put(key("value"), "42"))
            assert(c:put(check, "true"))
            assert(wait_until(function() return done end, 3000))
        end)
        assert.equal(42, store:view(svc_name):get("value"))
    end)

    it("fails with a settings error (exit 2) when etcd is unreachable", function()
        local store = assert(settings.load { yaml_file = false })
        local source, err
        testing.run(function()
            source, err = settings_etcd.attach(store, { client = etcd.new { port = 1 }, retry = false })
        end)
        assert.is_nil(source)
        assert.equal(2, err.exit_code)
        assert.matches("etcd at http://127.0.0.1:1 is unreachable", err.message, 1, true)
        assert.matches("TAMARCO_ETCD_RETRY", err.message, 1, true)
    end)

    it("fires svc.settings:watch and on_settings_change once per real change in a running service", function()
        local calls, watched = {}, {}
        local svc = tamarco.service { name = svc_name }
        function svc:on_settings_change(k, value)
            calls[#calls + 1] = k:sub(#("system.microservices." .. svc_name) + 2) .. "=" .. tostring(value)
        end
        testing.run(function()
            assert(c:put(key("level"), '"one"'))
            local running = assert(testing.start_service(svc))
            local store = running.settings
            -- what `tamarco-host run` does when TAMARCO_ETCD_HOST is set
            assert(settings_etcd.attach(store, { client = c, retry = false }))
            assert(store:start_watching())
            store:on_change(function(k, value)
                if k:find(svc_name, 1, true) then svc:on_settings_change(k, value) end
            end)
            assert.equal("one", svc.settings:get("level"))
            svc.settings:watch("level", function(value) watched[#watched + 1] = tostring(value) end)
            assert(c:put(key("level"), '"two"'))
            assert(wait_until(function() return #calls >= 1 end))
            assert(c:put(key("level"), '"two"'))          -- same value: not a change
            assert(c:put(key("other"), "5"))
            assert(etcdctl("del " .. key("level")))
            assert(wait_until(function() return #calls >= 3 end))
            tamarco.sleep(200)
            running:stop()
            store:stop_watching()
        end)
        assert.same({ "level=two", "other=5", "level=nil" }, calls)
        assert.same({ "two", "nil" }, watched)
    end)
end)

describe("tamarco-host etcd (CLI)", function()
    local svc_name
    before_each(function()
        need_etcd()
        svc_name = unique("etcdcli")
    end)
    after_each(function()
        testing.run(function() client():delete("/system/microservices/" .. svc_name .. "/", { prefix = true }) end)
    end)

    local function etcd_cli(...)
        local args = { "etcd", ... }
        args[#args + 1] = "--host"
        args[#args + 1] = HOST
        args[#args + 1] = "--port"
        args[#args + 1] = PORT
        return cli.run(args)
    end

    it("write-yml then read round-trips every YAML type", function()
        local body = [[
int: 1000
negative: -7
float: 0.1
float_whole: 1.0
float_tagged: !!float 3
exp: 1.5e+20
exp_whole: 1e3
nothing: null
tilde: ~
bool_true: true
bool_yes: yes
bool_false: off
str: hello world
str_int: "1000"
str_float: "0.1"
str_yes: "Yes"
str_true: "true"
str_null: "null"
str_tilde: "~"
str_empty: ""
str_colon: "a: b"
str_hash: "x #y"
str_dash: "-"
str_spaces: " padded "
str_multiline: "one\ntwo"
str_unicode: "été ✓"
str_octal: "0o17"
str_date: "2024-01-01"
nested:
  map:
    deep: value
  list_of_maps:
    - name: a
      port: 1
    - name: b
list: [1, two, 3.5, 2.0, true, "false", null]
empty_list: []
empty_map: {}
codes:
  404: not found
]]
        local path = cli.write_temp("system:\n  microservices:\n    " .. svc_name .. ":\n"
            .. body:gsub("([^\n]*)\n", "      %1\n"), ".yml")
        local code, out = etcd_cli("write-yml", path)
        assert.equal(0, code, out)
        assert.matches("wrote 34 keys", out, 1, true)
        -- nulls kept and floats told from integers on both sides
        local every_type = { null = etcd.null, float = etcd.float }
        local original = yaml.load_file(path, every_type).system.microservices[svc_name]
        os.remove(path)

        code, out = etcd_cli("read", "/system/microservices/" .. svc_name, "--recursive")
        assert.equal(0, code, out)
        assert.same(original, yaml.parse(out, "read", every_type))
        assert.matches('str_yes: "Yes"\n', out, 1, true)
        assert.matches("int: 1000\n", out, 1, true)
        assert.matches("float_whole: 1.0\n", out, 1, true)
        assert.matches("nothing: null\n", out, 1, true)

        code, out = etcd_cli("read", "system.microservices." .. svc_name .. ".int")
        assert.equal(0, code, out)
        assert.equal("1000\n", out)
        code, out = etcd_cli("read", "/system/microservices/" .. svc_name .. "/str_int")
        assert.equal('"1000"\n', out)
        -- the stored JSON keeps the types
        testing.run(function()
            local c = client()
            assert.equal("1000", (c:get("/system/microservices/" .. svc_name .. "/int")))
            assert.equal('"Yes"', (c:get("/system/microservices/" .. svc_name .. "/str_yes")))
            assert.equal("[]", (c:get("/system/microservices/" .. svc_name .. "/empty_list")))
            assert.equal("1.0", (c:get("/system/microservices/" .. svc_name .. "/float_whole")))
            assert.equal("1000.0", (c:get("/system/microservices/" .. svc_name .. "/exp_whole")))
            assert.equal("null", (c:get("/system/microservices/" .. svc_name .. "/tilde")))
            assert.equal('[1,"two",3.5,2.0,true,"false",null]',
                (c:get("/system/microservices/" .. svc_name .. "/list")))
        end)
        -- a JSON null written by another tool reads back as null
        assert(etcdctl("put /system/microservices/" .. svc_name .. "/null null"))
        code, out = etcd_cli("read", "/system/microservices/" .. svc_name .. "/null")
        assert.equal("null\n", out)
    end)

    it("deletes a key, or a whole prefix with --recursive", function()
        testing.run(function()
            local c = client()
            assert(c:put("/system/microservices/" .. svc_name .. "/a", "1"))
            assert(c:put("/system/microservices/" .. svc_name .. "/b/c", "2"))
            assert(c:put("/system/microservices/" .. svc_name .. "/b/d", "3"))
        end)
        local code, out = etcd_cli("delete", "/system/microservices/" .. svc_name .. "/a")
        assert.equal(0, code, out)
        assert.matches("deleted 1 key", out, 1, true)
        code, out = etcd_cli("read", "/system/microservices/" .. svc_name .. "/a")
        assert.equal(1, code)
        assert.matches("no key", out, 1, true)
        -- a directory without --recursive: told how, nothing deleted, exit 1
        code, out = etcd_cli("delete", "/system/microservices/" .. svc_name .. "/b")
        assert.equal(1, code, out)
        assert.matches("/system/microservices/" .. svc_name .. "/b is not a key but holds 2 keys below it: "
            .. "pass --recursive", out, 1, true)
        code, out = etcd_cli("read", "/system/microservices/" .. svc_name .. "/b/c")
        assert.equal(0, code, out)
        code, out = etcd_cli("delete", "system.microservices." .. svc_name, "--recursive")
        assert.equal(0, code, out)
        assert.matches("deleted 2 keys", out, 1, true)
    end)

    it("accepts Tamarco's spelling write_yml", function()
        local yml = cli.write_temp(("system:\n  microservices:\n    %s:\n      spelled: tamarco\n"):format(svc_name),
            ".yml")
        local code, out = etcd_cli("write_yml", yml)
        os.remove(yml)
        assert.equal(0, code, out)
        assert.matches("wrote 1 keys", out, 1, true)
        code, out = etcd_cli("read", "/system/microservices/" .. svc_name .. "/spelled")
        assert.equal(0, code, out)
        assert.matches("tamarco", out, 1, true)
    end)

    it("explains usage mistakes and an unreachable etcd", function()
        local code, out = cli.run({ "etcd", "frobnicate", "x" })
        assert.equal(2, code)
        assert.matches("unknown sub-command", out, 1, true)
        code, out = cli.run({ "etcd", "read" })
        assert.equal(2, code)
        assert.matches("read needs a KEY", out, 1, true)
        code, out = cli.run({ "etcd", "--help" })
        assert.equal(0, code)
        assert.matches("write-yml FILE", out, 1, true)
        code, out = cli.run({ "etcd", "read", "/x", "--port", "1" })
        assert.equal(1, code)
        assert.matches("127.0.0.1:1", out, 1, true)
    end)
end)

describe("tamarco-host run with etcd settings", function()
    local svc_name, service_path
    before_each(function()
        need_etcd()
        svc_name = unique("etcdrun")
        service_path = cli.write_temp(([[
local tamarco = require "tamarco"
local svc = tamarco.service { name = %q }
function svc:start()
    print("GREETING " .. tostring(self.settings:get("greeting", "none")))
    io.stdout:flush()
end
function svc:on_settings_change(key, value)
    print("CHANGED " .. key .. "=" .. tostring(value))
    io.stdout:flush()
end
svc:task_timer({ interval = 50 }, "probe", function(self)
    local phase = self.settings:get("probe", false)
    if phase then
        self.logger:debug("DEBUG-VISIBLE phase=" .. tostring(phase))
        self.logger:info("INFO-VISIBLE phase=" .. tostring(phase))
    end
end)
return svc
]]):format(svc_name))
    end)
    after_each(function()
        os.remove(service_path)
        testing.run(function()
            local c = client()
            c:delete("/system/microservices/" .. svc_name .. "/", { prefix = true })
            c:delete("/system/logging/profile")
        end)
    end)

    local function key(k) return "/system/microservices/" .. svc_name .. "/" .. k end

    it("reads etcd at start, calls on_settings_change once per change and changes the log level live", function()
        testing.run(function() assert(client():put(key("greeting"), '"from etcd"')) end)
        local put = "ETCDCTL_API=3 etcdctl --endpoints=" .. ENDPOINT .. " "
        local code, out = cli.run_until({ "run", service_path }, "GREETING from etcd", "TERM",
            { TAMARCO_ETCD_HOST = HOST, TAMARCO_ETCD_PORT = PORT, TAMARCO_YML_FILE = "",
              TAMARCO__SYSTEM__LOGGING__PROFILE = "",
              TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = "0" }, {
                { run = put .. "put " .. key("greeting") .. " '\"hello\"' >/dev/null", wait = "CHANGED" },
                -- the same value again is no change; DEVELOP logs debug
                { run = put .. "put " .. key("greeting") .. " '\"hello\"' >/dev/null; "
                    .. put .. "put " .. key("probe") .. " 1 >/dev/null", wait = "DEBUG-VISIBLE phase=1" },
                { run = put .. "put /system/logging/profile '\"PRODUCTION\"' >/dev/null",
                  wait = "profile=PRODUCTION" },
                { run = "sleep 0.2; " .. put .. "put " .. key("probe") .. " 2 >/dev/null", wait = "INFO-VISIBLE phase=2" },
                { run = "sleep 0.2; " .. put .. "del " .. key("greeting") .. " >/dev/null", wait = "greeting=nil" },
            })
        assert.equal(0, code, out)
        local _, count = out:gsub("CHANGED system%.microservices%." .. svc_name:gsub("%-", "%%-") .. "%.greeting=hello", "")
        assert.equal(1, count, out)
        assert.matches("CHANGED system.logging.profile=PRODUCTION", out, 1, true)
        assert.matches("greeting=nil", out, 1, true)
        -- DEVELOP logged debug lines; PRODUCTION (from etcd, live) logs at info
        assert.matches("DEBUG-VISIBLE phase=1", out, 1, true)
        assert.matches("INFO-VISIBLE phase=2", out, 1, true)
        assert.not_matches("DEBUG-VISIBLE phase=2", out, 1, true)
    end)

    it("exits 2 with a clear message when etcd is unreachable at start", function()
        local code, out = cli.run({ "run", service_path }, { TAMARCO_ETCD_HOST = "127.0.0.1", TAMARCO_ETCD_PORT = "1" })
        assert.equal(2, code, out)
        assert.matches("etcd at http://127.0.0.1:1 is unreachable", out, 1, true)
    end)

    it("keeps retrying when TAMARCO_ETCD_RETRY=1, waiting longer each time", function()
        local code, out = cli.run_until({ "run", service_path }, "(attempt 3)", "TERM",
            { TAMARCO_ETCD_HOST = "127.0.0.1", TAMARCO_ETCD_PORT = "1", TAMARCO_ETCD_RETRY = "1" })
        assert.matches("is unreachable", out, 1, true)
        -- the back-off of the settings source: 500 ms, doubled up to 5 s
        assert.matches("retrying in 500 ms (attempt 1)", out, 1, true)
        assert.matches("retrying in 1000 ms (attempt 2)", out, 1, true)
        assert.matches("retrying in 2000 ms (attempt 3)", out, 1, true)
        -- SIGTERM ends the wait: a clean stop, nothing was started
        assert.equal(0, code, out)
        assert.matches("received SIGTERM while waiting for etcd", out, 1, true)
    end)
end)
