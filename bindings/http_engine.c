/*
 * The HTTP/1.x server engine (see http_engine.h): bytes, sockets, parser
 * callbacks and timers. No Lua here; bindings/http_server.c is the Lua API.
 */
#include "http_engine.h"

#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#define READ_BUFFER_SIZE (64 * 1024)
#define MAX_POOLED_REQUESTS 256         /* spare request structs kept for reuse */
#define TRIM_MIN_PEAK 1024              /* connections: a burst worth returning memory after */
#define MAX_POOLED_BUFFERS HTTP_ENGINE_MAX_POOLED_BUFFERS
#define KEEP_HEAD_BYTES (4 * 1024)      /* pooled buffers larger than this are freed */
#define KEEP_BODY_BYTES (4 * 1024)
#define KEEP_RESP_BYTES (4 * 1024)
#define KEEP_OUT_BYTES (16 * 1024)

/* ---------------------------------------------------------------- buffers */

#define BUF_LIT(b, lit) tamarco_buf_add((b), (lit), sizeof(lit) - 1)

/* Appends; -1 when out of memory. */
static int buf_put(tamarco_buf *b, const void *s, size_t n)
{
    tamarco_buf_add(b, s, n);
    return b->oom ? -1 : 0;
}

/* Empties b; frees its memory when it grew beyond `keep`. */
static void buf_reset(tamarco_buf *b, size_t keep)
{
    if (b->cap > keep)
        tamarco_buf_free(b);
    else
        tamarco_buf_truncate(b, 0);
}

