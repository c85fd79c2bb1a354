/*
 * tamarco.h — the public C API of tamarco-host, for C extensions.
 *
 * A C extension is either
 *   - a Lua C module: a shared object exporting `int luaopen_<name>(lua_State *L)`,
 *     put next to a service (`<dir>/<name>.so` or `<dir>/build/<name>.so`) and
 *     loaded with `require "<name>"` (no environment variable needed), or
 *   - a plain shared library called through LuaJIT's FFI.
 * Both are built with CMake: `find_package(TamarcoHost)` then
 * `tamarco_add_extension(<name> SOURCES ...)` (see `tamarco-host new service
 * NAME --with-c-extension`). Extensions are not linked against the host: the
 * host binary exports every function below (and the Lua C API), and the
 * dynamic linker resolves them when the host loads the extension.
 *
 * Every exported function has the prefix `tamarco_`. The functions marked
 * [FFI] take no lua_State and are safe to call through LuaJIT's FFI and from
 * any OS thread; the others are for Lua C modules and must be called on the
 * loop's thread, from a C function Lua called.
 *
 * The host runs one libuv loop per process. Every task, timer tick and
 * request handler is a coroutine of the main Lua state; a C function called
 * by such a coroutine may suspend it while an operation completes:
 *
 *     static int l_my_read(lua_State *L) {
 *         my_req *req = ...;
 *         req->host = tamarco_host_of(L);
 *         req->wait_id = tamarco_wait_begin(L, my_cancel, req);  // raises outside a task
 *         start_operation(req);                                  // completes later on the loop
 *         return tamarco_wait_yield(L);
 *     }
 *     static int push_result(lua_State *co, void *ud) { lua_pushstring(co, ...); return 1; }
 *     static void on_done(my_req *req) {             // a libuv callback, on the loop
 *         tamarco_wake(req->host, req->wait_id, push_result, req);
 *     }
 *
 * CPU-heavy work goes to libuv's thread pool with tamarco_offload, so it
 * never blocks the loop:
 *
 *     static void work(void *ud) { job *j = ud; j->out = crunch(j->in); }        // pool thread
 *     static int done(lua_State *co, void *ud) {                                  // loop thread
 *         job *j = ud; int n = 0;
 *         if (co) { lua_pushinteger(co, j->out); n = 1; }
 *         free(j);
 *         return n;
 *     }
 *     static int l_crunch(lua_State *L) { job *j = ...; return tamarco_offload(L, work, done, j); }
 *
 * Error convention: functions returning int return 0 (or a count) on success
 * and a negative errno / libuv error code on failure.
 */
#ifndef TAMARCO_H
#define TAMARCO_H

#include <stddef.h>

#include <lua.h>
#include <uv.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define TAMARCO_API __attribute__((visibility("default")))
#else
#define TAMARCO_API
#endif

/* The API version: bumped when a declaration below changes incompatibly. */
#define TAMARCO_API_VERSION 1

/* ---- the host ---- */

/* The host of a Lua state's main state; opaque to extensions. */
typedef struct tamarco_host tamarco_host;

/* The host's version string, e.g. "0.1.0". [FFI] */
TAMARCO_API const char *tamarco_version(void);

/* The process's libuv loop (the one every task runs on). Use it to start
 * libuv operations from an extension; their callbacks run on the loop's
 * thread. [FFI] (the pointer; libuv calls themselves are loop-thread only) */
TAMARCO_API uv_loop_t *tamarco_loop(void);

/* The host of L (a task's coroutine or the main state), or NULL in a
 * `svc:thread` state, which has no loop of the host's. */
TAMARCO_API tamarco_host *tamarco_host_of(lua_State *L);

/* ---- logging ---- */

/* Levels, as Python's logging (and Tamarco's records). */
enum {
    TAMARCO_LOG_DEBUG = 10,
    TAMARCO_LOG_INFO = 20,
    TAMARCO_LOG_WARNING = 30,
    TAMARCO_LOG_ERROR = 40,
    TAMARCO_LOG_CRITICAL = 50
};

/* Emits a log record `message` from logger `logger` (NULL: "native") at
 * `level` through the service's logging (its sinks, its level, its
 * service_name/instance fields). The record is queued and emitted on the
 * loop's next turn, so this never calls into Lua and is safe from any
 * thread. Before the host's logging is up, the line goes to stderr.
 * Returns 0, or -ENOMEM. [FFI] */
TAMARCO_API int tamarco_log(int level, const char *logger, const char *message);

/* ---- suspending and resuming coroutines (Lua C modules) ---- */

