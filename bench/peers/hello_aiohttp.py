"""The hello JSON service in Python aiohttp, for bench/http_hello.sh.
   python3 hello_aiohttp.py PORT   (several processes share PORT: reuse_port)"""
import sys

from aiohttp import web


async def hello(request):
    return web.json_response({"message": "hello " + request.match_info["name"]})


app = web.Application()
app.router.add_get("/hello/{name}", hello)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), reuse_port=True,
            access_log=None, print=None)
