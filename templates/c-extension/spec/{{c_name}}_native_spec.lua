-- The C module in c/ (built by `tamarco-host test` into build/).
local testing = require "tamarco.testing"
local cjson = require "cjson"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local root = here .. "/.."
package.cpath = root .. "/build/?.so;" .. package.cpath

describe("{{c_name}}_native", function()
    local native = require "{{c_name}}_native"

    it("computes Adler-32 on the loop", function()
        assert.are.equal(0x11E60398, native.adler32("Wikipedia"))
        assert.are.equal(1, native.adler32(""))
    end)

    it("computes it on the thread pool while the task yields", function()
        local big = string.rep("tamarco", 300000)
        local sum = testing.run(function() return native.adler32_offload(big) end)
        assert.are.equal(native.adler32(big), sum)
    end)

    it("serves POST /checksum", function()
        testing.run(function()
            local running = assert(testing.start_service(root .. "/service.lua",
                { settings = { system = { resources = { api = { port = 0 } } } } }))
            local client = require("tamarco.resources.http_client").new()
            local status, body = client:post("http://127.0.0.1:" .. running.service.api.port .. "/checksum",
                { body = "Wikipedia" })
            running:stop()
            assert.are.equal(200, status, body)
            assert.are.equal(0x11E60398, cjson.decode(body).adler32)
        end)
    end)
end)
