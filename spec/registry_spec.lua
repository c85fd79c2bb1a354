-- The registry resource against the real etcd of scripts/test-services.sh
-- (TAMARCO_TEST_ETCD_HOST / TAMARCO_TEST_ETCD_PORT).
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local etcd = require "tamarco.clients.etcd"
local registry = require "tamarco.resources.registry"
local process = require "tamarco.c.process"
local timer = require "tamarco.c.timer"
local cli = require "spec.support.cli"

local HOST, PORT = os.getenv("TAMARCO_TEST_ETCD_HOST"), os.getenv("TAMARCO_TEST_ETCD_PORT")

local function need_etcd()
    assert(HOST and PORT, "TAMARCO_TEST_ETCD_HOST / TAMARCO_TEST_ETCD_PORT are not set: start etcd with "
        .. "`TAMARCO_SERVICES=etcd scripts/test-services.sh start` and source the env.sh it prints "
        .. "(scripts/test.sh does this)")
end

local wait_until = testing.wait_until

local function unique(name)
    return name .. "_" .. process.uuid4():sub(1, 8)
end

local function registry_settings(extra)
    local s = { enabled = true, etcd_host = HOST, etcd_port = tonumber(PORT) }
    for k, v in pairs(extra or {}) do s[k] = v end
    return { system = { resources = { registry = s } } }
end

