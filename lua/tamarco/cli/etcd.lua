--- `tamarco-host etcd ...`: Tamarco's settings in etcd from the command line.
--
--   tamarco-host etcd write-yml FILE        every leaf of FILE -> one key
--   tamarco-host etcd read KEY [--recursive]   prints YAML
--   tamarco-host etcd delete KEY [--recursive]
--
-- KEY is a slash path (`/system/microservices/shop/port`) or dotted
-- (`system.microservices.shop.port`). write-yml stores each leaf of the
-- YAML mapping under the path of its keys as JSON, keeping its YAML type:
-- `1000` is stored as the number 1000, `"Yes"` (quoted) as the string "Yes",
-- `yes` as true, `1.0` as the float 1.0 (not 1), `null` and `~` as JSON null
-- (which the settings read as an absent key), lists as one JSON array, an
-- empty mapping as `{}`. read prints the value as YAML (strings that YAML
-- would type differently are quoted, floats keep their decimal point); with
-- --recursive, the keys below KEY as a YAML mapping. A value that is not JSON
-- prints as a string.
-- tamarco.clients.etcd loads libcurl: only when a sub-command runs, not for --help
-- (cli.lua reads this module's usage at start-up).
local etcd = setmetatable({}, { __index = function(_, k) return require("tamarco.clients.etcd")[k] end })
local yaml = require "tamarco.c.yaml"

local etcd_command = {}

etcd_command.usage = [[
usage: tamarco-host etcd <write-yml FILE | read KEY | delete KEY> [options]

  write-yml FILE   stores every leaf of the YAML file FILE in etcd, one key
                   per leaf (/a/b/c for a: {b: {c: ...}}), its value as JSON
                   with its YAML type kept (1000 a number, 1.0 a float,
                   "Yes" a string, ~ a JSON null); `write_yml` (Tamarco's
                   spelling) is the same
  read KEY         prints KEY's value as YAML
  delete KEY       deletes KEY (a KEY that only has keys below it needs
                   --recursive; without it nothing is deleted, exit 1)

options:
  --recursive      read/delete: every key below KEY too (read prints a mapping)
  --endpoints H:P,H:P,...
                   the members of an etcd cluster (default: TAMARCO_ETCD_ENDPOINTS);
                   a member that does not answer is skipped
  --host HOST      etcd's host (default: TAMARCO_ETCD_HOST, else 127.0.0.1)
  --port PORT      etcd's client port (default: TAMARCO_ETCD_PORT, else 2379)
  --user USER, --password PASSWORD
                   etcd authentication (default: TAMARCO_ETCD_USER/_PASSWORD)

KEY is /a/b/c or a.b.c. Exit codes: 0 done, 1 etcd error or key not found,
2 usage or unreadable file.
]]

---------------------------------------------------------------------------
-- YAML emitter
---------------------------------------------------------------------------

local function format_number(n)
    if n ~= n then return ".nan" end
    if n == math.huge then return ".inf" end
    if n == -math.huge then return "-.inf" end
    if n % 1 == 0 and math.abs(n) < 2 ^ 53 then return ("%d"):format(n) end
    for precision = 14, 17 do
        local text = ("%." .. precision .. "g"):format(n)
        if tonumber(text) == n then
            -- YAML 1.1 needs a dot for a float: 1e+20 -> 1.0e+20
            if not text:find("[%.n]") then text = text:gsub("^(-?%d+)", "%1.0") end
            return text
        end
    end
    return ("%.17g"):format(n)
end

local dq_escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
    ["\b"] = "\\b", ["\f"] = "\\f", ["\0"] = "\\0", ["\a"] = "\\a", ["\v"] = "\\v", ["\27"] = "\\e" }

local function quote(s)
    return '"' .. s:gsub('[%c"\\]', function(ch)
        return dq_escapes[ch] or ("\\x%02x"):format(ch:byte())
    end) .. '"'
end

--- A string as a YAML scalar: plain when it reads back as the same string,
-- else double-quoted.
local function format_string(s)
    if s:match("^[%w_./][%w _./%-]*$") and not s:find(" $") and yaml.resolve(s) == s then
        return s
    end
    return quote(s)
end

local function format_scalar(v)
    local t = type(v)
    if etcd.is_float(v) then
        local text = format_number(v.value)
        return text:find("[%.n]") and text or text .. ".0"
    end
    if v == nil or v == etcd.null then return "null" end
    if t == "boolean" then return v and "true" or "false" end
    if t == "number" then return format_number(v) end
    if t == "string" then return format_string(v) end
    return quote(tostring(v))
