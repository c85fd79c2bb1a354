--- Runs the host binary as a child process for CLI specs.
local process = require "tamarco.c.process"

local cli = {}

cli.host = process.exepath()

-- Child hosts put their report server on a free port, so that specs never
-- compete with each other or a running service for 5747.
local DEFAULT_ENV = { TAMARCO__SYSTEM__RESOURCES__TAMARCO_HTTP_REPORT_SERVER__PORT = "0" }

local function with_defaults(env)
    local merged = {}
    for k, v in pairs(DEFAULT_ENV) do merged[k] = v end
    for k, v in pairs(env or {}) do merged[k] = v end
    return merged
end

local function shell_quote(s)
    return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end

--- cli.read_all(path) -> the file's text ("" when it cannot be read).
local function read_all(path)
    local f = io.open(path, "r")
    if not f then return "" end
    local text = f:read("*a")
    f:close()
    return text
end
cli.read_all = read_all

--- cli.run({args...}, env[, cwd]) -> exit_code, output (stdout and stderr
-- together); the host runs in directory `cwd` when given.
function cli.run(args, env, cwd)
    local parts = {}
    if cwd then parts[1] = "cd " .. shell_quote(cwd) .. " &&" end
    for k, v in pairs(with_defaults(env)) do parts[#parts + 1] = k .. "=" .. shell_quote(v) end
    parts[#parts + 1] = shell_quote(cli.host)
    for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
    local out = os.tmpname()
    local command = table.concat(parts, " ") .. " >" .. out .. " 2>&1; echo $?"
    local pipe = io.popen(command)
    local code = tonumber(pipe:read("*a"))
    pipe:close()
    local output = read_all(out)
    os.remove(out)
    return code, output
end

--- cli.run_until(args, marker, signal[, env[, steps]]) starts the host, waits
-- until its output contains `marker` (up to 20 s), then for each step
-- {run = "shell command", wait = "marker"} runs the command and waits for the
-- marker, sends `signal` (e.g. "TERM") and returns exit_code, output.
-- Step commands see the host's pid as $pid and its output file as $out.
function cli.run_until(args, marker, signal, env, steps)
    local parts = {}
    for k, v in pairs(with_defaults(env)) do parts[#parts + 1] = k .. "=" .. shell_quote(v) end
    parts[#parts + 1] = shell_quote(cli.host)
    for _, a in ipairs(args) do parts[#parts + 1] = shell_quote(a) end
    local out = os.tmpname()
    local function wait_for(text)
        return "i=0; while [ $i -lt 400 ] && ! grep -qF " .. shell_quote(text) .. " " .. out
            .. "; do sleep 0.05; i=$((i+1)); done"
    end
    local lines = { "out=" .. shell_quote(out), table.concat(parts, " ") .. " >" .. out .. " 2>&1 & pid=$!",
        wait_for(marker) }
    for _, step in ipairs(steps or {}) do
        lines[#lines + 1] = step.run
        lines[#lines + 1] = wait_for(step.wait)
    end
    lines[#lines + 1] = "kill -" .. signal .. " $pid"
    lines[#lines + 1] = "wait $pid; echo $?"
    local script = table.concat(lines, "\n")
    local pipe = io.popen("sh -c " .. shell_quote(script))
    local code = tonumber(pipe:read("*a"))
    pipe:close()
    local output = read_all(out)
    os.remove(out)
    return code, output
end

--- Writes `text` to a new temporary file with the given suffix; returns its path.
function cli.write_temp(text, suffix)
    local base = os.tmpname()   -- creates `base` itself: only its name is used
    os.remove(base)
    local path = base .. (suffix or ".lua")
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
    return path
end

return cli
