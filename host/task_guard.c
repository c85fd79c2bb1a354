/* Guards at the top of a binding call (see task_guard.h). */
#include "task_guard.h"

#include <stdarg.h>
#include <lauxlib.h>

/* Raises "<where><what pushed by the caller><tail>". */
static void raise_guard_error(lua_State *L, const char *tail)
{
    luaL_where(L, 1);
    lua_insert(L, -2);
    lua_pushstring(L, tail);
    lua_concat(L, 3);
    lua_error(L);
}

tamarco_host *tamarco_check_host(lua_State *L, const char *what, ...)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host) {
        va_list ap;
        va_start(ap, what);
        lua_pushvfstring(L, what, ap);
        va_end(ap);
        raise_guard_error(L, " runs on the service's main state, not in a thread");
    }
    return host;
}

void tamarco_check_task(lua_State *L, const char *what, ...)
{
    if (tamarco_in_task(L))
        return;
    va_list ap;
    va_start(ap, what);
    lua_pushvfstring(L, what, ap);
    va_end(ap);
    raise_guard_error(L, " yields: call it inside a task, hook or handler");
}

int tamarco_on_main_coroutine(lua_State *L)
{
    int main = lua_pushthread(L);
    lua_pop(L, 1);
    return main;
}
