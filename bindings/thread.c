/*
 * tamarco.c.thread: a Lua function on its own OS thread in its own LuaJIT
 * state, talking to the loop by copied messages (a state is never shared
 * between threads). Ownership, queues, wake-ups, the detach-on-timeout stop
 * and the message format: docs/internals/threads.md.
 */
#include "host.h"
#include "byte_buffer.h"
#include "lua_class.h"
#include "mailbox.h"
#include "task_guard.h"

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HANDLE_MT "tamarco.thread.handle"
#define MAX_DEPTH 100

/* ---------------------------------------------------------------------
 * Messages
 * ------------------------------------------------------------------- */

typedef struct tmsg {
    tamarco_mail link;      /* first: the outbox's and the loop-side lists */
    int is_log;             /* a log record from ctx:log, not a message */
    size_t len;
    unsigned char data[];
} tmsg;

enum { T_NIL = 1, T_FALSE, T_TRUE, T_NUM, T_STR, T_TABLE, T_END };

typedef struct wbuf {
    tamarco_buf out;           /* starts with a tmsg header */
    int keys[MAX_DEPTH + 1];   /* stack index of the key at each depth */
    int visiting;              /* stack index of the cycle-detection set */
    char err[512];
} wbuf;

/* Appends to the message; -1, with the reason in err, once memory ran out. */
static int wb_put(wbuf *b, const void *data, size_t n)
{
    tamarco_buf_add(&b->out, data, n);
    if (b->out.oom) {
        snprintf(b->err, sizeof b->err, "out of memory while copying a message");
        return -1;
    }
    return 0;
}

static int wb_byte(wbuf *b, unsigned char c) { return wb_put(b, &c, 1); }

static int is_identifier(const char *s, size_t n)
{
    if (n == 0 || !((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z') || s[0] == '_'))
        return 0;
    for (size_t i = 1; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_'))
            return 0;
    }
    return 1;
}

/* "msg.a[3]["x y"]" for the keys at depths [0, depth). */
static void path_of(lua_State *L, wbuf *b, int depth, char *out, size_t size)
{
    size_t n = (size_t)snprintf(out, size, "msg");
    for (int d = 0; d < depth && n < size; d++) {
        int k = b->keys[d];
        switch (lua_type(L, k)) {
        case LUA_TSTRING: {
            size_t len;
            const char *s = lua_tolstring(L, k, &len);
            if (is_identifier(s, len))
                n += (size_t)snprintf(out + n, size - n, ".%.*s", (int)(len > 60 ? 60 : len), s);
            else
                n += (size_t)snprintf(out + n, size - n, "[\"%.*s%s\"]", (int)(len > 40 ? 40 : len), s,
                                      len > 40 ? "..." : "");
            break;
        }
        case LUA_TNUMBER:
            n += (size_t)snprintf(out + n, size - n, "[%.14g]", lua_tonumber(L, k));
            break;
        case LUA_TBOOLEAN:
            n += (size_t)snprintf(out + n, size - n, "[%s]", lua_toboolean(L, k) ? "true" : "false");
            break;
        default:
            n += (size_t)snprintf(out + n, size - n, "[?]");
        }
    }
}

static int encode_value(lua_State *L, int idx, wbuf *b, int depth);

static int encode_scalar(lua_State *L, int idx, wbuf *b)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        return wb_byte(b, T_NIL);
    case LUA_TBOOLEAN:
        return wb_byte(b, lua_toboolean(L, idx) ? T_TRUE : T_FALSE);
    case LUA_TNUMBER: {
        double d = lua_tonumber(L, idx);
        if (wb_byte(b, T_NUM) != 0)
            return -1;
        return wb_put(b, &d, sizeof d);
    }
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        if (wb_byte(b, T_STR) != 0 || wb_put(b, &len, sizeof len) != 0)
            return -1;
        return wb_put(b, s, len);
    }
    default:
        return 1;   /* not a scalar */
    }
}

static int encode_table(lua_State *L, int idx, wbuf *b, int depth)
{
    char path[200];
    if (depth >= MAX_DEPTH) {
        path_of(L, b, depth, path, sizeof path);
        snprintf(b->err, sizeof b->err, "message is nested too deeply (more than %d levels) at %s",
                 MAX_DEPTH, path);
        return -1;
    }
    if (!lua_checkstack(L, 6)) {
        snprintf(b->err, sizeof b->err, "message is nested too deeply (Lua stack exhausted)");
        return -1;
    }
    lua_pushvalue(L, idx);
    lua_rawget(L, b->visiting);
    int seen = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (seen) {
        path_of(L, b, depth, path, sizeof path);
        snprintf(b->err, sizeof b->err,
                 "message has a cycle: %s refers to a table that contains it "
                 "(messages are copied; a table cannot contain itself)", path);
        return -1;
    }
    lua_pushvalue(L, idx);
    lua_pushboolean(L, 1);
    lua_rawset(L, b->visiting);

    uint32_t narr = (uint32_t)lua_objlen(L, idx), nhash = 0;
    if (wb_byte(b, T_TABLE) != 0 || wb_put(b, &narr, sizeof narr) != 0)
        return -1;
    size_t nhash_at = b->out.len;
    if (wb_put(b, &nhash, sizeof nhash) != 0)
        return -1;
    uint32_t count = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int key = lua_gettop(L) - 1, value = lua_gettop(L);
        b->keys[depth] = key;
        int kt = lua_type(L, key);
        if (kt != LUA_TSTRING && kt != LUA_TNUMBER && kt != LUA_TBOOLEAN) {
            path_of(L, b, depth, path, sizeof path);
            snprintf(b->err, sizeof b->err,
                     "%s has a %s key (message keys must be strings, numbers or booleans)",
                     path, lua_typename(L, kt));
            return -1;
        }
        if (encode_scalar(L, key, b) != 0 || encode_value(L, value, b, depth + 1) != 0)
            return -1;
        count++;
        lua_pop(L, 1);
    }
    if (wb_byte(b, T_END) != 0)
        return -1;
    nhash = count > narr ? count - narr : 0;
    memcpy(b->out.data + nhash_at, &nhash, sizeof nhash);

    lua_pushvalue(L, idx);
    lua_pushnil(L);
    lua_rawset(L, b->visiting);
    return 0;
}

