-- Tamarco's settings example: the my_admin service reads its settings from
-- system.microservices.my_admin.* in a YAML file.
-- Run: tamarco-host run services/examples/settings/service.lua --settings services/examples/settings/settings.yml
local tamarco = require "tamarco"

local svc = tamarco.service { name = "my_admin" }

function svc:pre_start()
    -- The talk's form: /system/... paths are read from the root of the settings.
    self.default_user = self.settings:get("/system/microservices/my_admin/default_user")
    self.default_password = self.settings:get("/system/microservices/my_admin/default_password")
    -- A relative key: the view looks up system.microservices.my_admin.<key>
    -- before system.<key>.
    self.session_expiration_days = self.settings:get("session_expiration_days", 1)
    self.logger:info("admin settings loaded", {
        default_user = self.default_user,
        session_expiration_days = self.session_expiration_days,
    })
end

function svc:on_settings_change(key, value)
    self.logger:info("setting changed", { key = key, value = value })
    -- visible only when system.logging.profile is DEVELOP or TESTING
    self.logger:debug("setting change handled", { key = key })
end

return svc
