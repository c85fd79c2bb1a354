/*
 * tamarco.c.redis: Redis connections through hiredis's async API on the
 * host's loop. Thin: connect, send a command, yield the task, map the
 * reply; reconnect, AUTH/SELECT and pub/sub policy live in
 * lua/tamarco/resources/redis.lua. The Lua API, reply mapping, the C
 * state's life cycle and the hiredis 0.14 adapter fix:
 * docs/internals/redis.md.
 */
#include "host.h"
#include "lua_class.h"
#include "task_guard.h"

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libuv.h>

#include <arpa/inet.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Built as a loadable module (see TAMARCO_LOADABLE_BINDINGS in CMakeLists). */
int luaopen_tamarco_c_redis(lua_State *L);

#define CONN_MT "tamarco.c.redis.conn"
#define STACK_ARGS 16
#define DEFAULT_CONNECT_TIMEOUT_MS 5000

enum { ST_CONNECTING, ST_CONNECTED, ST_LOST, ST_CLOSED };

typedef struct rconn {
    tamarco_host *host;
    redisAsyncContext *ac;     /* NULL once hiredis has released it */
    int state;
    int busy;                  /* > 0 while our code below may still touch it */
    int collected;             /* the userdata is gone */
    int pending;               /* commands awaiting replies */
    int write_queued;          /* in the per-turn write list */
    int flushing;              /* written from that list right now */
    /* while connecting */
    int connect_wait;          /* wait id of the connecting task, 0 if none */
    int connect_result;        /* 0 pending, 1 connected, -1 failed */
    int self_ref;              /* the userdata, so that connect can return it */
    uv_timer_t *timer;         /* connect timeout; own allocation */
    uv_getaddrinfo_t *resolve; /* own allocation; data = this while ours */
    int port;
    unsigned timeout_ms;
    /* Lua callbacks (registry refs) */
    int on_message_ref;
    int on_disconnect_ref;
    char error[256];
} rconn;

/* > 0 while one of our Lua entry points runs hiredis code that may call
 * back (close, __gc, cancel): tasks are then woken on the next turn. */
static int api_depth;
/* Set when the main state closes: no more calls into Lua. It is set by the
 * finalizer of a userdata anchored in the registry (STATE_END_KEY), which
 * only runs from lua_close. It must not hang off the module table: require
 * can load this module more than once in one state (busted's insulation,
 * reload or any code that clears package.loaded), and collecting an old
 * module table would otherwise silence every later connect and reply. */
static int state_closing;
#define STATE_END_KEY "tamarco.c.redis.state_end"

/* ---- failures delivered on the next loop turn ---- */

typedef struct deferred_fail {
    int wait_id;
    char *message;
} deferred_fail;

static struct {
    tamarco_host *host;
    uv_idle_t idle;
    int initialised;
    deferred_fail *items;
    int count, cap;
} deferred;

static int push_connection_error(lua_State *co, void *ud)
{
    lua_pushnil(co);
    lua_pushstring(co, (const char *)ud);
    lua_pushliteral(co, "connection");
    return 3;
}

static void run_deferred(uv_idle_t *idle)
{
    deferred_fail *items = deferred.items;
    int count = deferred.count;
    deferred.items = NULL;
    deferred.count = deferred.cap = 0;
    uv_idle_stop(idle);
    for (int i = 0; i < count; i++) {
        if (!state_closing)
            tamarco_wake(deferred.host, items[i].wait_id, push_connection_error, items[i].message);
        free(items[i].message);
    }
    free(items);
}

static void defer_fail(tamarco_host *host, int wait_id, const char *message)
{
    if (!deferred.initialised) {
        if (uv_idle_init(host->loop, &deferred.idle) != 0)
            return;
        deferred.initialised = 1;
        deferred.host = host;
    }
    if (deferred.count == deferred.cap) {
        int cap = deferred.cap ? deferred.cap * 2 : 16;
        deferred_fail *items = realloc(deferred.items, (size_t)cap * sizeof *items);
        if (!items)
            return;   /* the task stays suspended until cancelled */
        deferred.items = items;
        deferred.cap = cap;
    }
    deferred.items[deferred.count].wait_id = wait_id;
    deferred.items[deferred.count].message = strdup(message);
    deferred.count++;
    uv_idle_start(&deferred.idle, run_deferred);
}

/* ---- the adapter fix (see the header comment) ---- */

static void maybe_free(rconn *rc);   /* below, with the connection state */

