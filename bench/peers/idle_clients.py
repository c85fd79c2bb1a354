"""Opens N keep-alive connections to 127.0.0.1:PORT, sends one GET on each
and reads its answer, prints "ready" and keeps them open (idle) until its
standard input closes. For bench/scale.sh.
   python3 idle_clients.py PORT N PATH"""
import resource
import selectors
import socket
import sys

port, n, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 100)), hard))
request = ("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path).encode()
conns, batch = [], 200
while len(conns) < n:
    # a batch at a time: the listen backlog must not overflow
    fresh = []
    for _ in range(min(batch, n - len(conns))):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(request)
        fresh.append(s)
    sel = selectors.DefaultSelector()
    for s in fresh:
        sel.register(s, selectors.EVENT_READ)
    left = set(fresh)
    while left:
        for key, _ in sel.select(timeout=10):
            data = key.fileobj.recv(65536)
            if not data or b"\r\n\r\n" in data:
                sel.unregister(key.fileobj)
                left.discard(key.fileobj)
                if not data:
                    sys.exit("a connection was closed by the server")
    sel.close()
    conns.extend(fresh)
print("ready", flush=True)
sys.stdin.read()
