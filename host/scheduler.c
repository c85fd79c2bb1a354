/*
 * The scheduler: every task, timer tick and handler runs in a coroutine of
 * the main state, and this file is the only place that resumes one, so
 * that errors, tracebacks, exit callbacks and coroutine reuse are handled
 * once. The wait-id protocol, the registry book-keeping and the reuse
 * pool: docs/internals/scheduler.md.
 */
#include "host.h"
#include "task_guard.h"

#include <stdlib.h>
#include <string.h>

/* The scheduler's tables live in the registry at integer references made
 * once (host->sched_refs): a wait and its wake look several of them up, and
 * an integer key is an array slot, where a string or lightuserdata key
 * would be a hash lookup. */
enum { T_TASKS, T_WAITS, T_WAIT_OF, T_EXITS, T_READY, T_POOL, T_UNSEEN };
static const char *const table_modes[TAMARCO_SCHED_TABLES] = {
    [T_TASKS] = "k", [T_WAIT_OF] = "k", [T_EXITS] = "k", [T_UNSEEN] = "k",
};
/* The error handler is set once and read on failures only. */
static const char reg_on_error;
#define REG_ON_ERROR ((void *)&reg_on_error)
#define POOL_MAX 64

struct pending_cancel {
    tamarco_cancel_fn cancel;
    void *ud;
};

/* registry[key] onto the stack. */
static void registry_get(lua_State *L, void *key)
{
    lua_pushlightuserdata(L, key);
    lua_rawget(L, LUA_REGISTRYINDEX);
}

/* registry[key] = the value on top (popped). */
static void registry_set(lua_State *L, void *key)
{
    lua_pushlightuserdata(L, key);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

static void push_table(tamarco_host *host, lua_State *L, int which)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, host->sched_refs[which]);
}

/* A fresh table for `which` (made at start, replaced by the ready queue's
 * swap and at shutdown). */
static void new_table(tamarco_host *host, lua_State *L, int which)
{
    lua_newtable(L);
    if (table_modes[which]) {
        lua_createtable(L, 0, 1);
        lua_pushstring(L, table_modes[which]);
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
    }
    lua_rawseti(L, LUA_REGISTRYINDEX, host->sched_refs[which]);
}

static tamarco_host *checked_host(lua_State *L)
{
    return tamarco_check_host(L, "the scheduler");
}

/* ---- wait notes: wait id -> what it waits on ---- */

#define NOTES_MIN_CAP 64

static unsigned note_hash(int id, int cap)
{
    return ((unsigned)id * 2654435761u) & (unsigned)(cap - 1);
}

static struct tamarco_wait_note *note_find(tamarco_host *host, int id)
{
    if (host->wait_notes_cap == 0)
        return NULL;
    unsigned mask = (unsigned)host->wait_notes_cap - 1;
    for (unsigned i = note_hash(id, host->wait_notes_cap);; i = (i + 1) & mask) {
        struct tamarco_wait_note *n = &host->wait_notes[i];
        if (n->id == id)
            return n;
        if (n->id == 0)
            return NULL;
    }
}

static struct tamarco_wait_note *note_slot_for(struct tamarco_wait_note *table, int cap, int id)
{
    unsigned mask = (unsigned)cap - 1;
    unsigned i = note_hash(id, cap);
    while (table[i].id != 0)
        i = (i + 1) & mask;
    return &table[i];
}

/* Grows the table so that one more note keeps the load under 3/4. */
static int notes_reserve(tamarco_host *host)
{
    if ((host->wait_notes_count + 1) * 4 <= host->wait_notes_cap * 3)
        return 0;
    int cap = host->wait_notes_cap ? host->wait_notes_cap * 2 : NOTES_MIN_CAP;
    struct tamarco_wait_note *table = calloc((size_t)cap, sizeof *table);
    if (!table)
        return -1;
    for (int i = 0; i < host->wait_notes_cap; i++) {
        if (host->wait_notes[i].id != 0)
            *note_slot_for(table, cap, host->wait_notes[i].id) = host->wait_notes[i];
    }
    free(host->wait_notes);
    host->wait_notes = table;
    host->wait_notes_cap = cap;
    return 0;
}