static char *put_uint(char *p, uint64_t v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

static const struct http_parser_settings parser_settings;
static char read_buffer[READ_BUFFER_SIZE];

/* ---------------------------------------------------------------- request pool */

static hreq *free_reqs;
static int nfree_reqs;
static int norphans;       /* released structs waiting for their handles' __gc */
static int trim_pending;   /* a burst ended while orphans were alive */

/* Gives the allocator's free pages back to the system (glibc keeps them). */
static void trim_memory(void)
{
    trim_pending = 0;
#ifdef __GLIBC__
    malloc_trim(64 * 1024);
#endif
}

static hreq *req_alloc(hserver *srv, hconn *c)
{
    hreq *r = free_reqs;
    if (r) {
        free_reqs = r->next;
        nfree_reqs--;
    } else {
        r = calloc(1, sizeof *r);
        if (!r)
            return NULL;
    }
    r->next = NULL;
    r->conn = c;
    r->srv = srv;
    r->responded = r->close_after = r->detached = r->expect_continue = 0;
    r->in_trailers = 0;
    r->keep_alive = 0;
    r->url_len = 0;
    r->nhdrs = 0;
    r->head.len = r->body.len = r->resp.len = 0;
    r->head_bytes = 0;
    r->chunk_left = 0;
    r->crlf_left = 0;
    return r;
}

static void server_unref(hserver *srv);

static void req_free_buffers(hreq *r)
{
    tamarco_buf_free(&r->head);
    tamarco_buf_free(&r->body);
    tamarco_buf_free(&r->resp);
    free(r->hdrs);
    r->hdrs = NULL;
    r->hdrs_cap = 0;
}

/* Returns r to the pool; its handles become stale. */
static void req_release(hreq *r)
{
    hserver *srv = r->srv;
    int detached = r->detached;
    r->gen++;
    r->conn = NULL;
    r->srv = NULL;
    buf_reset(&r->head, KEEP_HEAD_BYTES);
    buf_reset(&r->body, KEEP_BODY_BYTES);
    buf_reset(&r->resp, KEEP_RESP_BYTES);
    if (r->hdrs_cap > 64) {
        free(r->hdrs);
        r->hdrs = NULL;
        r->hdrs_cap = 0;
    }
    /* A struct outlives every handle pointing at it (a handle reads its
     * generation to know it is stale). A bounded number are kept for reuse;
     * the others are freed now or, while a handle points at one, when the
     * last handle lets go (http_req_release_hold). */
    if (nfree_reqs < MAX_POOLED_REQUESTS) {
        r->next = free_reqs;
        free_reqs = r;
        nfree_reqs++;
    } else {
        req_free_buffers(r);
        if (r->handles == 0) {
            free(r);
        } else {
            r->orphan = 1;
            norphans++;
        }
    }
    if (detached && srv)
        server_unref(srv);
}

/* The connection is gone but a handler still owns r. */
static void req_detach(hreq *r)
{
    r->conn = NULL;
    r->detached = 1;
    r->srv->refs++;
}

/* ---------------------------------------------------------------- date */

static char date_line[64];
static size_t date_line_len;
static time_t date_sec = (time_t)-1;

static void update_date(void)
{
    static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                       "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = time(NULL);
    if (now == date_sec)
        return;
    struct tm tm;
    gmtime_r(&now, &tm);
    date_line_len = (size_t)snprintf(date_line, sizeof date_line,
                                     "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                                     days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon],
                                     tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
    date_sec = now;
}

/* ---------------------------------------------------------------- status lines */

static const char *reason_of(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 102: return "Processing";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 203: return "Non-Authoritative Information";
    case 204: return "No Content";
    case 205: return "Reset Content";
    case 206: return "Partial Content";
    case 300: return "Multiple Choices";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 402: return "Payment Required";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 412: return "Precondition Failed";
    case 413: return "Payload Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 416: return "Range Not Satisfiable";
    case 417: return "Expectation Failed";
    case 422: return "Unprocessable Entity";
    case 425: return "Too Early";
    case 426: return "Upgrade Required";
    case 428: return "Precondition Required";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 451: return "Unavailable For Legal Reasons";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default:
        if (status < 200) return "Informational";
        if (status < 300) return "Success";
        if (status < 400) return "Redirection";
        if (status < 500) return "Client Error";
        return "Server Error";
    }
}

static int status_has_body(int status)
{
    return status >= 200 && status != 204 && status != 304;
}

/* ---------------------------------------------------------------- response head */

/* Writes the status line. Caller reserved >= 64 bytes. */
static void put_status_line(tamarco_buf *b, int status)
{
    const char *reason = reason_of(status);
    size_t rl = strlen(reason);
    BUF_LIT(b, "HTTP/1.1 ");
    char *p = put_uint(b->data + b->len, (uint64_t)status);
    b->len = (size_t)(p - b->data);
    b->data[b->len++] = ' ';
    tamarco_buf_add(b, reason, rl);
    BUF_LIT(b, "\r\n");
}

/* Writes the headers every response gets and the blank line. */
static int put_common_headers(tamarco_buf *b, hserver *srv, int status, size_t body_len, int close,
                              int http10_keep_alive, const char *ctype, size_t ctlen,
                              const resp_flags *fl)
{
    update_date();
    if (!tamarco_buf_reserve(b, 160 + ctlen + srv->server_header_len + date_line_len))
        return -1;
    if (ctype && !fl->has_ctype) {
        BUF_LIT(b, "Content-Type: ");
        tamarco_buf_add(b, ctype, ctlen);
        BUF_LIT(b, "\r\n");
    }
    if (status >= 200 && status != 204 && status != 304) {
        BUF_LIT(b, "Content-Length: ");
        char *p = put_uint(b->data + b->len, body_len);
        b->len = (size_t)(p - b->data);
        BUF_LIT(b, "\r\n");
    }
    if (!fl->has_date)
        tamarco_buf_add(b, date_line, date_line_len);
    if (!fl->has_server && srv->server_header_len)
        tamarco_buf_add(b, srv->server_header, srv->server_header_len);
    if (close)
        BUF_LIT(b, "Connection: close\r\n");
    else if (http10_keep_alive)
        BUF_LIT(b, "Connection: keep-alive\r\n");
    BUF_LIT(b, "\r\n");
    return 0;
}

/* ---------------------------------------------------------------- server refs */

static void hout_free(hout *o)
{
    tamarco_buf_free(&o->buf);
    free(o);
}

static void server_free(hserver *srv)
{
    if (srv->cb->on_free)
        srv->cb->on_free(srv);
    for (int i = 0; i < srv->npool; i++)
        hout_free(srv->pool[i]);
    free(srv);
}

static void server_unref(hserver *srv)
{
    if (--srv->refs == 0)
        server_free(srv);
}

static void on_server_handle_closed(uv_handle_t *handle)
{
    server_unref(handle->data);
}

/* Output buffers (and the write request that goes with each) come from a
 * per-server pool, so that idle connections hold none. *slot is NULL or
 * already one. */
static int io_acquire(hserver *srv, hout **slot)
{
    if (*slot)
        return 0;
    hout *o = srv->npool > 0 ? srv->pool[--srv->npool] : calloc(1, sizeof *o);
    if (!o)
        return -1;
    *slot = o;
    return 0;
}

/* The same, with room for output. */
static int out_acquire(hserver *srv, hout **slot)
{
    if (io_acquire(srv, slot) != 0)
        return -1;
    if ((*slot)->buf.data)
        return 0;
    return tamarco_buf_reserve(&(*slot)->buf, 4095) ? 0 : -1;   /* 4 KiB with the NUL byte */
}

static void out_release(hserver *srv, hout **slot)
{
    hout *o = *slot;
    if (!o)
        return;
    *slot = NULL;
    if (srv->npool < MAX_POOLED_BUFFERS && o->buf.cap <= KEEP_OUT_BYTES) {
        tamarco_buf_truncate(&o->buf, 0);
        srv->pool[srv->npool++] = o;
    } else {
        hout_free(o);
    }
}

static int conn_has_output(const hconn *c)
{
    return c->out && c->out->buf.len;
}

/* ---------------------------------------------------------------- connections */

static void conn_close(hconn *c);
static void conn_flush(hconn *c);
static void conn_feed(hconn *c, const char *p, size_t len);
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void drain_check(hserver *srv);

/* After a burst of connections the allocator keeps the freed memory of
 * their structs, buffers and requests scattered through its heap; once the
 * burst is over (connection structs down to a sixteenth of the peak, and
 * again when the last is freed) the free pages go back to the system.
 * Structs, not open connections, are counted: a closed connection's memory
 * is freed by its handle's close callback, later in the loop turn. */
static void trim_after_burst(hserver *srv)
{
    if (srv->conn_structs == 0 && srv->trim_at_zero) {
        srv->trim_at_zero = 0;   /* again for the stragglers of the burst */
    } else {
        if (srv->peak_conns < TRIM_MIN_PEAK || srv->conn_structs > srv->peak_conns / 16)
            return;
        srv->trim_at_zero = srv->conn_structs > 0;
    }
    srv->peak_conns = srv->conn_structs;
    /* the burst's request handles are garbage now: the owner collecting
     * them frees the request structs they kept, and the last one trims */
    trim_pending = 1;
    if (srv->cb->on_burst_end)
        srv->cb->on_burst_end(srv);
    if (trim_pending)
        trim_memory();
}

/* Frees the struct once its socket handle is closed and the resume list
 * no longer points at it. */
static void conn_free_if_done(hconn *c)
{
    if (!c->tcp_closed || c->resume_pending)
        return;
    hserver *srv = c->srv;
    out_release(srv, &c->out);
    out_release(srv, &c->io);
    if (c->stash) {
        tamarco_buf_free(c->stash);
        free(c->stash);
    }
    free(c);
    srv->conn_structs--;
    trim_after_burst(srv);
    server_unref(srv);
}

static void on_conn_handle_closed(uv_handle_t *handle)
{
    hconn *c = handle->data;
    c->tcp_closed = 1;
    conn_free_if_done(c);
}

/* ---------------------------------------------------------------- deadlines */

static void on_server_timer(uv_timer_t *timer);
static void conn_reject(hconn *c, int status, const char *message);
static const char *message_for_status(int status);

static uint64_t timeout_of(const hserver *srv, enum http_deadline kind)
{
    switch (kind) {
    case HTTP_DEADLINE_HEADER: return srv->header_timeout;
    case HTTP_DEADLINE_BODY: return srv->body_timeout;
    case HTTP_DEADLINE_IDLE: return srv->idle_timeout;
    case HTTP_DEADLINE_SEND: return srv->send_timeout;
    default: return 0;
    }
}

static void deadline_unlink(hserver *srv, hconn *c)
{
    int k = c->deadline_kind;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->deadline_head[k] = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        srv->deadline_tail[k] = c->prev;
    c->prev = c->next = NULL;
}

/* Into kind's list, after the last connection due no later than c: the
 * tail but for a timeout changed while connections wait. */
static void deadline_link(hserver *srv, hconn *c, enum http_deadline kind)
{
    hconn *after = srv->deadline_tail[kind];
    while (after && after->deadline > c->deadline)
        after = after->prev;
    c->deadline_kind = kind;
    c->prev = after;
    c->next = after ? after->next : srv->deadline_head[kind];
    if (c->next)
        c->next->prev = c;
    else
        srv->deadline_tail[kind] = c;
    if (after)
        after->next = c;
    else
        srv->deadline_head[kind] = c;
}

/* The timer fires at `due` (loop time), unless it fires earlier already. */
static void timer_arm(hserver *srv, uint64_t due)
{
    if (srv->in_timer || srv->closed)
        return;   /* it re-arms itself at the end of its callback; or it is closed */
    if (uv_is_active((uv_handle_t *)&srv->timer) && srv->timer_due <= due)
        return;
    uint64_t now = uv_now(srv->loop);
    srv->timer_due = due;
    uv_timer_start(&srv->timer, on_server_timer, due > now ? due - now : 0, 0);
}

/* The connection now waits for `kind` (its timeout from now on), or for
 * nothing (HTTP_DEADLINE_NONE, or a kind whose timeout is 0). */
static void conn_deadline(hconn *c, enum http_deadline kind)
{
    if (c->closing)
        return;
    hserver *srv = c->srv;
    uint64_t ms = timeout_of(srv, kind);
    deadline_unlink(srv, c);
    if (!ms) {
        c->deadline = 0;
        deadline_link(srv, c, HTTP_DEADLINE_NONE);
        return;
    }
    c->deadline = uv_now(srv->loop) + ms;
    deadline_link(srv, c, kind);
    timer_arm(srv, c->deadline);
}

/* The deadline passed: a request that came in part gets a 408 (the send
 * deadline then bounds the wait for the responses queued before it), any
 * other connection is closed. */
static void conn_expire(hconn *c)
{
    hserver *srv = c->srv;
    srv->n_timeouts++;
    if (c->cur && !c->writing && !c->finishing) {
        conn_reject(c, 408, message_for_status(408));
        conn_deadline(c, srv->send_timeout ? HTTP_DEADLINE_SEND : HTTP_DEADLINE_HEADER);
        return;
    }
    conn_close(c);
}

static void conn_resume_reading(hconn *c);

static void on_server_timer(uv_timer_t *timer)
{
    hserver *srv = timer->data;
    srv->in_timer = 1;
    hconn *c = srv->resume;
    srv->resume = NULL;
    while (c) {
        hconn *next = c->resume_next;
        c->resume_pending = 0;
        conn_resume_reading(c);
        conn_free_if_done(c);   /* closed meanwhile */
        c = next;
    }
    uint64_t now = uv_now(srv->loop);
    for (int k = HTTP_DEADLINE_NONE + 1; k < HTTP_DEADLINE_KINDS; k++) {
        /* an expired connection leaves this list (closed, or a new
         * deadline that is later than now) */
        while ((c = srv->deadline_head[k]) && c->deadline <= now)
            conn_expire(c);
    }
    srv->in_timer = 0;
    uint64_t due = srv->resume ? now : UINT64_MAX;
    for (int k = HTTP_DEADLINE_NONE + 1; k < HTTP_DEADLINE_KINDS; k++)
        if ((c = srv->deadline_head[k]) && c->deadline < due)
            due = c->deadline;
    if (due != UINT64_MAX)
        timer_arm(srv, due);
}

/* ---------------------------------------------------------------- connection state */

/* Closes the connection now. Requests whose handlers still run are
 * detached: their response is dropped when it comes. While the parser
 * runs (a failed write inside a callback, a handler closing the server)
 * the close waits until it has returned: the parser still uses the
 * request being parsed and the connection. */
/* Lets go of every queued request: answered ones are freed, the others
 * detached (their handlers still hold them; their responses go nowhere). */
static void drop_queued(hconn *c)
{
    hreq *r = c->qhead;
    while (r) {
        hreq *next = r->next;
        if (r->responded)
            req_release(r);
        else
            req_detach(r);
        r = next;
    }
    c->qhead = c->qtail = NULL;
    c->inflight = 0;
}

static void conn_close(hconn *c)
{
    if (c->closing)
        return;
    if (c->in_feed) {
        c->close_pending = 1;
        c->stop_reading = 1;
        return;
    }
    hserver *srv = c->srv;
    c->closing = 1;
    deadline_unlink(srv, c);
    srv->nconns--;
    if (c->cur) {
        req_release(c->cur);
        c->cur = NULL;
    }
    drop_queued(c);
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    if (srv->draining)
        drain_check(srv);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    hconn *c = req->data;
    out_release(c->srv, &c->io);
    conn_close(c);
}

/* Closes after the pending output reached the kernel (FIN, then close). */
static void conn_finish(hconn *c)
{
    if (c->closing || c->finishing)
        return;
    c->finishing = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (io_acquire(c->srv, &c->io) != 0) {
        conn_close(c);
        return;
    }
    c->io->req.shutdown.data = c;
    if (uv_shutdown(&c->io->req.shutdown, (uv_stream_t *)&c->tcp, on_shutdown) != 0) {
        out_release(c->srv, &c->io);
        conn_close(c);
    }
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);

/* Reading resumes from a loop callback (the server's timer), never from
 * inside a handler's respond(): dispatching starts tasks. */
static void conn_schedule_resume(hconn *c)
{
    hserver *srv = c->srv;
    if (c->resume_pending || c->closing || srv->closed)
        return;
    c->resume_pending = 1;   /* a connection closed meanwhile stays until the timer */
    c->resume_next = srv->resume;
    srv->resume = c;
    timer_arm(srv, uv_now(srv->loop));
}

static void conn_resume_reading(hconn *c)
{
    if (c->closing || c->finishing || c->stop_reading || !c->read_paused)
        return;
    c->read_paused = 0;
    if (c->stash) {
        /* parse what was left over when reading paused */
        tamarco_buf *stash = c->stash;
        c->stash = NULL;
        conn_feed(c, stash->data, stash->len);
        tamarco_buf_free(stash);
        free(stash);
        if (!c->closing)
            conn_flush(c);
        if (c->closing || c->finishing || c->read_paused || c->stop_reading)
            return;
    }
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0)
        conn_close(c);
}

