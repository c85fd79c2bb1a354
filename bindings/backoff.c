/*
 * tamarco.c.backoff: the runtime's reconnect back-off (host/backoff.h) for
 * Lua, so that Lua clients and the C ones wait the same way with the same
 * numbers.
 *
 *   local backoff = require "tamarco.c.backoff"
 *   local b = backoff.new { min_ms = 200, max_ms = 5000, factor = 2, jitter = 0 }
 *   b:next() -> the delay to wait now (ms); b:reset() after a success
 *   backoff.defaults -> { min_ms = 200, max_ms = 5000, factor = 2, jitter = 0 }
 */
#include "host.h"
#include "backoff.h"
#include "lua_class.h"
#include "lua_options.h"

#define BACKOFF_MT "tamarco.backoff"

/* new([opts]) -> policy; missing options take the defaults. */
static int l_new(lua_State *L)
{
    int t = lua_isnoneornil(L, 1) ? 0 : (luaL_checktype(L, 1, LUA_TTABLE), 1);
    double min_ms = tamarco_opt_number(L, t, "backoff.new", "min_ms", TAMARCO_BACKOFF_MIN_MS, 0, 1e12);
    double max_ms = tamarco_opt_number(L, t, "backoff.new", "max_ms", TAMARCO_BACKOFF_MAX_MS, 0, 1e12);
    double factor = tamarco_opt_number(L, t, "backoff.new", "factor", TAMARCO_BACKOFF_FACTOR, 1, 1e6);
    double jitter = tamarco_opt_number(L, t, "backoff.new", "jitter", TAMARCO_BACKOFF_JITTER, 0, 1);
    tamarco_backoff *b = lua_newuserdata(L, sizeof *b);
    tamarco_backoff_init(b, min_ms, max_ms, factor, jitter);
    luaL_getmetatable(L, BACKOFF_MT);
    lua_setmetatable(L, -2);
    return 1;
}

static int l_next(lua_State *L)
{
    lua_pushnumber(L, tamarco_backoff_next(luaL_checkudata(L, 1, BACKOFF_MT)));
    return 1;
}

static int l_reset(lua_State *L)
{
    tamarco_backoff_reset(luaL_checkudata(L, 1, BACKOFF_MT));
    return 0;
}

/* peek() -> the delay next() would return, without jitter. */
static int l_peek(lua_State *L)
{
    lua_pushnumber(L, tamarco_backoff_peek(luaL_checkudata(L, 1, BACKOFF_MT)));
    return 1;
}

static void set_number(lua_State *L, const char *key, double v)
{
    lua_pushnumber(L, v);
    lua_setfield(L, -2, key);
}

int luaopen_tamarco_c_backoff(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"next", l_next},
        {"reset", l_reset},
        {"peek", l_peek},
        {NULL, NULL},
    };
    static const luaL_Reg funcs[] = {
        {"new", l_new},
        {NULL, NULL},
    };
    tamarco_class_register(L, BACKOFF_MT, methods, NULL, NULL);
    tamarco_module_new(L, funcs);
    lua_createtable(L, 0, 4);
    set_number(L, "min_ms", TAMARCO_BACKOFF_MIN_MS);
    set_number(L, "max_ms", TAMARCO_BACKOFF_MAX_MS);
    set_number(L, "factor", TAMARCO_BACKOFF_FACTOR);
    set_number(L, "jitter", TAMARCO_BACKOFF_JITTER);
    lua_setfield(L, -2, "defaults");
    return 1;
}
