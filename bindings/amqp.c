/*
 * tamarco.c.amqp: AMQP 0-9-1 connections (librabbitmq) for the AMQP
 * resource. Thin: it moves frames; naming, codecs, consumers, re-declaring
 * and acking policy live in lua/tamarco/resources/amqp.lua.
 *
 * Why an I/O thread per connection: rabbitmq-c blocks (connect, login,
 * every RPC, and publishes to a broker that stops reading), so one OS
 * thread owns the connection and the loop never calls into rabbitmq-c.
 * Design, channels, epochs, batched acks and the Lua API:
 * docs/internals/amqp.md.
 */
#include "host.h"
#include "backoff.h"
#include "lua_class.h"
#include "lua_options.h"
#include "mailbox.h"
#include "task_guard.h"

#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

int luaopen_tamarco_c_amqp(lua_State *L);

#define CONN_MT "tamarco.amqp.connection"
#define CH_MAIN 1
#define CH_ADMIN 2
#define MAX_ARGS 32
#define FRAME_MAX 131072
#define READ_BATCH 512

enum { ST_CONNECTING = 1, ST_CONNECTED, ST_FAILED, ST_CLOSED };

enum {
    C_PUBLISH = 1, C_ACK, C_NACK, C_DECLARE_QUEUE, C_DECLARE_EXCHANGE, C_BIND,
    C_DELETE_QUEUE, C_PURGE, C_CONSUME, C_CANCEL, C_CLOSE,
};

enum { F_DURABLE = 1, F_EXCLUSIVE = 2, F_AUTO_DELETE = 4, F_PASSIVE = 8, F_NO_ACK = 16,
       F_REQUEUE = 32, F_PERSISTENT = 64 };

enum { E_STATE = 1, E_DONE, E_DELIVERY, E_CANCELLED, E_CLOSED };

/* ---------------------------------------------------------------------
 * Commands (loop -> thread) and events (thread -> loop): one allocation
 * each, strings copied after the struct.
 * ------------------------------------------------------------------- */

typedef struct cmd {
    struct cmd *next;
    int kind;
    int wait_id;            /* 0: nobody waits */
    uint32_t epoch;
    int flags;
    int prefetch;
    uint64_t tag;
    amqp_bytes_t s1, s2, s3, body;
    amqp_basic_properties_t props;
    amqp_table_t args;      /* queue arguments or headers */
    amqp_table_entry_t entries[];   /* args.entries points here */
} cmd;

/* Property strings of a delivery, in the order of PROP_NAMES. */
#define NPROPS 9
static const char *const PROP_NAMES[NPROPS] = {
    "content_type", "content_encoding", "correlation_id", "reply_to", "expiration",
    "message_id", "type", "user_id", "app_id",
};
static const amqp_flags_t PROP_FLAGS[NPROPS] = {
    AMQP_BASIC_CONTENT_TYPE_FLAG, AMQP_BASIC_CONTENT_ENCODING_FLAG, AMQP_BASIC_CORRELATION_ID_FLAG,
    AMQP_BASIC_REPLY_TO_FLAG, AMQP_BASIC_EXPIRATION_FLAG, AMQP_BASIC_MESSAGE_ID_FLAG,
    AMQP_BASIC_TYPE_FLAG, AMQP_BASIC_USER_ID_FLAG, AMQP_BASIC_APP_ID_FLAG,
};

static amqp_bytes_t *prop_slot(amqp_basic_properties_t *p, int i)
{
    switch (i) {
    case 0: return &p->content_type;
    case 1: return &p->content_encoding;
    case 2: return &p->correlation_id;
    case 3: return &p->reply_to;
    case 4: return &p->expiration;
    case 5: return &p->message_id;
    case 6: return &p->type;
    case 7: return &p->user_id;
    default: return &p->app_id;
    }
}

typedef struct event {
    tamarco_mail link;           /* first: the events' way to the loop */
    int kind;
    int wait_id;
    int ok;
    int state;
    uint32_t epoch;
    double n1, n2;               /* E_DONE: numbers (message/consumer counts) */
    uint64_t delivery_tag;
    int redelivered;
    int has_delivery_mode, delivery_mode, has_priority, priority, has_timestamp;
    uint64_t timestamp;
    amqp_bytes_t text;           /* error, result string, consumer tag of a cancel */
    amqp_bytes_t consumer_tag, exchange, routing_key, body;
    amqp_bytes_t props[NPROPS];  /* len 0 and bytes NULL when absent */
    amqp_bytes_t headers;        /* flat encoded headers, see encode_headers */
    size_t used, size;           /* of data */
    char data[];
} event;

static event *event_new(int kind, size_t extra)
{
    event *e = calloc(1, sizeof *e + extra);
    if (!e)
        return NULL;
    e->kind = kind;
    e->size = extra;
    return e;
}

static amqp_bytes_t event_str(event *e, const void *p, size_t n)
{
    amqp_bytes_t b = {0, NULL};
    if (!p || e->used + n > e->size)
        return b;
    memcpy(e->data + e->used, p, n);
    b.bytes = e->data + e->used;
    b.len = n;
    e->used += n;
    return b;
}

/* ---------------------------------------------------------------------
 * The connection record
 * ------------------------------------------------------------------- */

typedef struct pending_delivery {
    int active, discard;
    uint64_t delivery_tag;
    int redelivered;
    size_t body_size, got;
    char ctag[256], exchange[256], rkey[256];
    size_t ctag_n, exchange_n, rkey_n;
    event *ev;
} pending_delivery;

