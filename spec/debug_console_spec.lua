-- `tamarco-host console` against a real service under HTTP and Redis
-- traffic. Needs a real redis-server (TAMARCO_TEST_REDIS_HOST/PORT).
local cli = require "spec.support.cli"
local free_port = require("spec.support.net").free_port

local REDIS_HOST = os.getenv("TAMARCO_TEST_REDIS_HOST")
local REDIS_PORT = os.getenv("TAMARCO_TEST_REDIS_PORT")
if not REDIS_HOST or not REDIS_PORT then
    error("debug_console_spec needs a real redis-server: first\n"
        .. "  eval \"$(TAMARCO_SERVICES=redis scripts/test-services.sh start)\"", 0)
end

local SERVICE = "spec/fixtures/services/debug_service.lua"

local function shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

-- a private runtime directory for the socket (removed by the caller)
local function runtime_dir()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -m 700 " .. dir) == 0)
    return dir
end

local function run_service(dir, steps)
    local port = free_port()
    local with_dir = {}
    for i, step in ipairs(steps(port)) do
        with_dir[i] = { run = "XDG_RUNTIME_DIR=" .. dir .. "\n" .. step.run, wait = step.wait }
    end
    local code, out = cli.run_until({ "run", SERVICE, "--console" }, "console on", "TERM", {
        XDG_RUNTIME_DIR = dir,
        TAMARCO__SYSTEM__RESOURCES__API__PORT = tostring(port),
        TAMARCO__SYSTEM__RESOURCES__CACHE__HOST = REDIS_HOST,
        TAMARCO__SYSTEM__RESOURCES__CACHE__PORT = REDIS_PORT,
        TAMARCO__SYSTEM__LOGGING__PROFILE = "PRODUCTION",
    }, with_dir)
    return code, out
end

-- the console client finds the socket through the same XDG_RUNTIME_DIR
local function console(args, out_file)
    local parts = { "env", "XDG_RUNTIME_DIR=$XDG_RUNTIME_DIR", shell_quote(cli.host), "console" }
    for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
    return table.concat(parts, " ") .. " > " .. out_file .. " 2>&1; echo \"exit=$?\" >> " .. out_file
end

