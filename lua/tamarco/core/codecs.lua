--- tamarco.core.codecs: how message payloads become bytes and back.
--
--   local codecs = require "tamarco.core.codecs"
--   local codec = codecs.get("json")            -- "json" (default), "yaml", "raw"
--   local bytes, err = codec.encode({ n = 1 })  -- bytes | nil, err
--   local value, err = codec.decode(bytes)      -- value, nil | nil, err
--
-- A codec is a table { name, content_type, encode, decode }; `codecs.get`
-- also accepts such a table (a service's own codec) and returns it after a
-- check. `decode` signals failure only through its second result, so that a
-- payload that decodes to nil (YAML `~`) is not an error. JSON null decodes
-- to `json.null` (== cjson.null).
--
--   json  tamarco.json: strict decoding (`NaN`, `0x10`, `1e400`... are
--         errors), `[]`/`{}` and `1.0` survive a round trip; see json.lua.
--   yaml  decode with tamarco.c.yaml (libyaml); encode with the small block
--         style emitter below (maps with sorted keys, sequences, scalars;
--         strings that YAML would read as something else are quoted).
--   raw   strings as they are (numbers are converted with tostring).
local json = require "tamarco.core.json"

local codecs = {}

codecs.json = {
    name = "json",
    content_type = "application/json",
    encode = json.encode,
    decode = function(bytes)
        if type(bytes) ~= "string" then return nil, "the json codec decodes strings" end
        return json.decode(bytes)
    end,
}

-- ---- YAML ----

local yaml_c
local function yaml_lib()
    if not yaml_c then yaml_c = require "tamarco.c.yaml" end
    return yaml_c
end

local function yaml_quote(s)
    return '"' .. s:gsub('[%c"\\]', function(ch)
        if ch == '"' then return '\\"' end
        if ch == "\\" then return "\\\\" end
        if ch == "\n" then return "\\n" end
        if ch == "\t" then return "\\t" end
        if ch == "\r" then return "\\r" end
        return ("\\x%02X"):format(ch:byte())
    end) .. '"'
end

-- A plain scalar is safe when YAML reads it back as the same string.
local function yaml_string(s)
    if s == "" or s:find("^[%s]") or s:find("[%s]$") or s:find("[%c]")
        or s:find("^[-?:,%[%]{}#&*!|>'\"%%@`]") or s:find(": ", 1, true) or s:find(" #", 1, true)
        or s:sub(-1) == ":" then
        return yaml_quote(s)
    end
    local resolved = yaml_lib().resolve(s)
    if resolved ~= s then return yaml_quote(s) end
    return s
end

local function yaml_scalar(v)
    local t = type(v)
    if v == nil or v == json.null then return "null" end
    if t == "boolean" then return v and "true" or "false" end
    if t == "number" then
        if v ~= v then return ".nan" end
        if v == math.huge then return ".inf" end
        if v == -math.huge then return "-.inf" end
        if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return ("%d"):format(v) end
        return ("%.17g"):format(v)
    end
    if t == "string" then return yaml_string(v) end
    error("cannot encode a " .. t .. " as YAML", 0)
end

-- As tamarco.json decides: the array and object markers first, then a plain
-- table with keys exactly 1..n is a sequence (an empty one a mapping).
local function is_array(t)
    local mt = getmetatable(t)
    if mt == json.array_mt then return true, #t end
    if mt == json.object_mt then return false, #t end
    local n = #t
    local count = 0
    for _ in pairs(t) do count = count + 1 end
    return n > 0 and count == n, n
end

local function emit(out, v, indent, seen)
    if type(v) ~= "table" then
        out[#out + 1] = yaml_scalar(v)
        return
    end
    if seen[v] then error("cannot encode a table that contains itself", 0) end
    seen[v] = true
    local array, n = is_array(v)
    local pad = ("  "):rep(indent)
    if next(v) == nil then
        out[#out + 1] = array and "[]" or "{}"
    elseif array then
        for i = 1, n do
            out[#out + 1] = "\n" .. pad .. "- "
            local item = v[i]
            if type(item) == "table" and next(item) ~= nil then
                emit(out, item, indent + 1, seen)
            elseif type(item) == "table" then
                out[#out + 1] = is_array(item) and "[]" or "{}"
            else
                out[#out + 1] = yaml_scalar(item)
            end
        end
    else
        local keys = {}
        for k in pairs(v) do
            local kt = type(k)
            if kt ~= "string" and kt ~= "number" and kt ~= "boolean" then
                error("cannot encode a " .. kt .. " key as YAML", 0)
            end
            keys[#keys + 1] = k
        end
        table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
        for _, k in ipairs(keys) do
            out[#out + 1] = "\n" .. pad .. yaml_scalar(k) .. ":"
            local item = v[k]
            if type(item) == "table" and next(item) ~= nil then
                emit(out, item, indent + 1, seen)
            else
                out[#out + 1] = " " .. (type(item) == "table" and (is_array(item) and "[]" or "{}")
                    or yaml_scalar(item))
            end
        end
    end
    seen[v] = nil
end

codecs.yaml = {
    name = "yaml",
    content_type = "application/yaml",
    encode = function(value)
        local out = {}
        local ok, err = pcall(emit, out, value, 0, {})
        if not ok then return nil, tostring(err) end
        local text = table.concat(out)
        if text:sub(1, 1) == "\n" then text = text:sub(2) end
        return text .. "\n"
    end,
    decode = function(bytes)
        local value, err, line, column = yaml_lib().parse(bytes, "message")
        if value == nil and err ~= nil then
            if line then err = ("%s (line %s, column %s)"):format(err, line, column) end
            return nil, err
        end
        return value, nil
    end,
}

codecs.raw = {
    name = "raw",
    content_type = "application/octet-stream",
    encode = function(value)
        local t = type(value)
        if t == "string" then return value end
        if t == "number" then return tostring(value) end
        return nil, "the raw codec sends strings (got a " .. t .. ")"
    end,
    decode = function(bytes) return bytes, nil end,
}

--- codecs.get(name_or_codec) -> codec; raises on an unknown name.
function codecs.get(codec)
    if codec == nil then return codecs.json end
    if type(codec) == "table" then
        assert(type(codec.encode) == "function" and type(codec.decode) == "function",
            "a codec needs encode and decode functions")
        return codec
    end
    local found = codecs[codec]
    if type(found) ~= "table" or not found.encode then
        error("unknown codec '" .. tostring(codec) .. "' (json, yaml or raw)", 2)
    end
    return found
end

return codecs
