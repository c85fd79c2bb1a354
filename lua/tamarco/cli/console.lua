--- `tamarco-host console TARGET [-e CODE]`: a Lua console inside a running
-- service (see tamarco.ops.debug.console_server for the service side).
local json = require "tamarco.core.json"
local introspect = require "tamarco.c.introspect"
local process = require "tamarco.c.process"
local console_server = require "tamarco.ops.debug.console_server"

local console_command = {}

console_command.usage = [[
usage: tamarco-host console TARGET [-e CODE]

Attaches to a running service started with --console (or the setting
system.console: true). TARGET is the service's pid, its name, or the path of
its socket (<service>-<pid>.sock in $XDG_RUNTIME_DIR, /run/tamarco or
/tmp/tamarco-<uid>). Each line is Lua evaluated in a new task of the
service (`svc` is the service; calls may yield); `help` lists the
commands (tasks, heap, settings, loglevel, reload, profile). Ctrl-C cancels
the running evaluation; Ctrl-D leaves; the service is not affected.
  -e CODE     evaluate CODE, print the result and exit: 0, or 1 on an error
Exit codes: 0, 1 Lua error (with -e), 2 usage, 3 cannot connect or refused.
]]

local EXIT_CONNECT = 3

local function list_dir(dir)
    local uv = require "luv"
    local names = {}
    local req = uv.fs_scandir(dir)
    if not req then return names end
    while true do
        local name = uv.fs_scandir_next(req)
        if not name then break end
        names[#names + 1] = name
    end
    return names
end

local function candidate_dirs()
    local dirs = console_server.socket_dirs()
    if introspect.uid() == 0 then   -- root may attach to any user's service
        for _, name in ipairs(list_dir("/run/user")) do dirs[#dirs + 1] = "/run/user/" .. name end
        for _, name in ipairs(list_dir("/tmp")) do
            if name:match("^tamarco%-%d+$") then dirs[#dirs + 1] = "/tmp/" .. name end
        end
    end
    return dirs
end

--- console_command.resolve(target) -> socket path | nil, message
function console_command.resolve(target)
    if target:find("/", 1, true) then return target end
    local pattern
    if target:match("^%d+$") then
        pattern = "^.+%-" .. target .. "%.sock$"
    else
        pattern = "^" .. target:gsub("%p", "%%%0") .. "%-%d+%.sock$"
    end
    local found, seen = {}, {}
    for _, dir in ipairs(candidate_dirs()) do
        for _, name in ipairs(list_dir(dir)) do
            local path = dir .. "/" .. name
            if name:match(pattern) and not seen[path] then
                seen[path] = true
                found[#found + 1] = path
            end
        end
    end
    if #found == 0 then
        return nil, ("no console socket for '%s' (is the service running with --console?)"):format(target)
    end
    if #found > 1 then
        table.sort(found)
        return nil, ("'%s' matches several services; give a pid or a path:\n  %s"):format(target,
            table.concat(found, "\n  "))
    end
    return found[1]
end

local function parse_args(args)
    local options = {}
    local i = 1
    while i <= #args do
        local a = args[i]
        if a == "-e" then
            if args[i + 1] == nil then return nil, "-e needs the code to evaluate" end
            options.code = args[i + 1]
            i = i + 2
        elseif a:sub(1, 1) == "-" and a ~= "-" then
            return nil, "unknown option '" .. a .. "'"
        elseif options.target then
            return nil, "unexpected argument '" .. a .. "'"
        else
            options.target = a
            i = i + 1
        end
    end
    if not options.target then return nil, "missing the TARGET (pid, service name or socket path)" end
    return options
end

-- A connection: send(message), receive() -> message | nil, err (runs the loop).
local function connect(path)
    local uv = require "luv"
    local pipe = uv.new_pipe(false)
    local connected, connect_err = false, nil
    pipe:connect(path, function(err)
        connected = true
        connect_err = err
    end)
    while not connected do process.run_loop("once") end
    if connect_err then
        pipe:close()
        return nil, "cannot connect to " .. path .. ": " .. tostring(connect_err)
    end
    local buffer, queue, closed = "", {}, false
    pipe:read_start(function(err, data)
        if err or not data then
            closed = true
            return
        end
        buffer = buffer .. data
        while true do
            local line, rest = buffer:match("^([^\n]*)\n(.*)$")
            if not line then break end
            buffer = rest
            local message = json.decode(line)
            if message ~= nil then queue[#queue + 1] = message end
        end
    end)
    local conn = {}
    function conn.send(message) pipe:write(assert(json.encode(message)) .. "\n") end
    function conn.receive()
        while #queue == 0 do
            if closed then return nil, "the service closed the connection" end
            process.run_loop("once")
        end
        return table.remove(queue, 1)
    end
    function conn.close() if not pipe:is_closing() then pipe:close() end process.run_loop("nowait") end
    return conn
end

-- Evaluates `code`; prints what it prints and its result. -> true | false (Lua
-- error) | nil, message (connection lost).
local function evaluate(conn, id, code)
    conn.send({ id = id, op = "eval", code = code })
    local sigint = assert(process.on_signal("SIGINT", function()
        io.stderr:write("^C cancelling\n")
        conn.send({ id = id, op = "cancel" })
    end))
    local result, err
    while true do
        local message
        message, err = conn.receive()
        if not message then break end
        if message.output then
            io.stdout:write(message.output, "\n")
        elseif message.id == id then
            if message.ok then
                if message.text and message.text ~= "" then
                    io.stdout:write(message.text, message.text:sub(-1) == "\n" and "" or "\n")
                end
                result = true
            else
                io.stdout:write("error: ", tostring(message.error), "\n")
                if message.traceback and message.traceback ~= "" then io.stdout:write(message.traceback, "\n") end
                result = false
            end
            break
        end
    end
    sigint:close()
    io.stdout:flush()
    if result == nil then return nil, err end
    return result
end

local function history_path()
    local home = os.getenv("HOME")
    if not home or home == "" then return nil end
    return home .. "/.tamarco_console_history"
end

local function interactive(conn, service_name)
    local uv = require "luv"
    local tty = uv.guess_handle(0) == "tty"
    local editor, history
    if tty then
        editor = require "tamarco.c.line_editor"
        history = history_path()
        editor.stifle_history(1000)
        if history then editor.read_history(history) end
        io.stdout:write(("attached to %s; `help` lists the commands, Ctrl-D leaves\n"):format(service_name))
    end
    local id = 0
    while true do
        local line
        if editor then
            line = editor.readline(service_name .. "> ")
        else
            line = io.read("*l")
        end
        if line == nil then break end
        if line:match("%S") then
            if editor then editor.add_history(line) end
            id = id + 1
            local ok, err = evaluate(conn, id, line)
            if ok == nil then
                io.stderr:write("tamarco-host console: ", tostring(err), "\n")
                return EXIT_CONNECT
            end
        end
    end
    if editor and history then editor.write_history(history) end
    if tty then io.stdout:write("\n") end
    return 0
end

--- console_command.main(args) -> exit code: `tamarco-host console TARGET
-- [-e CODE]` (0, 1 on a Lua error, 2 on a usage error, 3 when it cannot attach).
function console_command.main(args)
    local options, usage_error = parse_args(args)
    if not options then return nil, usage_error end
    local path, err = console_command.resolve(options.target)
    if not path then
        io.stderr:write("tamarco-host console: ", err, "\n")
        return EXIT_CONNECT
    end
    local conn
    conn, err = connect(path)
    if not conn then
        io.stderr:write("tamarco-host console: ", err, "\n")
        return EXIT_CONNECT
    end
    local hello
    hello, err = conn.receive()
    if not hello or hello.ok == false then
        io.stderr:write("tamarco-host console: ", tostring(hello and hello.error or err), "\n")
        conn.close()
        return EXIT_CONNECT
    end
    local code
    if options.code then
        local ok
        ok, err = evaluate(conn, 1, options.code)
        if ok == nil then
            io.stderr:write("tamarco-host console: ", tostring(err), "\n")
            code = EXIT_CONNECT
        else
            code = ok and 0 or 1
        end
    else
        code = interactive(conn, hello.service or "service")
    end
    conn.close()
    return code
end

return console_command
