--- tamarco.core.metrics: the meter registry (Tamarco's meters, Prometheus' model).
--
--   local metrics = require "tamarco.core.metrics"
--   local hits = metrics.counter("cache_hits_total", { help = "Cache hits", labels = { cache = "users" } })
--   hits:inc()                                   -- inc(n = 1), n >= 0
--   local q = metrics.gauge("queue_length", { help = "Items waiting" })
--   q:set(10); q:inc(); q:dec(2)
--   local size = metrics.summary("payload_bytes", { help = "...", quantiles = { 0.5, 0.9, 0.99 },
--                                                   max_samples = 1024 })
--   size:observe(512)
--   local lat = metrics.histogram("db_query_seconds", { help = "...", buckets = { 0.01, 0.1, 1 } })
--   lat:labels({ query = "get_user" }):observe(0.003)
--   local t = metrics.timer("handler_seconds", { help = "..." })   -- kind = "histogram" | "summary"
--   local a, b = t:time(fn, ...)                 -- fn's results; observed even when fn raises
--   local stop = t:start(); ...; stop()          -- stop() observes and returns the seconds
--
-- A meter is one series: the registry keys it by (id, sorted labels), so
-- asking again for the same id and labels returns the SAME object, and
-- `meter:labels(extra)` returns the series with extra labels (cached: it
-- allocates nothing after the first call with a given label table, and the
-- meters' inc/observe never allocate). Meters of one id form a family with
-- one type, help text and bucket/quantile layout; asking for an id with
-- another type or layout raises. Names follow Prometheus' rules
-- ([a-zA-Z_:][a-zA-Z0-9_:]*), but for dots, which become "_" as Tamarco did
-- ("orders.created" is the meter "orders_created"), label names too ([a-zA-Z_][a-zA-Z0-9_]*, not
-- "__..." and not "le"/"quantile", which the exposition adds); label values
-- are strings (numbers and booleans are converted).
--
-- When exposed, names get the namespace prefix `<namespace>_<id>`, the
-- namespace being the service name with invalid characters mapped to "_"
-- (set by the metrics resource through metrics.set_namespace), and a
-- counter's exposed name gets a "_total" suffix when it lacks one (as
-- Python's prometheus_client does; promtool's lint wants it).
--
-- Naming modes (registry:set_naming, the metrics resource's `naming`
-- setting): "prometheus" (the default, above) or "tamarco", Tamarco's own
-- names so that its dashboards and Graphite queries keep working: no
-- "_total" suffix, default summary quantiles 0.5, 0.75, 0.9, 0.95, 0.99, a
-- HELP text "units <unit>" when none is given, and Tamarco's carbon paths
-- (see tamarco.core.metrics.reporters). options.unit is the meter's unit
-- (Tamarco's measurement_unit).
--
-- HTTP server meters: the HTTP server resource calls, once per answered
-- request,
--   metrics.observe_http(route_pattern, method, status, seconds)
-- which counts `http_requests_total{route,method,status}` and observes
-- `http_request_duration_seconds{route,method}` (a histogram with the
-- default buckets). route_pattern is the route's pattern ("/users/{id}"),
-- never the raw path, so the number of series stays bounded.
--
-- Several registries may exist (metrics.new_registry()); the module-level
-- functions use the default one.
local ctimer = require "tamarco.c.timer"
local naming = require "tamarco.core.metrics.naming"

local type, tostring, error, pairs, ipairs, setmetatable, select, pcall =
    type, tostring, error, pairs, ipairs, setmetatable, select, pcall
local sort, concat = table.sort, table.concat
local floor, huge = math.floor, math.huge
local hrtime = ctimer.hrtime

local metrics = {}

metrics.DEFAULT_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10 }
metrics.DEFAULT_QUANTILES = { 0.5, 0.9, 0.99 }
metrics.TAMARCO_QUANTILES = { 0.5, 0.75, 0.9, 0.95, 0.99 }
metrics.NAMING_MODES = { prometheus = true, tamarco = true }
metrics.DEFAULT_MAX_SAMPLES = 1024

