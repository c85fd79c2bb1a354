-- Calling other services by name (http_client `service =` / tamarco://):
-- instances registered in the real etcd of scripts/test-services.sh by real
-- tamarco-host processes; round-robin, retry on another instance, circuit
-- breaking, arrivals and departures followed by the registry's watch.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local etcd = require "tamarco.clients.etcd"
local metrics = require "tamarco.core.metrics"
local registry = require "tamarco.resources.registry"
local http = require "tamarco.resources.http"
local process = require "tamarco.c.process"
local cjson = require "cjson"
local uv = require "luv"
local cli = require "spec.support.cli"
local net = require "spec.support.net"

local HOST, PORT = os.getenv("TAMARCO_TEST_ETCD_HOST"), os.getenv("TAMARCO_TEST_ETCD_PORT")
local INSTANCE = "spec/fixtures/services/discovery_instance.lua"

local function need_etcd()
    assert(HOST and PORT, "TAMARCO_TEST_ETCD_HOST / TAMARCO_TEST_ETCD_PORT are not set: start etcd with "
        .. "`TAMARCO_SERVICES=etcd scripts/test-services.sh start` and source the env.sh it prints")
end

local function unique(name)
    return name .. "_" .. process.uuid4():sub(1, 8)
end

local wait_until = testing.wait_until

-- A caller: a service with a registry resource (not registering itself,
-- only telling where etcd is) and an HTTP client.
local function start_caller(options)
    local svc = tamarco.service { name = unique("caller"),
        resources = { registry = registry.new(), web = http.client(options) } }
    local running = assert(testing.start_service(svc, { settings = { system = { resources = {
        registry = { enabled = false, etcd_host = HOST, etcd_port = tonumber(PORT) } } } } }))
    return svc, running
end

-- An instance of `service` in its own tamarco-host process.
local function start_instance(service)
    local exited
    local handle, pid = uv.spawn(cli.host, {
        args = { "run", INSTANCE },
        env = {
            "PATH=" .. os.getenv("PATH"),
            "SPEC_SERVICE_NAME=" .. service,
            "TAMARCO__SYSTEM__RESOURCES__API__PORT=0",
            "TAMARCO__SYSTEM__RESOURCES__REGISTRY__ENABLED=true",
            "TAMARCO__SYSTEM__RESOURCES__REGISTRY__TTL=3",
            "TAMARCO__SYSTEM__RESOURCES__REGISTRY__ETCD_HOST=" .. HOST,
            "TAMARCO__SYSTEM__RESOURCES__REGISTRY__ETCD_PORT=" .. PORT,
            "TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=0",
        },
    }, function(code, signal) exited = { code = code, signal = signal } end)
    assert(handle, "cannot start " .. cli.host)
    return { handle = handle, pid = pid, exited = function() return exited end }
end

local function stop_instance(instance, signal)
    if not instance.exited() then instance.handle:kill(signal or "sigterm") end
    wait_until(function() return instance.exited() ~= nil end, 10000)
    if not instance.handle:is_closing() then instance.handle:close() end
end

local function whoami(web, service)
    local status, body = web:get("tamarco://" .. service .. "/whoami")
    if status ~= 200 then return nil, tostring(status) .. " " .. tostring(body) end
    return cjson.decode(body).instance
end

-- a one-shot HTTP server on the loop: 200 "ok" to every request
local function tiny_server(port)
    local tcp = uv.new_tcp()
    assert(tcp:bind("127.0.0.1", port))
    assert(tcp:listen(64, function()
        local client = uv.new_tcp()
        tcp:accept(client)
        local buffer = ""
        client:read_start(function(err, chunk)
            if err or not chunk then return client:close() end
            buffer = buffer .. chunk
            if buffer:find("\r\n\r\n", 1, true) then
                client:write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
                    function() client:close() end)
            end
        end)
    end))
    return tcp
end

local function calls_meter(service, instance, outcome)
    return metrics.counter("http_client_service_calls_total", {
        help = "Calls to other services by name, per target service, instance and outcome",
    }):labels({ target = service, instance = instance, outcome = outcome }):get()
end

