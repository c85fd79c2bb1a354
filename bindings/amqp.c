/*
 * tamarco.c.amqp: AMQP 0-9-1 connections (librabbitmq) for the AMQP
 * resource. Thin: it moves frames; naming, codecs, consumers, re-declaring
 * and acking policy live in lua/tamarco/resources/amqp.lua.
 *
 * Why an I/O thread per connection: rabbitmq-c blocks (connect, login,
 * every RPC, and publishes to a broker that stops reading), so one OS
 * thread owns the connection and the loop never calls into rabbitmq-c.
 * This file is the loop side and the Lua API; bindings/amqp_io.c the I/O
 * thread; bindings/amqp_link.h what passes between them. Design, channels,
 * epochs, batched acks and the Lua API: docs/internals/amqp.md.
 */
#include "amqp_link.h"
#include "lua_class.h"
#include "lua_options.h"
#include "task_guard.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

int luaopen_tamarco_c_amqp(lua_State *L);

/* ---------------------------------------------------------------------
 * Loop side
 * ------------------------------------------------------------------- */

static void update_ref(aconn *c)
{
    int want = c->pending_waits > 0 || c->closing;
    if (want && !c->async_refd)
        uv_ref((uv_handle_t *)&c->events.async);
    else if (!want && c->async_refd)
        uv_unref((uv_handle_t *)&c->events.async);
    c->async_refd = want;
}

static void wake_thread(aconn *c)
{
    uint64_t one = 1;
    ssize_t w = write(c->efd, &one, sizeof one);
    (void)w;
}

static void submit(aconn *c, cmd *k)
{
    int waits = k->wait_id != 0;   /* k belongs to the thread once queued */
    k->next = NULL;
    uv_mutex_lock(&c->mu);
    if (c->cmd_tail)
        c->cmd_tail->next = k;
    else
        c->cmd_head = k;
    c->cmd_tail = k;
    int signal = !c->signaled;
    c->signaled = 1;
    uv_mutex_unlock(&c->mu);
    if (signal) {
        if (c->in_async)   /* one wake-up for the whole batch, at its end */
            c->signal_pending = 1;
        else
            wake_thread(c);
    }
    if (waits) {
        c->pending_waits++;
        update_ref(c);
    }
}

static const char *state_name(int s)
{
    switch (s) {
    case ST_CONNECTING: return "connecting";
    case ST_CONNECTED: return "connected";
    case ST_FAILED: return "failed";
    case ST_CLOSED: return "closed";
    default: return "new";
    }
}

static int push_done(lua_State *co, void *ud)
{
    event *e = ud;
    if (!e->ok) {
        lua_pushnil(co);
        lua_pushlstring(co, e->text.bytes ? e->text.bytes : "", e->text.len);
        return 2;
    }
    if (e->text.bytes)
        lua_pushlstring(co, e->text.bytes, e->text.len);
    else
        lua_pushboolean(co, 1);
    lua_pushnumber(co, e->n1);
    lua_pushnumber(co, e->n2);
    return 3;
}

static int push_true(lua_State *co, void *ud)
{
    (void)ud;
    lua_pushboolean(co, 1);
    return 1;
}

static void push_bytes_or_nil(lua_State *L, amqp_bytes_t b)
{
    lua_pushlstring(L, b.bytes ? b.bytes : "", b.len);
}

static void push_props(lua_State *L, event *e)
{
    lua_createtable(L, 0, 4);
    for (int i = 0; i < NPROPS; i++) {
        if (e->props[i].bytes) {
            lua_pushlstring(L, e->props[i].bytes, e->props[i].len);
            lua_setfield(L, -2, PROP_NAMES[i]);
        }
    }
    if (e->has_delivery_mode) {
        lua_pushinteger(L, e->delivery_mode);
        lua_setfield(L, -2, "delivery_mode");
    }
    if (e->has_priority) {
        lua_pushinteger(L, e->priority);
        lua_setfield(L, -2, "priority");
    }
    if (e->has_timestamp) {
        lua_pushnumber(L, (lua_Number)e->timestamp);
        lua_setfield(L, -2, "timestamp");
    }
    if (e->headers.bytes) {
        lua_createtable(L, 0, 2);
        const char *p = e->headers.bytes, *end = p + e->headers.len;
        while (p < end) {
            uint16_t kl;
            memcpy(&kl, p, 2);
            p += 2;
            lua_pushlstring(L, p, kl);
            p += kl;
            char kind = *p++;
            if (kind == 'S') {
                uint32_t n;
                memcpy(&n, p, 4);
                p += 4;
                lua_pushlstring(L, p, n);
                p += n;
            } else if (kind == 'n') {
                double d;
                memcpy(&d, p, 8);
                p += 8;
                lua_pushnumber(L, d);
            } else {
                lua_pushboolean(L, kind == 't');
            }
            lua_rawset(L, -3);
        }
        lua_setfield(L, -2, "headers");
    }
}