typedef struct aconn {
    /* shared: under mu */
    uv_mutex_t mu;
    cmd *cmd_head, *cmd_tail;
    int signaled;
    tamarco_mailbox events;         /* I/O thread -> loop (locked on its own) */
    int stop;
    int efd;

    /* immutable after connect() */
    char **hostnames;               /* the cluster's nodes, tried in turn */
    int *ports, nhosts;
    char *vhost, *user, *password, *name;
    int heartbeat, timeout_ms, backoff_ms, backoff_max_ms;
    int confirm_timeout_ms;         /* 0: wait for confirms as long as the connection lives */
    int login_fd;                   /* under mu: the socket while logging in, else -1 */

    /* I/O thread only */
    amqp_connection_state_t conn;
    int cur;                        /* index of the node tried or connected to */
    uint32_t epoch;
    event *out_head, *out_tail;     /* events not yet handed to the loop */
    pending_delivery pd;
    int *pw;                        /* publish window: wait id per seq, -1 done */
    size_t pw_cap, pw_head, pw_count;
    uint64_t pw_base;               /* seq of pw[pw_head] */
    uint64_t pub_seq;               /* last seq assigned */
    uint64_t pw_progress_ns;        /* when the oldest unconfirmed publish became the oldest */
    uint64_t nack_since_ns;         /* first basic.nack since the last basic.ack, 0: none */
    unsigned char *aw;              /* ack window: state per delivery tag */
    size_t aw_cap, aw_head, aw_count;
    uint64_t aw_base;               /* tag of aw[aw_head] */
    int acks_pending;
    char **noack_tags;
    int noack_n, noack_cap;
    char lost[640];                 /* why the connection was lost */

    /* loop thread only */
    tamarco_host *host;
    uv_thread_t tid;
    int thread_running;
    int state;
    int loop_cur;                   /* the node of the last state event */
    uint32_t loop_epoch;
    char last_error[512];
    int pending_waits;
    int async_refd;
    int in_async, signal_pending;   /* commands submitted while handling events */
    int closing;
    int close_waits[8];
    int close_nwaits;
    int ud_ref, on_state_ref, on_delivery_ref;
    struct conn_ud *ud;
    double st_published, st_confirmed, st_delivered, st_acked, st_nacked, st_stale, st_reconnects;
} aconn;

typedef struct conn_ud {
    aconn *c;
} conn_ud;

/* ---------------------------------------------------------------------
 * Thread side: helpers
 * ------------------------------------------------------------------- */

static void free_events(tamarco_mail *list)
{
    while (list) {
        tamarco_mail *next = list->next;
        free(list);
        list = next;
    }
}

static void post(aconn *c, event *e)
{
    if (!e)
        return;
    e->link.next = NULL;
    if (c->out_tail)
        c->out_tail->link.next = &e->link;
    else
        c->out_head = e;
    c->out_tail = e;
}

/* Hands the events gathered so far to the loop. */
static void flush_events(aconn *c)
{
    if (!c->out_head)
        return;
    if (tamarco_mailbox_post_list(&c->events, &c->out_head->link, &c->out_tail->link) != 0)
        free_events(&c->out_head->link);   /* the loop closed the connection */
    c->out_head = c->out_tail = NULL;
}

static void post_text(aconn *c, int kind, int wait_id, int ok, const char *text)
{
    size_t n = text ? strlen(text) : 0;
    event *e = event_new(kind, n);
    if (!e)
        return;
    e->wait_id = wait_id;
    e->ok = ok;
    e->epoch = c->epoch;
    e->text = event_str(e, text, n);
    post(c, e);
}

static void post_state(aconn *c, int state, const char *err)
{
    size_t n = err ? strlen(err) : 0;
    event *e = event_new(E_STATE, n);
    if (!e)
        return;
    e->state = state;
    e->epoch = c->epoch;
    e->n1 = c->cur;
    e->text = event_str(e, err, n);
    post(c, e);
    flush_events(c);
}

static void done_ok(aconn *c, int wait_id, const void *text, size_t n, double n1, double n2)
{
    if (!wait_id)
        return;
    event *e = event_new(E_DONE, n);
    if (!e)
        return;
    e->wait_id = wait_id;
    e->ok = 1;
    e->n1 = n1;
    e->n2 = n2;
    e->text = event_str(e, text, n);
    post(c, e);
}

static void done_fail(aconn *c, int wait_id, const char *err)
{
    if (wait_id)
        post_text(c, E_DONE, wait_id, 0, err);
}

static int thread_stopping(aconn *c)
{
    uv_mutex_lock(&c->mu);
    int s = c->stop;
    uv_mutex_unlock(&c->mu);
    return s;
}

static cmd *take_commands(aconn *c)
{
    uint64_t v;
    while (read(c->efd, &v, sizeof v) > 0) {}
    uv_mutex_lock(&c->mu);
    cmd *list = c->cmd_head;
    c->cmd_head = c->cmd_tail = NULL;
    c->signaled = 0;
    uv_mutex_unlock(&c->mu);
    return list;
}

/* Puts commands that were not executed back in front of the queue. */
static void requeue_commands(aconn *c, cmd *list)
{
    if (!list)
        return;
    cmd *last = list;
    while (last->next)
        last = last->next;
    uv_mutex_lock(&c->mu);
    last->next = c->cmd_head;
    c->cmd_head = list;
    if (!c->cmd_tail)
        c->cmd_tail = last;
    uv_mutex_unlock(&c->mu);
}

/* Answers a command that cannot run (no connection, closing). */
static void refuse(aconn *c, cmd *k, const char *why)
{
    if (k->kind != C_ACK && k->kind != C_NACK)
        done_fail(c, k->wait_id, why);
}

static void ms_to_tv(int ms, struct timeval *tv)
{
    tv->tv_sec = ms / 1000;
    tv->tv_usec = (ms % 1000) * 1000;
}

/* Describes a failed RPC; sets *conn_dead when the connection is unusable
 * and *chan_closed when the broker closed the channel (close-ok is sent). */
static void rpc_error(aconn *c, amqp_rpc_reply_t r, amqp_channel_t ch, const char *what,
                      char *err, size_t size, int *conn_dead, int *chan_closed)
{
    switch (r.reply_type) {
    case AMQP_RESPONSE_NORMAL:
        snprintf(err, size, "%s: ok", what);
        return;
    case AMQP_RESPONSE_NONE:
        snprintf(err, size, "%s: no reply from the broker", what);
        *conn_dead = 1;
        return;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
        snprintf(err, size, "%s: %s", what, amqp_error_string2(r.library_error));
        *conn_dead = 1;
        return;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
        if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
            amqp_connection_close_t *m = r.reply.decoded;
            snprintf(err, size, "%s: connection closed by the broker: %u %.*s", what, m->reply_code,
                     (int)m->reply_text.len, (char *)m->reply_text.bytes);
            amqp_connection_close_ok_t ok;
            if (c->conn)
                amqp_send_method(c->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
            *conn_dead = 1;
        } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *m = r.reply.decoded;
            snprintf(err, size, "%s: %u %.*s", what, m->reply_code, (int)m->reply_text.len,
                     (char *)m->reply_text.bytes);
            amqp_channel_close_ok_t ok;
            if (c->conn)
                amqp_send_method(c->conn, ch, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
            *chan_closed = 1;
        } else {
            snprintf(err, size, "%s: unexpected method 0x%08X from the broker", what, r.reply.id);
            *conn_dead = 1;
        }
        return;
    }
}

