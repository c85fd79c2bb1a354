/* Helpers of the fuzz targets, see fuzz_lua.h. */
#include "fuzz_lua.h"
#include "host.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void preload(lua_State *L, const char *name, lua_CFunction open)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, open);
    lua_setfield(L, -2, name);
    lua_pop(L, 2);
}

static int noop(lua_State *L)
{
    (void)L;
    return 0;
}

static lua_State *L;

/* At exit, before LeakSanitizer looks: LuaJIT's own allocator maps memory
 * LeakSanitizer does not scan, so what Lua userdata point to (the codec's
 * reused buffers) would look leaked while the state lives. */
static void close_state(void)
{
    if (L) {
        lua_close(L);
        L = NULL;
    }
}

lua_State *fuzz_lua_state(void)
{
    static unsigned runs;
    if (!L) {
        L = luaL_newstate();
        if (!L)
            fuzz_fail("luaL_newstate", "out of memory");
        atexit(close_state);
        luaL_openlibs(L);
        preload(L, "tamarco.c.codec", luaopen_tamarco_c_codec);
        preload(L, "tamarco.c.yaml", luaopen_tamarco_c_yaml);
        /* opening them registers the metatables fuzz_push_value uses */
        if (luaL_dostring(L, "require 'tamarco.c.codec' require 'tamarco.c.yaml'") != 0)
            fuzz_fail("opening the modules", lua_tostring(L, -1));
    }
    lua_settop(L, 0);
    if (++runs % 1000 == 0)
        lua_gc(L, LUA_GCCOLLECT, 0);
    return L;
}

void fuzz_fail(const char *what, const char *detail)
{
    fprintf(stderr, "fuzz: %s: %s\n", what, detail ? detail : "");
    abort();
}

/* A bounded reader over the fuzz bytes. */
typedef struct reader {
    const uint8_t *p, *end;
} reader;

static int next_byte(reader *r)
{
    return r->p < r->end ? *r->p++ : -1;
}

#define MAX_STACK 48

void fuzz_push_value(lua_State *L, const uint8_t *data, size_t size)
{
    reader r = { data, data + size };
    int base = lua_gettop(L);
    lua_checkstack(L, MAX_STACK + 8);
    int op;
    while ((op = next_byte(&r)) >= 0) {
        int depth = lua_gettop(L) - base;
        int top = lua_gettop(L);
        switch (op % 13) {
        case 0: {   /* a string of n bytes, taken as they are */
            int n = next_byte(&r);
            if (n < 0) n = 0;
            size_t len = (size_t)n <= (size_t)(r.end - r.p) ? (size_t)n : (size_t)(r.end - r.p);
            if (depth < MAX_STACK) lua_pushlstring(L, (const char *)r.p, len);
            r.p += len;
            break;
        }
        case 1: {   /* any double, NaN and infinities included */
            double d = 0;
            size_t len = (size_t)(r.end - r.p) < sizeof d ? (size_t)(r.end - r.p) : sizeof d;
            memcpy(&d, r.p, len);
            r.p += len;
            if (depth < MAX_STACK) lua_pushnumber(L, d);
            break;
        }
        case 2: {   /* a small integer: keys 1..n */
            int n = next_byte(&r);
            if (depth < MAX_STACK) lua_pushinteger(L, n < 0 ? 1 : n % 8);
            break;
        }
        case 3:
            if (depth < MAX_STACK) lua_pushboolean(L, next_byte(&r) & 1);
            break;
        case 4:
            if (depth < MAX_STACK) lua_pushlightuserdata(L, NULL);   /* json null */
            break;
        case 5:
            if (depth < MAX_STACK) lua_newtable(L);
            break;
        case 6:     /* t[k] = v with t, k, v on the top */
            if (depth >= 3 && lua_istable(L, top - 2) && !lua_isnil(L, top - 1) &&
                !(lua_type(L, top - 1) == LUA_TNUMBER && lua_tonumber(L, top - 1) != lua_tonumber(L, top - 1))) {
                lua_rawset(L, top - 2);
            }
            break;
        case 7:     /* t[#t + 1] = v */
            if (depth >= 2 && lua_istable(L, top - 1))
                lua_rawseti(L, top - 1, (int)lua_objlen(L, top - 1) + 1);
            break;
        case 8:
            if (depth < MAX_STACK) lua_pushcfunction(L, noop);
            break;
        case 9: {   /* mark the table on the top as an array, an object or nothing */
            int kind = next_byte(&r);
            if (depth >= 1 && lua_istable(L, top)) {
                if (kind < 0 || kind % 3 == 0) lua_pushnil(L);
                else luaL_getmetatable(L, kind % 3 == 1 ? "tamarco.yaml.sequence" : "tamarco.json.object");
                lua_setmetatable(L, top);
            }
            break;
        }
        case 10: {  /* the same table again, deeper: cycles and shared tables */
            int which = next_byte(&r);
            if (depth >= 1 && depth < MAX_STACK) {
                int idx = base + 1 + (which < 0 ? 0 : which % depth);
                if (lua_istable(L, idx)) lua_pushvalue(L, idx);
            }
            break;
        }
        case 11:    /* a json.float box around the number on the top */
            if (depth >= 1 && lua_type(L, top) == LUA_TNUMBER) {
                lua_createtable(L, 0, 1);
                lua_pushvalue(L, top);
                lua_setfield(L, -2, "value");
                luaL_getmetatable(L, "tamarco.json.float");
                lua_setmetatable(L, -2);
                lua_replace(L, top);
            }
            break;
        case 12:
            if (depth >= 2) lua_pop(L, 1);
            break;
        }
    }
    /* the result is the first value pushed (nil when none) */
    if (lua_gettop(L) == base)
        lua_pushnil(L);
    else
        lua_settop(L, base + 1);
}
