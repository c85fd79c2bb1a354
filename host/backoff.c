/* The shared reconnect back-off (see backoff.h). */
#include "backoff.h"

#include <stdint.h>
#include <stdlib.h>
#include <time.h>

void tamarco_backoff_init(tamarco_backoff *b, double min_ms, double max_ms, double factor, double jitter)
{
    /* 0 is a policy too: retry at once, every time (a client's setting may say so) */
    b->min_ms = min_ms >= 0 ? min_ms : TAMARCO_BACKOFF_MIN_MS;
    b->max_ms = max_ms >= b->min_ms ? max_ms : b->min_ms;
    b->factor = factor >= 1 ? factor : 1;
    b->jitter = jitter < 0 ? 0 : jitter > 1 ? 1 : jitter;
    b->seed = (unsigned)time(NULL) ^ (unsigned)(uintptr_t)b;
    tamarco_backoff_reset(b);
}

void tamarco_backoff_reset(tamarco_backoff *b)
{
    b->next_ms = b->min_ms;
}

double tamarco_backoff_next(tamarco_backoff *b)
{
    double delay = b->next_ms;
    double grown = b->next_ms * b->factor;
    b->next_ms = grown > b->max_ms ? b->max_ms : grown;
    if (b->jitter > 0) {
        double r = (double)rand_r(&b->seed) / ((double)RAND_MAX + 1.0);
        delay -= delay * b->jitter * r;
    }
    return delay;
}
