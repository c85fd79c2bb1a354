/* The growable byte buffer (see byte_buffer.h). */
#include "byte_buffer.h"

#include <stdint.h>
#include <stdlib.h>

void tamarco_buf_init(tamarco_buf *b)
{
    b->data = NULL;
    b->len = b->cap = 0;
    b->oom = 0;
}

void tamarco_buf_free(tamarco_buf *b)
{
    free(b->data);
    tamarco_buf_init(b);
}

int tamarco_buf_grow(tamarco_buf *b, size_t extra)
{
    if (b->oom)
        return 0;
    if (extra >= SIZE_MAX - b->len) {
        b->oom = 1;
        return 0;
    }
    if (b->len + extra + 1 <= b->cap)   /* +1: room for a terminating NUL */
        return 1;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) {
        if (cap > SIZE_MAX / 2) {
            b->oom = 1;
            return 0;
        }
        cap *= 2;
    }
    char *data = realloc(b->data, cap);
    if (!data) {
        b->oom = 1;
        return 0;
    }
    b->data = data;
    b->cap = cap;
    return 1;
}

const char *tamarco_buf_cstr(tamarco_buf *b)
{
    if (!tamarco_buf_grow(b, 0))
        return "";
    b->data[b->len] = '\0';
    return b->data;
}

char *tamarco_buf_take(tamarco_buf *b, size_t *len)
{
    char *data = b->oom ? NULL : b->data;
    if (len)
        *len = data ? b->len : 0;
    if (!data)
        free(b->data);
    tamarco_buf_init(b);
    return data;
}