static int encode_value(lua_State *L, int idx, wbuf *b, int depth)
{
    int r = encode_scalar(L, idx, b);
    if (r <= 0)
        return r;
    int type = lua_type(L, idx);
    if (type == LUA_TTABLE)
        return encode_table(L, idx, b, depth);
    char path[200];
    path_of(L, b, depth, path, sizeof path);
    snprintf(b->err, sizeof b->err,
             "%s is a %s (messages may hold only nil, booleans, numbers, strings and tables)",
             path, lua_typename(L, type));
    return -1;
}

/* Serialises the value at idx into a new message. On failure returns NULL
 * with the reason in err (the caller raises it: no longjmp while holding
 * the buffer). */
static tmsg *encode_message(lua_State *L, int idx, char *err, size_t errsize)
{
    wbuf *b = calloc(1, sizeof *b);
    if (!b) {
        snprintf(err, errsize, "out of memory while copying a message");
        return NULL;
    }
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    int top = lua_gettop(L);
    tmsg *m = NULL;
    if (!lua_checkstack(L, 8)) {
        snprintf(err, errsize, "Lua stack exhausted while copying a message");
        free(b);
        return NULL;
    }
    lua_newtable(L);
    b->visiting = lua_gettop(L);
    tamarco_buf_init(&b->out);
    if (tamarco_buf_reserve(&b->out, offsetof(tmsg, data) + 64))
        b->out.len = offsetof(tmsg, data);
    else
        snprintf(b->err, sizeof b->err, "out of memory while copying a message");
    if (!b->out.oom && encode_value(L, idx, b, 0) == 0) {
        size_t len;
        m = (tmsg *)tamarco_buf_take(&b->out, &len);
        m->link.next = NULL;
        m->is_log = 0;
        m->len = len - offsetof(tmsg, data);
    } else {
        snprintf(err, errsize, "%s", b->err);
    }
    lua_settop(L, top);
    tamarco_buf_free(&b->out);
    free(b);
    return m;
}

typedef struct rbuf {
    const unsigned char *p;
    size_t len, pos;
} rbuf;

static int rb_get(rbuf *r, void *out, size_t n)
{
    if (r->len - r->pos < n)
        return -1;
    memcpy(out, r->p + r->pos, n);
    r->pos += n;
    return 0;
}

/* Pushes the next value; returns 0, or -1 on a malformed buffer (the stack
 * is then left with extra values: the caller resets it). */
static int decode_value(lua_State *L, rbuf *r, int depth)
{
    unsigned char tag;
    if (depth > MAX_DEPTH + 1 || !lua_checkstack(L, 4) || rb_get(r, &tag, 1) != 0)
        return -1;
    switch (tag) {
    case T_NIL: lua_pushnil(L); return 0;
    case T_FALSE: lua_pushboolean(L, 0); return 0;
    case T_TRUE: lua_pushboolean(L, 1); return 0;
    case T_NUM: {
        double d;
        if (rb_get(r, &d, sizeof d) != 0)
            return -1;
        lua_pushnumber(L, d);
        return 0;
    }
    case T_STR: {
        size_t len;
        if (rb_get(r, &len, sizeof len) != 0 || r->len - r->pos < len)
            return -1;
        lua_pushlstring(L, (const char *)r->p + r->pos, len);
        r->pos += len;
        return 0;
    }
    case T_TABLE: {
        uint32_t narr, nhash;
        if (rb_get(r, &narr, sizeof narr) != 0 || rb_get(r, &nhash, sizeof nhash) != 0)
            return -1;
        /* size hints only; bounded by what the buffer can hold */
        size_t left = r->len - r->pos;
        lua_createtable(L, narr < left ? (int)narr : 0, nhash < left ? (int)nhash : 0);
        for (;;) {
            if (r->pos >= r->len)
                return -1;
            if (r->p[r->pos] == T_END) {
                r->pos++;
                return 0;
            }
            if (decode_value(L, r, depth + 1) != 0)
                return -1;
            if (lua_isnil(L, -1) || (lua_type(L, -1) == LUA_TNUMBER && lua_tonumber(L, -1) != lua_tonumber(L, -1)))
                return -1;   /* nil or NaN key: never produced by encode */
            if (decode_value(L, r, depth + 1) != 0)
                return -1;
            lua_rawset(L, -3);
        }
    }
    default:
        return -1;
    }
}