static void poll_cb(uv_poll_t *handle, int status, int events)
{
    redisLibuvEvents *p = handle->data;
    int ev = status ? p->events : events;
    if (p->context != NULL && (ev & UV_READABLE))
        redisAsyncHandleRead(p->context);
    if (p->context != NULL && (ev & UV_WRITABLE))
        redisAsyncHandleWrite(p->context);
}

/* uv_poll_start takes the fd out of epoll and puts it back (two epoll_ctl
 * calls), so the watched events are only changed when they differ. */
static void set_poll(redisLibuvEvents *p, int events)
{
    if (events == p->events)
        return;
    p->events = events;
    if (events)
        uv_poll_start(&p->handle, events, poll_cb);
    else
        uv_poll_stop(&p->handle);
}

static void add_read(void *data) { redisLibuvEvents *p = data; set_poll(p, p->events | UV_READABLE); }
static void del_read(void *data) { redisLibuvEvents *p = data; set_poll(p, p->events & ~UV_READABLE); }
static void del_write(void *data) { redisLibuvEvents *p = data; set_poll(p, p->events & ~UV_WRITABLE); }

/* ---- writes: one per connection and loop turn ----
 *
 * hiredis asks for "writable" after every command it queues. Waiting for
 * epoll to say so costs a loop turn and epoll_ctl calls per batch; instead
 * a connected context is written from a prepare handle, once per loop turn
 * just before the loop waits for I/O, with every command queued in the turn
 * in one write(2). Only a write the kernel does not take whole (hiredis
 * asks again from inside the flush) waits for "writable". */
static struct {
    uv_prepare_t prepare;
    int initialised;
    rconn **items;       /* connections with commands to write; NULL: gone */
    int count, cap;
} flushes;

static void unqueue_flush(rconn *rc)
{
    if (!rc->write_queued)
        return;
    for (int i = 0; i < flushes.count; i++)
        if (flushes.items[i] == rc)
            flushes.items[i] = NULL;
    rc->write_queued = 0;
}

static void run_flushes(uv_prepare_t *prepare)
{
    /* by index: a flush that fails wakes tasks, which may queue more */
    for (int i = 0; i < flushes.count; i++) {
        rconn *rc = flushes.items[i];
        if (!rc)
            continue;
        flushes.items[i] = NULL;
        rc->write_queued = 0;
        if (!rc->ac)
            continue;
        rc->busy++;
        rc->flushing = 1;
        redisAsyncHandleWrite(rc->ac);
        rc->flushing = 0;
        rc->busy--;
        maybe_free(rc);
    }
    flushes.count = 0;
    uv_prepare_stop(prepare);
}

/* 0, or -1 when the connection must wait for "writable" instead. */
static int queue_flush(rconn *rc)
{
    if (rc->write_queued)
        return 0;
    if (!flushes.initialised) {
        if (uv_prepare_init(rc->host->loop, &flushes.prepare) != 0)
            return -1;
        uv_unref((uv_handle_t *)&flushes.prepare);
        flushes.initialised = 1;
    }
    if (flushes.count == flushes.cap) {
        int cap = flushes.cap ? flushes.cap * 2 : 8;
        rconn **items = realloc(flushes.items, (size_t)cap * sizeof *items);
        if (!items)
            return -1;
        flushes.items = items;
        flushes.cap = cap;
    }
    flushes.items[flushes.count++] = rc;
    rc->write_queued = 1;
    uv_prepare_start(&flushes.prepare, run_flushes);
    return 0;
}

static void add_write(void *data)
{
    redisLibuvEvents *p = data;
    redisAsyncContext *ac = p->context;
    rconn *rc = ac ? ac->data : NULL;
    /* while connecting, "writable" is how hiredis learns the connect ended */
    if (rc && !rc->flushing && (ac->c.flags & REDIS_CONNECTED) && queue_flush(rc) == 0)
        return;
    set_poll(p, p->events | UV_WRITABLE);
}

static int attach(redisAsyncContext *ac, uv_loop_t *loop)
{
    if (redisLibuvAttach(ac, loop) != REDIS_OK)
        return -1;
    ac->ev.addRead = add_read;
    ac->ev.delRead = del_read;
    ac->ev.addWrite = add_write;
    ac->ev.delWrite = del_write;
    return 0;
}

/* ---- connection state ---- */

static void unref(rconn *rc, int *ref)
{
    if (*ref != LUA_NOREF && *ref != LUA_REFNIL && !state_closing)
        luaL_unref(rc->host->L, LUA_REGISTRYINDEX, *ref);
    *ref = LUA_NOREF;
}

