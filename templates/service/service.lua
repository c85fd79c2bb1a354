-- The {{name}} service.
--   tamarco-host run service.lua --settings settings.yml
--   curl http://127.0.0.1:8080/hello/world        -> {"message":"hello world"}
--   curl http://127.0.0.1:5747/status             -> the status of every resource
local tamarco = require "tamarco"
local http = require "tamarco.resources.http"
{{#c}}
local native = require "{{c_name}}_native"   -- c/{{c_name}}_native.c, built into build/
{{/c}}

local svc = tamarco.service {
    name = "{{name}}",
    resources = { api = http.server() },
}

svc.api:get("/hello/{name}", function(req)
    return 200, { message = "hello " .. req.params.name }
end)
{{#c}}

-- POST a body: its checksum, computed in C on libuv's thread pool
svc.api:post("/checksum", function(req)
    return 200, { adler32 = native.adler32_offload(req.body or "") }
end)
{{/c}}

function svc:post_start()
    self.logger:info("{{name}} is ready", { port = self.api.port })
end

return svc