/* Everything written so far is with the kernel. */
static void conn_after_flush(hconn *c)
{
    hserver *srv = c->srv;
    if (c->closing || c->finishing)
        return;
    if (c->close_after_flush && !c->qhead) {
        conn_finish(c);
        return;
    }
    if (!c->cur && !c->qhead) {
        if (srv->draining) {
            conn_finish(c);
            return;
        }
        conn_deadline(c, HTTP_DEADLINE_IDLE);
    } else if (!c->cur) {
        conn_deadline(c, HTTP_DEADLINE_NONE);   /* handlers are running: no read deadline */
    }
    if (c->read_paused && !c->in_feed && c->inflight < srv->max_pipeline)
        conn_schedule_resume(c);
}

static void on_write(uv_write_t *req, int status)
{
    hconn *c = req->data;
    c->writing = 0;
    out_release(c->srv, &c->io);
    if (status < 0 || c->closing) {
        conn_close(c);
        return;
    }
    if (conn_has_output(c))
        conn_flush(c);
    else
        conn_after_flush(c);
}

static void conn_flush(hconn *c)
{
    if (c->closing || c->close_pending || c->writing || c->finishing)
        return;   /* (finishing: nothing is written after the shutdown) */
    hserver *srv = c->srv;
    if (!conn_has_output(c)) {
        out_release(srv, &c->out);
        conn_after_flush(c);
        return;
    }
    tamarco_buf *out = &c->out->buf;
    uv_buf_t b = uv_buf_init(out->data, (unsigned)out->len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n == (int)out->len) {
        srv->n_bytes_out += n;
        out_release(srv, &c->out);
        conn_after_flush(c);
        return;
    }
    if (n < 0 && n != UV_EAGAIN && n != UV_ENOSYS) {
        conn_close(c);
        return;
    }
    if (n < 0)
        n = 0;
    srv->n_bytes_out += n;
    /* the rest goes through uv_write; new output accumulates in a new c->out */
    c->io = c->out;
    c->out = NULL;
    b = uv_buf_init(out->data + n, (unsigned)(out->len - (size_t)n));
    c->io->req.write.data = c;
    if (uv_write(&c->io->req.write, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        out_release(srv, &c->io);
        conn_close(c);
        return;
    }
    c->writing = 1;
    srv->n_bytes_out += (double)b.len;
    conn_deadline(c, HTTP_DEADLINE_SEND);
}

/* Moves finished responses at the head of the queue into the output. */
static void conn_advance(hconn *c)
{
    hreq *r;
    while ((r = c->qhead) && r->responded) {
        if (r->resp.len) {
            if (out_acquire(c->srv, &c->out) != 0 || buf_put(&c->out->buf, r->resp.data, r->resp.len) != 0) {
                conn_close(c);
                return;
            }
        }
        c->qhead = r->next;
        if (!c->qhead)
            c->qtail = NULL;
        c->inflight--;
        int close = r->close_after;
        req_release(r);
        if (close) {
            /* no more responses on this connection: later requests are dropped */
            c->close_after_flush = 1;
            c->stop_reading = 1;
            drop_queued(c);
            if (c->cur) {
                req_release(c->cur);
                c->cur = NULL;
            }
            uv_read_stop((uv_stream_t *)&c->tcp);
            break;
        }
    }
}

static void conn_enqueue(hconn *c, hreq *r)
{
    r->next = NULL;
    if (c->qtail)
        c->qtail->next = r;
    else
        c->qhead = r;
    c->qtail = r;
    c->inflight++;
}

/* Queues a final error response (after the earlier responses) and closes. */
static void conn_reject(hconn *c, int status, const char *message)
{
    hserver *srv = c->srv;
    srv->n_bad_requests++;
    c->stop_reading = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
    hreq *r = c->cur;
    c->cur = NULL;
    if (!r && !(r = req_alloc(srv, c))) {
        conn_close(c);
        return;
    }
    r->head.len = 0;
    r->responded = 1;
    r->close_after = 1;
    char body[160];
    int blen = snprintf(body, sizeof body, "{\"error\":\"%s\"}", message);
    tamarco_buf *b = &r->resp;
    static const resp_flags none = {0, 0, 0, 0};
    if (!tamarco_buf_reserve(b, 64 + (size_t)blen) ||
        (put_status_line(b, status), 0) ||
        put_common_headers(b, srv, status, (size_t)blen, 1, 0, "application/json", 16, &none) != 0 ||
        buf_put(b, body, (size_t)blen) != 0) {
        req_release(r);
        conn_close(c);
        return;
    }
    conn_enqueue(c, r);
    conn_advance(c);
    if (!c->in_feed)
        conn_flush(c);
}

/* ---------------------------------------------------------------- dispatch */

static void dispatch(hconn *c, hreq *r)
{
    hserver *srv = c->srv;
    srv->n_requests++;
    srv->cb->on_request(srv, r);
}

/* ---------------------------------------------------------------- parser callbacks */

/* What the parser callbacks share while conn_feed runs (on its stack; the
 * parser's data points at it). */
typedef struct feed {
    hconn *c;
    const char *start, *end;   /* the bytes the parser is running over */
    const char *value_end;     /* where the last header value piece ended */
    hreq *ready;               /* just completed by the parser, to dispatch */
    int error_status;          /* set by a callback that rejects the request */
} feed;

static int head_account(feed *f, size_t n, int status)
{
    hreq *r = f->c->cur;
    r->head_bytes += n;
    if (r->head_bytes > f->c->srv->max_header_size) {
        f->error_status = status;
        return -1;
    }
    return 0;
}

static int on_message_begin(http_parser *p)
{
    feed *f = p->data;
    hconn *c = f->c;
    if (c->cur)
        req_release(c->cur);
    c->cur = req_alloc(c->srv, c);
    if (!c->cur) {
        f->error_status = 503;
        return -1;
    }
    c->in_field = 0;
    conn_deadline(c, HTTP_DEADLINE_HEADER);
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len)
{
    feed *f = p->data;
    hconn *c = f->c;
    hreq *r = c->cur;
    if (head_account(f, len, 414))
        return -1;
    if (buf_put(&r->head, at, len) != 0) {
        f->error_status = 503;
        return -1;
    }
    r->url_len += (uint32_t)len;
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len)
{
    feed *f = p->data;
    hconn *c = f->c;
    hreq *r = c->cur;
    if (head_account(f, len + 4, 431))
        return -1;
    /* Trailer fields of a chunked body are counted against the head's
     * limit and dropped: merged into the headers they would bypass the
     * head's checks (a second Host, a Content-Length after the body). */
    if (r->in_trailers)
        return 0;
    if (!c->in_field) {
        if (r->nhdrs >= c->srv->max_headers) {
            f->error_status = 431;
            return -1;
        }
        if (r->nhdrs == r->hdrs_cap) {
            int cap = r->hdrs_cap ? r->hdrs_cap * 2 : 16;
            hdr *h = realloc(r->hdrs, (size_t)cap * sizeof *h);
            if (!h) {
                f->error_status = 503;
                return -1;
            }
            r->hdrs = h;
            r->hdrs_cap = cap;
        }
        hdr *h = &r->hdrs[r->nhdrs++];
        h->name_off = (uint32_t)r->head.len;
        h->name_len = 0;
        h->value_off = (uint32_t)r->head.len;
        h->value_len = 0;
        c->in_field = 1;
    }
    if (buf_put(&r->head, at, len) != 0) {
        f->error_status = 503;
        return -1;
    }
    r->hdrs[r->nhdrs - 1].name_len += (uint32_t)len;
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    feed *f = p->data;
    hconn *c = f->c;
    hreq *r = c->cur;
    if (head_account(f, len, 431))
        return -1;
    if (!r->nhdrs || r->in_trailers)
        return 0;
    hdr *h = &r->hdrs[r->nhdrs - 1];
    if (c->in_field) {
        c->in_field = 0;
        h->value_off = (uint32_t)r->head.len;
    } else if (at != f->value_end && at != f->start) {
        /* the value goes on after a line break (obs-fold, which the lenient
         * parser joins): refused, as RFC 9112 lets a server do */
        f->error_status = 400;
        return -1;
    }
    if (buf_put(&r->head, at, len) != 0) {
        f->error_status = 503;
        return -1;
    }
    h->value_len += (uint32_t)len;
    f->value_end = at + len;
    return 0;
}

int http_req_header_is(const hreq *r, const hdr *h, const char *name, size_t len)
{
    return h->name_len == len && strncasecmp(r->head.data + h->name_off, name, len) == 0;
}

/* RFC 9110 token characters: what a field name is made of. */
static int is_tchar(unsigned char ch)
{
    if ((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z'))
        return 1;
    return ch && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static int valid_field_name(const char *s, size_t n)
{
    if (!n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!is_tchar((unsigned char)s[i]))
            return 0;
    return 1;
}

/* Field values: visible characters, obs-text, space and tab; no NUL or
 * other control characters. */
static int valid_field_value(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if ((ch < 32 && ch != '\t') || ch == 127)
            return 0;
    }
    return 1;
}

/* The parser (built lenient) lets through what a proxy in front of us may
 * read differently: "Content-Length : 5", control bytes in values, a
 * missing or repeated Host. Any of them is a 400, so that no two parsers
 * can disagree on where this request ends. */
static int check_head(http_parser *p, hreq *r)
{
    if (p->http_major != 1 || p->http_minor > 1)
        return 505;
    int hosts = 0, codings = 0;
    for (int i = 0; i < r->nhdrs; i++) {
        hdr *h = &r->hdrs[i];
        if (!valid_field_name(r->head.data + h->name_off, h->name_len) ||
            !valid_field_value(r->head.data + h->value_off, h->value_len))
            return 400;
        if (http_req_header_is(r, h, "host", 4))
            hosts++;
        if (http_req_header_is(r, h, "transfer-encoding", 17)) {
            /* chunked is the one transfer coding understood here */
            if (++codings > 1)
                return 400;
            const char *v = r->head.data + h->value_off;
            size_t n = h->value_len;
            while (n && (*v == ' ' || *v == '\t'))
                v++, n--;
            while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
                n--;
            if (n != 7 || strncasecmp(v, "chunked", 7) != 0)
                return 501;
        }
    }
    if (hosts > 1 || (hosts == 0 && p->http_minor == 1))
        return 400;
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    feed *f = p->data;
    hconn *c = f->c;
    hreq *r = c->cur;
    hserver *srv = c->srv;
    c->in_field = 0;
    int bad = check_head(p, r);
    if (bad) {
        f->error_status = bad;
        return -1;
    }
    r->in_trailers = 1;
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > srv->max_body_size) {
        f->error_status = 413;
        return -1;
    }
    r->chunk_left = 0;
    r->crlf_left = 0;
    for (int i = 0; i < r->nhdrs; i++) {
        hdr *h = &r->hdrs[i];
        if (http_req_header_is(r, h, "expect", 6)) {
            if (h->value_len == 12 && strncasecmp(r->head.data + h->value_off, "100-continue", 12) == 0)
                r->expect_continue = 1;
            else {
                f->error_status = 417;
                return -1;
            }
        }
    }
    /* "100 Continue" only when nothing is waiting ahead of it on the wire */
    if (r->expect_continue && p->http_minor >= 1 && !c->qhead && !conn_has_output(c) && !c->writing) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (out_acquire(srv, &c->out) != 0 || buf_put(&c->out->buf, cont, sizeof cont - 1) != 0) {
            f->error_status = 503;
            return -1;
        }
        conn_flush(c);   /* now: the client waits for it before sending the body */
        if (c->close_pending)
            return -1;   /* the write failed: the connection closes after the parser returns */
    }
    conn_deadline(c, HTTP_DEADLINE_BODY);
    return 0;
}

/* Checks the CRLF that must follow chunk data (the lenient parser takes
 * any two bytes) against the bytes from at up to end. */
static int check_chunk_crlf(hreq *r, const char *at, const char *end)
{
    while (r->crlf_left && at < end) {
        if (*at != (r->crlf_left == 2 ? '\r' : '\n'))
            return -1;
        at++;
        r->crlf_left--;
    }
    return 0;
}

static int on_chunk_header(http_parser *p)
{
    feed *f = p->data;
    f->c->cur->chunk_left = p->content_length;
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    feed *f = p->data;
    hconn *c = f->c;
    hreq *r = c->cur;
    if (r->body.len + len > c->srv->max_body_size) {
        f->error_status = 413;
        return -1;
    }
    if ((p->flags & F_CHUNKED) && len && r->chunk_left) {
        r->chunk_left -= len <= r->chunk_left ? len : r->chunk_left;
        if (r->chunk_left == 0) {
            r->crlf_left = 2;
            if (check_chunk_crlf(r, at + len, f->end) != 0) {
                f->error_status = 400;
                return -1;
            }
        }
    }
    if (buf_put(&r->body, at, len) != 0) {
        f->error_status = 503;
        return -1;
    }
    return 0;
}

static int on_message_complete(http_parser *p)
{
    feed *f = p->data;
    hconn *c = f->c;
    hreq *r = c->cur;
    c->cur = NULL;
    r->method = (unsigned char)p->method;
    r->http_major = (unsigned char)p->http_major;
    r->http_minor = (unsigned char)p->http_minor;
    r->keep_alive = (unsigned char)http_should_keep_alive(p);
    if (p->upgrade) {
        r->keep_alive = 0;   /* no protocol switch here: answer, then close */
    }
    if (!r->keep_alive)
        c->stop_reading = 1;
    conn_enqueue(c, r);
    f->ready = r;
    conn_deadline(c, HTTP_DEADLINE_NONE);
    http_parser_pause(p, 1);
    return 0;
}

static const struct http_parser_settings parser_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
    .on_chunk_header = on_chunk_header,
};