static void maybe_free(rconn *rc)
{
    if (rc->collected && rc->ac == NULL && rc->busy == 0 && rc->timer == NULL && rc->resolve == NULL) {
        unqueue_flush(rc);
        free(rc);
    }
}

static void set_error(rconn *rc, const char *prefix, const char *detail)
{
    snprintf(rc->error, sizeof rc->error, "%s%s%s%s", prefix, detail ? " (" : "",
             detail ? detail : "", detail ? ")" : "");
}

/* Frees the hiredis context from a Lua entry point. Pending commands fail
 * on the next loop turn; a connected context calls on_disconnect. */
static void drop_context(rconn *rc)
{
    redisAsyncContext *ac = rc->ac;
    if (!ac)
        return;
    int connected = (ac->c.flags & REDIS_CONNECTED) != 0;
    int in_callback = (ac->c.flags & REDIS_IN_CALLBACK) != 0;
    rc->busy++;
    api_depth++;
    redisAsyncFree(ac);
    api_depth--;
    rc->busy--;
    /* A context that never connected is freed at once without a disconnect
     * callback; one freed from inside its own callback goes later. */
    if (!connected && !in_callback)
        rc->ac = NULL;
}

static void free_on_close(uv_handle_t *handle)
{
    free(handle);
}

static void stop_timer(rconn *rc)
{
    if (rc->timer) {
        uv_timer_stop(rc->timer);
        uv_close((uv_handle_t *)rc->timer, free_on_close);
        rc->timer = NULL;
    }
}

static void stop_resolve(rconn *rc)
{
    if (rc->resolve) {
        rc->resolve->data = NULL;   /* its callback only frees it now */
        uv_cancel((uv_req_t *)rc->resolve);
        rc->resolve = NULL;
    }
}

static int push_connected(lua_State *co, void *ud)
{
    rconn *rc = ud;
    lua_rawgeti(co, LUA_REGISTRYINDEX, rc->self_ref);
    return 1;
}

static int push_connect_error(lua_State *co, void *ud)
{
    rconn *rc = ud;
    lua_pushnil(co);
    lua_pushstring(co, rc->error);
    return 2;
}

/* Ends a connect: wakes the connecting task with the conn or nil, error.
 * Only from loop callbacks (timer, resolver), never from inside hiredis. */
static void finish_connect(rconn *rc)
{
    stop_timer(rc);
    stop_resolve(rc);
    int wait_id = rc->connect_wait;
    rc->connect_wait = 0;
    rc->busy++;
    if (rc->connect_result > 0 && rc->ac) {
        rc->state = ST_CONNECTED;
        if (wait_id && !state_closing)
            tamarco_wake(rc->host, wait_id, push_connected, rc);
    } else {
        if (rc->ac)
            drop_context(rc);
        rc->state = ST_CLOSED;
        unref(rc, &rc->on_disconnect_ref);
        if (wait_id && !state_closing)
            tamarco_wake(rc->host, wait_id, push_connect_error, rc);
    }
    rc->busy--;
    unref(rc, &rc->self_ref);
    maybe_free(rc);
}

static void on_connect_timer(uv_timer_t *timer)
{
    rconn *rc = timer->data;
    if (rc->connect_result == 0) {
        rc->connect_result = -1;
        char detail[64];
        snprintf(detail, sizeof detail, "%u ms", rc->timeout_ms);
        set_error(rc, "connect timeout", detail);
    }
    finish_connect(rc);
}

/* hiredis: the connect completed. The result is handed to the connect
 * timer (restarted at 0 ms), so the task resumes outside hiredis. */
