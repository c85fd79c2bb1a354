/*
 * The two halves of tamarco.c.amqp and what passes between them: commands
 * (loop -> I/O thread), events (I/O thread -> loop) and the connection
 * record, whose fields say which side may touch them. bindings/amqp_io.c
 * is the I/O thread (librabbitmq, no Lua); bindings/amqp.c the loop side
 * and the Lua API. docs/internals/amqp.md has the design.
 */
#ifndef TAMARCO_AMQP_LINK_H
#define TAMARCO_AMQP_LINK_H

#include "host.h"
#include "mailbox.h"

#include <amqp.h>
#include <stdint.h>

#define CONN_MT "tamarco.amqp.connection"
#define CH_MAIN 1
#define CH_ADMIN 2
#define MAX_ARGS 32
#define FRAME_MAX 131072
#define READ_BATCH 512

enum { ST_CONNECTING = 1, ST_CONNECTED, ST_FAILED, ST_CLOSED };

enum {
    C_PUBLISH = 1, C_ACK, C_NACK, C_DECLARE_QUEUE, C_DECLARE_EXCHANGE, C_BIND,
    C_DELETE_QUEUE, C_PURGE, C_CONSUME, C_CANCEL, C_CLOSE,
};

enum { F_DURABLE = 1, F_EXCLUSIVE = 2, F_AUTO_DELETE = 4, F_PASSIVE = 8, F_NO_ACK = 16,
       F_REQUEUE = 32, F_PERSISTENT = 64 };

enum { E_STATE = 1, E_DONE, E_DELIVERY, E_CANCELLED, E_CLOSED };

/* ---------------------------------------------------------------------
 * Commands (loop -> thread) and events (thread -> loop): one allocation
 * each, strings copied after the struct.
 * ------------------------------------------------------------------- */

typedef struct cmd {
    struct cmd *next;
    int kind;
    int wait_id;            /* 0: nobody waits */
    uint32_t epoch;
    int flags;
    int prefetch;
    uint64_t tag;
    amqp_bytes_t s1, s2, s3, body;
    amqp_basic_properties_t props;
    amqp_table_t args;      /* queue arguments or headers */
    amqp_table_entry_t entries[];   /* args.entries points here */
} cmd;

/* Property strings of a delivery, in the order of PROP_NAMES. */
#define NPROPS 9
static const char *const PROP_NAMES[NPROPS] = {
    "content_type", "content_encoding", "correlation_id", "reply_to", "expiration",
    "message_id", "type", "user_id", "app_id",
};
static const amqp_flags_t PROP_FLAGS[NPROPS] = {
    AMQP_BASIC_CONTENT_TYPE_FLAG, AMQP_BASIC_CONTENT_ENCODING_FLAG, AMQP_BASIC_CORRELATION_ID_FLAG,
    AMQP_BASIC_REPLY_TO_FLAG, AMQP_BASIC_EXPIRATION_FLAG, AMQP_BASIC_MESSAGE_ID_FLAG,
    AMQP_BASIC_TYPE_FLAG, AMQP_BASIC_USER_ID_FLAG, AMQP_BASIC_APP_ID_FLAG,
};

static inline amqp_bytes_t *prop_slot(amqp_basic_properties_t *p, int i)
{
    switch (i) {
    case 0: return &p->content_type;
    case 1: return &p->content_encoding;
    case 2: return &p->correlation_id;
    case 3: return &p->reply_to;
    case 4: return &p->expiration;
    case 5: return &p->message_id;
    case 6: return &p->type;
    case 7: return &p->user_id;
    default: return &p->app_id;
    }
}