/* Returns -1 when out of memory (nothing is noted then). */
static int note_add(tamarco_host *host, int id, tamarco_cancel_fn cancel, void *ud)
{
    if (notes_reserve(host) != 0)
        return -1;
    struct tamarco_wait_note *n = note_slot_for(host->wait_notes, host->wait_notes_cap, id);
    n->id = id;
    n->kind = "io";
    n->since_ms = (double)uv_now(host->loop);
    n->deadline_ms = 0;
    n->detail[0] = '\0';
    n->cancel = cancel;
    n->cancel_ud = ud;
    host->wait_notes_count++;
    return 0;
}

/* Linear probing: removal shifts the following run back instead of leaving
 * a tombstone, so lookups stay short however many waits came and went. */
static void note_remove(tamarco_host *host, struct tamarco_wait_note *n)
{
    unsigned mask = (unsigned)host->wait_notes_cap - 1;
    unsigned hole = (unsigned)(n - host->wait_notes);
    n->id = 0;
    host->wait_notes_count--;
    for (unsigned i = (hole + 1) & mask; host->wait_notes[i].id != 0; i = (i + 1) & mask) {
        unsigned home = note_hash(host->wait_notes[i].id, host->wait_notes_cap);
        /* move entry i into the hole unless its home lies in (hole, i] */
        int stays = hole <= i ? (home > hole && home <= i) : (home > hole || home <= i);
        if (!stays) {
            host->wait_notes[hole] = host->wait_notes[i];
            host->wait_notes[i].id = 0;
            hole = i;
        }
    }
}

TAMARCO_API void tamarco_wait_note(tamarco_host *host, int wait_id, const char *kind, const char *detail,
                       double deadline_ms)
{
    struct tamarco_wait_note *n = note_find(host, wait_id);
    if (!n)
        return;
    n->kind = kind;
    n->deadline_ms = deadline_ms;
    if (detail) {
        size_t len = strlen(detail);
        if (len >= sizeof n->detail)
            len = sizeof n->detail - 1;
        memcpy(n->detail, detail, len);
        n->detail[len] = '\0';
    } else {
        n->detail[0] = '\0';
    }
}

/* ---- waits ---- */

/* The host whose task tamarco_resume runs now (NULL between resumes). */
static tamarco_host *resuming_host;

tamarco_host *tamarco_host_of_running_task(lua_State *L)
{
    return resuming_host && resuming_host->running_task == L ? resuming_host : NULL;
}

static int in_task(tamarco_host *host, lua_State *L)
{
    if (L == host->running_task)   /* the usual case: a task calling a binding */
        return 1;
    if (lua_pushthread(L)) {   /* main thread */
        lua_pop(L, 1);
        return 0;
    }
    push_table(host, L, T_TASKS);
    lua_pushvalue(L, -2);
    lua_rawget(L, -2);
    int yes = lua_toboolean(L, -1);
    lua_pop(L, 3);
    return yes;
}

int tamarco_in_task(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    return host ? in_task(host, L) : 0;   /* no host: a thread's state, no tasks */
}

int tamarco_wait_begin(lua_State *L, tamarco_cancel_fn cancel, void *ud)
{
    tamarco_host *host = checked_host(L);
    if (!in_task(host, L))
        tamarco_check_task(L, "this call");   /* raises */
    int id = host->next_wait_id + 1;
    if (id <= 0)   /* wrapped after 2^31 waits */
        id = 1;
    /* the note holds the cancel: it must exist before the wait does */
    if (note_add(host, id, cancel, ud) != 0)
        luaL_error(L, "out of memory");
    host->next_wait_id = id;

    push_table(host, L, T_WAITS);
    lua_pushthread(L);
    lua_rawseti(L, -2, id);
    lua_pop(L, 1);

    push_table(host, L, T_WAIT_OF);
    lua_pushthread(L);
    lua_pushinteger(L, id);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    return id;
}

int tamarco_wait_yield(lua_State *L)
{
    return lua_yield(L, 0);
}

/* Removes wait `id`; pushes its coroutine (or nothing and returns 0). The
 * pending cancel, if any, is copied to *cancel_out (cancel NULL otherwise). */