/* ---- publish window: seq -> wait id ---- */

static int pw_push(aconn *c, int wait_id)
{
    if (c->pw_count == c->pw_cap) {
        size_t cap = c->pw_cap ? c->pw_cap * 2 : 1024;
        int *grown = malloc(cap * sizeof *grown);
        if (!grown)
            return -1;
        for (size_t i = 0; i < c->pw_count; i++)
            grown[i] = c->pw[(c->pw_head + i) % c->pw_cap];
        free(c->pw);
        c->pw = grown;
        c->pw_cap = cap;
        c->pw_head = 0;
    }
    if (c->pw_count == 0) {
        c->pw_base = c->pub_seq;   /* the seq being pushed */
        c->pw_progress_ns = uv_hrtime();
    }
    c->pw[(c->pw_head + c->pw_count) % c->pw_cap] = wait_id;
    c->pw_count++;
    return 0;
}

static void pw_settle_one(aconn *c, size_t i, int ok)
{
    int *slot = &c->pw[(c->pw_head + i) % c->pw_cap];
    if (*slot < 0)
        return;
    if (*slot > 0) {
        if (ok)
            done_ok(c, *slot, NULL, 0, 0, 0);
        else
            done_fail(c, *slot, "the broker refused the message (basic.nack)");
    }
    *slot = -1;
}

static void pw_confirm(aconn *c, uint64_t tag, int multiple, int ok)
{
    if (c->pw_count == 0 || tag < c->pw_base)
        return;
    size_t idx = (size_t)(tag - c->pw_base);
    if (idx >= c->pw_count)
        idx = c->pw_count - 1;   /* multiple beyond what we sent: all */
    if (multiple) {
        for (size_t i = 0; i <= idx; i++)
            pw_settle_one(c, i, ok);
    } else {
        pw_settle_one(c, idx, ok);
    }
    while (c->pw_count > 0 && c->pw[c->pw_head] < 0) {
        c->pw_head = (c->pw_head + 1) % c->pw_cap;
        c->pw_count--;
        c->pw_base++;
        c->pw_progress_ns = uv_hrtime();
    }
}

static void pw_fail_all(aconn *c, const char *why)
{
    for (size_t i = 0; i < c->pw_count; i++) {
        int w = c->pw[(c->pw_head + i) % c->pw_cap];
        if (w > 0)
            done_fail(c, w, why);
    }
    c->pw_count = c->pw_head = 0;
    c->pw_base = 0;
}

/* ---- ack window: delivery tag -> state ---- */

enum { A_UNSETTLED = 0, A_PENDING = 1, A_SETTLED = 2 };

static unsigned char *aw_at(aconn *c, uint64_t tag)
{
    if (tag < c->aw_base || tag >= c->aw_base + c->aw_count)
        return NULL;
    return &c->aw[(c->aw_head + (size_t)(tag - c->aw_base)) % c->aw_cap];
}

static int aw_add(aconn *c, uint64_t tag, unsigned char state)
{
    if (c->aw_count == 0)
        c->aw_base = tag;
    if (tag < c->aw_base + c->aw_count)
        return 0;   /* not new */
    while (c->aw_base + c->aw_count <= tag) {
        if (c->aw_count == c->aw_cap) {
            size_t cap = c->aw_cap ? c->aw_cap * 2 : 1024;
            unsigned char *grown = malloc(cap);
            if (!grown)
                return -1;
            for (size_t i = 0; i < c->aw_count; i++)
                grown[i] = c->aw[(c->aw_head + i) % c->aw_cap];
            free(c->aw);
            c->aw = grown;
            c->aw_cap = cap;
            c->aw_head = 0;
        }
        uint64_t t = c->aw_base + c->aw_count;
        c->aw[(c->aw_head + c->aw_count) % c->aw_cap] = t == tag ? state : A_SETTLED;
        c->aw_count++;
    }
    return 0;
}

static void aw_trim(aconn *c)
{
    while (c->aw_count > 0 && c->aw[c->aw_head] == A_SETTLED) {
        c->aw_head = (c->aw_head + 1) % c->aw_cap;
        c->aw_count--;
        c->aw_base++;
    }
}

/* Sends the acks marked pending. Returns 0 or an amqp status. */
static int flush_acks(aconn *c)
{
    if (!c->acks_pending)
        return 0;
    c->acks_pending = 0;
    uint64_t t = c->aw_base, end = c->aw_base + c->aw_count, last = 0;
    for (; t < end; t++) {
        unsigned char *s = aw_at(c, t);
        if (*s == A_UNSETTLED)
            break;
        if (*s == A_PENDING)
            last = t;
    }
    if (last) {
        int rc = amqp_basic_ack(c->conn, CH_MAIN, last, 1);
        if (rc < 0)
            return rc;
        for (uint64_t u = c->aw_base; u <= last; u++)
            *aw_at(c, u) = A_SETTLED;
    }
    for (; t < end; t++) {
        unsigned char *s = aw_at(c, t);
        if (*s == A_PENDING) {
            int rc = amqp_basic_ack(c->conn, CH_MAIN, t, 0);
            if (rc < 0)
                return rc;
            *s = A_SETTLED;
        }
    }
    aw_trim(c);
    return 0;
}

static int is_noack(aconn *c, const char *tag, size_t n)
{
    for (int i = 0; i < c->noack_n; i++)
        if (strlen(c->noack_tags[i]) == n && memcmp(c->noack_tags[i], tag, n) == 0)
            return 1;
    return 0;
}

static void noack_add(aconn *c, amqp_bytes_t tag)
{
    if (c->noack_n == c->noack_cap) {
        int cap = c->noack_cap ? c->noack_cap * 2 : 8;
        char **grown = realloc(c->noack_tags, (size_t)cap * sizeof *grown);
        if (!grown)
            return;
        c->noack_tags = grown;
        c->noack_cap = cap;
    }
    char *s = malloc(tag.len + 1);
    if (!s)
        return;
    memcpy(s, tag.bytes, tag.len);
    s[tag.len] = '\0';
    c->noack_tags[c->noack_n++] = s;
}