static void wake_close_waiters(aconn *c)
{
    int n = c->close_nwaits;
    c->close_nwaits = 0;
    for (int i = 0; i < n; i++)
        tamarco_wake(c->host, c->close_waits[i], push_true, NULL);
}

static void free_conn(aconn *c)
{
    cmd *k = c->cmd_head;
    while (k) {
        cmd *next = k->next;
        free(k);
        k = next;
    }
    tamarco_mailbox_destroy(&c->events);
    if (c->efd >= 0)
        close(c->efd);
    uv_mutex_destroy(&c->mu);
    free(c->pw);
    free(c->aw);
    amqp_noack_clear(c);
    free(c->noack_tags);
    free(c->pd.ev);
    for (int i = 0; i < c->nhosts; i++)
        free(c->hostnames[i]);
    free(c->hostnames);
    free(c->ports);
    free(c->vhost);
    free(c->user);
    if (c->password)
        memset(c->password, 0, strlen(c->password));
    free(c->password);
    free(c->name);
    free(c);
}

static void on_handle_closed(uv_handle_t *h)
{
    free_conn(h->data);
}

/* Calls the registry function `ref` with the nargs values pushed by the
 * caller after it, in a new task. */
static void start_callback(aconn *c, int nargs)
{
    tamarco_start_task(c->host, nargs);
}

static void finish_closed(aconn *c)
{
    lua_State *L = c->host->L;
    if (c->thread_running) {
        uv_thread_join(&c->tid);
        c->thread_running = 0;
    }
    c->state = ST_CLOSED;
    c->closing = 0;
    if (c->ud)
        c->ud->c = NULL;
    c->ud = NULL;
    wake_close_waiters(c);
    luaL_unref(L, LUA_REGISTRYINDEX, c->on_state_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, c->on_delivery_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, c->ud_ref);
    c->on_state_ref = c->on_delivery_ref = c->ud_ref = LUA_NOREF;
    amqp_free_events(tamarco_mailbox_close(&c->events, on_handle_closed));
}

static void on_events(tamarco_mailbox *box, tamarco_mail *taken)
{
    aconn *c = box->async.data;
    if (c->state == ST_CLOSED) {
        amqp_free_events(taken);
        return;
    }
    event *list = (event *)taken;
    lua_State *L = c->host->L;
    int top = lua_gettop(L);
    c->in_async = 1;
    while (list) {
        event *e = list;
        list = (event *)e->link.next;
        switch (e->kind) {
        case E_DONE:
            c->pending_waits--;
            update_ref(c);
            tamarco_wake(c->host, e->wait_id, push_done, e);
            break;
        case E_STATE:
            c->state = e->state;
            c->loop_epoch = e->epoch;
            c->loop_cur = (int)e->n1;
            if (e->state == ST_FAILED && e->text.bytes)
                snprintf(c->last_error, sizeof c->last_error, "%.*s", (int)e->text.len, (char *)e->text.bytes);
            if (e->state == ST_CONNECTED && e->epoch > 1)
                c->st_reconnects++;
            luaL_checkstack(L, 4, "amqp");
            lua_rawgeti(L, LUA_REGISTRYINDEX, c->on_state_ref);
            lua_pushstring(L, state_name(e->state));
            lua_pushnumber(L, e->epoch);
            if (e->text.bytes)
                lua_pushlstring(L, e->text.bytes, e->text.len);
            else
                lua_pushnil(L);
            start_callback(c, 3);
            lua_settop(L, top);
            break;
        case E_CANCELLED:
            luaL_checkstack(L, 4, "amqp");
            lua_rawgeti(L, LUA_REGISTRYINDEX, c->on_state_ref);
            lua_pushliteral(L, "cancelled");
            lua_pushnumber(L, e->epoch);
            push_bytes_or_nil(L, e->text);
            start_callback(c, 3);
            lua_settop(L, top);
            break;
        case E_DELIVERY:
            c->st_delivered++;
            luaL_checkstack(L, 10, "amqp");
            lua_rawgeti(L, LUA_REGISTRYINDEX, c->on_delivery_ref);
            push_bytes_or_nil(L, e->consumer_tag);
            push_bytes_or_nil(L, e->body);
            push_props(L, e);
            lua_pushnumber(L, (lua_Number)e->delivery_tag);
            lua_pushboolean(L, e->redelivered);
            lua_pushnumber(L, e->epoch);
            push_bytes_or_nil(L, e->exchange);
            push_bytes_or_nil(L, e->routing_key);
            start_callback(c, 8);
            lua_settop(L, top);
            break;
        case E_CLOSED:
            free(e);
            while (list) {   /* nothing follows E_CLOSED; be safe */
                event *n = (event *)list->link.next;
                free(list);
                list = n;
            }
            c->in_async = 0;
            finish_closed(c);
            return;
        }
        free(e);
    }
    c->in_async = 0;
    if (c->signal_pending) {
        c->signal_pending = 0;
        wake_thread(c);
    }
}

