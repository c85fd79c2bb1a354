local testing = require "tamarco.testing"

local SERVICE = "services/examples/settings/service.lua"
local YAML = "services/examples/settings/settings.yml"

describe("settings example", function()
    it("reads the admin settings from the YAML file with their types", function()
        local svc = testing.run(function()
            local running = assert(testing.start_service(SERVICE, { yaml_file = YAML }))
            running:stop()
            return running.service
        end)
        assert.are.equal("admin", svc.default_user)
        assert.are.equal("admin", svc.default_password)
        assert.are.equal(30, svc.session_expiration_days)
    end)

    it("never logs the password", function()
        local running = testing.run(function()
            local running = assert(testing.start_service(SERVICE, { yaml_file = YAML }))
            running:stop()
            return running
        end)
        local record = running:logged("admin settings loaded")[1]
        assert.are.equal("admin", record.default_user)
        assert.is_nil(record.default_password)
    end)

    it("fails to start with a settings error naming the missing key", function()
        local ok, err, code = testing.run(function()
            return testing.start_service(SERVICE, {})
        end)
        assert.is_nil(ok)
        assert.are.equal(2, code)
        assert.matches("system.microservices.my_admin.default_user", tostring(err), 1, true)
    end)
end)