static int take_wait(tamarco_host *host, lua_State *L, int id, struct pending_cancel *cancel_out)
{
    push_table(host, L, T_WAITS);
    lua_rawgeti(L, -1, id);
    if (!lua_isthread(L, -1)) {
        lua_pop(L, 2);
        return 0;
    }
    lua_pushnil(L);
    lua_rawseti(L, -3, id);
    lua_remove(L, -2);   /* co */
    struct tamarco_wait_note *n = note_find(host, id);   /* every wait has one */
    if (cancel_out) {
        cancel_out->cancel = n ? n->cancel : NULL;
        cancel_out->ud = n ? n->cancel_ud : NULL;
    }
    if (n)
        note_remove(host, n);

    push_table(host, L, T_WAIT_OF);
    lua_pushvalue(L, -2);
    lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    return 1;
}

int tamarco_wake(tamarco_host *host, int wait_id, tamarco_push_fn push, void *ud)
{
    lua_State *L = host->L;
    if (!take_wait(host, L, wait_id, NULL))
        return 0;
    lua_State *co = lua_tothread(L, -1);
    int nargs = push ? push(co, ud) : 0;
    tamarco_resume(host, co, nargs);
    lua_pop(L, 1);   /* keeps co alive until resumed */
    return 1;
}

/* ---- resume: the single entry point ---- */

static void report_error(tamarco_host *host, lua_State *co, int err_index_in_L)
{
    lua_State *L = host->L;
    luaL_traceback(L, co, NULL, 0);
    int tb = lua_gettop(L);
    registry_get(L, REG_ON_ERROR);
    if (lua_isfunction(L, -1)) {
        lua_pushthread(co);
        lua_xmove(co, L, 1);
        lua_pushvalue(L, err_index_in_L);
        lua_pushvalue(L, tb);
        if (lua_pcall(L, 3, 0, 0) != 0) {
            fprintf(stderr, "tamarco: error handler failed: %s\n", lua_tostring(L, -1));
            lua_pop(L, 1);
        }
    } else {
        lua_pop(L, 1);
        lua_getglobal(L, "tostring");
        lua_pushvalue(L, err_index_in_L);
        lua_pcall(L, 1, 1, 0);
        const char *msg = lua_tostring(L, -1);
        fprintf(stderr, "tamarco: task failed: %s\n%s\n", msg, lua_tostring(L, tb));
    }
    lua_settop(L, tb);
}

/* Calls exits[co](ok, values...) with the values at [first, top] of L. */
static void call_exit(tamarco_host *host, int co_index, int ok, int first)
{
    lua_State *L = host->L;
    int top = lua_gettop(L);
    push_table(host, L, T_EXITS);
    lua_pushvalue(L, co_index);
    lua_rawget(L, -2);
    if (!lua_isfunction(L, -1)) {
        lua_settop(L, top);
        return;
    }
    lua_pushvalue(L, co_index);
    lua_pushnil(L);
    lua_rawset(L, -4);
    lua_pushboolean(L, ok);
    for (int i = first; i <= top; i++)
        lua_pushvalue(L, i);
    if (lua_pcall(L, 1 + (top - first + 1), 0, 0) != 0) {
        fprintf(stderr, "tamarco: task exit callback failed: %s\n", lua_tostring(L, -1));
    }
    lua_settop(L, top);
}

