/*
 * The HTTP/1.x server engine: sockets, parsing, pipelining, limits,
 * keep-alive and timeouts on a libuv loop, with no Lua in it. The Lua API
 * (bindings/http_server.c) and the C tests and fuzz target drive it through
 * the functions below; what a request means is decided by whoever handles
 * on_request.
 *
 * Per connection: a uv_tcp_t, an http_parser, a queue of requests in
 * arrival order and a deadline; an idle keep-alive connection holds nothing
 * else. Output buffers, with the libuv request that writes them (or shuts
 * the connection down), are lent from a per-server pool while there is
 * output; input is read into one shared buffer and parsed at once (only what
 * a paused connection could not parse yet is copied). Requests are parsed
 * into a per-request buffer (URL and header bytes) plus an array of offsets.
 *
 * Deadlines (header, body, keep-alive idle, send) share one timer per
 * server. Each kind of deadline has its own timeout, the same for every
 * connection, so a connection whose deadline is (re)set goes to the tail of
 * its kind's list and every list stays ordered by deadline: the timer walks
 * the heads. Every open connection is in one of these lists (the ones
 * without a deadline in a list of their own).
 *
 * Responses are written strictly in request order (pipelining): a response
 * for the request at the head of the queue goes straight into the output
 * buffer, a later one waits in its request until the earlier ones are done.
 * Responses produced while a read is being parsed are flushed together at
 * the end of the read; the flush tries uv_try_write first and falls back to
 * uv_write for what the kernel did not take.
 *
 * Request structs are pooled and outlive every handle that points at one:
 * a handle keeps the struct and its generation, and after the response the
 * generation moves on, so a stale handle can tell (http_req_hold/release
 * count the handles).
 */
#ifndef TAMARCO_HTTP_ENGINE_H
#define TAMARCO_HTTP_ENGINE_H

#include <http_parser.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "byte_buffer.h"

/* ---------------------------------------------------------------- types */

#define HTTP_ENGINE_MAX_POOLED_BUFFERS 64

/* What a connection waits for, each kind with the server's timeout for it. */
enum http_deadline {
    HTTP_DEADLINE_NONE,     /* handlers are running: no timeout */
    HTTP_DEADLINE_HEADER,   /* the (rest of the) request head */
    HTTP_DEADLINE_BODY,     /* the request body */
    HTTP_DEADLINE_IDLE,     /* the next request on a kept-alive connection */
    HTTP_DEADLINE_SEND,     /* the kernel to take what was written */
    HTTP_DEADLINE_KINDS
};

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
    unsigned char in_trailers; /* past the head: fields now are a chunked body's trailer */
    unsigned char orphan; /* released beyond the pool: freed with its last handle */
    int handles;          /* handles pointing here (they read gen) */
    tamarco_buf head;     /* URL bytes, then header names and values */
    uint32_t url_len;
    hdr *hdrs;
    int nhdrs, hdrs_cap;
    tamarco_buf body;
    tamarco_buf resp;     /* a response waiting for the earlier ones */
    /* parser state while the request comes in */
    size_t head_bytes;    /* size of the head so far */
    uint64_t chunk_left;  /* data bytes left in the current chunk */
    int crlf_left;        /* bytes of the CRLF after chunk data not yet seen */
};

/* Output bytes and the libuv request that writes them or, at the end, shuts
 * the connection down: from the server's pool, held by a connection only
 * while it has output or a write or shutdown is in flight. */
typedef struct hout {
    union {
        uv_write_t write;
        uv_shutdown_t shutdown;
    } req;
    tamarco_buf buf;
} hout;

struct hconn {
    uv_tcp_t tcp;
    http_parser parser;
    hserver *srv;
    hconn *prev, *next;   /* the server's list of this kind of deadline */
    hconn *resume_next;   /* the server's list of connections to resume */
    hreq *cur;            /* being parsed */
    hreq *qhead, *qtail;  /* dispatched, in arrival order */
    hout *out;            /* pending bytes, not yet handed to the kernel */
    hout *io;             /* the write or shutdown in flight */
    tamarco_buf *stash;   /* unparsed input kept while reading is paused */
    uint64_t deadline;    /* loop time (ms); 0: none */
    int inflight;         /* requests in the queue */
    unsigned deadline_kind : 3;
    unsigned in_feed : 1, in_field : 1, closing : 1, finishing : 1, writing : 1;
    unsigned stop_reading : 1, read_paused : 1, close_after_flush : 1, eof : 1;
    unsigned resume_pending : 1, close_pending : 1;
    unsigned tcp_closed : 1;   /* its close callback ran: freed unless resume_pending */
};

/* What the engine tells its owner. Every callback runs on the loop. */
typedef struct http_engine_callbacks {
    /* a complete request, in arrival order: answer it now or later with
     * http_response_* or http_respond_error */
    void (*on_request)(hserver *srv, hreq *r);
    /* a shutdown finished (timed_out: connections were still busy) */
    void (*on_drained)(hserver *srv, int timed_out);
    /* a burst of connections is over: free what the owner can (optional) */
    void (*on_burst_end)(hserver *srv);
    /* the server struct is about to be freed (optional) */
    void (*on_free)(hserver *srv);
} http_engine_callbacks;

