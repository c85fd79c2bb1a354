/*
 * The thread -> loop mailbox: any thread posts a message, the loop receives
 * the messages in order on its own thread, where calling Lua is safe. A
 * mutex-protected list and a uv_async_t (libuv coalesces the wake-ups, so
 * one delivery may carry many messages). Used by the native API
 * (tamarco_log, tamarco_wake_ticket from any thread or FFI call) and by the
 * bindings that run an OS thread (thread, amqp).
 *
 * A message is any struct whose first member is a tamarco_mail.
 */
#ifndef TAMARCO_MAILBOX_H
#define TAMARCO_MAILBOX_H

#include <uv.h>

typedef struct tamarco_mail {
    struct tamarco_mail *next;
} tamarco_mail;

typedef struct tamarco_mailbox tamarco_mailbox;

/* Called on the loop thread with the messages taken so far (a list linked
 * by next, oldest first; NULL after a bare tamarco_mailbox_wake); it owns
 * them. */
typedef void (*tamarco_mailbox_fn)(tamarco_mailbox *box, tamarco_mail *list);

struct tamarco_mailbox {
    uv_async_t async;          /* async.data is free for the owner */
    uv_mutex_t lock;
    tamarco_mail *head, *tail;
    tamarco_mailbox_fn deliver;
    int closed;                /* posts are refused once the loop stops listening */
    int ready;                 /* initialised (a zeroed mailbox is not) */
};

/* On the loop thread. The mailbox does not keep the loop alive (unref'ed):
 * the owner refs it (uv_ref on &box->async) while it expects messages. */
int tamarco_mailbox_init(tamarco_mailbox *box, uv_loop_t *loop, tamarco_mailbox_fn deliver);
/* From any thread: appends the list first..last (linked by next) and wakes
 * the loop. Returns 0, or -EPIPE once closed (the caller keeps the list). */
int tamarco_mailbox_post_list(tamarco_mailbox *box, tamarco_mail *first, tamarco_mail *last);
static inline int tamarco_mailbox_post(tamarco_mailbox *box, tamarco_mail *m)
{
    m->next = NULL;
    return tamarco_mailbox_post_list(box, m, m);
}
/* From any thread: wakes the loop without a message (the owner's delivery
 * then looks at state it shares under its own lock); nothing once closed. */
void tamarco_mailbox_wake(tamarco_mailbox *box);
/* On the loop thread: takes every message posted so far (oldest first). */
tamarco_mail *tamarco_mailbox_take(tamarco_mailbox *box);
/* On the loop thread: refuses further posts; what was posted before can
 * still be taken. */
void tamarco_mailbox_shut(tamarco_mailbox *box);
/* On the loop thread: refuses further posts and closes the handle; on_close
 * (may be NULL) runs when libuv is done with it. Messages still queued are
 * handed back (the caller owns them). */
tamarco_mail *tamarco_mailbox_close(tamarco_mailbox *box, uv_close_cb on_close);
/* Once no thread can post any more (after close): releases the lock. Does
 * nothing on a zeroed mailbox that was never initialised. */
void tamarco_mailbox_destroy(tamarco_mailbox *box);

#endif
