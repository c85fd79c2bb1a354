--- tamarco.ops.debug.resource (the `tamarco_debug` resource every service with a
-- report server gets): live introspection of the running service.
--
--   * the /debug pages of the report server (tamarco.ops.debug.pages), off
--     unless `--debug` or system.resources.tamarco_http_report_server.debug
--     is true. On a report server bound to a non-loopback address they need
--     `debug_token` (same section): the service refuses to start (exit 2)
--     without one, and every /debug request must then carry
--     `Authorization: Bearer <token>`.
--   * the console socket (tamarco.ops.debug.console_server), off unless
--     `--console` or system.console is true.
--   * run-time log levels from the settings (system.logging.levels), always.
local base = require "tamarco.core.resource"

local Debug = base.class("tamarco_debug")

local LOOPBACK = { ["localhost"] = true, ["::1"] = true, ["ip6-localhost"] = true }

--- Debug.is_loopback(host) -> true for localhost, ::1 and 127.x.y.z.
function Debug.is_loopback(host)
    host = tostring(host or "")
    return LOOPBACK[host] or host:match("^127%.%d+%.%d+%.%d+$") ~= nil
end

--- Debug:init(options): after the report server, whose routes it turns on.
function Debug:init(options)
    base.Resource.init(self, options)
    self.depends_on = { "tamarco_http_report_server" }
end

local function checked(view, key, lua_type, default)
    local value = view:get(key, default)
    if value ~= nil and type(value) ~= lua_type then
        error(view:error(key, "must be a " .. lua_type .. ", not " .. tostring(value)), 0)
    end
    return value
end

--- Debug:start(): follows system.logging.levels; turns the /debug pages on
-- when the report server's `debug` setting says so (refused off loopback
-- without `debug_token`); opens the console socket when `system.console`.
function Debug:start()
    local svc = self.service
    self.log_watch = require("tamarco.ops.debug.log_levels").watch_settings(svc)

    local report = svc.resources.tamarco_http_report_server
    local view = report.settings
    if type(view) == "table" and view.get and checked(view, "debug", "boolean", false) then
        local token = checked(view, "debug_token", "string", nil)
        if token == "" then error(view:error("debug_token", "must not be empty"), 0) end
        local host = report:setting("host", "127.0.0.1")
        if not Debug.is_loopback(host) and not token then
            error(view:error("debug", ("debug pages on the non-loopback address %s need debug_token (a secret "
                .. "every /debug request sends as Authorization: Bearer <token>)"):format(tostring(host))), 0)
        end
        self.token = token
        self.pages_on = true
        require("tamarco.ops.debug.heap").enable()
        local _, port = report:address()
        self.logger:info(("debug pages on http://%s:%s/debug/"):format(tostring(host), tostring(port)),
            { token = token and "set" or "none" })
    end

    if checked(svc.settings, "console", "boolean", false) then
        local console_server = require "tamarco.ops.debug.console_server"
        local server, err = console_server.start(svc)
        if not server then
            error(svc.settings:error("console", "cannot open the console socket: " .. tostring(err)), 0)
        end
        self.console = server
        self.logger:info("console on " .. server.path, { socket = server.path })
    end
end

--- Debug:stop(): closes the console socket, turns the pages off.
function Debug:stop()
    if self.log_watch then self.log_watch:cancel() end
    self.log_watch = nil
    if self.console then self.console:close() end
    self.console = nil
    if self.pages_on then require("tamarco.ops.debug.heap").disable() end
    self.pages_on = false
end

-- Hot reload: the pages and the console keep running for the new code (they
-- look the service up at each request).
Debug.adopt = base.keep_on_reload

--- Debug:status() -> { status, pages, console = socket path | nil }.
function Debug:status()
    return { status = self.status_code, pages = self.pages_on or false,
        console = self.console and self.console.path or nil }
end

return Debug
