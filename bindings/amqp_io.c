/*
 * tamarco.c.amqp, the I/O thread: one per connection, the only code that
 * calls librabbitmq (it blocks: connect, login, RPCs, publishes to a broker
 * that stops reading). No Lua here: commands come from the loop under the
 * connection's mutex, events go back through its mailbox (amqp_link.h).
 */
#include "amqp_link.h"
#include "backoff.h"

#include <amqp_tcp_socket.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

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
 * Thread side: helpers
 * ------------------------------------------------------------------- */

void amqp_free_events(tamarco_mail *list)
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
        amqp_free_events(&c->out_head->link);   /* the loop closed the connection */
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

void amqp_noack_clear(aconn *c)
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
void amqp_interrupt_login(aconn *c)
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
        amqp_interrupt_login(c);   /* the stop came before the fd was known */
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
    amqp_noack_clear(c);
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

void amqp_io_main(void *arg)
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
