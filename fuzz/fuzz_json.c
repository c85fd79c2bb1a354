/* Fuzz target: the JSON codec (bindings/json.c through tamarco.c.codec).
 *
 * The first byte picks a mode:
 *  - decode the rest (with and without the `floats` option); what decodes
 *    must encode, the encoding must decode again with the same options (the
 *    strict decoder accepts everything the encoder writes) and encode to
 *    text of the same length (members may come in another order);
 *    a number on its own must read as strtod reads it (the decoder's fast
 *    path for short numbers must round exactly as strtod does);
 *  - build an arbitrary Lua value from the rest (fuzz_push_value) and encode
 *    it: either an error message, or text the strict decoder accepts. */
#include "fuzz_lua.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

/* Calls codec[fn](value at idx[, {floats = true}]); leaves its results. */
static int call(lua_State *L, const char *fn, int idx, int floats)
{
    int top = lua_gettop(L);
    lua_getglobal(L, "codec");
    lua_getfield(L, -1, fn);
    lua_remove(L, -2);
    lua_pushvalue(L, idx);
    int nargs = 1;
    if (floats) {
        lua_createtable(L, 0, 1);
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "floats");
        nargs = 2;
    }
    if (lua_pcall(L, nargs, 2, 0) != 0)
        fuzz_fail(fn, lua_tostring(L, -1));   /* the codec must never raise */
    return lua_gettop(L) - top;
}

static void check_encoding(lua_State *L, int text_idx, int floats)
{
    size_t len1, len2;
    lua_tolstring(L, text_idx, &len1);
    call(L, "json_decode", text_idx, floats);
    if (lua_isnil(L, -2))
        fuzz_fail("the decoder refuses what the encoder wrote", lua_tostring(L, -1));
    lua_pop(L, 1);
    call(L, "json_encode", lua_gettop(L), 0);
    if (lua_isnil(L, -2))
        fuzz_fail("a decoded value does not encode again", lua_tostring(L, -1));
    lua_tolstring(L, -2, &len2);
    if (len1 != len2)
        fuzz_fail("a second round trip changed the text", lua_tostring(L, text_idx));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    lua_State *L = fuzz_lua_state();
    lua_getglobal(L, "codec");
    if (lua_isnil(L, -1)) {
        lua_getglobal(L, "require");
        lua_pushliteral(L, "tamarco.c.codec");
        lua_call(L, 1, 1);
        lua_setglobal(L, "codec");
    }
    lua_pop(L, 1);
    if (data[0] & 1) {
        lua_pushlstring(L, (const char *)data + 1, size - 1);
        int text = lua_gettop(L);
        for (int floats = 0; floats <= 1; floats++) {
            call(L, "json_decode", text, floats);
            if (lua_isnil(L, -2)) {
                if (!lua_isstring(L, -1))
                    fuzz_fail("a decoding error without a message", NULL);
            } else {
                if (!floats && lua_type(L, -2) == LUA_TNUMBER && size < 400) {
                    char tmp[400];
                    memcpy(tmp, data + 1, size - 1);
                    tmp[size - 1] = '\0';
                    double expected = strtod(tmp, NULL), got = lua_tonumber(L, -2);
                    if (memcmp(&expected, &got, sizeof got) != 0)
                        fuzz_fail("a number decodes unlike strtod", tmp);
                }
                call(L, "json_encode", lua_gettop(L) - 1, 0);
                if (lua_isnil(L, -2))
                    fuzz_fail("a decoded value does not encode", lua_tostring(L, -1));
                check_encoding(L, lua_gettop(L) - 1, floats);
            }
            lua_settop(L, text);
        }
    } else {
        fuzz_push_value(L, data + 1, size - 1);
        call(L, "json_encode", lua_gettop(L), 0);
        if (lua_isnil(L, -2)) {
            if (!lua_isstring(L, -1))
                fuzz_fail("an encoding error without a message", NULL);
        } else {
            call(L, "json_decode", lua_gettop(L) - 1, 0);
            if (lua_isnil(L, -2))
                fuzz_fail("the decoder refuses what the encoder wrote", lua_tostring(L, -1));
        }
    }
    return 0;
}
