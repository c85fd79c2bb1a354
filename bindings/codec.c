/* tamarco.c.codec: byte codecs shared by the Lua side (base64 for HTTP basic
 * auth, etcd's JSON gateway keys and values; JSON itself in json.c). */
#include "host.h"
#include "json.h"

#include <stdlib.h>
#include <string.h>

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* base64_encode(s) -> standard base64 with padding. */
static int l_base64_encode(lua_State *L)
{
    size_t n;
    const unsigned char *in = (const unsigned char *)luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)in[i] << 16;
        if (i + 1 < n) v |= (unsigned)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        char out[4] = {
            B64[(v >> 18) & 63], B64[(v >> 12) & 63],
            i + 1 < n ? B64[(v >> 6) & 63] : '=',
            i + 2 < n ? B64[v & 63] : '=',
        };
        luaL_addlstring(&b, out, 4);
    }
    luaL_pushresult(&b);
    return 1;
}

static int b64_value(int c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+' || c == '-') return 62;   /* the URL-safe alphabet too */
    if (c == '/' || c == '_') return 63;
    return -1;
}

/* base64_decode(s) -> bytes, or nil, message on a character outside the
 * alphabet. Padding and whitespace are ignored. */
static int l_base64_decode(lua_State *L)
{
    size_t n;
    const char *in = luaL_checklstring(L, 1, &n);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    unsigned acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)in[i];
        if (c == '=' || c == '\n' || c == '\r' || c == ' ' || c == '\t')
            continue;
        int v = b64_value(c);
        if (v < 0) {
            lua_pushnil(L);
            lua_pushfstring(L, "invalid base64 character at offset %d", (int)i);
            return 2;
        }
        acc = (acc << 6) | (unsigned)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            luaL_addchar(&b, (char)((acc >> bits) & 0xff));
        }
    }
    luaL_pushresult(&b);
    return 1;
}

int luaopen_tamarco_c_codec(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"base64_encode", l_base64_encode},
        {"base64_decode", l_base64_decode},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    tamarco_json_register(L, -1);
    return 1;
}
