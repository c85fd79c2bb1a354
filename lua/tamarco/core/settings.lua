--- tamarco.core.settings: Tamarco's settings model (DESIGN §5).
--
-- KEYS are dotted (`system.microservices.my_admin.default_user`) or
-- Tamarco's slash paths (`/system/microservices/my_admin/default_user`); both
-- are accepted everywhere. A segment that is a number also finds an integer
-- key (`system.ports.1` reads the first element of a list, `codes.404` a YAML
-- key `404:`). Keys handed to callbacks are dotted. In a view, `/system/...`
-- paths and (when the view has no match) dotted `system.` keys are absolute;
-- opts.raw makes any key absolute (Tamarco's raw form).
--
-- WRITING: store:set / store:delete (and a view's set / delete) write through
-- to the writable source with the highest precedence (etcd: a source with a
-- `write(self, key, value)` method) and apply the change at once.
--
-- CHECKS: store.validate(candidate_store) -> true | nil, err, when set, is
-- asked before any change (a source that changed, set, delete) is applied;
-- a refused change is logged through store.log and the last good settings
-- stay (tamarco-host run sets it to tamarco.core.settings_schema's checks).
--
-- SOURCES, later wins, deep-merged (mappings merge key by key; lists and
-- scalars replace what is below them as a whole):
--   1. built-in defaults (`settings.builtin_defaults`)
--   2. `defaults` given by the caller (e.g. a resource's defaults)
--   3. the service's own `dict`
--   4. the YAML file: `yaml_file`, else $TAMARCO_YML_FILE (`yaml_file = false`
--      means no file even when the variable is set)
--   5. the environment, when `environ = true`
-- More sources (etcd) are added with `store:add_source`.
--
-- ENVIRONMENT format: a variable `TAMARCO__<SEGMENT>__<SEGMENT>...=<value>`
-- sets the key made of the segments, lowercased, joined by dots; a double
-- underscore separates segments, a single one stays part of the segment:
--     TAMARCO__SYSTEM__LOGGING__PROFILE=PRODUCTION  -> system.logging.profile = "PRODUCTION"
--     TAMARCO__SYSTEM__STOP_TIMEOUT_SECONDS=5       -> system.stop_timeout_seconds = 5
-- The value is typed as a plain YAML scalar (numbers, booleans stay typed:
-- `5` is a number, `yes` is true, `"5"` with its quotes is the string `"5"`
-- quotes included). An empty value is null: it sets nothing. Variables that
-- do not start with `TAMARCO__` (e.g. TAMARCO_YML_FILE) are not settings.
--
-- SOURCE interface (the YAML file and the environment are sources; etcd is
-- one more):
--   source = {
--     name = "etcd",                       -- for messages and `add_source` positions
--     load = function(self) -> tree | nil [, err]
--         -- the source's whole tree (a nested table, e.g. { system = {...} });
--         -- nil without err means "empty"; nil, err is a failure (err: a
--         -- tamarco settings error or a string). May yield when the caller
--         -- runs in a task (settings.load, reload and add_source then must too).
--     watch = function(self, on_tree_changed) -> true | nil, err   -- optional
--         -- start watching; whenever the content changes call
--         -- on_tree_changed(self:load()) i.e. on_tree_changed(tree) or
--         -- on_tree_changed(nil, err); an error keeps the previous values and
--         -- is logged as a warning. Called by store:start_watching().
--     close = function(self) end           -- optional: stop watching, close handles
--     locate = function(self, key) -> text, fields   -- optional: where the
--         -- source holds dotted `key` ("settings.yml:12", "etcd key /a/b"),
--         -- for messages (see store:origin)
--   }
--
-- VALUES returned by get are copies: mutating them does not change the store.
-- YAML null values are absent keys (so they do not override lower sources).
local yaml = require "tamarco.c.yaml"
local errors = require "tamarco.core.errors"
local json = require "tamarco.core.json"

local settings = {}

settings.builtin_defaults = {
    system = {
        deploy_name = "tamarco",
        logging = { profile = "DEVELOP", stdout = true },
        stop_timeout_seconds = 30,
        resources = {
            tamarco_http_report_server = { host = "127.0.0.1", port = 5747 },
        },
    },
}

settings.environ_prefix = "TAMARCO__"

local spawn = require("tamarco.c.scheduler").spawn

---------------------------------------------------------------------------
-- trees
---------------------------------------------------------------------------

local is_sequence = json.is_sequence

local function is_map(v)
    return type(v) == "table" and not is_sequence(v)
end

local function copy(v)
    if type(v) ~= "table" then return v end
    local c = {}
    for k, x in pairs(v) do c[k] = copy(x) end
    return setmetatable(c, getmetatable(v))
end

local function equal(a, b)
    if a == b then return true end
    if type(a) ~= "table" or type(b) ~= "table" then
        return a ~= a and b ~= b     -- NaN equals NaN here: no endless "changes"
    end
    if is_sequence(a) ~= is_sequence(b) then return false end
    for k, x in pairs(a) do
        if not equal(x, b[k]) then return false end
    end
    for k in pairs(b) do
        if a[k] == nil then return false end
    end
    return true
end

-- Deep-merges a copy of `src` into the map `dst`.
local function merge(dst, src)
    for k, v in pairs(src) do
        if is_map(v) and is_map(dst[k]) then
            merge(dst[k], v)
        else
            dst[k] = copy(v)
        end
    end
    return dst
end

--- settings.split_key(key) -> { segments }: dotted or slash keys.
function settings.split_key(key)
    if type(key) ~= "string" then
        error("settings key must be a string, got " .. type(key), 3)
    end
    local pattern = key:find("/", 1, true) and "[^/]+" or "[^.]+"
    local path = {}
    for segment in key:gmatch(pattern) do path[#path + 1] = segment end
    return path
end

local function join(path)
    local parts = {}
    for i, segment in ipairs(path) do parts[i] = tostring(segment) end
    return table.concat(parts, ".")
end

local function concat(a, b)
    local r = {}
    for _, s in ipairs(a) do r[#r + 1] = s end
    for _, s in ipairs(b) do r[#r + 1] = s end
    return r
end

-- lookup(tree, path) -> found, value
local function lookup(tree, path)
    local node = tree
    for _, segment in ipairs(path) do
        if type(node) ~= "table" then return false end
        local v = node[segment]
        if v == nil and tonumber(segment) then v = node[tonumber(segment)] end
        if v == nil then return false end
        node = v
    end
    return true, node
end

local function set_path(tree, path, value)
    local node = tree
    for i = 1, #path - 1 do
        if type(node[path[i]]) ~= "table" then node[path[i]] = {} end
        node = node[path[i]]
    end
    node[path[#path]] = value
end

-- Changed leaves between two maps, as { {key, value}, ... } sorted by key.
local function emit_leaves(v, key, out, removed)
    if is_map(v) and next(v) ~= nil then
        for k, x in pairs(v) do emit_leaves(x, key .. "." .. tostring(k), out, removed) end
    else
        local change = { key = key }
        if not removed then change.value = copy(v) end
        out[#out + 1] = change
    end
end

local function diff(a, b, prefix, out)
    for k, av in pairs(a) do
        local key, bv = prefix .. tostring(k), b[k]
        if bv == nil then
            emit_leaves(av, key, out, true)
        elseif is_map(av) and is_map(bv) then
            diff(av, bv, key .. ".", out)
        elseif not equal(av, bv) then
            emit_leaves(bv, key, out, false)
        end
    end
    for k, bv in pairs(b) do
        if a[k] == nil then emit_leaves(bv, prefix .. tostring(k), out, false) end
    end
    return out
end

local function as_error(err, source_name)
    if errors.is(err) then return err end
    return errors.new("settings", ("settings source %s: %s"):format(source_name, tostring(err)))
end

---------------------------------------------------------------------------
-- sources
---------------------------------------------------------------------------

--- settings.static_source(name, tree): a source that never changes.
local STATIC_ORIGINS = { builtin = "the built-in defaults", defaults = "the defaults",
    dict = "the service's own settings" }

--- settings.static_source(name, tree) -> a settings source that always holds `tree`.
function settings.static_source(name, tree)
    assert(type(tree) == "table", "static_source: tree must be a table")
    return { name = name, tree = tree, load = function(self) return self.tree end,
        locate = function(self) return STATIC_ORIGINS[self.name] or self.name end }
end

local YamlSource = {}
YamlSource.__index = YamlSource

--- settings.yaml_source(path): the YAML file, watched through its directory
-- (editors replace files by renaming), reloads debounced by `debounce_ms`.
function settings.yaml_source(path)
    assert(type(path) == "string", "yaml_source: path must be a string")
    return setmetatable({ name = "yaml", path = path, debounce_ms = 50 }, YamlSource)
end

function YamlSource:load()
    local value, message, line, column = yaml.load_file(self.path, { lines = true })
    if value == nil and type(message) == "string" then
        return nil, errors.new("settings", "settings file " .. message,
            { file = self.path, line = line, column = column })
    end
    if value == nil then
        self.lines = nil
        return {}
    end
    if not is_map(value) then
        return nil, errors.new("settings", ("settings file %s: the top level must be a mapping of settings, not a %s")
            :format(self.path, type(value) == "table" and "sequence" or type(value)), { file = self.path })
    end
    self.lines = message
    return value
end

function YamlSource:locate(key)
    local line = self.lines and self.lines[key]
    if line then return ("settings file %s:%d"):format(self.path, line), { file = self.path, line = line } end
    return "settings file " .. self.path, { file = self.path }
end

function YamlSource:watch(on_tree_changed)
    local uv = require "luv"
    self:close()
    local dir, base = self.path:match("^(.*)/([^/]+)$")
    if not dir then dir, base = ".", self.path end
    if dir == "" then dir = "/" end
    local event, timer = uv.new_fs_event(), uv.new_timer()
    self._event, self._timer = event, timer
    local function reload()
        if self._timer ~= timer then return end      -- closed meanwhile
        on_tree_changed(self:load())
    end
    local ok, err = event:start(dir, {}, function(watch_err, filename)
        if watch_err or (filename and filename ~= base) then return end
        timer:stop()
        timer:start(self.debounce_ms, 0, function() spawn(reload) end)
    end)
    if not ok then
        self:close()
        return nil, ("cannot watch %s: %s"):format(dir, tostring(err))
    end
    return true
end

function YamlSource:close()
    for _, field in ipairs({ "_event", "_timer" }) do
        local handle = self[field]
        if handle then
            self[field] = nil
            if not handle:is_closing() then handle:stop(); handle:close() end
        end
    end
end

--- settings.environ_source([prefix]): TAMARCO__A__B=value -> a.b = value.
function settings.environ_source(prefix)
    prefix = prefix or settings.environ_prefix
    return {
        name = "environ",
        locate = function(_, key)
            return "environment variable " .. prefix .. key:upper():gsub("%.", "__")
        end,
        load = function()
            local environ = require("luv").os_environ()
            local names = {}
            for name in pairs(environ) do
                if name:sub(1, #prefix) == prefix then names[#names + 1] = name end
            end
            table.sort(names)       -- a.b after a: the longer key refines
            local tree = {}
            for _, name in ipairs(names) do
                local path = {}
                for segment in (name:sub(#prefix + 1) .. "__"):gmatch("(.-)__") do
                    if segment ~= "" then path[#path + 1] = segment:lower() end
                end
                local value = yaml.resolve(environ[name])
                if #path > 0 and value ~= nil then set_path(tree, path, value) end
            end
            return tree
        end,
    }
end

---------------------------------------------------------------------------
-- the store
---------------------------------------------------------------------------

local Store = {}
Store.__index = Store

local function default_log(level, message)
    io.stderr:write(("[settings] %s: %s\n"):format(level, message))
end

local function new_store()
    return setmetatable({
        entries = {},        -- { source = source, tree = tree }, lowest precedence first
        tree = {},           -- the merged tree (never handed out)
        yaml_file = nil,
        log = default_log,   -- store.log = function(level, message) end
        validate = nil,      -- store.validate = function(candidate_store) -> true | nil, err:
                             -- a changed source is applied only when it says true
        _watches = {},
        _listeners = {},
        _watching = false,
    }, Store)
end

function Store:_missing(keys)
    local quoted = {}
    for i, k in ipairs(keys) do quoted[i] = "'" .. k .. "'" end
    return errors.new("settings",
        ("missing setting %s (not in defaults, settings file %s, or environment)")
            :format(table.concat(quoted, " or "), self.yaml_file or "none"),
        { key = keys[1] })
end

-- Recomputes the merged tree and tells watchers and listeners what changed.
function Store:_recompute()
    local tree = {}
    for _, entry in ipairs(self.entries) do
        if entry.tree then merge(tree, entry.tree) end
    end
    local old = self.tree
    self.tree = tree
    if next(self._listeners) ~= nil then
        local changes = diff(old, tree, "", {})
        table.sort(changes, function(a, b) return a.key < b.key end)
        for _, listener in ipairs(self._listeners) do
            for _, change in ipairs(changes) do spawn(listener.fn, change.key, copy(change.value)) end
        end
    end
    for _, w in ipairs(self._watches) do
        local _, value = w.resolve()
        if not equal(value, w.last) then
            w.last = copy(value)
            spawn(w.fn, copy(value), w.key)
        end
    end
end

--- store:origin(key) -> text, fields: where the value of dotted `key` comes
-- from ("settings file /etc/svc.yml:12", "environment variable
-- TAMARCO__SYSTEM__X", "etcd key /system/x", "the built-in defaults"), for
-- messages; fields has file and line when known. nil when no source has it.
function Store:origin(key)
    local path = settings.split_key(key)
    local dotted = join(path)
    for i = #self.entries, 1, -1 do
        local entry = self.entries[i]
        if entry.tree and lookup(entry.tree, path) then
            if entry.source.locate then return entry.source:locate(dotted) end
            return entry.source.name, {}
        end
    end
    return nil
end

--- store:get(key[, default]) -> value (a copy for subtrees); raises a
-- settings error naming the key when it is missing and no default is given.
function Store:get(key, ...)
    local path = settings.split_key(key)
    local found, value = lookup(self.tree, path)
    if found then return copy(value) end
    if select("#", ...) > 0 then return (...) end
    error(self:_missing({ join(path) }), 2)
end

local Handle = {}
Handle.__index = Handle
function Handle:cancel()
    local list = self.list
    for i = #list, 1, -1 do
        if list[i] == self then table.remove(list, i) end
    end
end

function Store:_add_watch(key, resolve, fn)
    assert(type(fn) == "function", "watch: fn must be a function")
    local _, value = resolve()
    local w = setmetatable({ key = key, resolve = resolve, fn = fn, last = copy(value),
                             list = self._watches }, Handle)
    table.insert(self._watches, w)
    return w
end

--- store:watch(key, fn) -> handle: fn(value, key) runs in its own task each
-- time the value at key really changes (deep compare). handle:cancel().
function Store:watch(key, fn)
    local path = settings.split_key(key)
    return self:_add_watch(key, function()
        local found, value = lookup(self.tree, path)
        if found then return true, value end
        return false, nil
    end, fn)
end

--- store:on_change(fn) -> handle: fn(key, value) for every changed leaf key
-- (value nil when removed), each call in its own task.
function Store:on_change(fn)
    assert(type(fn) == "function", "on_change: fn must be a function")
    local listener = setmetatable({ fn = fn, list = self._listeners }, Handle)
    table.insert(self._listeners, listener)
    return listener
end

---------------------------------------------------------------------------
-- views
---------------------------------------------------------------------------

local View = {}
View.__index = View

-- Absolute keys: Tamarco's paths from the root (`/system/...`), or any key
-- with opts.raw (Tamarco's `raw=True`), are read from the root of the
-- settings. (Another slash key, `/logging/profile`, is relative to the view
-- like its dotted form: everything the framework reads is under /system.)
local function is_absolute(key, opts)
    return (opts and opts.raw)
        or (type(key) == "string" and (key == "/system" or key:sub(1, 8) == "/system/"))
end

-- The candidate full paths of `key`, most specific first, and the absolute
-- path to fall back on when none of them exists (a dotted key whose first
-- segment is `system`: `system.foo.cow` means what it says when the view
-- has no `system` of its own).
function View:_candidates(key, opts)
    local path = settings.split_key(key)
    if is_absolute(key, opts) then return { path } end
    local candidates = {}
    for i, prefix in ipairs(self._prefixes) do candidates[i] = concat(prefix, path) end
    if path[1] == "system" then return candidates, path end
    return candidates
end

-- resolve(key[, opts]) -> found, value (not copied), candidate keys. When the
-- most specific value is a mapping, the more general mappings below it are
-- merged under it (a service overrides single keys of a shared section).
function View:_resolve(key, opts)
    local candidates, absolute = self:_candidates(key, opts)
    local found = {}
    for _, path in ipairs(candidates) do
        local ok, value = lookup(self.store.tree, path)
        if ok then found[#found + 1] = value end
    end
    if #found == 0 and absolute then
        candidates[#candidates + 1] = absolute
        local ok, value = lookup(self.store.tree, absolute)
        if ok then return true, value, candidates end
    end
    if #found == 0 then return false, nil, candidates end
    if not is_map(found[1]) then return true, found[1], candidates end
    local last = 1
    while found[last + 1] ~= nil and is_map(found[last + 1]) do last = last + 1 end
    local merged = {}
    for i = last, 1, -1 do merge(merged, found[i]) end
    return true, merged, candidates
end

--- view:get(key[, default[, opts]]) -> value. opts.raw = true reads `key`
-- from the root (as does a key starting with "/").
function View:get(key, ...)
    local opts = select(2, ...)
    local found, value, candidates = self:_resolve(key, opts)
    if found then return copy(value) end
    if select("#", ...) > 0 then return (...) end
    local keys = {}
    for i, path in ipairs(candidates) do keys[i] = join(path) end
    error(self.store:_missing(keys), 2)
end

--- view:key_of(key) -> the full dotted key get would read (the most specific
-- one when none exists).
function View:key_of(key, opts)
    local candidates, absolute = self:_candidates(key, opts)
    for _, path in ipairs(candidates) do
        if lookup(self.store.tree, path) then return join(path) end
    end
    if absolute and lookup(self.store.tree, absolute) then return join(absolute) end
    return join(candidates[1])
end

--- view:origin(key) -> full dotted key, and where its value comes from
-- (text, fields as store:origin; nil when no source has it).
function View:origin(key)
    local full = self:key_of(key)
    return full, self.store:origin(full)
end

--- view:error(key, problem) -> a settings error (exit code 2) naming where
-- the value of `key` comes from, the full key and the problem:
-- "settings file /etc/svc.yml:12: system.resources.api.port: must be a number".
function View:error(key, problem)
    local full, where, fields = self:origin(key)
    local e = { key = full }
    for k, v in pairs(fields or {}) do e[k] = v end
    return errors.new("settings", (where and where .. ": " or "") .. full .. ": " .. problem, e)
end

--- view:watch(key, fn[, opts]) -> handle: fn(value, key) when what
-- get(key, nil, opts) returns changes.
function View:watch(key, fn, opts)
    return self.store:_add_watch(key, function() return self:_resolve(key, opts) end, fn)
end

--- view:set(key, value[, opts]) -> true | nil, err: writes the setting
-- where get(key) reads it (the existing key, else the most specific one;
-- opts.raw or a leading "/": `key` from the root) through to the store's
-- writable source (etcd). Runs inside a task.
function View:set(key, value, opts)
    return self.store:set(self:key_of(key, opts), value)
end

--- view:delete(key[, opts]) -> true | nil, err: removes it (and what is
-- below it) from the writable source (etcd).
function View:delete(key, opts)
    return self.store:delete(self:key_of(key, opts))
end

local function new_view(store, prefixes)
    return setmetatable({ store = store, _prefixes = prefixes }, View)
end

--- store:view(service_name): system.microservices.<svc>.<key>, then system.<key>.
function Store:view(service_name)
    assert(type(service_name) == "string", "view: service name must be a string")
    return new_view(self, { { "system", "microservices", service_name }, { "system" } })
end

--- store:resource_view(service_name, resource_name):
-- system.microservices.<svc>.resources.<name>.<key>, then system.resources.<name>.<key>.
function Store:resource_view(service_name, resource_name)
    assert(type(service_name) == "string", "resource_view: service name must be a string")
    assert(type(resource_name) == "string", "resource_view: resource name must be a string")
    return new_view(self, {
        { "system", "microservices", service_name, "resources", resource_name },
        { "system", "resources", resource_name },
    })
end

---------------------------------------------------------------------------
-- sources in the store
---------------------------------------------------------------------------

local function load_source(source)
    local ok, tree, err = pcall(source.load, source)
    if not ok then return nil, as_error(tree, source.name) end
    if tree == nil and err ~= nil then return nil, as_error(err, source.name) end
    if tree ~= nil and type(tree) ~= "table" then
        return nil, as_error("load returned a " .. type(tree) .. ", not a table", source.name)
    end
    return tree or {}
end

-- A store holding what the settings would be with `trees[entry]` in place of
-- those entries' trees: for store.validate, before anything is applied.
function Store:_candidate(trees)
    local entries, merged = {}, {}
    for i, entry in ipairs(self.entries) do
        local tree = trees[entry] or entry.tree
        entries[i] = { source = entry.source, tree = tree }
        if tree then merge(merged, tree) end
    end
    return setmetatable({ entries = entries, tree = merged, yaml_file = self.yaml_file,
        _watches = {}, _listeners = {} }, Store)
end

-- nil when store.validate refuses the settings with `trees` applied (after
-- logging why), else true.
function Store:_acceptable(trees)
    if not self.validate then return true end
    local ok, err = self.validate(self:_candidate(trees))
    if ok then return true end
    self.log("error", ("%s; keeping the last good settings"):format(tostring(err)))
    return nil, err
end

function Store:_source_changed(entry, tree, err)
    if not self._watching or entry.removed then return end
    if tree == nil and err ~= nil then
        self.log("warning", ("%s; keeping the previous settings"):format(tostring(as_error(err, entry.source.name))))
        return
    end
    if not self:_acceptable({ [entry] = tree or {} }) then return end
    entry.tree = tree or {}
    self:_recompute()
end

function Store:_watch_entry(entry)
    local source = entry.source
    if not source.watch then return true end
    local ok, err = source:watch(function(tree, e) self:_source_changed(entry, tree, e) end)
    if not ok then return nil, as_error(err, source.name) end
    return true
end

--- store:add_source(source[, position]) -> true | nil, err
-- position: nil = highest precedence (last); a number = index in the
-- precedence list (1 = lowest); a source name = just below that source
-- (e.g. add_source(etcd, "environ") puts etcd between the file and the
-- environment). Loads the source (may yield), fires watches, and starts
-- watching it when the store is watching.
function Store:add_source(source, position)
    assert(type(source) == "table" and type(source.load) == "function",
        "add_source: a source is a table with a load function")
    assert(type(source.name) == "string", "add_source: a source needs a name")
    local n = #self.entries
    local index = n + 1
    if type(position) == "number" then
        index = math.max(1, math.min(n + 1, math.floor(position)))
    elseif type(position) == "string" then
        index = nil
        for i, entry in ipairs(self.entries) do
            if entry.source.name == position then index = i break end
        end
        assert(index, "add_source: no source named " .. position)
    elseif position ~= nil then
        error("add_source: position must be a number or a source name", 2)
    end
    local tree, err = load_source(source)
    if not tree then return nil, err end
    local entry = { source = source, tree = tree }
    table.insert(self.entries, index, entry)
    self:_recompute()
    if self._watching then return self:_watch_entry(entry) end
    return true
end

-- The writable source with the highest precedence (one with a `write`
-- method: etcd), and its entry.
function Store:_writable()
    for i = #self.entries, 1, -1 do
        local entry = self.entries[i]
        if entry.source.write then return entry end
    end
    return nil
end

-- Writes (value) or removes (value nil) dotted `key` in the writable source,
-- after the same checks as any change; applied to the store at once (the
-- source's own watch then sees no difference).
function Store:_write(key, value)
    local entry = self:_writable()
    if not entry then
        return nil, errors.new("settings", ("cannot write setting '%s': no writable settings source "
            .. "(settings are written to etcd: set TAMARCO_ETCD_HOST)"):format(key), { key = key })
    end
    local path = settings.split_key(key)
    if #path == 0 then return nil, errors.new("settings", "cannot write the whole settings tree") end
    local tree = copy(entry.tree or {})
    if value == nil then
        local parent = #path > 1 and select(2, lookup(tree, { unpack(path, 1, #path - 1) })) or tree
        if type(parent) == "table" then parent[path[#path]] = nil end
    else
        set_path(tree, path, copy(value))
    end
    local acceptable, refused = self:_acceptable({ [entry] = tree })
    if not acceptable then return nil, refused end
    local ok, err = entry.source:write(join(path), value)
    if not ok then return nil, as_error(err, entry.source.name) end
    entry.tree = tree
    self:_recompute()
    return true
end

--- store:set(key, value) -> true | nil, err: writes through to the writable
-- source (etcd) and applies it. A source above it (the environment) still
-- wins for that key. Runs inside a task.
function Store:set(key, value)
    return self:_write(key, value)
end

--- store:delete(key) -> true | nil, err: removes key and what is below it.
function Store:delete(key)
    return self:_write(key, nil)
end

--- store:sources() -> the names of the sources, lowest precedence first.
function Store:sources()
    local names = {}
    for i, entry in ipairs(self.entries) do names[i] = entry.source.name end
    return names
end

--- store:reload() -> true | nil, err: re-reads every source and fires watches
-- for what changed. A failing source keeps its previous values (and is logged).
function Store:reload()
    local first_err
    local trees = {}
    for _, entry in ipairs(self.entries) do
        local tree, err = load_source(entry.source)
        if tree then
            trees[entry] = tree
        else
            first_err = first_err or err
            self.log("warning", ("%s; keeping the previous settings"):format(tostring(err)))
        end
    end
    local acceptable, refused = self:_acceptable(trees)
    if not acceptable then return nil, refused end
    for entry, tree in pairs(trees) do entry.tree = tree end
    self:_recompute()
    if first_err then return nil, first_err end
    return true
end

--- store:start_watching() -> true | nil, err: watches every source that can
-- change (the YAML file, etcd); a change reloads that source and fires watches.
function Store:start_watching()
    if self._watching then return true end
    self._watching = true
    local first_err
    for _, entry in ipairs(self.entries) do
        local ok, err = self:_watch_entry(entry)
        if not ok then
            first_err = first_err or err
            self.log("warning", tostring(err))
        end
    end
    if first_err then return nil, first_err end
    return true
end

--- store:stop_watching(): closes every source's handles (nothing is left to
-- keep the loop alive).
function Store:stop_watching()
    self._watching = false
    for _, entry in ipairs(self.entries) do
        if entry.source.close then entry.source:close() end
    end
end

Store.close = Store.stop_watching

---------------------------------------------------------------------------
-- loading
---------------------------------------------------------------------------

--- settings.load{ defaults =, dict =, yaml_file =, environ = } -> store | nil, err
function settings.load(opts)
    opts = opts or {}
    assert(type(opts) == "table", "settings.load: options must be a table")
    for _, field in ipairs({ "defaults", "dict" }) do
        assert(opts[field] == nil or type(opts[field]) == "table",
            "settings.load: " .. field .. " must be a table")
    end
    local path = opts.yaml_file
    assert(path == nil or path == false or type(path) == "string",
        "settings.load: yaml_file must be a path")
    if path == nil then
        path = os.getenv("TAMARCO_YML_FILE")
        if path == "" then path = nil end
    end

    local store = new_store()
    local sources = { settings.static_source("builtin", settings.builtin_defaults) }
    if opts.defaults then sources[#sources + 1] = settings.static_source("defaults", opts.defaults) end
    if opts.dict then sources[#sources + 1] = settings.static_source("dict", opts.dict) end
    if path then
        store.yaml_file = path
        sources[#sources + 1] = settings.yaml_source(path)
    end
    if opts.environ then sources[#sources + 1] = settings.environ_source() end

    for _, source in ipairs(sources) do
        local tree, err = load_source(source)
        if not tree then return nil, err end
        store.entries[#store.entries + 1] = { source = source, tree = tree }
    end
    store:_recompute()
    return store
end

settings.Store = Store
settings.View = View

return settings
