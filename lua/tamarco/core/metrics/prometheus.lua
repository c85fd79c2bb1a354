--- tamarco.core.metrics.prometheus: Prometheus text exposition format 0.0.4.
--
--   local prometheus = require "tamarco.core.metrics.prometheus"
--   local text = prometheus.exposition(registry, namespace)
--   -- served with prometheus.CONTENT_TYPE
--
-- Names follow the registry's naming mode (see tamarco.metrics).
-- Families sorted by exposed name, each with one # HELP and one # TYPE
-- line, then its series sorted by labels; a summary has its quantile
-- lines, _sum and _count; a histogram its cumulative _bucket lines (the
-- last le="+Inf"), _sum and _count. Label values are escaped (\\ \" \n),
-- help text too (\\ \n). Values: integers as integers, +Inf, -Inf, NaN,
-- other floats in the shortest form that reads back exactly.
local naming = require "tamarco.core.metrics.naming"
local cmetrics = require "tamarco.c.metrics"

local concat = table.concat
local floor, huge = math.floor, math.huge
local exposed_name = naming.exposed_name

local prometheus = {}

prometheus.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

local function escape_help(s)
    if s:find("[\\\n]") then s = s:gsub("[\\\n]", { ["\\"] = "\\\\", ["\n"] = "\\n" }) end
    return s
end
prometheus.escape_help = escape_help

--- format_value in Lua (the C one is naming.format_value): the reference.
local function format_value(v)
    if v ~= v then return "NaN" end
    if v == huge then return "+Inf" end
    if v == -huge then return "-Inf" end
    if v == floor(v) and v > -9.2e18 and v < 9.2e18 then return ("%d"):format(v) end
    local s = ("%.15g"):format(v)
    if tonumber(s) ~= v then
        s = ("%.16g"):format(v)
        if tonumber(s) ~= v then s = ("%.17g"):format(v) end
    end
    return s
end
prometheus.format_value_lua = format_value

-- The families as { name, help, kind, sorted series } sorted by exposed
-- name (the ids' order but for the counters' "_total" suffix).
local function entries(registry, namespace)
    local list = {}
    for i, f in ipairs(registry:sorted_families()) do
        local series = f:sorted_series()
        if f.kind == "summary" then
            for _, s in ipairs(series) do s.qvalues = s:quantiles() end
        end
        local les = f.le_values
        if f.kind == "histogram" and not les then
            les = {}
            for b, bound in ipairs(f.bounds) do les[b] = naming.format_value(bound) end
            les[#les + 1] = "+Inf"
            f.le_values = les
        end
        local help = f.help
        -- Tamarco's HELP line said the unit when there is no help text
        if registry.naming == "tamarco" and not f.help_given then help = "units " .. (f.unit or "") end
        list[i] = { exposed_name(f.id, f.kind, namespace or false, registry.naming), help, f.kind, series, les }
    end
    table.sort(list, function(a, b) return a[1] < b[1] end)
    return list
end
prometheus.entries = entries

-- A sample line -> name, labels (the text between the braces, or nil),
-- the rest (value and optional timestamp); nil when it is not a sample.
-- Label values may hold escaped quotes and braces.
local function split_sample(line)
    local name, i = line:match("^([%a_:][%w_:]*)()")
    if not name then return nil end
    if line:sub(i, i) ~= "{" then return name, nil, line:match("^%s+(%S.*)$", i) end
    local j, quoted = i + 1, false
    while j <= #line do
        local ch = line:sub(j, j)
        if quoted then
            if ch == "\\" then j = j + 1 elseif ch == '"' then quoted = false end
        elseif ch == '"' then
            quoted = true
        elseif ch == "}" then
            return name, line:sub(i + 1, j - 1), line:match("^%s+(%S.*)$", j + 1)
        end
        j = j + 1
    end
    return nil
end

--- prometheus.merge(parts, label) -> one exposition made of several
-- processes' (parts: list of { value = label value, text = exposition }).
-- Every sample gets label="value" first among its labels; the samples of a
-- family stay together under one # HELP and one # TYPE, as the format
-- wants, in the order the families first appear. A sample belongs to the
-- family announced above it when its name starts with the family's name
-- (a histogram's _bucket, _sum, _count), else to a family of its own name.
function prometheus.merge(parts, label)
    local order, families = {}, {}
    local function family(name)
        local f = families[name]
        if not f then
            f = { samples = {} }
            families[name] = f
            order[#order + 1] = name
        end
        return f
    end
    for _, part in ipairs(parts) do
        local added = label .. '="' .. naming.escape_label_value(tostring(part.value)) .. '"'
        local current
        for line in part.text:gmatch("[^\n]+") do
            local kind, name = line:match("^#%s+(%u+)%s+([%a_:][%w_:]*)")
            if kind == "HELP" or kind == "TYPE" then
                local f = family(name)
                f[kind] = f[kind] or line
                current = name
            elseif not line:find("^%s*#") and line:find("%S") then
                local sample, labels, rest = split_sample(line)
                if sample and rest then
                    local owner = current and sample:sub(1, #current) == current and current or sample
                    local all = labels and labels:find("%S") and added .. "," .. labels or added
                    local samples = family(owner).samples
                    samples[#samples + 1] = sample .. "{" .. all .. "} " .. rest
                end
            end
        end
    end
    local out = {}
    for _, name in ipairs(order) do
        local f = families[name]
        if f.HELP then out[#out + 1] = f.HELP end
        if f.TYPE then out[#out + 1] = f.TYPE end
        for _, line in ipairs(f.samples) do out[#out + 1] = line end
    end
    if #out == 0 then return "" end
    return concat(out, "\n") .. "\n"
end

--- prometheus.exposition(registry[, namespace]) -> text (encoded in C).
function prometheus.exposition(registry, namespace)
    return cmetrics.encode(entries(registry, namespace))
end

--- The same text encoded in Lua: the reference the C encoder is checked
-- (and benchmarked) against.
function prometheus.exposition_lua(registry, namespace)
    local buf, n = {}, 0
    for _, entry in ipairs(entries(registry, namespace)) do
        local name, help, kind, series = entry[1], entry[2], entry[3], entry[4]
        n = n + 1; buf[n] = "# HELP " .. name .. " " .. escape_help(help) .. "\n"
        n = n + 1; buf[n] = "# TYPE " .. name .. " " .. kind .. "\n"
        if kind == "counter" or kind == "gauge" then
            for i = 1, #series do
                local s = series[i]
                buf[n + 1] = name
                buf[n + 2] = s.label_str
                buf[n + 3] = " "
                buf[n + 4] = format_value(s.value)
                buf[n + 5] = "\n"
                n = n + 5
            end
        elseif kind == "histogram" then
            local bucket, sum, count = name .. "_bucket", name .. "_sum", name .. "_count"
            for i = 1, #series do
                local s = series[i]
                local counts, le_labels, acc = s.counts, s.le_labels, 0
                for b = 1, s.nbounds do
                    acc = acc + counts[b]
                    buf[n + 1] = bucket
                    buf[n + 2] = le_labels[b]
                    buf[n + 3] = " "
                    buf[n + 4] = format_value(acc)
                    buf[n + 5] = "\n"
                    n = n + 5
                end
                local total = format_value(s.count)
                buf[n + 1] = bucket
                buf[n + 2] = le_labels[s.nbounds + 1]
                buf[n + 3] = " "
                buf[n + 4] = total
                buf[n + 5] = "\n"
                buf[n + 6] = sum
                buf[n + 7] = s.label_str
                buf[n + 8] = " "
                buf[n + 9] = format_value(s.sum)
                buf[n + 10] = "\n"
                buf[n + 11] = count
                buf[n + 12] = s.label_str
                buf[n + 13] = " "
                buf[n + 14] = total
                buf[n + 15] = "\n"
                n = n + 15
            end
        else -- summary
            local sum, count = name .. "_sum", name .. "_count"
            for i = 1, #series do
                local s = series[i]
                local values, qlabels = s.qvalues, s.quantile_labels
                for q = 1, #values do
                    buf[n + 1] = name
                    buf[n + 2] = qlabels[q]
                    buf[n + 3] = " "
                    buf[n + 4] = format_value(values[q])
                    buf[n + 5] = "\n"
                    n = n + 5
                end
                buf[n + 1] = sum
                buf[n + 2] = s.label_str
                buf[n + 3] = " "
                buf[n + 4] = format_value(s.sum)
                buf[n + 5] = "\n"
                buf[n + 6] = count
                buf[n + 7] = s.label_str
                buf[n + 8] = " "
                buf[n + 9] = format_value(s.count)
                buf[n + 10] = "\n"
                n = n + 10
            end
        end
    end
    return concat(buf, "", 1, n)
end

return prometheus
