--- tamarco.resources.http: the HTTP server and client resources.
--   local http = require "tamarco.resources.http"
--   tamarco.service { name = "hello", resources = { api = http.server(), web = http.client() } }
return {
    server = function(options) return require("tamarco.resources.http_server").new(options) end,
    client = function(options) return require("tamarco.resources.http_client").new(options) end,
}
