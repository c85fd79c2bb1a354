/* The HTTP engine without Lua: a connected socket pair given to a server
 * (http_server_adopt), raw bytes written on the other end, and the answers
 * read back while the loop turns. */
#include "http_engine.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int failures;
static uv_loop_t loop;
static hserver *srv;
static hreq *held;          /* a request answered later, by a timer */
static uv_timer_t later;
static hreq *held_slow;     /* one whose handler runs longer than the idle timeout */
static uv_timer_t slow;
static int drained = -1;

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "FAIL: %s\n", what);
        failures++;
    }
}

static void answer(hreq *r, int status, const char *body)
{
    tamarco_buf *b;
    size_t mark;
    if (http_response_begin(r, status, &b, &mark) != 0)
        return;
    resp_flags fl = {0, 0, 0, 0};
    check(http_response_header(b, "X-Test", 6, "yes", 3, &fl) == NULL, "a valid header is written");
    check(http_response_header(b, "X-Bad", 5, "a\r\nb", 4, &fl) != NULL, "CR LF in a value is refused");
    check(http_response_end(r, b, mark, status, &fl, body, strlen(body), "text/plain", 10) == 0, "response end");
}

static hserver *shut_after_later;   /* shut down right after /later is answered */
static int shut_result = -1;
static uv_check_t answer_check;

/* Answers /later and shuts its server down from a check callback: after
 * the loop's timers, before its close callbacks. */
static void on_answer_check(uv_check_t *h)
{
    uv_check_stop(h);
    if (held)
        answer(held, 200, "later");
    held = NULL;
    shut_result = http_server_shutdown(shut_after_later, 1000);
    shut_after_later = NULL;
}

static void on_later(uv_timer_t *t)
{
    if (shut_after_later) {
        uv_check_start(&answer_check, on_answer_check);
        return;
    }
    if (held)
        answer(held, 200, "later");
    held = NULL;
}

static void on_slow(uv_timer_t *t)
{
    if (held_slow)
        answer(held_slow, 200, "slow");
    held_slow = NULL;
}

static void on_request(hserver *s, hreq *r)
{
    const char *path, *query;
    size_t plen, qlen;
    http_req_split_url(r, &path, &plen, &query, &qlen);
    if (plen == 6 && memcmp(path, "/later", 6) == 0) {
        held = r;
        uv_timer_start(&later, on_later, 20, 0);
    } else if (plen == 5 && memcmp(path, "/slow", 5) == 0) {
        held_slow = r;
        uv_timer_start(&slow, on_slow, 400, 0);
    } else {
        answer(r, 200, "hello");
    }
}

static void on_drained(hserver *s, int timed_out)
{
    drained = timed_out;
}

static const http_engine_callbacks callbacks = {.on_request = on_request, .on_drained = on_drained};

/* A new client of server s: it gets one end of a socket pair. */
static int client_of(hserver *s)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        return -1;
    check(http_server_adopt(s, sv[0]) == 0, "adopt a socket");
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
    return sv[1];
}

static int client(void)
{
    return client_of(srv);
}

static int count(const char *s, const char *what)
{
    int n = 0;
    for (size_t l = strlen(what); (s = strstr(s, what)); s += l)
        n++;
    return n;
}

/* Turns the loop and reads from fd until `want` responses came complete,
 * the server closed (*eof) or 2 s passed. */
static size_t collect(int fd, char *out, size_t cap, int want, int *eof)
{
    size_t len = 0;
    *eof = 0;
    for (int turn = 0; turn < 400; turn++) {
        uv_run(&loop, UV_RUN_NOWAIT);
        struct pollfd p = {fd, POLLIN, 0};
        poll(&p, 1, 5);
        ssize_t n = read(fd, out + len, cap - 1 - len);
        if (n == 0) {
            *eof = 1;
            break;
        }
        if (n > 0)
            len += (size_t)n;
        out[len] = 0;
        /* the bodies here are short: a head's end means the response came */
        if (want && count(out, "\r\n\r\n") >= want && n <= 0)
            break;
    }
    out[len] = 0;
    return len;
}