/* ---- argument helpers ---- */

static conn_ud *check_ud(lua_State *L)
{
    return luaL_checkudata(L, 1, CONN_MT);
}

static int closed_error(lua_State *L)
{
    lua_pushnil(L);
    lua_pushliteral(L, "the AMQP connection is closed");
    return 2;
}

static void need_task(lua_State *L, const char *what)
{
    tamarco_check_host(L, "amqp.%s: AMQP", what);
    tamarco_check_task(L, "amqp.%s", what);
}

typedef struct lstr {
    const char *p;
    size_t n;
} lstr;

typedef struct targ {
    lstr key;
    int type;        /* LUA_TSTRING, LUA_TNUMBER, LUA_TBOOLEAN */
    lstr s;
    double d;
    int b;
} targ;

/* Reads a flat table {k = string|number|boolean} at idx into out[]. */
static int gather_table(lua_State *L, int idx, const char *what, targ *out)
{
    int n = 0;
    if (lua_isnoneornil(L, idx))
        return 0;
    if (!lua_istable(L, idx))
        luaL_error(L, "amqp: '%s' must be a table", what);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING)
            luaL_error(L, "amqp: '%s' keys must be strings", what);
        if (n >= MAX_ARGS)
            luaL_error(L, "amqp: '%s' has more than %d entries", what, MAX_ARGS);
        targ *a = &out[n++];
        a->key.p = lua_tolstring(L, -2, &a->key.n);
        a->type = lua_type(L, -1);
        switch (a->type) {
        case LUA_TSTRING: a->s.p = lua_tolstring(L, -1, &a->s.n); break;
        case LUA_TNUMBER: a->d = lua_tonumber(L, -1); break;
        case LUA_TBOOLEAN: a->b = lua_toboolean(L, -1); break;
        default:
            luaL_error(L, "amqp: '%s.%s' must be a string, a number or a boolean", what, a->key.p);
        }
        lua_pop(L, 1);   /* strings stay alive in the table */
    }
    return n;
}

static size_t targs_size(targ *a, int n)
{
    size_t s = 0;
    for (int i = 0; i < n; i++)
        s += a[i].key.n + (a[i].type == LUA_TSTRING ? a[i].s.n : 0);
    return s;
}

typedef struct cbuf {
    char *w;
} cbuf;

static amqp_bytes_t cb_put(cbuf *b, const char *p, size_t n)
{
    amqp_bytes_t out;
    out.len = n;
    out.bytes = b->w;
    if (n)
        memcpy(b->w, p, n);
    b->w += n;
    return out;
}

static void fill_table(cmd *k, cbuf *b, targ *a, int n)
{
    for (int i = 0; i < n; i++) {
        amqp_table_entry_t *en = &k->entries[i];
        en->key = cb_put(b, a[i].key.p, a[i].key.n);
        switch (a[i].type) {
        case LUA_TSTRING:
            en->value.kind = AMQP_FIELD_KIND_UTF8;
            en->value.value.bytes = cb_put(b, a[i].s.p, a[i].s.n);
            break;
        case LUA_TBOOLEAN:
            en->value.kind = AMQP_FIELD_KIND_BOOLEAN;
            en->value.value.boolean = a[i].b;
            break;
        default: {
            double d = a[i].d;
            if (d == (double)(int64_t)d && d > -9.2e18 && d < 9.2e18) {
                en->value.kind = AMQP_FIELD_KIND_I64;
                en->value.value.i64 = (int64_t)d;
            } else {
                en->value.kind = AMQP_FIELD_KIND_F64;
                en->value.value.f64 = d;
            }
        }
        }
    }
    k->args.num_entries = n;
    k->args.entries = n ? k->entries : NULL;
}

/* A command with room for nentries table entries and `bytes` of strings. */
static cmd *cmd_alloc(lua_State *L, int kind, int nentries, size_t bytes, cbuf *b)
{
    size_t head = sizeof(cmd) + (size_t)nentries * sizeof(amqp_table_entry_t);
    cmd *k = calloc(1, head + bytes + 1);
    if (!k)
        luaL_error(L, "out of memory");
    k->kind = kind;
    k->args = amqp_empty_table;
    b->w = (char *)k + head;
    return k;
}

