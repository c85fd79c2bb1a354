-- Every public function has a doc comment directly above it: the functions
-- of the table a module under lua/tamarco returns (`function M.name`,
-- `function M:name`; local functions and names starting with `_` are
-- private), and the functions declared in include/tamarco.h. The API
-- reference (scripts/api-docs.sh) is generated from these comments, so a
-- function without one is missing from it; the reference itself must build
-- without LDoc warnings.

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "spec"
local root = here .. "/.."

local function read_lines(path)
    local file = assert(io.open(path, "r"))
    local lines = {}
    for line in file:lines() do lines[#lines + 1] = line end
    file:close()
    return lines
end

local function lua_modules()
    local list = {}
    local pipe = assert(io.popen("cd '" .. root .. "' && find lua/tamarco -name '*.lua' | sort"))
    for path in pipe:lines() do list[#list + 1] = path end
    pipe:close()
    return list
end

-- The name of the table a module returns (`return M` as its last statement),
-- or nil when it returns something else (a function, a table constructor).
local function returned_name(lines)
    for i = #lines, 1, -1 do
        local line = lines[i]
        if line:match("%S") then
            return line:match("^return%s+([%a_][%w_]*)%s*$")
        end
    end
end

-- The doc comment that ends on the line above `index`: a block of `--`
-- lines whose first line starts with `---` (what LDoc reads).
local function lua_doc_comment_above(lines, index)
    local first = nil
    local i = index - 1
    while i >= 1 and lines[i]:match("^%s*%-%-") do
        first = i
        i = i - 1
    end
    return first ~= nil and lines[first]:match("^%s*%-%-%-") ~= nil
end

--- undocumented_lua(path) -> list of "path:line: name" for the public
-- functions of the module at path (relative to the repository) without a
-- doc comment.
local function undocumented_lua(path)
    local lines = read_lines(root .. "/" .. path)
    local module_table = returned_name(lines)
    local missing = {}
    if not module_table then return missing, 0 end
    local count = 0
    for index, line in ipairs(lines) do
        local owner, sep, name = line:match("^%s*function%s+([%a_][%w_]*)([%.:])([%a_][%w_]*)%s*%(")
        if owner == module_table and name:sub(1, 1) ~= "_" then
            count = count + 1
            if not lua_doc_comment_above(lines, index) then
                missing[#missing + 1] = ("%s:%d: %s%s%s"):format(path, index, owner, sep, name)
            end
        end
    end
    return missing, count
end

--- undocumented_c(path) -> the functions declared in the header at path
-- whose declaration does not follow a comment (`*/` on the line above).
local function undocumented_c(path)
    local lines = read_lines(root .. "/" .. path)
    local missing, count = {}, 0
    for index, line in ipairs(lines) do
        local name = line:match("^TAMARCO_API%s[^(]-%f[%w_]([%a_][%w_]*)%s*%(")
        if name then
            count = count + 1
            local above = lines[index - 1] or ""
            if not above:match("%*/%s*$") then
                missing[#missing + 1] = ("%s:%d: %s"):format(path, index, name)
            end
        end
    end
    return missing, count
end

describe("doc comments", function()
    it("every public function of lua/tamarco has one directly above it", function()
        local missing, total = {}, 0
        for _, path in ipairs(lua_modules()) do
            local found, count = undocumented_lua(path)
            total = total + count
            for _, entry in ipairs(found) do missing[#missing + 1] = entry end
        end
        assert.is_true(total > 100, "found only " .. total .. " public functions: is the pattern right?")
        assert.are.same({}, missing, "public functions without a `---` doc comment:\n"
            .. table.concat(missing, "\n"))
    end)

    it("every function of include/tamarco.h has one directly above it", function()
        local missing, total = undocumented_c("include/tamarco.h")
        assert.is_true(total >= 10, "found only " .. total .. " declarations: is the pattern right?")
        assert.are.same({}, missing, "declarations without a comment above them:\n"
            .. table.concat(missing, "\n"))
    end)

    it("the API reference builds (scripts/api-docs.sh) without warnings", function()
        local out = assert(io.popen("mktemp -d"):read("*l"))
        local pipe = assert(io.popen("'" .. root .. "/scripts/api-docs.sh' '" .. out .. "/api' 2>&1 >/dev/null; echo \"exit $?\""))
        local output = pipe:read("*a")
        pipe:close()
        local index = io.open(out .. "/api/index.html")
        local service_page = io.open(out .. "/api/modules/tamarco.core.service.html")
        if index then index:close() end
        if service_page then service_page:close() end
        os.execute("rm -rf '" .. out .. "'")
        assert.are.equal("exit 0\n", output)
        assert.is_truthy(index, "no index.html")
        assert.is_truthy(service_page, "no page for tamarco.core.service")
    end)

    it("finds a missing doc comment (the check itself)", function()
        local lines = { "local M = {}", "", "function M.a() end", "-- plain", "function M.b() end",
            "--- doc", "-- more", "function M:c() end", "return M" }
        assert.is_false(lua_doc_comment_above(lines, 3))
        assert.is_false(lua_doc_comment_above(lines, 5))
        assert.is_true(lua_doc_comment_above(lines, 8))
        assert.are.equal("M", returned_name(lines))
    end)
end)
