-- Hot reload under load: a child host serves HTTP while its service file is
-- rewritten 20 times (--watch); no request may fail and every answer comes
-- from one of the versions written.
local tamarco = require "tamarco"
local testing = require "tamarco.testing"
local http_client = require "tamarco.resources.http_client"
local cli = require "spec.support.cli"

local free_port = require("spec.support.net").free_port

local function source(version, port)
    return ([[
local tamarco = require "tamarco"
local http = require "tamarco.resources.http"
local svc = tamarco.service { name = "versioned", resources = { api = http.server { port = %d } } }
svc.api:get("/version", function() return 200, "v%d" end)
return svc
]]):format(port, version)
end

-- Writes the file the way editors and deploy tools do: a temporary file
-- renamed over the old one.
local function replace(path, text)
    local tmp = path .. ".tmp"
    local f = assert(io.open(tmp, "w"))
    f:write(text)
    f:close()
    assert(os.rename(tmp, path))
end

describe("hot reload under load", function()
    it("serves every request while the service file is rewritten 20 times", function()
        local uv = require "luv"
        local dir = os.tmpname()
        os.remove(dir)
        assert(uv.fs_mkdir(dir, tonumber("755", 8)))
        local path = dir .. "/service.lua"
        local port = free_port()
        replace(path, source(0, port))
        local log_path = dir .. "/host.log"
        local log_fd = assert(uv.fs_open(log_path, "w", tonumber("644", 8)))
        local child, exited = nil, nil
        child = uv.spawn(cli.host, {
            args = { "run", path, "--watch" },
            env = { "TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT=0",
                    "PATH=" .. os.getenv("PATH") },
            stdio = { nil, log_fd, log_fd },
        }, function(code) exited = code end)
        assert(child, "cannot start the host")

        local failures, answers, seen, latencies = {}, 0, {}, {}
        testing.timeout_ms = 120000
        testing.run(function()
            local client = http_client.new()
            local url = "http://127.0.0.1:" .. port .. "/version"
            -- wait for the first version
            for _ = 1, 200 do
                if client:get(url) == 200 then break end
                tamarco.sleep(25)
            end
            local running = true
            local loaders = {}
            for i = 1, 8 do
                loaders[i] = tamarco.spawn(function()
                    while running do
                        local status, body = client:get(url)
                        if status ~= 200 then
                            failures[#failures + 1] = tostring(status) .. " " .. tostring(body)
                        else
                            answers = answers + 1
                            seen[body] = true
                        end
                    end
                end)
            end
            for version = 1, 20 do
                local written = tamarco.now()
                replace(path, source(version, port))
                -- the new code serves within a few seconds
                for _ = 1, 400 do
                    if seen["v" .. version] then break end
                    tamarco.sleep(10)
                end
                assert(seen["v" .. version], "version " .. version .. " never served")
                latencies[#latencies + 1] = tamarco.now() - written
            end
            running = false
            tamarco.sleep(50)
        end)
        child:kill("sigterm")
        testing.run(function()
            for _ = 1, 500 do
                if exited then break end
                tamarco.sleep(10)
            end
        end)
        testing.timeout_ms = 20000
        uv.fs_close(log_fd)
        local log = io.open(log_path):read("*a")
        os.remove(log_path)
        os.remove(path)
        uv.fs_rmdir(dir)
        assert.are.equal(0, exited, log)
        assert.are.same({}, failures)
        for body in pairs(seen) do
            local n = tonumber(body:match("^v(%d+)$"))
            assert.is_true(n ~= nil and n >= 0 and n <= 20, "unexpected answer " .. body)
        end
        assert.is_true(answers > 100)
        table.sort(latencies)
        print(("\nhot reload: file written -> new code serving: median %d ms, max %d ms over 20 reloads; "
            .. "%d requests, %d failed"):format(latencies[10], latencies[20], answers, #failures))
        assert.matches("service code reloaded", log, 1, true)
    end)
end)