end

local function format_key(k)
    if type(k) == "number" then return format_number(k) end
    if k:match("^%d+$") then return k end   -- etcd path segments: 404 stays a number key
    return format_string(tostring(k))
end

local function sorted_keys(t)
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b)
        if type(a) == type(b) then return a < b end
        return type(a) == "number"
    end)
    return keys
end

local emit

-- Appends the lines of `value` at `indent`; `first` is the text before it on
-- its first line ("key:" or "-"), nil for a top-level value.
local function emit_collection(value, indent, out)
    local pad = (" "):rep(indent)
    if etcd.is_sequence(value) or (getmetatable(value) == yaml.sequence_mt) then
        for i = 1, #value do emit(value[i], indent, out, pad .. "-", true) end
    else
        for _, k in ipairs(sorted_keys(value)) do emit(value[k], indent, out, pad .. format_key(k) .. ":", false) end
    end
end

local function is_empty(value)
    return next(value) == nil
end

local function is_scalar(value)
    return type(value) ~= "table" or etcd.is_float(value)
end

emit = function(value, indent, out, head, in_list)
    if is_scalar(value) then
        out[#out + 1] = head .. " " .. format_scalar(value)
    elseif is_empty(value) then
        local empty = getmetatable(value) == yaml.sequence_mt and "[]" or "{}"
        out[#out + 1] = head .. " " .. empty
    elseif in_list then
        -- "- " then the collection indented by 2, its first line joined to "-"
        local sub = {}
        emit_collection(value, indent + 2, sub)
        sub[1] = head .. " " .. sub[1]:sub(indent + 3)
        for _, line in ipairs(sub) do out[#out + 1] = line end
    else
        out[#out + 1] = head
        local child = indent + 2
        if etcd.is_sequence(value) then child = indent end   -- "key:\n- a" is idiomatic
        emit_collection(value, child, out)
    end
end

--- etcd_command.to_yaml(value) -> YAML text (ends with a newline).
function etcd_command.to_yaml(value)
    if is_scalar(value) then return format_scalar(value) .. "\n" end
    if is_empty(value) then
        return (getmetatable(value) == yaml.sequence_mt and "[]" or "{}") .. "\n"
    end
    local out = {}
    emit_collection(value, 0, out)
    return table.concat(out, "\n") .. "\n"
end

--- etcd_command.flatten(tree[, prefix]) -> sorted list of {key, json}
-- (tamarco.clients.etcd.flatten).
etcd_command.flatten = etcd.flatten

local function normalize_key(key)
    if not key:find("/", 1, true) then key = key:gsub("%.", "/") end
    key = "/" .. key:gsub("^/+", ""):gsub("/+$", "")
    return key
end
etcd_command.normalize_key = normalize_key

---------------------------------------------------------------------------
-- the command
---------------------------------------------------------------------------

local function parse(args)
    local o = { positional = {} }
    local i = 1
    while i <= #args do
        local a = args[i]
        if a == "--recursive" or a == "-r" then
            o.recursive = true
            i = i + 1
        elseif a == "--host" or a == "--port" or a == "--user" or a == "--password" or a == "--endpoints" then
            local v = args[i + 1]
            if v == nil then return nil, "option " .. a .. " needs a value" end
            o[a:sub(3)] = v
            i = i + 2
        elseif a:sub(1, 1) == "-" and a ~= "-" then
            return nil, "unknown option '" .. a .. "'"
        else
            o.positional[#o.positional + 1] = a
            i = i + 1
        end
    end
    if o.port and not tonumber(o.port) then return nil, "--port needs a number (got '" .. o.port .. "')" end
    if o.endpoints then
        local _, err = etcd.parse_endpoints(o.endpoints)
        if err then return nil, "--endpoints: " .. err end
    end
    return o
end

local function client_of(o)
    local function env(name)
        local v = os.getenv(name)
        if v == "" then return nil end
        return v
    end
    local user, password = o.user or env("TAMARCO_ETCD_USER"), o.password or env("TAMARCO_ETCD_PASSWORD")
    if o.endpoints then return etcd.new { endpoints = o.endpoints, user = user, password = password } end
    if not o.host and not o.port and env("TAMARCO_ETCD_ENDPOINTS") then
        return etcd.new { endpoints = env("TAMARCO_ETCD_ENDPOINTS"), user = user, password = password }
    end
    return etcd.new {
        host = o.host or env("TAMARCO_ETCD_HOST") or "127.0.0.1",
        port = o.port or env("TAMARCO_ETCD_PORT") or etcd.DEFAULT_PORT,
        user = user,
        password = password,
    }
end

local function failure(message)
    io.stderr:write("tamarco-host etcd: ", message, "\n")
    return 1
end

local function decode_for_print(value)
    local decoded, err = etcd.decode_json(value, { floats = true })
    if err then return value end
    return decoded
end

local function write_yml(client, file)
    local tree, message = yaml.load_file(file, { null = etcd.null, float = etcd.float })
    if tree == nil and message then
        io.stderr:write("tamarco-host etcd: cannot read ", tostring(message), "\n")
        return 2
    end
    if tree == nil then tree = {} end
    if type(tree) ~= "table" or etcd.is_sequence(tree) or getmetatable(tree) == yaml.sequence_mt then
        io.stderr:write("tamarco-host etcd: ", file, ": the top level must be a mapping\n")
        return 2
    end
    local ok, leaves = pcall(etcd_command.flatten, tree)
    if not ok then
        io.stderr:write("tamarco-host etcd: ", file, ": ", tostring(leaves), "\n")
        return 2
    end
    for _, leaf in ipairs(leaves) do
        local revision, err = client:put(leaf.key, leaf.json)
        if not revision then return failure(err) end
    end
    print(("wrote %d keys from %s to etcd at %s"):format(#leaves, file, client:address()))
    return 0
end

local function read(client, key, recursive)
    if recursive then
        local kvs, err = client:range(key == "/" and "/" or key .. "/", { prefix = true })
        if not kvs then return failure(err) end
        local own
        if key ~= "/" then
            own, err = client:get(key)
            if err then return failure(err) end
        end
        if #kvs == 0 then
            if own == nil then return failure("no key " .. key .. " (nor below it)") end
            io.stdout:write(etcd_command.to_yaml(decode_for_print(own)))
            return 0
        end
        local tree = etcd.tree_of(kvs, key == "/" and "/" or key .. "/", decode_for_print)
        io.stdout:write(etcd_command.to_yaml(tree))
        return 0
    end
    local value, err = client:get(key)
    if value == nil then
        if type(err) == "string" then return failure(err) end
        return failure("no key " .. key .. " (use --recursive for the keys below it)")
    end
    io.stdout:write(etcd_command.to_yaml(decode_for_print(value)))
    return 0
end

local function delete(client, key, recursive)
    if not recursive then
        -- a directory of keys is only deleted when asked for: say so, as read does
        local value, err = client:get(key)
        if value == nil and type(err) == "string" then return failure(err) end
        if value == nil then
            local below
            below, err = client:range(key == "/" and "/" or key .. "/", { prefix = true })
            if not below then return failure(err) end
            if #below > 0 then
                return failure(("%s is not a key but holds %d key%s below it: pass --recursive to delete them")
                    :format(key, #below, #below == 1 and "" or "s"))
            end
            return failure("no key " .. key)
        end
    end
    local count, err = client:delete(key)
    if not count then return failure(err) end
    if recursive then
        local below
        below, err = client:delete(key == "/" and "/" or key .. "/", { prefix = true })
        if not below then return failure(err) end
        count = count + below
    end
    print(("deleted %d key%s"):format(count, count == 1 and "" or "s"))
    return 0
end

--- main(args) -> exit code | nil, usage error
function etcd_command.main(args)
    local o, err = parse(args)
    if not o then return nil, err end
    local sub, target = o.positional[1], o.positional[2]
    if sub == nil then return nil, "missing the sub-command (write-yml, read or delete)" end
    if sub == "write_yml" then sub = "write-yml" end        -- Tamarco's spelling
    if sub ~= "write-yml" and sub ~= "read" and sub ~= "delete" then
        return nil, "unknown sub-command '" .. sub .. "'"
    end
    if target == nil then
        return nil, sub == "write-yml" and "write-yml needs the YAML FILE" or sub .. " needs a KEY"
    end
    if o.positional[3] then return nil, "unexpected argument '" .. o.positional[3] .. "'" end
    if sub == "write-yml" and o.recursive then return nil, "write-yml takes no --recursive" end
    local client = client_of(o)
    local ok, code = pcall(etcd.run_sync, function()
        if sub == "write-yml" then return write_yml(client, target) end
        if sub == "read" then return read(client, normalize_key(target), o.recursive) end
        return delete(client, normalize_key(target), o.recursive)
    end)
    if not ok then return failure(tostring(code)) end
    return code
end

return etcd_command