---------------------------------------------------------------------------
-- names and labels
---------------------------------------------------------------------------

local valid_metric_name = naming.valid_metric_name
local valid_label_name = naming.valid_label_name
metrics.valid_metric_name = valid_metric_name
metrics.valid_label_name = valid_label_name

local function check_label_name(name, id)
    if not valid_label_name(name) then
        error(("metric '%s': invalid label name %s (want [a-zA-Z_][a-zA-Z0-9_]*, not starting with '__')")
            :format(id, type(name) == "string" and ("'" .. name .. "'") or tostring(name)), 4)
    end
    if name == "le" or name == "quantile" then
        error(("metric '%s': label name '%s' is reserved (the exposition adds it)"):format(id, name), 4)
    end
end

local escape_label_value = naming.escape_label_value
metrics.escape_label_value = escape_label_value

local function label_value(v, name, id)
    local t = type(v)
    if t == "string" then return v end
    if t == "number" or t == "boolean" then return tostring(v) end
    error(("metric '%s': label '%s' must be a string, number or boolean (got %s)"):format(id, name, t), 4)
end

-- Renders sorted labels as '{a="x",b="y"}' ('' for none): the series key
-- in its family and the label part of its exposition lines.
local function render_labels(labels, names)
    if #names == 0 then return "" end
    local parts = {}
    for i, name in ipairs(names) do
        parts[i] = name .. '="' .. escape_label_value(labels[name]) .. '"'
    end
    return "{" .. concat(parts, ",") .. "}"
end

local format_value = naming.format_value
metrics.format_value = format_value
metrics.sanitize_name = naming.sanitize_name

---------------------------------------------------------------------------
-- meters
---------------------------------------------------------------------------

-- Methods every meter has.
local function labels_method(self, extra)
    local cache = self._labels_cache
    local child = cache[extra]
    if child then return child end
    if type(extra) ~= "table" then
        error(("metric '%s': labels() wants a table of label names to values"):format(self.family.id), 2)
    end
    local merged = {}
    for k, v in pairs(self.label_set) do merged[k] = v end
    for k, v in pairs(extra) do merged[k] = v end
    child = self.family:series(merged, 3)
    cache[extra] = child
    return child
end

-- Drops this series from its family: it is no longer exposed (a label
-- value that will not come back, e.g. an instance that left). A meter kept
-- and used again after this counts on its own, unexposed.
local function remove_method(self)
    local family = self.family
    if family.children[self.label_str] == self then
        family.children[self.label_str] = nil
        family.sorted = nil
    end
end

local function new_class(kind)
    -- a series' own labels are in `self.label_set` (name -> string value)
    local class = { kind = kind, labels = labels_method, remove = remove_method }
    class.__index = class
    return class
end

local Counter = new_class("counter")
local Gauge = new_class("gauge")
local Summary = new_class("summary")
local Histogram = new_class("histogram")
metrics.Counter, metrics.Gauge, metrics.Summary, metrics.Histogram = Counter, Gauge, Summary, Histogram

--- counter:inc(n = 1); n must be >= 0.
function Counter:inc(n)
    if n == nil then
        self.value = self.value + 1
    elseif n >= 0 then
        self.value = self.value + n
    else
        error(("counter '%s' can only increase (inc got %s)"):format(self.family.id, tostring(n)), 2)
    end
end

function Counter:get() return self.value end

function Gauge:set(v) self.value = v end
function Gauge:inc(n) self.value = self.value + (n or 1) end
function Gauge:dec(n) self.value = self.value - (n or 1) end
function Gauge:get() return self.value end
--- gauge:set_to_current_time(): wall clock seconds.
function Gauge:set_to_current_time() self.value = ctimer.time() end

--- summary:observe(v): v joins the sliding window of the last
-- max_samples observations (for the quantiles) and the running sum/count.
function Summary:observe(v)
    self.sum = self.sum + v
    self.count = self.count + 1
    local i = self.next
    self.samples[i] = v
    if i >= self.max_samples then self.next = 1 else self.next = i + 1 end
    if self.size < self.max_samples then self.size = self.size + 1 end
