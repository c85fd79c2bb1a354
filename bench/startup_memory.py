#!/usr/bin/python3
"""Start-up time and idle resident memory of the concurrency example in
tamarco-host versus the same service in Python asyncio, in one run.

Start-up: time from exec to the "service started" log line (median of N
runs). Memory: VmRSS of the idle process 2 s after start (median).
Prints both and the ratios ours/theirs (lower is better for both).

    bench/startup_memory.py [--runs N] [--host build/tamarco-host]
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(command, env):
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT, text=True, bufsize=1)
    startup = None
    for line in proc.stdout:
        if "service started" in line:
            startup = time.perf_counter() - start
            break
    if startup is None:
        proc.wait()
        sys.exit(f"{command[0]} never printed 'service started' (exit {proc.returncode})")
    time.sleep(2.0)
    rss = rss_kib(proc.pid)
    proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    proc.wait(timeout=10)
    return startup, rss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--host", default=os.path.join(ROOT, "build", "tamarco-host"))
    args = parser.parse_args()
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    subjects = {
        "tamarco-host": [args.host, "run", "services/examples/concurrency/service.lua"],
        "python-asyncio": ["/usr/bin/python3", "bench/peers/concurrency_asyncio.py"],
    }
    results = {}
    for name, command in subjects.items():
        runs = [measure(command, env) for _ in range(args.runs)]
        results[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"{name:16s} start-up {results[name][0] * 1000:8.1f} ms   idle RSS {results[name][1] / 1024:7.1f} MiB"
              f"   ({args.runs} runs, medians)")
    ours, theirs = results["tamarco-host"], results["python-asyncio"]
    print(f"ratio start-up ours/theirs: {ours[0] / theirs[0]:.3f} (target <= 0.1)")
    print(f"ratio idle RSS ours/theirs: {ours[1] / theirs[1]:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