static int status_for_parse_error(const feed *f, enum http_errno err)
{
    if (f->error_status)
        return f->error_status;
    switch (err) {
    case HPE_HEADER_OVERFLOW: return 431;
    case HPE_INVALID_VERSION: return 505;
    default: return 400;
    }
}

static const char *message_for_status(int status)
{
    switch (status) {
    case 408: return "request timeout";
    case 413: return "request body too large";
    case 414: return "request URI too long";
    case 417: return "expectation failed";
    case 431: return "request header fields too large";
    case 503: return "service unavailable";
    case 501: return "transfer coding not implemented";
    case 505: return "HTTP version not supported";
    default: return "bad request";
    }
}

/* Parses input; dispatches every complete request at once, in order. */
static void conn_feed(hconn *c, const char *p, size_t len)
{
    hserver *srv = c->srv;
    feed f = {.c = c, .end = p + len};
    c->parser.data = &f;
    c->in_feed = 1;
    while (len > 0 && !c->closing && !c->stop_reading) {
        if (c->cur && c->cur->crlf_left && check_chunk_crlf(c->cur, p, f.end) != 0) {
            /* chunk data that ran to the end of the previous read */
            conn_reject(c, 400, message_for_status(400));
            break;
        }
        f.start = p;
        size_t n = http_parser_execute(&c->parser, &parser_settings, p, len);
        enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
        if (err == HPE_PAUSED) {
            http_parser_pause(&c->parser, 0);
            p += n;
            len -= n;
            hreq *r = f.ready;
            f.ready = NULL;
            if (r)
                dispatch(c, r);
            if (len > 0 && c->inflight >= srv->max_pipeline && !c->closing && !c->stop_reading) {
                /* too many requests in flight: keep the rest for later */
                if ((!c->stash && !(c->stash = calloc(1, sizeof *c->stash))) ||
                    buf_put(c->stash, p, len) != 0) {
                    conn_close(c);
                    break;
                }
                c->read_paused = 1;
                uv_read_stop((uv_stream_t *)&c->tcp);
                break;
            }
            continue;
        }
        if (c->close_pending)
            break;
        if (err != HPE_OK) {
            int status = status_for_parse_error(&f, err);
            conn_reject(c, status, message_for_status(status));
            break;
        }
        p += n;
        len -= n;
        if (n == 0)
            break;
    }
    c->in_feed = 0;
    c->parser.data = NULL;
    if (c->close_pending) {
        c->close_pending = 0;
        conn_close(c);
    }
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
    buf->base = read_buffer;
    buf->len = sizeof read_buffer;
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    hconn *c = stream->data;
    if (nread == 0 || c->closing)
        return;
    if (nread < 0) {
        /* EOF or error: answer what was asked, then close */
        uv_read_stop(stream);
        c->eof = 1;
        c->stop_reading = 1;
        if (c->cur) {
            req_release(c->cur);
            c->cur = NULL;
        }
        if (nread == UV_EOF && (c->qhead || c->writing || conn_has_output(c)))
            c->close_after_flush = 1;   /* half-closed: answer, then close */
        else
            conn_close(c);
        return;
    }
    c->srv->n_bytes_in += (double)nread;
    if (c->stop_reading)
        return;   /* bytes after a request that closes the connection */
    conn_feed(c, buf->base, (size_t)nread);
    if (!c->closing)
        conn_flush(c);
}

