/*
 * tamarco-host internals shared by the host core and the bindings.
 *
 * Error convention for every binding: argument mistakes raise a Lua error
 * (luaL_argerror / luaL_error); operations that can fail at run time return
 * `nil, message` to Lua. C helpers return 0 on success and a negative errno
 * or libuv error code on failure.
 */
#ifndef TAMARCO_HOST_H
#define TAMARCO_HOST_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <uv.h>

#include "tamarco_config.h"
/* The public C API (include/tamarco.h) declares the scheduler calls,
 * tamarco_host_of and the extension API: one definition for both. */
#include "tamarco.h"

/* The scheduler's Lua tables (host/scheduler.c). */
#define TAMARCO_SCHED_TABLES 7

/* One per OS process: the loop and the main Lua state that owns it. */
struct tamarco_host {
    uv_loop_t *loop;
    lua_State *L;          /* main state; coroutines are threads of it */
    char lua_dir[4096];    /* where the tamarco Lua modules were found */
    /* scheduler state */
    uv_idle_t ready_idle;  /* runs deferred resumes before the loop blocks */
    int ready_idle_active;
    int next_wait_id;
    int idle_tasks;        /* coroutines in the pool of tamarco_start_task */
    int sched_refs[TAMARCO_SCHED_TABLES];   /* registry refs of the scheduler's tables */
    lua_State *running_task;   /* the task tamarco_resume runs now, or NULL */
    /* what each pending wait is for (see tamarco_wait_note) */
    struct tamarco_wait_note *wait_notes;
    int wait_notes_cap;    /* a power of two, or 0 */
    int wait_notes_count;
    struct tamarco_signals *signals;   /* signals.c; NULL until Lua listens to one */
};

/* What a pending wait is for, for live introspection (/debug/tasks): kept in
 * an open-addressing table by wait id, filled by tamarco_wait_begin (kind
 * "io", since = the loop's clock) and completed by the binding with
 * tamarco_wait_note. No allocation per wait once the table has grown to the
 * number of concurrent waits. */
#define TAMARCO_WAIT_DETAIL_MAX 160
struct tamarco_wait_note {
    int id;                /* 0: free slot */
    const char *kind;      /* a static string: "sleep", "redis", "http", ... */
    double since_ms;       /* the loop's clock when the wait began */
    double deadline_ms;    /* when it ends by itself (sleep), or 0 */
    tamarco_cancel_fn cancel;   /* what tamarco_wait_begin was given */
    void *cancel_ud;
    char detail[TAMARCO_WAIT_DETAIL_MAX];
};


/* The host when L is the task the scheduler is running now, else NULL: the
 * quick answer of tamarco_host_of for a binding called by a task. */
tamarco_host *tamarco_host_of_running_task(lua_State *L);
/* Initialises the scheduler's handles on host->loop; host->L must be set. */
int tamarco_scheduler_init(tamarco_host *host);
/* At exit: cancels every pending wait (their operations release what they
 * hold) without resuming the waiting coroutines. */
void tamarco_scheduler_shutdown(tamarco_host *host);
/* Yields the running task until the next loop turn (after I/O is polled):
 * `return tamarco_yield_turn(L);` — sleep(0) uses it, so a task looping on
 * sleep(0) lets timers, I/O and new tasks run. */
int tamarco_yield_turn(lua_State *L);

/* ---- loop.c, watchdog.c: the process's loop and its end ---- */

/* uv_run on the host's loop; returns whether handles are still alive. */
int tamarco_loop_run(tamarco_host *host, uv_run_mode mode);
/* Makes the running tamarco_loop_run return after this turn. */
void tamarco_loop_stop(tamarco_host *host);
/* Ends the process (exit code 1, message on stderr) after `seconds` unless
 * it exits before. Returns 0 or an errno value. */
int tamarco_watchdog_start(double seconds, const char *message);

/* ---- signals.c: the process's signals, delivered to Lua through the scheduler ---- */

/* The signals Lua can listen to are named "SIGHUP", "SIGINT", ...: the
 * index of `name` among them (`sig` below), or -1; tamarco_signal_names()
 * lists them for an error message. */
int tamarco_signal_find(const char *name);
const char *tamarco_signal_names(void);
/* Runs the function at fn_index as a new task, with the signal's name, at
 * every delivery of `sig` until tamarco_signal_unlisten. Returns the
 * listener's id (> 0) or a negative libuv error. */
