--- tamarco.core.service_file: loads the Lua file that defines a service.
--
-- The file's directory goes on the module paths (tamarco.core.module_path), so a
-- service can `require` its own Lua modules and C extensions next to it;
-- what the host and the system install is always found first.
local errors = require "tamarco.core.errors"
local module_path = require "tamarco.core.module_path"
local service = require "tamarco.core.service"

local service_file = {}

local function directory_of(path)
    return path:match("^(.*)/[^/]*$") or "."
end

--- Adds `dir` to the module search paths (see tamarco.core.module_path).
service_file.add_module_dir = module_path.add_dir

--- service_file.load(path) -> service. Raises a "service_file" error (exit 2)
-- naming the file when it is missing, does not compile, fails while running
-- or does not return a service table.
function service_file.load(path)
    local handle = io.open(path, "r")
    if not handle then
        errors.raise("service_file", "service file '" .. path .. "' not found (or not readable)")
    end
    handle:close()
    local chunk, syntax_error = loadfile(path)
    if not chunk then
        errors.raise("service_file", "service file '" .. path .. "' has a syntax error: " .. syntax_error)
    end
    service_file.add_module_dir(directory_of(path))
    local ok, result = xpcall(chunk, function(err)
        if errors.is(err) then return err end
        return debug.traceback(tostring(err), 2)
    end)
    if not ok then
        if errors.is(result) then
            result.message = "service file '" .. path .. "': " .. result.message
            error(result, 0)
        end
        errors.raise("service_file", "service file '" .. path .. "' failed while loading: " .. result)
    end
    if not service.is_service(result) then
        errors.raise("service_file", "service file '" .. path .. "' did not return a service table (it returned "
            .. (result == nil and "nothing" or "a " .. type(result))
            .. "); end the file with `return svc` where svc = tamarco.service { ... }")
    end
    return result
end

return service_file
