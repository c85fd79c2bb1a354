--- tamarco.core.native: the host's C extension API from Lua.
--
--   local native = require "tamarco.core.native"
--   native.C.tamarco_log(native.C.TAMARCO_LOG_INFO, "mylib", "hello from the FFI")
--   local loop = native.C.tamarco_loop()          -- uv_loop_t* (as void*)
--   -- suspend the task until C code calls tamarco_wake_ticket(ticket, ok, data, len),
--   -- from any thread (e.g. a library's own worker thread):
--   local data, err = native.wait(function(ticket) mylib.start_job(ticket) end)
--
-- `native.C` is ffi.C with the declarations of include/tamarco.h that the
-- FFI can use (those marked [FFI] there): the host binary exports them.
local ffi = require "ffi"
local c = require "tamarco.c.native"

ffi.cdef [[
enum {
    TAMARCO_LOG_DEBUG = 10, TAMARCO_LOG_INFO = 20, TAMARCO_LOG_WARNING = 30,
    TAMARCO_LOG_ERROR = 40, TAMARCO_LOG_CRITICAL = 50
};
const char *tamarco_version(void);
void *tamarco_loop(void);
int tamarco_log(int level, const char *logger, const char *message);
int tamarco_wake_ticket(int ticket, int ok, const char *data, size_t len);
int tamarco_sd_notify(const char *state);
]]

local native = {
    C = ffi.C,
    --- The host's version and the API version of include/tamarco.h.
    version = c.version,
    api_version = c.api_version,
    --- wait(fn) -> data | nil, err: calls fn(ticket) and suspends the task
    -- until tamarco_wake_ticket(ticket, ...) (see tamarco.h).
    wait = c.wait,
    --- log(level, logger, message): what tamarco_log does, from Lua.
    log = c.log,
    --- offload_sleep(ms) -> true: a pool thread sleeps while the task
    -- yields (a probe of tamarco_offload for tests and diagnostics).
    offload_sleep = c.offload_sleep,
}

return native
