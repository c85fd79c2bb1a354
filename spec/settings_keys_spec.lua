-- Tamarco's key forms in a service's settings view (absolute `/system/...`
-- paths, `system.` keys, the raw form) and settings:set / settings:delete
-- written through to the real etcd that scripts/test-services.sh starts.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local etcd = require "tamarco.clients.etcd"
local settings = require "tamarco.core.settings"
local settings_etcd = require "tamarco.ops.settings_etcd"
local process = require "tamarco.c.process"
local timer = require "tamarco.c.timer"

local HOST, PORT = os.getenv("TAMARCO_TEST_ETCD_HOST"), os.getenv("TAMARCO_TEST_ETCD_PORT")

local wait_until = testing.wait_until

local TREE = { system = {
    foo = { cow = "moo" },
    microservices = {
        my_admin = { default_user = "admin", own = "mine" },
        other = { default_user = "someone else" },
    },
} }

describe("settings keys", function()
    local store, view
    before_each(function()
        store = assert(settings.load { dict = TREE, yaml_file = false })
        view = store:view("my_admin")
    end)

    it("reads a key starting with / from the root (the talk's example)", function()
        assert.equal("admin", view:get("/system/microservices/my_admin/default_user"))
        assert.equal("someone else", view:get("/system/microservices/other/default_user"))
        assert.equal("moo", view:get("/system/foo/cow"))
        local ok, err = pcall(view.get, view, "/system/nope")
        assert.is_false(ok)
        assert.matches("missing setting 'system.nope'", tostring(err), 1, true)
    end)

    it("reads a dotted system. key from the root when the view has no match", function()
        assert.equal("moo", view:get("system.foo.cow"))
        assert.equal("someone else", view:get("system.microservices.other.default_user"))
        assert.equal("mine", view:get("own"))            -- relative keys as before
        local ok, err = pcall(view.get, view, "system.absent")
        assert.is_false(ok)
        assert.matches("'system.microservices.my_admin.system.absent' or 'system.system.absent' "
            .. "or 'system.absent'", tostring(err), 1, true)
    end)

    it("offers Tamarco's raw form", function()
        assert.equal("moo", view:get("system.foo.cow", nil, { raw = true }))
        assert.is_nil(view:get("own", nil, { raw = true }))
        assert.equal("fallback", view:get("own", "fallback", { raw = true }))
    end)

    it("watches absolute and raw keys", function()
        local dir = os.tmpname()
        os.remove(dir)
        testing.run(function()
            local seen = {}
            view:watch("system.foo.cow", function(value) seen[#seen + 1] = "dotted=" .. tostring(value) end)
            view:watch("/system/foo/cow", function(value) seen[#seen + 1] = "slash=" .. tostring(value) end)
            view:watch("system.foo", function(value) seen[#seen + 1] = "raw=" .. tostring(value.cow) end,
                { raw = true })
            assert(store:add_source(settings.static_source("spec", { system = { foo = { cow = "MOO" } } })))
            assert(wait_until(function() return #seen == 3 end))
            table.sort(seen)
            assert.same({ "dotted=MOO", "raw=MOO", "slash=MOO" }, seen)
        end)
    end)

    it("says that set needs a writable source when there is no etcd", function()
        testing.run(function()
            local ok, err = view:set("own", "x")
            assert.is_nil(ok)
            assert.matches("no writable settings source", tostring(err), 1, true)
            assert.equal("mine", view:get("own"))
        end)
    end)
end)

describe("settings:set and settings:delete with etcd", function()
    local c, svc_name
    before_each(function()
        assert(HOST and PORT, "TAMARCO_TEST_ETCD_HOST / TAMARCO_TEST_ETCD_PORT are not set")
        c = etcd.new { host = HOST, port = PORT }
        svc_name = "keys_" .. process.uuid4():sub(1, 8)
    end)
    after_each(function()
        if c then testing.run(function() c:delete("/system/microservices/" .. svc_name .. "/", { prefix = true }) end) end
    end)

    it("write through to etcd, are read back at once and reach watchers once", function()
        local svc = tamarco.service { name = svc_name }
        local seen = {}
        testing.run(function()
            assert(c:put("/system/microservices/" .. svc_name .. "/level", '"one"'))
            local running = assert(testing.start_service(svc))
            local store = running.settings
            assert(settings_etcd.attach(store, { client = c, retry = false }))
            assert(store:start_watching())
            svc.settings:watch("level", function(value) seen[#seen + 1] = tostring(value) end)

            assert(svc.settings:set("level", "two"))
            assert.equal("two", svc.settings:get("level"))
            assert.equal('"two"', (c:get("/system/microservices/" .. svc_name .. "/level")))
            -- a mapping becomes one key per leaf, as `etcd write-yml` writes
            assert(svc.settings:set("limits", { max = 5, names = { "a", "b" } }))
            assert.equal("5", (c:get("/system/microservices/" .. svc_name .. "/limits/max")))
            assert.equal('["a","b"]', (c:get("/system/microservices/" .. svc_name .. "/limits/names")))
            assert.same({ max = 5, names = { "a", "b" } }, svc.settings:get("limits"))
            -- absolute keys write where they say
            assert(svc.settings:set("/system/microservices/" .. svc_name .. "/abs", true))
            assert.is_true(svc.settings:get("abs"))

            assert(svc.settings:delete("limits"))
            assert.is_nil(svc.settings:get("limits", nil))
            assert.is_nil((c:get("/system/microservices/" .. svc_name .. "/limits/max")))
            -- the watch saw "two" once, even after etcd's own events came back
            tamarco.sleep(300)
            assert.equal("two", svc.settings:get("level"))
            running:stop()
            store:stop_watching()
        end)
        assert.same({ "two" }, seen)
    end)

    it("refuses a value the framework's checks refuse, writing nothing", function()
        local svc = tamarco.service { name = svc_name }
        testing.run(function()
            local running = assert(testing.start_service(svc))
            local store = running.settings
            assert(settings_etcd.attach(store, { client = c, retry = false }))
            store.validate = require("tamarco.core.settings_schema").validator(svc)
            store.log = function() end
            local ok, err = svc.settings:set("logging.file_backup_count", -1)
            assert.is_nil(ok)
            assert.matches("file_backup_count: must be at least 0, not -1", tostring(err), 1, true)
            assert.is_nil((c:get("/system/microservices/" .. svc_name .. "/logging/file_backup_count")))
            running:stop()
            store:stop_watching()
        end)
    end)
end)
