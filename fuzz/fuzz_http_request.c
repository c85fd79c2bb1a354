/* libFuzzer target: the HTTP engine's request parser and connection state
 * machine (bindings/http_engine.c), driven over a socket pair as a client
 * would: bytes in pieces cut anywhere, loop turns in between, half-closes
 * and resets at any point, handlers that answer at once or later.
 *
 * The input is a program of operations, one byte of opcode each:
 *   0 n bytes..  write the next n bytes (n: one byte)
 *   1            turn the loop
 *   2            read what the server wrote (else it piles up)
 *   3            reset: close the client (unread answers and all), new client
 *   4            half-close the client's side (EOF for the server)
 *   5            answer the requests held so far
 * Requests whose path has an odd length are held (answered by 5 or at the
 * end), the others answered at once; the answer echoes the body length.
 */
#include "http_engine.h"

#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_HELD 16

static uv_loop_t loop;
static hserver *srv;
static hreq *held[MAX_HELD];
static int nheld;

static void answer(hreq *r)
{
    tamarco_buf *b;
    size_t mark;
    if (http_response_begin(r, 200, &b, &mark) != 0)
        return;   /* gone: dropped (and released) by the engine */
    resp_flags fl = {0, 0, 0, 0};
    char body[32];
    int blen = snprintf(body, sizeof body, "%zu", r->body.len);
    if (http_response_header(b, "X-Fuzz", 6, "1", 1, &fl) != NULL ||
        http_response_end(r, b, mark, 200, &fl, body, (size_t)blen, "text/plain", 10) != 0)
        http_response_cancel(b, mark), http_respond_error(r, 500, "internal");
}

static void answer_held(void)
{
    for (int i = 0; i < nheld; i++)
        answer(held[i]);
    nheld = 0;
}

static void on_request(hserver *s, hreq *r)
{
    const char *path, *query;
    size_t plen, qlen;
    http_req_split_url(r, &path, &plen, &query, &qlen);
    for (int i = 0; i < r->nhdrs; i++)
        http_req_header_is(r, &r->hdrs[i], "host", 4);
    if ((plen & 1) && nheld < MAX_HELD)
        held[nheld++] = r;
    else
        answer(r);
}

static void on_drained(hserver *s, int timed_out)
{
}

static const http_engine_callbacks callbacks = {.on_request = on_request, .on_drained = on_drained};

static int new_client(void)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        abort();
    if (http_server_adopt(srv, sv[0]) != 0)
        abort();
    fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK);
    return sv[1];
}

static void drain_client(int fd)
{
    char buf[4096];
    while (read(fd, buf, sizeof buf) > 0)
        ;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    signal(SIGPIPE, SIG_IGN);   /* as the host does */
    uv_loop_init(&loop);
    srv = http_server_new(&loop, &callbacks, NULL);
    /* small limits, so that inputs reach them */
    srv->max_header_size = 512;
    srv->max_body_size = 1024;
    srv->max_headers = 8;
    srv->max_pipeline = 3;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fd = new_client();
    size_t i = 0;
    while (i < size) {
        uint8_t op = data[i++] % 6;
        switch (op) {
        case 0: {
            size_t n = i < size ? data[i++] : 0;
            if (n > size - i)
                n = size - i;
            if (fd >= 0 && n && write(fd, data + i, n) < 0)
                uv_run(&loop, UV_RUN_NOWAIT);
            i += n;
            break;
        }
        case 1:
            uv_run(&loop, UV_RUN_NOWAIT);
            break;
        case 2:
            if (fd >= 0)
                drain_client(fd);
            break;
        case 3:
            if (fd >= 0)
                close(fd);
            uv_run(&loop, UV_RUN_NOWAIT);
            fd = new_client();
            break;
        case 4:
            if (fd >= 0)
                shutdown(fd, SHUT_WR);
            break;
        case 5:
            answer_held();
            break;
        }
    }
    /* end of the input: the client goes, every request is answered, and
     * the server must be back to no connection */
    uv_run(&loop, UV_RUN_NOWAIT);
    if (fd >= 0)
        close(fd);
    for (int turn = 0; turn < 100 && (srv->nconns > 0 || nheld); turn++) {
        answer_held();
        uv_run(&loop, UV_RUN_NOWAIT);
    }
    if (srv->nconns != 0) {
        fprintf(stderr, "connections left open after the client went: %d\n", srv->nconns);
        abort();
    }
    return 0;
}
