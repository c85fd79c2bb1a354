/*
 * Guards at the top of a binding call: "is there a host (the service's main
 * state, not a `thread` state)?" and "can this call yield (are we in a
 * task)?". One wording for every binding:
 *   "<what> runs on the service's main state, not in a thread"
 *   "<what> yields: call it inside a task, hook or handler"
 */
#ifndef TAMARCO_TASK_GUARD_H
#define TAMARCO_TASK_GUARD_H

#include <lauxlib.h>

#include "tamarco.h"

/* Raises unless L belongs to the main state; returns its host. */
static inline tamarco_host *tamarco_check_host(lua_State *L, const char *what)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host)
        luaL_error(L, "%s runs on the service's main state, not in a thread", what);
    return host;
}

/* Raises unless the running coroutine is a task that may yield. */
static inline void tamarco_check_task(lua_State *L, const char *what)
{
    if (!tamarco_in_task(L))
        luaL_error(L, "%s yields: call it inside a task, hook or handler", what);
}

/* 1 when L runs the main coroutine (no task, no callback below it may
 * yield): what run_loop requires. */
static inline int tamarco_on_main_coroutine(lua_State *L)
{
    int main = lua_pushthread(L);
    lua_pop(L, 1);
    return main;
}

#endif
