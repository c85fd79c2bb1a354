/*
 * A probe for the specs of the offload API (tamarco_offload): a C job that
 * sleeps on a pool thread and reports whether it ran off the loop thread and
 * how many such jobs overlapped, so a spec can see offloads run in parallel
 * without timing them. Exposed as tamarco.c.native.offload_sleep.
 */
#include "host.h"

#include <stdlib.h>

typedef struct sleep_job {
    unsigned ms;
    int on_loop_thread;
    int overlapping;          /* probe jobs running at once, this one included */
    uv_thread_t loop_thread;
} sleep_job;

/* How many probe jobs are sleeping on pool threads right now: lets a spec
 * see that offloads overlap without timing them. */
static int sleeping_jobs;

static void sleep_work(void *ud)
{
    sleep_job *job = ud;
    int now = __atomic_add_fetch(&sleeping_jobs, 1, __ATOMIC_SEQ_CST);
    uv_sleep(job->ms);
    int at_end = __atomic_load_n(&sleeping_jobs, __ATOMIC_SEQ_CST);
    job->overlapping = now > at_end ? now : at_end;
    __atomic_sub_fetch(&sleeping_jobs, 1, __ATOMIC_SEQ_CST);
    uv_thread_t self = uv_thread_self();
    job->on_loop_thread = uv_thread_equal(&self, &job->loop_thread);
}

static int sleep_done(lua_State *co, void *ud)
{
    sleep_job *job = ud;
    int n = 0;
    if (co) {
        lua_pushboolean(co, !job->on_loop_thread);
        lua_pushinteger(co, job->overlapping);
        n = 2;
    }
    free(job);
    return n;
}

/* offload_sleep(ms) -> ran_off_the_loop_thread, overlapping. Blocks a pool thread for ms
 * milliseconds while the task yields. */
int tamarco_probe_offload_sleep(lua_State *L)
{
    lua_Integer ms = luaL_checkinteger(L, 1);
    luaL_argcheck(L, ms >= 0, 1, "must be >= 0");
    sleep_job *job = malloc(sizeof *job);
    if (!job)
        return luaL_error(L, "out of memory");
    job->ms = (unsigned)ms;
    job->on_loop_thread = 1;
    job->loop_thread = uv_thread_self();
    return tamarco_offload(L, sleep_work, sleep_done, job);
}
