"""Python's standard logging doing what bench/logging_bench.lua does: N JSON
records with extra fields to a file, then N as JSON datagrams over UDP."""
import json
import logging
import os
import socket
import sys
import time

N = int(os.environ.get("RECORDS", "200000"))
FILE = os.environ.get("LOG_FILE", "/tmp/python-bench.log")
UDP_PORT = int(os.environ.get("UDP_PORT", "5959"))


class JsonFormatter(logging.Formatter):
    def format(self, record):
        return json.dumps({
            "@timestamp": self.formatTime(record), "level": record.levelname,
            "logger": record.name, "message": record.getMessage(),
            "user": record.user, "n": record.n, "path": record.path,
        })


class UdpJsonHandler(logging.Handler):
    def __init__(self, port):
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addr = ("127.0.0.1", port)

    def emit(self, record):
        self.sock.sendto(self.format(record).encode(), self.addr)


def run(handler):
    log = logging.getLogger("bench")
    log.handlers = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    handler.setFormatter(JsonFormatter())
    t0 = time.perf_counter()
    for i in range(1, N + 1):
        log.info("request handled", extra={"user": "alice", "n": i, "path": "/hello"})
    handler.flush()
    return N / (time.perf_counter() - t0)


if os.path.exists(FILE):
    os.remove(FILE)
file_rate = run(logging.FileHandler(FILE))
udp_rate = run(UdpJsonHandler(UDP_PORT))
sys.stderr.write(f"python file {file_rate:.0f} records/s\npython udp {udp_rate:.0f} records/s\n")
