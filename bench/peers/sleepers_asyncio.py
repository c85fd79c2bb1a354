"""N asyncio tasks each sleeping an hour; prints the RSS (KiB) once they all
sleep. For bench/scale.sh:  python3 sleepers_asyncio.py N"""
import asyncio
import gc
import re
import sys


async def main(n):
    tasks = [asyncio.create_task(asyncio.sleep(3600)) for _ in range(n)]
    await asyncio.sleep(0.3)
    gc.collect()
    with open("/proc/self/status") as f:
        print("RSS", re.search(r"VmRSS:\s+(\d+)", f.read()).group(1), flush=True)
    await asyncio.sleep(3600)
    del tasks


asyncio.run(main(int(sys.argv[1])))