static void on_connect(const redisAsyncContext *ac, int status)
{
    rconn *rc = ac->data;
    if (status == REDIS_OK) {
        if (rc->connect_result == 0)   /* else cancelled: finish drops it */
            rc->connect_result = 1;
    } else {
        if (rc->connect_result == 0) {
            rc->connect_result = -1;
            set_error(rc, ac->errstr[0] ? ac->errstr : "connect failed", NULL);
        }
        rc->ac = NULL;   /* hiredis frees it after this callback */
    }
    if (rc->timer) {
        uv_timer_stop(rc->timer);
        uv_timer_start(rc->timer, on_connect_timer, 0, 0);
    }
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    rconn *rc = ac->data;
    rc->ac = NULL;
    if (rc->state == ST_CONNECTING) {
        /* connected but not yet handed to the task: the timer reports it */
        rc->connect_result = -1;
        set_error(rc, "connection lost", ac->errstr[0] ? ac->errstr : NULL);
        return;
    }
    if (rc->state != ST_CONNECTED) {
        maybe_free(rc);   /* closed or collected by us, maybe from a callback */
        return;
    }
    rc->state = ST_LOST;
    set_error(rc, "connection lost", ac->errstr[0] ? ac->errstr : "server closed the connection");
    rc->busy++;
    if (rc->on_disconnect_ref != LUA_NOREF && !state_closing) {
        lua_State *L = rc->host->L;
        lua_rawgeti(L, LUA_REGISTRYINDEX, rc->on_disconnect_ref);
        lua_pushstring(L, rc->error);
        unref(rc, &rc->on_disconnect_ref);
        unref(rc, &rc->on_message_ref);
        tamarco_start_task(rc->host, 1);
    }
    unref(rc, &rc->on_disconnect_ref);
    unref(rc, &rc->on_message_ref);
    rc->busy--;
    maybe_free(rc);
}

static int start_connect(rconn *rc, const char *ip)
{
    redisAsyncContext *ac = redisAsyncConnect(ip, rc->port);
    if (!ac) {
        set_error(rc, "out of memory", NULL);
        return -1;
    }
    if (ac->err) {
        set_error(rc, ac->errstr, NULL);
        redisAsyncFree(ac);
        return -1;
    }
    ac->data = rc;
    if (attach(ac, rc->host->loop) != 0) {
        set_error(rc, "cannot watch the socket", NULL);
        redisAsyncFree(ac);
        return -1;
    }
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    rc->ac = ac;
    return 0;
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    rconn *rc = req->data;
    if (!rc) {   /* abandoned (timeout, cancel) */
        if (res)
            uv_freeaddrinfo(res);
        free(req);
        return;
    }
    rc->resolve = NULL;
    free(req);
    char ip[64] = "";
    if (status == 0 && res) {
        if (res->ai_family == AF_INET6)
            uv_ip6_name((struct sockaddr_in6 *)res->ai_addr, ip, sizeof ip);
        else
            uv_ip4_name((struct sockaddr_in *)res->ai_addr, ip, sizeof ip);
    }
    if (res)
        uv_freeaddrinfo(res);
    if (status != 0) {
        rc->connect_result = -1;
        set_error(rc, "cannot resolve the host", uv_strerror(status));
        finish_connect(rc);
    } else if (start_connect(rc, ip) != 0) {
        rc->connect_result = -1;
        finish_connect(rc);
    }
}

/* scheduler: the connecting task was interrupted (or the host shuts down). */
static void cancel_connect(void *ud)
{
    rconn *rc = ud;
    rc->connect_wait = 0;
    rc->connect_result = -1;
    set_error(rc, "cancelled", NULL);
    /* finish_connect from the timer, outside this Lua call */
    if (rc->timer) {
        uv_timer_stop(rc->timer);
        uv_timer_start(rc->timer, on_connect_timer, 0, 0);
    }
}

static rconn *check_conn(lua_State *L)
{
    rconn **ud = luaL_checkudata(L, 1, CONN_MT);
    if (!*ud)
        luaL_argerror(L, 1, "redis connection already collected");
    return *ud;
}

