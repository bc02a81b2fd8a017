#!/usr/bin/env node
// A probe of `GET /api/tasks` under a large snapshot, for BENCHMARKS.md section 6.
//
// Starts the given server binary on a loopback port with a fresh data directory,
// creates --tasks tasks with the longest title and notes (200 and 10000 four-byte
// characters: about 41 KB each), waits until all have applied, then has --readers
// clients read the snapshot at once while another asks `/api/health` every 10 ms.
// Prints how long each read took, the health check's p50 and max, and the server's RSS
// before and at its peak. Stops the server and deletes its data directory at the end.
//
//   node scripts/probe-snapshot.mjs target/release/settle [--port 3951] [--tasks 4000] [--readers 8]

import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { Worker } from 'node:worker_threads';

const { values: options, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    port: { type: 'string', default: '3951' },
    tasks: { type: 'string', default: '4000' },
    readers: { type: 'string', default: '8' },
  },
});
const [binary] = positionals;
if (!binary) throw new Error('usage: node scripts/probe-snapshot.mjs SERVER_BINARY [--port N] [--tasks N] [--readers N]');
const [port, tasks, readers] = [options.port, options.tasks, options.readers].map(Number);
const base = `http://127.0.0.1:${port}`;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const data = await mkdtemp(join(tmpdir(), 'settle-probe-'));
const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('SETTLE_')));
const server = spawn(binary, ['--addr', `127.0.0.1:${port}`, '--data-dir', data, '--delay-ms', '10'],
  { env, stdio: ['ignore', 'pipe', 'ignore'] });
// Whatever ends this process ends the server: an error, a signal, the end.
process.on('exit', () => server.kill('SIGKILL'));
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => process.exit(1));
let prober = null;
try {
  await new Promise((resolve, reject) => {
    let out = '';
    server.stdout.on('data', (chunk) => {
      out += chunk;
      if (out.includes('listening on')) resolve();
    });
    server.on('error', reject);
    server.on('exit', () => reject(new Error('the server did not start')));
  });

  const title = '\u{1F600}'.repeat(200);
  const notes = '\u{1F600}'.repeat(10_000);
  const started = Date.now();
  for (let n = 0; n < tasks; n += 1) {
    const response = await fetch(`${base}/api/tasks`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': `probe-${n}` },
      body: JSON.stringify({ title, notes }),
    });
    await response.arrayBuffer();
    if (response.status !== 202) throw new Error(`create ${n}: ${response.status}`);
  }
  const settleBy = Date.now() + 120_000;
  while ((await (await fetch(`${base}/api/metrics`)).json()).settled < tasks) {
    if (Date.now() > settleBy) throw new Error(`the ${tasks} tasks did not all apply within 2 minutes`);
    await sleep(200);
  }
  console.log(`created ${tasks} tasks in ${((Date.now() - started) / 1000).toFixed(1)} s`);

  const rssKib = async () => Number(/VmRSS:\s+(\d+)/.exec(await readFile(`/proc/${server.pid}/status`, 'utf8'))[1]);
  // On a thread of its own: the readers' hundreds of megabytes keep this one's event
  // loop busy, which the health checks would otherwise count as the server's.
  prober = new Worker(`
    const { parentPort, workerData } = require('node:worker_threads');
    const latencies = [];
    let reading = true;
    parentPort.on('message', () => { reading = false; });
    (async () => {
      while (reading) {
        const asked = performance.now();
        await (await fetch(workerData + '/api/health')).arrayBuffer();
        latencies.push(performance.now() - asked);
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      parentPort.postMessage(latencies);
    })();
  `, { eval: true, workerData: base });
  const probed = new Promise((resolve, reject) => {
    prober.once('message', resolve);
    prober.once('error', reject);
  });
  probed.catch(() => {});
  await sleep(300);
  const before = await rssKib();
  let peak = before;
  const reads = Array.from({ length: readers }, async () => {
    const asked = performance.now();
    const body = await (await fetch(`${base}/api/tasks`)).arrayBuffer();
    return { bytes: body.byteLength, ms: performance.now() - asked };
  });
  let done = false;
  const all = Promise.all(reads).finally(() => { done = true; });
  while (!done) {
    peak = Math.max(peak, await rssKib());
    await sleep(50);
  }
  const results = await all;
  prober.postMessage('stop');
  const latencies = (await probed).sort((a, b) => a - b);
  const seconds = results.map((read) => read.ms / 1000);
  console.log(`${readers} readers: bodies of ${(results[0].bytes / 1e6).toFixed(0)} MB, each `
    + `${Math.min(...seconds).toFixed(2)}-${Math.max(...seconds).toFixed(2)} s; /api/health p50 `
    + `${latencies[Math.floor(latencies.length / 2)].toFixed(1)} ms, max ${latencies.at(-1).toFixed(0)} ms `
    + `over ${latencies.length} probes; server RSS ${Math.floor(before / 1024)} -> peak ${Math.floor(peak / 1024)} MiB`);
} finally {
  await prober?.terminate();
  server.kill('SIGKILL');
  await new Promise((resolve) => (server.exitCode !== null || server.signalCode !== null ? resolve() : server.once('exit', resolve)));
  await rm(data, { recursive: true, force: true });
}
