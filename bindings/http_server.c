/*
 * tamarco.c.http_server: the HTTP/1.x server on the host's loop.
 *
 * Bytes and syscalls live here; routing, JSON, CORS and caching live in
 * lua/tamarco/resources/http_server.lua. Per connection: a uv_tcp_t, one
 * uv_timer_t (header, body, keep-alive and send deadlines, re-armed lazily),
 * an http_parser, a queue of requests in arrival order and an output buffer.
 *
 *   local hs = require "tamarco.c.http_server"
 *   local server, err, code = hs.listen({ host = "127.0.0.1", port = 8080 }, dispatch)
 *   -- dispatch(req) runs in a new task for every complete request
 *   function dispatch(req)
 *       local method, path = req:info()
 *       req:respond(200, { ["x-a"] = "b" }, "body", "text/plain")
 *   end
 *   server:shutdown(5000)   -- yields: stop accepting, drain, close
 *
 * Requests are parsed into a per-request buffer (URL and header bytes) plus
 * an array of offsets; Lua strings are only made when an accessor asks.
 * Request structs are pooled process-wide and never freed, so a request
 * handle (a small userdata holding the struct and its generation) is always
 * safe to use: after respond() the generation moves on and the handle
 * reports "request already answered".
 *
 * Responses are written strictly in request order (pipelining): a response
 * for the request at the head of the queue goes straight into the output
 * buffer, a later one waits in its request until the earlier ones are done.
 * Responses produced while a read is being parsed are flushed together at
 * the end of the read; the flush tries uv_try_write first and falls back to
 * uv_write for what the kernel did not take.
 */
#include "host.h"

#include <http_parser.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#define SERVER_MT "tamarco.http_server.server"
#define REQUEST_MT "tamarco.http_server.request"

#define READ_BUFFER_SIZE (64 * 1024)
#define MAX_POOLED_BUFFERS 64
#define KEEP_HEAD_BYTES (4 * 1024)      /* pooled buffers larger than this are freed */
#define KEEP_BODY_BYTES (4 * 1024)
#define KEEP_RESP_BYTES (4 * 1024)
#define KEEP_OUT_BYTES (16 * 1024)

/* ---------------------------------------------------------------- buffers */

typedef struct tbuf {
    char *p;
    size_t len, cap;
} tbuf;

