/*
 * tamarco.c.introspect: what the live introspection pages (/debug, the
 * console) need from the OS and libuv that luv does not give.
 *
 *   handles() -> { [type name] = count }   every handle on the host's loop
 *                                          (luv's walk only sees its own)
 *   peer_uid(fd) -> uid | nil, message     SO_PEERCRED of a Unix socket
 *   uid() -> the process's real uid
 *   loop_idle_ms() -> ms                   time the loop spent waiting for I/O
 *                                          since idle-time metrics were enabled
 *                                          (enable_idle_time()); 0 before
 *   enable_idle_time() -> true | nil, message
 */
#include "host.h"

#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void count_handle(uv_handle_t *handle, void *arg)
{
    lua_State *L = arg;
    const char *name = uv_handle_type_name(uv_handle_get_type(handle));
    if (!name)
        name = "unknown";
    lua_getfield(L, -1, name);
    lua_Integer n = lua_tointeger(L, -1);
    lua_pop(L, 1);
    lua_pushinteger(L, n + 1);
    lua_setfield(L, -2, name);
}

static int l_handles(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host)
        return luaL_error(L, "introspect.handles: only on the service's main state");
    lua_newtable(L);
    uv_walk(host->loop, count_handle, L);
    return 1;
}

static int l_peer_uid(lua_State *L)
{
    int fd = (int)luaL_checkinteger(L, 1);
    struct ucred cred;
    socklen_t len = sizeof cred;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        lua_pushnil(L);
        lua_pushstring(L, strerror(errno));
        return 2;
    }
    lua_pushinteger(L, (lua_Integer)cred.uid);
    return 1;
}

static int l_uid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)getuid());
    return 1;
}

static int l_enable_idle_time(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host)
        return luaL_error(L, "introspect.enable_idle_time: only on the service's main state");
    int rc = uv_loop_configure(host->loop, UV_METRICS_IDLE_TIME);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, uv_strerror(rc));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

static int l_loop_idle_ms(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host)
        return luaL_error(L, "introspect.loop_idle_ms: only on the service's main state");
    lua_pushnumber(L, (lua_Number)uv_metrics_idle_time(host->loop) / 1e6);
    return 1;
}

int luaopen_tamarco_c_introspect(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"handles", l_handles},
        {"peer_uid", l_peer_uid},
        {"uid", l_uid},
        {"enable_idle_time", l_enable_idle_time},
        {"loop_idle_ms", l_loop_idle_ms},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