/* A new connection around a socket: accepted from the listener, or an
 * existing one (http_server_adopt). */
static int conn_open(hserver *srv, uv_stream_t *listener, uv_os_sock_t sock)
{
    hconn *c = calloc(1, sizeof *c);
    if (!c)
        return UV_ENOMEM;
    if (++srv->conn_structs > srv->peak_conns)
        srv->peak_conns = srv->conn_structs;
    uv_tcp_init(srv->loop, &c->tcp);
    c->tcp.data = c;
    c->srv = srv;
    srv->refs++;
    int rc = listener ? uv_accept(listener, (uv_stream_t *)&c->tcp) : uv_tcp_open(&c->tcp, sock);
    if (rc != 0) {
        c->closing = 1;
        uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
        return rc;
    }
    /* link first, so that conn_close can unlink */
    deadline_link(srv, c, HTTP_DEADLINE_NONE);
    srv->nconns++;
    if (srv->nconns > srv->max_connections) {
        srv->n_rejected++;
        conn_close(c);
        return 0;
    }
    srv->n_accepted++;
    uv_tcp_nodelay(&c->tcp, 1);
    http_parser_init(&c->parser, HTTP_REQUEST);
    conn_deadline(c, HTTP_DEADLINE_HEADER);
    rc = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (rc != 0)
        conn_close(c);
    return rc;
}