end

--- summary:quantiles() -> { [i] = value of family.quantiles[i] } over the
-- window (nearest rank), NaN when empty.
function Summary:quantiles()
    local qs, n = self.family.quantiles, self.size
    local out = {}
    if n == 0 then
        for i = 1, #qs do out[i] = 0 / 0 end
        return out
    end
    local sorted, samples = {}, self.samples
    for i = 1, n do sorted[i] = samples[i] end
    sort(sorted)
    for i, q in ipairs(qs) do
        local rank = math.ceil(q * n)
        if rank < 1 then rank = 1 elseif rank > n then rank = n end
        out[i] = sorted[rank]
    end
    return out
end

function Summary:get() return self.sum, self.count end

-- The label part of each quantile line, rendered once per layout.
function Summary:render_quantile_labels()
    local key = self.label_str
    self.quantile_labels = {}
    for i, q in ipairs(self.family.quantiles) do
        local l = 'quantile="' .. format_value(q) .. '"'
        self.quantile_labels[i] = key == "" and ("{" .. l .. "}") or (key:sub(1, -2) .. "," .. l .. "}")
    end
end

--- histogram:observe(v): counts v in the first bucket whose bound >= v.
function Histogram:observe(v)
    local bounds, counts = self.bounds, self.counts
    self.sum = self.sum + v
    self.count = self.count + 1
    for i = 1, self.nbounds do
        if v <= bounds[i] then
            counts[i] = counts[i] + 1
            return
        end
    end
    -- above every finite bound (or NaN): only the +Inf bucket (= count)
end

--- histogram:buckets() -> cumulative counts per bound (the last is +Inf).
function Histogram:buckets()
    local out, acc = {}, 0
    for i = 1, self.nbounds do
        acc = acc + self.counts[i]
        out[i] = acc
    end
    out[self.nbounds + 1] = self.count
    return out
end

function Histogram:get() return self.sum, self.count end

-- Timers: any summary or histogram times in seconds.
local function finish(self, t0, ok, ...)
    self:observe((hrtime() - t0) * 1e-9)
    if not ok then error((...), 0) end
    return ...
end

local function time_method(self, fn, ...)
    local t0 = hrtime()
    return finish(self, t0, pcall(fn, ...))
end

local function start_method(self)
    local t0 = hrtime()
    local done = false
    return function()
        local seconds = (hrtime() - t0) * 1e-9
        if not done then
            done = true
            self:observe(seconds)
        end
        return seconds
    end
end

Summary.time, Summary.start = time_method, start_method
Histogram.time, Histogram.start = time_method, start_method

---------------------------------------------------------------------------
-- families and registries
---------------------------------------------------------------------------

local CLASSES = { counter = Counter, gauge = Gauge, summary = Summary, histogram = Histogram }

local Family = {}
Family.__index = Family

local function new_series(family, labels, names, key)
    local class = CLASSES[family.kind]
    local s = setmetatable({ family = family, label_set = labels, label_names = names, label_str = key,
                             _labels_cache = setmetatable({}, { __mode = "k" }) }, class)
    local kind = family.kind
    if kind == "counter" or kind == "gauge" then
        s.value = 0
    elseif kind == "summary" then
        s.sum, s.count, s.size, s.next = 0, 0, 0, 1
        s.max_samples = family.max_samples
        s.samples = {}
        s:render_quantile_labels()
    else
        s.sum, s.count = 0, 0
        s.bounds, s.nbounds = family.bounds, #family.bounds
        s.counts = {}
        s.le_labels = {}
        for i = 1, #family.bounds + 1 do
            if i <= #family.bounds then s.counts[i] = 0 end
            local l = 'le="' .. format_value(family.bounds[i] or huge) .. '"'
            s.le_labels[i] = key == "" and ("{" .. l .. "}") or (key:sub(1, -2) .. "," .. l .. "}")
        end
    end
    return s
