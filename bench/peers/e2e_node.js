// GET /user/{id} -> Redis GET user:<id> -> JSON, with Node's http and ioredis
// (enableAutoPipelining: the commands of one event-loop tick share a write).
// Usage: NODE_PATH=DIR/node_modules node e2e_node.js HTTP_PORT REDIS_PORT
const http = require("http");
const Redis = require("ioredis");

const [httpPort, redisPort] = process.argv.slice(2).map(Number);
const redis = new Redis({ host: "127.0.0.1", port: redisPort, enableAutoPipelining: true });

http.createServer((req, res) => {
    const m = /^\/user\/([^/]+)$/.exec(req.url);
    if (!m) { res.writeHead(404); res.end(); return; }
    redis.get("user:" + m[1]).then((name) => {
        if (name === null) {
            res.writeHead(404, { "Content-Type": "application/json" });
            res.end('{"error":"not found"}');
            return;
        }
        const body = JSON.stringify({ id: m[1], name: name });
        res.writeHead(200, { "Content-Type": "application/json" });
        res.end(body);
    }, (err) => {
        res.writeHead(500, { "Content-Type": "application/json" });
        res.end(JSON.stringify({ error: String(err) }));
    });
}).listen(httpPort, "127.0.0.1");
