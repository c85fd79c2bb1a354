/*
 * bench/peers/amqp_c_limit.c: the practical limit for bench/amqp.sh - the
 * same work as the tamarco and pika runs, written directly on librabbitmq in
 * one thread with no framework at all:
 *
 *   1. push: N persistent messages of SIZE bytes to a durable queue, with
 *      publisher confirms, at most WINDOW unconfirmed at any time (the same
 *      window as the tamarco run's concurrent pushers);
 *   2. pull: consume them with basic.qos prefetch PREFETCH and one
 *      basic.ack per message.
 *
 * Usage: amqp_c_limit HOST PORT QUEUE N SIZE WINDOW PREFETCH
 * Prints: "push <seconds> pull <seconds>".
 * Built by bench/amqp.sh: cc -O2 amqp_c_limit.c -lrabbitmq
 */
#include <amqp.h>
#include <amqp_tcp_socket.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void check(amqp_connection_state_t c, const char *what)
{
    amqp_rpc_reply_t r = amqp_get_rpc_reply(c);
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        fprintf(stderr, "%s failed (reply type %d)\n", what, r.reply_type);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: %s HOST PORT QUEUE N SIZE WINDOW PREFETCH\n", argv[0]);
        return 2;
    }
    const char *host = argv[1], *queue = argv[3];
    int port = atoi(argv[2]);
    long n = atol(argv[4]);
    size_t size = (size_t)atol(argv[5]);
    long window = atol(argv[6]);
    int prefetch = atoi(argv[7]);

    amqp_connection_state_t c = amqp_new_connection();
    amqp_socket_t *s = amqp_tcp_socket_new(c);
    if (amqp_socket_open(s, host, port) != AMQP_STATUS_OK) {
        fprintf(stderr, "cannot connect\n");
        return 1;
    }
    amqp_rpc_reply_t r = amqp_login(c, "/", 0, 131072, 30, AMQP_SASL_METHOD_PLAIN, "guest", "guest");
    if (r.reply_type != AMQP_RESPONSE_NORMAL) {
        fprintf(stderr, "login failed\n");
        return 1;
    }
    amqp_channel_open(c, 1);
    check(c, "channel.open");
    amqp_confirm_select(c, 1);
    check(c, "confirm.select");
    amqp_queue_declare(c, 1, amqp_cstring_bytes(queue), 0, 1, 0, 0, amqp_empty_table);
    check(c, "queue.declare");

    char *payload = malloc(size);
    memset(payload, 'x', size);
    amqp_bytes_t body = {size, payload};
    amqp_basic_properties_t props;
    props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_CONTENT_TYPE_FLAG;
    props.delivery_mode = 2;
    props.content_type = amqp_cstring_bytes("application/octet-stream");

    /* 1. push with confirms, WINDOW outstanding */
    double t0 = now();
    long sent = 0;
    uint64_t confirmed = 0;
    while ((long)confirmed < n) {
        while (sent < n && sent - (long)confirmed < window) {
            if (amqp_basic_publish(c, 1, amqp_empty_bytes, amqp_cstring_bytes(queue), 0, 0, &props, body) < 0) {
                fprintf(stderr, "publish failed\n");
                return 1;
            }
            sent++;
        }
        amqp_frame_t f;
        if (amqp_simple_wait_frame(c, &f) != AMQP_STATUS_OK) {
            fprintf(stderr, "wait frame failed\n");
            return 1;
        }
        if (f.frame_type == AMQP_FRAME_METHOD && f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
            amqp_basic_ack_t *a = f.payload.method.decoded;
            if (a->multiple)
                confirmed = a->delivery_tag;
            else if (a->delivery_tag > confirmed)
                confirmed++;   /* in order: single acks come one by one */
        } else if (f.frame_type == AMQP_FRAME_METHOD && f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
            fprintf(stderr, "nacked\n");
            return 1;
        }
        amqp_maybe_release_buffers(c);
    }
    double push_s = now() - t0;

    /* 2. consume and ack each message */
    amqp_basic_qos(c, 1, 0, (uint16_t)prefetch, 0);
    check(c, "basic.qos");
    amqp_basic_consume(c, 1, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
    check(c, "basic.consume");
    t0 = now();
    long got = 0;
    while (got < n) {
        amqp_envelope_t env;
        amqp_maybe_release_buffers(c);
        r = amqp_consume_message(c, &env, NULL, 0);
        if (r.reply_type != AMQP_RESPONSE_NORMAL) {
            fprintf(stderr, "consume failed\n");
            return 1;
        }
        if (amqp_basic_ack(c, 1, env.delivery_tag, 0) != 0) {
            fprintf(stderr, "ack failed\n");
            return 1;
        }
        amqp_destroy_envelope(&env);
        got++;
    }
    double pull_s = now() - t0;
    amqp_queue_delete(c, 1, amqp_cstring_bytes(queue), 0, 0);
    amqp_channel_close(c, 1, AMQP_REPLY_SUCCESS);
    amqp_connection_close(c, AMQP_REPLY_SUCCESS);
    amqp_destroy_connection(c);
    free(payload);
    printf("push %.3f pull %.3f\n", push_s, pull_s);
    return 0;
}