end

--- family:series(labels) -> the meter for these labels (created once).
function Family:series(labels, level)
    level = level or 2
    local id = self.id
    local copy, names = {}, {}
    if labels ~= nil then
        if type(labels) ~= "table" then
            error(("metric '%s': labels must be a table of label names to values"):format(id), level)
        end
        for name, v in pairs(labels) do
            check_label_name(name, id)
            names[#names + 1] = name
            copy[name] = label_value(v, name, id)
        end
        sort(names)
    end
    local key = render_labels(copy, names)
    local s = self.children[key]
    if not s then
        s = new_series(self, copy, names, key)
        self.children[key] = s
        self.sorted = nil
    end
    return s
end

--- family:each(fn): fn(series) in label order.
function Family:sorted_series()
    local sorted = self.sorted
    if not sorted then
        local keys = {}
        for key in pairs(self.children) do keys[#keys + 1] = key end
        sort(keys)
        sorted = {}
        for i, key in ipairs(keys) do sorted[i] = self.children[key] end
        self.sorted = sorted
    end
    return sorted
end

local Registry = {}
Registry.__index = Registry
metrics.Registry = Registry

local function same_list(a, b)
    if #a ~= #b then return false end
    for i = 1, #a do if a[i] ~= b[i] then return false end end
    return true
end

--- metrics.new_registry() -> an empty registry.
function metrics.new_registry()
    return setmetatable({ families = {}, sorted = nil, http_cache = {}, naming = "prometheus" }, Registry)
end

local function default_quantiles(registry)
    return registry.naming == "tamarco" and metrics.TAMARCO_QUANTILES or metrics.DEFAULT_QUANTILES
end

--- registry:set_naming(mode): "prometheus" or "tamarco" (see the module
-- header). Summaries created without explicit quantiles take the mode's.
function Registry:set_naming(mode)
    if not metrics.NAMING_MODES[mode] then
        error(("metrics naming mode must be \"prometheus\" or \"tamarco\" (got %s)"):format(tostring(mode)), 2)
    end
    self.naming = mode
    local quantiles = default_quantiles(self)
    for _, f in pairs(self.families) do
        if f.kind == "summary" and f.default_quantiles and not same_list(f.quantiles, quantiles) then
            f.quantiles = { unpack(quantiles) }
            f.carbon_quantiles = nil
            for _, series in pairs(f.children) do series:render_quantile_labels() end
        end
    end
end

local SUFFIXES = { "_bucket", "_sum", "_count" }

local function check_collisions(self, id, kind)
    if kind == "histogram" or kind == "summary" then
        for _, suffix in ipairs(SUFFIXES) do
            if self.families[id .. suffix] then
                error(("metric '%s': its %s series would collide with metric '%s'"):format(id, kind,
                    id .. suffix), 4)
            end
        end
    end
    for _, suffix in ipairs(SUFFIXES) do
        local stem = id:sub(1, -#suffix - 1)
        if #id > #suffix and id:sub(-#suffix) == suffix then
            local f = self.families[stem]
            if f and (f.kind == "histogram" or f.kind == "summary") then
                error(("metric '%s' collides with the series of %s '%s'"):format(id, f.kind, stem), 4)
            end
        end
    end
end

local function check_buckets(id, buckets)
    if type(buckets) ~= "table" or #buckets == 0 then
        error(("histogram '%s': buckets must be a non-empty list of numbers"):format(id), 4)
    end
    local bounds = {}
    for i, b in ipairs(buckets) do
        if type(b) ~= "number" or b ~= b then
            error(("histogram '%s': bucket %d is not a number"):format(id, i), 4)
        end
        if i > 1 and b <= buckets[i - 1] then
            error(("histogram '%s': buckets must be strictly increasing"):format(id), 4)
        end
        if b ~= huge then bounds[#bounds + 1] = b end
    end
    return bounds
end

local function check_quantiles(id, quantiles)
    if type(quantiles) ~= "table" then
        error(("summary '%s': quantiles must be a list of numbers in [0, 1]"):format(id), 4)
    end
    local qs = {}
    for i, q in ipairs(quantiles) do
        if type(q) ~= "number" or not (q >= 0 and q <= 1) then
            error(("summary '%s': quantile %d must be a number in [0, 1]"):format(id, i), 4)
        end
        qs[i] = q
    end
    sort(qs)
    return qs
end

--- registry:family(kind, id, options) -> the family (created once).
function Registry:family(kind, id, options)
    local source_id = id
    if type(id) == "string" and id:find(".", 1, true) then id = id:gsub("%.", "_") end
    if not valid_metric_name(id) then
        error(("invalid metric name %s (want [a-zA-Z_:][a-zA-Z0-9_:]*)")
            :format(type(source_id) == "string" and ("'" .. source_id .. "'") or tostring(source_id)), 3)
    end
    if type(options) == "string" then options = { help = options } end
    options = options or {}
    if type(options) ~= "table" then error(("metric '%s': options must be a table"):format(id), 3) end
    local help = options.help
    if help ~= nil and type(help) ~= "string" then
        error(("metric '%s': help must be a string"):format(id), 3)
    end
    local unit = options.unit
    if unit ~= nil and type(unit) ~= "string" then
        error(("metric '%s': unit must be a string"):format(id), 3)
    end
    local f = self.families[id]
    if f then
        if f.kind ~= kind then
            error(("metric '%s' is already registered as a %s, not a %s"):format(id, f.kind, kind), 3)
        end
        if help and help ~= f.help then
            if f.help_given then
                error(("metric '%s' is already registered with another help text"):format(id), 3)
            end
            f.help, f.help_given = help, true
        end
        if kind == "histogram" and options.buckets and not same_list(f.bounds, check_buckets(id, options.buckets)) then
            error(("histogram '%s' is already registered with other buckets"):format(id), 3)
        end
        if kind == "summary" and options.quantiles
            and not same_list(f.quantiles, check_quantiles(id, options.quantiles)) then
            error(("summary '%s' is already registered with other quantiles"):format(id), 3)
        end
        if kind == "summary" and options.max_samples and options.max_samples ~= f.max_samples then
            error(("summary '%s' is already registered with another max_samples"):format(id), 3)
        end
        if unit and not f.unit then f.unit = unit end
        return f
    end
    check_collisions(self, id, kind)
    -- source_id: the id as given (Tamarco's carbon paths keep its dots)
    f = setmetatable({ id = id, source_id = source_id, kind = kind, help = help or id, help_given = help ~= nil,
                       unit = unit, children = {}, registry = self }, Family)
    if kind == "histogram" then
        f.bounds = check_buckets(id, options.buckets or metrics.DEFAULT_BUCKETS)
    elseif kind == "summary" then
        f.default_quantiles = options.quantiles == nil
        f.quantiles = check_quantiles(id, options.quantiles or default_quantiles(self))
        local max = options.max_samples or metrics.DEFAULT_MAX_SAMPLES
        if type(max) ~= "number" or max < 1 or max ~= floor(max) then
            error(("summary '%s': max_samples must be a positive integer"):format(id), 3)
        end
        f.max_samples = max
    end
    self.families[id] = f
    self.sorted = nil
    return f
end

local function meter(kind)
    return function(self, id, options)
        local f = self:family(kind, id, options)
        local labels = type(options) == "table" and options.labels or nil
        return f:series(labels, 3)
    end
end

--- registry:counter/gauge/summary/histogram(id[, options]) -> the meter.
-- options: help, labels, and buckets (histogram), quantiles and
-- max_samples (summary). options may also be just the help string.
Registry.counter = meter("counter")
Registry.gauge = meter("gauge")
Registry.summary = meter("summary")
Registry.histogram = meter("histogram")

--- registry:timer(id[, options]) -> a histogram (options.kind = "summary"
-- for a summary) of seconds with time(fn, ...) and start().
function Registry:timer(id, options)
    local kind = type(options) == "table" and options.kind or "histogram"
    if kind ~= "histogram" and kind ~= "summary" then
        error(("timer '%s': kind must be \"histogram\" or \"summary\""):format(tostring(id)), 2)
    end
    local f = self:family(kind, id, options)
    return f:series(type(options) == "table" and options.labels or nil, 2)
end

--- registry:sorted_families() -> families sorted by id.
function Registry:sorted_families()
    local sorted = self.sorted
    if not sorted then
        local ids = {}
        for id in pairs(self.families) do ids[#ids + 1] = id end
        sort(ids)
        sorted = {}
        for i, id in ipairs(ids) do sorted[i] = self.families[id] end
        self.sorted = sorted
    end
    return sorted
end

--- registry:get(id) -> the family or nil.
function Registry:get(id) return self.families[id] end

--- registry:reset(): forgets every meter and the naming mode (for tests).
function Registry:reset()
    self.families, self.sorted, self.http_cache, self.naming = {}, nil, {}, "prometheus"
end

local HTTP_REQUESTS = "http_requests_total"
local HTTP_DURATION = "http_request_duration_seconds"

local function http_entry(self, route, method)
    local requests = self:family("counter", HTTP_REQUESTS,
        { help = "HTTP requests answered, by route pattern, method and status" })
    local durations = self:family("histogram", HTTP_DURATION,
        { help = "HTTP request duration in seconds, by route pattern and method" })
    local by_route = self.http_cache[route]
    if not by_route then
        by_route = {}
        self.http_cache[route] = by_route
    end
    local entry = {
        statuses = {},
        requests = requests,
        duration = durations:series({ route = route, method = method }),
    }
    by_route[method] = entry
    return entry
end

--- registry:observe_http(route_pattern, method, status, seconds): see the
-- module header. No allocation once the (route, method, status) was seen.
function Registry:observe_http(route, method, status, seconds)
    local by_route = self.http_cache[route]
    local entry = by_route and by_route[method]
    if not entry then entry = http_entry(self, route, method) end
    local c = entry.statuses[status]
    if not c then
        c = entry.requests:series({ route = route, method = method, status = status })
        entry.statuses[status] = c
    end
    c.value = c.value + 1
    entry.duration:observe(seconds)
end

---------------------------------------------------------------------------
-- the default registry and the namespace
---------------------------------------------------------------------------

local default = metrics.new_registry()
metrics.default_registry = default

metrics.set_namespace = naming.set_namespace
metrics.namespace = naming.namespace
metrics.exposed_name = naming.exposed_name

--- metrics.counter(id[, {help, labels, unit}]) -> the counter `id` of the default registry
-- (the same object for the same id and labels).
function metrics.counter(id, options) return default:counter(id, options) end
--- metrics.gauge(id[, options]) -> the gauge `id` of the default registry.
function metrics.gauge(id, options) return default:gauge(id, options) end
--- metrics.summary(id[, options]) -> the summary `id` of the default registry.
function metrics.summary(id, options) return default:summary(id, options) end
--- metrics.histogram(id[, {help, labels, buckets}]) -> the histogram `id` of the default registry.
function metrics.histogram(id, options) return default:histogram(id, options) end
--- metrics.timer(id[, options]) -> the timer `id` of the default registry.
function metrics.timer(id, options) return default:timer(id, options) end
--- metrics.reset(): forgets every meter of the default registry and its naming mode (for tests).
function metrics.reset() default:reset() end

--- metrics.observe_http(route, method, status, seconds): counts one answered HTTP request
-- and its duration in the default registry's HTTP meters.
function metrics.observe_http(route, method, status, seconds)
    return default:observe_http(route, method, status, seconds)
end

--- metrics.exposition([registry[, namespace]]) -> Prometheus text (0.0.4).
function metrics.exposition(registry, ns)
    return require("tamarco.core.metrics.prometheus").exposition(registry or default, ns or naming.namespace())
end

return metrics