/* Pushes the message's value onto L. Returns 0, or -1 (nothing pushed). */
static int decode_message(lua_State *L, const unsigned char *data, size_t len)
{
    int top = lua_gettop(L);
    rbuf r = {data, len, 0};
    if (decode_value(L, &r, 0) != 0 || r.pos != r.len) {
        lua_settop(L, top);
        return -1;
    }
    return 0;
}

/* ---------------------------------------------------------------------
 * The shared thread record
 * ------------------------------------------------------------------- */

enum { W_RECV, W_JOIN };

typedef struct waiter {
    uv_timer_t timer;   /* always initialised; closed when the waiter ends */
    struct tthread *t;
    struct waiter *prev, *next;
    int kind;
    int wait_id;
    int detach_on_timeout;
} waiter;

typedef struct wlist {
    waiter *head, *tail;
} wlist;

typedef struct tthread {
    /* shared: under mu */
    uv_mutex_t mu;
    uv_cond_t cond;            /* inbox push or stop request */
    tmsg *in_head, *in_tail;
    int stop_requested;
    int finished;              /* the thread's function ended */
    int failed;
    int detached;              /* the loop no longer listens */
    char *error;               /* error with traceback when failed */
    int refs;

    /* immutable after start */
    char *name;
    char *logger_name;         /* ctx.logger_name, or NULL */
    char *code;
    size_t code_len;
    char *lua_dir;
    uv_thread_t tid;

    /* thread -> loop: messages and log records (locked on its own) */
    tamarco_mailbox outbox;

    /* loop thread only */
    tamarco_host *host;
    int async_open;            /* the outbox's handle is open */
    int joined;                /* joined or detached: tid no longer usable */
    int exited;                /* the loop saw `finished` */
    tmsg *lq_head, *lq_tail;
    tmsg *lg_head, *lg_tail;
    wlist recv_waiters, join_waiters;
    int handler_ref, self_ref, exit_ref, log_ref;

    /* every live record, under all_mu (see all_threads) */
    struct tthread *all_prev, *all_next;
} tthread;

/* Every live record, linked from a static root. Besides listing them, this
 * keeps records that only a Lua userdata points to visible to LeakSanitizer,
 * which does not scan LuaJIT's own mmap'd heap (the main state is never
 * closed, so such userdata are never collected before exit). */
static pthread_mutex_t all_mu = PTHREAD_MUTEX_INITIALIZER;
static tthread *all_threads;

static void all_link(tthread *t)
{
    pthread_mutex_lock(&all_mu);
    t->all_prev = NULL;
    t->all_next = all_threads;
    if (all_threads)
        all_threads->all_prev = t;
    all_threads = t;
    pthread_mutex_unlock(&all_mu);
}

static void all_unlink(tthread *t)
{
    pthread_mutex_lock(&all_mu);
    if (t->all_prev)
        t->all_prev->all_next = t->all_next;
    else
        all_threads = t->all_next;
    if (t->all_next)
        t->all_next->all_prev = t->all_prev;
    pthread_mutex_unlock(&all_mu);
}

typedef struct handle_ud {
    tthread *t;
} handle_ud;

static void msg_list_free(tmsg *m)
{
    while (m) {
        tmsg *next = (tmsg *)m->link.next;
        free(m);
        m = next;
    }
}

static void tthread_destroy(tthread *t)
{
    all_unlink(t);
    msg_list_free(t->in_head);
    msg_list_free(t->lq_head);
    msg_list_free(t->lg_head);
    free(t->error);
    free(t->name);
    free(t->logger_name);
    free(t->code);
    free(t->lua_dir);
    tamarco_mailbox_destroy(&t->outbox);
    uv_cond_destroy(&t->cond);
    uv_mutex_destroy(&t->mu);
    free(t);
}

static void tthread_release(tthread *t)
{
    uv_mutex_lock(&t->mu);
    int left = --t->refs;
    uv_mutex_unlock(&t->mu);
    if (left == 0)
        tthread_destroy(t);
}

static void push_msg(tmsg **head, tmsg **tail, tmsg *m)
{
    m->link.next = NULL;
    if (*tail)
        (*tail)->link.next = &m->link;
    else
        *head = m;
    *tail = m;
}

static tmsg *pop_msg(tmsg **head, tmsg **tail)
{
    tmsg *m = *head;
    if (m) {
        *head = (tmsg *)m->link.next;
        if (!*head)
            *tail = NULL;
        m->link.next = NULL;
    }
    return m;
}

/* ---------------------------------------------------------------------
 * The OS thread
 * ------------------------------------------------------------------- */

static tthread *ctx_thread(lua_State *L)
{
    return lua_touserdata(L, lua_upvalueindex(1));
}

/* Copies the value at index 2 into the outbox. */
static int ctx_post(lua_State *L, int is_log)
{
    tthread *t = ctx_thread(L);
    char err[512];
    lua_settop(L, 2);
    tmsg *m = encode_message(L, 2, err, sizeof err);
    if (!m)
        return luaL_error(L, "ctx:%s: %s", is_log ? "log" : "send", err);
    m->is_log = is_log;
    if (tamarco_mailbox_post(&t->outbox, &m->link) != 0) {   /* the loop let the thread go */
        free(m);
        lua_pushnil(L);
        lua_pushliteral(L, "detached");
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* ctx:send(msg) -> true, or nil, "detached" when the service stopped listening. */
static int ctx_send(lua_State *L)
{
    return ctx_post(L, 0);
}

/* ctx:log(record) -> true, or nil, "detached": a log record for the
 * service's sinks (tamarco.thread_logging sends them). */
static int ctx_log(lua_State *L)
{
    return ctx_post(L, 1);
}

/* Optional timeout in ms at index idx: returns -1 for none. */
static double opt_timeout(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx))
        return -1;
    double ms = luaL_checknumber(L, idx);
    return ms < 0 ? 0 : ms;
}

