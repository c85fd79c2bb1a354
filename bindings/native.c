/*
 * tamarco.c.native: the Lua side of the public C API (host/native_api.c,
 * host/systemd_notify.c), used by lua/tamarco/core/native.lua and
 * lua/tamarco/ops/systemd.lua; and the offload probe the specs use
 * (host/test_probe.c).
 */
#include "host.h"
#include "task_guard.h"

#include <string.h>

#ifndef TAMARCO_RELATIVE_CMAKEDIR   /* set by CMakeLists.txt */
#define TAMARCO_RELATIVE_CMAKEDIR "lib/cmake/TamarcoHost"
#endif

static void cancel_ticket(void *ud)
{
    /* The waiting task went away; a later tamarco_wake_ticket finds the
     * wait gone (tamarco_wake returns 0). Nothing else holds resources. */
    (void)ud;
}

/* wait(fn) -> values given to tamarco_wake_ticket. Calls fn(ticket) (which
 * hands the ticket to C code, e.g. through the FFI) and suspends the task
 * until tamarco_wake_ticket(ticket, ...) is called from any thread. The
 * wait is registered only after fn returned, so an error in fn leaves
 * nothing behind. */
static int l_wait(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (!host || !tamarco_native_ready())
        return luaL_error(L, "tamarco.native.wait is only available in tasks of the service's main state");
    tamarco_check_task(L, "tamarco.native.wait");
    int ticket = tamarco_native_new_ticket();
    lua_pushvalue(L, 1);
    lua_pushinteger(L, ticket);
    lua_call(L, 1, 0);
    int wait_id = tamarco_wait_begin(L, cancel_ticket, NULL);
    tamarco_wait_note(host, wait_id, "native", NULL, 0);
    tamarco_native_bind_ticket(L, ticket, wait_id);
    return tamarco_wait_yield(L);
}

/* sd_notify(state) -> 1 sent | 0 no NOTIFY_SOCKET | nil, message */
static int l_sd_notify(lua_State *L)
{
    int rc = tamarco_sd_notify(luaL_checkstring(L, 1));
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, strerror(-rc));
        return 2;
    }
    lua_pushinteger(L, rc);
    return 1;
}

/* log(level, logger, message): tamarco_log from Lua (for tests). */
static int l_log(lua_State *L)
{
    int rc = tamarco_log((int)luaL_checkinteger(L, 1), luaL_optstring(L, 2, NULL), luaL_checkstring(L, 3));
    lua_pushboolean(L, rc == 0);
    return 1;
}

/* wake_ticket(ticket, ok, data): tamarco_wake_ticket from Lua (for tests). */
static int l_wake_ticket(lua_State *L)
{
    size_t len = 0;
    const char *data = luaL_optlstring(L, 3, NULL, &len);
    lua_pushinteger(L, tamarco_wake_ticket((int)luaL_checkinteger(L, 1), lua_toboolean(L, 2), data, len));
    return 1;
}

int luaopen_tamarco_c_native(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"wait", l_wait},
        {"sd_notify", l_sd_notify},
        {"log", l_log},
        {"wake_ticket", l_wake_ticket},
        {"offload_sleep", tamarco_probe_offload_sleep},
        {NULL, NULL},
    };
    tamarco_host *host = tamarco_host_of(L);
    if (host) {
        int rc = tamarco_native_init(host);
        if (rc != 0)
            return luaL_error(L, "tamarco.c.native: cannot initialise the mailbox: %s", uv_strerror(rc));
    }
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    lua_pushstring(L, TAMARCO_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushinteger(L, TAMARCO_API_VERSION);
    lua_setfield(L, -2, "api_version");
    lua_pushstring(L, TAMARCO_RELATIVE_CMAKEDIR);
    lua_setfield(L, -2, "relative_cmake_dir");
    return 1;
}