static void noack_remove(aconn *c, amqp_bytes_t tag)
{
    for (int i = 0; i < c->noack_n; i++) {
        if (strlen(c->noack_tags[i]) == tag.len && memcmp(c->noack_tags[i], tag.bytes, tag.len) == 0) {
            free(c->noack_tags[i]);
            c->noack_tags[i] = c->noack_tags[--c->noack_n];
            return;
        }
    }
}

static void noack_clear(aconn *c)
{
    for (int i = 0; i < c->noack_n; i++)
        free(c->noack_tags[i]);
    c->noack_n = 0;
}

/* ---------------------------------------------------------------------
 * Thread side: connecting and the connected loop
 * ------------------------------------------------------------------- */

static int open_admin_channel(aconn *c, char *err, size_t size)
{
    amqp_channel_open(c->conn, CH_ADMIN);
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c->conn);
    if (r.reply_type == AMQP_RESPONSE_NORMAL)
        return 0;
    int dead = 0, closed = 0;
    rpc_error(c, r, CH_ADMIN, "channel.open", err, size, &dead, &closed);
    return -1;
}

/* Why a TCP connect failed: rabbitmq-c says only "a socket error
 * occurred", so one non-blocking connect of our own (bounded by the
 * connection timeout, and ended by a stop) tells "Connection refused",
 * "No route to host", ... */
static void describe_connect_failure(aconn *c, const char *host, int port, char *out, size_t size)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    int gai = getaddrinfo(host, service, &hints, &res);
    if (gai != 0) {
        snprintf(out, size, "%s", gai_strerror(gai));
        return;
    }
    int why = 0;
    for (struct addrinfo *a = res; a && why != ECONNREFUSED; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            why = errno;
            continue;
        }
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0) {
            why = 0;
        } else if (errno != EINPROGRESS) {
            why = errno;
        } else {
            struct pollfd pfd[2] = {{fd, POLLOUT, 0}, {c->efd, POLLIN, 0}};
            int n = poll(pfd, 2, c->timeout_ms);
            socklen_t len = sizeof why;
            if (n <= 0 || !(pfd[0].revents & (POLLOUT | POLLERR | POLLHUP)))
                why = ETIMEDOUT;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &why, &len) != 0)
                why = errno;
        }
        close(fd);
    }
    freeaddrinfo(res);
    if (why)
        snprintf(out, size, "%s", strerror(why));
    else
        snprintf(out, size, "a socket error occurred (the port accepts connections now)");
}

static void set_login_fd(aconn *c, int fd)
{
    uv_mutex_lock(&c->mu);
    c->login_fd = fd;
    uv_mutex_unlock(&c->mu);
}

/* A stop while the thread waits for the broker's handshake (a broker that
 * accepts and never answers) ends that wait now instead of after the
 * connection timeout. Loop side. */
static void interrupt_login(aconn *c)
{
    uv_mutex_lock(&c->mu);
    if (c->login_fd >= 0)
        shutdown(c->login_fd, SHUT_RDWR);
    uv_mutex_unlock(&c->mu);
}

static int io_connect(aconn *c, char *err, size_t size)
{
    const char *host = c->hostnames[c->cur];
    int port = c->ports[c->cur];
    amqp_connection_state_t conn = amqp_new_connection();
    if (!conn) {
        snprintf(err, size, "out of memory");
        return -1;
    }
    amqp_socket_t *sock = amqp_tcp_socket_new(conn);
    if (!sock) {
        amqp_destroy_connection(conn);
        snprintf(err, size, "cannot create a socket");
        return -1;
    }
    struct timeval tv;
    ms_to_tv(c->timeout_ms, &tv);
    int rc = amqp_socket_open_noblock(sock, host, port, &tv);
    if (rc != AMQP_STATUS_OK) {
        char why[256];
        if (rc == AMQP_STATUS_SOCKET_ERROR)
            describe_connect_failure(c, host, port, why, sizeof why);
        else
            snprintf(why, sizeof why, "%s", amqp_error_string2(rc));
        snprintf(err, size, "cannot connect to %s:%d: %s", host, port, why);
        amqp_destroy_connection(conn);
        return -1;
    }
    set_login_fd(c, amqp_get_sockfd(conn));
    if (thread_stopping(c))
        interrupt_login(c);   /* the stop came before the fd was known */
    amqp_set_handshake_timeout(conn, &tv);
    amqp_set_rpc_timeout(conn, &tv);

    amqp_table_entry_t caps[3], props[3];
    caps[0].key = amqp_cstring_bytes("consumer_cancel_notify");
    caps[1].key = amqp_cstring_bytes("publisher_confirms");
    caps[2].key = amqp_cstring_bytes("basic.nack");
    for (int i = 0; i < 3; i++) {
        caps[i].value.kind = AMQP_FIELD_KIND_BOOLEAN;
        caps[i].value.value.boolean = 1;
    }
    props[0].key = amqp_cstring_bytes("capabilities");
    props[0].value.kind = AMQP_FIELD_KIND_TABLE;
    props[0].value.value.table.num_entries = 3;
    props[0].value.value.table.entries = caps;
    props[1].key = amqp_cstring_bytes("connection_name");
    props[1].value.kind = AMQP_FIELD_KIND_UTF8;
    props[1].value.value.bytes = amqp_cstring_bytes(c->name);
    props[2].key = amqp_cstring_bytes("product");
    props[2].value.kind = AMQP_FIELD_KIND_UTF8;
    props[2].value.value.bytes = amqp_cstring_bytes("tamarco-host");
    amqp_table_t ptable = {3, props};

    c->conn = conn;
    amqp_rpc_reply_t r = amqp_login_with_properties(conn, c->vhost, 0, FRAME_MAX, c->heartbeat, &ptable,
                                                    AMQP_SASL_METHOD_PLAIN, c->user, c->password);
    int dead = 0, closed = 0;
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        char what[300];
        snprintf(what, sizeof what, "login to %s:%d vhost '%s' as '%s'", host, port, c->vhost, c->user);
        rpc_error(c, r, 0, what, err, size, &dead, &closed);
        goto fail;
    }
    amqp_channel_open(conn, CH_MAIN);
    r = amqp_get_rpc_reply(conn);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        rpc_error(c, r, CH_MAIN, "channel.open", err, size, &dead, &closed);
        goto fail;
    }
    amqp_confirm_select(conn, CH_MAIN);
    r = amqp_get_rpc_reply(conn);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        rpc_error(c, r, CH_MAIN, "confirm.select", err, size, &dead, &closed);
        goto fail;
    }
    if (open_admin_channel(c, err, size) != 0)
        goto fail;
    set_login_fd(c, -1);
    return 0;