/* Waits on cond until pred or stop or the deadline; mu held. Returns 0 when
 * the deadline passed. */
static int timed_wait(tthread *t, uint64_t deadline)
{
    uint64_t now = uv_hrtime();
    if (now >= deadline)
        return 0;
    uv_cond_timedwait(&t->cond, &t->mu, deadline - now);
    return 1;
}

/* ctx:receive([timeout_ms]) -> msg | nil, "timeout" | nil, "stopped" */
static int ctx_receive(lua_State *L)
{
    tthread *t = ctx_thread(L);
    double ms = opt_timeout(L, 2);
    uint64_t deadline = ms < 0 ? 0 : uv_hrtime() + (uint64_t)(ms * 1e6);
    tmsg *m = NULL;
    int stopped = 0;
    uv_mutex_lock(&t->mu);
    for (;;) {
        if (t->stop_requested) {
            stopped = 1;
            break;
        }
        if ((m = pop_msg(&t->in_head, &t->in_tail)))
            break;
        if (ms < 0)
            uv_cond_wait(&t->cond, &t->mu);
        else if (!timed_wait(t, deadline))
            break;
    }
    uv_mutex_unlock(&t->mu);
    if (m) {
        int rc = decode_message(L, m->data, m->len);
        free(m);
        if (rc != 0)
            return luaL_error(L, "ctx:receive: corrupted message");
        return 1;
    }
    lua_pushnil(L);
    if (stopped)
        lua_pushliteral(L, "stopped");
    else
        lua_pushliteral(L, "timeout");
    return 2;
}

/* ctx:should_stop() -> bool */
static int ctx_should_stop(lua_State *L)
{
    tthread *t = ctx_thread(L);
    uv_mutex_lock(&t->mu);
    int stop = t->stop_requested;
    uv_mutex_unlock(&t->mu);
    lua_pushboolean(L, stop);
    return 1;
}

/* ctx:sleep(ms) -> true, or false when woken early by a stop request. */
static int ctx_sleep(lua_State *L)
{
    tthread *t = ctx_thread(L);
    double ms = luaL_checknumber(L, 2);
    luaL_argcheck(L, ms >= 0, 2, "sleep time must be >= 0");
    uint64_t deadline = uv_hrtime() + (uint64_t)(ms * 1e6);
    uv_mutex_lock(&t->mu);
    while (!t->stop_requested && timed_wait(t, deadline))
        ;
    int stopped = t->stop_requested;
    uv_mutex_unlock(&t->mu);
    lua_pushboolean(L, !stopped);
    return 1;
}

