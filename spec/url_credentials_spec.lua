-- Credentials inside URLs never reach a log record, an error message or
-- /status.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local base = require "tamarco.core.resource"
local errors = require "tamarco.core.errors"
local logging = require "tamarco.core.logging"
local secrets = require "tamarco.core.secrets"
local http_client = require "tamarco.resources.http_client"
local cli = require "spec.support.cli"

describe("credentials inside URLs", function()
    it("are masked in any text, the rest of the URL kept", function()
        local cases = {
            { "http://user:PW@host", "http://user:***@host" },
            { "amqp://guest:p@ss@broker:5672/%2f", "amqp://guest:***@broker:5672/%2f" },
            { "redis://:PW@cache:6379/0", "redis://:***@cache:6379/0" },
            { "https://TOKEN@git.example/x", "https://***@git.example/x" },
            { "to amqp://u:PW@h and http://host/p?x=a@b",
              "to amqp://u:***@h and http://host/p?x=a@b" },
            { "http://host:8080/path", "http://host:8080/path" },
            { "mail me: a@b", "mail me: a@b" },
        }
        for _, case in ipairs(cases) do
            assert.are.equal(case[2], secrets.mask_urls(case[1]))
        end
    end)

    it("are masked in log records: message, extra fields, nested values, tracebacks", function()
        local record = logging.make_record("t", "INFO", "connecting to amqp://guest:PW1@broker/",
            { url = "redis://:PW2@cache:6379", nested = { list = { "http://u:PW3@h/x" } } },
            "stack: http://u:PW4@h")
        local text = require("cjson").encode(record)
        for i = 1, 4 do assert.is_nil(text:find("PW" .. i, 1, true), text) end
        assert.are.equal("connecting to amqp://guest:***@broker/", record.message)
        assert.are.equal("redis://:***@cache:6379", record.url)
        assert.are.equal("http://u:***@h/x", record.nested.list[1])
        assert.are.same({ u = "amqp://a:***@b" }, logging.mask({ u = "amqp://a:PW@b" }))
    end)

    it("are masked in error messages, down to the command line", function()
        assert.are.equal("cannot reach redis://:***@h:1",
            errors.new("runtime", "cannot reach redis://:PW@h:1").message)
        local path = cli.write_temp([[
local tamarco = require "tamarco"
local http = require "tamarco.resources.http"
return tamarco.service { name = "leaky", resources = { api = http.server() } }
]])
        local yml = cli.write_temp("system:\n  resources:\n    api:\n      port: http://user:SECRETPW@host\n", ".yml")
        local code, out = cli.run({ "run", path, "--settings", yml })
        os.remove(path)
        os.remove(yml)
        assert.are.equal(2, code, out)
        assert.matches('must be a number, not "http://user:***@host"', out, 1, true)
        assert.is_nil(out:find("SECRETPW", 1, true), out)
    end)

    it("are masked on /status", function()
        local Shows = base.class("shows_url")
        function Shows:status() return { status = self.status_code, url = "amqp://guest:STATUSPW@broker/" } end
        testing.run(function()
            local svc = tamarco.service { name = "status_url", resources = { shows = Shows.new() } }
            local running = assert(testing.start_service(svc))
            local host, port = svc.tamarco_http_report_server:address()
            local status, body = http_client.new():request {
                method = "GET", url = ("http://%s:%d/status"):format(host, port) }
            running:stop()
            assert.are.equal(200, status, body)
            assert.is_nil(body:find("STATUSPW", 1, true), body)
            assert.are.equal("amqp://guest:***@broker/", require("cjson").decode(body).shows.url)
        end)
    end)
end)