fail:
    if (!thread_stopping(c))
        amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
    set_login_fd(c, -1);
    amqp_destroy_connection(conn);
    c->conn = NULL;
    return -1;
}

/* Drops the connection: everything that waited on it fails. */
static void io_disconnect(aconn *c, const char *why, int graceful)
{
    if (!c->conn)
        return;
    if (graceful) {
        struct timeval tv = {2, 0};
        amqp_set_rpc_timeout(c->conn, &tv);
        amqp_channel_close(c->conn, CH_ADMIN, AMQP_REPLY_SUCCESS);
        amqp_channel_close(c->conn, CH_MAIN, AMQP_REPLY_SUCCESS);
        amqp_connection_close(c->conn, AMQP_REPLY_SUCCESS);
    }
    amqp_destroy_connection(c->conn);
    c->conn = NULL;
    char msg[800];
    snprintf(msg, sizeof msg, "connection lost before the broker confirmed the message (%s)", why);
    pw_fail_all(c, msg);
    c->pub_seq = 0;
    c->nack_since_ns = 0;
    c->aw_count = c->aw_head = 0;
    c->aw_base = 0;
    c->acks_pending = 0;
    noack_clear(c);
    free(c->pd.ev);
    memset(&c->pd, 0, sizeof c->pd);
}

/* A failed command on a live connection: answers it; returns -1 when the
 * connection must be dropped (reason in c->lost). */
static int command_failed(aconn *c, cmd *k, amqp_rpc_reply_t r, amqp_channel_t ch, const char *what)
{
    char err[512];
    int dead = 0, closed = 0;
    rpc_error(c, r, ch, what, err, sizeof err, &dead, &closed);
    done_fail(c, k->wait_id, err);
    if (dead || (closed && ch == CH_MAIN)) {
        snprintf(c->lost, sizeof c->lost, "%s", err);
        return -1;
    }
    if (closed && ch == CH_ADMIN) {
        char e2[512];
        if (open_admin_channel(c, e2, sizeof e2) != 0) {
            snprintf(c->lost, sizeof c->lost, "cannot reopen the declaration channel: %s", e2);
            return -1;
        }
    }
    return 0;
}

/* Runs one command on the live connection. Returns 0, or -1 when the
 * connection is gone (c->lost says why). */
static int run_command(aconn *c, cmd *k)
{
    amqp_connection_state_t conn = c->conn;
    char err[512];
    int rc;
    switch (k->kind) {
    case C_PUBLISH:
        rc = amqp_basic_publish(conn, CH_MAIN, k->s1, k->s2, 0, 0, &k->props, k->body);
        if (rc < 0) {
            snprintf(c->lost, sizeof c->lost, "publish: %s", amqp_error_string2(rc));
            snprintf(err, sizeof err, "connection lost while publishing (%s)", amqp_error_string2(rc));
            done_fail(c, k->wait_id, err);
            return -1;
        }
        c->pub_seq++;
        if (pw_push(c, k->wait_id) != 0)
            done_fail(c, k->wait_id, "out of memory");
        return 0;
    case C_ACK:
        if (k->epoch == c->epoch) {
            unsigned char *s = aw_at(c, k->tag);
            if (s && *s == A_UNSETTLED) {
                *s = A_PENDING;
                c->acks_pending = 1;
            }
        }
        return 0;
    case C_NACK:
        if (k->epoch == c->epoch) {
            unsigned char *s = aw_at(c, k->tag);
            if (s && *s == A_UNSETTLED) {
                rc = amqp_basic_nack(conn, CH_MAIN, k->tag, 0, (k->flags & F_REQUEUE) != 0);
                if (rc < 0) {
                    snprintf(c->lost, sizeof c->lost, "nack: %s", amqp_error_string2(rc));
                    return -1;
                }
                *s = A_SETTLED;
                aw_trim(c);
            }
        }
        return 0;
    case C_DECLARE_QUEUE: {
        amqp_queue_declare_ok_t *ok = amqp_queue_declare(conn, CH_ADMIN, k->s1, (k->flags & F_PASSIVE) != 0,
            (k->flags & F_DURABLE) != 0, (k->flags & F_EXCLUSIVE) != 0, (k->flags & F_AUTO_DELETE) != 0, k->args);
        if (!ok)
            return command_failed(c, k, amqp_get_rpc_reply(conn), CH_ADMIN, "queue.declare");
        done_ok(c, k->wait_id, ok->queue.bytes, ok->queue.len, ok->message_count, ok->consumer_count);
        return 0;
    }
    case C_DECLARE_EXCHANGE: {
        amqp_exchange_declare_ok_t *ok = amqp_exchange_declare(conn, CH_ADMIN, k->s1, k->s2,
            (k->flags & F_PASSIVE) != 0, (k->flags & F_DURABLE) != 0, (k->flags & F_AUTO_DELETE) != 0, 0,
            amqp_empty_table);
        if (!ok)
            return command_failed(c, k, amqp_get_rpc_reply(conn), CH_ADMIN, "exchange.declare");
        done_ok(c, k->wait_id, NULL, 0, 0, 0);
        return 0;
    }
    case C_BIND: {
        amqp_queue_bind_ok_t *ok = amqp_queue_bind(conn, CH_ADMIN, k->s1, k->s2, k->s3, amqp_empty_table);
        if (!ok)
            return command_failed(c, k, amqp_get_rpc_reply(conn), CH_ADMIN, "queue.bind");
        done_ok(c, k->wait_id, NULL, 0, 0, 0);
        return 0;
    }
    case C_DELETE_QUEUE: {
        amqp_queue_delete_ok_t *ok = amqp_queue_delete(conn, CH_ADMIN, k->s1, 0, 0);
        if (!ok)
            return command_failed(c, k, amqp_get_rpc_reply(conn), CH_ADMIN, "queue.delete");
        done_ok(c, k->wait_id, NULL, 0, ok->message_count, 0);
        return 0;
    }
    case C_PURGE: {
        amqp_queue_purge_ok_t *ok = amqp_queue_purge(conn, CH_ADMIN, k->s1);
        if (!ok)
            return command_failed(c, k, amqp_get_rpc_reply(conn), CH_ADMIN, "queue.purge");
        done_ok(c, k->wait_id, NULL, 0, ok->message_count, 0);
        return 0;
    }
    case C_CONSUME: {
        if (k->epoch != c->epoch) {
            done_fail(c, k->wait_id, "stale: the connection was re-established");
            return 0;
        }
        int no_ack = (k->flags & F_NO_ACK) != 0;
        if (!no_ack) {
            if (!amqp_basic_qos(conn, CH_MAIN, 0, (uint16_t)k->prefetch, 0))
                return command_failed(c, k, amqp_get_rpc_reply(conn), CH_MAIN, "basic.qos");
        }
        amqp_basic_consume_ok_t *ok = amqp_basic_consume(conn, CH_MAIN, k->s1, k->s2, 0, no_ack,
                                                         (k->flags & F_EXCLUSIVE) != 0, amqp_empty_table);
        if (!ok)
            return command_failed(c, k, amqp_get_rpc_reply(conn), CH_MAIN, "basic.consume");
        if (no_ack)
            noack_add(c, ok->consumer_tag);
        done_ok(c, k->wait_id, ok->consumer_tag.bytes, ok->consumer_tag.len, 0, 0);
        return 0;
    }
    case C_CANCEL: {
        if (k->epoch != c->epoch) {
            done_ok(c, k->wait_id, NULL, 0, 0, 0);   /* gone with the old connection */
            return 0;
        }
        if (!amqp_basic_cancel(conn, CH_MAIN, k->s1))
            return command_failed(c, k, amqp_get_rpc_reply(conn), CH_MAIN, "basic.cancel");
        noack_remove(c, k->s1);
        done_ok(c, k->wait_id, NULL, 0, 0, 0);
        return 0;
    }
    }
    return 0;
}