static int thread_traceback(lua_State *L)
{
    if (!lua_isstring(L, 1)) {
        lua_getglobal(L, "tostring");
        lua_pushvalue(L, 1);
        if (lua_pcall(L, 1, 1, 0) != 0 || !lua_isstring(L, -1)) {
            lua_settop(L, 1);
            lua_pushliteral(L, "(error object is not a string)");
        }
        lua_replace(L, 1);
    }
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

static void push_ctx(lua_State *L, tthread *t)
{
    static const luaL_Reg methods[] = {
        {"send", ctx_send},
        {"log", ctx_log},
        {"receive", ctx_receive},
        {"should_stop", ctx_should_stop},
        {"sleep", ctx_sleep},
        {NULL, NULL},
    };
    lua_newtable(L);
    lua_pushstring(L, t->name);
    lua_setfield(L, -2, "name");
    if (t->logger_name) {
        lua_pushstring(L, t->logger_name);
        lua_setfield(L, -2, "logger_name");
    }
    for (const luaL_Reg *m = methods; m->name; m++) {
        lua_pushlightuserdata(L, t);
        lua_pushcclosure(L, m->func, 1);
        lua_setfield(L, -2, m->name);
    }
}

static char *dup_string(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

static void thread_main(void *arg)
{
    tthread *t = arg;
    char *error = NULL;
    lua_State *L = tamarco_state_new(t->lua_dir);
    if (!L) {
        error = dup_string("cannot create the thread's Lua state (out of memory)");
    } else {
        lua_pushcfunction(L, thread_traceback);
        int rc = luaL_loadbuffer(L, t->code, t->code_len, t->name);
        if (rc == 0) {
            push_ctx(L, t);
            /* ctx.logger and tamarco.logging send to the service's sinks */
            lua_getglobal(L, "require");
            lua_pushliteral(L, "tamarco.core.thread_logging");
            rc = lua_pcall(L, 1, 1, 1);
            if (rc == 0) {
                lua_pushvalue(L, -2);
                rc = lua_pcall(L, 1, 0, 1);
            }
        }
        if (rc == 0)
            rc = lua_pcall(L, 1, 0, 1);
        if (rc != 0) {
            const char *msg = lua_tostring(L, -1);
            error = dup_string(msg ? msg : "(error object is not a string)");
            if (!error)
                error = dup_string("out of memory");
        }
        lua_close(L);
    }
    uv_mutex_lock(&t->mu);
    t->finished = 1;
    if (error) {
        t->failed = 1;
        t->error = error;
    }
    uv_mutex_unlock(&t->mu);
    tamarco_mailbox_wake(&t->outbox);
    tthread_release(t);
}

/* ---------------------------------------------------------------------
 * The loop side
 * ------------------------------------------------------------------- */

static void wl_push(wlist *l, waiter *w)
{
    w->next = NULL;
    w->prev = l->tail;
    if (l->tail)
        l->tail->next = w;
    else
        l->head = w;
    l->tail = w;
}

static void wl_remove(wlist *l, waiter *w)
{
    if (w->prev)
        w->prev->next = w->next;
    else
        l->head = w->next;
    if (w->next)
        w->next->prev = w->prev;
    else
        l->tail = w->prev;
    w->prev = w->next = NULL;
}

static wlist *list_of(waiter *w)
{
    return w->kind == W_RECV ? &w->t->recv_waiters : &w->t->join_waiters;
}

static void free_waiter(uv_handle_t *h)
{
    free(h->data);
}

/* Unlinks w and frees it once its timer is closed. */
static void waiter_end(waiter *w)
{
    wl_remove(list_of(w), w);
    uv_timer_stop(&w->timer);
    uv_close((uv_handle_t *)&w->timer, free_waiter);
}

static int push_message(lua_State *co, void *ud)
{
    tmsg *m = ud;
    int rc = decode_message(co, m->data, m->len);
    free(m);
    if (rc != 0) {
        lua_pushnil(co);
        lua_pushliteral(co, "corrupted message");
        return 2;
    }
    return 1;
}

static int push_nil_reason(lua_State *co, void *ud)
{
    lua_pushnil(co);
    lua_pushstring(co, ud);
    return 2;
}

static int push_true(lua_State *co, void *ud)
{
    lua_pushboolean(co, 1);
    return 1;
}

/* Wakes every waiter of list l: with push(ud). */
static void wake_all(tthread *t, wlist *l, tamarco_push_fn push, void *ud)
{
    waiter *w;
    while ((w = l->head)) {
        int id = w->wait_id;
        waiter_end(w);
        tamarco_wake(t->host, id, push, ud);
    }
}

static void on_async_close(uv_handle_t *h)
{
    tthread_release(h->data);
}

/* Stops listening: no async, no refs that keep the handle alive. */
static void loop_side_close(tthread *t)
{
    if (!t->async_open)
        return;
    t->async_open = 0;
    msg_list_free((tmsg *)tamarco_mailbox_close(&t->outbox, on_async_close));
    lua_State *L = t->host->L;
    luaL_unref(L, LUA_REGISTRYINDEX, t->handler_ref);
    t->handler_ref = LUA_NOREF;
    luaL_unref(L, LUA_REGISTRYINDEX, t->log_ref);
    t->log_ref = LUA_NOREF;
    luaL_unref(L, LUA_REGISTRYINDEX, t->self_ref);   /* may let the userdata be collected */
    t->self_ref = LUA_NOREF;
}

/* Sorts messages taken from the outbox into the loop-side queues. */
static void queue_taken(tthread *t, tamarco_mail *list)
{
    while (list) {
        tmsg *m = (tmsg *)list;
        list = list->next;
        if (m->is_log)
            push_msg(&t->lg_head, &t->lg_tail, m);
        else
            push_msg(&t->lq_head, &t->lq_tail, m);
    }
}

/* Moves the outbox (and `taken`, what was already taken from it) to the
 * loop-side queues; notes when the thread ended. */
static void pull(tthread *t, tamarco_mail *taken)
{
    if (!t->async_open)
        return;
    uv_mutex_lock(&t->mu);
    int finished = t->finished;
    uv_mutex_unlock(&t->mu);
    /* read after `finished`: all the thread sent before it ended is in */
    queue_taken(t, taken);
    queue_taken(t, tamarco_mailbox_take(&t->outbox));
    if (finished)
        t->exited = 1;
}

/* Hands the queued log records to the log handler (or stderr without one:
 * a record is never dropped silently). */
static void deliver_logs(tthread *t)
{
    lua_State *L = t->host->L;
    tmsg *m;
    while ((m = pop_msg(&t->lg_head, &t->lg_tail)) != NULL) {
        int top = lua_gettop(L);
        if (t->log_ref != LUA_NOREF) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, t->log_ref);
            if (decode_message(L, m->data, m->len) != 0)
                lua_pushnil(L);
            if (lua_pcall(L, 1, 0, 0) != 0)
                fprintf(stderr, "tamarco: thread '%s' log handler failed: %s\n", t->name,
                        lua_tostring(L, -1));
        } else {
            fprintf(stderr, "tamarco: thread '%s' logged a record with no log handler\n", t->name);
        }
        lua_settop(L, top);
        free(m);
    }
}

/* Calls the exit handler once (status, error) when the loop stops tracking
 * the thread: "finished" | "failed" | "detached". */
static void notify_exit(tthread *t, const char *status)
{
    if (t->exit_ref == LUA_NOREF)
        return;
    lua_State *L = t->host->L;
    int top = lua_gettop(L);
    lua_rawgeti(L, LUA_REGISTRYINDEX, t->exit_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, t->exit_ref);
    t->exit_ref = LUA_NOREF;
    lua_pushstring(L, status);
    uv_mutex_lock(&t->mu);
    if (t->error)
        lua_pushstring(L, t->error);
    else
        lua_pushnil(L);
    uv_mutex_unlock(&t->mu);
    if (lua_pcall(L, 2, 0, 0) != 0)
        fprintf(stderr, "tamarco: thread '%s' exit handler failed: %s\n", t->name, lua_tostring(L, -1));
    lua_settop(L, top);
}

