-- etcd as a 3-member cluster (scripts/test-services.sh start-cluster etcd):
-- every request and the watch fail over from member to member; settings
-- and the registry survive the death of the member in use and of the
-- leader. Prints its figures.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local etcd = require "tamarco.clients.etcd"
local settings = require "tamarco.core.settings"
local settings_etcd = require "tamarco.ops.settings_etcd"
local registry = require "tamarco.resources.registry"
local process = require "tamarco.c.process"
local cluster = require "spec.support.cluster"
local cli = require "spec.support.cli"
local net = require "spec.support.net"

local MEMBERS = { "m1", "m2", "m3" }

local function unique(name)
    return name .. "_" .. process.uuid4():sub(1, 8)
end

local function member_url(m)
    return "http://127.0.0.1:" .. cluster.port("etcd", m)
end

local function member_of_url(url)
    return cluster.member_of("etcd", MEMBERS, url:match(":(%d+)$"))
end

-- The current leader's name (asks each member in turn).
local function leader()
    for _, m in ipairs(MEMBERS) do
        local answer = etcd.new { url = member_url(m), timeout_ms = 1000 }:status()
        if answer and answer.leader and answer.header then
            for _, candidate in ipairs(MEMBERS) do
                local status = etcd.new { url = member_url(candidate), timeout_ms = 1000 }:status()
                if status and status.header and status.header.member_id == answer.leader then return candidate end
            end
        end
    end
end

local wait_until = testing.wait_until

