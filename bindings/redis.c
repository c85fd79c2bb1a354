/*
 * tamarco.c.redis: Redis connections through hiredis's async API, driven by
 * the host's libuv loop. Thin: connect, send a command, yield the task, map
 * the reply; reconnect, AUTH/SELECT and pub/sub policy live in
 * lua/tamarco/resources/redis.lua.
 *
 *   connect(host, port[, {connect_timeout_ms = 5000, on_disconnect = fn}])
 *       -> conn | nil, message          (yields until connected or failed)
 *       host may be a name: it is resolved with uv_getaddrinfo, off the loop.
 *       on_disconnect(message) runs in a new task when the connection is lost
 *       (not when closed by conn:close() or collected).
 *   conn:command(name, arg...) | conn:command({name, arg...})
 *       -> reply | nil, message[, "connection"]     (yields until the reply)
 *       Arguments are strings (binary safe) or numbers. Replies:
 *         status  -> string ("OK", "PONG")
 *         error   -> nil, "ERR ..."  (two values; a nil reply is one value)
 *         integer -> number (a double: exact up to 2^53)
 *         bulk    -> string (binary safe)
 *         nil     -> nil
 *         array   -> table 1..n; a nil element is `null` (the module field,
 *                    a NULL lightuserdata, equal to cjson.null); an error
 *                    element is {err = "ERR ..."}; nested arrays are tables.
 *       Connection failures return nil, message, "connection": "not
 *       connected", "connection lost (...)", "connection closed".
 *       Commands sent by many tasks in the same loop turn go out in one write
 *       (hiredis queues them); replies wake their tasks in order.
 *   conn:on_message(fn)      fn(kind, a, b[, c]) in a new task for every
 *                            pub/sub push: ("message", channel, payload),
 *                            ("pmessage", pattern, channel, payload),
 *                            ("subscribe"|"psubscribe"|"unsubscribe"|
 *                             "punsubscribe", channel, count)
 *   conn:send_pubsub(name, arg...) -> true | nil, message
 *       sends SUBSCRIBE/PSUBSCRIBE/UNSUBSCRIBE/PUNSUBSCRIBE without waiting;
 *       confirmations arrive through on_message. Once subscribed, a
 *       connection only takes these commands (Redis' RESP2 rule).
 *   conn:close()             fails pending commands with "connection closed"
 *   conn:is_connected() -> bool;  conn:pending() -> commands awaiting replies
 *   null                     the nil-element sentinel
 *
 * Never raised from the loop side: every failure reaches the waiting task as
 * `nil, message`. A task cancelled while it waits is not resumed by the late
 * reply (tamarco_wake ignores stale ids); the reply is freed either way.
 *
 * Life cycle of the C state (struct rconn): the userdata points at it; it
 * is freed once the userdata is closed or collected AND hiredis has released
 * its context (disconnect callback, or a synchronous free). Tasks are never
 * resumed from inside a Lua call of ours (close, __gc, cancel): failures
 * found there are delivered on the next loop turn (an idle handle), and the
 * connect result is delivered from the connect timer, never from hiredis's
 * connect callback (hiredis 0.14 keeps using the context after it).
 *
 * hiredis 0.14's libuv adapter drops libuv's error status (a poll that
 * reports POLLERR arrives as status UV_EBADF with no events, and the adapter
 * ignores it), so a refused connect or a reset connection would never be
 * noticed. We keep the adapter (its attach, state and cleanup) but install
 * read/write hooks whose poll callback treats an error as "readable and
 * writable", which makes hiredis look at the socket and see the error (what
 * hiredis 1.x's adapter does).
 */
#include "host.h"
#include "lua_class.h"
#include "task_guard.h"

#include <hiredis/hiredis.h>
#include <hiredis/async.h>
#include <hiredis/adapters/libuv.h>

#include <arpa/inet.h>
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

typedef struct redis_cmd {
    rconn *rc;
    int wait_id;
} redis_cmd;

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

static void poll_cb(uv_poll_t *handle, int status, int events)
{
    redisLibuvEvents *p = handle->data;
    int ev = status ? p->events : events;
    if (p->context != NULL && (ev & UV_READABLE))
        redisAsyncHandleRead(p->context);
    if (p->context != NULL && (ev & UV_WRITABLE))
        redisAsyncHandleWrite(p->context);
}

static void update_poll(redisLibuvEvents *p)
{
    if (p->events)
        uv_poll_start(&p->handle, p->events, poll_cb);
    else
        uv_poll_stop(&p->handle);
}

static void add_read(void *data) { redisLibuvEvents *p = data; p->events |= UV_READABLE; update_poll(p); }
static void del_read(void *data) { redisLibuvEvents *p = data; p->events &= ~UV_READABLE; update_poll(p); }
static void add_write(void *data) { redisLibuvEvents *p = data; p->events |= UV_WRITABLE; update_poll(p); }
static void del_write(void *data) { redisLibuvEvents *p = data; p->events &= ~UV_WRITABLE; update_poll(p); }

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
    if (rc->collected && rc->ac == NULL && rc->busy == 0 && rc->timer == NULL && rc->resolve == NULL)
        free(rc);
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
    redis_cmd *cmd = privdata;
    rconn *rc = cmd->rc;
    int wait_id = cmd->wait_id;
    free(cmd);
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

/* Collects the command's arguments (a table at 2, or the values from 2 on)
 * into argv/lens (size STACK_ARGS, or malloc'ed into *heap). */
static int collect_args(lua_State *L, const char ***argv, size_t **lens, void **heap,
                        const char **sargv, size_t *slens)
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
    int first = from_table ? 3 : 2;
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

/* conn:command(name, ...) | conn:command({name, ...}) */
static int l_command(lua_State *L)
{
    rconn *rc = check_conn(L);
    if (rc->state != ST_CONNECTED || !rc->ac)
        return not_connected(L, rc);
    tamarco_check_task(L, "a redis command");
    const char *sargv[STACK_ARGS];
    size_t slens[STACK_ARGS];
    const char **argv;
    size_t *lens;
    void *heap;
    int argc = collect_args(L, &argv, &lens, &heap, sargv, slens);
    redis_cmd *cmd = malloc(sizeof *cmd);
    if (!cmd) {
        free(heap);
        return luaL_error(L, "out of memory");
    }
    cmd->rc = rc;
    cmd->wait_id = 0;
    int rv = redisAsyncCommandArgv(rc->ac, on_reply, cmd, argc, argv, lens);
    free(heap);
    if (rv != REDIS_OK) {
        free(cmd);
        lua_pushnil(L);
        lua_pushfstring(L, "connection lost (%s)", rc->ac->errstr[0] ? rc->ac->errstr : "closing");
        lua_pushliteral(L, "connection");
        return 3;
    }
    rc->pending++;
    /* no cancel function: a reply for a cancelled task finds a stale id */
    cmd->wait_id = tamarco_wait_begin(L, NULL, NULL);
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
