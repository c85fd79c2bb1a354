/* C unit test of the internal runtime (host/): the byte buffer, the
 * thread -> loop mailbox (posts from another OS thread arrive in order on
 * the loop), the back-off policy and the option readers. */
#include "backoff.h"
#include "check.h"
#include "byte_buffer.h"
#include "lua_options.h"
#include "mailbox.h"

#include <lauxlib.h>
#include <lualib.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


static void test_byte_buffer(void)
{
    tamarco_buf b;
    tamarco_buf_init(&b);
    CHECK(strcmp(tamarco_buf_cstr(&b), "") == 0);
    for (int i = 0; i < 1000; i++)
        tamarco_buf_adds(&b, "abc");
    tamarco_buf_addc(&b, '!');
    CHECK(b.len == 3001 && !b.oom);
    CHECK(b.data[2999] == 'c' && b.data[3000] == '!');
    size_t len;
    char *data = tamarco_buf_take(&b, &len);
    CHECK(data && len == 3001 && b.data == NULL && b.len == 0);
    free(data);
    /* a size that cannot be allocated sets oom and drops every later add */
    tamarco_buf_add(&b, "x", 1);
    CHECK(!tamarco_buf_grow(&b, (size_t)-1 / 2 + 1) && b.oom);
    tamarco_buf_add(&b, "y", 1);
    CHECK(b.len == 1);
    CHECK(tamarco_buf_take(&b, &len) == NULL && len == 0);
    /* truncating back to a mark taken before a failed add clears oom */
    tamarco_buf_adds(&b, "keep");
    size_t mark = b.len;
    tamarco_buf_add(&b, "x", (size_t)-1 / 2 + 1);
    CHECK(b.oom && b.len == mark);
    tamarco_buf_truncate(&b, mark);
    tamarco_buf_adds(&b, "!");
    CHECK(!b.oom && b.len == 5 && memcmp(b.data, "keep!", 5) == 0);
    tamarco_buf_truncate(&b, 2);
    CHECK(b.len == 2 && b.cap >= 5);
    tamarco_buf_truncate(&b, 10);   /* never grows it */
    CHECK(b.len == 2);
    tamarco_buf_free(&b);
}

static void test_backoff(void)
{
    tamarco_backoff b;
    tamarco_backoff_init(&b, 100, 450, 2, 0);
    double want[] = {100, 200, 400, 450, 450};
    for (int i = 0; i < 5; i++)
        CHECK(tamarco_backoff_next(&b) == want[i]);
    tamarco_backoff_reset(&b);
    CHECK(tamarco_backoff_peek(&b) == 100 && tamarco_backoff_next(&b) == 100);
    /* out-of-range parameters are clamped into a usable policy */
    tamarco_backoff_init(&b, 50, 10, 0.5, 3);
    CHECK(b.max_ms == 50 && b.factor == 1 && b.jitter == 1);
    tamarco_backoff_init(&b, 1000, 1000, 2, 0.25);
    for (int i = 0; i < 100; i++) {
        double d = tamarco_backoff_next(&b);
        CHECK(d > 750 && d <= 1000);
    }
}

/* ---- mailbox: N posts from another thread, delivered in order ---- */

#define N_MAILS 10000

typedef struct test_mail {
    tamarco_mail link;
    int n;
} test_mail;

static int received, in_order = 1, woken;

static void deliver(tamarco_mailbox *box, tamarco_mail *list)
{
    if (!list)
        woken++;
    while (list) {
        test_mail *m = (test_mail *)list;
        list = list->next;
        if (m->n != received)
            in_order = 0;
        received++;
        free(m);
    }
    if (received == N_MAILS)
        uv_unref((uv_handle_t *)&box->async);
}

static void poster(void *arg)
{
    tamarco_mailbox *box = arg;
    for (int i = 0; i < N_MAILS; i++) {
        test_mail *m = malloc(sizeof *m);
        m->n = i;
        if (tamarco_mailbox_post(box, &m->link) != 0)
            free(m);
    }
}

