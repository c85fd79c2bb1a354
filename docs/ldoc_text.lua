-- The text format of the API reference (docs/config.ld: format =
-- "ldoc_text"; scripts/api-docs.sh puts docs/ on LUA_PATH). The doc comments
-- are plain text laid out for a terminal (`system.resources.<name>`, indented
-- examples, aligned lists), not Markdown: this keeps them as written —
-- HTML-escaped, line breaks and indentation kept.
local function escape(text)
    return (text:gsub("[&<>]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;" }))
end

-- LDoc keeps the space after each line's `--`: one space of indentation
-- less than the comment shows.
local function as_text(segment)
    segment = escape(segment):gsub("^ ", ""):gsub("\n ", "\n")
    segment = segment:gsub("\n\n+", "\n<p>")
    segment = segment:gsub("([\n>])( +)", function(before, spaces) return before .. ("&nbsp;"):rep(#spaces) end)
    return (segment:gsub("\n", "<br>\n"))
end

-- LDoc has turned the lines indented by four spaces or more of a module's
-- comment into highlighted <pre> blocks, without their indentation: they
-- go back to text lines, indented, so the comment reads as written.
local function pre_as_text(block)
    local lines = {}
    for line in (block:gsub("<[^>]+>", "") .. "\n"):gmatch("(.-)\n") do
        if line:match("%S") then
            local spaces, rest = line:match("^( *)(.*)$")
            lines[#lines + 1] = ("&nbsp;"):rep(4 + #spaces) .. rest
        end
    end
    return table.concat(lines, "<br>\n")
end

return function(text)
    local out, position = {}, 1
    while true do
        local first, last, block = text:find("<pre>(.-)</pre>", position)
        if not first then break end
        out[#out + 1] = as_text(text:sub(position, first - 1))
        out[#out + 1] = pre_as_text(block)
        position = last + 1
    end
    out[#out + 1] = as_text(text:sub(position))
    return table.concat(out)
end