describe("calling services by name", function()
    before_each(need_etcd)

    it("spreads calls over every instance, survives a SIGKILL, and calls a new instance", function()
        local service = unique("orders")
        testing.timeout_ms = 90000
        local instances, figures = {}, {}
        local ok, err = pcall(testing.run, function()
            local svc, running = start_caller()
            for i = 1, 3 do instances[i] = start_instance(service) end
            -- the three register (seen through the caller's watch)
            local seen = {}
            assert(wait_until(function()
                local id = whoami(svc.web, service)
                if id then seen[id] = true end
                local n = 0
                for _ in pairs(seen) do n = n + 1 end
                return n == 3
            end, 30000), "the three instances never all answered")
            local pool = svc.web._discovery.pools[service]
            assert.equal(3, pool:count())

            -- round-robin: 60 calls, 20 each, and not one etcd request for them
            local etcd_client = svc.registry:client()
            local etcd_requests = 0
            etcd_client.call = function(self, ...)
                etcd_requests = etcd_requests + 1
                return etcd.Client.call(self, ...)
            end
            local per = {}
            for _ = 1, 60 do
                local id = assert(whoami(svc.web, service))
                per[id] = (per[id] or 0) + 1
            end
            etcd_client.call = nil
            assert.equal(0, etcd_requests)
            local counts = {}
            for _, n in pairs(per) do counts[#counts + 1] = n end
            assert.same({ 20, 20, 20 }, counts)

            -- SIGKILL one: which instance id is it? Its pid is in the registry.
            local victim_id
            for id, instance in pairs(pool.instances) do
                if instance.info.pid == instances[2].pid then victim_id = id end
            end
            assert.is_string(victim_id)
            instances[2].handle:kill("sigkill")
            local calls, failed, departed_at_failures, open_at_failures = 0, 0, nil, nil
            local function victim_failures()
                return calls_meter(service, victim_id, "connect") + calls_meter(service, victim_id, "error")
                    + calls_meter(service, victim_id, "protocol")
            end
            local after_departure, before_departure = 0, 0
            assert(wait_until(function()
                local id, call_err = whoami(svc.web, service)
                calls = calls + 1
                if not id then
                    failed = failed + 1
                    figures.last_error = call_err
                end
                if not open_at_failures and pool:state(victim_id) == "open" then
                    open_at_failures = victim_failures()
                end
                -- its series go when it leaves the registry: read them while it is there
                if pool.instances[victim_id] then
                    before_departure = victim_failures()
                elseif not departed_at_failures then
                    departed_at_failures = before_departure
                end
                if departed_at_failures then after_departure = after_departure + 1 end
                return after_departure >= 50   -- 50 calls after its lease expired
            end, 30000), "the killed instance never left the registry")
            figures.calls_during_kill, figures.failed_during_kill = calls, failed
            -- after the departure its series are gone: any count now is a call made after it
            figures.victim_failures = departed_at_failures + victim_failures()
            figures.failures_after_open = figures.victim_failures - (open_at_failures or 0)
            figures.failures_after_departure = victim_failures()

            -- a fourth instance gets calls once it registers
            instances[4] = start_instance(service)
            local fourth_id, registered_at, first_call_at
            assert(wait_until(function()
                if not fourth_id then
                    for id, instance in pairs(pool.instances) do
                        if instance.info.pid == instances[4].pid then
                            fourth_id, registered_at = id, tamarco.now()
                        end
                    end
                end
                local id = whoami(svc.web, service)
                if fourth_id and id == fourth_id then
                    first_call_at = tamarco.now()
                    return true
                end
            end, 30000), "the fourth instance never got a call")
            figures.fourth_first_call_ms = first_call_at - registered_at
            running:stop()
            assert.is_nil(svc.web._discovery)   -- the watches ended with the resource
        end)
        testing.run(function()
            for _, instance in pairs(instances) do stop_instance(instance) end
        end)
        testing.timeout_ms = 20000
        print(("\ncalling by name: SIGKILL of 1 of 3 instances: %s calls, %s failed; %s connection failures "
            .. "on the killed instance (retried elsewhere), %s after its circuit opened, %s after its lease "
            .. "expired; the fourth instance got its first call %s ms after it appeared in the registry")
            :format(tostring(figures.calls_during_kill), tostring(figures.failed_during_kill),
                tostring(figures.victim_failures), tostring(figures.failures_after_open),
                tostring(figures.failures_after_departure), tostring(figures.fourth_first_call_ms)))
        assert(ok, err)
        assert.equal(0, figures.failed_during_kill, figures.last_error)
        assert.is_true(figures.victim_failures >= 1)
        assert.equal(0, figures.failures_after_open)
        assert.equal(0, figures.failures_after_departure)
        assert.is_number(figures.fourth_first_call_ms)
    end)

    it("says which service has no instance, and works with the instance there", function()
        local service = unique("nobody")
        testing.run(function()
            local svc, running = start_caller()
            local status, err, kind = svc.web:request { service = service, path = "/x" }
            assert.is_nil(status)
            assert.equal("no_instance", kind)
            assert.matches("service '" .. service .. "': no instance registered", err, 1, true)
            running:stop()
        end)
    end)

    it("opens the circuit of a refusing instance, probes it after breaker_open_ms, closes it on success", function()
        local service = unique("flaky")
        local port = net.free_port()
        local client = etcd.new { host = HOST, port = PORT }
        testing.run(function()
            local key = "/system/discovery/" .. service .. "/only"
            assert(client:put(key, cjson.encode({ host = "127.0.0.1", port = port })))
            local svc, running = start_caller({ breaker_open_ms = 300 })
            -- nothing listens: refused, the circuit opens, the next call is refused at once
            local status, err, kind = svc.web:get("tamarco://" .. service .. "/")
            assert.is_nil(status)
            assert.equal("connect", kind)
            assert.matches("service '" .. service .. "': instance only at http://127.0.0.1:" .. port, err, 1, true)
            local pool = svc.web._discovery.pools[service]
            assert.equal("open", pool:state("only"))
            status, err, kind = svc.web:get("tamarco://" .. service .. "/")
            assert.is_nil(status)
            assert.equal("no_instance", kind)
            assert.matches("circuit open", err, 1, true)
            -- after breaker_open_ms one probe goes through; it fails: open again
            tamarco.sleep(350)
            status, err, kind = svc.web:get("tamarco://" .. service .. "/")
            assert.equal("connect", kind)
            assert.equal("open", pool:state("only"))
            -- the instance comes up: the next probe succeeds and closes the circuit
            local server = tiny_server(port)
            tamarco.sleep(350)
            assert.equal(200, (svc.web:get("tamarco://" .. service .. "/")))
            assert.equal("closed", pool:state("only"))
            assert.equal(200, (svc.web:get("tamarco://" .. service .. "/")))
            server:close()
            running:stop()
            client:delete(key)
        end)
    end)

    it("drops an instance's call series when the instance leaves the registry", function()
        local service = unique("leaving")
        local port = net.free_port()
        local client = etcd.new { host = HOST, port = PORT }
        testing.run(function()
            local key = "/system/discovery/" .. service .. "/gone"
            assert(client:put(key, cjson.encode({ host = "127.0.0.1", port = port })))
            local server = tiny_server(port)
            local svc, running = start_caller()
            assert.equal(200, (svc.web:get("tamarco://" .. service .. "/")))
            local family = metrics.counter("http_client_service_calls_total", {
                help = "Calls to other services by name, per target service, instance and outcome" }).family
            local function series_of_instance()
                local n = 0
                for _, s in pairs(family.children) do
                    if s.label_set.target == service and s.label_set.instance == "gone" then n = n + 1 end
                end
                return n
            end
            assert.equal(1, series_of_instance())
            assert(client:delete(key))
            local pool = svc.web._discovery.pools[service]
            assert.is_truthy(wait_until(function() return pool:count() == 0 end, 5000), "the departure was not seen")
            assert.equal(0, series_of_instance())
            server:close()
            running:stop()
        end)
    end)

    it("retries an idempotent call on another instance, a POST only when asked", function()
        local service = unique("retry")
        local good_port, dead_port = net.free_port(), net.free_port()
        local client = etcd.new { host = HOST, port = PORT }
        testing.run(function()
            local server = tiny_server(good_port)
            local prefix = "/system/discovery/" .. service .. "/"
            -- "a" sorts first: round-robin starts on the dead one
            assert(client:put(prefix .. "a", cjson.encode({ host = "127.0.0.1", port = dead_port })))
            assert(client:put(prefix .. "b", cjson.encode({ host = "127.0.0.1", port = good_port })))
            local svc, running = start_caller({ breaker_open_ms = 60000 })
            assert.equal(200, (svc.web:put("tamarco://" .. service .. "/things/1")))
            assert.equal(1, calls_meter(service, "a", "connect"))
            assert.equal(1, calls_meter(service, "b", "response"))
            -- reset: a new caller, the dead one first again
            running:stop()
            svc, running = start_caller({ breaker_open_ms = 60000 })
            local status, err, kind = svc.web:post("tamarco://" .. service .. "/things", { body = "x" })
            assert.is_nil(status)
            assert.equal("connect", kind)
            assert.matches("instance a", err, 1, true)
            running:stop()
            svc, running = start_caller({ breaker_open_ms = 60000 })
            assert.equal(200, (svc.web:request { method = "POST", service = service, path = "/things",
                body = "x", retry = true }))
            running:stop()
            server:close()
            client:delete(prefix, { prefix = true })
        end)
    end)
end)
