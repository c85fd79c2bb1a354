--- `tamarco-host new service NAME [--dir DIR] [--with-c-extension]`:
-- generates a service project from the host's templates (templates/ in the
-- source tree, <prefix>/share/tamarco-host/templates when installed).
--
-- The project is written into a temporary directory next to the target and
-- renamed into place at the end, so a failure leaves nothing behind, and an
-- existing target is never touched. Errors exit with 2.
local process = require "tamarco.c.process"
local uv = require "luv"

local new_command = {}

local EXIT_ERROR = 2

local function parse_args(args)
    local options = {}
    local positional = {}
    local i = 1
    while i <= #args do
        local a = args[i]
        if a == "--dir" then
            if args[i + 1] == nil or args[i + 1] == "" then return nil, "option --dir needs a directory" end
            options.dir = args[i + 1]
            i = i + 2
        elseif a == "--with-c-extension" then
            options.with_c = true
            i = i + 1
        elseif a:sub(1, 1) == "-" then
            return nil, "unknown option '" .. a .. "'"
        else
            positional[#positional + 1] = a
            i = i + 1
        end
    end
    if positional[1] ~= "service" then
        return nil, positional[1] and ("unknown kind '" .. positional[1] .. "' (only 'service')")
            or "missing what to create: `new service NAME`"
    end
    if not positional[2] then return nil, "missing the service NAME" end
    if positional[3] then return nil, "unexpected argument '" .. positional[3] .. "'" end
    options.name = positional[2]
    return options
end

--- validate_name(name) -> true | nil, reason
function new_command.validate_name(name)
    if #name > 50 then return nil, "is longer than 50 characters" end
    if not name:match("^[a-z]") then return nil, "must start with a lowercase letter" end
    local bad = name:match("[^a-z0-9_%-]")
    if bad then return nil, "may only contain lowercase letters, digits, '-' and '_' (found '" .. bad .. "')" end
    if name:match("[_%-]$") then return nil, "must not end with '-' or '_'" end
    return true
end

--- new_command.templates_dir() -> the directory of the templates: TAMARCO_TEMPLATES_DIR, else
-- `templates/` next to the host's Lua directory.
function new_command.templates_dir()
    local env = os.getenv("TAMARCO_TEMPLATES_DIR")
    if env and env ~= "" then return env end
    local lua_dir = process.lua_dir() or package.tamarco_lua_dir
    return (lua_dir:gsub("/+$", ""):gsub("/[^/]*$", "")) .. "/templates"
end

local function exists(path)
    return uv.fs_lstat(path) ~= nil
end

local function read_file(path)
    local f, err = io.open(path, "rb")
    if not f then return nil, err end
    local text = f:read("*a")
    f:close()
    return text
end

-- Lists the files under dir (relative paths), recursively, sorted.
local function list_files(dir, prefix, out)
    out = out or {}
    local handle = uv.fs_scandir(dir)
    if not handle then return out end
    while true do
        local name, kind = uv.fs_scandir_next(handle)
        if not name then break end
        local rel = prefix and (prefix .. "/" .. name) or name
        if kind == "directory" then
            list_files(dir .. "/" .. name, rel, out)
        else
            out[#out + 1] = rel
        end
    end
    table.sort(out)
    return out
end

--- render(text, vars, flags) -> text: {{var}} substitution and {{#flag}}...{{/flag}} blocks.
function new_command.render(text, vars, flags)
    local out, keep_stack = {}, {}
    local keeping = true
    for line in (text .. "\n"):gmatch("(.-)\n") do
        local open = line:match("^%s*{{#([%w_]+)}}%s*$")
        local close = line:match("^%s*{{/([%w_]+)}}%s*$")
        if open then
            keep_stack[#keep_stack + 1] = keeping
            keeping = keeping and flags[open] == true
        elseif close then
            keeping = table.remove(keep_stack)
            if keeping == nil then error("unbalanced {{/" .. close .. "}} in a template", 0) end
        elseif keeping then
            out[#out + 1] = line
        end
    end
    local rendered = table.concat(out, "\n")
    return (rendered:gsub("{{([%w_]+)}}", function(key)
        local value = vars[key]
        if value == nil then error("unknown placeholder {{" .. key .. "}} in a template", 0) end
        return value
    end))
end

local function mkdir_p(path)
    if exists(path) then return true end
    local parent = path:match("^(.*)/[^/]+$")
    if parent and parent ~= "" then
        local ok, err = mkdir_p(parent)
        if not ok then return nil, err end
    end
    local ok, err = uv.fs_mkdir(path, tonumber("755", 8))
    if not ok and not exists(path) then return nil, err end
    return true
end

local function remove_tree(path)
    local stat = uv.fs_lstat(path)
    if not stat then return end
    if stat.type == "directory" then
        local handle = uv.fs_scandir(path)
        while handle do
            local name = uv.fs_scandir_next(handle)
            if not name then break end
            remove_tree(path .. "/" .. name)
        end
        uv.fs_rmdir(path)
    else
        uv.fs_unlink(path)
    end
end

--- generate{ name =, dir =, with_c = } -> list of created files (relative)
-- or nil, message.
function new_command.generate(options)
    local name = options.name
    local valid, reason = new_command.validate_name(name)
    if not valid then return nil, "invalid service name '" .. name .. "': " .. reason end
    local target = (options.dir or name):gsub("/+$", "")
    if target == "" then target = "/" end
    if exists(target) then
        return nil, "target directory '" .. target .. "' already exists; choose another --dir (nothing was written)"
    end
    local parent = target:match("^(.*)/[^/]+$") or "."
    if parent == "" then parent = "/" end
    local pstat = uv.fs_stat(parent)
    if not pstat then
        return nil, "cannot create '" .. target .. "': parent directory '" .. parent .. "' does not exist"
    elseif pstat.type ~= "directory" then
        return nil, "cannot create '" .. target .. "': '" .. parent .. "' is not a directory"
    end
    if not uv.fs_access(parent, "w") then
        return nil, "cannot create '" .. target .. "': directory '" .. parent .. "' is not writable"
    end

    local templates = new_command.templates_dir()
    if not exists(templates .. "/service") then
        return nil, "templates not found in '" .. templates .. "' (set TAMARCO_TEMPLATES_DIR)"
    end
    local vars = {
        name = name,
        c_name = (name:gsub("%-", "_")),
        dns_name = (name:gsub("_", "-")),
        version = process.version,
    }
    local flags = { c = options.with_c == true }
    local sources = { "service" }
    if options.with_c then sources[2] = "c-extension" end

    -- write into a hidden sibling, then rename: all or nothing
    local staging = ("%s/.%s.new-%d"):format(parent, target:match("[^/]+$"), process.pid())
    local ok, err = uv.fs_mkdir(staging, tonumber("755", 8))
    if not ok then
        return nil, "cannot create '" .. target .. "': directory '" .. parent .. "' is not writable ("
            .. tostring(err) .. ")"
    end
    local created = {}
    local function fail(message)
        remove_tree(staging)
        return nil, message
    end
    for _, source in ipairs(sources) do
        for _, rel in ipairs(list_files(templates .. "/" .. source)) do
            local text, read_err = read_file(templates .. "/" .. source .. "/" .. rel)
            if not text then return fail("cannot read template " .. rel .. ": " .. tostring(read_err)) end
            local rendered_ok, rendered = pcall(new_command.render, text, vars, flags)
            if not rendered_ok then return fail("template " .. source .. "/" .. rel .. ": " .. rendered) end
            local out_rel = new_command.render(rel, vars, flags)
            local out_path = staging .. "/" .. out_rel
            local dir_ok, dir_err = mkdir_p(out_path:match("^(.*)/[^/]+$"))
            if not dir_ok then return fail("cannot create a directory for " .. out_rel .. ": " .. tostring(dir_err)) end
            local f, open_err = io.open(out_path, "wb")
            if not f then return fail("cannot write " .. out_rel .. ": " .. tostring(open_err)) end
            local written, write_err = f:write(rendered)
            f:close()
            if not written then return fail("cannot write " .. out_rel .. ": " .. tostring(write_err)) end
            created[#created + 1] = out_rel
        end
    end
    if exists(target) then
        return fail("target directory '" .. target .. "' appeared while generating; nothing was written")
    end
    local renamed, rename_err = uv.fs_rename(staging, target)
    if not renamed then return fail("cannot create '" .. target .. "': " .. tostring(rename_err)) end
    table.sort(created)
    return created, target
end

--- new_command.main(args) -> exit code | nil, usage error. `tamarco-host new service NAME ...`:
-- generates the project and lists what it created.
function new_command.main(args)
    local options, usage_error = parse_args(args)
    if not options then return nil, usage_error end
    local created, target = new_command.generate(options)
    if not created then
        io.stderr:write("tamarco-host new: ", target, "\n")
        return EXIT_ERROR
    end
    io.stdout:write(("created service '%s' in %s/\n"):format(options.name, target))
    for _, rel in ipairs(created) do io.stdout:write("  ", rel, "\n") end
    io.stdout:write(("\nnext:\n  cd %s\n  tamarco-host run service.lua --settings settings.yml\n  tamarco-host test\n")
        :format(target))
    return 0
end

return new_command