/* ---- incoming frames ---- */

static void start_delivery_event(aconn *c, amqp_basic_properties_t *p, size_t body_size)
{
    pending_delivery *pd = &c->pd;
    size_t extra = pd->ctag_n + pd->exchange_n + pd->rkey_n + body_size;
    for (int i = 0; i < NPROPS; i++)
        if (p->_flags & PROP_FLAGS[i])
            extra += prop_slot(p, i)->len;
    size_t headers_size = 0;
    if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
        for (int i = 0; i < p->headers.num_entries; i++) {
            amqp_table_entry_t *en = &p->headers.entries[i];
            headers_size += 2 + en->key.len + 1 + 4 + 8;
            if (en->value.kind == AMQP_FIELD_KIND_UTF8 || en->value.kind == AMQP_FIELD_KIND_BYTES)
                headers_size += en->value.value.bytes.len;
        }
    }
    extra += headers_size;
    event *e = event_new(E_DELIVERY, extra);
    pd->ev = e;
    if (!e)
        return;
    e->epoch = c->epoch;
    e->delivery_tag = pd->delivery_tag;
    e->redelivered = pd->redelivered;
    e->consumer_tag = event_str(e, pd->ctag, pd->ctag_n);
    e->exchange = event_str(e, pd->exchange, pd->exchange_n);
    e->routing_key = event_str(e, pd->rkey, pd->rkey_n);
    for (int i = 0; i < NPROPS; i++)
        if (p->_flags & PROP_FLAGS[i]) {
            amqp_bytes_t *s = prop_slot(p, i);
            e->props[i] = event_str(e, s->bytes ? s->bytes : "", s->len);
        }
    if (p->_flags & AMQP_BASIC_DELIVERY_MODE_FLAG) {
        e->has_delivery_mode = 1;
        e->delivery_mode = p->delivery_mode;
    }
    if (p->_flags & AMQP_BASIC_PRIORITY_FLAG) {
        e->has_priority = 1;
        e->priority = p->priority;
    }
    if (p->_flags & AMQP_BASIC_TIMESTAMP_FLAG) {
        e->has_timestamp = 1;
        e->timestamp = p->timestamp;
    }
    /* Flat headers: [u16 keylen][key][kind 'S'|'n'|'t'|'f'][u32 len][bytes] or
     * [kind 'n'][double]. Nested tables and arrays are skipped. */
    if (headers_size) {
        char *start = e->data + e->used, *w = start;
        for (int i = 0; i < p->headers.num_entries; i++) {
            amqp_table_entry_t *en = &p->headers.entries[i];
            amqp_field_value_t *v = &en->value;
            double d;
            char kind;
            switch (v->kind) {
            case AMQP_FIELD_KIND_UTF8: case AMQP_FIELD_KIND_BYTES: kind = 'S'; break;
            case AMQP_FIELD_KIND_BOOLEAN: kind = v->value.boolean ? 't' : 'f'; break;
            case AMQP_FIELD_KIND_I8: kind = 'n'; d = v->value.i8; break;
            case AMQP_FIELD_KIND_U8: kind = 'n'; d = v->value.u8; break;
            case AMQP_FIELD_KIND_I16: kind = 'n'; d = v->value.i16; break;
            case AMQP_FIELD_KIND_U16: kind = 'n'; d = v->value.u16; break;
            case AMQP_FIELD_KIND_I32: kind = 'n'; d = v->value.i32; break;
            case AMQP_FIELD_KIND_U32: kind = 'n'; d = v->value.u32; break;
            case AMQP_FIELD_KIND_I64: kind = 'n'; d = (double)v->value.i64; break;
            case AMQP_FIELD_KIND_U64: case AMQP_FIELD_KIND_TIMESTAMP: kind = 'n'; d = (double)v->value.u64; break;
            case AMQP_FIELD_KIND_F32: kind = 'n'; d = v->value.f32; break;
            case AMQP_FIELD_KIND_F64: kind = 'n'; d = v->value.f64; break;
            default: continue;
            }
            uint16_t kl = (uint16_t)en->key.len;
            memcpy(w, &kl, 2);
            w += 2;
            memcpy(w, en->key.bytes, kl);
            w += kl;
            *w++ = kind;
            if (kind == 'S') {
                uint32_t n = (uint32_t)v->value.bytes.len;
                memcpy(w, &n, 4);
                w += 4;
                memcpy(w, v->value.bytes.bytes, n);
                w += n;
            } else if (kind == 'n') {
                memcpy(w, &d, 8);
                w += 8;
            }
        }
        e->headers.bytes = start;
        e->headers.len = (size_t)(w - start);
        e->used += e->headers.len;
    }
    e->body.bytes = e->data + e->used;
    e->body.len = body_size;
}

