--- tamarco.core.json: the one JSON codec of the framework (HTTP bodies, AMQP and
-- Redis codecs, etcd values, reports). The bytes are handled in C
-- (bindings/json.c).
--
--   local json = require "tamarco.core.json"
--   local value, err = json.decode(text)     -- value | nil, "invalid JSON: ..."
--   local text, err = json.encode(value)     -- text | nil, "cannot encode ..."
--
-- Decoding is strict JSON (RFC 8259): `0x10`, `01`, `NaN`, `inf`,
-- `-Infinity`, `1e400` (beyond a double), control characters or invalid
-- UTF-8 in strings and trailing characters are errors, with the character
-- where it went wrong. JSON null decodes to `json.null` (equal to cjson.null
-- and to the Redis binding's nil element). Nesting is limited to 200 levels.
--
-- Round trips keep what Lua alone would lose:
--   * arrays decode with `json.array_mt` (the YAML binding's sequence_mt),
--     objects with `json.object_mt`, so `[]` stays `[]` and `{}` stays `{}`;
--   * a number written as a float whose value is integral (`1.0`, `2e3`)
--     encodes back as a float (`1.0`, `2000.0`) while its table holds it
--     at the same key with an integral value.
-- For values built in Lua: `json.array(t)` and `json.object(t)` mark a
-- table (an empty plain table encodes as `{}`; a plain table whose keys are
-- exactly 1..n as an array, other plain tables as objects with number keys
-- written as strings), and `json.float(n)` boxes a number that must be
-- written as a float.
--
-- Encoding refuses NaN, infinities, functions, userdata, coroutines, keys
-- other than strings and numbers, and tables nested deeper than 200 levels
-- (or containing themselves). Bytes of strings that are not valid UTF-8
-- are written as \ufffd, so the output is always valid JSON.
local c = require "tamarco.c.codec"

local json = {}

json.null = c.json_null
json.array_mt = c.json_array_mt
json.object_mt = c.json_object_mt
json.content_type = "application/json"

--- json.decode(text[, options]) -> value | nil, message.
-- options.floats = true boxes every number written with a fraction or an
-- exponent with json.float (for tools that must keep 1.0 apart from 1).
json.decode = c.json_decode

--- json.encode(value) -> text | nil, message.
json.encode = c.json_encode

--- json.array([t]) -> t (or a new table) marked to encode as an array.
function json.array(t) return setmetatable(t or {}, json.array_mt) end

--- json.object([t]) -> t (or a new table) marked to encode as an object.
function json.object(t) return setmetatable(t or {}, json.object_mt) end

--- json.is_array(v) -> true when v decoded from an array or was marked one.
function json.is_array(v) return getmetatable(v) == json.array_mt end

--- json.is_sequence(t) -> true when the table t is a list: marked as an
-- array (json.array_mt, what YAML and JSON lists decode with) or with the
-- keys 1..#t and no other (an empty unmarked table is not: it is a map).
function json.is_sequence(t)
    if getmetatable(t) == json.array_mt then return true end
    local n = #t
    if n == 0 then return false end
    for k in pairs(t) do
        if type(k) ~= "number" or k < 1 or k > n or k % 1 ~= 0 then return false end
    end
    return true
end

local Float = c.json_float_mt
--- json.float(n) -> n boxed so that it encodes with a decimal point (1.0).
function json.float(n)
    assert(type(n) == "number", "json.float expects a number")
    return setmetatable({ value = n }, Float)
end
--- json.is_float(v) -> true for a json.float box (its number is v.value).
function json.is_float(v) return getmetatable(v) == Float end

return json
