"""The concurrency example written for Python asyncio: the peer of
services/examples/concurrency/service.lua in bench/startup_memory.py.
A task, a timer with interval 1 s and autostart, and a thread, with
logging to stdout as the host does."""
import asyncio
import logging
import signal
import sys
import threading
import uuid

logging.basicConfig(stream=sys.stdout, level=logging.DEBUG,
                    format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
log = logging.getLogger("concurrency_service")


async def heartbeat():
    while True:
        log.info("heartbeat task is alive")
        await asyncio.sleep(5)


async def tick(state):
    while True:
        state["ticks"] += 1
        log.info("tick ticks=%d", state["ticks"])
        await asyncio.sleep(1)


def summer(stop, loop, state):
    total, n = 0, 0
    while not stop.is_set():
        n += 1
        for i in range(1, 100001):
            total += i % 7
        loop.call_soon_threadsafe(state.__setitem__, "last_sum", (n, total))
        stop.wait(1)


async def main():
    state = {"ticks": 0}
    instance_id = str(uuid.uuid4())
    loop = asyncio.get_running_loop()
    stop_event = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_event.set)
    stop_thread = threading.Event()
    thread = threading.Thread(target=summer, args=(stop_thread, loop, state))
    tasks = [asyncio.create_task(heartbeat()), asyncio.create_task(tick(state))]
    thread.start()
    log.info("service started instance_id=%s", instance_id)
    await stop_event.wait()
    for t in tasks:
        t.cancel()
    stop_thread.set()
    thread.join(3)
    log.info("service stopped")


if __name__ == "__main__":
    asyncio.run(main())