static const char *final_status(tthread *t)
{
    uv_mutex_lock(&t->mu);
    const char *s = !t->finished ? "running" : t->failed ? "failed" : "finished";
    uv_mutex_unlock(&t->mu);
    return s;
}

/* Hands queued messages to the handler or to the tasks in receive, and
 * completes the joins once the thread ended. Tasks resumed here may call
 * back into this handle: every step re-reads the lists. */
static void dispatch(tthread *t)
{
    lua_State *L = t->host->L;
    for (;;) {
        if (t->lg_head) {
            deliver_logs(t);
            continue;
        }
        if (t->handler_ref != LUA_NOREF && t->lq_head) {
            tmsg *m = pop_msg(&t->lq_head, &t->lq_tail);
            int top = lua_gettop(L);
            lua_rawgeti(L, LUA_REGISTRYINDEX, t->handler_ref);
            if (decode_message(L, m->data, m->len) != 0)
                lua_pushnil(L);
            free(m);
            if (lua_pcall(L, 1, 0, 0) != 0)
                fprintf(stderr, "tamarco: thread '%s' message handler failed: %s\n", t->name,
                        lua_tostring(L, -1));
            lua_settop(L, top);
            continue;
        }
        if (t->lq_head && t->recv_waiters.head) {
            waiter *w = t->recv_waiters.head;
            int id = w->wait_id;
            waiter_end(w);
            tmsg *m = pop_msg(&t->lq_head, &t->lq_tail);
            if (!tamarco_wake(t->host, id, push_message, m)) {
                /* a stale wait (the task was woken otherwise): keep the message */
                m->link.next = t->lq_head ? &t->lq_head->link : NULL;
                t->lq_head = m;
                if (!t->lq_tail)
                    t->lq_tail = m;
            }
            continue;
        }
        break;
    }
    if (t->exited && t->async_open) {
        if (!t->joined) {
            t->joined = 1;
            uv_thread_join(&t->tid);   /* it only returns after signalling */
        }
        loop_side_close(t);
        if (!t->lq_head)
            wake_all(t, &t->recv_waiters, push_nil_reason, "finished");
        wake_all(t, &t->join_waiters, push_true, NULL);
        notify_exit(t, final_status(t));
    }
}

static void on_outbox(tamarco_mailbox *box, tamarco_mail *list)
{
    tthread *t = box->async.data;
    pull(t, list);
    dispatch(t);
}

/* The loop stops listening to a thread that did not end in time. Returns 0
 * when the thread turned out to have ended (then joined normally). */
static int detach(tthread *t)
{
    if (!t->async_open)
        return 1;
    pull(t, NULL);
    if (t->exited) {
        dispatch(t);
        return 0;
    }
    uv_mutex_lock(&t->mu);
    t->detached = 1;
    t->stop_requested = 1;
    uv_cond_broadcast(&t->cond);
    uv_mutex_unlock(&t->mu);
    tamarco_mailbox_shut(&t->outbox);
    /* Messages it sent before are still delivered to receive, its log
     * records to the log handler. */
    pull(t, NULL);
    deliver_logs(t);
    if (!t->joined) {
        t->joined = 1;
        pthread_detach(t->tid);
    }
    loop_side_close(t);
    if (!t->lq_head)
        wake_all(t, &t->recv_waiters, push_nil_reason, "detached");
    wake_all(t, &t->join_waiters, push_nil_reason, "detached");
    notify_exit(t, "detached");
    return 1;
}

static void on_wait_timeout(uv_timer_t *timer)
{
    waiter *w = timer->data;
    tthread *t = w->t;
    int id = w->wait_id, kind = w->kind, do_detach = w->detach_on_timeout;
    waiter_end(w);
    /* t stays valid below: the async's close callback runs on a later turn */
    if (kind == W_JOIN && do_detach && !detach(t))
        tamarco_wake(t->host, id, push_true, NULL);
    else
        tamarco_wake(t->host, id, push_nil_reason, "timeout");
}

static void cancel_wait(void *ud)
{
    waiter_end(ud);
}

/* Suspends the running task as a waiter of kind; ms < 0: no timeout. */
static int wait_for(lua_State *L, tthread *t, int kind, double ms, int detach_on_timeout)
{
    tamarco_check_host(L, "thread");
    tamarco_check_task(L, "thread:receive/join/stop");
    waiter *w = calloc(1, sizeof *w);
    if (!w)
        return luaL_error(L, "out of memory");
    w->t = t;
    w->kind = kind;
    w->detach_on_timeout = detach_on_timeout;
    uv_timer_init(t->host->loop, &w->timer);
    w->timer.data = w;
    w->wait_id = tamarco_wait_begin(L, cancel_wait, w);
    tamarco_wait_note(t->host, w->wait_id, kind == W_RECV ? "thread message" : "thread join", t->name, 0);
    wl_push(list_of(w), w);
    if (ms >= 0)
        uv_timer_start(&w->timer, on_wait_timeout, (uint64_t)ms, 0);
    return tamarco_wait_yield(L);
}

/* ---------------------------------------------------------------------
 * Lua API on the main state
 * ------------------------------------------------------------------- */

