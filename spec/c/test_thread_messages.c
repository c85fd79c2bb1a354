/* tamarco.c.thread from C: the message encoding on a plain state, and a
 * host state closed (lua_close) while one of its threads still runs. */
#include "host.h"

#include <stdio.h>
#include <string.h>

static int failures;

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "FAIL: %s\n", what);
        failures++;
    }
}

static int run(lua_State *L, const char *chunk, const char *what)
{
    if (luaL_dostring(L, chunk) != 0) {
        fprintf(stderr, "FAIL: %s: %s\n", what, lua_tostring(L, -1));
        lua_pop(L, 1);
        failures++;
        return -1;
    }
    return 0;
}

static void close_all(uv_handle_t *h, void *arg)
{
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

int main(void)
{
    char lua_dir[4096];
    check(tamarco_find_lua_dir(lua_dir, sizeof lua_dir) == 0, "find lua dir");

    /* A state without a host, like a thread's. */
    lua_State *L = tamarco_state_new(lua_dir);
    check(L != NULL, "state");
    run(L,
        "local c = require 'tamarco.c.thread'\n"
        "local v = { 1, 2.5, 'a\\0b', true, false, { x = { y = 'z' } }, [10] = 'sparse', k = -0.0 }\n"
        "local s = c.encode(v)\n"
        "local w = c.decode(s)\n"
        "assert(w[1] == 1 and w[2] == 2.5 and w[3] == 'a\\0b' and w[4] == true and w[5] == false)\n"
        "assert(w[6].x.y == 'z' and w[10] == 'sparse' and w.k == 0)\n"
        "for cut = 0, #s - 1 do\n"
        "  assert(not pcall(c.decode, s:sub(1, cut)), 'truncated buffer accepted at ' .. cut)\n"
        "end\n"
        "local ok, err = pcall(c.encode, { a = { print } })\n"
        "assert(not ok and err:find('msg.a[1] is a function', 1, true), err)\n"
        "ok, err = pcall(c.start, 'x', string.dump(function() end))\n"
        "assert(not ok and err:find('main state'), err)\n",
        "encoding on a plain state");
    lua_close(L);

    /* A host state closed with a thread still blocked in receive. */
    static tamarco_host host;
    uv_loop_t loop;
    uv_loop_init(&loop);
    host.loop = &loop;
    snprintf(host.lua_dir, sizeof host.lua_dir, "%s", lua_dir);
    L = tamarco_state_new(lua_dir);
    host.L = L;
    tamarco_host_attach(&host, L);
    check(tamarco_scheduler_init(&host) == 0, "scheduler");
    run(L,
        "local thread = require 'tamarco.core.thread'\n"
        "local testing = require 'tamarco.testing'\n"
        "local echo = thread.start('echo', function(ctx)\n"
        "  local m = ctx:receive(); ctx:send({ back = m })\n"
        "end)\n"
        "local r = testing.run(function()\n"
        "  echo:send({ 'hi', 2 }); local r = echo:receive(3000); assert(echo:join(3000)); return r\n"
        "end)\n"
        "assert(r.back[1] == 'hi' and r.back[2] == 2)\n"
        "keep = thread.start('forever', function(ctx) ctx:send('up'); ctx:receive() end)\n"
        "assert(testing.run(function() return keep:receive(3000) end) == 'up')\n",
        "host state with threads");
    /* close callbacks already queued (luv handles) run while their state lives */
    uv_run(&loop, UV_RUN_NOWAIT);
    lua_close(L);   /* the running thread's handle is collected: it is stopped and let go */
    uv_walk(&loop, close_all, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    check(uv_loop_close(&loop) == 0, "loop closes");
    uv_sleep(200);  /* the let-go thread ends by itself and frees its record */

    if (failures == 0)
        printf("ok\n");
    return failures != 0;
}