describe("etcd endpoints", function()
    it("parses lists and comma-separated strings, and names a bad entry", function()
        assert.same({ "http://10.0.0.1:2379", "http://10.0.0.2:2380", "https://e3:2379", "http://[::1]:2381" },
            etcd.parse_endpoints("10.0.0.1, 10.0.0.2:2380,https://e3:2379/,[::1]:2381"))
        assert.same({ "http://a:1", "http://b:2" }, etcd.parse_endpoints({ "a:1", "b:2" }))
        local urls, err = etcd.parse_endpoints("a:1,b:x")
        assert.is_nil(urls)
        assert.matches("'b:x' is not host:port", err)
        assert.is_nil((etcd.parse_endpoints("")))
        assert.is_nil((etcd.parse_endpoints(42)))
    end)

    it("takes TAMARCO_ETCD_ENDPOINTS over system.etcd.endpoints over TAMARCO_ETCD_HOST", function()
        local store = assert(settings.load { dict = { system = { etcd = { endpoints = { "s1:1", "s2:2" } } } },
            environ = false })
        local located = etcd.locate(store)
        if os.getenv("TAMARCO_ETCD_ENDPOINTS") then
            assert.same(etcd.parse_endpoints(os.getenv("TAMARCO_ETCD_ENDPOINTS")), located.endpoints)
        else
            assert.same({ "http://s1:1", "http://s2:2" }, located.endpoints)
        end
        local bad = assert(settings.load { dict = { system = { etcd = { endpoints = "x:y" } } }, environ = false })
        if not os.getenv("TAMARCO_ETCD_ENDPOINTS") then
            local none, err = etcd.locate(bad)
            assert.is_nil(none)
            assert.matches("system.etcd.endpoints: etcd endpoints: 'x:y' is not host:port", err, 1, true)
        end
    end)

    it("moves on from a member that refuses connections, for requests and watches", function()
        local dead = "127.0.0.1:" .. net.free_port()
        local endpoints = { dead }
        for item in cluster.etcd():gmatch("[^,]+") do endpoints[#endpoints + 1] = item end
        testing.run(function()
            local client = etcd.new { endpoints = endpoints }
            local function start_on_dead() client.current, client.url = 1, "http://" .. dead end
            local key = "/" .. unique("failover") .. "/k"
            -- a request
            start_on_dead()
            local revision = assert(client:put(key, "v1"))
            assert.equal(1, client.failovers)
            assert.equal(endpoints[2], client.url:match("//(.*)$"))
            assert.equal("v1", (client:get(key)))
            -- a watch (from a known revision: one without starts whenever
            -- its stream is first established)
            start_on_dead()
            local seen = {}
            local w = client:watch(key, { start_revision = revision + 1, on_events = function(events)
                for _, e in ipairs(events) do seen[#seen + 1] = e.value end
            end })
            assert.is_true(wait_until(function() return client.failovers == 2 end, 5000))
            assert(etcd.new { endpoints = cluster.etcd() }:put(key, "v2"))
            assert.is_true(wait_until(function() return #seen == 1 end, 5000))
            assert.same({ "v2" }, seen)
            w:close()
            client:delete(key)
        end)
    end)
end)

describe("etcd cluster faults", function()
    local endpoints

    before_each(function()
        endpoints = cluster.etcd()
    end)

    it("misses no settings change and keeps the registry entry while the member in use and the leader die",
        function()
        testing.timeout_ms = 120000
        local svc_name = unique("clustersvc")
        local prefix = "/system/microservices/" .. svc_name .. "/stream/"
        local figures = {}
        local ok, err = pcall(testing.run, function()
            -- the service: settings from etcd (watched) and the registry, both
            -- on the cluster
            local store = assert(settings.load { environ = false })
            local source = assert(settings_etcd.attach(store, { endpoints = endpoints,
                log = function() end }))
            assert(store:start_watching())
            local notified = {}   -- key -> number of notifications
            store:on_change(function(key, value)
                local k = key:match("%.stream%.(k%d+)$")
                if k and value ~= nil then notified[k] = (notified[k] or 0) + 1 end
            end)
            -- a raw watch on the same cluster: revisions in order, none twice
            local revisions, repeated, out_of_order, last = {}, 0, 0, 0
            local raw = etcd.new { endpoints = endpoints }
            local watcher = raw:watch(prefix, { prefix = true, on_events = function(events)
                for _, e in ipairs(events) do
                    if revisions[e.mod_revision] then repeated = repeated + 1 end
                    if e.mod_revision <= last then out_of_order = out_of_order + 1 end
                    revisions[e.mod_revision] = true
                    last = math.max(last, e.mod_revision)
                end
            end })
            local svc = tamarco.service { name = svc_name, resources = { registry = registry.new() } }
            local running = assert(testing.start_service(svc, { settings = { system = { resources = {
                registry = { enabled = true, etcd_endpoints = endpoints, ttl = 5 } } } } }))
            local reg_key = svc.registry:key()

            -- the stream of changes: one key each, retried until etcd takes it
            local writer_client = etcd.new { endpoints = endpoints }
            local written, write_failures, writing, writer_done = 0, 0, true, false
            tamarco.spawn(function()
                while writing do
                    local n = written + 1
                    local revision = writer_client:put(prefix .. "k" .. n, tostring(n))
                    if revision then written = n else write_failures = write_failures + 1 end
                    tamarco.sleep(5)
                end
                writer_done = true
            end)
            -- the registry entry, looked at every 100 ms
            local checker_client = etcd.new { endpoints = endpoints }
            local absent, checks, checking = 0, 0, true
            tamarco.spawn(function()
                while checking do
                    local value, kv_or_err = checker_client:get(reg_key)
                    if value ~= nil then
                        checks = checks + 1
                    elseif type(kv_or_err) ~= "string" then   -- read fine, key missing
                        checks = checks + 1
                        absent = absent + 1
                    end
                    tamarco.sleep(100)
                end
            end)
            local function after_writes(count)
                local target = written + count
                assert(wait_until(function() return written >= target end, 30000), "the writes stalled")
            end

            -- the registry's keep-alives go to the settings watch's member
            -- too, so that killing it hits both
            local reg_client = svc.registry:client()
            reg_client.current, reg_client.url = source.client.current, source.client.url
            after_writes(100)
            -- 1: the member the settings watch and the registry talk to
            local victim = member_of_url(source.client.url)
            figures.killed_in_use = victim
            cluster.member("kill", "etcd", victim)
            after_writes(100)
            cluster.member("start", "etcd", victim)
            after_writes(50)
            -- 2: the leader
            local lead = leader()
            figures.killed_leader = lead
            cluster.member("kill", "etcd", lead)
            after_writes(100)
            cluster.member("start", "etcd", lead)
            after_writes(50)

            writing = false
            assert(wait_until(function() return writer_done end, 20000))
            local total = written
            local function all_seen()
                for i = 1, total do if not notified["k" .. i] then return false end end
                return true
            end
            wait_until(all_seen, 10000)
            checking = false
            tamarco.sleep(150)
            local missed, twice = 0, 0
            for i = 1, total do
                local n = notified["k" .. i] or 0
                if n == 0 then missed = missed + 1 elseif n > 1 then twice = twice + 1 end
            end
            figures.written, figures.write_failures = total, write_failures
            figures.missed, figures.twice = missed, twice
            figures.raw_repeated, figures.raw_out_of_order = repeated, out_of_order
            figures.watch_failovers = source.client.failovers
            figures.registry_checks, figures.registry_absent = checks, absent
            figures.registry_failovers = svc.registry:client().failovers
            figures.registered = svc.registry:status().registered
            figures.store_value = store:get("system.microservices." .. svc_name .. ".stream.k" .. total, nil)
            watcher:close()
            running:stop()
            store:stop_watching()
            writer_client:delete(prefix, { prefix = true })
        end)
        testing.timeout_ms = 20000
        print(("\netcd cluster faults: killed %s (the member the settings watch and the registry use) then %s (leader); "
            .. "%s changes written (%s write retries), %s missed, %s delivered twice; raw watch: %s repeated, "
            .. "%s out of order; watch failovers %s; registry: %s checks, absent %s times, keep-alive failovers %s")
            :format(tostring(figures.killed_in_use), tostring(figures.killed_leader), tostring(figures.written),
                tostring(figures.write_failures), tostring(figures.missed), tostring(figures.twice),
                tostring(figures.raw_repeated), tostring(figures.raw_out_of_order), tostring(figures.watch_failovers),
                tostring(figures.registry_checks), tostring(figures.registry_absent),
                tostring(figures.registry_failovers)))
        assert(ok, err)
        assert.is_true(figures.written >= 400)
        assert.equal(0, figures.missed)
        assert.equal(0, figures.twice)
        assert.equal(0, figures.raw_repeated)
        assert.equal(0, figures.raw_out_of_order)
        assert.is_true(figures.watch_failovers >= 1)
        assert.is_true(figures.registry_failovers >= 1)
        assert.is_true(figures.registry_checks > 10)
        assert.equal(0, figures.registry_absent)
        assert.is_true(figures.registered)
        assert.equal(figures.written, figures.store_value)
    end)

    it("hears 'no leader' at once from a member cut off from its quorum (a failure the client moves on from)",
        function()
        testing.timeout_ms = 60000
        local lone, result = "m1", {}
        local ok, err = pcall(testing.run, function()
            -- a watch on m1: ended by m1 itself once it has no leader
            local watch_errors = {}
            local watched = etcd.new { endpoints = { "127.0.0.1:" .. cluster.port("etcd", lone) } }
            local w = watched:watch("/" .. unique("noquorum-watch"), {
                on_error = function(message) watch_errors[#watch_errors + 1] = message end })
            tamarco.sleep(200)
            cluster.member("stop", "etcd", "m2")
            cluster.member("stop", "etcd", "m3")
            -- m1 alone has no leader. Until it notices, a write waits for a
            -- commit that never comes ("request timed out"); once it has, the
            -- require-leader header makes it answer "no leader" at once
            -- (without the header it would still hold every write ~7 s).
            local client = etcd.new { endpoints = { "127.0.0.1:" .. cluster.port("etcd", lone) }, timeout_ms = 15000 }
            local kinds = {}
            wait_until(function()
                local _, e, kind = client:put("/" .. unique("noquorum"), "x")
                result.err, result.kind = e, kind
                kinds[#kinds + 1] = kind
                return e and e:find("no leader", 1, true)
            end, 30000)
            result.kinds = kinds
            wait_until(function()
                for _, message in ipairs(watch_errors) do
                    if message:find("no leader", 1, true) then return true end
                end
            end, 15000)
            result.watch_errors = table.concat(watch_errors, " | ")
            w:close()
            cluster.member("start", "etcd", "m2")
            cluster.member("start", "etcd", "m3")
        end)
        testing.timeout_ms = 20000
        assert(ok, err)
        assert.equal("unavailable", result.kind)
        assert.matches("no leader", result.err, 1, true)
        for _, kind in ipairs(result.kinds) do assert.equal("unavailable", kind) end
        assert.matches("etcd watch: etcdserver: no leader", result.watch_errors, 1, true)
    end)
end)

describe("etcd cluster from the command line and tamarco-host run", function()
    local dead, key, svc_name, service_path
    before_each(function()
        dead = "127.0.0.1:" .. net.free_port()
        svc_name = unique("clusterrun")
        key = "/system/microservices/" .. svc_name .. "/greeting"
        testing.run(function() assert(etcd.new { endpoints = cluster.etcd() }:put(key, '"from the cluster"')) end)
        service_path = cli.write_temp(([[
local tamarco = require "tamarco"
local svc = tamarco.service { name = %q }
function svc:start()
    print("GREETING " .. tostring(self.settings:get("greeting", "none")))
    io.stdout:flush()
end
return svc
]]):format(svc_name))
    end)
    after_each(function()
        os.remove(service_path)
        testing.run(function() etcd.new { endpoints = cluster.etcd() }:delete(key) end)
    end)

    it("etcd read --endpoints skips a member that refuses connections", function()
        -- the start member is picked at random: four runs try the dead one
        -- first with probability 15/16
        for _ = 1, 4 do
            local code, out = cli.run({ "etcd", "read", key, "--endpoints", dead .. "," .. cluster.etcd() })
            assert.equal(0, code, out)
            assert.matches("from the cluster", out, 1, true)
        end
        local code, out = cli.run({ "etcd", "read", key, "--endpoints", "a:b" })
        assert.equal(2, code, out)
        assert.matches("--endpoints: etcd endpoints: 'a:b' is not host:port", out, 1, true)
    end)

    it("run reads its settings from TAMARCO_ETCD_ENDPOINTS, else system.etcd.endpoints, else TAMARCO_ETCD_HOST",
        function()
        local function yml_with(list)
            return cli.write_temp("system:\n  etcd:\n    endpoints: [" .. list:gsub(",", ", ") .. "]\n", ".yml")
        end
        local function greeting(args, env)
            local base = { TAMARCO_ETCD_ENDPOINTS = "", TAMARCO_ETCD_HOST = "", TAMARCO_YML_FILE = "" }
            for k, v in pairs(env) do base[k] = v end
            local code, out = cli.run_until(args, "GREETING", "TERM", base)
            assert.equal(0, code, out)
            return out:match("GREETING ([^\n]*)")
        end
        -- the environment's list (a dead member in it)
        assert.equal("from the cluster", greeting({ "run", service_path },
            { TAMARCO_ETCD_ENDPOINTS = dead .. "," .. cluster.etcd() }))
        -- the environment's list wins over the file's (all dead)
        local dead_yml = yml_with(dead)
        assert.equal("from the cluster", greeting({ "run", service_path, "--settings", dead_yml },
            { TAMARCO_ETCD_ENDPOINTS = cluster.etcd() }))
        os.remove(dead_yml)
        -- the file's list wins over TAMARCO_ETCD_HOST (dead)
        local yml = yml_with(dead .. "," .. cluster.etcd())
        assert.equal("from the cluster", greeting({ "run", service_path, "--settings", yml },
            { TAMARCO_ETCD_HOST = "127.0.0.1", TAMARCO_ETCD_PORT = tostring(net.free_port()) }))
        os.remove(yml)
    end)
end)
