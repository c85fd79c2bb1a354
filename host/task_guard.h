/*
 * Guards at the top of a binding call: "is there a host (the service's main
 * state, not a `thread` state)?" and "can this call yield (are we in a
 * task)?". One wording for every binding, `what` being a format
 * (%s, %d, like lua_pushfstring) naming the call:
 *   "<what> runs on the service's main state, not in a thread"
 *   "<what> yields: call it inside a task, hook or handler"
 */
#ifndef TAMARCO_TASK_GUARD_H
#define TAMARCO_TASK_GUARD_H

#include <lua.h>

#include "tamarco.h"

/* Raises unless L belongs to the main state; returns its host. */
tamarco_host *tamarco_check_host(lua_State *L, const char *what, ...);

/* Raises unless the running coroutine is a task that may yield. */
void tamarco_check_task(lua_State *L, const char *what, ...);

/* 1 when L runs the main coroutine, outside any task or callback that may
 * yield: where run_loop may be called. */
int tamarco_on_main_coroutine(lua_State *L);

#endif
