/*
 * tamarco.c.process: the Lua side of the host's loop control (host/loop.c),
 * signals (host/signals.c) and shutdown watchdog (host/watchdog.c); the
 * process's identity and figures.
 */
#include "host.h"
#include "lua_class.h"
#include "task_guard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* run_loop([mode]) -> alive. mode: "default" (until stopped), "once", "nowait".
 * Must not be called from inside a loop callback or a task. */
static int l_run_loop(lua_State *L)
{
    static const char *const modes[] = {"default", "once", "nowait", NULL};
    static const uv_run_mode uv_modes[] = {UV_RUN_DEFAULT, UV_RUN_ONCE, UV_RUN_NOWAIT};
    tamarco_host *host = tamarco_check_host(L, "the loop");
    int mode = luaL_checkoption(L, 1, "default", modes);
    if (!tamarco_on_main_coroutine(L))
        return luaL_error(L, "run_loop called from a coroutine: the loop is already running");
    lua_pushboolean(L, tamarco_loop_run(host, uv_modes[mode]));
    return 1;
}

static int l_stop_loop(lua_State *L)
{
    tamarco_loop_stop(tamarco_check_host(L, "the loop"));
    return 0;
}

/* ---- signals (host/signals.c): delivery is the host's, meaning is Lua's ---- */

#define LISTENER_MT "tamarco.signal_listener"

typedef struct signal_listener {
    int sig;
    int id;   /* 0 once closed */
} signal_listener;

static int check_signal(lua_State *L, int arg)
{
    const char *name = luaL_checkstring(L, arg);
    int sig = tamarco_signal_find(name);
    if (sig < 0)
        return luaL_argerror(L, arg, lua_pushfstring(L, "unknown signal '%s' (one of %s)", name,
                                                     tamarco_signal_names()));
    return sig;
}

/* on_signal(name, fn) -> listener | nil, err. fn(name) runs as a new task at
 * every delivery of the signal ("SIGTERM", ...) until listener:close(). */
static int l_on_signal(lua_State *L)
{
    tamarco_host *host = tamarco_check_host(L, "process.on_signal");
    int sig = check_signal(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    int id = tamarco_signal_listen(host, L, sig, 2);
    if (id < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "cannot watch %s: %s", lua_tostring(L, 1), uv_strerror(id));
        return 2;
    }
    signal_listener *l = lua_newuserdata(L, sizeof *l);
    l->sig = sig;
    l->id = id;
    luaL_getmetatable(L, LISTENER_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* listener:close(): no more deliveries; the signal's default disposition is
 * back once nobody listens to it. */
static int l_listener_close(lua_State *L)
{
    signal_listener *l = luaL_checkudata(L, 1, LISTENER_MT);
    if (l->id) {
        tamarco_signal_unlisten(tamarco_check_host(L, "listener:close"), l->sig, l->id);
        l->id = 0;
    }
    return 0;
}

/* wait_signal(name, ...) -> the name of the first of these signals to arrive.
 * Yields the running task until then. */
static int l_wait_signal(lua_State *L)
{
    tamarco_check_host(L, "process.wait_signal");
    tamarco_check_task(L, "process.wait_signal");
    int n = lua_gettop(L);
    luaL_argcheck(L, n > 0, 1, "a signal name expected");
    int sigs[32];
    luaL_argcheck(L, n <= (int)(sizeof sigs / sizeof sigs[0]), 33, "too many signals");
    for (int i = 0; i < n; i++)
        sigs[i] = check_signal(L, i + 1);
    return tamarco_signal_wait(L, sigs, n);
}

/* watchdog(seconds, message): ends the process with exit code 1 after
 * `seconds` unless it exits before (host/watchdog.c). */
static int l_watchdog(lua_State *L)
{
    double seconds = luaL_checknumber(L, 1);
    const char *message = luaL_optstring(L, 2, "tamarco-host: stop watchdog expired, exiting\n");
    luaL_argcheck(L, seconds > 0, 1, "must be > 0");
    int rc = tamarco_watchdog_start(seconds, message);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "cannot start the watchdog thread: %s", strerror(rc));
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* exit(code): flushes stdio and ends the process now. */
static int l_exit(lua_State *L)
{
    int code = (int)luaL_optinteger(L, 1, 0);
    fflush(stdout);
    fflush(stderr);
    exit(code);
    return 0;
}

/* uuid4() -> a random RFC 4122 version 4 UUID string. */
static int l_uuid4(lua_State *L)
{
    unsigned char b[16];
    int rc = uv_random(NULL, NULL, b, sizeof b, 0, NULL);
    if (rc != 0)
        return luaL_error(L, "uuid4: %s", uv_strerror(rc));
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    char out[37];
    snprintf(out, sizeof out,
             "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
             b[12], b[13], b[14], b[15]);
    lua_pushstring(L, out);
    return 1;
}

static int l_pid(lua_State *L)
{
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}

static int l_hostname(lua_State *L)
{
    char name[256];
    size_t size = sizeof name;
    if (uv_os_gethostname(name, &size) != 0)
        return 0;
    lua_pushstring(L, name);
    return 1;
}

/* rss() -> resident set size in bytes. */
static int l_rss(lua_State *L)
{
    size_t rss;
    int rc = uv_resident_set_memory(&rss);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushstring(L, uv_strerror(rc));
        return 2;
    }
    lua_pushnumber(L, (lua_Number)rss);
    return 1;
}

static void collect_active(uv_handle_t *handle, void *arg)
{
    lua_State *L = arg;
    if (!uv_is_active(handle) || !uv_has_ref(handle) || uv_is_closing(handle))
        return;
    lua_pushstring(L, uv_handle_type_name(uv_handle_get_type(handle)));
    lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
}

/* active_handles() -> list of the types of the handles that keep the loop
 * alive (active and referenced), for specs and diagnostics. */
static int l_active_handles(lua_State *L)
{
    lua_newtable(L);
    uv_walk(tamarco_check_host(L, "the loop")->loop, collect_active, L);
    return 1;
}

/* exepath() -> the path of the running host binary. */
static int l_exepath(lua_State *L)
{
    char path[4096];
    size_t size = sizeof path;
    if (uv_exepath(path, &size) != 0)
        return 0;
    lua_pushlstring(L, path, size);
    return 1;
}

/* lua_dir() -> the directory the host loaded its Lua modules from. */
static int l_lua_dir(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host)
        return 0;
    lua_pushstring(L, host->lua_dir);
    return 1;
}

int luaopen_tamarco_c_process(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"run_loop", l_run_loop},
        {"stop_loop", l_stop_loop},
        {"watchdog", l_watchdog},
        {"exit", l_exit},
        {"uuid4", l_uuid4},
        {"pid", l_pid},
        {"hostname", l_hostname},
        {"rss", l_rss},
        {"lua_dir", l_lua_dir},
        {"exepath", l_exepath},
        {"active_handles", l_active_handles},
        {"on_signal", l_on_signal},
        {"wait_signal", l_wait_signal},
        {NULL, NULL},
    };
    static const luaL_Reg listener_methods[] = {
        {"close", l_listener_close},
        {NULL, NULL},
    };
    tamarco_class_register(L, LISTENER_MT, listener_methods, NULL, NULL);
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    lua_pushstring(L, TAMARCO_VERSION);
    lua_setfield(L, -2, "version");
    return 1;
}
