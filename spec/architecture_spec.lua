-- The framework's Lua package has no require cycles, lazy requires inside
-- functions included: a cycle hidden by a lazy require is still a module
-- that cannot be understood (or loaded) without the other.
local uv = require "luv"

local ROOT = "lua"

-- module name -> file path, for every module under lua/tamarco
local function modules()
    local found = {}
    local function walk(dir)
        local scan = assert(uv.fs_scandir(dir))
        while true do
            local name, kind = uv.fs_scandir_next(scan)
            if not name then break end
            local path = dir .. "/" .. name
            if kind == "directory" then
                walk(path)
            elseif name:sub(-4) == ".lua" then
                local module = path:sub(#ROOT + 2, -5):gsub("/", ".")
                found[(module:gsub("%.init$", ""))] = path
            end
        end
    end
    walk(ROOT .. "/tamarco")
    return found
end

-- The code of a file without its comments (a doc comment may show a require).
local function code_of(path)
    local f = assert(io.open(path))
    local text = f:read("*a")
    f:close()
    text = text:gsub("%-%-%[(=*)%[.-%]%1%]", "")
    return (text:gsub("%-%-[^\n]*", ""))
end

-- The module names a piece of code requires: `require "x"`, `require("x")`
-- and `pcall(require, "x")`.
local function requires_in(code)
    local names = {}
    for name in code:gmatch("require%s*%(?%s*[\"']([%w_%.]+)[\"']") do names[#names + 1] = name end
    for name in code:gmatch("pcall%s*%(%s*require%s*,%s*[\"']([%w_%.]+)[\"']") do names[#names + 1] = name end
    local i = 0
    return function()
        i = i + 1
        return names[i]
    end
end

local function require_graph()
    local mods = modules()
    local graph = {}
    for module, path in pairs(mods) do
        local deps = {}
        for name in requires_in(code_of(path)) do
            if mods[name] and name ~= module then deps[name] = true end
        end
        graph[module] = deps
    end
    return graph
end

-- A cycle as a list of module names (first == last), or nil.
local function find_cycle(graph)
    local state, stack = {}, {}
    local function visit(module)
        state[module] = "open"
        stack[#stack + 1] = module
        local names = {}
        for dep in pairs(graph[module]) do names[#names + 1] = dep end
        table.sort(names)
        for _, dep in ipairs(names) do
            if state[dep] == "open" then
                local cycle = {}
                for i = #stack, 1, -1 do
                    table.insert(cycle, 1, stack[i])
                    if stack[i] == dep then break end
                end
                cycle[#cycle + 1] = dep
                return cycle
            elseif not state[dep] then
                local found = visit(dep)
                if found then return found end
            end
        end
        stack[#stack] = nil
        state[module] = "done"
    end
    local names = {}
    for module in pairs(graph) do names[#names + 1] = module end
    table.sort(names)
    for _, module in ipairs(names) do
        if not state[module] then
            local found = visit(module)
            if found then return found end
        end
    end
end

-- The folders of lua/tamarco are layers; a module may require its own layer
-- and those listed for it (docs/architecture.md). The public entry points
-- (`tamarco`, `tamarco.testing`) sit on top of core.
local LAYERS = {
    core = { "core" },
    clients = { "core", "clients" },
    resources = { "core", "clients", "resources" },
    ops = { "core", "clients", "resources", "ops" },
    cli = { "core", "clients", "resources", "ops", "cli" },
    entry = { "core" },
}
local ENTRY_POINTS = { ["tamarco"] = true, ["tamarco.testing"] = true }

local function layer_of(module)
    if ENTRY_POINTS[module] then return "entry" end
    local folder = module:match("^tamarco%.([%w_]+)%.") or module:match("^tamarco%.([%w_]+)$")
    return LAYERS[folder] and folder or nil
end

-- "a requires b (layer may require only ...)" for each edge that goes up or
-- sideways out of the allowed layers, sorted.
local function layer_violations(graph)
    local found = {}
    for module, deps in pairs(graph) do
        local layer = layer_of(module)
        if layer then
            local allowed = {}
            for _, name in ipairs(LAYERS[layer]) do allowed[name] = true end
            for dep in pairs(deps) do
                local dep_layer = layer_of(dep)
                if dep_layer and dep_layer ~= "entry" and not allowed[dep_layer] then
                    found[#found + 1] = ("%s requires %s (%s may require only %s)"):format(
                        module, dep, layer, table.concat(LAYERS[layer], ", "))
                end
            end
        end
    end
    table.sort(found)
    return found
end

describe("the Lua package", function()
    it("finds the requires of a module, lazy ones included, but not those in comments", function()
        local graph = require_graph()
        assert.is_true(graph["tamarco.ops.systemd"]["tamarco.ops.supervisor_pipe"])
        assert.is_true(graph["tamarco.core.metrics"]["tamarco.core.metrics.prometheus"])   -- inside a function
        assert.is_nil(graph["tamarco.core.metrics.prometheus"]["tamarco.core.metrics.prometheus"])
    end)

    it("detects a cycle when there is one", function()
        local cycle = find_cycle({ a = { b = true }, b = { c = true }, c = { a = true }, d = {} })
        assert.are.same({ "a", "b", "c", "a" }, cycle)
    end)

    it("finds a layer violation when there is one (the check itself)", function()
        local graph = {
            ["tamarco.core.a"] = { ["tamarco.resources.b"] = true, ["tamarco.core.c"] = true },
            ["tamarco.ops.d"] = { ["tamarco.resources.b"] = true },
            ["tamarco.clients.e"] = { ["tamarco.cli.f"] = true },
        }
        assert.are.same({ "tamarco.clients.e requires tamarco.cli.f (clients may require only core, clients)",
                          "tamarco.core.a requires tamarco.resources.b (core may require only core)" },
            layer_violations(graph))
    end)

    it("keeps every module in a layer and each layer to the layers below it", function()
        local graph = require_graph()
        local outside = {}
        for module in pairs(graph) do
            if not layer_of(module) then outside[#outside + 1] = module end
        end
        table.sort(outside)
        assert.are.same({}, outside, "modules outside the layers (a folder of lua/tamarco or a public entry point)")
        assert.are.same({}, layer_violations(graph))
    end)

    it("names modules by their path (a public or former name would hide the edge from these checks)", function()
        local mods = modules()
        local aliased = {}
        for module, path in pairs(mods) do
            for name in requires_in(code_of(path)) do
                if name:match("^tamarco%.") and not name:match("^tamarco%.c%.") and not mods[name] then
                    aliased[#aliased + 1] = module .. " requires " .. name
                end
            end
        end
        table.sort(aliased)
        assert.are.same({}, aliased)
    end)

    it("has no require cycle", function()
        local cycle = find_cycle(require_graph())
        assert.is_nil(cycle, cycle and ("require cycle: " .. table.concat(cycle, " -> ")))
    end)
end)

-- The calls through luv that would take the loop or the process's signals
-- away from the host (host/loop.c, host/signals.c) in `code`: a list of
-- "<call>" strings.
local function loop_owner_calls(code)
    local names, seen = {}, {}
    for name in code:gmatch("local%s+([%w_]+)%s*=%s*require%s*%(?%s*[\"']luv[\"']") do
        if not seen[name] then names[#names + 1], seen[name] = name, true end
    end
    local found = {}
    local function look(prefix)
        for _, call in ipairs({ "new_signal", "run", "stop" }) do
            if code:find(prefix .. "%s*%.%s*" .. call .. "%f[^%w_]") then found[#found + 1] = call end
        end
    end
    for _, name in ipairs(names) do look("%f[%w_]" .. name) end
    look("require%s*%(?%s*[\"']luv[\"']%s*%)?")
    return found
end

describe("the loop's owner", function()
    it("finds a module's own luv signal and loop calls", function()
        assert.are.same({ "new_signal", "run" }, loop_owner_calls(
            'local uv = require "luv"\nlocal s = uv.new_signal()\nuv.run("once")\ns:stop()'))
        assert.are.same({ "stop" }, loop_owner_calls('require("luv").stop()'))
        assert.are.same({}, loop_owner_calls('local uv = require "luv"\nlocal t = uv.new_timer()\nt:stop()'))
    end)

    it("is the host: no module under lua/tamarco calls uv.new_signal, uv.run or uv.stop", function()
        local offenders = {}
        for _, path in pairs(modules()) do
            local calls = loop_owner_calls(code_of(path))
            if #calls > 0 then offenders[#offenders + 1] = path .. ": uv." .. table.concat(calls, ", uv.") end
        end
        table.sort(offenders)
        assert.are.same({}, offenders)
    end)
end)
