// N async functions each awaiting a one-hour timer; prints the RSS (KiB)
// once they all sleep. For bench/scale.sh:  node sleepers_node.js N
const fs = require("fs");
const n = Number(process.argv[2]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
async function sleeper() { await sleep(3600 * 1000); }
for (let i = 0; i < n; i++) sleeper();
setTimeout(() => {
    if (global.gc) global.gc();
    const rss = /VmRSS:\s+(\d+)/.exec(fs.readFileSync("/proc/self/status", "utf8"))[1];
    console.log("RSS " + rss);
}, 300);