static int tbuf_reserve(tbuf *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 512;
    while (cap < b->len + extra)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int tbuf_put(tbuf *b, const void *s, size_t n)
{
    if (b->len + n > b->cap && tbuf_reserve(b, n) != 0)
        return -1;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

/* Appends without a capacity check: the caller reserved enough. */
static inline void tbuf_raw(tbuf *b, const void *s, size_t n)
{
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

#define TBUF_LIT(b, lit) tbuf_raw((b), (lit), sizeof(lit) - 1)

static void tbuf_free(tbuf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Empties b; frees its memory when it grew beyond `keep`. */
static void tbuf_reset(tbuf *b, size_t keep)
{
    b->len = 0;
    if (b->cap > keep)
        tbuf_free(b);
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

/* ---------------------------------------------------------------- types */

typedef struct hdr {
    uint32_t name_off, name_len, value_off, value_len;
} hdr;

typedef struct hserver hserver;
typedef struct hconn hconn;
typedef struct hreq hreq;

struct hreq {
    hreq *next;           /* connection queue, or the pool's free list */
    hconn *conn;          /* NULL once detached (connection gone) */
    hserver *srv;
    uint32_t gen;         /* moves on at respond/release: stale handles notice */
    unsigned char method, http_major, http_minor;
    unsigned char keep_alive, responded, close_after, detached, expect_continue;
    tbuf head;            /* URL bytes, then header names and values */
    uint32_t url_len;
    hdr *hdrs;
    int nhdrs, hdrs_cap;
    tbuf body;
    tbuf resp;            /* a response waiting for the earlier ones */
};

struct hconn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wreq;
    uv_shutdown_t sreq;
    http_parser parser;
    hserver *srv;
    hconn *prev, *next;   /* the server's list */
    hreq *cur;            /* being parsed */
    hreq *ready;          /* just completed by the parser, to dispatch */
    hreq *qhead, *qtail;  /* dispatched, in arrival order */
    int inflight;         /* requests in the queue */
    tbuf out;             /* pending bytes, not yet handed to the kernel */
    tbuf wbuf;            /* bytes of the uv_write in progress */
    tbuf stash;           /* unparsed input kept while reading is paused */
    size_t head_bytes;    /* size of the current request's head so far */
    uint64_t deadline, timer_due;
    int handles;          /* open libuv handles; freed at 0 */
    int error_status;     /* set by a parser callback that rejects a request */
    unsigned in_feed : 1, in_field : 1, closing : 1, finishing : 1, writing : 1;
    unsigned stop_reading : 1, read_paused : 1, close_after_flush : 1, eof : 1;
    unsigned resume_pending : 1;
};

struct hserver {
    tamarco_host *host;
    uv_tcp_t listener;
    uv_timer_t drain_timer;
    int refs;             /* userdata + open handles + connections + detached requests */
    int dispatcher_ref, req_mt_ref, self_ref;
    int listening, draining, closed;
    int drain_wait;       /* wait id of a task in shutdown(), 0 if none */
    hconn *conns;
    int nconns;
    tbuf pool[MAX_POOLED_BUFFERS];   /* spare output buffers */
    int npool;
    /* limits */
    size_t max_header_size, max_body_size;
    uint64_t header_timeout, body_timeout, idle_timeout, send_timeout;
    int max_connections, max_pipeline, max_headers;
    char server_header[128];
    size_t server_header_len;
    /* counters */
    double n_accepted, n_rejected, n_requests, n_responses, n_bad_requests, n_timeouts,
        n_dropped_responses, n_bytes_in, n_bytes_out;
};

typedef struct server_box {
    hserver *srv;
} server_box;

typedef struct req_handle {
    hreq *r;
    uint32_t gen;
} req_handle;

static const struct http_parser_settings parser_settings;
static char read_buffer[READ_BUFFER_SIZE];

/* ---------------------------------------------------------------- request pool */

static hreq *free_reqs;
static int nfree_reqs;

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
    r->keep_alive = 0;
    r->url_len = 0;
    r->nhdrs = 0;
    r->head.len = r->body.len = r->resp.len = 0;
    return r;
}

static void server_unref(hserver *srv);

/* Returns r to the pool; its handles become stale. */
static void req_release(hreq *r)
{
    hserver *srv = r->srv;
    int detached = r->detached;
    r->gen++;
    r->conn = NULL;
    r->srv = NULL;
    tbuf_reset(&r->head, KEEP_HEAD_BYTES);
    tbuf_reset(&r->body, KEEP_BODY_BYTES);
    tbuf_reset(&r->resp, KEEP_RESP_BYTES);
    if (r->hdrs_cap > 64) {
        free(r->hdrs);
        r->hdrs = NULL;
        r->hdrs_cap = 0;
    }
    /* Structs are never freed (only their buffers): a handle may point at
     * one forever and must be able to read its generation. */
    r->next = free_reqs;
    free_reqs = r;
    nfree_reqs++;
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

typedef struct resp_flags {
    int has_ctype, has_server, has_date, wants_close;
} resp_flags;

/* Writes the status line. Caller reserved >= 64 bytes. */
static void put_status_line(tbuf *b, int status)
{
    const char *reason = reason_of(status);
    size_t rl = strlen(reason);
    TBUF_LIT(b, "HTTP/1.1 ");
    char *p = put_uint(b->p + b->len, (uint64_t)status);
    b->len = (size_t)(p - b->p);
    b->p[b->len++] = ' ';
    tbuf_raw(b, reason, rl);
    TBUF_LIT(b, "\r\n");
}

/* Writes the headers every response gets and the blank line. */
static int put_common_headers(tbuf *b, hserver *srv, int status, size_t body_len, int close,
                              int http10_keep_alive, const char *ctype, size_t ctlen,
                              const resp_flags *fl)
{
    update_date();
    if (tbuf_reserve(b, 160 + ctlen + srv->server_header_len + date_line_len) != 0)
        return -1;
    if (ctype && !fl->has_ctype) {
        TBUF_LIT(b, "Content-Type: ");
        tbuf_raw(b, ctype, ctlen);
        TBUF_LIT(b, "\r\n");
    }
    if (status >= 200 && status != 204 && status != 304) {
        TBUF_LIT(b, "Content-Length: ");
        char *p = put_uint(b->p + b->len, body_len);
        b->len = (size_t)(p - b->p);
        TBUF_LIT(b, "\r\n");
    }
    if (!fl->has_date)
        tbuf_raw(b, date_line, date_line_len);
    if (!fl->has_server && srv->server_header_len)
        tbuf_raw(b, srv->server_header, srv->server_header_len);
    if (close)
        TBUF_LIT(b, "Connection: close\r\n");
    else if (http10_keep_alive)
        TBUF_LIT(b, "Connection: keep-alive\r\n");
    TBUF_LIT(b, "\r\n");
    return 0;
}

/* ---------------------------------------------------------------- server refs */

static void server_free(hserver *srv)
{
    for (int i = 0; i < srv->npool; i++)
        tbuf_free(&srv->pool[i]);
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

/* Output buffers come from a per-server pool so idle connections hold none. */
static inline int out_acquire(hserver *srv, tbuf *b)
{
    if (b->p)
        return 0;
    if (srv->npool > 0) {
        *b = srv->pool[--srv->npool];
        b->len = 0;
        return 0;
    }
    return tbuf_reserve(b, 4096);
}

static void out_release(hserver *srv, tbuf *b)
{
    if (!b->p)
        return;
    if (srv->npool < MAX_POOLED_BUFFERS && b->cap <= KEEP_OUT_BYTES) {
        b->len = 0;
        srv->pool[srv->npool++] = *b;
        b->p = NULL;
        b->len = b->cap = 0;
    } else {
        tbuf_free(b);
    }
}

/* ---------------------------------------------------------------- connections */

static void conn_close(hconn *c);
static void conn_flush(hconn *c);
static void conn_feed(hconn *c, const char *p, size_t len);
static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);
static void drain_check(hserver *srv);

static void on_conn_handle_closed(uv_handle_t *handle)
{
    hconn *c = handle->data;
    if (--c->handles > 0)
        return;
    hserver *srv = c->srv;
    out_release(srv, &c->out);
    out_release(srv, &c->wbuf);
    tbuf_free(&c->stash);
    free(c);
    server_unref(srv);
}

static void on_conn_timer(uv_timer_t *timer);

/* Sets the connection's deadline to now + ms (0: none). The timer is only
 * restarted when it is not running or would fire too late. */
static void conn_deadline(hconn *c, uint64_t ms)
{
    if (c->closing)
        return;
    if (!ms) {
        c->deadline = 0;
        return;
    }
    uint64_t due = uv_now(c->srv->host->loop) + ms;
    c->deadline = due;
    if (!uv_is_active((uv_handle_t *)&c->timer) || due < c->timer_due) {
        c->timer_due = due;
        uv_timer_start(&c->timer, on_conn_timer, ms, 0);
    }
}

static void conn_resume_reading(hconn *c);

static void on_conn_timer(uv_timer_t *timer)
{
    hconn *c = timer->data;
    if (c->closing)
        return;
    if (c->resume_pending) {
        c->resume_pending = 0;
        conn_resume_reading(c);
        if (c->closing)
            return;
        if (c->deadline && !uv_is_active((uv_handle_t *)&c->timer)) {
            uint64_t now = uv_now(c->srv->host->loop);
            c->timer_due = c->deadline;
            uv_timer_start(&c->timer, on_conn_timer, c->deadline > now ? c->deadline - now : 0, 0);
        }
        return;
    }
    if (!c->deadline)
        return;
    uint64_t now = uv_now(c->srv->host->loop);
    if (now < c->deadline) {
        c->timer_due = c->deadline;
        uv_timer_start(&c->timer, on_conn_timer, c->deadline - now, 0);
        return;
    }
    c->srv->n_timeouts++;
    conn_close(c);
}

/* Closes the connection now. Requests whose handlers still run are
 * detached: their response is dropped when it comes. */
static void conn_close(hconn *c)
{
    if (c->closing)
        return;
    hserver *srv = c->srv;
    c->closing = 1;
    if (c->prev)
        c->prev->next = c->next;
    else
        srv->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    srv->nconns--;
    if (c->cur) {
        req_release(c->cur);
        c->cur = NULL;
    }
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
    uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, on_conn_handle_closed);
    if (srv->draining)
        drain_check(srv);
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    conn_close(req->data);
}

/* Closes after the pending output reached the kernel (FIN, then close). */
static void conn_finish(hconn *c)
{
    if (c->closing || c->finishing)
        return;
    c->finishing = 1;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->sreq.data = c;
    if (uv_shutdown(&c->sreq, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
        conn_close(c);
}

static void on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf);

/* Reading resumes from a loop callback (the connection's timer), never
 * from inside a handler's respond(): dispatching starts tasks. */
static void conn_schedule_resume(hconn *c)
{
    if (c->resume_pending || c->closing)
        return;
    c->resume_pending = 1;
    c->timer_due = uv_now(c->srv->host->loop);
    uv_timer_start(&c->timer, on_conn_timer, 0, 0);
}

static void conn_resume_reading(hconn *c)
{
    if (c->closing || c->finishing || c->stop_reading || !c->read_paused)
        return;
    c->read_paused = 0;
    if (c->stash.len) {
        /* parse what was left over when reading paused */
        tbuf stash = c->stash;
        c->stash.p = NULL;
        c->stash.len = c->stash.cap = 0;
        conn_feed(c, stash.p, stash.len);
        tbuf_free(&stash);
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
        conn_deadline(c, srv->idle_timeout);
    } else if (!c->cur) {
        conn_deadline(c, 0);   /* handlers are running: no read deadline */
    }
    if (c->read_paused && !c->in_feed && c->inflight < srv->max_pipeline)
        conn_schedule_resume(c);
}

static void on_write(uv_write_t *req, int status)
{
    hconn *c = req->data;
    c->writing = 0;
    out_release(c->srv, &c->wbuf);
    if (status < 0 || c->closing) {
        conn_close(c);
        return;
    }
    if (c->out.len)
        conn_flush(c);
    else
        conn_after_flush(c);
}

static void conn_flush(hconn *c)
{
    if (c->closing || c->writing)
        return;
    hserver *srv = c->srv;
    if (!c->out.len) {
        out_release(srv, &c->out);
        conn_after_flush(c);
        return;
    }
    uv_buf_t b = uv_buf_init(c->out.p, (unsigned)c->out.len);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n == (int)c->out.len) {
        srv->n_bytes_out += n;
        c->out.len = 0;
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
    /* the rest goes through uv_write; new output accumulates in c->out */
    c->wbuf = c->out;
    c->out.p = NULL;
    c->out.len = c->out.cap = 0;
    b = uv_buf_init(c->wbuf.p + n, (unsigned)(c->wbuf.len - (size_t)n));
    c->wreq.data = c;
    if (uv_write(&c->wreq, (uv_stream_t *)&c->tcp, &b, 1, on_write) != 0) {
        conn_close(c);
        return;
    }
    c->writing = 1;
    srv->n_bytes_out += (double)b.len;
    conn_deadline(c, srv->send_timeout);
}

/* Moves finished responses at the head of the queue into the output. */
static void conn_advance(hconn *c)
{
    hreq *r;
    while ((r = c->qhead) && r->responded) {
        if (r->resp.len) {
            if (out_acquire(c->srv, &c->out) != 0 || tbuf_put(&c->out, r->resp.p, r->resp.len) != 0) {
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
            hreq *rest = c->qhead;
            while (rest) {
                hreq *next = rest->next;
                if (rest->responded)
                    req_release(rest);
                else
                    req_detach(rest);
                rest = next;
            }
            c->qhead = c->qtail = NULL;
            c->inflight = 0;
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
    tbuf *b = &r->resp;
    static const resp_flags none = {0, 0, 0, 0};
    if (tbuf_reserve(b, 64 + (size_t)blen) != 0 ||
        (put_status_line(b, status), 0) ||
        put_common_headers(b, srv, status, (size_t)blen, 1, 0, "application/json", 16, &none) != 0 ||
        tbuf_put(b, body, (size_t)blen) != 0) {
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

static int respond_c(hreq *r, int status, const char *message);

static void dispatch(hconn *c, hreq *r)
{
    hserver *srv = c->srv;
    tamarco_host *host = srv->host;
    lua_State *L = host->L;
    srv->n_requests++;
    lua_rawgeti(L, LUA_REGISTRYINDEX, srv->dispatcher_ref);
    req_handle *h = lua_newuserdata(L, sizeof *h);
    h->r = r;
    h->gen = r->gen;
    lua_rawgeti(L, LUA_REGISTRYINDEX, srv->req_mt_ref);
    lua_setmetatable(L, -2);
    uint32_t gen = r->gen;
    if (tamarco_start_task(host, 1) != 0 && r->gen == gen) {
        /* the dispatcher itself failed (already logged): answer for it */
        respond_c(r, 500, "internal server error");
    }
}

/* ---------------------------------------------------------------- parser callbacks */

static int head_account(hconn *c, size_t n, int status)
{
    c->head_bytes += n;
    if (c->head_bytes > c->srv->max_header_size) {
        c->error_status = status;
        return -1;
    }
    return 0;
}

static int on_message_begin(http_parser *p)
{
    hconn *c = p->data;
    if (c->cur)
        req_release(c->cur);
    c->cur = req_alloc(c->srv, c);
    if (!c->cur) {
        c->error_status = 503;
        return -1;
    }
    c->head_bytes = 0;
    c->in_field = 0;
    conn_deadline(c, c->srv->header_timeout);
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t len)
{
    hconn *c = p->data;
    hreq *r = c->cur;
    if (head_account(c, len, 414))
        return -1;
    if (tbuf_put(&r->head, at, len) != 0) {
        c->error_status = 503;
        return -1;
    }
    r->url_len += (uint32_t)len;
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t len)
{
    hconn *c = p->data;
    hreq *r = c->cur;
    if (head_account(c, len + 4, 431))
        return -1;
    if (!c->in_field) {
        if (r->nhdrs >= c->srv->max_headers) {
            c->error_status = 431;
            return -1;
        }
        if (r->nhdrs == r->hdrs_cap) {
            int cap = r->hdrs_cap ? r->hdrs_cap * 2 : 16;
            hdr *h = realloc(r->hdrs, (size_t)cap * sizeof *h);
            if (!h) {
                c->error_status = 503;
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
    if (tbuf_put(&r->head, at, len) != 0) {
        c->error_status = 503;
        return -1;
    }
    r->hdrs[r->nhdrs - 1].name_len += (uint32_t)len;
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t len)
{
    hconn *c = p->data;
    hreq *r = c->cur;
    if (head_account(c, len, 431))
        return -1;
    if (!r->nhdrs)
        return 0;
    hdr *h = &r->hdrs[r->nhdrs - 1];
    if (c->in_field) {
        c->in_field = 0;
        h->value_off = (uint32_t)r->head.len;
    }
    if (tbuf_put(&r->head, at, len) != 0) {
        c->error_status = 503;
        return -1;
    }
    h->value_len += (uint32_t)len;
    return 0;
}

static int name_is(const hreq *r, const hdr *h, const char *name, size_t len)
{
    return h->name_len == len && strncasecmp(r->head.p + h->name_off, name, len) == 0;
}

static int on_headers_complete(http_parser *p)
{
    hconn *c = p->data;
    hreq *r = c->cur;
    hserver *srv = c->srv;
    c->in_field = 0;
    if ((p->flags & F_CONTENTLENGTH) && p->content_length > srv->max_body_size) {
        c->error_status = 413;
        return -1;
    }
    for (int i = 0; i < r->nhdrs; i++) {
        hdr *h = &r->hdrs[i];
        if (name_is(r, h, "expect", 6)) {
            if (h->value_len == 12 && strncasecmp(r->head.p + h->value_off, "100-continue", 12) == 0)
                r->expect_continue = 1;
            else {
                c->error_status = 417;
                return -1;
            }
        }
    }
    /* "100 Continue" only when nothing is waiting ahead of it on the wire */
    if (r->expect_continue && p->http_minor >= 1 && !c->qhead && !c->out.len && !c->writing) {
        static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
        if (out_acquire(srv, &c->out) != 0 || tbuf_put(&c->out, cont, sizeof cont - 1) != 0) {
            c->error_status = 503;
            return -1;
        }
        conn_flush(c);   /* now: the client waits for it before sending the body */
    }
    conn_deadline(c, srv->body_timeout);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t len)
{
    hconn *c = p->data;
    hreq *r = c->cur;
    if (r->body.len + len > c->srv->max_body_size) {
        c->error_status = 413;
        return -1;
    }
    if (tbuf_put(&r->body, at, len) != 0) {
        c->error_status = 503;
        return -1;
    }
    return 0;
}

static int on_message_complete(http_parser *p)
{
    hconn *c = p->data;
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
    c->ready = r;
    conn_deadline(c, 0);
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
};

static int status_for_parse_error(hconn *c, enum http_errno err)
{
    if (c->error_status)
        return c->error_status;
    switch (err) {
    case HPE_HEADER_OVERFLOW: return 431;
    case HPE_INVALID_VERSION: return 505;
    default: return 400;
    }
}

static const char *message_for_status(int status)
{
    switch (status) {
    case 413: return "request body too large";
    case 414: return "request URI too long";
    case 417: return "expectation failed";
    case 431: return "request header fields too large";
    case 503: return "service unavailable";
    case 505: return "HTTP version not supported";
    default: return "bad request";
    }
}

/* Parses input; dispatches every complete request at once, in order. */
static void conn_feed(hconn *c, const char *p, size_t len)
{
    hserver *srv = c->srv;
    c->in_feed = 1;
    while (len > 0 && !c->closing && !c->stop_reading) {
        size_t n = http_parser_execute(&c->parser, &parser_settings, p, len);
        enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);
        if (err == HPE_PAUSED) {
            http_parser_pause(&c->parser, 0);
            p += n;
            len -= n;
            hreq *r = c->ready;
            c->ready = NULL;
            if (r)
                dispatch(c, r);
            if (len > 0 && c->inflight >= srv->max_pipeline && !c->closing && !c->stop_reading) {
                /* too many requests in flight: keep the rest for later */
                if (tbuf_put(&c->stash, p, len) != 0) {
                    conn_close(c);
                    break;
                }
                c->read_paused = 1;
                uv_read_stop((uv_stream_t *)&c->tcp);
                break;
            }
            continue;
        }
        if (err != HPE_OK) {
            int status = status_for_parse_error(c, err);
            conn_reject(c, status, message_for_status(status));
            break;
        }
        p += n;
        len -= n;
        if (n == 0)
            break;
    }
    c->in_feed = 0;
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
        if (nread == UV_EOF && (c->qhead || c->writing || c->out.len))
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

static void on_connection(uv_stream_t *listener, int status)
{
    hserver *srv = listener->data;
    if (status < 0 || !srv->listening)
        return;
    hconn *c = calloc(1, sizeof *c);
    if (!c)
        return;
    uv_tcp_init(srv->host->loop, &c->tcp);
    c->tcp.data = c;
    c->srv = srv;
    srv->refs++;
    if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0) {
        c->handles = 1;
        c->closing = 1;
        uv_close((uv_handle_t *)&c->tcp, on_conn_handle_closed);
        return;
    }
    uv_timer_init(srv->host->loop, &c->timer);
    c->timer.data = c;
    c->handles = 2;
    /* link first, so that conn_close can unlink */
    c->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = c;
    srv->conns = c;
    srv->nconns++;
    if (srv->nconns > srv->max_connections) {
        srv->n_rejected++;
        conn_close(c);
        return;
    }
    srv->n_accepted++;
    uv_tcp_nodelay(&c->tcp, 1);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    conn_deadline(c, srv->header_timeout);
    if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0)
        conn_close(c);
}

/* ---------------------------------------------------------------- request handle */

static hreq *check_req(lua_State *L)
{
    req_handle *h = lua_touserdata(L, 1);
    if (!h || !lua_getmetatable(L, 1) || !lua_rawequal(L, -1, lua_upvalueindex(1)))
        luaL_typerror(L, 1, "http request");
    lua_pop(L, 1);
    if (h->r->gen != h->gen)
        luaL_error(L, "request already answered");
    return h->r;
}

static const char *req_url(hreq *r, size_t *len)
{
    *len = r->url_len;
    return r->head.p ? r->head.p : "";
}

/* Splits the URL into path and query (either may be empty). */
static void split_url(hreq *r, const char **path, size_t *plen, const char **query, size_t *qlen)
{
    size_t ulen;
    const char *url = req_url(r, &ulen);
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

/* info() -> method, path (raw, without the query string) */
static int l_req_info(lua_State *L)
{
    hreq *r = check_req(L);
    const char *path, *query;
    size_t plen, qlen;
    split_url(r, &path, &plen, &query, &qlen);
    lua_pushstring(L, http_method_str((enum http_method)r->method));
    lua_pushlstring(L, path, plen);
    return 2;
}

static int l_req_method(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushstring(L, http_method_str((enum http_method)r->method));
    return 1;
}

static int l_req_url(lua_State *L)
{
    hreq *r = check_req(L);
    size_t len;
    const char *url = req_url(r, &len);
    lua_pushlstring(L, url, len);
    return 1;
}

/* query_string() -> the raw query string, or nil */
static int l_req_query_string(lua_State *L)
{
    hreq *r = check_req(L);
    const char *path, *query;
    size_t plen, qlen;
    split_url(r, &path, &plen, &query, &qlen);
    if (!query)
        return 0;
    lua_pushlstring(L, query, qlen);
    return 1;
}

/* header(name) -> value or nil; case-insensitive; repeated fields joined by ", " */
static int l_req_header(lua_State *L)
{
    hreq *r = check_req(L);
    size_t nlen;
    const char *name = luaL_checklstring(L, 2, &nlen);
    int found = 0;
    luaL_Buffer b;
    for (int i = 0; i < r->nhdrs; i++) {
        hdr *h = &r->hdrs[i];
        if (!name_is(r, h, name, nlen))
            continue;
        if (found == 0) {
            lua_pushlstring(L, r->head.p + h->value_off, h->value_len);
        } else {
            if (found == 1) {
                luaL_buffinit(L, &b);
                lua_pushvalue(L, -1);
                luaL_addvalue(&b);
            }
            luaL_addlstring(&b, ", ", 2);
            luaL_addlstring(&b, r->head.p + h->value_off, h->value_len);
        }
        found++;
    }
    if (found > 1)
        luaL_pushresult(&b);
    return found ? 1 : 0;
}

/* headers() -> { lowercased-name = value } (repeated fields joined by ", ") */
static int l_req_headers(lua_State *L)
{
    hreq *r = check_req(L);
    lua_createtable(L, 0, r->nhdrs);
    char name[256];
    for (int i = 0; i < r->nhdrs; i++) {
        hdr *h = &r->hdrs[i];
        size_t n = h->name_len < sizeof name ? h->name_len : sizeof name - 1;
        for (size_t k = 0; k < n; k++) {
            char ch = r->head.p[h->name_off + k];
            name[k] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
        }
        lua_pushlstring(L, name, n);
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, r->head.p + h->value_off, h->value_len);
        } else {
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, r->head.p + h->value_off, h->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
    return 1;
}

static int l_req_body(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushlstring(L, r->body.p ? r->body.p : "", r->body.len);
    return 1;
}

static int l_req_keep_alive(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushboolean(L, r->keep_alive);
    return 1;
}

/* version() -> "1.1" / "1.0" */
static int l_req_version(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushfstring(L, "%d.%d", r->http_major, r->http_minor);
    return 1;
}

/* remote_address() -> ip, port or nil when the connection is gone */
static int l_req_remote_address(lua_State *L)
{
    hreq *r = check_req(L);
    if (!r->conn || r->conn->closing)
        return 0;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getpeername(&r->conn->tcp, (struct sockaddr *)&ss, &len) != 0)
        return 0;
    char ip[64];
    int port;
    if (ss.ss_family == AF_INET6) {
        uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    } else {
        uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
    lua_pushstring(L, ip);
    lua_pushinteger(L, port);
    return 2;
}

/* connected() -> false once the client went away (the response would be dropped) */
static int l_req_connected(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushboolean(L, r->conn && !r->conn->closing && !r->conn->finishing);
    return 1;
}

static int valid_header_name(const char *s, size_t n)
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

static int valid_header_value(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch == '\r' || ch == '\n' || ch == 0)
            return 0;
    }
    return 1;
}

/* Writes one "name: value" line; returns an error message or NULL. */
static const char *put_header_line(tbuf *b, const char *name, size_t nlen, lua_State *L, int vidx,
                                   resp_flags *fl)
{
    size_t vlen;
    const char *value = lua_tolstring(L, vidx, &vlen);
    if (!value)
        return "header values must be strings or numbers";
    if (!valid_header_value(value, vlen))
        return "header value contains CR, LF or NUL";
    if (tbuf_reserve(b, nlen + vlen + 4) != 0)
        return "out of memory";
    tbuf_raw(b, name, nlen);
    TBUF_LIT(b, ": ");
    tbuf_raw(b, value, vlen);
    TBUF_LIT(b, "\r\n");
    (void)fl;
    return NULL;
}

/* Writes the user's headers from the table at `idx`; skips the ones the
 * server owns (content-length, transfer-encoding, connection). */
static const char *put_user_headers(lua_State *L, int idx, tbuf *b, resp_flags *fl)
{
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            lua_pop(L, 2);
            return "header names must be strings";
        }
        size_t nlen;
        const char *name = lua_tolstring(L, -2, &nlen);
        if (!valid_header_name(name, nlen)) {
            lua_pop(L, 2);
            return "invalid header name";
        }
        int skip = 0;
        switch (nlen) {
        case 4:
            if (strncasecmp(name, "date", 4) == 0) fl->has_date = 1;
            break;
        case 6:
            if (strncasecmp(name, "server", 6) == 0) fl->has_server = 1;
            break;
        case 10:
            if (strncasecmp(name, "connection", 10) == 0) {
                skip = 1;
                const char *v = lua_tostring(L, -1);
                if (v && strcasecmp(v, "close") == 0)
                    fl->wants_close = 1;
            }
            break;
        case 12:
            if (strncasecmp(name, "content-type", 12) == 0) fl->has_ctype = 1;
            break;
        case 14:
            if (strncasecmp(name, "content-length", 14) == 0) skip = 1;
            break;
        case 17:
            if (strncasecmp(name, "transfer-encoding", 17) == 0) skip = 1;
            break;
        }
        if (!skip) {
            const char *err = NULL;
            if (lua_type(L, -1) == LUA_TTABLE) {
                int vt = lua_gettop(L);
                int n = (int)lua_objlen(L, vt);
                for (int i = 1; i <= n && !err; i++) {
                    lua_rawgeti(L, vt, i);
                    err = put_header_line(b, name, nlen, L, lua_gettop(L), fl);
                    lua_pop(L, 1);
                }
            } else if (lua_type(L, -1) == LUA_TBOOLEAN) {
                err = "header values must be strings or numbers";
            } else {
                err = put_header_line(b, name, nlen, L, lua_gettop(L), fl);
            }
            if (err) {
                lua_pop(L, 2);
                return err;
            }
        }
        lua_pop(L, 1);
    }
    return NULL;
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

/* respond(status, headers|nil, body|nil, content_type|nil) -> true, or
 * false when the client is gone (the response is dropped). Raises on bad
 * arguments (bad status, header names/values with CR/LF) leaving the
 * request unanswered, so the caller can still answer with a 500. */
static int l_req_respond(lua_State *L)
{
    hreq *r = check_req(L);
    int status = luaL_checkint(L, 2);
    luaL_argcheck(L, status >= 100 && status <= 999, 2, "HTTP status must be 100..999");
    int has_headers = !lua_isnoneornil(L, 3);
    if (has_headers)
        luaL_checktype(L, 3, LUA_TTABLE);
    size_t blen = 0;
    const char *body = lua_isnoneornil(L, 4) ? "" : luaL_checklstring(L, 4, &blen);
    size_t ctlen = 0;
    const char *ctype = lua_isnoneornil(L, 5) ? NULL : luaL_checklstring(L, 5, &ctlen);
    hconn *c = r->conn;
    if (!c || c->closing || c->finishing) {
        /* the client is gone: drop the response */
        if (r->srv)
            r->srv->n_dropped_responses++;
        if (c) {
            /* (defensive) still linked to its connection: it frees r */
            r->responded = 1;
            r->gen++;
        } else {
            req_release(r);
        }
        lua_pushboolean(L, 0);
        return 1;
    }
    hserver *srv = c->srv;
    int head_of_queue = (r == c->qhead);
    tbuf *b = head_of_queue ? &c->out : &r->resp;
    if (head_of_queue && out_acquire(srv, b) != 0)
        return luaL_error(L, "out of memory");
    size_t mark = b->len;
    resp_flags fl = {0, 0, 0, 0};
    if (tbuf_reserve(b, 64) != 0)
        return luaL_error(L, "out of memory");
    put_status_line(b, status);
    if (has_headers) {
        const char *err = put_user_headers(L, 3, b, &fl);
        if (err) {
            b->len = mark;
            return luaL_error(L, "bad response header: %s", err);
        }
    }
    int is_head = r->method == HTTP_HEAD;
    int close = !r->keep_alive || fl.wants_close || draining_last(c, r);
    /* a 1.0 client that asked for keep-alive must hear it confirmed */
    int http10_ka = !close && r->http_major == 1 && r->http_minor == 0;
    if (put_common_headers(b, srv, status, blen, close, http10_ka, ctype, ctlen, &fl) != 0) {
        b->len = mark;
        return luaL_error(L, "out of memory");
    }
    if (!is_head && status_has_body(status) && blen) {
        if (tbuf_put(b, body, blen) != 0) {
            b->len = mark;
            return luaL_error(L, "out of memory");
        }
    }
    r->close_after = (unsigned char)close;
    complete_response(r, c);
    lua_pushboolean(L, 1);
    return 1;
}

/* A response from C (the dispatcher failed before answering). */
static int respond_c(hreq *r, int status, const char *message)
{
    hconn *c = r->conn;
    if (!c || c->closing || c->finishing) {
        if (!c)
            req_release(r);
        else {
            r->responded = 1;
            r->gen++;
        }
        return -1;
    }
    hserver *srv = c->srv;
    tbuf *b = (r == c->qhead) ? &c->out : &r->resp;
    if (b == &c->out && out_acquire(srv, b) != 0)
        return -1;
    char body[160];
    int blen = snprintf(body, sizeof body, "{\"error\":\"%s\"}", message);
    int close = !r->keep_alive || draining_last(c, r);
    static const resp_flags none = {0, 0, 0, 0};
    if (tbuf_reserve(b, 64) != 0)
        return -1;
    put_status_line(b, status);
    if (put_common_headers(b, srv, status, (size_t)blen, close, 0, "application/json", 16, &none) != 0)
        return -1;
    if (r->method != HTTP_HEAD && tbuf_put(b, body, (size_t)blen) != 0)
        return -1;
    r->close_after = (unsigned char)close;
    complete_response(r, c);
    return 0;
}

static int l_req_tostring(lua_State *L)
{
    req_handle *h = lua_touserdata(L, 1);
    if (h->r->gen != h->gen) {
        lua_pushliteral(L, "http request (answered)");
        return 1;
    }
    size_t len;
    const char *url = req_url(h->r, &len);
    lua_pushfstring(L, "http request %s ", http_method_str((enum http_method)h->r->method));
    lua_pushlstring(L, url, len > 200 ? 200 : len);
    lua_concat(L, 2);
    return 1;
}

/* ---------------------------------------------------------------- server */

static hserver *check_server(lua_State *L)
{
    server_box *box = luaL_checkudata(L, 1, SERVER_MT);
    if (!box->srv)
        luaL_error(L, "the HTTP server is closed");
    return box->srv;
}

static void stop_accepting(hserver *srv)
{
    if (!srv->listening)
        return;
    srv->listening = 0;
    uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
}

static void on_drain_timer(uv_timer_t *timer);

/* Closes every connection now and the server's handles; releases its
 * Lua references. The C struct lives until the last handle closed and
 * the last detached request was answered. */
static void server_close(lua_State *L, server_box *box)
{
    hserver *srv = box->srv;
    if (!srv)
        return;
    box->srv = NULL;
    stop_accepting(srv);
    srv->closed = 1;
    while (srv->conns)
        conn_close(srv->conns);
    if (srv->drain_wait)
        uv_timer_start(&srv->drain_timer, on_drain_timer, 0, 0);   /* wakes it, then closes */
    else
        uv_close((uv_handle_t *)&srv->drain_timer, on_server_handle_closed);
    luaL_unref(L, LUA_REGISTRYINDEX, srv->dispatcher_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, srv->req_mt_ref);
    srv->dispatcher_ref = srv->req_mt_ref = LUA_NOREF;
    server_unref(srv);   /* the userdata's reference */
}

static int push_drain_result(lua_State *co, void *ud)
{
    int timed_out = *(int *)ud;
    if (timed_out) {
        lua_pushnil(co);
        lua_pushliteral(co, "timeout");
        return 2;
    }
    lua_pushboolean(co, 1);
    return 1;
}

static void on_drain_timer(uv_timer_t *timer)
{
    hserver *srv = timer->data;
    int timed_out = srv->nconns > 0;
    while (srv->conns)
        conn_close(srv->conns);
    int closed = srv->closed;
    if (srv->drain_wait) {
        int id = srv->drain_wait;
        srv->drain_wait = 0;
        tamarco_wake(srv->host, id, push_drain_result, &timed_out);
    }
    if (closed)
        uv_close((uv_handle_t *)&srv->drain_timer, on_server_handle_closed);
}

/* Called when a connection closes during a drain. */
static void drain_check(hserver *srv)
{
    if (srv->nconns == 0 && srv->drain_wait && !srv->closed)
        uv_timer_start(&srv->drain_timer, on_drain_timer, 0, 0);   /* wake on the next turn */
}

static void cancel_drain(void *ud)
{
    hserver *srv = ud;
    srv->drain_wait = 0;
    if (srv->closed)
        return;   /* its timer is already set to close itself */
    uv_timer_stop(&srv->drain_timer);
}

/* shutdown([drain_ms=5000]) -> true, or nil, "timeout". Yields: stops
 * accepting, lets in-flight requests finish (their responses say
 * Connection: close), closes idle connections at once and the rest when
 * the drain time is over. */
static int l_server_shutdown(lua_State *L)
{
    hserver *srv = check_server(L);
    double ms = luaL_optnumber(L, 2, 5000);
    luaL_argcheck(L, ms >= 0, 2, "drain time must be >= 0");
    if (!tamarco_in_task(L))
        return luaL_error(L, "shutdown yields: call it inside a task");
    if (srv->drain_wait)
        return luaL_error(L, "shutdown already in progress");
    stop_accepting(srv);
    srv->draining = 1;
    hconn *c = srv->conns;
    while (c) {
        hconn *next = c->next;
        if (!c->cur && !c->qhead && !c->writing && !c->out.len)
            conn_close(c);
        c = next;
    }
    if (srv->nconns == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    srv->drain_wait = tamarco_wait_begin(L, cancel_drain, srv);
    uv_timer_start(&srv->drain_timer, on_drain_timer, (uint64_t)ms, 0);
    return tamarco_wait_yield(L);
}

/* stop_accepting(): closes the listening socket; connections stay. */
static int l_server_stop_accepting(lua_State *L)
{
    stop_accepting(check_server(L));
    return 0;
}

/* close(): closes everything now (in-flight responses are dropped). */
static int l_server_close(lua_State *L)
{
    server_box *box = luaL_checkudata(L, 1, SERVER_MT);
    server_close(L, box);
    return 0;
}

static int l_server_gc(lua_State *L)
{
    server_box *box = luaL_checkudata(L, 1, SERVER_MT);
    server_close(L, box);
    return 0;
}

/* address() -> ip, port (the bound port when listening on port 0) */
static int l_server_address(lua_State *L)
{
    hserver *srv = check_server(L);
    if (!srv->listening)
        return 0;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&ss, &len) != 0)
        return 0;
    char ip[64];
    int port;
    if (ss.ss_family == AF_INET6) {
        uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    } else {
        uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
    lua_pushstring(L, ip);
    lua_pushinteger(L, port);
    return 2;
}

/* stats() -> { connections, accepted, rejected, requests, responses, ... } */
static int l_server_stats(lua_State *L)
{
    hserver *srv = check_server(L);
    int inflight = 0;
    for (hconn *c = srv->conns; c; c = c->next)
        inflight += c->inflight;
    lua_createtable(L, 0, 12);
#define FIELD(name, value) (lua_pushnumber(L, (lua_Number)(value)), lua_setfield(L, -2, name))
    FIELD("connections", srv->nconns);
    FIELD("in_flight", inflight);
    FIELD("accepted", srv->n_accepted);
    FIELD("rejected", srv->n_rejected);
    FIELD("requests", srv->n_requests);
    FIELD("responses", srv->n_responses);
    FIELD("bad_requests", srv->n_bad_requests);
    FIELD("timeouts", srv->n_timeouts);
    FIELD("dropped_responses", srv->n_dropped_responses);
    FIELD("bytes_in", srv->n_bytes_in);
    FIELD("bytes_out", srv->n_bytes_out);
#undef FIELD
    lua_pushboolean(L, srv->listening);
    lua_setfield(L, -2, "listening");
    lua_pushboolean(L, srv->draining);
    lua_setfield(L, -2, "draining");
    return 1;
}

static int l_server_tostring(lua_State *L)
{
    server_box *box = luaL_checkudata(L, 1, SERVER_MT);
    lua_pushfstring(L, "http server (%s)", box->srv ? "open" : "closed");
    return 1;
}

/* ---------------------------------------------------------------- listen */

static double opt_number(lua_State *L, int t, const char *key, double def)
{
    lua_getfield(L, t, key);
    double v = def;
    if (!lua_isnil(L, -1)) {
        if (!lua_isnumber(L, -1))
            luaL_error(L, "option '%s' must be a number", key);
        v = lua_tonumber(L, -1);
        if (v < 0)
            luaL_error(L, "option '%s' must be >= 0", key);
    }
    lua_pop(L, 1);
    return v;
}

static int opt_bool(lua_State *L, int t, const char *key, int def)
{
    lua_getfield(L, t, key);
    int v = lua_isnil(L, -1) ? def : lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

/* listen(options, dispatcher) -> server | nil, message, code
 * options: host ("127.0.0.1"), port (8080; 0 picks one), backlog (511),
 * reuse_port (false), max_header_size (8192), max_body_size (1 MiB),
 * max_headers (100), header_timeout (10 s), body_timeout (30 s),
 * idle_timeout (60 s), send_timeout (60 s) in milliseconds (0: none),
 * max_connections (10000), max_pipeline (64), server_name ("tamarco"). */
static int l_listen(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host)
        return luaL_error(L, "the HTTP server runs on the service's main state, not in a thread");
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TFUNCTION);

    lua_getfield(L, 1, "host");
    const char *ip = luaL_optstring(L, -1, "127.0.0.1");
    lua_pop(L, 1);   /* the options table keeps the string alive */
    double port = opt_number(L, 1, "port", 8080);
    if (port > 65535 || port != (int)port)
        return luaL_error(L, "option 'port' must be an integer in 0..65535");
    int backlog = (int)opt_number(L, 1, "backlog", 511);
    int reuse_port = opt_bool(L, 1, "reuse_port", 0);

    struct sockaddr_storage addr;
    memset(&addr, 0, sizeof addr);
    const char *bind_ip = strcmp(ip, "localhost") == 0 ? "127.0.0.1" : ip;
    int family = strchr(bind_ip, ':') ? AF_INET6 : AF_INET;
    int rc = family == AF_INET6 ? uv_ip6_addr(bind_ip, (int)port, (struct sockaddr_in6 *)&addr)
                                : uv_ip4_addr(bind_ip, (int)port, (struct sockaddr_in *)&addr);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "cannot listen on %s:%d: invalid IP address", ip, (int)port);
        lua_pushstring(L, "EINVAL");
        return 3;
    }

    hserver *srv = calloc(1, sizeof *srv);
    if (!srv)
        return luaL_error(L, "out of memory");
    srv->host = host;
    srv->dispatcher_ref = srv->req_mt_ref = srv->self_ref = LUA_NOREF;
    srv->max_header_size = (size_t)opt_number(L, 1, "max_header_size", 8192);
    srv->max_body_size = (size_t)opt_number(L, 1, "max_body_size", 1024 * 1024);
    srv->max_headers = (int)opt_number(L, 1, "max_headers", 100);
    srv->header_timeout = (uint64_t)opt_number(L, 1, "header_timeout", 10000);
    srv->body_timeout = (uint64_t)opt_number(L, 1, "body_timeout", 30000);
    srv->idle_timeout = (uint64_t)opt_number(L, 1, "idle_timeout", 60000);
    srv->send_timeout = (uint64_t)opt_number(L, 1, "send_timeout", 60000);
    srv->max_connections = (int)opt_number(L, 1, "max_connections", 10000);
    srv->max_pipeline = (int)opt_number(L, 1, "max_pipeline", 64);
    if (srv->max_pipeline < 1)
        srv->max_pipeline = 1;
    lua_getfield(L, 1, "server_name");
    const char *name = luaL_optstring(L, -1, "tamarco");
    if (*name) {
        if (!valid_header_value(name, strlen(name)) || strlen(name) > 100) {
            free(srv);
            return luaL_error(L, "option 'server_name' is not a valid header value");
        }
        srv->server_header_len = (size_t)snprintf(srv->server_header, sizeof srv->server_header,
                                                  "Server: %s\r\n", name);
    }
    lua_pop(L, 1);

    uv_tcp_init_ex(host->loop, &srv->listener, (unsigned)family);
    srv->listener.data = srv;
    srv->refs = 1;   /* the listener handle */
    if (reuse_port) {
        uv_os_fd_t fd;
        int one = 1;
        if (uv_fileno((uv_handle_t *)&srv->listener, &fd) == 0)
            setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    }
    rc = uv_tcp_bind(&srv->listener, (struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&srv->listener, backlog, on_connection);
    if (rc != 0) {
        uv_close((uv_handle_t *)&srv->listener, on_server_handle_closed);
        lua_pushnil(L);
        lua_pushfstring(L, "cannot listen on %s:%d: %s", ip, (int)port, uv_strerror(rc));
        lua_pushstring(L, uv_err_name(rc));
        return 3;
    }
    srv->listening = 1;
    uv_timer_init(host->loop, &srv->drain_timer);
    srv->drain_timer.data = srv;
    srv->refs += 2;   /* the drain timer and the userdata */

    lua_pushvalue(L, 2);
    srv->dispatcher_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    luaL_getmetatable(L, REQUEST_MT);
    srv->req_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    server_box *box = lua_newuserdata(L, sizeof *box);
    box->srv = srv;
    luaL_getmetatable(L, SERVER_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* pool_stats() -> pooled request structs (for tests and leak hunting) */
static int l_pool_stats(lua_State *L)
{
    lua_pushinteger(L, nfree_reqs);
    return 1;
}

int luaopen_tamarco_c_http_server(lua_State *L)
{
    /* our own limits replace the parser's compiled-in 80 KiB */
    http_parser_set_max_header_size(0x7fffffff);

    static const luaL_Reg request_methods[] = {
        {"info", l_req_info},
        {"method", l_req_method},
        {"url", l_req_url},
        {"query_string", l_req_query_string},
        {"header", l_req_header},
        {"headers", l_req_headers},
        {"body", l_req_body},
        {"keep_alive", l_req_keep_alive},
        {"version", l_req_version},
        {"remote_address", l_req_remote_address},
        {"connected", l_req_connected},
        {"respond", l_req_respond},
        {NULL, NULL},
    };
    luaL_newmetatable(L, REQUEST_MT);
    int mt = lua_gettop(L);
    lua_createtable(L, 0, 12);
    for (const luaL_Reg *f = request_methods; f->name; f++) {
        lua_pushvalue(L, mt);
        lua_pushcclosure(L, f->func, 1);
        lua_setfield(L, -2, f->name);
    }
    lua_setfield(L, mt, "__index");
    lua_pushcfunction(L, l_req_tostring);
    lua_setfield(L, mt, "__tostring");
    lua_pushliteral(L, "http request");
    lua_setfield(L, mt, "__metatable");
    lua_pop(L, 1);

    static const luaL_Reg server_methods[] = {
        {"shutdown", l_server_shutdown},
        {"stop_accepting", l_server_stop_accepting},
        {"close", l_server_close},
        {"address", l_server_address},
        {"stats", l_server_stats},
        {NULL, NULL},
    };
    luaL_newmetatable(L, SERVER_MT);
    lua_createtable(L, 0, 6);
    luaL_register(L, NULL, server_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, l_server_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, l_server_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);

    static const luaL_Reg funcs[] = {
        {"listen", l_listen},
        {"pool_stats", l_pool_stats},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
