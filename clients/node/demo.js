#!/usr/bin/env node
'use strict';
/**
 * One agent turn from Node.js: `node demo.js ADDR PATH LANE N` (after `npm ci`).
 *
 * Takes a prompt lease on PATH for LANE, appends N records (`{type: 'demo', lane, seq}`),
 * one append per record, releases, and exits 0. Prints one JSON line per step:
 *
 *     {"step":"granted","lane":...,"lease":...,"fence":...}
 *     {"step":"appended","lane":...,"seq":0,"offset":...,"fence":...,"rtt_ms":...}   (N times)
 *     {"step":"released","lane":...,"lease":...}
 *
 * On a sessionlane error it prints `{"step":"error","code":...,"detail":...,"path":...}` and
 * exits 1. `SESSIONLANE_TOKEN` is sent in hello when set. With `SESSIONLANE_DEMO_PINGS=K`
 * it first times K status round trips and prints `{"step":"pinged","n":K,"p50_ms":...}`.
 */

const { connect, SessionLaneError } = require('sessionlane');

function emit(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function percentile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

async function main(argv) {
  if (argv.length !== 4 || !/^\d+$/.test(argv[3])) {
    process.stderr.write('usage: node demo.js ADDR PATH LANE N\n');
    return 2;
  }
  const [address, path, laneName, countText] = argv;
  const count = Number(countText);
  const sl = await connect(address, { token: process.env.SESSIONLANE_TOKEN, client: 'node:demo' });
  sl.on('event', (event) => emit({ step: 'event', lane: laneName, event }));
  try {
    const pings = Number(process.env.SESSIONLANE_DEMO_PINGS || 0);
    if (pings > 0) {
      const times = [];
      for (let i = 0; i < pings; i += 1) {
        const start = process.hrtime.bigint();
        await sl.request('keepalive', {});
        times.push(Number(process.hrtime.bigint() - start) / 1e6);
      }
      times.sort((a, b) => a - b);
      emit({
        step: 'pinged',
        n: pings,
        p50_ms: percentile(times, 0.5),
        p99_ms: percentile(times, 0.99),
      });
    }
    const lease = await sl.lane(laneName).lease(path, { purpose: 'prompt', waitTimeoutMs: 60000 });
    emit({ step: 'granted', lane: laneName, lease: lease.id, fence: lease.fence });
    for (let seq = 0; seq < count; seq += 1) {
      const start = process.hrtime.bigint();
      const appended = await lease.append({ type: 'demo', lane: laneName, seq });
      const rtt = Number(process.hrtime.bigint() - start) / 1e6;
      emit({
        step: 'appended',
        lane: laneName,
        seq,
        offset: appended.offset,
        fence: appended.fence,
        rtt_ms: rtt,
      });
    }
    await lease.release();
    emit({ step: 'released', lane: laneName, lease: lease.id });
    return 0;
  } finally {
    await sl.close();
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    if (err instanceof SessionLaneError) {
      emit({ step: 'error', code: err.code, detail: err.detail, path: err.path });
    } else {
      process.stderr.write(`${err.stack || err}\n`);
    }
    process.exitCode = 1;
  },
);
