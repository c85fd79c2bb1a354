// The hello JSON service with Node's http, for bench/scale.sh:
//   node hello_node.js PORT
// Idle keep-alive connections are kept (no keep-alive timeout), like the
// other servers of the comparison over the measurement.
const http = require("http");
const server = http.createServer((req, res) => {
    const m = /^\/hello\/([^/]+)$/.exec(req.url);
    if (!m) { res.writeHead(404); res.end(); return; }
    const body = JSON.stringify({ message: "hello " + m[1] });
    res.writeHead(200, { "Content-Type": "application/json" });
    res.end(body);
});
server.keepAliveTimeout = 0;
server.listen(Number(process.argv[2]), "127.0.0.1");
