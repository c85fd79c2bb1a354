--- tamarco.core.errors: the one error convention of the framework.
--
-- Operations that can fail at run time return `nil, message`. Failures that
-- end the process (bad settings, bad service file, a resource that cannot
-- bind, ...) are raised as error objects made here: they carry a `kind`, a
-- message that names what is wrong, and the process exit code.
local mask_urls = require("tamarco.core.secrets").mask_urls

local errors = {}

errors.exit_codes = {
    runtime = 1,        -- runtime failure, failed start-up hook, watchdog
    usage = 2,          -- bad command line
    settings = 2,       -- bad or missing settings
    service_file = 2,   -- missing service file, syntax error, no service table
    bind = 11,          -- a resource could not bind its address
    dependencies = 12,  -- resource dependencies cannot be ordered
}

local Error = {}
Error.__index = Error
Error.__tostring = function(e) return e.message end

--- errors.new(kind, message[, fields]) -> error object (not raised). The
-- message is shown to people: credentials inside URLs are masked in it.
function errors.new(kind, message, fields)
    local code = errors.exit_codes[kind]
    assert(code, "unknown error kind: " .. tostring(kind))
    local e = { kind = kind, message = mask_urls(message), exit_code = code }
    for k, v in pairs(fields or {}) do e[k] = v end
    return setmetatable(e, Error)
end

--- errors.raise(kind, message[, fields]): raises without position prefix.
function errors.raise(kind, message, fields)
    error(errors.new(kind, message, fields), 0)
end

--- errors.is(value[, kind]) -> true when value is a tamarco error (of kind).
function errors.is(value, kind)
    return getmetatable(value) == Error and (kind == nil or value.kind == kind)
end

--- The exit code for any error value: its own, else the runtime failure code.
function errors.exit_code_of(value)
    if errors.is(value) then return value.exit_code end
    return errors.exit_codes.runtime
end

return errors
