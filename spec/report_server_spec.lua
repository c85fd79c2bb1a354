-- The report server every service gets: GET /status, GET /metrics and the
-- restart policies.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local base = require "tamarco.core.resource"
local http_client = require "tamarco.resources.http_client"
local cjson = require "cjson"
local cli = require "spec.support.cli"

local STATUS = base.STATUS

-- A resource whose status the spec drives; it counts its starts.
local Flaky = base.class("flaky")
function Flaky:start() self.starts = (self.starts or 0) + 1 end
function Flaky:status() return { status = self.status_code, starts = self.starts, password = nil } end

local function report_url(running, path)
    local host, port = running.service.tamarco_http_report_server:address()
    return ("http://%s:%d%s"):format(host, port, path)
end

local function get(url)
    return http_client.new():request { method = "GET", url = url }
end

describe("report server", function()
    it("answers /status with every resource's status: 200, 503 while connecting, 500 when failed", function()
        testing.run(function()
            local svc = tamarco.service { name = "reported", resources = { flaky = Flaky.new() } }
            local running = assert(testing.start_service(svc))
            local status, body = get(report_url(running, "/status"))
            assert.are.equal(200, status)
            local report = cjson.decode(body)
            assert.are.equal(STATUS.STARTED, report.flaky.status)
            assert.are.equal(STATUS.STARTED, report.tamarco_http_report_server.status)
            assert.are.equal(STATUS.STARTED, report.metrics.status)

            svc.flaky:set_status(STATUS.CONNECTING)
            status = get(report_url(running, "/status"))
            assert.are.equal(503, status)

            svc.flaky:set_status(STATUS.FAILED)
            status, body = get(report_url(running, "/status"))
            assert.are.equal(500, status)
            assert.are.equal(STATUS.FAILED, cjson.decode(body).flaky.status)
            running:stop()
        end)
    end)

    it("never shows a secret on /status", function()
        testing.run(function()
            local redis = require "tamarco.resources.redis"
            local svc = tamarco.service { name = "secretive", resources = {
                cache = redis.client { port = 1, password = "hunter2" } } }
            local running = assert(testing.start_service(svc))
            local _, body = get(report_url(running, "/status"))
            assert.is_nil(body:find("hunter2", 1, true))
            running:stop()
        end)
    end)

    it("answers /metrics in Prometheus text with the service's prefix and HTTP meters", function()
        testing.run(function()
            local svc = tamarco.service { name = "measured" }
            local running = assert(testing.start_service(svc))
            get(report_url(running, "/status"))
            local status, body, headers = get(report_url(running, "/metrics"))
            assert.are.equal(200, status)
            assert.matches("^text/plain", headers["content-type"])
            assert.matches('measured_http_requests_total{method="GET",route="/status",status="200"}', body, 1, true)
            running:stop()
        end)
    end)

    it("restarts a failed resource listed in restart_resource_on_failure", function()
        testing.run(function()
            local svc = tamarco.service { name = "healing", resources = { flaky = Flaky.new() } }
            local running = assert(testing.start_service(svc, { settings = { system = { resources = { status = {
                check_interval_ms = 20,
                restart_policy = { resources = { restart_resource_on_failure = { "flaky" } } } } } } } }))
            assert.are.equal(1, svc.flaky.starts)
            svc.flaky:set_status(STATUS.FAILED)
            tamarco.sleep(200)
            assert.are.equal(2, svc.flaky.starts)
            assert.are.equal(STATUS.STARTED, svc.flaky.status_code)
            running:stop()
        end)
    end)

    it("stops the service with exit 1 when a resource in restart_microservice_on_failure fails", function()
        local path = cli.write_temp([[
local tamarco = require "tamarco"
local base = require "tamarco.core.resource"
local Breaks = base.class("breaks")
function Breaks:post_start()
    tamarco.spawn(function() tamarco.sleep(50); self:set_status(base.STATUS.FAILED) end)
end
return tamarco.service { name = "fragile", resources = { db = Breaks.new() }, settings = { system = { resources = {
    status = { check_interval_ms = 20, restart_policy = { resources = { restart_microservice_on_failure = "all" } } } } } } }
]])
        local code, out = cli.run({ "run", path })
        os.remove(path)
        assert.are.equal(1, code, out)
        assert.matches("resource 'db' failed: stopping the service", out, 1, true)
        assert.matches("service stopped", out, 1, true)
    end)
end)
