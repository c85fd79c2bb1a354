/* C unit test of the AMQP binding's I/O half (bindings/amqp_io.c, no Lua,
 * no broker needed): the publish window that turns the broker's confirms
 * (single, multiple, nacks, out of order) into one completion per waiting
 * publish, and the ack window that keeps delivery tags in order. The file
 * is included so that its internal functions can be called. */
#include "../../bindings/amqp_io.c"
#include "check.h"


/* The completions posted so far, in order, as "+id" (ok) or "-id"; the
 * events are freed. */
static void take_done(aconn *c, char *out, size_t size)
{
    size_t n = 0;
    out[0] = '\0';
    event *e = c->out_head;
    while (e) {
        event *next = (event *)e->link.next;
        if (e->kind == E_DONE && n < size) {
            int w = snprintf(out + n, size - n, "%s%c%d", n ? " " : "", e->ok ? '+' : '-', e->wait_id);
            n = w > 0 && (size_t)w < size - n ? n + (size_t)w : size;   /* a long list is cut */
        }
        free(e);
        e = next;
    }
    c->out_head = c->out_tail = NULL;
}

static void publish(aconn *c, int wait_id)
{
    c->pub_seq++;
    CHECK(pw_push(c, wait_id) == 0);
}

static void test_publish_window(void)
{
    aconn c;
    memset(&c, 0, sizeof c);
    char done[4096];
    for (int id = 1; id <= 5; id++)
        publish(&c, id);
    pw_confirm(&c, 2, 1, 1);                /* multiple ack up to seq 2 */
    take_done(&c, done, sizeof done);
    CHECK(strcmp(done, "+1 +2") == 0);
    CHECK(c.pw_count == 3 && c.pw_base == 3);
    pw_confirm(&c, 4, 0, 0);                /* a single nack out of order */
    take_done(&c, done, sizeof done);
    CHECK(strcmp(done, "-4") == 0);
    CHECK(c.pw_count == 3);                 /* seq 3 still waits: the window keeps its place */
    pw_confirm(&c, 4, 0, 1);                /* a repeated confirm settles nothing twice */
    take_done(&c, done, sizeof done);
    CHECK(strcmp(done, "") == 0);
    pw_confirm(&c, 99, 1, 1);               /* multiple beyond what was sent: all that is left */
    take_done(&c, done, sizeof done);
    CHECK(strcmp(done, "+3 +5") == 0);
    CHECK(c.pw_count == 0);
    pw_confirm(&c, 1, 0, 1);                /* a stale confirm with nothing in flight */
    take_done(&c, done, sizeof done);
    CHECK(strcmp(done, "") == 0);

    /* a publish nobody waits for (wait id 0) is settled without a completion */
    publish(&c, 0);
    publish(&c, 7);
    pw_confirm(&c, c.pub_seq, 1, 1);
    take_done(&c, done, sizeof done);
    CHECK(strcmp(done, "+7") == 0);

    /* past the first capacity, with the ring wrapped: order is kept */
    for (int i = 0; i < 600; i++) {
        publish(&c, 1000 + i);
    }
    pw_confirm(&c, c.pub_seq - 100, 1, 1);  /* 500 settled: head moves into the ring */
    take_done(&c, done, sizeof done);
    for (int i = 0; i < 1500; i++)
        publish(&c, 2000 + i);               /* grows while wrapped */
    CHECK(c.pw_count == 1600 && c.pw_cap >= 1600);
    pw_fail_all(&c, "connection lost");
    event *e = c.out_head;
    int n = 0, in_order = 1, expected = 1500;
    while (e) {
        if (e->kind == E_DONE && !e->ok) {
            int want = expected < 1600 ? expected : 2000 + (expected - 1600);
            if (e->wait_id != want)
                in_order = 0;
            expected++;
            n++;
        }
        e = (event *)e->link.next;
    }
    CHECK(n == 1600 && in_order);
    take_done(&c, done, sizeof done);
    CHECK(c.pw_count == 0);
    free(c.pw);
}

static void test_ack_window(void)
{
    aconn c;
    memset(&c, 0, sizeof c);
    CHECK(aw_add(&c, 1, A_UNSETTLED) == 0);
    CHECK(aw_add(&c, 2, A_UNSETTLED) == 0);
    CHECK(aw_add(&c, 5, A_UNSETTLED) == 0);   /* 3 and 4 are gaps: settled */
    CHECK(c.aw_count == 5 && *aw_at(&c, 3) == A_SETTLED && *aw_at(&c, 5) == A_UNSETTLED);
    CHECK(aw_add(&c, 2, A_PENDING) == 0 && *aw_at(&c, 2) == A_UNSETTLED);   /* not new: unchanged */
    *aw_at(&c, 1) = A_SETTLED;
    aw_trim(&c);
    CHECK(c.aw_base == 2 && c.aw_count == 4);
    CHECK(aw_at(&c, 1) == NULL && aw_at(&c, 6) == NULL);
    for (uint64_t t = 6; t < 3000; t++)
        CHECK(aw_add(&c, t, A_UNSETTLED) == 0);
    CHECK(c.aw_count == 2998 && *aw_at(&c, 2999) == A_UNSETTLED && *aw_at(&c, 2) == A_UNSETTLED);
    free(c.aw);
}

int main(void)
{
    test_publish_window();
    test_ack_window();
    return check_report("test_amqp_io");
}