typedef struct event {
    tamarco_mail link;           /* first: the events' way to the loop */
    int kind;
    int wait_id;
    int ok;
    int state;
    uint32_t epoch;
    double n1, n2;               /* E_DONE: numbers (message/consumer counts) */
    uint64_t delivery_tag;
    int redelivered;
    int has_delivery_mode, delivery_mode, has_priority, priority, has_timestamp;
    uint64_t timestamp;
    amqp_bytes_t text;           /* error, result string, consumer tag of a cancel */
    amqp_bytes_t consumer_tag, exchange, routing_key, body;
    amqp_bytes_t props[NPROPS];  /* len 0 and bytes NULL when absent */
    amqp_bytes_t headers;        /* flat encoded headers, see encode_headers */
    size_t used, size;           /* of data */
    char data[];
} event;


/* ---------------------------------------------------------------------
 * The connection record
 * ------------------------------------------------------------------- */

typedef struct pending_delivery {
    int active, discard;
    uint64_t delivery_tag;
    int redelivered;
    size_t body_size, got;
    char ctag[256], exchange[256], rkey[256];
    size_t ctag_n, exchange_n, rkey_n;
    event *ev;
} pending_delivery;

typedef struct aconn {
    /* shared: under mu */
    uv_mutex_t mu;
    cmd *cmd_head, *cmd_tail;
    int signaled;
    tamarco_mailbox events;         /* I/O thread -> loop (locked on its own) */
    int stop;
    int efd;

    /* immutable after connect() */
    char **hostnames;               /* the cluster's nodes, tried in turn */
    int *ports, nhosts;
    char *vhost, *user, *password, *name;
    int heartbeat, timeout_ms, backoff_ms, backoff_max_ms;
    int confirm_timeout_ms;         /* 0: wait for confirms as long as the connection lives */
    int login_fd;                   /* under mu: the socket while logging in, else -1 */

    /* I/O thread only */
    amqp_connection_state_t conn;
    int cur;                        /* index of the node tried or connected to */
    uint32_t epoch;
    event *out_head, *out_tail;     /* events not yet handed to the loop */
    pending_delivery pd;
    int *pw;                        /* publish window: wait id per seq, -1 done */
    size_t pw_cap, pw_head, pw_count;
    uint64_t pw_base;               /* seq of pw[pw_head] */
    uint64_t pub_seq;               /* last seq assigned */
    uint64_t pw_progress_ns;        /* when the oldest unconfirmed publish became the oldest */
    uint64_t nack_since_ns;         /* first basic.nack since the last basic.ack, 0: none */
    unsigned char *aw;              /* ack window: state per delivery tag */
    size_t aw_cap, aw_head, aw_count;
    uint64_t aw_base;               /* tag of aw[aw_head] */
    int acks_pending;
    char **noack_tags;
    int noack_n, noack_cap;
    char lost[640];                 /* why the connection was lost */

    /* loop thread only */
    tamarco_host *host;
    uv_thread_t tid;
    int thread_running;
    int state;
    int loop_cur;                   /* the node of the last state event */
    uint32_t loop_epoch;
    char last_error[512];
    int pending_waits;
    int async_refd;
    int in_async, signal_pending;   /* commands submitted while handling events */
    int closing;
    int close_waits[8];
    int close_nwaits;
    int ud_ref, on_state_ref, on_delivery_ref;
    struct conn_ud *ud;
    double st_published, st_confirmed, st_delivered, st_acked, st_nacked, st_stale, st_reconnects;
} aconn;

typedef struct conn_ud {
    aconn *c;
} conn_ud;

/* I/O thread side (amqp_io.c), called from the loop side; internal to the
 * module (only luaopen_tamarco_c_amqp leaves amqp.so): */
#define AMQP_INTERNAL __attribute__((visibility("hidden")))

/* The thread's body: connects, runs commands, reads frames until c->stop. */
AMQP_INTERNAL void amqp_io_main(void *arg);
/* Frees a list of events the loop took from the mailbox without handling. */
AMQP_INTERNAL void amqp_free_events(tamarco_mail *list);
/* Forgets the consumer tags of no-ack consumers (the thread has ended). */
AMQP_INTERNAL void amqp_noack_clear(aconn *c);
/* Shuts the socket of a login in progress, so that close need not wait for it. */
AMQP_INTERNAL void amqp_interrupt_login(aconn *c);

#endif