/* Sets or clears "unseen" for the coroutine at co_index. */
static void set_unseen(tamarco_host *host, lua_State *L, int co_index, int unseen)
{
    push_table(host, L, T_UNSEEN);
    lua_pushvalue(L, co_index);
    if (unseen)
        lua_pushboolean(L, 1);
    else
        lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

/* A coroutine that returned normally goes to the pool when nobody can hold it. */
static void pool_put(tamarco_host *host, lua_State *L, int co_index)
{
    if (host->idle_tasks >= POOL_MAX)
        return;
    push_table(host, L, T_UNSEEN);
    lua_pushvalue(L, co_index);
    lua_rawget(L, -2);
    int unseen = lua_toboolean(L, -1);
    lua_pop(L, 2);
    if (!unseen)
        return;
    push_table(host, L, T_POOL);
    lua_pushvalue(L, co_index);
    lua_rawseti(L, -2, ++host->idle_tasks);
    lua_pop(L, 1);
}

/* Pushes a coroutine from the pool and returns it, or returns NULL. */
static lua_State *pool_take(tamarco_host *host, lua_State *L)
{
    if (host->idle_tasks == 0)
        return NULL;
    push_table(host, L, T_POOL);
    lua_rawgeti(L, -1, host->idle_tasks);
    lua_pushnil(L);
    lua_rawseti(L, -3, host->idle_tasks--);
    lua_remove(L, -2);
    return lua_tothread(L, -1);
}

int tamarco_resume(tamarco_host *host, lua_State *co, int nargs)
{
    lua_State *L = host->L;
    int base = lua_gettop(L);
    /* only tasks come here (started, woken or queued by this file) */
    lua_State *outer = host->running_task;
    tamarco_host *outer_host = resuming_host;
    host->running_task = co;
    resuming_host = host;
    int status = lua_resume(co, nargs);
    host->running_task = outer;
    resuming_host = outer_host;
    if (status == LUA_YIELD) {
        /* Suspended in an operation (or a bare coroutine.yield, whose values
         * nobody receives). Whoever holds its wait id resumes it later. */
        lua_settop(co, 0);
        return 0;
    }
    lua_pushthread(co);
    lua_xmove(co, L, 1);
    int co_index = lua_gettop(L);
    if (status == 0) {
        int nres = lua_gettop(co);
        luaL_checkstack(L, nres + 4, "too many results");
        lua_xmove(co, L, nres);
        call_exit(host, co_index, 1, co_index + 1);
        if (lua_gettop(co) == 0)
            pool_put(host, L, co_index);
    } else {
        lua_xmove(co, L, 1);   /* the error value */
        int err = lua_gettop(L);
        report_error(host, co, err);
        luaL_traceback(L, co, NULL, 0);
        call_exit(host, co_index, 0, err);
    }
    lua_settop(L, base);
    return status == 0 ? 0 : -1;
}

/* ---- deferred resumes ---- */

static void run_ready(uv_idle_t *idle)
{
    tamarco_host *host = idle->data;
    lua_State *L = host->L;
    int top = lua_gettop(L);
    push_table(host, L, T_READY);
    /* Swap in a fresh queue: resumes below may queue more for the next turn. */
    new_table(host, L, T_READY);
    int count = (int)lua_objlen(L, -1);
    for (int i = 1; i <= count; i++) {
        lua_rawgeti(L, top + 1, i);
        int entry = lua_gettop(L);
        lua_rawgeti(L, entry, 1);
        lua_State *co = lua_tothread(L, -1);
        lua_rawgeti(L, entry, 2);
        int n = (int)lua_tointeger(L, -1);
        lua_pop(L, 1);
        luaL_checkstack(co, n + 1, "too many values");
        for (int k = 0; k < n; k++) {
            lua_rawgeti(L, entry, 3 + k);
            lua_xmove(L, co, 1);
        }
        /* a suspended task, or a new one (its function below the args) */
        if (lua_status(co) == LUA_YIELD || (lua_status(co) == 0 && lua_gettop(co) == n + 1))
            tamarco_resume(host, co, n);
        lua_settop(L, top + 1);
    }
    lua_settop(L, top);
    push_table(host, L, T_READY);
    int pending = (int)lua_objlen(L, -1);
    lua_pop(L, 1);
    if (!pending) {
        uv_idle_stop(idle);
        host->ready_idle_active = 0;
    }
}

/* Queues co to be resumed on the next loop turn with the values at
 * [first, first+n) of L. */
static void queue_ready(tamarco_host *host, lua_State *L, int co_index, int first, int n)
{
    push_table(host, L, T_READY);
    lua_createtable(L, n + 2, 0);
    lua_pushvalue(L, co_index);
    lua_rawseti(L, -2, 1);
    lua_pushinteger(L, n);
    lua_rawseti(L, -2, 2);
    for (int k = 0; k < n; k++) {
        lua_pushvalue(L, first + k);
        lua_rawseti(L, -2, 3 + k);
    }
    lua_rawseti(L, -2, (int)lua_objlen(L, -2) + 1);
    lua_pop(L, 1);
    if (!host->ready_idle_active) {
        uv_idle_start(&host->ready_idle, run_ready);
        host->ready_idle_active = 1;
    }
}

void tamarco_scheduler_shutdown(tamarco_host *host)
{
    lua_State *L = host->L;
    /* a cancel may end other waits (never begin one): copy them out first */
    int n = 0;
    struct pending_cancel *cancels = calloc((size_t)host->wait_notes_count + 1, sizeof *cancels);
    for (int i = 0; cancels && i < host->wait_notes_cap; i++) {
        struct tamarco_wait_note *note = &host->wait_notes[i];
        if (note->id != 0 && note->cancel) {
            cancels[n].cancel = note->cancel;
            cancels[n++].ud = note->cancel_ud;
        }
    }
    for (int i = 0; i < n; i++)
        cancels[i].cancel(cancels[i].ud);
    free(cancels);
    new_table(host, L, T_WAITS);
    free(host->wait_notes);
    host->wait_notes = NULL;
    host->wait_notes_cap = host->wait_notes_count = 0;
    if (host->ready_idle_active) {
        uv_idle_stop(&host->ready_idle);
        host->ready_idle_active = 0;
    }
}

int tamarco_yield_turn(lua_State *L)
{
    tamarco_host *host = checked_host(L);
    tamarco_check_task(L, "this call");
    lua_pushthread(L);
    queue_ready(host, L, lua_gettop(L), 0, 0);
    lua_pop(L, 1);
    return lua_yield(L, 0);
}

int tamarco_scheduler_init(tamarco_host *host)
{
    host->next_wait_id = 0;
    host->ready_idle_active = 0;
    host->idle_tasks = 0;
    host->running_task = NULL;
    host->wait_notes = NULL;
    host->wait_notes_cap = host->wait_notes_count = 0;
    host->ready_idle.data = host;
    for (int i = 0; i < TAMARCO_SCHED_TABLES; i++) {
        lua_pushboolean(host->L, 0);   /* a placeholder: new_table sets the slot */
        host->sched_refs[i] = luaL_ref(host->L, LUA_REGISTRYINDEX);
        new_table(host, host->L, i);
    }
    return uv_idle_init(host->loop, &host->ready_idle);
}

static void mark_task(tamarco_host *host, lua_State *L, int co_index)
{
    push_table(host, L, T_TASKS);
    lua_pushvalue(L, co_index);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
}

int tamarco_start_task(tamarco_host *host, int nargs)
{
    lua_State *L = host->L;
    int fn_index = lua_gettop(L) - nargs;
    lua_State *co = pool_take(host, L);
    if (!co) {
        co = lua_newthread(L);
        mark_task(host, L, lua_gettop(L));
        set_unseen(host, L, lua_gettop(L), 1);
    }
    lua_insert(L, fn_index);            /* keep co referenced below fn/args */
    lua_xmove(L, co, nargs + 1);        /* fn and args onto the coroutine */
    int rc = tamarco_resume(host, co, nargs);
    lua_remove(L, fn_index);            /* co */
    return rc;
}

/* ---- Lua API: tamarco.c.scheduler ---- */

/* spawn(fn, ...) -> co. Starts fn in a new coroutine on the next loop turn. */
static int l_spawn(lua_State *L)
{
    tamarco_host *host = checked_host(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    int n = lua_gettop(L) - 1;
    lua_State *co = lua_newthread(L);
    int co_index = lua_gettop(L);
    mark_task(host, L, co_index);
    lua_pushvalue(L, 1);
    lua_xmove(L, co, 1);
    queue_ready(host, L, co_index, 2, n);
    lua_pushvalue(L, co_index);
    return 1;
}

/* start(fn, ...) -> co. Starts fn in a new task right now; only from code
 * that is not itself a task (loop callbacks such as luv's). */
static int l_start(lua_State *L)
{
    tamarco_host *host = checked_host(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (lua_pushthread(L) == 0) {
        lua_pop(L, 1);
        return luaL_error(L, "scheduler.start is for loop callbacks; inside a task use spawn");
    }
    lua_pop(L, 1);
    int nargs = lua_gettop(L) - 1;
    lua_State *co = lua_newthread(L);
    mark_task(host, L, lua_gettop(L));
    lua_insert(L, 1);
    lua_pushvalue(L, 1);
    lua_insert(L, 2);                   /* stack: co, co, fn, args */
    lua_xmove(L, co, nargs + 1);
    tamarco_resume(host, co, nargs);
    lua_settop(L, 1);
    return 1;
}

/* on_exit(co, fn): fn(ok, results...) or fn(false, err, traceback) when co ends. */
static int l_on_exit(lua_State *L)
{
    tamarco_host *host = checked_host(L);
    luaL_checktype(L, 1, LUA_TTHREAD);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    push_table(host, L, T_EXITS);
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_rawset(L, -3);
    return 0;
}

/* set_error_handler(fn): fn(co, err, traceback) for every coroutine that fails. */
static int l_set_error_handler(lua_State *L)
{
    if (!lua_isnil(L, 1))
        luaL_checktype(L, 1, LUA_TFUNCTION);
    lua_settop(L, 1);
    registry_set(L, REG_ON_ERROR);
    return 0;
}

/* suspend([what]) -> values given to wake/interrupt. Yields the running task
 * until another piece of code calls wake(co, ...); `what` says what for in
 * /debug/tasks ("suspend <what>"). */
static int l_suspend(lua_State *L)
{
    const char *detail = luaL_optstring(L, 1, NULL);
    int id = tamarco_wait_begin(L, NULL, NULL);
    tamarco_wait_note(tamarco_host_of(L), id, "suspend", detail, 0);   /* copies detail */
    lua_settop(L, 0);
    return tamarco_wait_yield(L);
}

static int pending_wait_of(tamarco_host *host, lua_State *L, int co_index)
{
    push_table(host, L, T_WAIT_OF);
    lua_pushvalue(L, co_index);
    lua_rawget(L, -2);
    int id = (int)lua_tointeger(L, -1);
    lua_pop(L, 2);
    return id;
}

/* wake(co, ...) -> true if co was suspended; it resumes on the next loop turn
 * with the given values. interrupt(co, ...) is the same but also cancels the
 * operation co was waiting on (used to cancel tasks). */
static int wake_or_interrupt(lua_State *L, int cancel)
{
    tamarco_host *host = checked_host(L);
    luaL_checktype(L, 1, LUA_TTHREAD);
    int id = pending_wait_of(host, L, 1);
    struct pending_cancel pc;
    if (!id || !take_wait(host, L, id, &pc)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_pop(L, 1);
    if (cancel && pc.cancel)
        pc.cancel(pc.ud);
    queue_ready(host, L, 1, 2, lua_gettop(L) - 1);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_wake(lua_State *L) { return wake_or_interrupt(L, 0); }
static int l_interrupt(lua_State *L) { return wake_or_interrupt(L, 1); }

/* is_waiting(co) -> bool */
static int l_is_waiting(lua_State *L)
{
    tamarco_host *host = checked_host(L);
    luaL_checktype(L, 1, LUA_TTHREAD);
    lua_pushboolean(L, pending_wait_of(host, L, 1) != 0);
    return 1;
}

/* current() -> the running task's coroutine, or nil outside a task. */
static int l_current(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host || !in_task(host, L))
        return 0;
    lua_pushthread(L);
    set_unseen(host, L, lua_gettop(L), 0);    /* the caller may keep it: no reuse */
    return 1;
}

/* coroutine.running() of the main state: the same answer, and the coroutine
 * is no longer reused (see the pool above). */
static int l_running(lua_State *L)
{
    if (lua_pushthread(L)) {
        lua_pop(L, 1);
        lua_pushnil(L);                  /* Lua 5.1: nil in the main thread */
        return 1;
    }
    tamarco_host *host = tamarco_host_of(L);
    if (host)                            /* a thread's state has no pool */
        set_unseen(host, L, lua_gettop(L), 0);
    return 1;
}

static int count_entries(tamarco_host *host, lua_State *L, int which)
{
    push_table(host, L, which);
    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, -2) != 0) {
        lua_pop(L, 1);
        n++;
    }
    lua_pop(L, 1);
    return n;
}

/* stats() -> { idle_tasks = coroutines waiting in the reuse pool, waits =
 * pending waits, ready = resumes queued for the next turn, tasks = entries
 * of the task set (live, pooled and not yet collected), exits = exit
 * callbacks } */
static int l_stats(lua_State *L)
{
    tamarco_host *host = checked_host(L);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, host->idle_tasks);
    lua_setfield(L, -2, "idle_tasks");
    lua_pushinteger(L, host->wait_notes_count);
    lua_setfield(L, -2, "waits");
    push_table(host, L, T_READY);
    lua_pushinteger(L, (lua_Integer)lua_objlen(L, -1));
    lua_setfield(L, -3, "ready");
    lua_pop(L, 1);
    lua_pushinteger(L, count_entries(host, L, T_TASKS));
    lua_setfield(L, -2, "tasks");
    lua_pushinteger(L, count_entries(host, L, T_EXITS));
    lua_setfield(L, -2, "exits");
    return 1;
}

/* Pushes a set of the coroutines queued in the ready queue. */
static void push_ready_set(tamarco_host *host, lua_State *L)
{
    lua_newtable(L);
    push_table(host, L, T_READY);
    int count = (int)lua_objlen(L, -1);
    for (int i = 1; i <= count; i++) {
        lua_rawgeti(L, -1, i);
        lua_rawgeti(L, -1, 1);
        lua_pushboolean(L, 1);
        lua_rawset(L, -5);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

static void set_string(lua_State *L, const char *key, const char *value)
{
    lua_pushstring(L, value);
    lua_setfield(L, -2, key);
}

static void set_number(lua_State *L, const char *key, double value)
{
    lua_pushnumber(L, value);
    lua_setfield(L, -2, key);
}

/* list() -> array of { co =, state = "running" | "ready" | "waiting" |
 * "suspended", wait = kind, detail =, waited_ms =, remaining_ms = } for every
 * live coroutine the scheduler started (pooled and finished ones are left
 * out). Reads the book-keeping only: no coroutine is resumed or woken. */
static int l_list(lua_State *L)
{
    tamarco_host *host = checked_host(L);
    double now = (double)uv_now(host->loop);
    lua_newtable(L);
    int result = lua_gettop(L);
    push_ready_set(host, L);
    int ready = lua_gettop(L);
    push_table(host, L, T_WAIT_OF);
    int wait_of = lua_gettop(L);
    push_table(host, L, T_TASKS);
    int tasks = lua_gettop(L);
    int n = 0;
    lua_pushnil(L);
    while (lua_next(L, tasks) != 0) {
        lua_pop(L, 1);
        lua_State *co = lua_tothread(L, -1);
        if (!co)
            continue;
        const char *state = NULL;
        struct tamarco_wait_note *note = NULL;
        int status = lua_status(co);
        lua_Debug ar;
        if (co == L) {
            state = "running";
        } else if (status == LUA_YIELD) {
            lua_pushvalue(L, -1);
            lua_rawget(L, wait_of);
            int id = (int)lua_tointeger(L, -1);
            lua_pop(L, 1);
            if (id) {
                state = "waiting";
                note = note_find(host, id);
            } else {
                lua_pushvalue(L, -1);
                lua_rawget(L, ready);
                state = lua_toboolean(L, -1) ? "ready" : "suspended";
                lua_pop(L, 1);
            }
        } else if (status == 0) {
            if (lua_getstack(co, 0, &ar))
                state = "running";   /* it resumed another coroutine */
            else if (lua_gettop(co) > 0)
                state = "ready";     /* spawned, starts on the next turn */
        }
        if (!state)
            continue;                /* finished, failed or pooled */
        lua_createtable(L, 0, 6);
        lua_pushvalue(L, -2);
        lua_setfield(L, -2, "co");
        set_string(L, "state", state);
        if (note) {
            set_string(L, "wait", note->kind);
            if (note->detail[0])
                set_string(L, "detail", note->detail);
            set_number(L, "waited_ms", now - note->since_ms);
            if (note->deadline_ms > 0)
                set_number(L, "remaining_ms", note->deadline_ms > now ? note->deadline_ms - now : 0);
        }
        lua_rawseti(L, result, ++n);
    }
    lua_settop(L, result);
    return 1;
}

int luaopen_tamarco_c_scheduler(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"spawn", l_spawn},
        {"start", l_start},
        {"on_exit", l_on_exit},
        {"set_error_handler", l_set_error_handler},
        {"suspend", l_suspend},
        {"wake", l_wake},
        {"interrupt", l_interrupt},
        {"is_waiting", l_is_waiting},
        {"current", l_current},
        {"stats", l_stats},
        {"list", l_list},
        {NULL, NULL},
    };
    /* every way for Lua code to get hold of the running coroutine */
    lua_getglobal(L, "coroutine");
    if (lua_istable(L, -1)) {
        lua_pushcfunction(L, l_running);
        lua_setfield(L, -2, "running");
    }
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
