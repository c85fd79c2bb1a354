--- tamarco.core.module_names: the module names users write that are not
-- the path of a file.
--
-- The package's folders are its layers (docs/architecture.md): core/,
-- clients/, resources/, ops/, cli/. A few modules users require by a
-- shorter public name live in one of them (`tamarco.metrics` is
-- tamarco.core.metrics); modules that moved into a folder keep their
-- former name working. Each name is a package.preload entry that loads
-- the module under its path, so both names give the same table, and a
-- preload entry comes before every file searcher: a file of the same name
-- next to a service cannot replace the framework's module. The host runs
-- this file in every Lua state it creates (host/lua_state.c).
local module_names = {}

--- Public names (documented for users) and the module each one is.
module_names.public = {
    ["tamarco.json"] = "tamarco.core.json",
    ["tamarco.metrics"] = "tamarco.core.metrics",
    ["tamarco.native"] = "tamarco.core.native",
    ["tamarco.resources.base"] = "tamarco.core.resource",
}

--- Names of modules before the package had folders, kept working.
module_names.former = {
    ["tamarco.codecs"] = "tamarco.core.codecs",
    ["tamarco.debug.cli_flags"] = "tamarco.cli.debug_flags",
    ["tamarco.debug.console_command"] = "tamarco.cli.console",
    ["tamarco.debug.console_server"] = "tamarco.ops.debug.console_server",
    ["tamarco.debug.flamegraph"] = "tamarco.ops.debug.flamegraph",
    ["tamarco.debug.heap"] = "tamarco.ops.debug.heap",
    ["tamarco.debug.log_levels"] = "tamarco.ops.debug.log_levels",
    ["tamarco.debug.pages"] = "tamarco.ops.debug.pages",
    ["tamarco.debug.pretty"] = "tamarco.ops.debug.pretty",
    ["tamarco.debug.profile"] = "tamarco.ops.debug.profile",
    ["tamarco.debug.routes"] = "tamarco.ops.debug.routes",
    ["tamarco.debug.settings_view"] = "tamarco.ops.debug.settings_view",
    ["tamarco.debug.tasks"] = "tamarco.ops.debug.tasks",
    ["tamarco.debug.workers_proxy"] = "tamarco.ops.debug.workers_proxy",
    ["tamarco.discovery"] = "tamarco.clients.discovery",
    ["tamarco.errors"] = "tamarco.core.errors",
    ["tamarco.etcd"] = "tamarco.clients.etcd",
    ["tamarco.etcd_command"] = "tamarco.cli.etcd",
    ["tamarco.lifecycle"] = "tamarco.core.lifecycle",
    ["tamarco.log_sinks"] = "tamarco.ops.log_sinks",
    ["tamarco.log_sinks.http"] = "tamarco.ops.log_sinks.http",
    ["tamarco.log_sinks.queue"] = "tamarco.ops.log_sinks.queue",
    ["tamarco.log_sinks.redis"] = "tamarco.ops.log_sinks.redis",
    ["tamarco.log_sinks.udp"] = "tamarco.ops.log_sinks.udp",
    ["tamarco.logging"] = "tamarco.core.logging",
    ["tamarco.metrics.naming"] = "tamarco.core.metrics.naming",
    ["tamarco.metrics.prometheus"] = "tamarco.core.metrics.prometheus",
    ["tamarco.metrics.reporters"] = "tamarco.core.metrics.reporters",
    ["tamarco.module_path"] = "tamarco.core.module_path",
    ["tamarco.new_command"] = "tamarco.cli.new",
    ["tamarco.reload"] = "tamarco.ops.reload",
    ["tamarco.resources.debug"] = "tamarco.ops.debug.resource",
    ["tamarco.run_command"] = "tamarco.cli.run",
    ["tamarco.secrets"] = "tamarco.core.secrets",
    ["tamarco.service"] = "tamarco.core.service",
    ["tamarco.service_file"] = "tamarco.core.service_file",
    ["tamarco.settings"] = "tamarco.core.settings",
    ["tamarco.settings_etcd"] = "tamarco.ops.settings_etcd",
    ["tamarco.settings_schema"] = "tamarco.core.settings_schema",
    ["tamarco.supervisor_pipe"] = "tamarco.ops.supervisor_pipe",
    ["tamarco.systemd"] = "tamarco.ops.systemd",
    ["tamarco.tasks"] = "tamarco.core.tasks",
    ["tamarco.test_command"] = "tamarco.cli.test",
    ["tamarco.thread"] = "tamarco.core.thread",
    ["tamarco.thread_logging"] = "tamarco.core.thread_logging",
    ["tamarco.workers"] = "tamarco.ops.workers",
    ["tamarco.workers_report"] = "tamarco.ops.workers_report",
}

local function alias(name, target)
    package.preload[name] = function() return require(target) end
end

for name, target in pairs(module_names.public) do alias(name, target) end
for name, target in pairs(module_names.former) do alias(name, target) end

return module_names