struct hserver {
    uv_loop_t *loop;
    const http_engine_callbacks *cb;
    void *user;           /* the owner's */
    uv_tcp_t listener;
    uv_timer_t drain_timer;
    uv_timer_t timer;     /* the connections' deadlines and resumes */
    uint64_t timer_due;   /* when it fires, while active */
    int in_timer;         /* its callback runs: it re-arms itself at the end */
    int refs;             /* owner + open handles + connections + detached requests */
    int listening, draining, closed;
    int drain_waiting;    /* a shutdown waits for on_drained */
    /* the open connections, by kind of deadline, each list in deadline order */
    hconn *deadline_head[HTTP_DEADLINE_KINDS], *deadline_tail[HTTP_DEADLINE_KINDS];
    hconn *resume;        /* connections whose reading resumes on the timer */
    int nconns;
    int conn_structs;     /* connection structs allocated (open or closing) */
    int peak_conns;       /* most of them since memory was last trimmed */
    int trim_at_zero;     /* trimmed at the end of a burst: once more at 0 */
    hout *pool[HTTP_ENGINE_MAX_POOLED_BUFFERS];   /* spare output buffers */
    int npool;
    /* limits (timeouts in ms, 0: none) */
    size_t max_header_size, max_body_size;
    uint64_t header_timeout, body_timeout, idle_timeout, send_timeout;
    int max_connections, max_pipeline, max_headers;
    char server_header[128];
    size_t server_header_len;
    /* counters */
    double n_accepted, n_rejected, n_requests, n_responses, n_bad_requests, n_timeouts,
        n_dropped_responses, n_bytes_in, n_bytes_out;
};

/* ---------------------------------------------------------------- server */

/* A server with the default limits (8 KiB head, 1 MiB body, 100 headers,
 * timeouts 10/30/60/60 s, 10000 connections, 64 pipelined), not listening.
 * The owner holds one reference, given back by http_server_close. */
hserver *http_server_new(uv_loop_t *loop, const http_engine_callbacks *cb, void *user);
/* "Server: name" on every response ("" for none); -1 when not a valid value. */
int http_server_set_name(hserver *srv, const char *name);
/* 0, or a libuv error code (the server stays usable, not listening). */
int http_server_listen(hserver *srv, const struct sockaddr *addr, int backlog, int reuse_port);
/* Takes a connected socket as a new connection (tests, fuzzing); 0 or a libuv error. */
int http_server_adopt(hserver *srv, uv_os_sock_t sock);
void http_server_stop_accepting(hserver *srv);
/* Stops accepting, closes idle connections, lets busy ones finish until
 * drain_ms: returns 1 when nothing is left (no callback), else 0 and
 * on_drained comes later. */
int http_server_shutdown(hserver *srv, uint64_t drain_ms);
/* Forgets a pending shutdown's on_drained. */
void http_server_cancel_drain(hserver *srv);
/* Closes every connection and handle now and drops the owner's reference;
 * a pending shutdown still gets on_drained. */
void http_server_close(hserver *srv);
int http_server_in_flight(const hserver *srv);
/* Spare request structs kept process-wide (for tests and leak hunting). */
int http_engine_pooled_requests(void);

/* ---------------------------------------------------------------- requests */

void http_req_hold(hreq *r);
void http_req_release_hold(hreq *r);
const char *http_req_url(const hreq *r, size_t *len);
/* Splits the URL into path and query (query NULL when there is none). */
void http_req_split_url(const hreq *r, const char **path, size_t *plen, const char **query, size_t *qlen);
int http_req_header_is(const hreq *r, const hdr *h, const char *name, size_t len);
/* The client is still there to read a response. */
int http_req_connected(const hreq *r);

/* ---------------------------------------------------------------- responses */

typedef struct resp_flags {
    int has_ctype, has_server, has_date, wants_close;
} resp_flags;

/* Starts r's response with its status line. Returns 0 (append headers to
 * *out, then http_response_end), 1 when the client is gone (the response is
 * dropped, r is no longer the caller's), -1 out of memory. */
int http_response_begin(hreq *r, int status, tamarco_buf **out, size_t *mark);
/* One "name: value" line; notes the fields the engine must know about in
 * fl. Returns an error message (nothing written) or NULL. */
const char *http_response_header(tamarco_buf *b, const char *name, size_t nlen, const char *value, size_t vlen,
                                 resp_flags *fl);
/* A header the engine writes itself (content-length, transfer-encoding,
 * connection): skip it. */
int http_response_header_is_own(const char *name, size_t nlen);
/* Adds the common headers and the body and queues the response: 0, or -1
 * out of memory (the response is rolled back to mark, r stays unanswered). */
int http_response_end(hreq *r, tamarco_buf *b, size_t mark, int status, const resp_flags *fl, const char *body,
                      size_t blen, const char *ctype, size_t ctlen);
/* Rolls a begun response back (r stays unanswered). */
void http_response_cancel(tamarco_buf *b, size_t mark);
/* A whole JSON error response {"error": message}; -1 when the client is gone. */
int http_respond_error(hreq *r, int status, const char *message);

int http_valid_header_name(const char *s, size_t n);
int http_valid_header_value(const char *s, size_t n);

#endif
