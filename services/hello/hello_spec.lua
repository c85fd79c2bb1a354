-- The hello service answers its one route.
local testing = require "tamarco.testing"
local uv = require "luv"
local scheduler = require "tamarco.c.scheduler"

describe("hello service", function()
    it("answers GET /hello/{name} with JSON", function()
        testing.run(function()
            local running = assert(testing.start_service("services/hello/service.lua",
                { settings = { system = { resources = { api = { port = 0 } } } } }))
            local port = running.service.api.port
            local me, data = scheduler.current(), ""
            local tcp = uv.new_tcp()
            tcp:connect("127.0.0.1", port, function()
                tcp:read_start(function(_, chunk)
                    if chunk then data = data .. chunk else tcp:close() scheduler.wake(me) end
                end)
                tcp:write("GET /hello/world HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            end)
            scheduler.suspend()
            running:stop()
            assert.matches("^HTTP/1.1 200 OK\r\n", data)
            assert.matches('\r\n\r\n{"message":"hello world"}$', data)
        end)
    end)
end)
