--- tamarco.core.metrics.naming: what metric and label names may be, how values
-- and label values are written in the exposition, and the name a metric id
-- is exposed under (namespace prefix, `_total` in Prometheus naming). Shared
-- by the registry (tamarco.metrics) and the encoders (tamarco.core.metrics.prometheus,
-- the reporters); tamarco.metrics re-exports every function.
local cmetrics = require "tamarco.c.metrics"

local naming = {}

--- naming.valid_metric_name(name) -> true when name matches [a-zA-Z_:][a-zA-Z0-9_:]*.
function naming.valid_metric_name(name)
    return type(name) == "string" and name:find("^[%a_:][%w_:]*$") ~= nil
end

--- naming.valid_label_name(name) -> true when name matches [a-zA-Z_][a-zA-Z0-9_]*
-- and does not start with "__" (reserved by Prometheus).
function naming.valid_label_name(name)
    return type(name) == "string" and name:find("^[%a_][%w_]*$") ~= nil and name:sub(1, 2) ~= "__"
end

--- naming.escape_label_value(v) -> v with \ " and newline escaped for the text format.
function naming.escape_label_value(v)
    if v:find('[\\"\n]') then
        v = v:gsub('[\\"\n]', { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" })
    end
    return v
end

--- naming.format_value(v) -> text: integers without exponent, +Inf, -Inf,
-- NaN, other floats in the shortest form that reads back exactly (in C).
naming.format_value = cmetrics.format_value

--- naming.sanitize_name(name) -> a valid metric name prefix made of name.
function naming.sanitize_name(name)
    name = tostring(name):gsub("[^%w_]", "_")
    if name == "" or name:find("^%d") then name = "_" .. name end
    return name
end

local namespace = nil

--- naming.set_namespace(name): exposed names become <name>_<id> (name
-- sanitized); nil for no prefix.
function naming.set_namespace(name)
    namespace = name ~= nil and naming.sanitize_name(name) or nil
end

--- naming.namespace() -> the current prefix, or nil.
function naming.namespace() return namespace end

--- naming.exposed_name(id[, kind[, namespace[, naming]]]) -> the name in
-- the exposition (naming "tamarco": no "_total" suffix). namespace nil: the
-- current one; false: none.
function naming.exposed_name(id, kind, ns, mode)
    if ns == nil then ns = namespace elseif ns then ns = naming.sanitize_name(ns) end
    local name = ns and (ns .. "_" .. id) or id
    if kind == "counter" and mode ~= "tamarco" and name:sub(-6) ~= "_total" then name = name .. "_total" end
    return name
end

return naming