static lstr opt_lstr(lua_State *L, int t, const char *key)
{
    lstr s = {NULL, 0};
    if (t == 0)
        return s;
    lua_getfield(L, t, key);
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
            luaL_error(L, "amqp: '%s' must be a string", key);
        s.p = lua_tolstring(L, -1, &s.n);
    }
    lua_pop(L, 1);   /* a string field stays alive in its table */
    return s;
}

static int opt_flag(lua_State *L, int t, const char *key, int flag, int def)
{
    if (t == 0)
        return def ? flag : 0;
    lua_getfield(L, t, key);
    int v = lua_isnil(L, -1) ? def : lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v ? flag : 0;
}

static int opt_table_index(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx))
        return 0;
    luaL_checktype(L, idx, LUA_TTABLE);
    return idx;
}

/* For /debug/tasks, by command kind (C_PUBLISH...). */
static const char *const COMMAND_NAMES[] = {
    "?", "publish", "ack", "nack", "declare queue", "declare exchange", "bind",
    "delete queue", "purge", "consume", "cancel", "close",
};

static int wait_and_submit(lua_State *L, aconn *c, cmd *k)
{
    k->wait_id = tamarco_wait_begin(L, NULL, NULL);
    char what[TAMARCO_WAIT_DETAIL_MAX];
    int known = k->kind > 0 && k->kind < (int)(sizeof COMMAND_NAMES / sizeof *COMMAND_NAMES);
    snprintf(what, sizeof what, "%s %.*s", COMMAND_NAMES[known ? k->kind : 0],
             (int)(k->s1.len > 100 ? 100 : k->s1.len), k->s1.bytes ? (const char *)k->s1.bytes : "");
    tamarco_wait_note(c->host, k->wait_id, "amqp", what, 0);
    submit(c, k);
    return tamarco_wait_yield(L);
}

static int not_connected(lua_State *L, aconn *c)
{
    lua_pushnil(L);
    if (c->last_error[0])
        lua_pushfstring(L, "not connected to the AMQP broker %s:%d (%s)", c->hostnames[c->loop_cur],
                        c->ports[c->loop_cur], c->last_error);
    else
        lua_pushfstring(L, "not connected to the AMQP broker %s:%d", c->hostnames[c->loop_cur], c->ports[c->loop_cur]);
    return 2;
}

/* ---- conn methods ---- */

