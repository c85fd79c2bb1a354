/* tamarco.c.timer: sleeping coroutines and the loop's clock. */
#include "host.h"
#include "task_guard.h"

#include <stdlib.h>

typedef struct sleep_request {
    uv_timer_t timer;
    tamarco_host *host;
    int wait_id;
} sleep_request;

static void free_on_close(uv_handle_t *handle)
{
    free(handle->data);
}

static void on_sleep_done(uv_timer_t *timer)
{
    sleep_request *req = timer->data;
    tamarco_host *host = req->host;
    int wait_id = req->wait_id;
    uv_close((uv_handle_t *)timer, free_on_close);
    tamarco_wake(host, wait_id, NULL, NULL);
}

static void cancel_sleep(void *ud)
{
    sleep_request *req = ud;
    uv_timer_stop(&req->timer);
    uv_close((uv_handle_t *)&req->timer, free_on_close);
}

/* sleep(ms): yields the running task for ms milliseconds. */
static int l_sleep(lua_State *L)
{
    double ms = luaL_checknumber(L, 1);
    luaL_argcheck(L, ms >= 0, 1, "sleep time must be >= 0");
    tamarco_host *host = tamarco_host_of(L);
    if (!host)
        return luaL_error(L, "tamarco.sleep is not available in a thread; use the thread context's sleep");
    tamarco_check_task(L, "tamarco.sleep");
    if (ms == 0)
        return tamarco_yield_turn(L);
    sleep_request *req = malloc(sizeof *req);
    if (!req)
        return luaL_error(L, "out of memory");
    req->host = host;
    uv_timer_init(host->loop, &req->timer);
    req->timer.data = req;
    req->wait_id = tamarco_wait_begin(L, cancel_sleep, req);
    /* the cached loop time may be stale after a long stretch of Lua code */
    uv_update_time(host->loop);
    tamarco_wait_note(host, req->wait_id, "sleep", NULL, (double)uv_now(host->loop) + ms);
    uv_timer_start(&req->timer, on_sleep_done, (uint64_t)ms, 0);
    return tamarco_wait_yield(L);
}

/* now() -> milliseconds of the loop's monotonic clock (cached per turn). */
static int l_now(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (host)
        lua_pushnumber(L, (lua_Number)uv_now(host->loop));
    else
        lua_pushnumber(L, (lua_Number)(uv_hrtime() / 1000000));
    return 1;
}

/* hrtime() -> nanoseconds, for precise measurements. */
static int l_hrtime(lua_State *L)
{
    lua_pushnumber(L, (lua_Number)uv_hrtime());
    return 1;
}

/* time() -> wall clock seconds with sub-second precision. */
static int l_time(lua_State *L)
{
    uv_timeval64_t tv;
    if (uv_gettimeofday(&tv) != 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushnumber(L, (lua_Number)tv.tv_sec + tv.tv_usec / 1e6);
    return 1;
}

int luaopen_tamarco_c_timer(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"sleep", l_sleep},
        {"now", l_now},
        {"hrtime", l_hrtime},
        {"time", l_time},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