static tthread *check_handle(lua_State *L)
{
    handle_ud *ud = luaL_checkudata(L, 1, HANDLE_MT);
    if (!ud->t)
        luaL_error(L, "thread handle is closed");
    return ud->t;
}

/* start(name, bytecode[, logger_name]) -> handle, or nil, err */
static int l_start(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    size_t code_len;
    const char *code = luaL_checklstring(L, 2, &code_len);
    const char *logger_name = luaL_optstring(L, 3, NULL);
    tamarco_host *host = tamarco_check_host(L, "thread.start");

    handle_ud *ud = lua_newuserdata(L, sizeof *ud);
    ud->t = NULL;
    luaL_getmetatable(L, HANDLE_MT);
    lua_setmetatable(L, -2);

    tthread *t = calloc(1, sizeof *t);
    if (!t)
        return luaL_error(L, "out of memory");
    t->name = dup_string(name);
    t->logger_name = logger_name ? dup_string(logger_name) : NULL;
    t->lua_dir = dup_string(host->lua_dir);
    t->code = malloc(code_len ? code_len : 1);
    if (!t->name || !t->lua_dir || !t->code || (logger_name && !t->logger_name)) {
        free(t->name);
        free(t->logger_name);
        free(t->lua_dir);
        free(t->code);
        free(t);
        return luaL_error(L, "out of memory");
    }
    memcpy(t->code, code, code_len);
    t->code_len = code_len;
    t->host = host;
    t->handler_ref = t->self_ref = t->exit_ref = t->log_ref = LUA_NOREF;
    int rc = tamarco_mailbox_init(&t->outbox, host->loop, on_outbox);
    if (rc != 0) {
        free(t->name);
        free(t->logger_name);
        free(t->lua_dir);
        free(t->code);
        free(t);
        return luaL_error(L, "cannot start thread '%s': %s", name, uv_strerror(rc));
    }
    t->outbox.async.data = t;
    uv_ref((uv_handle_t *)&t->outbox.async);   /* a running thread keeps the loop alive */
    uv_mutex_init(&t->mu);
    uv_cond_init(&t->cond);
    t->refs = 2;   /* loop side + userdata; +1 for the OS thread below */
    all_link(t);
    t->async_open = 1;
    ud->t = t;

    t->refs++;
    rc = uv_thread_create(&t->tid, thread_main, t);
    if (rc != 0) {
        t->refs--;
        t->joined = 1;
        t->finished = t->exited = t->failed = 1;
        t->error = dup_string(uv_strerror(rc));
        loop_side_close(t);
        lua_pushnil(L);
        lua_pushfstring(L, "cannot start thread '%s': %s", name, uv_strerror(rc));
        return 2;
    }
    lua_pushvalue(L, -1);
    t->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

/* h:send(msg) -> true, or nil, "finished" */
static int h_send(lua_State *L)
{
    tthread *t = check_handle(L);
    char err[512];
    lua_settop(L, 2);
    tmsg *m = encode_message(L, 2, err, sizeof err);
    if (!m)
        return luaL_error(L, "thread '%s': %s", t->name, err);
    uv_mutex_lock(&t->mu);
    int finished = t->finished;
    if (!finished) {
        push_msg(&t->in_head, &t->in_tail, m);
        uv_cond_broadcast(&t->cond);
    }
    uv_mutex_unlock(&t->mu);
    if (finished) {
        free(m);
        lua_pushnil(L);
        lua_pushliteral(L, "finished");
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* h:receive([timeout_ms]) -> msg | nil, "timeout" | "finished" | "detached" */
static int h_receive(lua_State *L)
{
    tthread *t = check_handle(L);
    double ms = opt_timeout(L, 2);
    if (t->handler_ref != LUA_NOREF)
        return luaL_error(L, "thread '%s': receive cannot be used once on_message is set", t->name);
    pull(t, NULL);
    if (t->lq_head && !t->recv_waiters.head) {
        tmsg *m = pop_msg(&t->lq_head, &t->lq_tail);
        return push_message(L, m);
    }
    if (!t->lq_head && !t->async_open) {
        lua_pushnil(L);
        lua_pushstring(L, t->exited ? "finished" : "detached");
        return 2;
    }
    if (!t->lq_head && t->exited) {   /* ended; the async callback will close */
        lua_pushnil(L);
        lua_pushliteral(L, "finished");
        return 2;
    }
    if (ms == 0 && !t->lq_head) {
        lua_pushnil(L);
        lua_pushliteral(L, "timeout");
        return 2;
    }
    return wait_for(L, t, W_RECV, ms, 0);
}

/* h:set_handler(fn): fn(msg) is called on the loop thread for every message
 * (it must not yield: tamarco.thread spawns a task from it). */
static int h_set_handler(lua_State *L)
{
    tthread *t = check_handle(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    if (t->handler_ref != LUA_NOREF)
        luaL_unref(L, LUA_REGISTRYINDEX, t->handler_ref);
    t->handler_ref = LUA_NOREF;
    lua_settop(L, 2);
    if (t->async_open)
        t->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    else {
        /* already ended: deliver what is queued now */
        while (t->lq_head) {
            tmsg *m = pop_msg(&t->lq_head, &t->lq_tail);
            lua_pushvalue(L, 2);
            if (decode_message(L, m->data, m->len) != 0)
                lua_pushnil(L);
            free(m);
            lua_call(L, 1, 0);
        }
        return 0;
    }
    /* receive and on_message are exclusive: the queue goes to the handler */
    pull(t, NULL);
    dispatch(t);
    return 0;
}

/* h:set_log_handler(fn): fn(record) is called on the loop thread for every
 * record the thread logs with ctx:log (it must not yield). */
static int h_set_log_handler(lua_State *L)
{
    tthread *t = check_handle(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    luaL_unref(L, LUA_REGISTRYINDEX, t->log_ref);
    t->log_ref = LUA_NOREF;
    if (t->async_open) {
        t->log_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        pull(t, NULL);
        dispatch(t);
    }
    return 0;
}

/* h:set_exit_handler(fn): fn(status, err) once the loop stops tracking the
 * thread (status "finished" | "failed" | "detached"); at once if it already
 * did. Called on the loop thread: it must not yield. */
static int h_set_exit_handler(lua_State *L)
{
    tthread *t = check_handle(L);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    luaL_unref(L, LUA_REGISTRYINDEX, t->exit_ref);
    t->exit_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (!t->async_open)
        notify_exit(t, t->exited ? final_status(t) : "detached");
    return 0;
}

/* h:request_stop(): sets the stop flag and wakes the thread's receive/sleep. */
static int h_request_stop(lua_State *L)
{
    tthread *t = check_handle(L);
    uv_mutex_lock(&t->mu);
    t->stop_requested = 1;
    uv_cond_broadcast(&t->cond);
    uv_mutex_unlock(&t->mu);
    return 0;
}

/* h:join([timeout_ms[, detach_on_timeout]]) -> true | nil, "timeout" | nil, "detached" */
static int h_join(lua_State *L)
{
    tthread *t = check_handle(L);
    double ms = opt_timeout(L, 2);
    int do_detach = lua_toboolean(L, 3);
    pull(t, NULL);
    if (t->exited) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (!t->async_open) {
        lua_pushnil(L);
        lua_pushliteral(L, "detached");
        return 2;
    }
    return wait_for(L, t, W_JOIN, ms, do_detach);
}

/* h:status() -> "running" | "finished" | "failed" */
static int h_status(lua_State *L)
{
    lua_pushstring(L, final_status(check_handle(L)));
    return 1;
}

/* h:detached() -> true when a stop timed out and the loop let the thread go. */
static int h_detached(lua_State *L)
{
    tthread *t = check_handle(L);
    uv_mutex_lock(&t->mu);
    int d = t->detached;
    uv_mutex_unlock(&t->mu);
    lua_pushboolean(L, d);
    return 1;
}

/* h:error() -> the error with its traceback, or nil */
static int h_error(lua_State *L)
{
    tthread *t = check_handle(L);
    uv_mutex_lock(&t->mu);
    if (t->finished && t->error)
        lua_pushstring(L, t->error);
    else
        lua_pushnil(L);
    uv_mutex_unlock(&t->mu);
    return 1;
}

/* __gc: normally the thread has ended (a running one is kept alive by
 * self_ref). When the whole state closes with it running, let it go. */
static int h_gc(lua_State *L)
{
    handle_ud *ud = luaL_checkudata(L, 1, HANDLE_MT);
    tthread *t = ud->t;
    if (!t)
        return 0;
    ud->t = NULL;
    if (t->async_open) {
        uv_mutex_lock(&t->mu);
        t->detached = 1;
        t->stop_requested = 1;
        uv_cond_broadcast(&t->cond);
        uv_mutex_unlock(&t->mu);
        if (!t->joined) {
            t->joined = 1;
            pthread_detach(t->tid);
        }
        t->async_open = 0;
        msg_list_free((tmsg *)tamarco_mailbox_close(&t->outbox, on_async_close));
    }
    tthread_release(t);
    return 0;
}

static int h_tostring(lua_State *L)
{
    handle_ud *ud = luaL_checkudata(L, 1, HANDLE_MT);
    lua_pushfstring(L, "tamarco.thread.handle: %s (%p)", ud->t ? ud->t->name : "closed", (void *)ud);
    return 1;
}

/* encode(value) -> string: the message encoding (for tests and tools). */
static int l_encode(lua_State *L)
{
    char err[512];
    lua_settop(L, 1);
    tmsg *m = encode_message(L, 1, err, sizeof err);
    if (!m)
        return luaL_error(L, "%s", err);
    lua_pushlstring(L, (const char *)m->data, m->len);
    free(m);
    return 1;
}

/* decode(string) -> value; raises on a malformed buffer. */
static int l_decode(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    if (decode_message(L, (const unsigned char *)s, len) != 0)
        return luaL_error(L, "malformed message");
    return 1;
}

int luaopen_tamarco_c_thread(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"send", h_send},
        {"set_log_handler", h_set_log_handler},
        {"receive", h_receive},
        {"set_handler", h_set_handler},
        {"set_exit_handler", h_set_exit_handler},
        {"request_stop", h_request_stop},
        {"join", h_join},
        {"status", h_status},
        {"detached", h_detached},
        {"error", h_error},
        {NULL, NULL},
    };
    static const luaL_Reg funcs[] = {
        {"start", l_start},
        {"encode", l_encode},
        {"decode", l_decode},
        {NULL, NULL},
    };
    tamarco_class_register(L, HANDLE_MT, methods, h_gc, h_tostring);
    tamarco_module_new(L, funcs);
    return 1;
}
