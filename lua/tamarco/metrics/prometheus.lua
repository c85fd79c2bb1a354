--- tamarco.metrics.prometheus: Prometheus text exposition format 0.0.4.
--
--   local prometheus = require "tamarco.metrics.prometheus"
--   local text = prometheus.exposition(registry, namespace)
--   -- served with prometheus.CONTENT_TYPE
--
-- Families sorted by exposed name, each with one # HELP and one # TYPE
-- line, then its series sorted by labels; a summary has its quantile
-- lines, _sum and _count; a histogram its cumulative _bucket lines (the
-- last le="+Inf"), _sum and _count. Label values are escaped (\\ \" \n),
-- help text too (\\ \n). Values: integers as integers, +Inf, -Inf, NaN,
-- other floats in the shortest form that reads back exactly.
local metrics = require "tamarco.metrics"

local concat = table.concat
local format_value = metrics.format_value
local exposed_name = metrics.exposed_name

local prometheus = {}

prometheus.CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

local function escape_help(s)
    if s:find("[\\\n]") then s = s:gsub("[\\\n]", { ["\\"] = "\\\\", ["\n"] = "\\n" }) end
    return s
end
prometheus.escape_help = escape_help

--- prometheus.exposition(registry, namespace) -> text
function prometheus.exposition(registry, namespace)
    local buf, n = {}, 0
    local families = registry:sorted_families()
    -- the exposed names sort like the ids (same prefix) except for the
    -- counters' "_total" suffix: sort on the exposed names
    local named = {}
    for i, f in ipairs(families) do
        named[i] = { name = exposed_name(f.id, f.kind, namespace or false), family = f }
    end
    table.sort(named, function(a, b) return a.name < b.name end)
    for _, entry in ipairs(named) do
        local f, name = entry.family, entry.name
        local kind = f.kind
        n = n + 1; buf[n] = "# HELP " .. name .. " " .. escape_help(f.help) .. "\n"
        n = n + 1; buf[n] = "# TYPE " .. name .. " " .. kind .. "\n"
        local series = f:sorted_series()
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
                local values, qlabels = s:quantiles(), s.quantile_labels
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
