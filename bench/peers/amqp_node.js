// Node's amqplib doing what bench/amqp.sh measures: N persistent 200-byte
// messages published with confirms (a window of 100 unconfirmed), then
// consumed with prefetch 100 and one ack each. For bench/scale.sh:
//   NODE_PATH=DIR/node_modules node amqp_node.js AMQP_URL N
const amqp = require("amqplib");

const [url, nArg] = process.argv.slice(2);
const n = Number(nArg);
const queue = "tamarco-bench-node-" + process.pid;
const body = Buffer.alloc(200, "x");

async function main() {
    const conn = await amqp.connect(url);
    const ch = await conn.createConfirmChannel();
    await ch.assertQueue(queue, { durable: true });
    let t0 = process.hrtime.bigint();
    let inflight = [];
    for (let i = 0; i < n; i++) {
        inflight.push(new Promise((resolve, reject) =>
            ch.sendToQueue(queue, body, { persistent: true }, (err) => (err ? reject(err) : resolve()))));
        if (inflight.length >= 100) { await Promise.all(inflight); inflight = []; }
    }
    await Promise.all(inflight);
    const push = Number(process.hrtime.bigint() - t0) / 1e9;

    await ch.prefetch(100);
    t0 = process.hrtime.bigint();
    let got = 0;
    await new Promise((resolve) => {
        ch.consume(queue, (msg) => {
            if (msg === null) return;   // cancelled: the queue is deleted below
            ch.ack(msg);
            if (++got === n) resolve();
        });
    });
    const pull = Number(process.hrtime.bigint() - t0) / 1e9;
    await ch.deleteQueue(queue);
    await conn.close();
    console.log(`  node amqplib push ${push.toFixed(2)} s ${(n / push).toFixed(0)} msg/s   ` +
        `pull ${pull.toFixed(2)} s ${(n / pull).toFixed(0)} msg/s   overall ${(n / (push + pull)).toFixed(0)} msg/s`);
}

main().catch((err) => { console.error(err); process.exit(1); });
