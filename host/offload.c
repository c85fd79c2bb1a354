/*
 * tamarco_offload (include/tamarco.h): CPU work on libuv's thread pool while
 * the calling task yields.
 *
 *   loop thread                 pool thread
 *   tamarco_offload ──queue──▶  work(ud)
 *   (task yields)                  │
 *   after_work ◀───────────────────┘
 *     tamarco_wake → done(co, ud) pushes results → task resumes
 *
 * Cancellation (task cancelled, host shutting down): uv_cancel removes the
 * request if no thread has picked it up yet; otherwise work runs to its end.
 * Either way after_work then calls done(NULL, ud) so that ud is released,
 * and the task is not resumed.
 */
#include "host.h"

#include <stdlib.h>

typedef struct offload_req {
    uv_work_t work;
    tamarco_host *host;
    int wait_id;
    int cancelled;
    int done_called;
    tamarco_work_fn work_fn;
    tamarco_done_fn done_fn;
    void *ud;
} offload_req;

static void run_work(uv_work_t *work)
{
    offload_req *req = work->data;
    req->work_fn(req->ud);
}

static int push_results(lua_State *co, void *ud)
{
    offload_req *req = ud;
    req->done_called = 1;
    return req->done_fn(co, req->ud);
}

static void after_work(uv_work_t *work, int status)
{
    offload_req *req = work->data;
    if (status == 0 && !req->cancelled)
        tamarco_wake(req->host, req->wait_id, push_results, req);
    if (!req->done_called)
        req->done_fn(NULL, req->ud);
    free(req);
}

static void cancel_offload(void *ud)
{
    offload_req *req = ud;
    req->cancelled = 1;
    /* fails with UV_EBUSY once a pool thread runs it: after_work still comes */
    uv_cancel((uv_req_t *)&req->work);
}

TAMARCO_API int tamarco_offload(lua_State *L, tamarco_work_fn work, tamarco_done_fn done, void *ud)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host || !tamarco_in_task(L)) {
        if (done)
            done(NULL, ud);
        return luaL_error(L, host ? "tamarco_offload yields: call it inside a task, hook or handler"
                                  : "tamarco_offload is only available on the service's main state");
    }
    if (!work || !done)
        return luaL_error(L, "tamarco_offload: work and done functions are required");
    offload_req *req = calloc(1, sizeof *req);
    if (!req) {
        done(NULL, ud);
        return luaL_error(L, "tamarco_offload: out of memory");
    }
    req->host = host;
    req->work_fn = work;
    req->done_fn = done;
    req->ud = ud;
    req->work.data = req;
    int rc = uv_queue_work(host->loop, &req->work, run_work, after_work);
    if (rc != 0) {
        free(req);
        done(NULL, ud);
        return luaL_error(L, "tamarco_offload: %s", uv_strerror(rc));
    }
    req->wait_id = tamarco_wait_begin(L, cancel_offload, req);
    tamarco_wait_note(req->host, req->wait_id, "offload", NULL, 0);
    return tamarco_wait_yield(L);
}
