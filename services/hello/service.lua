-- Hello world over HTTP: GET /hello/{name} -> {"message":"hello <name>"}.
-- Run: tamarco-host run services/hello/service.lua --settings services/hello/settings.yml
--      curl http://127.0.0.1:8080/hello/world
local tamarco = require "tamarco"
local http = require "tamarco.resources.http"

local svc = tamarco.service { name = "hello", resources = { api = http.server() } }

svc.api:get("/hello/{name}", function(req)
    return 200, { message = "hello " .. req.params.name }
end)

return svc