static void on_connection(uv_stream_t *listener, int status)
{
    hserver *srv = listener->data;
    if (status < 0 || !srv->listening)
        return;
    conn_open(srv, listener, 0);
}

int http_server_adopt(hserver *srv, uv_os_sock_t sock)
{
    if (srv->closed)
        return UV_EINVAL;
    return conn_open(srv, NULL, sock);
}

/* ---------------------------------------------------------------- requests */

void http_req_hold(hreq *r)
{
    r->handles++;
}

void http_req_release_hold(hreq *r)
{
    if (--r->handles == 0 && r->orphan) {
        free(r);
        if (--norphans == 0 && trim_pending)
            trim_memory();   /* the last of a burst's requests is gone */
    }
}

int http_req_connected(const hreq *r)
{
    const hconn *c = r->conn;
    return c && !c->closing && !c->close_pending && !c->finishing;
}

int http_engine_pooled_requests(void)
{
    return nfree_reqs;
}

const char *http_req_url(const hreq *r, size_t *len)
{
    *len = r->url_len;
    return r->head.data ? r->head.data : "";
}

/* Splits the URL into path and query (either may be empty). */
void http_req_split_url(const hreq *r, const char **path, size_t *plen, const char **query, size_t *qlen)
{
    size_t ulen;
    const char *url = http_req_url(r, &ulen);
    const char *start = url;
    const char *end = url + ulen;
    if (ulen && url[0] != '/' && url[0] != '*') {
        /* absolute form: scheme://authority/path?query */
        struct http_parser_url u;
        http_parser_url_init(&u);
        if (http_parser_parse_url(url, ulen, 0, &u) == 0) {
            if (u.field_set & (1 << UF_PATH)) {
                start = url + u.field_data[UF_PATH].off;
            } else {
                start = "/";
                end = start + 1;
                *path = start;
                *plen = 1;
                *query = NULL;
                *qlen = 0;
                if (u.field_set & (1 << UF_QUERY)) {
                    *query = url + u.field_data[UF_QUERY].off;
                    *qlen = u.field_data[UF_QUERY].len;
                }
                return;
            }
        }
    }
    const char *hash = memchr(start, '#', (size_t)(end - start));
    if (hash)
        end = hash;
    const char *q = memchr(start, '?', (size_t)(end - start));
    if (q) {
        *path = start;
        *plen = (size_t)(q - start);
        *query = q + 1;
        *qlen = (size_t)(end - q - 1);
    } else {
        *path = start;
        *plen = (size_t)(end - start);
        *query = NULL;
        *qlen = 0;
    }
}

