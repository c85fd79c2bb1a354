--- tamarco.ops.debug.console_server: the service side of `tamarco-host console`.
--
-- A Unix domain socket `<service>-<pid>.sock`, mode 0600, in
-- $XDG_RUNTIME_DIR, else /run/tamarco/, else /tmp/tamarco-<uid>/ (a
-- directory of mode 0700 that must belong to the service's user); removed
-- at stop. A peer whose uid (SO_PEERCRED) is neither the service's nor
-- root is refused.
--
-- Protocol: one JSON object per line each way.
--   client: {"id": n, "op": "eval", "code": "..."} | {"id": n, "op": "cancel"}
--   server: {"service", "pid", "instance_id"} on connect, then per id
--           {"id", "output": text} (print) and one {"id", "ok": true, "text"}
--           or {"id", "ok": false, "error", "traceback"}
-- Each line is evaluated in a new task of the service, so it may yield
-- (a Redis call, an HTTP request, tamarco.sleep); cancel cancels that task
-- at its next yield. Closing the connection cancels what still runs.
local json = require "tamarco.core.json"
local introspect = require "tamarco.c.introspect"
local process = require "tamarco.c.process"
local scheduler = require "tamarco.c.scheduler"
local tasks = require "tamarco.core.tasks"
local pretty = require "tamarco.ops.debug.pretty"

local console_server = {}

local MAX_LINE = 1024 * 1024

local function writable_dir(path)
    local uv = require "luv"
    local stat = uv.fs_stat(path)
    return stat and stat.type == "directory" and uv.fs_access(path, "W") and true or false
end

--- The directories a console socket may be in, most preferred first.
function console_server.socket_dirs(uid)
    uid = uid or introspect.uid()
    local dirs = {}
    local xdg = os.getenv("XDG_RUNTIME_DIR")
    if xdg and xdg ~= "" then dirs[#dirs + 1] = xdg end
    dirs[#dirs + 1] = "/run/tamarco"
    dirs[#dirs + 1] = "/tmp/tamarco-" .. uid
    return dirs
end

-- The directory for this service's socket, created when needed.
local function socket_dir()
    local uv = require "luv"
    local uid = introspect.uid()
    local dirs = console_server.socket_dirs(uid)
    for i = 1, #dirs - 1 do
        if writable_dir(dirs[i]) then return dirs[i] end
    end
    local fallback = dirs[#dirs]
    if not uv.fs_stat(fallback) then
        local ok, err = uv.fs_mkdir(fallback, tonumber("700", 8))
        if not ok and not uv.fs_stat(fallback) then return nil, "cannot create " .. fallback .. ": " .. tostring(err) end
    end
    -- another user could have made it first: it must be ours and private
    local stat = uv.fs_lstat(fallback)
    if not stat or stat.type ~= "directory" or stat.uid ~= uid or stat.mode % 512 ~= tonumber("700", 8) then
        return nil, fallback .. " must be a directory of mode 0700 owned by uid " .. uid
    end
    return fallback
end

local Server = {}
Server.__index = Server

local Session = {}
Session.__index = Session

function Session:send(message)
    if self.closed then return end
    self.pipe:write(assert(json.encode(message)) .. "\n")
end

function Session:service()
    local svc = self.server.svc
    return svc.lifecycle and svc.lifecycle.service or svc
end

-- builtins: name -> function(session, args) -> text
local builtins = {}

builtins.help = function()
    return [[
Lua: any expression or statement, evaluated in a new task of the service
  (`svc` is the service; it may yield: svc.cache:call("GET", "k")).
  Globals you set stay for this console session; print() writes here.
Commands:
  tasks                      live tasks, handlers, threads: waits and tracebacks
  heap                       Lua heap, GC, JIT, RSS, fds, libuv handles, queues
  settings [key]             effective settings with their origins (secrets masked)
  loglevel                   the levels in force
  loglevel [logger] LEVEL    change the service's level, or one logger's
  reload                     reload the service's code (as SIGHUP does)
  profile SECONDS [folded]   CPU profile: top functions (or folded stacks)
  help                       this text
Ctrl-C cancels the running evaluation (at its next yield); Ctrl-D leaves.
]]
end

builtins.tasks = function(session)
    local debug_tasks = require "tamarco.ops.debug.tasks"
    return debug_tasks.to_text(debug_tasks.snapshot(session:service(), { limit = 1000 }))
end

builtins.heap = function(session)
    local heap = require "tamarco.ops.debug.heap"
    return heap.to_text(heap.figures(session:service()))
end

builtins.settings = function(session, args)
    local settings_view = require "tamarco.ops.debug.settings_view"
    local svc = session:service()
    return settings_view.to_text(settings_view.entries(svc.settings.store, args[1]))
end

builtins.loglevel = function(session, args)
    local log_levels = require "tamarco.ops.debug.log_levels"
    local logging = require "tamarco.core.logging"
    if #args == 0 then
        local lines = { "service: " .. tostring(logging.level()) }
        for name, level in pairs(logging.logger_levels()) do lines[#lines + 1] = name .. ": " .. level end
        table.sort(lines)
        return table.concat(lines, "\n")
    end
    local logger, level = nil, args[1]
    if #args >= 2 then logger, level = args[1], args[2] end
    local old, new = log_levels.set(session:service(), logger, level, "console", session.who)
    if not old then error(new, 0) end
    return ("%s: %s -> %s"):format(logger or "service", old, new)
end

builtins.reload = function(session)
    local cycle = session:service().lifecycle
    if not (cycle and cycle.request_reload) then error("reload needs a service run by `tamarco-host run`", 0) end
    cycle.request_reload("console (" .. session.who .. ")")
    return "reload requested (see the service's log)"
end

builtins.profile = function(session, args)
    local profile = require "tamarco.ops.debug.profile"
    local seconds, err = profile.check(args[1] or 10, "f")
    if not seconds then error(err, 0) end
    local result, busy = profile.run(session:service(), seconds, "f")
    if not result then error("a profile is already running (" .. tostring(busy) .. ")", 0) end
    if args[2] == "folded" then return profile.folded_text(result) end
    return profile.top_text(result, 25)
end

-- A line naming a builtin ("tasks", "loglevel hello.api DEBUG") -> fn, args.
local function as_builtin(code)
    local word, rest = code:match("^%s*([%a_]+)%s*(.-)%s*$")
    local fn = word and builtins[word]
    if not fn then return nil end
    if rest ~= "" and not rest:match("^[%w_%.%-%*]") then return nil end   -- "tasks = 1" is Lua
    local args = {}
    for arg in rest:gmatch("%S+") do args[#args + 1] = arg end
    return fn, args
end

local function compile(code, env)
    local fn, err = loadstring("return " .. code, "=console")
    if not fn then fn, err = loadstring(code, "=console") end
    if not fn then return nil, err end
    setfenv(fn, env)
    return fn
end

local function pack(...) return { n = select("#", ...), ... } end

-- The traceback of an evaluation without the console's own frames.
local function traceback_of(err)
    if err == tasks.CANCELLED then return { error = "cancelled" } end
    local lines = {}
    for line in debug.traceback("", 2):gmatch("[^\n]+") do
        if line:find("debug/console_server.lua", 1, true) or line:find("in function 'xpcall'", 1, true) then break end
        lines[#lines + 1] = line
    end
    return { error = tostring(err), traceback = table.concat(lines, "\n") }
end

function Session:evaluate(id, code)
    if type(code) ~= "string" then
        return self:send({ id = id, ok = false, error = "code must be a string" })
    end
    local done = false
    local co = scheduler.start(function()
        tasks.names[coroutine.running()] = "console: " .. code:sub(1, 60)
        local builtin, args = as_builtin(code)
        local ok, result
        if builtin then
            ok, result = xpcall(function() return builtin(self, args) end, traceback_of)
        else
            local fn, err = compile(code, self.env)
            if not fn then
                ok, result = false, { error = err }
            else
                local packed
                ok, packed = xpcall(function() return pack(fn()) end, traceback_of)
                if ok then
                    ok, result = pcall(pretty.values, packed.n, unpack(packed, 1, packed.n))
                    if not ok then result = { error = "cannot show the result: " .. tostring(result) } end
                else
                    result = packed
                end
            end
        end
        done = true
        self.running[id] = nil
        if ok then
            self:send({ id = id, ok = true, text = result })
        else
            self:send({ id = id, ok = false, error = result.error, traceback = result.traceback })
        end
    end)
    if not done then self.running[id] = co end   -- it yielded: cancel may come
end

function Session:on_line(line)
    local message = json.decode(line)
    if type(message) ~= "table" then
        return self:send({ ok = false, error = "bad message (one JSON object per line)" })
    end
    if message.op == "eval" then
        self:evaluate(message.id, message.code)
    elseif message.op == "cancel" then
        local co = self.running[message.id]
        if co then tasks.cancel(co) end
    end
end

function Session:close()
    if self.closed then return end
    self.closed = true
    for _, co in pairs(self.running) do tasks.cancel(co) end
    self.running = {}
    if not self.pipe:is_closing() then self.pipe:close() end
    self.server.sessions[self] = nil
end

function Server:accept()
    local uv = require "luv"
    local pipe = uv.new_pipe(false)
    if not self.pipe:accept(pipe) then
        pipe:close()
        return
    end
    local svc = self.svc
    local uid, err = introspect.peer_uid(pipe:fileno())
    local own = introspect.uid()
    if uid ~= own and uid ~= 0 then
        svc.logger:warning("console connection refused", { peer_uid = uid, error = err, service_uid = own })
        pipe:write(assert(json.encode({ ok = false, error = ("refused: uid %s is neither the service's (%d) nor root")
            :format(tostring(uid), own) })) .. "\n", function() pipe:close() end)
        return
    end
    local session = setmetatable({ server = self, pipe = pipe, running = {}, buffer = "",
        who = ("console uid %d"):format(uid) }, Session)
    session.env = setmetatable({
        print = function(...)
            local parts = {}
            for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
            session:send({ output = table.concat(parts, "\t") })
        end,
    }, { __index = function(_, k)
        if k == "svc" then return session:service() end
        -- a global, else a module the service loaded, by its name
        -- (`tamarco`, `luv`, `tamarco.json`, ...)
        local value = _G[k]
        if value == nil then value = package.loaded[k] end
        return value
    end })
    self.sessions[session] = true
    svc.logger:info("console attached", { peer_uid = uid })
    session:send({ service = svc.name, pid = process.pid(), instance_id = svc.instance_id })
    pipe:read_start(function(read_err, data)
        if read_err or not data then
            session:close()
            return
        end
        session.buffer = session.buffer .. data
        while true do
            local line, rest = session.buffer:match("^([^\n]*)\n(.*)$")
            if not line then break end
            session.buffer = rest
            session:on_line(line)
        end
        if #session.buffer > MAX_LINE then
            session:send({ ok = false, error = "line too long" })
            session:close()
        end
    end)
end

--- console_server.start(svc) -> server | nil, message. server.path is the
-- socket's path; server:close() removes it.
function console_server.start(svc)
    local uv = require "luv"
    local dir, err = socket_dir()
    if not dir then return nil, err end
    local path = ("%s/%s-%d.sock"):format(dir, svc.name, process.pid())
    os.remove(path)   -- left by a process of the same pid that could not clean up
    local pipe = uv.new_pipe(false)
    local ok, bind_err = pipe:bind(path)
    if not ok then
        pipe:close()
        return nil, "cannot bind " .. path .. ": " .. tostring(bind_err)
    end
    uv.fs_chmod(path, tonumber("600", 8))
    local server = setmetatable({ svc = svc, path = path, pipe = pipe, sessions = {} }, Server)
    local listening, listen_err = pipe:listen(16, function(accept_err)
        if not accept_err then server:accept() end
    end)
    if not listening then
        pipe:close()
        os.remove(path)
        return nil, "cannot listen on " .. path .. ": " .. tostring(listen_err)
    end
    return server
end

function Server:close()
    for session in pairs(self.sessions) do session:close() end
    if not self.pipe:is_closing() then self.pipe:close() end
    os.remove(self.path)
end

return console_server
