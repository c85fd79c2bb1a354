"""bench/peers/amqp_pika.py: the Python peer of bench/amqp.sh, with Debian's
python3-pika used the way its documentation shows (BlockingConnection):

  1. push: N persistent messages of SIZE bytes to a durable queue on a channel
     in confirm mode (confirm_delivery(): basic_publish returns once the broker
     has confirmed the message);
  2. pull: consume them with basic_qos(prefetch_count=PREFETCH) and one
     basic_ack per message.

Usage: amqp_pika.py HOST PORT QUEUE N SIZE PREFETCH
Prints: "push <seconds> pull <seconds>".
"""
import sys
import time

import pika


def main():
    host, port, queue, n, size, prefetch = sys.argv[1:7]
    port, n, size, prefetch = int(port), int(n), int(size), int(prefetch)
    params = pika.ConnectionParameters(host=host, port=port,
                                       credentials=pika.PlainCredentials("guest", "guest"))
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.queue_declare(queue=queue, durable=True)
    ch.confirm_delivery()
    body = b"x" * size
    props = pika.BasicProperties(delivery_mode=2, content_type="application/octet-stream")

    t0 = time.monotonic()
    for _ in range(n):
        ch.basic_publish(exchange="", routing_key=queue, body=body, properties=props)
    push_s = time.monotonic() - t0

    ch.basic_qos(prefetch_count=prefetch)
    got = 0
    t0 = time.monotonic()

    def on_message(channel, method, properties, payload):
        nonlocal got
        channel.basic_ack(delivery_tag=method.delivery_tag)
        got += 1
        if got >= n:
            channel.stop_consuming()

    ch.basic_consume(queue=queue, on_message_callback=on_message)
    ch.start_consuming()
    pull_s = time.monotonic() - t0
    ch.queue_delete(queue=queue)
    conn.close()
    print("push %.3f pull %.3f" % (push_s, pull_s))


if __name__ == "__main__":
    main()