/* ---------------------------------------------------------------- responses */

int http_valid_header_name(const char *s, size_t n)
{
    if (!n)
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch <= 32 || ch >= 127 || ch == ':')
            return 0;
    }
    return 1;
}

int http_valid_header_value(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '\r' || ch == '\n' || ch == 0)
            return 0;
    }
    return 1;
}

const char *http_response_header(tamarco_buf *b, const char *name, size_t nlen, const char *value, size_t vlen,
                                 resp_flags *fl)
{
    if (!http_valid_header_name(name, nlen))
        return "invalid header name";
    if (!http_valid_header_value(value, vlen))
        return "header value contains CR, LF or NUL";
    switch (nlen) {
    case 4:
        if (strncasecmp(name, "date", 4) == 0) fl->has_date = 1;
        break;
    case 6:
        if (strncasecmp(name, "server", 6) == 0) fl->has_server = 1;
        break;
    case 12:
        if (strncasecmp(name, "content-type", 12) == 0) fl->has_ctype = 1;
        break;
    }
    if (!tamarco_buf_reserve(b, nlen + vlen + 4))
        return "out of memory";
    tamarco_buf_add(b, name, nlen);
    BUF_LIT(b, ": ");
    tamarco_buf_add(b, value, vlen);
    BUF_LIT(b, "\r\n");
    return NULL;
}

int http_response_header_is_own(const char *name, size_t nlen)
{
    return (nlen == 10 && strncasecmp(name, "connection", 10) == 0) ||
           (nlen == 14 && strncasecmp(name, "content-length", 14) == 0) ||
           (nlen == 17 && strncasecmp(name, "transfer-encoding", 17) == 0);
}

/* While draining, the last request known on a connection closes it. */
static int draining_last(hconn *c, hreq *r)
{
    return c->srv->draining && !r->next && !c->cur;
}

/* Finishes r: the response is queued (head of queue: into the output). */
static void complete_response(hreq *r, hconn *c)
{
    r->responded = 1;
    r->gen++;
    c->srv->n_responses++;
    if (r == c->qhead)
        conn_advance(c);
    if (!c->in_feed && !c->closing)
        conn_flush(c);
}

/* The client is gone: the response is dropped and r is done with. */
static void drop_response(hreq *r)
{
    hconn *c = r->conn;
    if (r->srv)
        r->srv->n_dropped_responses++;
    if (c) {
        /* (defensive) still linked to its connection: it frees r */
        r->responded = 1;
        r->gen++;
    } else {
        req_release(r);
    }
}

int http_response_begin(hreq *r, int status, tamarco_buf **out, size_t *mark)
{
    if (!http_req_connected(r)) {
        drop_response(r);
        return 1;
    }
    hconn *c = r->conn;
    tamarco_buf *b = &r->resp;
    if (r == c->qhead) {
        /* the head of the queue writes straight into the output */
        if (out_acquire(c->srv, &c->out) != 0)
            return -1;
        b = &c->out->buf;
    }
    *mark = b->len;
    if (!tamarco_buf_reserve(b, 64))
        return -1;
    put_status_line(b, status);
    *out = b;
    return 0;
}

void http_response_cancel(tamarco_buf *b, size_t mark)
{
    tamarco_buf_truncate(b, mark);
}

int http_response_end(hreq *r, tamarco_buf *b, size_t mark, int status, const resp_flags *fl, const char *body,
                      size_t blen, const char *ctype, size_t ctlen)
{
    hconn *c = r->conn;
    int is_head = r->method == HTTP_HEAD;
    int close = !r->keep_alive || fl->wants_close || draining_last(c, r);
    /* a 1.0 client that asked for keep-alive must hear it confirmed */
    int http10_ka = !close && r->http_major == 1 && r->http_minor == 0;
    if (put_common_headers(b, c->srv, status, blen, close, http10_ka, ctype, ctlen, fl) != 0 ||
        (!is_head && status_has_body(status) && blen && buf_put(b, body, blen) != 0)) {
        tamarco_buf_truncate(b, mark);
        return -1;
    }
    r->close_after = (unsigned char)close;
    complete_response(r, c);
    return 0;
}

