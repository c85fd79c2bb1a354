--- tamarco.core.health: parts of the process, outside any service's
-- resources, that report their state on /status (the remote log sinks, for
-- one). The status resource asks them; they register themselves, so the
-- resource does not need to know them.
local health = {}

local reporters = {}
local names = {}

--- health.register(name, report): `report()` -> table or nil (nothing to
-- show), unhealthy (true makes /status answer 500). Registering a name
-- again replaces its reporter.
function health.register(name, report)
    assert(type(name) == "string" and type(report) == "function", "health.register(name, function)")
    if not reporters[name] then
        names[#names + 1] = name
        table.sort(names)
    end
    reporters[name] = report
end

--- health.report() -> { name = table } of the reporters with something to
-- show (nil when none has), and whether any says it is unhealthy.
function health.report()
    local out, unhealthy = nil, false
    for _, name in ipairs(names) do
        local body, bad = reporters[name]()
        if body ~= nil then
            out = out or {}
            out[name] = body
        end
        if bad then unhealthy = true end
    end
    return out, unhealthy
end

return health
