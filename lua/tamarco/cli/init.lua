--- tamarco-host's command line. `main(argv)` returns the process exit code.
local process = require "tamarco.c.process"

local cli = {}

local EXIT_USAGE = 2

local USAGE = [[
usage: tamarco-host <command> [options]

commands:
  run FILE [--settings FILE.yml] [--watchdog SECONDS] [--watch] [--workers N]
           [--strict-settings] [--debug] [--console]
                        run the service that FILE returns (--workers N: N
                        worker processes sharing its ports)
  console TARGET [-e CODE]
                        a Lua console inside a running service (pid, name or socket)
  test [busted options] [SPEC...]
                        run busted specs inside the host
  new service NAME [--dir DIR] [--with-c-extension]
                        generate a service project from the templates
  etcd write-yml FILE | read KEY [--recursive] | delete KEY [--recursive]
                        Tamarco's settings in etcd
  version               print the host's version

Run `tamarco-host <command> --help` for a command's options.
]]

local commands = {}

commands.version = {
    usage = "usage: tamarco-host version\n\nPrints the host's version.\n",
    main = function(args)
        if #args > 0 then
            return nil, "version takes no arguments (got '" .. args[1] .. "')"
        end
        print("tamarco-host " .. process.version)
        return 0
    end,
}

commands.test = {
    usage = [[
usage: tamarco-host test [busted options] [ROOT...]

Runs busted inside the host, so that specs can require every host module and
use tamarco.testing to run tasks and services. Options are busted's
(see `tamarco-host test --busted-help`); ROOT defaults to ./spec.
In a project with a C extension (./c/CMakeLists.txt) it first builds it
into ./build with CMake against this host (--no-build skips that).
]],
    main = function(args)
        return require("tamarco.cli.test").main(args)
    end,
}

commands.new = {
    usage = [[
usage: tamarco-host new service NAME [--dir DIR] [--with-c-extension]

Generates a ready service project in DIR (default ./NAME) from the host's
templates: service.lua with an HTTP route, settings.yml, a spec, README.md,
.gitignore, a systemd unit, a Dockerfile and a Kubernetes Deployment. With
--with-c-extension, also a C module in c/ built with CMake (find_package
(TamarcoHost)) and a spec that calls it. `tamarco-host test` in DIR builds
the C module and runs the specs. NAME: lowercase letters, digits, '-' and
'_', starting with a letter. An existing DIR is never touched (exit 2).
]],
    main = function(args)
        return require("tamarco.cli.new").main(args)
    end,
}

commands.etcd = {
    -- loaded only when asked for: `run` must not pay for the etcd CLI
    usage = function() return require("tamarco.cli.etcd").usage end,
    main = function(args)
        return require("tamarco.cli.etcd").main(args)
    end,
}

commands.run = {
    usage = [[
usage: tamarco-host run FILE [--settings FILE.yml] [--watchdog SECONDS] [--watch] [--workers N]
                          [--strict-settings] [--debug] [--console]

Runs the service that the Lua file FILE returns until SIGINT or SIGTERM.
SIGHUP reloads the service's code in place (hot reload).
  --settings FILE.yml   settings file (also TAMARCO_YML_FILE)
  --watch               reload the code when a .lua file next to FILE changes
                        (also the setting system.microservices.<svc>.hot_reload)
  --workers N           run N worker processes sharing the listening ports
                        (SO_REUSEPORT), supervised: a crashed worker is
                        restarted, SIGTERM stops and drains them all
  --debug               the /debug pages on the report server (also the setting
                        system.resources.tamarco_http_report_server.debug)
  --console             the console socket for `tamarco-host console` (also
                        the setting system.console)
  --watchdog SECONDS    how long a stop may take before the process is
                        ended with exit code 1 (default: the setting
                        system.stop_timeout_seconds, else 30)
  --strict-settings     an unknown key under a section the framework owns
                        (system.logging, system.resources.<resource>) is
                        an error (exit 2), not a warning (also the setting
                        system.strict_settings: true)
Exit codes: 0 clean stop, 1 runtime failure or watchdog, 2 usage, settings or
service-file error, 11 a resource failed to bind, 12 resource dependencies
cannot be ordered.
]],
    main = function(args)
        return require("tamarco.cli.run").main(args)
    end,
}

commands.console = {
    usage = function() return require("tamarco.cli.console").usage end,
    main = function(args)
        return require("tamarco.cli.console").main(args)
    end,
}

--- cli.usage_of(command) -> the usage text of a command table (its `usage`, called when a function).
function cli.usage_of(command)
    local usage = command.usage
    if type(usage) == "function" then usage = usage() end
    return usage
end

--- cli.main(argv) -> exit code. Runs the command named by argv[1] (run, test, etcd, new, version) with the
-- rest of argv; prints the usage on --help, an unknown command or a usage error (exit 2).
function cli.main(argv)
    local command_name = argv[1]
    if command_name == nil or command_name == "--help" or command_name == "-h" or command_name == "help" then
        io.stdout:write(USAGE)
        return command_name and 0 or EXIT_USAGE
    end
    local command = commands[command_name]
    if not command then
        io.stderr:write("tamarco-host: unknown command '" .. command_name .. "'\n\n" .. USAGE)
        return EXIT_USAGE
    end
    local args = {}
    for i = 2, #argv do args[#args + 1] = argv[i] end
    if args[1] == "--help" or args[1] == "-h" then
        io.stdout:write(cli.usage_of(command))
        return 0
    end
    local code, err = command.main(args)
    if code == nil then
        io.stderr:write("tamarco-host " .. command_name .. ": " .. tostring(err) .. "\n\n" .. cli.usage_of(command))
        return EXIT_USAGE
    end
    return code
end

return cli
