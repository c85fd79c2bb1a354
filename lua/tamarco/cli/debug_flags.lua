--- tamarco.cli.debug_flags: `run --debug` and `run --console` as a settings
-- source above all others, so that /debug/settings shows where the value
-- comes from ("the command line (--debug)").
local settings = require "tamarco.core.settings"

local cli_flags = {}

--- cli_flags.source(options) -> a settings source holding what --debug and
-- --console (options.debug, options.console) turn on.
function cli_flags.source(options)
    local tree = { system = {} }
    local names = {}
    if options.debug then
        tree.system.resources = { tamarco_http_report_server = { debug = true } }
        names[#names + 1] = "--debug"
    end
    if options.console then
        tree.system.console = true
        names[#names + 1] = "--console"
    end
    return settings.static_source("the command line (" .. table.concat(names, " ") .. ")", tree)
end

return cli_flags
