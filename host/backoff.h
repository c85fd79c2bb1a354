/*
 * The reconnect back-off every client shares (AMQP's I/O thread in C; etcd,
 * Redis, log sinks, metrics reporters in Lua through tamarco.c.backoff):
 * the first delay is `min`, each failure multiplies it by `factor` up to
 * `max`, and `jitter` (0..1) takes up to that fraction off each delay so
 * that many instances losing the same peer do not come back in step.
 * A success resets it. Durations are in milliseconds.
 */
#ifndef TAMARCO_BACKOFF_H
#define TAMARCO_BACKOFF_H

typedef struct tamarco_backoff {
    double min_ms, max_ms, factor, jitter;
    double next_ms;      /* the delay before the next attempt, without jitter */
    unsigned seed;       /* for the jitter: per policy, no global state */
} tamarco_backoff;

/* The framework's defaults, the numbers C and Lua share. */
#define TAMARCO_BACKOFF_MIN_MS 200.0
#define TAMARCO_BACKOFF_MAX_MS 5000.0
#define TAMARCO_BACKOFF_FACTOR 2.0
#define TAMARCO_BACKOFF_JITTER 0.0

/* Clamps its arguments into a usable policy (max >= min >= 0, factor >= 1,
 * 0 <= jitter <= 1); a negative min takes the default. */
void tamarco_backoff_init(tamarco_backoff *b, double min_ms, double max_ms, double factor, double jitter);
/* The delay to wait now, and the policy moves on to the next one. */
double tamarco_backoff_next(tamarco_backoff *b);
/* The delay tamarco_backoff_next would start from, without moving on. */
static inline double tamarco_backoff_peek(const tamarco_backoff *b)
{
    return b->next_ms;
}
/* After a success: the next delay is min again. */
void tamarco_backoff_reset(tamarco_backoff *b);

#endif
