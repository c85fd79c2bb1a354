-- The settings docs/resources/ documents are the settings the framework
-- knows: a documented key that the checks would call "unknown" (or an
-- undocumented one that users cannot find) is a defect of one or the other.
local schema = require "tamarco.core.settings_schema"

local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/spec/[^/]+$") or "."

-- The keys a page documents as `PREFIX<key>` for any of the prefixes.
local function documented(page, ...)
    local f = assert(io.open(ROOT .. "/docs/resources/" .. page))
    local text = f:read("*a")
    f:close()
    local keys, seen = {}, {}
    for _, prefix in ipairs({ ... }) do
        local pattern = "`" .. prefix:gsub("%p", "%%%0") .. "([%w_%.]+)`"
        for key in text:gmatch(pattern) do
            if not seen[key] then seen[key] = true keys[#keys + 1] = key end
        end
    end
    return keys
end

-- one resource of each documented type, as a service would have it
local RESOURCES = {
    ["amqp.md"] = function() return require("tamarco.resources.amqp").client({}) end,
    ["redis.md"] = function() return require("tamarco.resources.redis").client({}) end,
    ["http_server.md"] = function() return require("tamarco.resources.http_server").new() end,
    ["http_client.md"] = function() return require("tamarco.resources.http_client").new() end,
    ["metrics.md"] = function() return require("tamarco.resources.metrics").new() end,
    ["registry.md"] = function() return require("tamarco.resources.registry").new() end,
    ["profiler.md"] = function() return require("tamarco.resources.profiler").new() end,
    ["memory.md"] = function() return require("tamarco.resources.memory").new() end,
    ["status.md"] = function() return require("tamarco.resources.status").new() end,
}

describe("the settings in docs/resources", function()
    for page, new in pairs(RESOURCES) do
        it("are known to the settings checks: " .. page, function()
            local resource = new()
            -- a page names the section `system.resources.<name>` or, for a
            -- resource with a fixed name, `system.resources.<that name>`
            local keys = documented(page, "system.resources.<name>.",
                "system.resources." .. page:gsub("%.md$", "") .. ".")
            assert.is_true(#keys > 0, page .. " documents no `system.resources.<name>.<key>`")
            local unknown = {}
            for _, key in ipairs(keys) do
                if not schema.knows_resource_setting(resource, key) then unknown[#unknown + 1] = key end
            end
            assert.are.same({}, unknown)
        end)
    end

    it("are known to the settings checks: log_sinks.md (system.logging)", function()
        local keys = documented("log_sinks.md", "system.logging.")
        assert.is_true(#keys > 0)
        local unknown = {}
        for _, key in ipairs(keys) do
            if not schema.knows_logging_setting(key) then unknown[#unknown + 1] = key end
        end
        assert.are.same({}, unknown)
    end)

    it("calls a misspelled key unknown (the check can fail)", function()
        assert.is_false(schema.knows_logging_setting("logstash.prot"))
        assert.is_false(schema.knows_resource_setting(require("tamarco.resources.http_server").new(), "prot"))
    end)
end)