int http_respond_error(hreq *r, int status, const char *message)
{
    tamarco_buf *b;
    size_t mark;
    int rc = http_response_begin(r, status, &b, &mark);
    if (rc != 0)
        return -1;
    char body[160];
    int blen = snprintf(body, sizeof body, "{\"error\":\"%s\"}", message);
    static const resp_flags none = {0, 0, 0, 0};
    return http_response_end(r, b, mark, status, &none, body, (size_t)blen, "application/json", 16);
}

/* ---------------------------------------------------------------- server */

static void on_drain_timer(uv_timer_t *timer);

hserver *http_server_new(uv_loop_t *loop, const http_engine_callbacks *cb, void *user)
{
    /* our own limits replace the parser's compiled-in 80 KiB */
    http_parser_set_max_header_size(0x7fffffff);
    hserver *srv = calloc(1, sizeof *srv);
    if (!srv)
        return NULL;
    srv->loop = loop;
    srv->cb = cb;
    srv->user = user;
    srv->max_header_size = 8192;
    srv->max_body_size = 1024 * 1024;
    srv->max_headers = 100;
    srv->header_timeout = 10000;
    srv->body_timeout = 30000;
    srv->idle_timeout = 60000;
    srv->send_timeout = 60000;
    srv->max_connections = 10000;
    srv->max_pipeline = 64;
    http_server_set_name(srv, "tamarco");
    uv_timer_init(loop, &srv->drain_timer);
    srv->drain_timer.data = srv;
    uv_timer_init(loop, &srv->timer);
    srv->timer.data = srv;
    srv->refs = 3;   /* the owner and the two timers */
    return srv;
}

int http_server_set_name(hserver *srv, const char *name)
{
    size_t len = strlen(name);
    if (len > 100 || !http_valid_header_value(name, len))
        return -1;
    srv->server_header_len = len ? (size_t)snprintf(srv->server_header, sizeof srv->server_header,
                                                    "Server: %s\r\n", name) : 0;
    return 0;
}

int http_server_listen(hserver *srv, const struct sockaddr *addr, int backlog, int reuse_port)
{
    if (srv->listening || srv->closed)
        return UV_EINVAL;
    uv_tcp_init_ex(srv->loop, &srv->listener, addr->sa_family);
    srv->listener.data = srv;
    srv->refs++;   /* the listener handle */
    if (reuse_port) {
        uv_os_fd_t fd;
        int one = 1;
        if (uv_fileno((uv_handle_t *)&srv->listener, &fd) == 0)
            setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    }
    int rc = uv_tcp_bind(&srv->listener, addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&srv->listener, backlog, on_connection);
    if (rc != 0) {
        uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
        return rc;
    }
    srv->listening = 1;
    return 0;
}

void http_server_stop_accepting(hserver *srv)
{
    if (!srv->listening)
        return;
    srv->listening = 0;
    uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
}

/* Closes every connection, or only the idle ones. One being parsed right
 * now closes when its parser returns (and stays in its list till then), so
 * this walks the lists instead of emptying them. */
static void close_all(hserver *srv, int idle_only)
{
    for (int k = 0; k < HTTP_DEADLINE_KINDS; k++) {
        hconn *c = srv->deadline_head[k];
        while (c) {
            hconn *next = c->next;
            if (!idle_only || (!c->cur && !c->qhead && !c->writing && !conn_has_output(c)))
                conn_close(c);
            c = next;
        }
    }
}

/* The struct lives on until the last handle closed and the last detached
 * request was answered. */
void http_server_close(hserver *srv)
{
    if (srv->closed)
        return;
    http_server_stop_accepting(srv);
    srv->closed = 1;
    close_all(srv, 0);
    /* the timer closes: the connections it was to resume are closed too */
    hconn *c = srv->resume;
    srv->resume = NULL;
    while (c) {
        hconn *next = c->resume_next;
        c->resume_pending = 0;
        conn_free_if_done(c);
        c = next;
    }
    uv_close((uv_handle_t *)&srv->timer, on_server_handle_closed);
    if (srv->drain_waiting)
        uv_timer_start(&srv->drain_timer, on_drain_timer, 0, 0);   /* reports, then closes */
    else
        uv_close((uv_handle_t *)&srv->drain_timer, on_server_handle_closed);
    server_unref(srv);   /* the owner's reference */
}

static void on_drain_timer(uv_timer_t *timer)
{
    hserver *srv = timer->data;
    int timed_out = srv->nconns > 0;
    close_all(srv, 0);
    int closed = srv->closed;
    if (srv->drain_waiting) {
        srv->drain_waiting = 0;
        srv->cb->on_drained(srv, timed_out);
    }
    if (closed)
        uv_close((uv_handle_t *)&srv->drain_timer, on_server_handle_closed);
}

/* Called when a connection closes during a drain. */
static void drain_check(hserver *srv)
{
    if (srv->nconns == 0 && srv->drain_waiting && !srv->closed)
        uv_timer_start(&srv->drain_timer, on_drain_timer, 0, 0);   /* report on the next turn */
}

void http_server_cancel_drain(hserver *srv)
{
    srv->drain_waiting = 0;
    if (srv->closed)
        return;   /* its timer is already set to close itself */
    uv_timer_stop(&srv->drain_timer);
}

int http_server_shutdown(hserver *srv, uint64_t drain_ms)
{
    http_server_stop_accepting(srv);
    srv->draining = 1;
    close_all(srv, 1);
    if (srv->nconns == 0)
        return 1;
    srv->drain_waiting = 1;
    uv_timer_start(&srv->drain_timer, on_drain_timer, drain_ms, 0);
    return 0;
}

int http_server_in_flight(const hserver *srv)
{
    int n = 0;
    for (int k = 0; k < HTTP_DEADLINE_KINDS; k++)
        for (const hconn *c = srv->deadline_head[k]; c; c = c->next)
            n += c->inflight;
    return n;
}