/* connect(host, port[, options]) -> conn | nil, message */
static int l_connect(lua_State *L)
{
    const char *host_name = luaL_checkstring(L, 1);
    int port = (int)luaL_checkinteger(L, 2);
    luaL_argcheck(L, port > 0 && port < 65536, 2, "port must be in 1..65535");
    double timeout_ms = DEFAULT_CONNECT_TIMEOUT_MS;
    int has_on_disconnect = 0;
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "connect_timeout_ms");
        if (!lua_isnil(L, -1)) {
            timeout_ms = luaL_checknumber(L, -1);
            luaL_argcheck(L, timeout_ms > 0, 3, "connect_timeout_ms must be > 0");
        }
        lua_pop(L, 1);
        lua_getfield(L, 3, "on_disconnect");
        if (!lua_isnil(L, -1)) {
            luaL_argcheck(L, lua_isfunction(L, -1), 3, "on_disconnect must be a function");
            has_on_disconnect = 1;
        }
        /* left on the stack at index 4 (or nil) */
    } else {
        lua_settop(L, 3);
        lua_pushnil(L);
    }
    tamarco_host *host = tamarco_check_host(L, "redis");
    tamarco_check_task(L, "redis connect");

    rconn *rc = calloc(1, sizeof *rc);
    if (!rc)
        return luaL_error(L, "out of memory");
    rc->host = host;
    rc->state = ST_CONNECTING;
    rc->port = port;
    rc->timeout_ms = (unsigned)timeout_ms;
    rc->self_ref = rc->on_message_ref = rc->on_disconnect_ref = LUA_NOREF;
    rconn **ud = lua_newuserdata(L, sizeof *ud);
    *ud = rc;
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
    int ud_index = lua_gettop(L);
    if (has_on_disconnect) {
        lua_pushvalue(L, 4);
        rc->on_disconnect_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }

    unsigned char buf[sizeof(struct in6_addr)];
    int literal = inet_pton(AF_INET, host_name, buf) == 1 || inet_pton(AF_INET6, host_name, buf) == 1;
    if (literal) {
        if (start_connect(rc, host_name) != 0) {
            rc->state = ST_CLOSED;
            unref(rc, &rc->on_disconnect_ref);
            lua_pushnil(L);
            lua_pushstring(L, rc->error);
            return 2;   /* the userdata's __gc frees rc */
        }
    } else {
        uv_getaddrinfo_t *req = malloc(sizeof *req);
        if (!req)
            return luaL_error(L, "out of memory");
        req->data = rc;
        struct addrinfo hints;
        memset(&hints, 0, sizeof hints);
        hints.ai_family = AF_UNSPEC;
        hints.ai_socktype = SOCK_STREAM;
        int rv = uv_getaddrinfo(host->loop, req, on_resolved, host_name, NULL, &hints);
        if (rv != 0) {
            free(req);
            rc->state = ST_CLOSED;
            unref(rc, &rc->on_disconnect_ref);
            set_error(rc, "cannot resolve the host", uv_strerror(rv));
            lua_pushnil(L);
            lua_pushstring(L, rc->error);
            return 2;
        }
        rc->resolve = req;
    }
    uv_timer_t *timer = malloc(sizeof *timer);
    if (!timer || uv_timer_init(host->loop, timer) != 0) {
        free(timer);
        stop_resolve(rc);
        drop_context(rc);
        rc->state = ST_CLOSED;
        unref(rc, &rc->on_disconnect_ref);
        return luaL_error(L, "out of memory");
    }
    timer->data = rc;
    rc->timer = timer;
    uv_update_time(host->loop);
    uv_timer_start(timer, on_connect_timer, (uint64_t)timeout_ms, 0);
    lua_pushvalue(L, ud_index);
    rc->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    rc->connect_wait = tamarco_wait_begin(L, cancel_connect, rc);
    tamarco_wait_note(rc->host, rc->connect_wait, "redis", "connect", 0);
    return tamarco_wait_yield(L);
}

/* ---- replies ---- */

static void push_reply(lua_State *L, const redisReply *r, int nested)
{
    luaL_checkstack(L, 4, "redis reply nested too deeply");
    switch (r->type) {
    case REDIS_REPLY_STATUS:
    case REDIS_REPLY_STRING:
        lua_pushlstring(L, r->str, r->len);
        break;
    case REDIS_REPLY_INTEGER:
        lua_pushnumber(L, (lua_Number)r->integer);
        break;
    case REDIS_REPLY_NIL:
        if (nested)
            lua_pushlightuserdata(L, NULL);
        else
            lua_pushnil(L);
        break;
    case REDIS_REPLY_ERROR:
        /* only nested errors get here: {err = message} */
        lua_createtable(L, 0, 1);
        lua_pushlstring(L, r->str, r->len);
        lua_setfield(L, -2, "err");
        break;
    case REDIS_REPLY_ARRAY:
        lua_createtable(L, (int)r->elements, 0);
        for (size_t i = 0; i < r->elements; i++) {
            push_reply(L, r->element[i], 1);
            lua_rawseti(L, -2, (int)i + 1);
        }
        break;
    default:
        lua_pushnil(L);
        break;
    }
}

static int push_top_reply(lua_State *co, void *ud)
{
    const redisReply *r = ud;
    if (r->type == REDIS_REPLY_ERROR) {
        lua_pushnil(co);
        lua_pushlstring(co, r->str, r->len);
        return 2;
    }
    push_reply(co, r, 0);
    return 1;
}

