/* Lua state creation: standard libraries, module paths, preloaded bindings. */
#include "host.h"

#include <luajit.h>
#include <lua5.1/luv/luv.h>
#include <stdio.h>
#include <string.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>
#include <stdint.h>
#include <sys/random.h>

/* The host is found in the registry under this byte's address: bindings ask
 * at every call, and a lightuserdata key is not hashed and interned as a
 * string key would be. */
static const char host_key;
#define HOST_KEY ((void *)&host_key)

static const luaL_Reg preloaded_bindings[] = {
    {"tamarco.c.scheduler", luaopen_tamarco_c_scheduler},
    {"tamarco.c.timer", luaopen_tamarco_c_timer},
    {"tamarco.c.yaml", luaopen_tamarco_c_yaml},
    {"tamarco.c.thread", luaopen_tamarco_c_thread},
    {"tamarco.c.log", luaopen_tamarco_c_log},
    {"tamarco.c.log_udp", luaopen_tamarco_c_log_udp},
    {"tamarco.c.process", luaopen_tamarco_c_process},
    {"tamarco.c.codec", luaopen_tamarco_c_codec},
    {"tamarco.c.http_server", luaopen_tamarco_c_http_server},
    {"tamarco.c.metrics", luaopen_tamarco_c_metrics},
    {"tamarco.c.introspect", luaopen_tamarco_c_introspect},
    {"tamarco.c.native", luaopen_tamarco_c_native},
    {"tamarco.c.backoff", luaopen_tamarco_c_backoff},
    {NULL, NULL},
};

static int has_modules(const char *dir)
{
    char probe[4200];
    snprintf(probe, sizeof probe, "%s/tamarco/init.lua", dir);
    return access(probe, R_OK) == 0;
}

int tamarco_find_lua_dir(char *out, size_t size)
{
    char exe[4096];
    size_t exe_len = sizeof exe;
    const char *candidates[4];
    char relocated[4200] = "";
    int n = 0;

    /* An explicit override first, for developers running a copied binary. */
    const char *env = getenv("TAMARCO_LUA_DIR");
    if (env && *env)
        candidates[n++] = env;
    /* <prefix>/bin/tamarco-host -> <prefix>/share/tamarco-host/lua */
    if (uv_exepath(exe, &exe_len) == 0) {
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            snprintf(relocated, sizeof relocated, "%s/../share/tamarco-host/lua", exe);
            candidates[n++] = relocated;
        }
    }
    candidates[n++] = TAMARCO_SOURCE_LUADIR;   /* uninstalled build tree */
    candidates[n++] = TAMARCO_INSTALL_LUADIR;

    for (int i = 0; i < n; i++) {
        if (candidates[i][0] && has_modules(candidates[i])) {
            char resolved[PATH_MAX];
            snprintf(out, size, "%s", realpath(candidates[i], resolved) ? resolved : candidates[i]);
            return 0;
        }
    }
    return -1;
}

/* The directory of the host's loadable bindings: <build>/lua_modules next to
 * an uninstalled binary, <prefix>/<libdir>/tamarco-host next to an installed
 * (possibly relocated) one, else the configured install directory. */
static void find_cmod_dir(char *out, size_t size)
{
    char exe[4096];
    size_t exe_len = sizeof exe;
    if (uv_exepath(exe, &exe_len) == 0) {
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = '\0';
            snprintf(out, size, "%s/lua_modules", exe);
            if (access(out, R_OK) == 0)
                return;
            snprintf(out, size, "%s/../%s", exe, TAMARCO_RELATIVE_CMODDIR);
            char resolved[PATH_MAX];
            if (realpath(out, resolved)) {
                snprintf(out, size, "%s", resolved);
                return;
            }
        }
    }
    snprintf(out, size, "%s", TAMARCO_INSTALL_CMODDIR);
}

/* The host's own module paths: its Lua directory and bindings, then the
 * system's. Never the current directory: a file there must not run as a
 * module (tamarco.module_path adds a service's directory, behind these). */
static void set_paths(lua_State *L, const char *lua_dir)
{
    char cmod_dir[4200];
    find_cmod_dir(cmod_dir, sizeof cmod_dir);
    lua_getglobal(L, "package");
    lua_pushfstring(L, "%s/?.lua;%s/?/init.lua;%s", lua_dir, lua_dir, TAMARCO_SYSTEM_LUA_PATH);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "path");
    lua_setfield(L, -2, "tamarco_path");
    lua_pushfstring(L, "%s/?.so;%s", cmod_dir, TAMARCO_SYSTEM_LUA_CPATH);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, "cpath");
    lua_setfield(L, -2, "tamarco_cpath");
    lua_pushstring(L, lua_dir);
    lua_setfield(L, -2, "tamarco_lua_dir");
    lua_pop(L, 1);
}

static void preload(lua_State *L, const char *name, lua_CFunction open)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, open);
    lua_setfield(L, -2, name);
    lua_pop(L, 2);
}

/* math.random starts from the same seed in every process: instances of a
 * fleet would draw the same reconnect jitter and the same first etcd member.
 * Each state gets its own seed from the kernel. */
static void seed_math_random(lua_State *L)
{
    uint32_t seed = 0;
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed)
        seed = (uint32_t)getpid() ^ (uint32_t)uv_hrtime();
    lua_getglobal(L, "math");
    lua_getfield(L, -1, "randomseed");
    lua_pushnumber(L, (lua_Number)seed);
    lua_call(L, 1, 0);
    lua_pop(L, 1);
}

/* The public and former module names (lua/tamarco/core/module_names.lua):
 * every state gets them, threads included. A host whose Lua directory lacks
 * the file is broken; say so rather than fail later on a name. */
static int install_module_names(lua_State *L)
{
    lua_getglobal(L, "require");
    lua_pushliteral(L, "tamarco.core.module_names");
    if (lua_pcall(L, 1, 0, 0) != 0) {
        fprintf(stderr, "tamarco-host: cannot load the framework's Lua modules: %s\n",
                lua_tostring(L, -1));
        return 0;
    }
    return 1;
}

lua_State *tamarco_state_new(const char *lua_dir)
{
    lua_State *L = luaL_newstate();
    if (!L)
        return NULL;
    luaL_openlibs(L);
    seed_math_random(L);
    set_paths(L, lua_dir);
    for (const luaL_Reg *b = preloaded_bindings; b->name; b++)
        preload(L, b->name, b->func);
    if (!install_module_names(L)) {
        lua_close(L);
        return NULL;
    }
    return L;
}

static int open_luv_on_host_loop(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (host)
        luv_set_loop(L, host->loop);
    return luaopen_luv(L);
}

void tamarco_host_attach(tamarco_host *host, lua_State *L)
{
    lua_pushlightuserdata(L, HOST_KEY);
    lua_pushlightuserdata(L, host);
    lua_rawset(L, LUA_REGISTRYINDEX);
    /* luv must share the host's loop: it is opened lazily on first require. */
    preload(L, "luv", open_luv_on_host_loop);
}

tamarco_host *tamarco_host_of(lua_State *L)
{
    tamarco_host *running = tamarco_host_of_running_task(L);
    if (running)
        return running;
    lua_pushlightuserdata(L, HOST_KEY);
    lua_rawget(L, LUA_REGISTRYINDEX);
    tamarco_host *host = lua_touserdata(L, -1);
    lua_pop(L, 1);
    return host;
}