static void finish_delivery(aconn *c)
{
    pending_delivery *pd = &c->pd;
    if (!pd->discard) {
        /* no-ack deliveries are settled already; the others wait for Lua */
        int noack = is_noack(c, pd->ctag, pd->ctag_n);
        aw_add(c, pd->delivery_tag, noack ? A_SETTLED : A_UNSETTLED);
        if (noack)
            aw_trim(c);
        if (pd->ev)
            post(c, pd->ev);
        pd->ev = NULL;
    }
    free(pd->ev);
    memset(pd, 0, sizeof *pd);
}

static void copy_short(char *dst, size_t *n, amqp_bytes_t b)
{
    *n = b.len > 255 ? 255 : b.len;
    if (*n)
        memcpy(dst, b.bytes, *n);
}

/* Returns 0, or -1 when the connection is gone (c->lost says why). */
static int handle_frame(aconn *c, amqp_frame_t *f)
{
    pending_delivery *pd = &c->pd;
    if (f->frame_type == AMQP_FRAME_METHOD) {
        amqp_method_number_t id = f->payload.method.id;
        void *m = f->payload.method.decoded;
        if (f->channel == 0) {
            if (id == AMQP_CONNECTION_CLOSE_METHOD) {
                amqp_connection_close_t *cl = m;
                snprintf(c->lost, sizeof c->lost, "connection closed by the broker: %u %.*s",
                         cl->reply_code, (int)cl->reply_text.len, (char *)cl->reply_text.bytes);
                amqp_connection_close_ok_t ok;
                amqp_send_method(c->conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok);
                return -1;
            }
            return 0;   /* connection.blocked/unblocked: nothing to do */
        }
        if (id == AMQP_CHANNEL_CLOSE_METHOD) {
            amqp_channel_close_t *cl = m;
            amqp_channel_close_ok_t ok;
            amqp_send_method(c->conn, f->channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
            if (f->channel == CH_MAIN) {
                snprintf(c->lost, sizeof c->lost, "channel closed by the broker: %u %.*s",
                         cl->reply_code, (int)cl->reply_text.len, (char *)cl->reply_text.bytes);
                return -1;
            }
            char err[512];
            if (open_admin_channel(c, err, sizeof err) != 0) {
                snprintf(c->lost, sizeof c->lost, "cannot reopen the declaration channel: %s", err);
                return -1;
            }
            return 0;
        }
        if (f->channel != CH_MAIN)
            return 0;
        switch (id) {
        case AMQP_BASIC_DELIVER_METHOD: {
            amqp_basic_deliver_t *d = m;
            free(pd->ev);
            memset(pd, 0, sizeof *pd);
            pd->active = 1;
            pd->delivery_tag = d->delivery_tag;
            pd->redelivered = d->redelivered;
            copy_short(pd->ctag, &pd->ctag_n, d->consumer_tag);
            copy_short(pd->exchange, &pd->exchange_n, d->exchange);
            copy_short(pd->rkey, &pd->rkey_n, d->routing_key);
            return 0;
        }
        case AMQP_BASIC_RETURN_METHOD:
            free(pd->ev);
            memset(pd, 0, sizeof *pd);
            pd->active = 1;
            pd->discard = 1;
            return 0;
        case AMQP_BASIC_ACK_METHOD: {
            amqp_basic_ack_t *a = m;
            c->nack_since_ns = 0;
            pw_confirm(c, a->delivery_tag, a->multiple, 1);
            return 0;
        }
        case AMQP_BASIC_NACK_METHOD: {
            amqp_basic_nack_t *n = m;
            if (!c->nack_since_ns)
                c->nack_since_ns = uv_hrtime();
            pw_confirm(c, n->delivery_tag, n->multiple, 0);
            return 0;
        }
        case AMQP_BASIC_CANCEL_METHOD: {
            amqp_basic_cancel_t *cn = m;
            event *e = event_new(E_CANCELLED, cn->consumer_tag.len);
            if (e) {
                e->epoch = c->epoch;
                e->text = event_str(e, cn->consumer_tag.bytes, cn->consumer_tag.len);
                post(c, e);
            }
            noack_remove(c, cn->consumer_tag);
            if (!cn->nowait) {
                amqp_basic_cancel_ok_t ok = {cn->consumer_tag};
                amqp_send_method(c->conn, CH_MAIN, AMQP_BASIC_CANCEL_OK_METHOD, &ok);
            }
            return 0;
        }
        default:
            return 0;
        }
    }
    if (f->channel != CH_MAIN || !pd->active)
        return 0;
    if (f->frame_type == AMQP_FRAME_HEADER) {
        pd->body_size = (size_t)f->payload.properties.body_size;
        if (!pd->discard)
            start_delivery_event(c, f->payload.properties.decoded, pd->body_size);
        if (pd->body_size == 0)
            finish_delivery(c);
        return 0;
    }
    if (f->frame_type == AMQP_FRAME_BODY) {
        amqp_bytes_t frag = f->payload.body_fragment;
        if (pd->ev && pd->got + frag.len <= pd->body_size)
            memcpy((char *)pd->ev->body.bytes + pd->got, frag.bytes, frag.len);
        pd->got += frag.len;
        if (pd->got >= pd->body_size)
            finish_delivery(c);
    }
    return 0;
}

/* The connected loop. Returns when the connection is lost (1) or when a
 * close was asked for (0). */
static int io_connected(aconn *c)
{
    struct timeval zero = {0, 0};
    for (;;) {
        cmd *list = take_commands(c);
        while (list) {
            cmd *k = list;
            if (k->kind == C_CLOSE) {
                if (flush_acks(c) != 0) {}
                requeue_commands(c, list);   /* the close and what follows */
                flush_events(c);
                return 0;
            }
            list = k->next;
            if (run_command(c, k) != 0) {
                free(k);
                requeue_commands(c, list);   /* answered as "not connected" */
                flush_events(c);
                return 1;
            }
            free(k);
        }
        int rc = flush_acks(c);
        if (rc < 0) {
            snprintf(c->lost, sizeof c->lost, "ack: %s", amqp_error_string2(rc));
            flush_events(c);
            return 1;
        }
        if (thread_stopping(c)) {
            flush_events(c);
            return 0;
        }
        int frames = 0;
        for (;;) {
            amqp_frame_t f;
            rc = amqp_simple_wait_frame_noblock(c->conn, &f, &zero);
            if (rc == AMQP_STATUS_TIMEOUT)
                break;
            if (rc != AMQP_STATUS_OK) {
                snprintf(c->lost, sizeof c->lost, "%s", amqp_error_string2(rc));
                flush_events(c);
                return 1;
            }
            if (handle_frame(c, &f) != 0) {
                flush_events(c);
                return 1;
            }
            if (++frames >= READ_BATCH)
                break;
        }
        amqp_maybe_release_buffers(c->conn);
        /* a broker that keeps the connection (heartbeats flow) but stopped
         * confirming would hold every waiting push forever: after
         * confirm_timeout_ms without progress the connection is dropped,
         * the pushes fail and may be retried on the next one */
        if (c->confirm_timeout_ms > 0 && c->pw_count > 0 &&
            uv_hrtime() - c->pw_progress_ns > (uint64_t)c->confirm_timeout_ms * 1000000) {
            snprintf(c->lost, sizeof c->lost, "no publisher confirm from the broker for %d ms", c->confirm_timeout_ms);
            flush_events(c);
            return 1;
        }
        /* the same when it refuses everything: seen from RabbitMQ 3.10 on a
         * channel opened while a quorum queue's leader was failing over - it
         * nacked every publish to that queue for minutes, while a new
         * channel was served at once */
        if (c->confirm_timeout_ms > 0 && c->nack_since_ns &&
            uv_hrtime() - c->nack_since_ns > (uint64_t)c->confirm_timeout_ms * 1000000) {
            snprintf(c->lost, sizeof c->lost, "the broker refused every message (basic.nack) for %d ms",
                     c->confirm_timeout_ms);
            flush_events(c);
            return 1;
        }
        flush_events(c);
        if (frames >= READ_BATCH || amqp_frames_enqueued(c->conn) || amqp_data_in_buffer(c->conn))
            continue;
        uv_mutex_lock(&c->mu);
        int more = c->cmd_head != NULL || c->stop;
        uv_mutex_unlock(&c->mu);
        if (more)
            continue;
        struct pollfd pfd[2] = {
            {amqp_get_sockfd(c->conn), POLLIN, 0},
            {c->efd, POLLIN, 0},
        };
        /* wake at least every second: rabbitmq-c sends heartbeats and
         * detects missed ones inside amqp_simple_wait_frame_noblock */
        poll(pfd, 2, 1000);
    }
}

/* Waits `ms` (or until stop), refusing the commands that come meanwhile.
 * Returns 1 when a close/stop arrived. */
static int io_backoff(aconn *c, int ms, const char *why)
{
    uint64_t deadline = uv_hrtime() + (uint64_t)ms * 1000000;
    for (;;) {
        cmd *list = take_commands(c);
        while (list) {
            cmd *k = list;
            if (k->kind == C_CLOSE) {
                requeue_commands(c, list);
                flush_events(c);
                return 1;
            }
            list = k->next;
            refuse(c, k, why);
            free(k);
        }
        flush_events(c);
        if (thread_stopping(c))
            return 1;
        uint64_t now = uv_hrtime();
        if (now >= deadline)
            return 0;
        struct pollfd pfd = {c->efd, POLLIN, 0};
        poll(&pfd, 1, (int)((deadline - now) / 1000000) + 1);
    }
}

static void io_main(void *arg)
{
    aconn *c = arg;
    tamarco_backoff backoff;
    tamarco_backoff_init(&backoff, c->backoff_ms, c->backoff_max_ms, TAMARCO_BACKOFF_FACTOR, 0);
    char err[512], why[800];
    for (;;) {
        if (thread_stopping(c))
            break;
        post_state(c, ST_CONNECTING, NULL);
        if (io_connect(c, err, sizeof err) != 0) {
            if (thread_stopping(c))
                break;
            post_state(c, ST_FAILED, err);
            c->cur = (c->cur + 1) % c->nhosts;
            snprintf(why, sizeof why, "not connected to the AMQP broker (%s)", err);
            if (io_backoff(c, (int)tamarco_backoff_next(&backoff), why))
                break;
            continue;
        }
        tamarco_backoff_reset(&backoff);
        c->epoch++;
        post_state(c, ST_CONNECTED, NULL);
        c->lost[0] = '\0';
        int lost = io_connected(c);
        if (!lost) {
            io_disconnect(c, "connection closed", 1);
            break;
        }
        io_disconnect(c, c->lost, 0);
        post_state(c, ST_FAILED, c->lost);
        c->cur = (c->cur + 1) % c->nhosts;
        snprintf(why, sizeof why, "not connected to the AMQP broker (%s)", c->lost);
        if (io_backoff(c, (int)tamarco_backoff_peek(&backoff), why))
            break;
    }
    /* closing: refuse what is left, then say goodbye */
    cmd *list = take_commands(c);
    while (list) {
        cmd *k = list;
        list = k->next;
        refuse(c, k, "the AMQP connection is closed");
        free(k);
    }
    post_text(c, E_CLOSED, 0, 1, NULL);
    flush_events(c);
}

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
    noack_clear(c);
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
    free_events(tamarco_mailbox_close(&c->events, on_handle_closed));
}

static void on_events(tamarco_mailbox *box, tamarco_mail *taken)
{
    aconn *c = box->async.data;
    if (c->state == ST_CLOSED) {
        free_events(taken);
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
        interrupt_login(c);
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
    interrupt_login(c);
    uint64_t one = 1;
    ssize_t w = write(c->efd, &one, sizeof one);
    (void)w;
    if (c->thread_running) {
        uv_thread_join(&c->tid);
        c->thread_running = 0;
    }
    c->state = ST_CLOSED;
    free_events(tamarco_mailbox_close(&c->events, on_handle_closed));
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

    if (uv_thread_create(&c->tid, io_main, c) != 0) {
        /* the userdata stays (closed); the handle goes */
        ud->c = NULL;
        luaL_unref(L, LUA_REGISTRYINDEX, c->ud_ref);
        luaL_unref(L, LUA_REGISTRYINDEX, c->on_state_ref);
        luaL_unref(L, LUA_REGISTRYINDEX, c->on_delivery_ref);
        free_events(tamarco_mailbox_close(&c->events, on_handle_closed));
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