static void test_mailbox(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    tamarco_mailbox box;
    CHECK(tamarco_mailbox_init(&box, &loop, deliver) == 0);
    uv_ref((uv_handle_t *)&box.async);   /* expecting mail */
    uv_thread_t tid;
    uv_thread_create(&tid, poster, &box);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_thread_join(&tid);
    CHECK(received == N_MAILS);
    CHECK(in_order);

    /* a bare wake-up reaches the owner without a message (the poster's
     * wake-ups may already have given empty deliveries: uv_async coalesces,
     * so one can come after an earlier delivery took everything) */
    int woken_before = woken;
    uv_ref((uv_handle_t *)&box.async);
    tamarco_mailbox_wake(&box);
    uv_run(&loop, UV_RUN_ONCE);
    CHECK(woken > woken_before);

    /* once shut, posts are refused and the caller keeps the message */
    tamarco_mailbox_shut(&box);
    test_mail refused = {{NULL}, -1};
    CHECK(tamarco_mailbox_post(&box, &refused.link) != 0);
    CHECK(tamarco_mailbox_close(&box, NULL) == NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    tamarco_mailbox_destroy(&box);
    CHECK(uv_loop_close(&loop) == 0);
}

/* ---- option readers ---- */

static int read_options(lua_State *L)
{
    lua_pushinteger(L, tamarco_opt_ms(L, 1, "test", "timeout_ms", 7));
    lua_pushnumber(L, tamarco_opt_seconds(L, 1, "test", "interval", 1.5));
    lua_pushinteger(L, tamarco_opt_bytes(L, 1, "test", "max_bytes", 64));
    lua_pushinteger(L, tamarco_opt_int(L, 1, "test", "port", 80, 1, 65535));
    lua_pushboolean(L, tamarco_opt_bool(L, 1, "verify", 1));
    lua_pushstring(L, tamarco_opt_string(L, 1, "test", "name", "none"));
    return 6;
}

static void check_options(lua_State *L, const char *opts, const char *want)
{
    lua_settop(L, 0);
    char chunk[512];
    snprintf(chunk, sizeof chunk,
             "local read = ...; local r = { pcall(read, %s) }; "
             "if not r[1] then return r[2] end; "
             "return table.concat({ tostring(r[2]), tostring(r[3]), tostring(r[4]), tostring(r[5]), "
             "tostring(r[6]), tostring(r[7]) }, ' ')", opts);
    if (luaL_loadstring(L, chunk) != 0) {
        fprintf(stderr, "FAIL bad chunk: %s\n", lua_tostring(L, -1));
        failures++;
        return;
    }
    lua_pushcfunction(L, read_options);
    lua_call(L, 1, 1);
    const char *got = lua_tostring(L, -1);
    if (!got || strcmp(got, want) != 0) {
        fprintf(stderr, "FAIL options %s\n  got:  %s\n  want: %s\n", opts, got ? got : "(nil)", want);
        failures++;
    }
}

static void test_options(void)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    check_options(L, "{}", "7 1.5 64 80 true none");
    check_options(L, "{timeout_ms = 250.9, interval = 0.25, max_bytes = 1024, port = 8080, verify = false, name = 'x'}",
                  "250 0.25 1024 8080 false x");
    check_options(L, "{timeout_ms = -1}", "test: 'timeout_ms' must be a number >= 0 (milliseconds)");
    check_options(L, "{interval = 'soon'}", "test: 'interval' must be a number >= 0 (seconds)");
    check_options(L, "{max_bytes = -5}", "test: 'max_bytes' must be a number >= 0 (bytes)");
    check_options(L, "{port = 70000}", "test: 'port' must be a number in 1..65535");
    check_options(L, "{name = 12}", "test: 'name' must be a string");
    lua_close(L);
}

int main(void)
{
    test_byte_buffer();
    test_backoff();
    test_mailbox();
    test_options();
    return check_report("test_runtime");
}
