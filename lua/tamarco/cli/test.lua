--- `tamarco-host test`: busted inside the host.
--
-- In a service project with a C extension (a c/CMakeLists.txt in the
-- current directory) it first configures and builds it into ./build with
-- CMake, against the running host's TamarcoHost package (its build tree, or
-- the installation it belongs to), so `require` finds build/<name>.so.
-- `--no-build` skips that. ROOT defaults to ./spec (busted's default).
local test_command = {}

local function shell_quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

local function is_file(path)
    local f = io.open(path, "r")
    if f then f:close() return true end
    return false
end

--- The directory holding the running host's TamarcoHostConfig.cmake, or nil.
function test_command.host_cmake_dir()
    local process = require "tamarco.c.process"
    local exe = process.exepath()
    if not exe then return nil end
    local bin_dir = exe:match("^(.*)/[^/]*$") or "."
    if is_file(bin_dir .. "/TamarcoHostConfig.cmake") then return bin_dir end   -- build tree
    local relative = require("tamarco.c.native").relative_cmake_dir
    for _, dir in ipairs({ bin_dir .. "/../" .. relative, bin_dir .. "/../lib/cmake/TamarcoHost" }) do
        if is_file(dir .. "/TamarcoHostConfig.cmake") then return require("luv").fs_realpath(dir) or dir end
    end
    return nil
end

--- Builds ./c into ./build; returns true or nil, message (with CMake's output).
function test_command.build_extension(dir)
    dir = dir or "."
    local cmake_dir = test_command.host_cmake_dir()
    local log = os.tmpname()
    local configure = "cmake -S " .. shell_quote(dir .. "/c") .. " -B " .. shell_quote(dir .. "/build")
        .. (cmake_dir and (" -DTamarcoHost_DIR=" .. shell_quote(cmake_dir)) or "")
    local build = "cmake --build " .. shell_quote(dir .. "/build")
    io.stderr:write("tamarco-host test: building c/ into build/ ...\n")
    local command = "(" .. configure .. " && " .. build .. ") >" .. log .. " 2>&1"
    local ok = os.execute(command)
    local output = ""
    local f = io.open(log, "r")
    if f then output = f:read("*a") f:close() end
    os.remove(log)
    if ok ~= 0 and ok ~= true then
        return nil, "building the C extension failed:\n" .. configure .. "\n" .. build .. "\n" .. output
    end
    require("tamarco.core.module_path").add_dir(dir)
    return true
end

-- Specs and the services they start make scratch files with os.tmpname(),
-- which LuaJIT always puts in /tmp. A run gets one private directory instead
-- (TMPDIR for child processes too), removed when the run ends, so a suite
-- leaves /tmp as it found it whatever a spec forgets to clean.
local OWNER_FILE = ".owner_pid"

-- A run killed by a signal cannot remove its directory; the next run does,
-- when the process that made it is gone (its pid is in the directory).
local function remove_abandoned(base)
    local uv = require "luv"
    local scan = uv.fs_scandir(base)
    while scan do
        local name = uv.fs_scandir_next(scan)
        if not name then break end
        if name:match("^tamarco%-test%-%w%w%w%w%w%w$") then
            local dir = base .. "/" .. name
            local f = io.open(dir .. "/" .. OWNER_FILE)
            local pid = f and tonumber(f:read("*l"))
            if f then f:close() end
            local alive, err = true, nil
            if pid then alive, err = uv.kill(pid, 0) end
            if not alive and tostring(err):match("ESRCH") then os.execute("rm -rf " .. shell_quote(dir)) end
        end
    end
end

local function private_tmpdir()
    local uv = require "luv"
    local base = os.getenv("TMPDIR") or "/tmp"
    remove_abandoned(base)
    local dir = assert(uv.fs_mkdtemp(base .. "/tamarco-test-XXXXXX"))
    -- traversable like /tmp itself: specs run clients as other users
    assert(uv.fs_chmod(dir, tonumber("755", 8)))
    local owner = assert(io.open(dir .. "/" .. OWNER_FILE, "w"))
    owner:write(uv.os_getpid(), "\n")
    owner:close()
    uv.os_setenv("TMPDIR", dir)
    local counter = 0
    os.tmpname = function()
        counter = counter + 1
        local path = string.format("%s/lua_%d_%d", dir, uv.os_getpid(), counter)
        local f = assert(io.open(path, "w"))
        f:close()
        return path
    end
    return function()
        os.execute("rm -rf " .. shell_quote(dir))
        if base ~= "/tmp" then uv.os_setenv("TMPDIR", base) else uv.os_unsetenv("TMPDIR") end
    end
end

--- test_command.main(args) -> exit code. `tamarco-host test`: builds the project's C extension
-- (unless --no-build), then runs busted with args; 0 when every spec passed.
function test_command.main(args)
    -- services the specs define get the same resources as under `run`
    require("tamarco.ops.default_resources").install()
    local busted_args = { [0] = "busted" }
    local build = true
    for _, a in ipairs(args) do
        if a == "--no-build" then
            build = false
        else
            busted_args[#busted_args + 1] = (a == "--busted-help") and "--help" or a
        end
    end
    -- a usage mistake (`--bogus`) is said here and is exit 2, like every
    -- other command's; busted itself would only end with 1
    local wants_help = false
    for _, a in ipairs(busted_args) do
        if a == "--help" or a == "-h" then wants_help = true end
    end
    local cli_ok, make_cli = pcall(require, "busted.modules.cli")
    if cli_ok and not wants_help then
        local cli = make_cli({ standalone = false })
        cli:set_name("busted")
        local parsed, usage_error = cli:parse(busted_args)
        if not parsed then
            return nil, (tostring(usage_error):gsub("^busted: error: ", ""):gsub("; re%-run with %-%-help for usage%.$",
                " (busted's options: tamarco-host test --busted-help)"))
        end
    end
    if build and is_file("c/CMakeLists.txt") then
        local built, err = test_command.build_extension(".")
        if not built then
            io.stderr:write("tamarco-host test: ", err, "\n")
            return 1
        end
    end
    -- the project's own modules (spec helpers, build/*.so), behind what the
    -- host and the system install
    require("tamarco.core.module_path").add_dir(require("luv").cwd())
    _G.arg = busted_args
    local remove_tmpdir = private_tmpdir()
    -- busted returns when everything passed; on failures it ends with a bare
    -- error() (its Lua 5.1 way of exiting non-zero), after printing them.
    local ok, err = pcall(require "busted.runner", { standalone = false })
    remove_tmpdir()
    if ok then return 0 end
    if err == nil then return 1 end
    error(err, 0)
end

return test_command