static void on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    rconn *rc = ac->data;
    int wait_id = (int)(intptr_t)privdata;   /* a command is just its wait */
    rc->pending--;
    if (state_closing)
        return;
    if (reply) {
        tamarco_wake(rc->host, wait_id, push_top_reply, reply);
        return;
    }
    /* The context is going away: lost, closed by us or collected. */
    const char *message = rc->state == ST_CONNECTED || rc->state == ST_LOST
        ? (ac->errstr[0] ? NULL : "connection lost")
        : "connection closed";
    char buf[300];
    if (!message) {
        snprintf(buf, sizeof buf, "connection lost (%s)", ac->errstr);
        message = buf;
    }
    if (api_depth > 0)
        defer_fail(rc->host, wait_id, message);
    else
        tamarco_wake(rc->host, wait_id, push_connection_error, (void *)message);
}

static int not_connected(lua_State *L, rconn *rc)
{
    lua_pushnil(L);
    if (rc->state == ST_LOST)
        lua_pushstring(L, rc->error);
    else if (rc->state == ST_CLOSED)
        lua_pushliteral(L, "connection closed");
    else
        lua_pushliteral(L, "not connected");
    lua_pushliteral(L, "connection");
    return 3;
}

/* A command's arguments are a table at 2 or the values from 2 on: leaves
 * them on the stack from *first on and returns their count (raises when
 * there is no command name). */
static int command_args(lua_State *L, int *first)
{
    int from_table = lua_type(L, 2) == LUA_TTABLE;
    int argc = from_table ? (int)lua_objlen(L, 2) : lua_gettop(L) - 1;
    if (argc < 1)
        luaL_argerror(L, 2, "a command name is required");
    if (from_table) {
        luaL_checkstack(L, argc + 4, "too many command arguments");
        lua_settop(L, 2);
        for (int i = 1; i <= argc; i++)
            lua_rawgeti(L, 2, i);
    }
    *first = from_table ? 3 : 2;
    return argc;
}

/* Collects the command's arguments (a table at 2, or the values from 2 on)
 * into argv/lens (size STACK_ARGS, or malloc'ed into *heap). */
static int collect_args(lua_State *L, const char ***argv, size_t **lens, void **heap,
                        const char **sargv, size_t *slens)
{
    int first;
    int argc = command_args(L, &first);
    *heap = NULL;
    *argv = sargv;
    *lens = slens;
    if (argc > STACK_ARGS) {
        *heap = malloc((size_t)argc * (sizeof(char *) + sizeof(size_t)));
        if (!*heap)
            luaL_error(L, "out of memory");
        *argv = *heap;
        *lens = (size_t *)((char *)*heap + (size_t)argc * sizeof(char *));
    }
    for (int i = 0; i < argc; i++) {
        int idx = first + i;
        int t = lua_type(L, idx);
        if (t != LUA_TSTRING && t != LUA_TNUMBER) {
            free(*heap);
            *heap = NULL;
            luaL_error(L, "redis command argument #%d: string or number expected, got %s",
                       i + 1, lua_typename(L, t));
        }
        (*argv)[i] = lua_tolstring(L, idx, &(*lens)[i]);
    }
    return argc;
}

/* ---- commands ----
 *
 * A command is written in RESP by us, into one buffer reused by every call,
 * and handed to hiredis already formatted (hiredis's own formatting costs
 * more than the rest of the call path in C). */

static struct {
    char *p;
    size_t cap;
} resp;

static char *resp_reserve(size_t need)
{
    if (need > resp.cap) {
        size_t cap = resp.cap ? resp.cap : 256;
        while (cap < need)
            cap *= 2;
        char *p = realloc(resp.p, cap);
        if (!p)
            return NULL;
        resp.p = p;
        resp.cap = cap;
    } else if (resp.cap > (1u << 20) && need <= 256) {
        free(resp.p);   /* do not keep a huge command's buffer */
        resp.p = NULL;
        resp.cap = 0;
        return resp_reserve(need);
    }
    return resp.p;
}

/* "<c><n>\r\n" at out; returns the bytes written. */
static size_t resp_header(char *out, char c, size_t n)
{
    char digits[24];
    size_t d = 0;
    do
        digits[d++] = (char)('0' + n % 10);
    while ((n /= 10) > 0);
    size_t len = 0;
    out[len++] = c;
    while (d > 0)
        out[len++] = digits[--d];
    out[len++] = '\r';
    out[len++] = '\n';
    return len;
}

/* The command's arguments (a table at 2, or the values from 2 on) in RESP,
 * in resp.p; returns its length. Raises on a bad argument. The arguments
 * stay on the stack, as strings, from *first on (*argc of them). */
