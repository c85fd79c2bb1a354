/*
 * {{c_name}}_native: the {{name}} service's C module.
 *
 *   local native = require "{{c_name}}_native"
 *   native.adler32(s)          -> Adler-32 of s, on the loop (fine for small inputs)
 *   native.adler32_offload(s)  -> the same on libuv's thread pool; the calling
 *                                 task yields meanwhile, the loop keeps serving
 *   native.log(message)        -> a log record from C, through the service's logging
 *
 * The tamarco-host C API is include/tamarco.h (installed as
 * <prefix>/include/tamarco-host/tamarco.h).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <lauxlib.h>
#include <tamarco.h>

static uint32_t adler32(const unsigned char *data, size_t len)
{
    uint32_t a = 1, b = 0;
    while (len > 0) {
        size_t chunk = len < 5552 ? len : 5552;   /* no overflow before the modulo */
        len -= chunk;
        while (chunk--) {
            a += *data++;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    return (b << 16) | a;
}

static int l_adler32(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_pushnumber(L, adler32((const unsigned char *)s, len));
    return 1;
}

typedef struct job {
    size_t len;
    uint32_t sum;
    unsigned char data[];
} job;

static void checksum_work(void *ud)   /* a pool thread: no Lua here */
{
    job *j = ud;
    j->sum = adler32(j->data, j->len);
}

static int checksum_done(lua_State *co, void *ud)   /* the loop thread */
{
    job *j = ud;
    int n = 0;
    if (co) {   /* NULL when the task stopped waiting: only free */
        lua_pushnumber(co, j->sum);
        n = 1;
    }
    free(j);
    return n;
}

static int l_adler32_offload(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    job *j = malloc(sizeof *j + len);   /* the Lua string may move: copy it */
    if (!j)
        return luaL_error(L, "out of memory");
    j->len = len;
    memcpy(j->data, s, len);
    return tamarco_offload(L, checksum_work, checksum_done, j);
}

static int l_log(lua_State *L)
{
    tamarco_log(TAMARCO_LOG_INFO, "{{c_name}}_native", luaL_checkstring(L, 1));
    return 0;
}

TAMARCO_API int luaopen_{{c_name}}_native(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"adler32", l_adler32},
        {"adler32_offload", l_adler32_offload},
        {"log", l_log},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
