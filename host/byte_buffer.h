/*
 * A growable byte buffer, the one every binding appends to (log records,
 * JSON, Prometheus text, thread messages, HTTP headers and bodies).
 *
 * Running out of memory is sticky instead of raising: appends after a
 * failed allocation are dropped and `oom` stays set, so an encoder can run
 * to the end without a check per byte and the caller looks once. Nothing
 * here calls Lua, so it is safe on any thread and inside FFI calls.
 */
#ifndef TAMARCO_BYTE_BUFFER_H
#define TAMARCO_BYTE_BUFFER_H

#include <stddef.h>
#include <string.h>

typedef struct tamarco_buf {
    char *data;     /* not NUL-terminated unless tamarco_buf_cstr is used */
    size_t len;
    size_t cap;
    int oom;        /* set when an allocation failed; further adds are dropped */
} tamarco_buf;

void tamarco_buf_init(tamarco_buf *b);
void tamarco_buf_free(tamarco_buf *b);
/* Makes room for `extra` more bytes (and a NUL). 0 when out of memory. */
int tamarco_buf_grow(tamarco_buf *b, size_t extra);
/* NUL-terminates and returns data ("" when empty or out of memory). */
const char *tamarco_buf_cstr(tamarco_buf *b);
/* Hands the bytes (malloc'ed, or NULL when empty) to the caller and leaves
 * the buffer empty; NULL as well when out of memory (the bytes are freed). */
char *tamarco_buf_take(tamarco_buf *b, size_t *len);

/* Cuts the buffer back to its first len bytes (a length read earlier) and
 * clears oom: whatever an allocation failure dropped came after them. */
static inline void tamarco_buf_truncate(tamarco_buf *b, size_t len)
{
    if (len < b->len)
        b->len = len;
    b->oom = 0;
}

/* Appends are inline: encoders call them once or more per byte run. */
static inline int tamarco_buf_reserve(tamarco_buf *b, size_t extra)
{
    return (!b->oom && b->len + extra < b->cap) || tamarco_buf_grow(b, extra);
}

static inline void tamarco_buf_add(tamarco_buf *b, const void *s, size_t len)
{
    if (len == 0 || !tamarco_buf_reserve(b, len))
        return;
    memcpy(b->data + b->len, s, len);
    b->len += len;
}

static inline void tamarco_buf_addc(tamarco_buf *b, char c)
{
    if (tamarco_buf_reserve(b, 1))
        b->data[b->len++] = c;
}

static inline void tamarco_buf_adds(tamarco_buf *b, const char *s)
{
    tamarco_buf_add(b, s, strlen(s));
}

#endif
