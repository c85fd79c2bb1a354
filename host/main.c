/*
 * tamarco-host: creates the loop and the main Lua state, then hands the
 * command line to the Lua CLI (lua/tamarco/cli/init.lua), which returns the exit
 * code. Policy lives in Lua; this file only wires the process together.
 */
#include "host.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static tamarco_host host;

static int traceback(lua_State *L)
{
    const char *msg = lua_tostring(L, 1);
    luaL_traceback(L, L, msg ? msg : "(error object is not a string)", 1);
    return 1;
}

/* Cancels the operations of tasks still waiting, closes the signal handles
 * (their signals get back their default dispositions), then closes the Lua state
 * so that finalizers run (files, modules' buffers). Close callbacks already
 * queued run first, while the state they may touch
 * is alive. Handles still open afterwards (a service's own luv handles) are
 * left to the process exit: their callbacks would run on a closed state. */
static void shutdown_host(void)
{
    tamarco_scheduler_shutdown(&host);
    tamarco_signals_close(&host);
    uv_run(host.loop, UV_RUN_NOWAIT);
    lua_close(host.L);
    host.L = NULL;
}

int main(int argc, char **argv)
{
    /* A peer that goes away must cost a write an EPIPE, never the process
     * its life. The disposition covers every thread; --workers children
     * are this same binary and set it again (libuv resets it on spawn). */
    signal(SIGPIPE, SIG_IGN);
    host.loop = uv_default_loop();
    if (tamarco_find_lua_dir(host.lua_dir, sizeof host.lua_dir) != 0) {
        fprintf(stderr, "tamarco-host: cannot find the tamarco Lua modules "
                        "(looked next to the binary, in the build tree and in %s)\n",
                TAMARCO_INSTALL_LUADIR);
        return 1;
    }
    lua_State *L = tamarco_state_new(host.lua_dir);
    if (!L) {
        fprintf(stderr, "tamarco-host: cannot create the Lua state\n");
        return 1;
    }
    host.L = L;
    tamarco_host_attach(&host, L);
    /* the writable cache of an uninstalled host, else the precompiled
     * modules of an installed one (<datadir>/tamarco-host/lua_bytecode) */
    char cache_dir[4200];
    size_t exe_len = sizeof cache_dir - 16;
    int cached = 0;
    if (uv_exepath(cache_dir, &exe_len) == 0 && strrchr(cache_dir, '/')) {
        strcpy(strrchr(cache_dir, '/'), "/lua_cache");
        cached = tamarco_bytecode_cache_install(L, cache_dir, 0);
    }
    if (!cached && snprintf(cache_dir, sizeof cache_dir, "%s", host.lua_dir) < (int)sizeof cache_dir - 16
        && strrchr(cache_dir, '/')) {
        strcpy(strrchr(cache_dir, '/'), "/lua_bytecode");
        tamarco_bytecode_cache_install(L, cache_dir, 1);
    }
    if (tamarco_scheduler_init(&host) != 0) {
        fprintf(stderr, "tamarco-host: cannot initialise the scheduler\n");
        return 1;
    }

    lua_pushcfunction(L, traceback);
    lua_getglobal(L, "require");
    lua_pushstring(L, "tamarco.cli");
    if (lua_pcall(L, 1, 1, 1) != 0) {
        fprintf(stderr, "tamarco-host: %s\n", lua_tostring(L, -1));
        return 1;
    }
    lua_getfield(L, -1, "main");
    lua_createtable(L, argc, 0);
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i);
    }
    if (lua_pcall(L, 1, 1, 1) != 0) {
        fprintf(stderr, "tamarco-host: internal error: %s\n", lua_tostring(L, -1));
        fflush(stdout);
        return 1;
    }
    int code = (int)lua_tointeger(L, -1);
    fflush(stdout);
    fflush(stderr);
    shutdown_host();
    return code;
}