static int l_publish(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    size_t en, rn, bn;
    const char *exchange = luaL_checklstring(L, 2, &en);
    const char *rkey = luaL_checklstring(L, 3, &rn);
    const char *body = luaL_checklstring(L, 4, &bn);
    int pt = opt_table_index(L, 5);
    int wait = lua_toboolean(L, 6);
    if (wait)
        need_task(L, "publish");
    lstr props[NPROPS];
    size_t total = en + rn + bn;
    for (int i = 0; i < NPROPS; i++) {
        props[i] = opt_lstr(L, pt, PROP_NAMES[i]);
        total += props[i].n;
    }
    int persistent = opt_flag(L, pt, "persistent", 1, 0);
    int priority = -1;
    double timestamp = -1;
    targ headers[MAX_ARGS];
    int nh = 0;
    if (pt) {
        lua_getfield(L, pt, "priority");
        if (!lua_isnil(L, -1))
            priority = (int)luaL_checknumber(L, -1);
        lua_getfield(L, pt, "timestamp");
        if (!lua_isnil(L, -1))
            timestamp = luaL_checknumber(L, -1);
        lua_getfield(L, pt, "headers");
        nh = gather_table(L, lua_gettop(L), "headers", headers);
        total += targs_size(headers, nh);
        /* the three values stay on the stack until we return */
    }
    aconn *c = ud->c;
    if (!c)
        return closed_error(L);
    if (c->state != ST_CONNECTED || c->closing)
        return not_connected(L, c);
    cbuf b;
    cmd *k = cmd_alloc(L, C_PUBLISH, nh, total, &b);
    k->s1 = cb_put(&b, exchange, en);
    k->s2 = cb_put(&b, rkey, rn);
    k->body = cb_put(&b, body, bn);
    amqp_basic_properties_t *p = &k->props;
    for (int i = 0; i < NPROPS; i++) {
        if (props[i].p) {
            *prop_slot(p, i) = cb_put(&b, props[i].p, props[i].n);
            p->_flags |= PROP_FLAGS[i];
        }
    }
    p->_flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
    p->delivery_mode = persistent ? 2 : 1;
    if (priority >= 0) {
        p->_flags |= AMQP_BASIC_PRIORITY_FLAG;
        p->priority = (uint8_t)priority;
    }
    if (timestamp >= 0) {
        p->_flags |= AMQP_BASIC_TIMESTAMP_FLAG;
        p->timestamp = (uint64_t)timestamp;
    }
    if (nh) {
        fill_table(k, &b, headers, nh);
        p->_flags |= AMQP_BASIC_HEADERS_FLAG;
        p->headers = k->args;
    }
    c->st_published++;
    if (wait)
        return wait_and_submit(L, c, k);
    submit(c, k);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_declare_queue(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    size_t qn;
    const char *name = luaL_checklstring(L, 2, &qn);
    int t = opt_table_index(L, 3);
    need_task(L, "declare_queue");
    int flags = opt_flag(L, t, "durable", F_DURABLE, 0) | opt_flag(L, t, "exclusive", F_EXCLUSIVE, 0) |
                opt_flag(L, t, "auto_delete", F_AUTO_DELETE, 0) | opt_flag(L, t, "passive", F_PASSIVE, 0);
    targ args[MAX_ARGS];
    int na = 0;
    if (t) {
        lua_getfield(L, t, "arguments");
        na = gather_table(L, lua_gettop(L), "arguments", args);
    }
    aconn *c = ud->c;
    if (!c)
        return closed_error(L);
    if (c->state != ST_CONNECTED || c->closing)
        return not_connected(L, c);
    cbuf b;
    cmd *k = cmd_alloc(L, C_DECLARE_QUEUE, na, qn + targs_size(args, na), &b);
    k->s1 = cb_put(&b, name, qn);
    k->flags = flags;
    fill_table(k, &b, args, na);
    return wait_and_submit(L, c, k);
}

static int l_declare_exchange(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    size_t xn, tn;
    const char *name = luaL_checklstring(L, 2, &xn);
    const char *type = luaL_checklstring(L, 3, &tn);
    int t = opt_table_index(L, 4);
    need_task(L, "declare_exchange");
    int flags = opt_flag(L, t, "durable", F_DURABLE, 0) | opt_flag(L, t, "auto_delete", F_AUTO_DELETE, 0) |
                opt_flag(L, t, "passive", F_PASSIVE, 0);
    aconn *c = ud->c;
    if (!c)
        return closed_error(L);
    if (c->state != ST_CONNECTED || c->closing)
        return not_connected(L, c);
    cbuf b;
    cmd *k = cmd_alloc(L, C_DECLARE_EXCHANGE, 0, xn + tn, &b);
    k->s1 = cb_put(&b, name, xn);
    k->s2 = cb_put(&b, type, tn);
    k->flags = flags;
    return wait_and_submit(L, c, k);
}

static int l_bind_queue(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    size_t qn, xn, rn = 0;
    const char *queue = luaL_checklstring(L, 2, &qn);
    const char *exchange = luaL_checklstring(L, 3, &xn);
    const char *rkey = luaL_optlstring(L, 4, "", &rn);
    need_task(L, "bind_queue");
    aconn *c = ud->c;
    if (!c)
        return closed_error(L);
    if (c->state != ST_CONNECTED || c->closing)
        return not_connected(L, c);
    cbuf b;
    cmd *k = cmd_alloc(L, C_BIND, 0, qn + xn + rn, &b);
    k->s1 = cb_put(&b, queue, qn);
    k->s2 = cb_put(&b, exchange, xn);
    k->s3 = cb_put(&b, rkey, rn);
    return wait_and_submit(L, c, k);
}

static int queue_op(lua_State *L, int kind, const char *what)
{
    conn_ud *ud = check_ud(L);
    size_t qn;
    const char *queue = luaL_checklstring(L, 2, &qn);
    need_task(L, what);
    aconn *c = ud->c;
    if (!c)
        return closed_error(L);
    if (c->state != ST_CONNECTED || c->closing)
        return not_connected(L, c);
    cbuf b;
    cmd *k = cmd_alloc(L, kind, 0, qn, &b);
    k->s1 = cb_put(&b, queue, qn);
    return wait_and_submit(L, c, k);
}

static int l_delete_queue(lua_State *L) { return queue_op(L, C_DELETE_QUEUE, "delete_queue"); }
static int l_purge_queue(lua_State *L) { return queue_op(L, C_PURGE, "purge_queue"); }

static int l_consume(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    uint32_t epoch = (uint32_t)luaL_checknumber(L, 2);
    size_t qn, tn;
    const char *queue = luaL_checklstring(L, 3, &qn);
    const char *tag = luaL_checklstring(L, 4, &tn);
    int prefetch = (int)luaL_optnumber(L, 5, 10);
    luaL_argcheck(L, prefetch >= 0 && prefetch <= 65535, 5, "prefetch must be in 0..65535");
    int flags = (lua_toboolean(L, 6) ? F_NO_ACK : 0) | (lua_toboolean(L, 7) ? F_EXCLUSIVE : 0);
    need_task(L, "consume");
    aconn *c = ud->c;
    if (!c)
        return closed_error(L);
    if (c->state != ST_CONNECTED || c->closing)
        return not_connected(L, c);
    cbuf b;
    cmd *k = cmd_alloc(L, C_CONSUME, 0, qn + tn, &b);
    k->epoch = epoch;
    k->s1 = cb_put(&b, queue, qn);
    k->s2 = cb_put(&b, tag, tn);
    k->prefetch = prefetch;
    k->flags = flags;
    return wait_and_submit(L, c, k);
}

static int l_cancel(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    uint32_t epoch = (uint32_t)luaL_checknumber(L, 2);
    size_t tn;
    const char *tag = luaL_checklstring(L, 3, &tn);
    need_task(L, "cancel");
    aconn *c = ud->c;
    if (!c)
        return closed_error(L);
    if (c->state != ST_CONNECTED || c->closing || epoch != c->loop_epoch) {
        lua_pushboolean(L, 1);   /* the consumer went with its connection */
        return 1;
    }
    cbuf b;
    cmd *k = cmd_alloc(L, C_CANCEL, 0, tn, &b);
    k->epoch = epoch;
    k->s1 = cb_put(&b, tag, tn);
    return wait_and_submit(L, c, k);
}

static int settle(lua_State *L, int kind)
{
    conn_ud *ud = check_ud(L);
    uint32_t epoch = (uint32_t)luaL_checknumber(L, 2);
    double tag = luaL_checknumber(L, 3);
    int requeue = kind == C_NACK && (lua_isnoneornil(L, 4) || lua_toboolean(L, 4));
    aconn *c = ud->c;
    if (!c || c->closing || epoch != c->loop_epoch || c->state != ST_CONNECTED) {
        if (c)
            c->st_stale++;
        lua_pushboolean(L, 0);
        return 1;
    }
    cbuf b;
    cmd *k = cmd_alloc(L, kind, 0, 0, &b);
    k->epoch = epoch;
    k->tag = (uint64_t)tag;
    k->flags = requeue ? F_REQUEUE : 0;
    if (kind == C_ACK)
        c->st_acked++;
    else
        c->st_nacked++;
    submit(c, k);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_ack(lua_State *L) { return settle(L, C_ACK); }
static int l_nack(lua_State *L) { return settle(L, C_NACK); }

static int l_close(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    aconn *c = ud->c;
    if (!c) {
        lua_pushboolean(L, 1);
        return 1;
    }
    int can_wait = tamarco_host_of(L) && tamarco_in_task(L) && c->close_nwaits < 8;
    if (!c->closing) {
        c->closing = 1;
        update_ref(c);
        cbuf b;
        cmd *k = cmd_alloc(L, C_CLOSE, 0, 0, &b);
        submit(c, k);
        uv_mutex_lock(&c->mu);
        c->stop = 1;
        uv_mutex_unlock(&c->mu);
        amqp_interrupt_login(c);
    }
    if (!can_wait) {
        lua_pushboolean(L, 1);
        return 1;
    }
    c->close_waits[c->close_nwaits] = tamarco_wait_begin(L, NULL, NULL);
    tamarco_wait_note(c->host, c->close_waits[c->close_nwaits++], "amqp", "close", 0);
    return tamarco_wait_yield(L);
}

static int l_info(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    aconn *c = ud->c;
    lua_createtable(L, 0, 16);
    if (!c) {
        lua_pushliteral(L, "closed");
        lua_setfield(L, -2, "state");
        return 1;
    }
    lua_pushstring(L, c->closing ? "closing" : state_name(c->state));
    lua_setfield(L, -2, "state");
    lua_pushnumber(L, c->loop_epoch);
    lua_setfield(L, -2, "epoch");
    if (c->last_error[0]) {
        lua_pushstring(L, c->last_error);
        lua_setfield(L, -2, "last_error");
    }
    lua_pushstring(L, c->hostnames[c->loop_cur]);
    lua_setfield(L, -2, "host");
    lua_pushinteger(L, c->ports[c->loop_cur]);
    lua_setfield(L, -2, "port");
    lua_pushstring(L, c->vhost);
    lua_setfield(L, -2, "vhost");
    lua_pushstring(L, c->user);
    lua_setfield(L, -2, "user");
    lua_pushinteger(L, c->pending_waits);
    lua_setfield(L, -2, "pending");
#define STAT(f, name) lua_pushnumber(L, c->f); lua_setfield(L, -2, name);
    STAT(st_published, "published")
    STAT(st_delivered, "delivered")
    STAT(st_acked, "acked")
    STAT(st_nacked, "nacked")
    STAT(st_stale, "stale_settlements")
    STAT(st_reconnects, "reconnects")
#undef STAT
    return 1;
}

/* The state is closing (process exit) with the connection still open:
 * stop the thread synchronously. */
static int l_gc(lua_State *L)
{
    conn_ud *ud = luaL_checkudata(L, 1, CONN_MT);
    aconn *c = ud->c;
    if (!c)
        return 0;
    ud->c = NULL;
    c->ud = NULL;
    uv_mutex_lock(&c->mu);
    c->stop = 1;
    uv_mutex_unlock(&c->mu);
    amqp_interrupt_login(c);
    uint64_t one = 1;
    ssize_t w = write(c->efd, &one, sizeof one);
    (void)w;
    if (c->thread_running) {
        uv_thread_join(&c->tid);
        c->thread_running = 0;
    }
    c->state = ST_CLOSED;
    amqp_free_events(tamarco_mailbox_close(&c->events, on_handle_closed));
    return 0;
}

static int l_tostring(lua_State *L)
{
    conn_ud *ud = check_ud(L);
    if (ud->c)
        lua_pushfstring(L, "amqp connection %s:%d (%s)", ud->c->hostnames[ud->c->loop_cur],
                        ud->c->ports[ud->c->loop_cur], state_name(ud->c->state));
    else
        lua_pushliteral(L, "amqp connection (closed)");
    return 1;
}

/* ---- connect ---- */

static int l_connect(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    tamarco_host *host = tamarco_check_host(L, "amqp.connect: AMQP");
    lua_getfield(L, 1, "on_state");
    luaL_argcheck(L, lua_isfunction(L, -1), 1, "'on_state' must be a function");
    lua_getfield(L, 1, "on_delivery");
    luaL_argcheck(L, lua_isfunction(L, -1), 1, "'on_delivery' must be a function");
    int port = (int)tamarco_opt_int(L, 1, "amqp.connect", "port", 5672, 1, 65535);
    int heartbeat = (int)tamarco_opt_int(L, 1, "amqp.connect", "heartbeat", 30, 0, 65535);
    int timeout_ms = (int)tamarco_opt_int(L, 1, "amqp.connect", "timeout_ms", 10000, 1, 3600000);
    int backoff_ms = (int)tamarco_opt_int(L, 1, "amqp.connect", "backoff_ms", 200, 1, 3600000);
    int backoff_max_ms = (int)tamarco_opt_int(L, 1, "amqp.connect", "backoff_max_ms", 5000, 1, 3600000);
    int confirm_timeout_ms = (int)tamarco_opt_int(L, 1, "amqp.connect", "confirm_timeout_ms", 0, 0, 86400000);
    lua_getfield(L, 1, "host");
    lua_getfield(L, 1, "vhost");
    lua_getfield(L, 1, "user");
    lua_getfield(L, 1, "password");
    lua_getfield(L, 1, "name");
    for (int i = 4; i <= 8; i++)
        if (!lua_isnil(L, i) && lua_type(L, i) != LUA_TSTRING)
            return luaL_error(L, "amqp.connect: host, vhost, user, password and name must be strings");
    lua_settop(L, 3);
    /* hosts = {{host = h, port = p}, ...}: the nodes, tried in this order */
    lua_getfield(L, 1, "hosts");
    int nhosts = 1;
    if (!lua_isnil(L, 4)) {
        luaL_argcheck(L, lua_istable(L, 4) && lua_objlen(L, 4) > 0, 1, "'hosts' must be a non-empty list");
        nhosts = (int)lua_objlen(L, 4);
        for (int i = 1; i <= nhosts; i++) {
            lua_rawgeti(L, 4, i);
            if (!lua_istable(L, -1))
                return luaL_error(L, "amqp.connect: hosts[%d] must be {host = ..., port = ...}", i);
            lua_getfield(L, -1, "host");
            lua_getfield(L, -2, "port");
            if (lua_type(L, -2) != LUA_TSTRING || lua_type(L, -1) != LUA_TNUMBER || lua_tonumber(L, -1) < 1 ||
                lua_tonumber(L, -1) > 65535)
                return luaL_error(L, "amqp.connect: hosts[%d] needs a string host and a port in 1..65535", i);
            lua_pop(L, 3);
        }
    }

    aconn *c = calloc(1, sizeof *c);
    if (!c)
        return luaL_error(L, "out of memory");
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    uv_mutex_init(&c->mu);
    c->on_state_ref = c->on_delivery_ref = c->ud_ref = LUA_NOREF;
    c->login_fd = -1;
    const char *keys[4] = {"vhost", "user", "password", "name"};
    const char *defaults[4] = {"/", "guest", "guest", "tamarco-host"};
    char **slots[4] = {&c->vhost, &c->user, &c->password, &c->name};
    int failed = c->efd < 0;
    for (int i = 0; i < 4; i++) {
        lua_getfield(L, 1, keys[i]);
        *slots[i] = strdup(lua_isstring(L, -1) ? lua_tostring(L, -1) : defaults[i]);
        lua_pop(L, 1);
        if (!*slots[i])
            failed = 1;
    }
    c->hostnames = calloc((size_t)nhosts, sizeof *c->hostnames);
    c->ports = calloc((size_t)nhosts, sizeof *c->ports);
    if (c->hostnames && c->ports) {
        c->nhosts = nhosts;
        for (int i = 0; i < nhosts; i++) {
            if (lua_isnil(L, 4)) {
                lua_getfield(L, 1, "host");
                c->hostnames[i] = strdup(lua_isstring(L, -1) ? lua_tostring(L, -1) : "127.0.0.1");
                c->ports[i] = port;
                lua_pop(L, 1);
            } else {
                lua_rawgeti(L, 4, i + 1);
                lua_getfield(L, -1, "host");
                lua_getfield(L, -2, "port");
                c->hostnames[i] = strdup(lua_tostring(L, -2));
                c->ports[i] = (int)lua_tonumber(L, -1);
                lua_pop(L, 3);
            }
            if (!c->hostnames[i])
                failed = 1;
        }
    } else {
        failed = 1;
    }
    lua_settop(L, 3);
    if (failed) {
        free_conn(c);
        return luaL_error(L, "amqp.connect: out of memory or file descriptors");
    }
    c->heartbeat = heartbeat;
    c->confirm_timeout_ms = confirm_timeout_ms;
    c->timeout_ms = timeout_ms;
    c->backoff_ms = backoff_ms;
    c->backoff_max_ms = backoff_max_ms < backoff_ms ? backoff_ms : backoff_max_ms;
    c->host = host;

    if (tamarco_mailbox_init(&c->events, host->loop, on_events) != 0) {
        free_conn(c);
        return luaL_error(L, "amqp.connect: uv_async_init failed");
    }
    c->events.async.data = c;

    conn_ud *ud = lua_newuserdata(L, sizeof *ud);
    ud->c = c;
    c->ud = ud;
    luaL_getmetatable(L, CONN_MT);
    lua_setmetatable(L, -2);
    lua_pushvalue(L, -1);
    c->ud_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 2);
    c->on_state_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushvalue(L, 3);
    c->on_delivery_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    if (uv_thread_create(&c->tid, amqp_io_main, c) != 0) {
        /* the userdata stays (closed); the handle goes */
        ud->c = NULL;
        luaL_unref(L, LUA_REGISTRYINDEX, c->ud_ref);
        luaL_unref(L, LUA_REGISTRYINDEX, c->on_state_ref);
        luaL_unref(L, LUA_REGISTRYINDEX, c->on_delivery_ref);
        amqp_free_events(tamarco_mailbox_close(&c->events, on_handle_closed));
        return luaL_error(L, "amqp.connect: cannot start the I/O thread");
    }
    c->thread_running = 1;
    return 1;
}

int luaopen_tamarco_c_amqp(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"publish", l_publish},
        {"declare_queue", l_declare_queue},
        {"declare_exchange", l_declare_exchange},
        {"bind_queue", l_bind_queue},
        {"delete_queue", l_delete_queue},
        {"purge_queue", l_purge_queue},
        {"consume", l_consume},
        {"cancel", l_cancel},
        {"ack", l_ack},
        {"nack", l_nack},
        {"close", l_close},
        {"info", l_info},
        {NULL, NULL},
    };
    static const luaL_Reg funcs[] = {
        {"connect", l_connect},
        {NULL, NULL},
    };
    /* uv handles may still call into this module while the host shuts down */
    tamarco_keep_loaded((const void *)luaopen_tamarco_c_amqp);
    tamarco_class_register(L, CONN_MT, methods, l_gc, l_tostring);
    tamarco_module_new(L, funcs);
    lua_pushstring(L, amqp_version());
    lua_setfield(L, -2, "librabbitmq_version");
    return 1;
}