typedef void (*tamarco_cancel_fn)(void *ud);
typedef int (*tamarco_push_fn)(lua_State *co, void *ud);

/* 1 when L is a task's coroutine (so it may wait), else 0. */
TAMARCO_API int tamarco_in_task(lua_State *L);

/* Registers a wait for the running task and returns its id (> 0). Raises a
 * Lua error when L is not a task. Then start the operation and end the C
 * function with `return tamarco_wait_yield(L);`. `cancel` (may be NULL) is
 * called with `ud` if the wait is interrupted (the task is cancelled, the
 * host shuts down): it must stop the operation or make its completion
 * tolerate a stale id (tamarco_wake then returns 0). */
TAMARCO_API int tamarco_wait_begin(lua_State *L, tamarco_cancel_fn cancel, void *ud);
/* Yields the running task until tamarco_wake completes its wait; returns
 * (to Lua) the values pushed by the wake's `push`. Use only as the `return`
 * of the C function that called tamarco_wait_begin. */
TAMARCO_API int tamarco_wait_yield(lua_State *L);

/* Describes wait `wait_id` (just returned by tamarco_wait_begin) for live
 * introspection (/debug/tasks): `kind` must be a static string ("redis",
 * "http", ...); `detail` (may be NULL) is copied, truncated to 159 bytes; a
 * deadline_ms > 0 is the loop time at which the wait ends by itself. */
TAMARCO_API void tamarco_wait_note(tamarco_host *host, int wait_id, const char *kind, const char *detail,
                                   double deadline_ms);

/* Completes wait `wait_id` on the loop's thread: `push` (may be NULL) pushes
 * the values the suspended call returns onto the coroutine and returns their
 * count, then the coroutine is resumed at once. Returns 1 if resumed, 0 if
 * the wait is no longer pending (then push is not called). */
TAMARCO_API int tamarco_wake(tamarco_host *host, int wait_id, tamarco_push_fn push, void *ud);

/* Starts the function on the main state's stack (below its `nargs`
 * arguments, popped with it) as a new task at once. Only from loop
 * callbacks, never from inside a task. Returns 0, or -1 if it failed (the
 * error is logged). */
TAMARCO_API int tamarco_start_task(tamarco_host *host, int nargs);

/* [FFI] Resumes, from any thread, a task suspended in Lua by
 * `require("tamarco.core.native").wait(function(ticket) ... end)`: that call
 * returns `data` (a Lua string of `len` bytes; NULL: nil) when ok != 0, or
 * `nil, data` when ok == 0. The resume happens on the loop's next turn.
 * Returns 0, -ENOMEM, or -ENOENT before the host's native module is loaded.
 * A ticket that is no longer waiting is ignored. */
TAMARCO_API int tamarco_wake_ticket(int ticket, int ok, const char *data, size_t len);

/* ---- offloading CPU work to libuv's thread pool ---- */

/* Runs on a thread-pool thread: no Lua, no loop calls. */
typedef void (*tamarco_work_fn)(void *ud);
/* Runs on the loop's thread after work: pushes the results onto `co` and
 * returns their count. Called exactly once per offload; `co` is NULL when
 * the task stopped waiting (cancelled, host shutting down) — then only
 * release `ud` and return 0. */
typedef int (*tamarco_done_fn)(lua_State *co, void *ud);

/* Runs work(ud) on libuv's thread pool while the calling task yields, then
 * done(co, ud) pushes its results and the task resumes with them. Use as
 * `return tamarco_offload(L, work, done, ud);` from a lua_CFunction. Raises
 * a Lua error when L is not a task (`done(NULL, ud)` is called first, so ud
 * is never leaked). The pool has UV_THREADPOOL_SIZE threads (libuv's
 * default 4) shared with file-system and DNS work. */
TAMARCO_API int tamarco_offload(lua_State *L, tamarco_work_fn work, tamarco_done_fn done, void *ud);

/* ---- operation ---- */

/* Sends `state` (e.g. "READY=1", "STOPPING=1", "STATUS=...") to systemd's
 * $NOTIFY_SOCKET as one datagram (sd_notify(3) without libsystemd).
 * Returns 1 when sent, 0 when NOTIFY_SOCKET is not set, or -errno. [FFI] */
TAMARCO_API int tamarco_sd_notify(const char *state);

/* Keeps the shared object that contains `symbol` (pass any function of your
 * module, e.g. its luaopen_*) mapped until the process ends, even after the
 * Lua state that loaded it closes: libuv handles and threads of the module
 * may still run its code while the host shuts down. */
TAMARCO_API void tamarco_keep_loaded(const void *symbol);

#ifdef __cplusplus
}
#endif

#endif
