-- Starts the {{name}} service in-process and checks its HTTP route and /status.
--   tamarco-host test
local testing = require "tamarco.testing"
local cjson = require "cjson"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."

describe("{{name}}", function()
    local running, client

    local function get(port, path)
        local status, body = client:get("http://127.0.0.1:" .. port .. path)
        assert(status, body)
        return status, body
    end

    it("answers GET /hello/{name} and reports its status", function()
        testing.run(function()
            client = require("tamarco.resources.http_client").new()
            -- port 0: a free port, so the spec never competes with a running service
            running = assert(testing.start_service(here .. "/../service.lua",
                { settings = { system = { resources = { api = { port = 0 } } } } }))
            local ok, err = pcall(function()
                local status, body = get(running.service.api.port, "/hello/world")
                assert.are.equal(200, status)
                assert.are.same({ message = "hello world" }, cjson.decode(body))

                local report = running.service.tamarco_http_report_server
                assert(report, "the service has no report server (GET /status)")
                status, body = get(report.port, "/status")
                assert.are.equal(200, status, body)
                assert.are.equal(2, cjson.decode(body).api.status)   -- STARTED
            end)
            running:stop()
            assert(ok, err)
        end)
    end)
end)