static size_t format_command(lua_State *L, int *first_out, int *argc_out)
{
    int first;
    int argc = command_args(L, &first);
    *first_out = first;
    *argc_out = argc;
    size_t need = 24;
    for (int i = 0; i < argc; i++) {
        int t = lua_type(L, first + i);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L, "redis command argument #%d: string or number expected, got %s",
                       i + 1, lua_typename(L, t));
        size_t len;
        lua_tolstring(L, first + i, &len);   /* numbers become strings here */
        need += len + 26;
    }
    char *out = resp_reserve(need);
    if (!out)
        luaL_error(L, "out of memory");
    size_t at = resp_header(out, '*', (size_t)argc);
    for (int i = 0; i < argc; i++) {
        size_t len;
        const char *arg = lua_tolstring(L, first + i, &len);
        at += resp_header(out + at, '$', len);
        memcpy(out + at, arg, len);
        at += len;
        out[at++] = '\r';
        out[at++] = '\n';
    }
    return at;
}

/* For /debug/tasks: the command and its first argument (usually a key),
 * from the arguments format_command left on the stack. */
static void note_command(rconn *rc, int wait_id, lua_State *L, int first, int argc)
{
    char what[TAMARCO_WAIT_DETAIL_MAX];
    size_t out = 0;
    for (int part = 0; part < 2 && part < argc; part++) {
        size_t n;
        const char *data = lua_tolstring(L, first + part, &n);
        if (part)
            what[out++] = ' ';
        size_t room = sizeof what - 1 - out;
        size_t take = n < room ? n : room;
        memcpy(what + out, data, take);
        out += take;
        if (out + 2 >= sizeof what)
            break;
    }
    what[out] = '\0';
    tamarco_wait_note(rc->host, wait_id, "redis", what, 0);
}

/* conn:command(name, ...) | conn:command({name, ...}) */
static int l_command(lua_State *L)
{
    rconn *rc = check_conn(L);
    if (rc->state != ST_CONNECTED || !rc->ac)
        return not_connected(L, rc);
    if (rc->ac->c.flags & (REDIS_DISCONNECTING | REDIS_FREEING)) {
        lua_pushnil(L);
        lua_pushliteral(L, "connection lost (closing)");
        lua_pushliteral(L, "connection");
        return 3;
    }
    tamarco_check_task(L, "a redis command");
    int first, argc;
    size_t len = format_command(L, &first, &argc);
    /* no cancel function: a reply for a cancelled task finds a stale id */
    int wait_id = tamarco_wait_begin(L, NULL, NULL);
    note_command(rc, wait_id, L, first, argc);
    if (redisAsyncFormattedCommand(rc->ac, on_reply, (void *)(intptr_t)wait_id, resp.p, len) == REDIS_OK)
        rc->pending++;
    else   /* not after the checks above; the task is told on the next turn all the same */
        defer_fail(rc->host, wait_id, "connection lost (closing)");
    return tamarco_wait_yield(L);
}

/* ---- pub/sub ---- */

static void on_pubsub(redisAsyncContext *ac, void *reply, void *privdata)
{
    rconn *rc = privdata;
    redisReply *r = reply;
    if (!r || state_closing || rc->state != ST_CONNECTED || rc->on_message_ref == LUA_NOREF)
        return;
    if (r->type != REDIS_REPLY_ARRAY || r->elements < 3 || r->elements > 4)
        return;
    lua_State *L = rc->host->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, rc->on_message_ref);
    for (size_t i = 0; i < r->elements; i++)
        push_reply(L, r->element[i], 1);
    rc->busy++;
    tamarco_start_task(rc->host, (int)r->elements);
    rc->busy--;
    maybe_free(rc);
}

/* conn:on_message(fn | nil) */
static int l_on_message(lua_State *L)
{
    rconn *rc = check_conn(L);
    if (!lua_isnil(L, 2))
        luaL_checktype(L, 2, LUA_TFUNCTION);
    unref(rc, &rc->on_message_ref);
    if (!lua_isnil(L, 2) && rc->state != ST_CLOSED) {
        lua_pushvalue(L, 2);
        rc->on_message_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }
    return 0;
}

