--- `tamarco-host run FILE`: provisional logging -> settings -> logging ->
-- lifecycle, until SIGINT/SIGTERM; returns the exit code.
local errors = require "tamarco.core.errors"
local lifecycle = require "tamarco.core.lifecycle"
local log_sinks = require "tamarco.ops.log_sinks"
local reload = require "tamarco.ops.reload"
local logging = require "tamarco.core.logging"
local process = require "tamarco.c.process"
local scheduler = require "tamarco.c.scheduler"
local secrets = require "tamarco.core.secrets"
local service_file = require "tamarco.core.service_file"
local settings = require "tamarco.core.settings"
local settings_schema = require "tamarco.core.settings_schema"
local systemd = require "tamarco.ops.systemd"

local run_command = {}

local function parse_args(args)
    local options = {}
    local i = 1
    while i <= #args do
        local a = args[i]
        if a == "--settings" or a == "--watchdog" or a == "--workers" then
            local value = args[i + 1]
            if value == nil then return nil, "option " .. a .. " needs a value" end
            options[a:sub(3)] = value
            i = i + 2
        elseif a == "--watch" or a == "--debug" or a == "--console" then
            options[a:sub(3)] = true
            i = i + 1
        elseif a == "--strict-settings" then
            options.strict = true
            i = i + 1
        elseif a:sub(1, 1) == "-" then
            return nil, "unknown option '" .. a .. "'"
        elseif options.file then
            return nil, "unexpected argument '" .. a .. "' (one service file only)"
        else
            options.file = a
            i = i + 1
        end
    end
    if not options.file then return nil, "missing the service FILE" end
    if options.workers then
        local count = tonumber(options.workers)
        if not count or count < 1 or count % 1 ~= 0 then
            return nil, "--workers needs a whole number >= 1 (got '" .. options.workers .. "')"
        end
        options.workers = count
    end
    if options.watchdog then
        local seconds = tonumber(options.watchdog)
        if not seconds or seconds <= 0 then
            return nil, "--watchdog needs a number of seconds > 0 (got '" .. options.watchdog .. "')"
        end
        options.watchdog = seconds
    end
    return options
end

-- Reports a fatal error before the service runs, as one plain line on
-- stderr; returns its exit code.
local function fail(_, err)
    local message = errors.is(err) and err.message or secrets.mask_urls(tostring(err))
    logging.flush()
    io.stderr:write("tamarco-host: ", message, "\n")
    return errors.exit_code_of(err)
end

-- Reads the settings from etcd, which may mean waiting for it (retry,
-- ETCD_CHECK_KEY). SIGINT/SIGTERM during the wait end it: nothing has
-- started yet, so that is a clean stop.
-- -> source | nil, err | nil, nil, signal name
local function attach_etcd(store, boot_logger)
    local settings_etcd = require "tamarco.ops.settings_etcd"
    local tasks = require "tamarco.core.tasks"
    local waiting, stop_signal
    local listeners = {}
    for _, name in ipairs({ "SIGINT", "SIGTERM" }) do
        listeners[#listeners + 1] = assert(process.on_signal(name, function()
            stop_signal = name
            if waiting then tasks.cancel(waiting) end
        end))
    end
    local ok, attached, err = pcall(require("tamarco.clients.etcd").run_sync, function()
        waiting = scheduler.current()
        return settings_etcd.attach(store, {
            log = function(level, message) boot_logger[level](boot_logger, message) end })
    end)
    for _, listener in ipairs(listeners) do listener:close() end
    if stop_signal then return nil, nil, stop_signal end
    if not ok then error(attached, 0) end
    return attached, err
end

