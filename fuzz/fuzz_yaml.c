/* Fuzz target: the YAML-to-Lua loader (bindings/yaml.c, tamarco.c.yaml's
 * parse), as settings files reach it. The first byte picks the options
 * (none, or the `float` and `null` hooks etcd write-yml passes); what loads
 * is then encoded as JSON, as etcd write-yml does with a settings file. */
#include "fuzz_lua.h"

#include <lauxlib.h>
#include <string.h>

static int box_float(lua_State *L)
{
    lua_createtable(L, 0, 1);
    lua_pushvalue(L, 1);
    lua_setfield(L, -2, "value");
    luaL_getmetatable(L, "tamarco.json.float");
    lua_setmetatable(L, -2);
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    lua_State *L = fuzz_lua_state();
    lua_getglobal(L, "require");
    lua_pushliteral(L, "tamarco.c.yaml");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "parse");
    lua_pushlstring(L, (const char *)data + 1, size - 1);
    lua_pushliteral(L, "fuzz.yml");
    if (data[0] & 1) {
        lua_createtable(L, 0, 2);
        lua_pushcfunction(L, box_float);
        lua_setfield(L, -2, "float");
        lua_pushlightuserdata(L, NULL);
        lua_setfield(L, -2, "null");
    } else {
        lua_pushnil(L);
    }
    /* a parse error is a result (nil, message, line, column); only memory
     * errors may raise */
    if (lua_pcall(L, 3, 4, 0) != 0) {
        const char *msg = lua_tostring(L, -1);
        if (!msg || !strstr(msg, "memory"))
            fuzz_fail("yaml.parse raised", msg);
        return 0;
    }
    if (lua_isnil(L, -4) && !lua_isnil(L, -3) && !lua_isstring(L, -3))
        fuzz_fail("a parse error without a message", NULL);
    int value = lua_gettop(L) - 3;
    lua_getglobal(L, "require");
    lua_pushliteral(L, "tamarco.c.codec");
    lua_call(L, 1, 1);
    lua_getfield(L, -1, "json_encode");
    lua_pushvalue(L, value);
    if (lua_pcall(L, 1, 2, 0) != 0)
        fuzz_fail("json_encode raised on a loaded document", lua_tostring(L, -1));
    return 0;
}