describe("registry resource", function()
    local client
    before_each(function()
        need_etcd()
        client = etcd.new { host = HOST, port = PORT }
    end)

    it("registers the instance with its address under a lease while running, removes it on stop", function()
        local name = unique("regsvc")
        local svc = tamarco.service { name = name, resources = { registry = registry.new() } }
        testing.run(function()
            local running = assert(testing.start_service(svc, {
                settings = registry_settings({ host = "10.0.0.7", port = 8080, address = { zone = "a" } }) }))
            local key = "/system/discovery/" .. name .. "/" .. svc.instance_id
            assert.equal(key, svc.registry:key())
            local value, kv = client:get(key)
            assert.is_string(value)
            local info = assert(etcd.decode_json(value))
            assert.equal(name, info.service)
            assert.equal(svc.instance_id, info.instance_id)
            assert.equal("10.0.0.7", info.host)
            assert.equal(8080, info.port)
            assert.equal("a", info.zone)
            assert.equal(process.pid(), info.pid)
            assert.is_string(kv.lease)
            assert.is_true(svc.registry:status().registered)
            -- the lease is kept alive past its TTL
            tamarco.sleep(6000)
            assert.is_string((client:get(key)))
            local list = assert(svc.registry:instances(name))
            assert.equal(1, #list)
            assert.equal(svc.instance_id, list[1].instance_id)
            running:stop()
            assert.is_nil((client:get(key)))
            assert.same({}, svc.registry:instances(name))
        end)
    end)

    it("registers a service that did not add the resource when the settings enable it", function()
        local name = unique("regauto")
        local svc = tamarco.service { name = name }
        assert.is_nil(svc.resources.registry)
        testing.run(function()
            local running = assert(testing.start_service(svc, { settings = registry_settings({ port = 8081 }) }))
            assert.is_table(svc.registry)
            local key = "/system/discovery/" .. name .. "/" .. svc.instance_id
            local info = assert(etcd.decode_json(assert((client:get(key)))))
            assert.equal(name, info.service)
            assert.equal(8081, info.port)
            running:stop()
            assert.is_nil((client:get(key)))
        end)
        -- the service's own section says so too; without the setting nothing is added
        local own = tamarco.service { name = unique("regown") }
        local plain = tamarco.service { name = unique("regplain") }
        testing.run(function()
            local running = assert(testing.start_service(own, { settings = { system = {
                resources = { registry = { etcd_host = HOST, etcd_port = tonumber(PORT) } },
                microservices = { [own.name] = { resources = { registry = { enabled = true } } } } } } }))
            assert.is_string((client:get("/system/discovery/" .. own.name .. "/" .. own.instance_id)))
            running:stop()
            running = assert(testing.start_service(plain))
            assert.is_nil(plain.resources.registry)
            running:stop()
        end)
    end)

    it("does nothing unless enabled", function()
        local name = unique("regoff")
        local svc = tamarco.service { name = name, resources = { registry = registry.new() } }
        testing.run(function()
            local running = assert(testing.start_service(svc, {
                settings = { system = { resources = { registry = { etcd_host = HOST, etcd_port = PORT } } } } }))
            assert.same({}, (client:range("/system/discovery/" .. name .. "/", { prefix = true })))
            assert.is_false(svc.registry:status().enabled)
            running:stop()
        end)
    end)

    it("lists live instances and reports arrivals and departures", function()
        local name = unique("regwatch")
        local observer = tamarco.service { name = unique("observer"), resources = { registry = registry.new() } }
        local events = {}
        testing.run(function()
            local watching = assert(testing.start_service(observer, {
                settings = registry_settings({ enabled = false }) }))
            -- one instance already there before the watch
            local first = tamarco.service { name = name, resources = { registry = registry.new() } }
            local r1 = assert(testing.start_service(first, { settings = registry_settings() }))
            assert(observer.registry:watch(name, function(event, id, info)
                events[#events + 1] = { event = event, id = id, port = info and info.port }
            end))
            local second = tamarco.service { name = name, resources = { registry = registry.new() } }
            local r2 = assert(testing.start_service(second, { settings = registry_settings({ port = 2222 }) }))
            assert(wait_until(function() return #events >= 1 end))
            local list = assert(observer.registry:instances(name))
            assert.equal(2, #list)
            local ids = { [first.instance_id] = true, [second.instance_id] = true }
            assert.is_true(ids[list[1].instance_id] and ids[list[2].instance_id])
            r1:stop()
            r2:stop()
            assert(wait_until(function() return #events >= 3 end))
            tamarco.sleep(100)
            watching:stop()
        end)
        assert.same({ event = "arrived", id = events[1].id, port = 2222 }, events[1])
        assert.equal(3, #events)
        local departed = {}
        for i = 2, 3 do
            assert.equal("departed", events[i].event)
            departed[events[i].id] = true
        end
        assert.is_true(departed[events[1].id])
    end)

    it("loses the key within the TTL after a SIGKILL of the service process", function()
        local name = unique("regkill")
        local service_path = cli.write_temp(([[
local tamarco = require "tamarco"
local registry = require "tamarco.resources.registry"
local svc = tamarco.service { name = %q, resources = { registry = registry.new() } }
function svc:post_start()
    print("REGISTERED " .. self.registry:key())
    io.stdout:flush()
end
return svc
]]):format(name))
        local keys_file = os.tmpname()
        local prefix = "/system/discovery/" .. name .. "/"
        local code, out = cli.run_until({ "run", service_path }, "REGISTERED", "KILL", {
            TAMARCO__SYSTEM__RESOURCES__REGISTRY__ENABLED = "true",
            TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = "0",
            TAMARCO_ETCD_HOST = HOST, TAMARCO_ETCD_PORT = PORT, TAMARCO_YML_FILE = "",
        }, {
            { run = "ETCDCTL_API=3 etcdctl --endpoints=http://" .. HOST .. ":" .. PORT
                .. " get --prefix --keys-only " .. prefix .. " > " .. keys_file .. "; echo LISTED >> /dev/null",
              wait = "REGISTERED" },
        })
        local killed_at = timer.hrtime()
        os.remove(service_path)
        local f = io.open(keys_file)
        local listed = f and f:read("*a") or ""
        if f then f:close() end
        os.remove(keys_file)
        assert.equal(137, code, out)
        local key = out:match("REGISTERED (%S+)")
        assert.is_string(key, out)
        assert.matches(key, listed, 1, true)   -- present while it ran
        local gone_after
        testing.run(function()
            assert(wait_until(function()
                local value, err = client:get(key)
                assert(err == nil or type(err) == "table", err)
                return value == nil
            end, 9000))
            gone_after = (timer.hrtime() - killed_at) / 1e6
        end)
        -- TTL 5 s from the last keep-alive, plus etcd's expiry check
        assert.is_true(gone_after <= 7000, ("the key was still there %d ms after the kill"):format(gone_after))
        print(("\n  registry key gone %.0f ms after SIGKILL (TTL 5 s)"):format(gone_after))
    end)
end)
