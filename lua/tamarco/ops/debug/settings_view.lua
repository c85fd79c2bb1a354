--- tamarco.ops.debug.settings_view: the effective settings of a running service,
-- each value with where it comes from (file:line, environment variable,
-- etcd key, the built-in defaults), secrets masked (`/debug/settings`, the
-- console's `settings [key]`).
local logging = require "tamarco.core.logging"
local settings = require "tamarco.core.settings"

local settings_view = {}

local MASK = "***"

local function is_list(t)
    return type(t) == "table" and (next(t) == nil or t[1] ~= nil)
end

local function secret_path(parts)
    for _, part in ipairs(parts) do
        if logging.is_secret_key(part) then return true end
    end
    return false
end

-- leaves of `tree` below `parts`: lists and scalars are leaves
local function walk(tree, parts, out)
    local keys = {}
    for k in pairs(tree) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    for _, k in ipairs(keys) do
        local v = tree[k]
        if v == nil then v = tree[tonumber(k)] end
        local path = { unpack(parts) }
        path[#path + 1] = k
        if type(v) == "table" and not is_list(v) then
            walk(v, path, out)
        else
            out[#out + 1] = { path = path, value = v }
        end
    end
end

--- settings_view.entries(store[, prefix]) -> list of { key, value, origin }
-- sorted by key; `prefix` (dotted) keeps only that subtree.
function settings_view.entries(store, prefix)
    local tree = store.tree or {}
    local base = {}
    if prefix and prefix ~= "" then
        base = settings.split_key(prefix)
        for _, part in ipairs(base) do
            if type(tree) ~= "table" then return {} end
            tree = tree[part]
        end
        if tree == nil then return {} end
    end
    local leaves = {}
    if type(tree) == "table" and not is_list(tree) then
        walk(tree, base, leaves)
    else
        leaves[1] = { path = base, value = tree }
    end
    local out = {}
    for _, leaf in ipairs(leaves) do
        local key = table.concat(leaf.path, ".")
        local value = leaf.value
        if secret_path(leaf.path) then
            value = MASK
        elseif type(value) == "table" then
            value = logging.mask(value)
        end
        out[#out + 1] = { key = key, value = value, origin = store:origin(key) or "?" }
    end
    return out
end

local function show(value)
    if type(value) == "table" then
        return require("tamarco.core.json").encode(value) or tostring(value)
    end
    if type(value) == "string" then return ("%q"):format(value) end
    return tostring(value)
end
settings_view.show = show

--- settings_view.to_text(entries) -> one line per setting: key, value
-- (secrets masked) and where it comes from.
function settings_view.to_text(entries)
    local lines = {}
    for _, e in ipairs(entries) do
        lines[#lines + 1] = ("%s = %s    (%s)"):format(e.key, show(e.value), e.origin)
    end
    return table.concat(lines, "\n") .. "\n"
end

return settings_view