describe("console", function()
    it("evaluates yielding Lua in the service while it keeps serving; errors come with tracebacks", function()
        local dir = runtime_dir()
        local f = function(name) return dir .. "/" .. name end
        local lines = table.concat({
            "x = 20",
            "x + 22",
            "print('printed', x)",
            "tasks",
            "loglevel debugged.api DEBUG",
            "settings system.resources.cache.port",
            "svc.cache:call('SET', 'debug_console_key', 'v1')",
            "svc.cache:call('GET', 'debug_console_key')",
        }, "\n") .. "\n"
        local code, out = run_service(dir, function(port)
            local api = "http://127.0.0.1:" .. port
            return {
                { run = table.concat({
                    -- traffic while the console works: every answer must be a 200
                    "(for i in $(seq 1 150); do curl -s -o /dev/null -w '%{http_code}\\n' " .. api
                        .. "/hello/x; done > " .. f("codes")  .. ") & load=$!",
                    console({ "debugged", "-e", "tamarco.sleep(300); return svc.cache:call('INCR', 'debug_console_n')" },
                        f("yield")),
                    "printf %s " .. shell_quote(lines) .. " | " .. console({ "debugged" }, f("session")),
                    console({ "debugged", "-e", "local t = nil\nreturn t.field" }, f("error")),
                    console({ "debugged", "-e", "return (" }, f("syntax")),
                    console({ "nosuchservice", "-e", "1" }, f("missing")),
                    "wait $load",
                }, "\n"), wait = "console on" },
            }
        end)
        local results = {}
        for _, name in ipairs({ "codes", "yield", "session", "error", "syntax", "missing" }) do
            results[name] = cli.read_all(f(name))
        end
        local ls = io.popen("ls " .. dir .. "/*.sock 2>/dev/null")
        local leftovers = ls:read("*a")   -- "" once the socket is gone
        ls:close()
        os.execute("rm -rf " .. dir)
        assert.are.equal(0, code, out)

        local ok_count, other = 0, {}
        for status in results.codes:gmatch("%d+") do
            if status == "200" then ok_count = ok_count + 1 else other[#other + 1] = status end
        end
        assert.are.equal(150, ok_count, table.concat(other, " "))

        assert.matches("^%d+\nnil\nexit=0\n$", results.yield)   -- the reply and the error value
        assert.matches("42\n", results.session, 1, true)
        assert.matches("printed\t20\n", results.session, 1, true)
        assert.matches("task redis traffic %[0x%x+%] waiting: [^\n]+\n[^\n]*\n", results.session)
        assert.matches("debug_service.lua:%d+: in function", results.session)
        assert.matches("debugged.api: INFO -> DEBUG", results.session, 1, true)
        assert.matches("system.resources.cache.port = " .. REDIS_PORT
            .. "    (environment variable TAMARCO__SYSTEM__RESOURCES__CACHE__PORT)", results.session, 1, true)
        assert.matches('"v1"\nnil\nexit=0\n$', results.session)
        assert.matches("error: console:2: attempt to index local 't' %(a nil value%)\nstack traceback:\n", results.error)
        assert.matches("exit=1\n$", results.error)
        assert.matches("exit=1\n$", results.syntax)
        assert.matches("no console socket for 'nosuchservice'", results.missing, 1, true)
        assert.matches("exit=3\n$", results.missing)
        -- the change of level is logged with where it came from
        assert.matches('"source":"console"', out, 1, true)
        assert.are.equal("", leftovers)
    end)

    it("cancels the running evaluation on Ctrl-C, not the service", function()
        local dir = runtime_dir()
        local f = function(name) return dir .. "/" .. name end
        local code, out = run_service(dir, function()
            return {
                { run = table.concat({
                    "(" .. console({ "debugged", "-e", "tamarco.sleep(60000) return 'not cancelled'" }, f("cancelled"))
                        .. ") & client=$!",
                    "for i in $(seq 1 50); do pgrep -P $client >/dev/null && break; sleep 0.1; done",
                    "sleep 0.5; pkill -INT -P $client",
                    "wait $client",
                    console({ "debugged", "-e", "return 'still here'" }, f("after")),
                }, "\n"), wait = "console on" },
            }
        end)
        local cancelled, after = cli.read_all(f("cancelled")), cli.read_all(f("after"))
        os.execute("rm -rf " .. dir)
        assert.are.equal(0, code, out)
        assert.matches("error: cancelled\nexit=1\n", cancelled, 1, true)
        assert.matches('"still here"\nexit=0\n', after, 1, true)
    end)

    it("refuses another uid (SO_PEERCRED) even when the socket's permissions would let it in", function()
        local dir = runtime_dir()
        local f = function(name) return dir .. "/" .. name end
        local as_nobody = "setpriv --reuid=nobody --regid=nogroup --clear-groups "
        local code, out = run_service(dir, function()
            return {
                { run = table.concat({
                    "socket=$(ls " .. dir .. "/debugged-*.sock)",
                    "stat -c %a $socket > " .. f("mode"),
                    -- the socket is 0600 in a 0700 directory: nobody cannot even connect
                    as_nobody .. console({ "$socket", "-e", "1" }, f("denied")):gsub("'%$socket'", "$socket"),
                    -- opened up by mistake: the peer's uid is still checked
                    "chmod 755 " .. dir .. "; chmod 666 $socket",
                    as_nobody .. console({ "$socket", "-e", "1" }, f("refused")):gsub("'%$socket'", "$socket"),
                    "chmod 700 " .. dir,
                }, "\n"), wait = "console on" },
            }
        end)
        local mode, denied, refused = cli.read_all(f("mode")), cli.read_all(f("denied")), cli.read_all(f("refused"))
        os.execute("rm -rf " .. dir)
        assert.are.equal(0, code, out)
        assert.are.equal("600\n", mode)
        assert.matches("cannot connect", denied, 1, true)
        assert.matches("exit=3\n$", denied)
        assert.matches("refused: uid %d+ is neither the service's %(%d+%) nor root", refused)
        assert.matches("exit=3\n$", refused)
        assert.matches("console connection refused", out, 1, true)
    end)
end)
