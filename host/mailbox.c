/* The thread -> loop mailbox (see mailbox.h). */
#include "mailbox.h"

#include <errno.h>

static void on_async(uv_async_t *async)
{
    tamarco_mailbox *box = (tamarco_mailbox *)((char *)async - offsetof(tamarco_mailbox, async));
    /* called for a bare wake-up too (list NULL): see tamarco_mailbox_wake */
    box->deliver(box, tamarco_mailbox_take(box));
}

int tamarco_mailbox_init(tamarco_mailbox *box, uv_loop_t *loop, tamarco_mailbox_fn deliver)
{
    box->head = box->tail = NULL;
    box->deliver = deliver;
    box->closed = 0;
    int rc = uv_mutex_init(&box->lock);
    if (rc != 0)
        return rc;
    rc = uv_async_init(loop, &box->async, on_async);
    if (rc != 0) {
        uv_mutex_destroy(&box->lock);
        return rc;
    }
    uv_unref((uv_handle_t *)&box->async);
    box->ready = 1;
    return 0;
}

int tamarco_mailbox_post_list(tamarco_mailbox *box, tamarco_mail *first, tamarco_mail *last)
{
    last->next = NULL;
    uv_mutex_lock(&box->lock);
    if (box->closed) {
        uv_mutex_unlock(&box->lock);
        return -EPIPE;
    }
    if (box->tail)
        box->tail->next = first;
    else
        box->head = first;
    box->tail = last;
    /* under the lock: the loop closes the handle only after setting closed */
    uv_async_send(&box->async);
    uv_mutex_unlock(&box->lock);
    return 0;
}

void tamarco_mailbox_wake(tamarco_mailbox *box)
{
    uv_mutex_lock(&box->lock);
    if (!box->closed)
        uv_async_send(&box->async);
    uv_mutex_unlock(&box->lock);
}

void tamarco_mailbox_shut(tamarco_mailbox *box)
{
    uv_mutex_lock(&box->lock);
    box->closed = 1;
    uv_mutex_unlock(&box->lock);
}

tamarco_mail *tamarco_mailbox_take(tamarco_mailbox *box)
{
    uv_mutex_lock(&box->lock);
    tamarco_mail *list = box->head;
    box->head = box->tail = NULL;
    uv_mutex_unlock(&box->lock);
    return list;
}

tamarco_mail *tamarco_mailbox_close(tamarco_mailbox *box, uv_close_cb on_close)
{
    uv_mutex_lock(&box->lock);
    box->closed = 1;
    tamarco_mail *list = box->head;
    box->head = box->tail = NULL;
    uv_mutex_unlock(&box->lock);
    uv_close((uv_handle_t *)&box->async, on_close);
    return list;
}

void tamarco_mailbox_destroy(tamarco_mailbox *box)
{
    if (!box->ready)
        return;
    box->ready = 0;
    uv_mutex_destroy(&box->lock);
}
