/* Option readers with units (see lua_options.h). */
#include "lua_options.h"

#include <lauxlib.h>
#include <limits.h>

/* Pushes t[key]; 1 when it is set, 0 (and nothing pushed) when not. */
static int push_field(lua_State *L, int t, const char *key)
{
    if (t == 0)
        return 0;
    lua_getfield(L, t, key);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return 0;
    }
    return 1;
}

static double field_number(lua_State *L, const char *what, const char *key, const char *unit,
                           double min, double max)
{
    double v = lua_tonumber(L, -1);
    if (lua_type(L, -1) != LUA_TNUMBER || v != v || v < min || v > max) {
        if (max >= (double)LONG_MAX)
            luaL_error(L, "%s: '%s' must be a number >= %g%s", what, key, min, unit);
        luaL_error(L, "%s: '%s' must be a number in %g..%g%s", what, key, min, max, unit);
    }
    lua_pop(L, 1);
    return v;
}

const char *tamarco_opt_string(lua_State *L, int t, const char *what, const char *key,
                               const char *def)
{
    if (!push_field(L, t, key))
        return def;
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "%s: '%s' must be a string", what, key);
    const char *s = lua_tostring(L, -1);
    lua_pop(L, 1);   /* the string stays alive in the table */
    return s;
}

double tamarco_opt_number(lua_State *L, int t, const char *what, const char *key,
                          double def, double min, double max)
{
    return push_field(L, t, key) ? field_number(L, what, key, "", min, max) : def;
}

long tamarco_opt_int(lua_State *L, int t, const char *what, const char *key,
                     long def, long min, long max)
{
    return push_field(L, t, key) ? (long)field_number(L, what, key, "", (double)min, (double)max) : def;
}

long tamarco_opt_ms(lua_State *L, int t, const char *what, const char *key, long def)
{
    return push_field(L, t, key) ? (long)field_number(L, what, key, " (milliseconds)", 0, (double)LONG_MAX)
                                 : def;
}

double tamarco_opt_seconds(lua_State *L, int t, const char *what, const char *key, double def)
{
    return push_field(L, t, key) ? field_number(L, what, key, " (seconds)", 0, (double)LONG_MAX) : def;
}

long tamarco_opt_bytes(lua_State *L, int t, const char *what, const char *key, long def)
{
    return push_field(L, t, key) ? (long)field_number(L, what, key, " (bytes)", 0, (double)LONG_MAX)
                                 : def;
}

int tamarco_opt_bool(lua_State *L, int t, const char *key, int def)
{
    if (!push_field(L, t, key))
        return def;
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}
