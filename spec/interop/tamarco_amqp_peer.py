#!/usr/bin/python3
"""A peer that speaks AMQP exactly as Python's tamarco-amqp does, for the
interoperability specs (spec/interop/amqp_interop_spec.lua).

tamarco-amqp runs on aioamqp; this peer uses Debian's python3-pika (blocking
API) and passes every argument aioamqp would fill in with its defaults
explicitly, so the broker sees the same declarations and properties. The
comment above each call names the tamarco-amqp source lines it mirrors
(System73/tamarco-amqp, tamarco_amqp/connection.py, output.py, input.py,
settings.py).

Usage:
    tamarco_amqp_peer.py HOST PORT PREFIX ROLE NAME [ARG]

ROLE   pull | subscribe | respond   consume ARG messages (default 1), then exit
       push | publish               send the JSON value ARG
       request                      send the JSON value ARG, print the reply

Output, one JSON object per line on stdout (flushed): {"ready": true} once
the declarations and consumers are set up, {"message": value,
"content_type": ...} per message consumed, {"reply": value} for a request,
{"done": true} at the end. Exit status 0, or 3 on a timeout (30 s).
"""
import json
import sys
import uuid

import pika

# settings.py: the queue name prefixes of the three patterns
PUSH_PULL = "push_pull."
PUBLISH_SUBSCRIBE = "publish_subscribe."
REQUEST_RESPONSE = "request_response."
# input.py / output.py: delivery modes
DELIVERY_PERSISTENT = 2
DELIVERY_NO_PERSISTENT = 1
TIMEOUT_SECONDS = 30


def say(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def full_name(prefix, pattern, name):
    # input.py set_queues_prefix + get_full_queue_name,
    # output.py set_queues_prefix and the routing keys of push/publish/request:
    # "<queues_prefix>." only when the prefix is not empty
    return (prefix + "." if prefix else "") + pattern + name


def encode(value):
    # tamarco's JsonCodec: json.dumps; aioamqp sends the str as UTF-8
    return json.dumps(value).encode("utf-8")


def properties(**kwargs):
    # connection.py AMQPConnection._publish: {"content_type": "text/plain"}
    # updated with the pattern's own properties
    return pika.BasicProperties(content_type="text/plain", **kwargs)


def main():
    host, port, prefix, role, name = sys.argv[1:6]
    arg = sys.argv[6] if len(sys.argv) > 6 else None
    # connection.py _connect_to_amqp_broker: aioamqp.connect(host, port,
    # login=guest, password=guest, virtualhost="/")
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        host=host, port=int(port), virtual_host="/",
        credentials=pika.PlainCredentials("guest", "guest")))
    # connection.py _connect_to_amqp_broker: self._protocol.channel()
    ch = conn.channel()
    timed_out = []

    def give_up():
        timed_out.append(True)
        ch.stop_consuming()

    conn.call_later(TIMEOUT_SECONDS, give_up)

    if role in ("pull", "subscribe", "respond"):
        wanted = int(arg or "1")
        got = [0]

        def consumed(channel, method, props, body):
            value = json.loads(body.decode("utf-8"))
            say({"message": value, "content_type": props.content_type})
            if role == "respond":
                # input.py AMQPRequestInput._send_response: publish to
                # reply_to with only the correlation_id (plus _publish's
                # text/plain)
                channel.basic_publish(exchange="", routing_key=props.reply_to,
                                      body=encode({"echo": value, "from": "python"}),
                                      properties=properties(correlation_id=props.correlation_id))
            got[0] += 1
            if got[0] >= wanted:
                channel.stop_consuming()

        if role == "pull":
            queue = full_name(prefix, PUSH_PULL, name)
            # connection.py _declare_push_pull: queue_declare(durable=True,
            # exclusive=False, auto_delete=False)
            ch.queue_declare(queue=queue, passive=False, durable=True, exclusive=False, auto_delete=False,
                             arguments=None)
        elif role == "subscribe":
            exchange = full_name(prefix, PUBLISH_SUBSCRIBE, name)
            # connection.py _declare_publish_subscribe: exchange_declare(
            # exchange_name, type_name="fanout") - aioamqp's defaults:
            # passive=False, durable=False, auto_delete=False, arguments=None
            ch.exchange_declare(exchange=exchange, exchange_type="fanout", passive=False, durable=False,
                                auto_delete=False, internal=False, arguments=None)
            # connection.py: queue_declare(exclusive=True) - server-named,
            # durable=False, auto_delete=False
            result = ch.queue_declare(queue="", passive=False, durable=False, exclusive=True,
                                      auto_delete=False, arguments=None)
            queue = result.method.queue
            # connection.py: queue_bind(exchange, queue, routing_key="")
            ch.queue_bind(queue=queue, exchange=exchange, routing_key="")
        else:
            queue = full_name(prefix, REQUEST_RESPONSE, name)
            # connection.py _declare_request_response: queue_declare(
            # queue_name) - durable=False, exclusive=False, auto_delete=False
            ch.queue_declare(queue=queue, passive=False, durable=False, exclusive=False, auto_delete=False,
                             arguments=None)
            # connection.py: basic_qos(prefetch_count=1, prefetch_size=0,
            # connection_global=False)
            ch.basic_qos(prefetch_size=0, prefetch_count=1, global_qos=False)
        # connection.py _declare_*: basic_consume(no_ack=True, consumer_tag=uuid4)
        ch.basic_consume(queue=queue, on_message_callback=consumed, auto_ack=True,
                         consumer_tag=str(uuid.uuid4()))
        say({"ready": True})
        ch.start_consuming()
    elif role == "push":
        say({"ready": True})
        # output.py push: exchange "", routing key the push/pull queue,
        # delivery_mode 2; push declares nothing
        ch.basic_publish(exchange="", routing_key=full_name(prefix, PUSH_PULL, name), body=encode(json.loads(arg)),
                         properties=properties(delivery_mode=DELIVERY_PERSISTENT))
    elif role == "publish":
        say({"ready": True})
        # output.py publish: the fanout exchange, routing key "",
        # delivery_mode 1; publish declares nothing
        ch.basic_publish(exchange=full_name(prefix, PUBLISH_SUBSCRIBE, name), routing_key="",
                         body=encode(json.loads(arg)), properties=properties(delivery_mode=DELIVERY_NO_PERSISTENT))
    elif role == "request":
        # output.py _initialize_response_queue: queue_declare(exclusive=True),
        # basic_consume(no_ack=True) on it
        result = ch.queue_declare(queue="", passive=False, durable=False, exclusive=True, auto_delete=False,
                                  arguments=None)
        callback_queue = result.method.queue
        request_id = str(uuid.uuid4())
        replies = []

        def on_response(channel, method, props, body):
            # output.py _on_response: matched by correlation_id
            if props.correlation_id == request_id:
                replies.append(json.loads(body.decode("utf-8")))
                channel.stop_consuming()

        ch.basic_consume(queue=callback_queue, on_message_callback=on_response, auto_ack=True)
        say({"ready": True})
        # output.py request: exchange "", the request/response queue,
        # reply_to the callback queue, correlation_id uuid4
        ch.basic_publish(exchange="", routing_key=full_name(prefix, REQUEST_RESPONSE, name),
                         body=encode(json.loads(arg)),
                         properties=properties(reply_to=callback_queue, correlation_id=request_id))
        ch.start_consuming()
        if replies:
            say({"reply": replies[0]})
    else:
        sys.stderr.write("unknown role " + role + "\n")
        return 2
    conn.close()
    if timed_out:
        say({"timeout": True})
        return 3
    say({"done": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