/* conn:send_pubsub(name, arg...) -> true | nil, message */
static int l_send_pubsub(lua_State *L)
{
    rconn *rc = check_conn(L);
    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    if (!(len >= 9 && len <= 12 && (strcasecmp(name, "subscribe") == 0 || strcasecmp(name, "psubscribe") == 0
                                   || strcasecmp(name, "unsubscribe") == 0 || strcasecmp(name, "punsubscribe") == 0)))
        return luaL_argerror(L, 2, "SUBSCRIBE, PSUBSCRIBE, UNSUBSCRIBE or PUNSUBSCRIBE expected");
    if (rc->state != ST_CONNECTED || !rc->ac)
        return not_connected(L, rc);
    const char *sargv[STACK_ARGS];
    size_t slens[STACK_ARGS];
    const char **argv;
    size_t *lens;
    void *heap;
    int argc = collect_args(L, &argv, &lens, &heap, sargv, slens);
    int rv = redisAsyncCommandArgv(rc->ac, on_pubsub, rc, argc, argv, lens);
    free(heap);
    if (rv != REDIS_OK) {
        lua_pushnil(L);
        lua_pushliteral(L, "cannot send (connection closing or not subscribed)");
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* ---- the rest of the connection ---- */

static int l_close(lua_State *L)
{
    rconn **ud = luaL_checkudata(L, 1, CONN_MT);
    rconn *rc = *ud;
    if (!rc || rc->state == ST_CLOSED)
        return 0;
    if (rc->state == ST_CONNECTING)
        return 0;   /* not reachable from Lua before connect returns */
    rc->state = ST_CLOSED;
    unref(rc, &rc->on_message_ref);
    unref(rc, &rc->on_disconnect_ref);
    drop_context(rc);
    return 0;
}

static int l_gc(lua_State *L)
{
    rconn **ud = luaL_checkudata(L, 1, CONN_MT);
    rconn *rc = *ud;
    if (!rc)
        return 0;
    *ud = NULL;
    rc->collected = 1;
    if (rc->state != ST_CONNECTING) {
        rc->state = ST_CLOSED;
        unref(rc, &rc->on_message_ref);
        unref(rc, &rc->on_disconnect_ref);
        drop_context(rc);
    }
    /* a connecting rconn is still referenced by its self_ref: never here */
    maybe_free(rc);
    return 0;
}

static int l_is_connected(lua_State *L)
{
    rconn *rc = check_conn(L);
    lua_pushboolean(L, rc->state == ST_CONNECTED && rc->ac != NULL);
    return 1;
}

static int l_pending(lua_State *L)
{
    rconn *rc = check_conn(L);
    lua_pushinteger(L, rc->pending);
    return 1;
}

static int l_tostring(lua_State *L)
{
    rconn **ud = luaL_checkudata(L, 1, CONN_MT);
    static const char *names[] = {"connecting", "connected", "lost", "closed"};
    lua_pushfstring(L, "redis connection (%s): %p", *ud ? names[(*ud)->state] : "collected", (void *)*ud);
    return 1;
}

/* Marks the end of the main state: callbacks no longer call into Lua. */
static int l_module_gc(lua_State *L)
{
    state_closing = 1;
    return 0;
}

int luaopen_tamarco_c_redis(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"command", l_command},
        {"on_message", l_on_message},
        {"send_pubsub", l_send_pubsub},
        {"close", l_close},
        {"is_connected", l_is_connected},
        {"pending", l_pending},
        {NULL, NULL},
    };
    static const luaL_Reg funcs[] = {
        {"connect", l_connect},
        {NULL, NULL},
    };
    /* uv handles may still call into this module while the host shuts down */
    tamarco_keep_loaded((const void *)luaopen_tamarco_c_redis);
    tamarco_class_register(L, CONN_MT, methods, l_gc, l_tostring);
    tamarco_module_new(L, funcs);
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    /* module.__gc_owner: a userdata whose finalizer marks the state's end.
     * One per main state, anchored in the registry (see state_closing):
     * loading the module again reuses it, and dropping a module table from
     * package.loaded never runs it. */
    if (tamarco_host_of(L)) {
        lua_getfield(L, LUA_REGISTRYINDEX, STATE_END_KEY);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_newuserdata(L, 1);
            lua_createtable(L, 0, 1);
            lua_pushcfunction(L, l_module_gc);
            lua_setfield(L, -2, "__gc");
            lua_setmetatable(L, -2);
            lua_pushvalue(L, -1);
            lua_setfield(L, LUA_REGISTRYINDEX, STATE_END_KEY);
            state_closing = 0;   /* a new main state */
        }
        lua_setfield(L, -2, "__gc_owner");
    }
    return 1;
}