int tamarco_signal_listen(tamarco_host *host, lua_State *L, int sig, int fn_index);
void tamarco_signal_unlisten(tamarco_host *host, int sig, int listener_id);
/* Suspends the running task (L must be one: check it first) until one of
 * the n signals arrives; the task gets its name.
 * `return tamarco_signal_wait(L, sigs, n);` */
int tamarco_signal_wait(lua_State *L, const int *sigs, int n);
/* At exit, after tamarco_scheduler_shutdown: closes the signal handles. */
void tamarco_signals_close(tamarco_host *host);

/* ---- lua_state.c ---- */

/* Creates a Lua state with the standard libraries, the host's module paths
 * and every binding preloaded under "tamarco.c.<topic>". Used for the main
 * state and for each `thread` state. Returns NULL on allocation failure. */
lua_State *tamarco_state_new(const char *lua_dir);

/* Finds the directory holding tamarco/init.lua (installed or build tree).
 * Returns 0, or -1 when no candidate holds the modules. */
int tamarco_find_lua_dir(char *out, size_t size);

/* tamarco_host_of(L): see tamarco.h. */
void tamarco_host_attach(tamarco_host *host, lua_State *L);

/* ---- bytecode_cache.c ---- */

/* Loads the framework's modules from LuaJIT bytecode in cache_dir when it is
 * usable (see bytecode_cache.c); 1 when installed, 0 when not. */
int tamarco_bytecode_cache_install(lua_State *L, const char *cache_dir, int read_only);

/* ---- scheduler.c: the only place that resumes coroutines ---- */

/* tamarco_wait_begin, tamarco_in_task, tamarco_wait_yield, tamarco_wake and
 * tamarco_start_task are declared (and documented) in tamarco.h. A binding
 * that starts an I/O on behalf of the running coroutine calls
 * tamarco_wait_begin, starts the operation with the returned id and then
 * `return tamarco_wait_yield(L);`. */

/* Resumes coroutine `co` (a thread of host->L) with `nargs` values already on
 * its stack. Logs errors with their traceback through the Lua error handler
 * and calls the coroutine's exit callback when it finishes. */
int tamarco_resume(tamarco_host *host, lua_State *co, int nargs);

int luaopen_tamarco_c_scheduler(lua_State *L);

/* ---- bindings (one file per topic in bindings/) ----
 * Bindings linked into the host are preloaded (host/lua_state.c); those with
 * heavy libraries (http_client: libcurl) are loadable modules, see
 * TAMARCO_LOADABLE_BINDINGS in CMakeLists.txt. */
int luaopen_tamarco_c_timer(lua_State *L);
int luaopen_tamarco_c_yaml(lua_State *L);
int luaopen_tamarco_c_thread(lua_State *L);
int luaopen_tamarco_c_log(lua_State *L);
int luaopen_tamarco_c_log_udp(lua_State *L);
int luaopen_tamarco_c_process(lua_State *L);
int luaopen_tamarco_c_codec(lua_State *L);
int luaopen_tamarco_c_http_server(lua_State *L);
int luaopen_tamarco_c_metrics(lua_State *L);
int luaopen_tamarco_c_introspect(lua_State *L);
int luaopen_tamarco_c_backoff(lua_State *L);
/* bindings/native.c: the native API's Lua side (tamarco.native) */
int luaopen_tamarco_c_native(lua_State *L);

/* ---- native_api.c: the public API's mailbox and tickets ---- */

/* Opens the mailbox tamarco_log and tamarco_wake_ticket post to, on
 * host's loop, and the ticket table. Returns 0 or a libuv error. */
int tamarco_native_init(tamarco_host *host);
/* 1 once tamarco_native_init succeeded. */
int tamarco_native_ready(void);
/* A new ticket number (> 0) for tamarco_wake_ticket. */
int tamarco_native_new_ticket(void);
/* Makes tamarco_wake_ticket(ticket, ...) wake the wait wait_id. */
void tamarco_native_bind_ticket(lua_State *L, int ticket, int wait_id);

/* ---- test_probe.c ---- */

/* offload_sleep(ms) -> off_loop_thread, overlapping (tamarco.c.native). */
int tamarco_probe_offload_sleep(lua_State *L);

#endif
