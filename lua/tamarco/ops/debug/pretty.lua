--- tamarco.ops.debug.pretty: values as readable text for the console — tables
-- with sorted keys, nested up to a depth, long ones cut, cycles named.
local pretty = {}

local MAX_ITEMS = 50

local function is_identifier(k)
    return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil
end

local function key_order(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then return ta < tb end
    if ta == "number" or ta == "string" then return a < b end
    return tostring(a) < tostring(b)
end

local function show(value, depth, indent, seen)
    local t = type(value)
    if t == "string" then return ("%q"):format(value):gsub("\\\n", "\\n") end
    if t ~= "table" then return tostring(value) end
    if seen[value] then return "<cycle " .. tostring(value) .. ">" end
    if depth <= 0 then return "{...}" end
    local mt = getmetatable(value)
    if mt and mt.__tostring then return tostring(value) end
    local keys = {}
    for k in pairs(value) do keys[#keys + 1] = k end
    if #keys == 0 then return "{}" end
    table.sort(keys, key_order)
    seen[value] = true
    local n = #value
    local parts = {}
    local inner = indent .. "  "
    for i, k in ipairs(keys) do
        if i > MAX_ITEMS then
            parts[#parts + 1] = inner .. ("... (%d more)"):format(#keys - MAX_ITEMS)
            break
        end
        local v = show(value[k], depth - 1, inner, seen)
        if type(k) == "number" and k >= 1 and k <= n and k % 1 == 0 then
            parts[#parts + 1] = inner .. v
        elseif is_identifier(k) then
            parts[#parts + 1] = inner .. k .. " = " .. v
        else
            parts[#parts + 1] = inner .. "[" .. show(k, 1, inner, seen) .. "] = " .. v
        end
    end
    seen[value] = nil
    return "{\n" .. table.concat(parts, ",\n") .. "\n" .. indent .. "}"
end

--- pretty.show(value[, depth = 3]) -> text
function pretty.show(value, depth)
    return (show(value, depth or 3, "", {}))
end

--- pretty.values(n, ...) -> the n values, one per line ("nil" for none).
function pretty.values(n, ...)
    if n == 0 then return "" end
    local parts = {}
    for i = 1, n do parts[i] = pretty.show((select(i, ...))) end
    return table.concat(parts, "\n")
end

return pretty
