# GET /user/{id} -> Redis GET user:<id> -> JSON, with aiohttp and redis.asyncio
# (Debian's python3-aiohttp and python3-redis; one connection pool).
# Usage: python3 e2e_aiohttp.py HTTP_PORT REDIS_PORT
import sys

import redis.asyncio as aioredis
from aiohttp import web


async def user(request):
    uid = request.match_info["id"]
    name = await request.app["redis"].get("user:" + uid)
    if name is None:
        return web.json_response({"error": "not found"}, status=404)
    return web.json_response({"id": uid, "name": name.decode()})


async def make_app():
    app = web.Application()
    app["redis"] = aioredis.Redis(host="127.0.0.1", port=int(sys.argv[2]))
    app.router.add_get("/user/{id}", user)
    return app


web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
