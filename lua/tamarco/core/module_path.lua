--- tamarco.core.module_path: where `require` looks for modules, in which order.
--
-- The host starts with its own paths only: its Lua directory and loadable
-- bindings, then the system's Lua directories (package.tamarco_path and
-- package.tamarco_cpath, set by the host). The current directory is never on
-- them. A service's directory (and a project's, for `tamarco-host test`) is
-- added with `module_path.add_dir`, and searched only after everything the
-- host and the system provide, Lua or C: a `tamarco/...` or a `cjson.lua`
-- next to a service can therefore never replace the framework or a C module
-- it loads. (Lua's own searchers try every Lua file before any C library, so
-- putting the directory last on package.path alone would still let a
-- `cjson.lua` win over cjson.so; hence the searcher below.)
local module_path = {}

local installed_path = package.tamarco_path or package.path
local installed_cpath = package.tamarco_cpath or package.cpath

local function symbol_of(name)
    -- Lua's rule: "a.b" -> luaopen_a_b; "v2-foo" -> luaopen_foo
    return "luaopen_" .. (name:match("^[^-]*%-(.*)$") or name):gsub("%.", "_")
end

-- package.loaders entry: the module from the installed paths only, Lua file
-- then C library then a C library of the module's root ("cjson.safe" from
-- cjson.so), or a message when none of them has it.
local function installed_searcher(name)
    local file = package.searchpath(name, installed_path)
    if file then
        local chunk, err = loadfile(file)
        if not chunk then
            error(("error loading module '%s' from file '%s':\n\t%s"):format(name, file, err), 0)
        end
        return chunk
    end
    file = package.searchpath(name, installed_cpath)
    if file then
        local open, err = package.loadlib(file, symbol_of(name))
        if not open then
            error(("error loading module '%s' from file '%s':\n\t%s"):format(name, file, err), 0)
        end
        return open
    end
    local root = name:match("^([^.]+)%.")
    file = root and package.searchpath(root, installed_cpath)
    if file then
        local open = package.loadlib(file, symbol_of(name))
        if open then return open end
    end
    return "\n\tno module '" .. name .. "' installed with the host or the system"
end

local searcher_installed = false

local function install_searcher()
    if searcher_installed then return end
    searcher_installed = true
    -- just before Lua's own file searcher (the last three are Lua's file,
    -- C and all-in-one searchers); the host's bytecode cache stays ahead
    table.insert(package.loaders, #package.loaders - 2, installed_searcher)
end

local added_dirs = {}

--- module_path.add_dir(dir): `require` also finds `dir/?.lua`,
-- `dir/?/init.lua`, `dir/?.so` and `dir/build/?.so`, after every installed
-- module (once per directory; the most recently added directory first).
function module_path.add_dir(dir)
    assert(type(dir) == "string" and dir ~= "", "module_path.add_dir: dir must be a path")
    if added_dirs[dir] then return end
    added_dirs[dir] = true
    install_searcher()
    package.path = dir .. "/?.lua;" .. dir .. "/?/init.lua;" .. package.path
    package.cpath = dir .. "/?.so;" .. dir .. "/build/?.so;" .. package.cpath
end

module_path.installed_searcher = installed_searcher

return module_path