/* Turns the loop for about ms milliseconds. */
static void turn_for(uint64_t ms)
{
    uv_update_time(&loop);
    uint64_t until = uv_now(&loop) + ms;
    while (uv_now(&loop) < until) {
        uv_run(&loop, UV_RUN_NOWAIT);
        poll(NULL, 0, 5);
        uv_update_time(&loop);
    }
}

/* Reads what fd has without waiting: 1 once the server closed it. */
static int drain_eof(int fd, char *out, size_t cap, size_t *len)
{
    for (;;) {
        ssize_t n = read(fd, out + *len, cap - 1 - *len);
        if (n == 0)
            return 1;
        if (n < 0)
            return 0;
        *len += (size_t)n;
        out[*len] = 0;
    }
}

static void send_all(int fd, const char *s)
{
    size_t len = strlen(s);
    while (len) {
        ssize_t n = write(fd, s, len);
        if (n < 0 && errno == EAGAIN) {
            uv_run(&loop, UV_RUN_NOWAIT);
            continue;
        }
        if (n <= 0)
            return;
        s += n;
        len -= (size_t)n;
    }
}

int main(void)
{
    char buf[65536];
    int eof;
    signal(SIGPIPE, SIG_IGN);   /* as the host does: a gone peer is an EPIPE */
    uv_loop_init(&loop);
    uv_timer_init(&loop, &later);
    uv_timer_init(&loop, &slow);
    uv_check_init(&loop, &answer_check);
    srv = http_server_new(&loop, &callbacks, NULL);
    check(srv != NULL, "server created");
    check(http_server_set_name(srv, "bad\r\nname") == -1, "a server name with CR LF is refused");
    srv->header_timeout = 200;

    /* a request, kept alive */
    int fd = client();
    send_all(fd, "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    collect(fd, buf, sizeof buf, 1, &eof);
    check(strncmp(buf, "HTTP/1.1 200 OK\r\n", 17) == 0, "GET answered 200");
    check(strstr(buf, "X-Test: yes\r\n") != NULL, "the handler's header is sent");
    check(strstr(buf, "Content-Length: 5\r\n") && strstr(buf, "\r\n\r\nhello"), "body with its length");
    check(!eof, "keep-alive connection stays open");

    /* pipelined: the first one is answered last, the responses keep the order */
    send_all(fd, "GET /later HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    collect(fd, buf, sizeof buf, 2, &eof);
    const char *first = strstr(buf, "later"), *second = strstr(buf, "hello");
    check(first && second && first < second, "pipelined responses in request order");
    close(fd);

    /* what a lenient parser would let through: 400 or 505, then closed */
    static const char *const refused[][2] = {
        {"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello", "HTTP/1.1 400 "},
        {"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
         "HTTP/1.1 400 "},
        {"GET /hello HTTP/1.1\r\n\r\n", "HTTP/1.1 400 "},
        {"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "HTTP/1.1 400 "},
        {"GET /hello HTTP/1.1\r\nHost: x\r\nX: \001\r\n\r\n", "HTTP/1.1 400 "},
        {"GET /hello HTTP/2.0\r\nHost: x\r\n\r\n", "HTTP/1.1 505 "},
        {"GET /hello HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n", "HTTP/1.1 400 "},
        {"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "HTTP/1.1 501 "},
    };
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        fd = client();
        send_all(fd, refused[i][0]);
        collect(fd, buf, sizeof buf, 0, &eof);
        check(strncmp(buf, refused[i][1], 13) == 0, refused[i][1]);
        check(eof, "a refused request closes its connection");
        check(count(buf, "HTTP/1.1 ") == 1, "nothing after the refusal");
        close(fd);
    }

    /* 100-continue, then the client leaves before the answer */
    for (int i = 0; i < 50; i++) {
        fd = client();
        send_all(fd, "POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello");
        close(fd);
        uv_run(&loop, UV_RUN_NOWAIT);
    }

    /* a head that never completes: 408 after header_timeout */
    fd = client();
    send_all(fd, "GET /hello HTTP/1.1\r\nHo");
    collect(fd, buf, sizeof buf, 0, &eof);
    check(strncmp(buf, "HTTP/1.1 408 ", 13) == 0, "a slow head gets 408");
    check(eof, "and its connection is closed");
    close(fd);

    /* keep-alive idle timeout (all the connections' deadlines share the
     * server's one timer): idle connections are closed, each in its turn;
     * one that keeps asking, or whose handler runs longer than the
     * timeout, is not */
    srv->idle_timeout = 150;
    double timeouts = srv->n_timeouts;
    static const char get[] = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n";
    int idle_a = client(), idle_b = client(), busy = client(), slowc = client();
    send_all(idle_a, get);
    collect(idle_a, buf, sizeof buf, 1, &eof);
    check(!eof && strstr(buf, "\r\n\r\nhello"), "idle A answered");
    send_all(slowc, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n");
    turn_for(60);
    send_all(idle_b, get);
    collect(idle_b, buf, sizeof buf, 1, &eof);
    check(!eof && strstr(buf, "\r\n\r\nhello"), "idle B answered");
    char sbuf[4096] = "";
    size_t slen = 0;
    int a_closed = 0, b_closed = 0, slow_closed = 0, busy_closed = 0, slow_answered_first = 0;
    size_t dummy = 0;
    for (int round = 0; round < 100 && !(a_closed && b_closed && slow_closed); round++) {
        send_all(busy, get);
        collect(busy, buf, sizeof buf, 1, &eof);
        busy_closed |= eof || !strstr(buf, "\r\n\r\nhello");
        turn_for(30);
        if (!a_closed && drain_eof(idle_a, buf, sizeof buf, &dummy))
            a_closed = 1;
        if (!b_closed && drain_eof(idle_b, buf, sizeof buf, &dummy))
            b_closed = 1, check(a_closed, "the connection idle longer closes first");
        if (!slow_closed && drain_eof(slowc, sbuf, sizeof sbuf, &slen))
            slow_closed = 1, slow_answered_first = strstr(sbuf, "\r\n\r\nslow") != NULL;
    }
    check(a_closed && b_closed, "idle connections are closed at their deadline");
    check(!busy_closed, "a connection that keeps asking stays open");
    check(slow_answered_first, "a connection whose handler runs is answered before it idles out");
    check(srv->n_timeouts - timeouts == 3, "three idle timeouts counted");
    close(idle_a);
    close(idle_b);
    close(slowc);
    close(busy);
    srv->idle_timeout = 60000;

    /* a connection paused by its pipelining limit, whose reading was to
     * resume on the server's timer when the server shut down: answered,
     * closed, and freed once (ASan checks the resume after the close) */
    hserver *paused = http_server_new(&loop, &callbacks, NULL);
    paused->max_pipeline = 1;
    fd = client_of(paused);
    shut_after_later = paused;
    send_all(fd, "GET /later HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n");
    collect(fd, buf, sizeof buf, 0, &eof);
    check(strstr(buf, "\r\n\r\nlater") != NULL, "the request before the pause is answered");
    check(eof && count(buf, "HTTP/1.1 ") == 1, "then the shutdown closes the paused connection");
    check(shut_result == 1, "nothing left to drain");
    close(fd);
    http_server_close(paused);

    /* graceful shutdown: the busy connection finishes, then on_drained */
    fd = client();
    send_all(fd, "GET /later HTTP/1.1\r\nHost: x\r\n\r\n");
    for (int i = 0; i < 5; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    check(http_server_shutdown(srv, 2000) == 0, "shutdown waits for the busy connection");
    collect(fd, buf, sizeof buf, 1, &eof);
    check(strstr(buf, "Connection: close\r\n") != NULL, "the last response closes");
    for (int i = 0; i < 100 && drained < 0; i++)
        uv_run(&loop, UV_RUN_ONCE);
    check(drained == 0, "on_drained without a timeout");
    close(fd);

    check(srv->n_bad_requests >= 6, "bad requests counted");
    http_server_close(srv);
    uv_close((uv_handle_t *)&later, NULL);
    uv_close((uv_handle_t *)&slow, NULL);
    uv_close((uv_handle_t *)&answer_check, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    check(uv_loop_close(&loop) == 0, "every handle closed");
    if (failures)
        return 1;
    printf("http engine: all checks passed\n");
    return 0;
}