--- run_command.main(args) -> exit code | nil, usage error. `tamarco-host run FILE ...`: loads
-- the service, its settings and logging, runs it until a stop signal (or supervises
-- `--workers N` processes).
function run_command.main(args)
    local options, usage_error = parse_args(args)
    if not options then return nil, usage_error end
    require("tamarco.ops.default_resources").install()
    if options.workers and options.workers > 1 then
        local worker_args = {}
        local i = 1
        while i <= #args do
            if args[i] == "--workers" then i = i + 2 else
                worker_args[#worker_args + 1] = args[i]
                i = i + 1
            end
        end
        table.insert(worker_args, 1, "run")
        local supervisor_logger = logging.provisional("tamarco-host.supervisor")
        return require("tamarco.ops.workers").supervise(options.workers, worker_args, function(level, message)
            supervisor_logger[level](supervisor_logger, message)
        end)
    end

    local boot_logger = logging.provisional("tamarco-host")
    local ok, svc = pcall(service_file.load, options.file)
    if not ok then return fail(boot_logger, svc) end

    local store, settings_error = settings.load {
        dict = svc.definition.settings,
        yaml_file = options.settings,
        environ = true,
    }
    if not store then return fail(boot_logger, settings_error) end
    if options.debug or options.console then   -- above every other source
        assert(store:add_source(require("tamarco.cli.debug_flags").source(options)))
    end
    local etcd_configured = (os.getenv("TAMARCO_ETCD_HOST") or "") ~= ""
        or (os.getenv("TAMARCO_ETCD_ENDPOINTS") or "") ~= ""
        or store:get("system.etcd.endpoints", nil) ~= nil
    if etcd_configured then   -- etcd: above the file, below the environment
        local attached, etcd_error, stop_signal = attach_etcd(store, boot_logger)
        if stop_signal then
            boot_logger:info("received " .. stop_signal .. " while waiting for etcd; nothing was started")
            logging.flush()
            return 0
        end
        if not attached then return fail(boot_logger, etcd_error) end   -- unreachable: exit 2
    end

    -- the framework's own settings: types, ranges, misspelled keys
    local checked, warnings = pcall(settings_schema.check, store, svc)
    if not checked then return fail(boot_logger, warnings) end
    if #warnings > 0 and settings_schema.strict(store, options) then
        logging.flush()
        for _, warning in ipairs(warnings) do io.stderr:write("tamarco-host: ", warning.message, "\n") end
        return fail(boot_logger, errors.new("settings", ("%d unknown setting%s: an error with --strict-settings "
            .. "or system.strict_settings"):format(#warnings, #warnings > 1 and "s" or "")))
    end

    local configured, logging_error = pcall(logging.configure_from_settings, store:view(svc.name), {
        service_name = svc.name,
        deploy_name = store:get("system.deploy_name", "tamarco"),
        instance_id = svc.instance_id,
    })
    if not configured then
        return fail(boot_logger, errors.is(logging_error) and logging_error
            or errors.new("settings", "logging settings: " .. tostring(logging_error)))
    end
    local sinks_ok, remote_sinks = pcall(log_sinks.configure_from_settings, store:view(svc.name), logging)
    if not sinks_ok then
        return fail(boot_logger, errors.is(remote_sinks) and remote_sinks
            or errors.new("settings", "remote log sinks: " .. tostring(remote_sinks)))
    end

    local settings_logger = logging.get_logger(svc.name .. ".settings")
    for _, warning in ipairs(warnings) do settings_logger:warning(warning.message, { key = warning.key }) end
    -- from now on a settings change is checked the same way before it is
    -- applied, and what is refused is said through the service's logger
    store.validate = settings_schema.validator(svc)
    store.log = function(level, message) settings_logger[level](settings_logger, message) end

    local stop_seconds = options.watchdog or store:get("system.stop_timeout_seconds", 30)
    local watchdog_armed = false
    local stop_requested_at
    local function arm_watchdog()
        if watchdog_armed then return end
        watchdog_armed = true
        stop_requested_at = require("tamarco.c.timer").now()
        process.watchdog(stop_seconds, ("tamarco-host: service '%s' did not stop within %s s; exiting with code 1\n")
            :format(svc.name, tostring(stop_seconds)))
    end

    local created, cycle = pcall(lifecycle.new, svc, {
        settings = store,
        logging = logging,
        stop_timeout_ms = stop_seconds * 1000,
        on_stop_requested = function()
            systemd.notify("STOPPING=1")
            arm_watchdog()
        end,
    })
    if not created then return fail(boot_logger, cycle) end
    -- systemd (Type=notify): READY=1 once every start-up phase has run
    local start_phases = cycle.start
    function cycle.start(self)
        local ok, code, err = start_phases(self)
        if ok then systemd.notify("READY=1") end
        return ok, code, err
    end

    -- The host delivers the signals (each in a task of its own); what they
    -- mean is decided here.
    local signals = {}
    local function on_signal(name, fn)
        signals[#signals + 1] = assert(process.on_signal(name, fn))
    end
    for _, name in ipairs({ "SIGINT", "SIGTERM" }) do
        on_signal(name, function()
            cycle.service.logger:info("received " .. name)
            cycle:request_stop(name)
        end)
    end
    -- Hot reload triggers: SIGHUP, the service's files (--watch or the
    -- setting hot_reload), settings listed in the service's reload_on.
    on_signal("SIGHUP", function() reload.request(cycle, options.file, "SIGHUP") end)
    cycle.request_reload = function(reason) reload.request(cycle, options.file, reason) end   -- the console's
    local file_watcher
    if options.watch or svc.settings:get("hot_reload", false) then
        file_watcher = reload.watch_files(options.file:match("^(.*)/[^/]*$") or ".", function(name)
            reload.request(cycle, options.file, "file " .. name .. " changed")
        end)
    end

    local exit_code = 1
    local runner = scheduler.spawn(function()
        store:start_watching()
        store:on_change(function(key, value)
            local current = cycle.service
            if key == "system.logging.profile" and value then
                local changed, err = pcall(logging.set_profile, value)
                if not changed then current.logger:error("cannot change the log profile: " .. tostring(err)) end
            end
            if current.on_settings_change then
                scheduler.spawn(current.on_settings_change, current, key, value)
            end
            if reload.is_reload_key(current, key) then
                reload.request(cycle, options.file, "setting " .. key .. " changed")
            end
        end)
        local code, failure = cycle:run()
        if errors.is(failure) and failure.kind ~= "runtime" then
            -- also said plainly on stderr: with JSON logs on stdout this is
            -- the line a person reads first
            logging.flush()
            io.stderr:write("tamarco-host: ", failure.message, "\n")
        end
        -- what the remote log sinks still hold goes out, whatever their
        -- batching interval, within the stop budget (a second kept for the rest)
        local spent = stop_requested_at and (require("tamarco.c.timer").now() - stop_requested_at) or 0
        log_sinks.close(remote_sinks, logging, math.max(1000, stop_seconds * 1000 - spent - 1000))
        if file_watcher then file_watcher.close() end
        store:stop_watching()
        return code
    end)
    scheduler.on_exit(runner, function(success, code)
        exit_code = success and code or 1
        if not success then arm_watchdog() end
        process.stop_loop()
    end)
    process.run_loop()
    for _, listener in ipairs(signals) do listener:close() end
    logging.flush()
    return exit_code
end

return run_command
