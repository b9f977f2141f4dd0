// The client against a real `sessionlane serve` (started by tests/test_node_client.py).
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readFileSync, writeFileSync } from 'node:fs';
import { after, before, describe, it } from 'node:test';

import {
  AbortRequestedError,
  Contended,
  InvalidRecord,
  LeaseRevoked,
  PipelineBroken,
  LeaseTimeout,
  NotHolder,
  PathNotAllowed,
  SessionLaneError,
  StaleFence,
  TooLarge,
  connect,
  type Lease,
  type SessionLane,
} from 'sessionlane';

import { ROOT, address, deferred, freshPath, lines, needsService } from './helpers.mjs';

describe('a connection to a real service', needsService, () => {
  let sl: SessionLane;
  let other: SessionLane;

  before(async () => {
    sl = await connect(address(), { client: 'node-test' });
    other = await connect(address(), { client: 'node-test-other' });
  });

  after(async () => {
    await sl.close();
    await other.close();
  });

  it('pipelines appends: acknowledged in order, written in order', async () => {
    const path = freshPath('pipelined');
    const lease = await sl.lane('agent').lease(path);
    assert.ok(lease !== null);
    const first = await lease.append({ n: -1 });
    const records = Array.from({ length: 300 }, (_, n) => ({ n }));
    const results = await lease.appendPipelined(records, { window: 16 });
    await lease.release();
    assert.equal(results.length, 300);
    const offsets = [first.offset, ...results.map((r) => r.offset)];
    assert.deepEqual(offsets, [...new Set(offsets)].sort((a, b) => a - b));
    assert.ok(results.every((r) => r.lines === 1 && r.fence === lease.fence));
    assert.deepEqual(
      lines(path).map((record) => (record as { n: number }).n),
      Array.from({ length: 301 }, (_, i) => i - 1),
    );
    // Sent in groups of four records (a quarter of the window), each record's own offset:
    // where its line starts in the file.
    const data = readFileSync(path);
    results.forEach((result, n) => {
      const line = Buffer.from(`{"n":${n}}\n`);
      assert.ok(data.subarray(result.offset, result.offset + line.length).equals(line), `${n}`);
    });
  });

  it('stops a pipeline at a refused append: none after it is written, the error says which were', async () => {
    const path = freshPath('pipeline-broken');
    const lease = await sl.lane('agent').lease(path);
    assert.ok(lease !== null);
    const records: Record<string, unknown>[] = Array.from({ length: 100 }, (_, n) => ({ n }));
    records[40] = { big: 'x'.repeat(1_048_576) }; // over the service's max_record_bytes
    const err = await lease.appendPipelined(records, { window: 64 }).then(
      () => assert.fail('the pipeline went through'),
      (caught: unknown) => caught,
    );
    assert.ok(err instanceof PipelineBroken, String(err));
    assert.equal(err.code, 'pipeline_broken');
    // Groups of 16 records, each one append written all or nothing: the group of records 32
    // to 47 is refused whole, the two before it are written.
    assert.deepEqual([err.failed, err.unknown, err.written.length], [32, 0, 32]);
    assert.ok(err.cause instanceof InvalidRecord);
    assert.match(err.detail, /record 32 and the ones after it were not written/);
    assert.equal(lease.revoked, null);
    await lease.append({ n: 'after' }); // the lease is fine after a broken pipeline
    const counters = (await sl.status(path)).files[0]!.counters;
    assert.ok((counters['pipeline_broken'] ?? 0) >= 1, JSON.stringify(counters));
    await lease.release();
    assert.deepEqual(
      lines(path).map((record) => (record as { n: unknown }).n),
      [...Array.from({ length: 32 }, (_, n) => n), 'after'],
    );
    await assert.rejects(lease.appendPipelined([{ n: 1 }]), LeaseRevoked); // released
    await assert.rejects(lease.appendPipelined([{ n: 1 }], { window: 0 }), RangeError);
  });

  it('appends and releases in one step: the waiter is granted, the lease counts as released', async () => {
    const path = freshPath('fused');
    const lease = await sl.lane('holder').lease(path);
    assert.ok(lease !== null);
    const waiting = other.lane('waiter').lease(path);
    for (let i = 0; i < 1000; i += 1) {
      const [file] = (await sl.status(path)).files;
      if ((file?.queue.length ?? 0) > 0) break; // the waiter is queued (the service says so)
    }
    const result = await lease.append({ n: 0 }); // a plain append first
    const fused = await lease.appendRecords([{ n: 1 }], { release: true });
    assert.deepEqual([fused.lines, fused.fence], [1, lease.fence]);
    assert.ok(fused.offset > result.offset);
    assert.equal(lease.released, true);
    const next = await waiting;
    assert.ok(next !== null && next.fence > lease.fence);
    await assert.rejects(lease.append({ n: 'late' }), LeaseRevoked); // released here too
    await lease.release(); // nothing to do
    const piped = await next.appendPipelined([{ n: 2 }, { n: 3 }], { window: 2, release: true });
    assert.equal(piped.length, 2);
    assert.equal(next.released, true);
    assert.equal((await sl.status(path)).files[0]!.holder, null);
    await assert.rejects(
      lease.appendRecords([{ n: 1 }], { release: 'yes' as unknown as boolean }),
      TypeError,
    );
    assert.deepEqual(
      lines(path).map((record) => (record as { n: unknown }).n),
      [0, 1, 2, 3],
    );
  });

  it('keeps the lease when an append that would release is refused', async () => {
    const path = freshPath('fused-refused');
    const lease = await sl.lane('holder').lease(path);
    assert.ok(lease !== null);
    await assert.rejects(
      lease.appendRecords([{ big: 'x'.repeat(1_048_576) }], { release: true }),
      InvalidRecord,
    );
    assert.equal(lease.released, false);
    assert.equal((await sl.status(path)).files[0]!.holder?.lease, lease.id);
    await lease.appendRecords([{ n: 1 }], { release: true });
    assert.equal((await sl.status(path)).files[0]!.holder, null);
    assert.deepEqual(lines(path), [{ n: 1 }]);
  });

  it('takes a lease, appends durably under its fence and releases it', async () => {
    const path = freshPath('basic');
    const lease = await sl.lane('agent:main').lease(path);
    assert.ok(lease !== null);
    assert.equal(lease.path, path);
    assert.equal(lease.purpose, 'prompt');
    const first = await lease.append({ type: 'message', n: 1 }, { type: 'message', n: 2 });
    const second = await lease.append({ type: 'message', n: 3, big: 2n ** 63n });
    assert.deepEqual([first.lines, first.offset, first.fence], [2, 0, lease.fence]);
    assert.ok(second.offset > first.offset);
    await lease.release();
    assert.equal(lease.released, true);
    assert.deepEqual(lines(path), [
      { type: 'message', n: 1 },
      { type: 'message', n: 2 },
      { type: 'message', n: 3, big: 2 ** 63 },
    ]);
    // Free again: another connection gets it at once.
    const next = await other.lane('agent:main').lease(path, { onContention: 'fail' });
    assert.ok(next !== null && next.fence > lease.fence);
    await next.release();
  });

  it('serves waiters from two other connections in FIFO order with increasing fences', async () => {
    const path = freshPath('fifo');
    const third = await connect(address(), { client: 'node-test-third' });
    try {
      const gate = await sl.lane('gate').lease(path);
      assert.ok(gate !== null);
      const queued = [deferred<number>(), deferred<number>()];
      const order: string[] = [];
      const turn = async (conn: SessionLane, name: string, index: number): Promise<number> => {
        const lease = await conn.lane(name).lease(path, {
          onQueued: (position) => queued[index]!.resolve(position),
        });
        assert.ok(lease !== null);
        order.push(name);
        await lease.append({ lane: name, seq: 0 }, { lane: name, seq: 1 });
        await lease.release();
        return lease.fence;
      };
      const a = turn(other, 'node-a', 0);
      assert.equal(await queued[0]!.promise, 1); // node-a waits first...
      const b = turn(third, 'node-b', 1);
      assert.equal(await queued[1]!.promise, 2); // ...then node-b, behind it
      const status = await sl.status(path);
      assert.deepEqual(
        status.files[0]!.queue.map((entry) => entry.lane),
        ['node-a', 'node-b'],
      );
      assert.equal(status.files[0]!.holder!.lane, 'gate');
      await gate.release();
      const [fenceA, fenceB] = await Promise.all([a, b]);
      assert.deepEqual(order, ['node-a', 'node-b']);
      assert.ok(gate.fence < fenceA && fenceA < fenceB, 'fences increase in grant order');
      assert.deepEqual(
        lines(path).map((record) => (record as { lane: string }).lane),
        ['node-a', 'node-a', 'node-b', 'node-b'],
      );
    } finally {
      await third.close();
    }
  });

  it('resolves null when told to skip a busy path, and Contended when told to fail', async () => {
    const path = freshPath('skip');
    const holder = await sl.lane('user-turn').lease(path);
    assert.ok(holder !== null);
    const heartbeat = other.lane('heartbeat', { priority: 'background' });
    assert.equal(await heartbeat.lease(path, { onContention: 'skip' }), null);
    await assert.rejects(heartbeat.lease(path, { onContention: 'fail' }), Contended);
    await holder.release();
    const after = await heartbeat.lease(path, { onContention: 'skip' });
    assert.ok(after !== null && after.fence > holder.fence);
    await after.release();
  });

  it('gives up a wait with LeaseTimeout after waitTimeoutMs', async () => {
    const path = freshPath('timeout');
    const holder = await sl.lane('holder').lease(path);
    assert.ok(holder !== null);
    const err = await other
      .lane('waiter')
      .lease(path, { waitTimeoutMs: 100 })
      .then(
        () => null,
        (e: unknown) => e,
      );
    assert.ok(err instanceof LeaseTimeout);
    assert.equal(err.code, 'lease_timeout');
    assert.equal(err.path, path);
    await holder.release();
  });

  it('releases the lease at the end of an `await using` block', async () => {
    const path = freshPath('using');
    let fence = 0;
    {
      await using lease = await sl.lane('scoped').lease(path);
      assert.ok(lease !== null);
      fence = lease.fence;
      await lease.append({ inside: true });
      const busy = await other.lane('probe').lease(path, { onContention: 'skip' });
      assert.equal(busy, null, 'held inside the block');
    }
    const after = await other.lane('probe').lease(path, { onContention: 'fail' });
    assert.ok(after !== null && after.fence > fence, 'free after the block');
    await after.release();
  });

  it('gives the same lane the same lease again, nesting counted', async () => {
    const path = freshPath('reentrant');
    const lane = sl.lane('nested');
    const outer = await lane.lease(path);
    const inner = await lane.lease(path, { onContention: 'fail' });
    assert.ok(outer !== null && inner !== null);
    assert.equal(inner.id, outer.id);
    assert.equal(inner.fence, outer.fence);
    await inner.release();
    assert.equal(await other.lane('probe').lease(path, { onContention: 'skip' }), null);
    await outer.append({ still: 'held' });
    await outer.release();
    const free = await other.lane('probe').lease(path, { onContention: 'fail' });
    assert.ok(free !== null);
    await free.release();
  });

  it('aborts the signal and revokes the lease at max hold; the service refuses the old fence', async () => {
    const path = freshPath('maxhold');
    const lease = await sl.lane('slow').lease(path, { maxHoldMs: 200 });
    assert.ok(lease !== null);
    const revoked = new Promise((resolve) => lease.on('revoked', resolve));
    await lease.append({ n: 1 });
    if (!lease.signal.aborted) await once(lease.signal, 'abort');
    assert.ok(lease.signal.reason instanceof LeaseRevoked);
    assert.equal(lease.revoked, 'max_hold');
    assert.deepEqual(await revoked, { lease: lease.id, path, reason: 'max_hold' });
    await assert.rejects(lease.append({ n: 2 }), (err: unknown) => {
      assert.ok(err instanceof LeaseRevoked);
      assert.match(err.detail, /max_hold/);
      return true;
    });
    // The same fence from a holder that has not heard yet: the service alone must refuse it.
    await assert.rejects(
      sl.request('append', { lease: lease.id, fence: lease.fence, records: [{ n: 3 }] }),
      (err: unknown) => err instanceof StaleFence && err.code === 'stale_fence',
    );
    assert.deepEqual(lines(path), [{ n: 1 }]);
    await assert.rejects(lease.release(), LeaseRevoked);
    await lease.release({ quiet: true });
    const next = await other.lane('next').lease(path, { onContention: 'fail' });
    assert.ok(next !== null && next.fence > lease.fence);
    await next.release();
  });

  it('asks the holder to abort on recover, then grants the recovery lease', async () => {
    const path = freshPath('recover');
    const holder = await sl.lane('stuck').lease(path);
    assert.ok(holder !== null);
    const recovery = other.recover(path, { reason: 'test', graceMs: 60_000 });
    await once(holder.signal, 'abort');
    assert.ok(holder.signal.reason instanceof AbortRequestedError);
    assert.equal(holder.abortRequested, true);
    assert.equal(holder.abortGraceMs, 60_000);
    await holder.append({ wrapped: 'up' }); // still the holder within the grace
    await holder.release();
    const lease: Lease = await recovery;
    assert.equal(lease.purpose, 'recovery');
    assert.ok(lease.fence > holder.fence);
    await lease.release();
  });

  it('queues a lane append as a short write and abandons a lane at once', async () => {
    const path = freshPath('lane-append');
    const result = await sl.lane('writer').append(path, { short: 1 });
    assert.equal(result.lines, 1);
    const lane = other.lane('gone');
    const lease = await lane.lease(path);
    assert.ok(lease !== null);
    assert.deepEqual(await lane.abandon(path, { reason: 'test' }), [lease.id]);
    assert.equal(lease.revoked, 'abandoned');
    assert.equal(lease.signal.aborted, true);
    await assert.rejects(lease.append({ late: true }), LeaseRevoked);
    assert.deepEqual(lines(path), [{ short: 1 }]);
  });

  it("answers a waiting acquire cancelled by its own lane's abandon with LeaseRevoked", async () => {
    const path = freshPath('abandon-queued');
    const holder = await sl.lane('holder').lease(path);
    assert.ok(holder !== null);
    const lane = other.lane('quitter');
    const queued = deferred();
    const waiting = lane.lease(path, { onQueued: () => queued.resolve() }).then(
      () => null,
      (err: unknown) => err,
    );
    await queued.promise;
    assert.deepEqual(await lane.abandon(path), []);
    const err = await waiting;
    assert.ok(err instanceof LeaseRevoked, String(err));
    assert.equal(err.code, 'abandoned');
    await holder.release();
  });

  it('refuses a path outside the root with PathNotAllowed and creates nothing', async () => {
    for (const path of [`${ROOT}/../outside.jsonl`, `${ROOT}/wrong-suffix.txt`]) {
      const err = await sl
        .lane('bad')
        .lease(path)
        .then(
          () => null,
          (e: unknown) => e,
        );
      assert.ok(err instanceof PathNotAllowed, String(err));
      assert.ok(err instanceof SessionLaneError);
      assert.equal(err.code, 'path_not_allowed');
      assert.ok(err.detail);
      assert.deepEqual(lines(path), []);
    }
  });

  it('raises InvalidRecord before sending, writes nothing, and the connection stays usable', async () => {
    const path = freshPath('invalid');
    const lease = await sl.lane('records').lease(path);
    assert.ok(lease !== null);
    const cycle: Record<string, unknown> = { a: 1 };
    cycle['self'] = cycle;
    const deep: Record<string, unknown> = {};
    let cursor = deep;
    for (let i = 0; i < 150; i += 1) cursor = cursor['next'] = {};
    const batches: [unknown[], RegExp][] = [
      [[cycle], /circular/],
      [[{ f: () => 1 }], /function/],
      [[{ n: 2n ** 64n }], /64 bits/],
      [[{ when: new Date() }], /Date/],
      [[{ tags: new Set([1]) }], /Set/],
      [[{ bytes: new Uint8Array(2) }], /Uint8Array/],
      [[{ x: NaN }], /NaN/],
      [[{ s: '\ud800' }], /surrogate/],
      [[['not', 'an', 'object']], /not a plain object/],
      [[{ ok: 1 }, 'text'], /record 1/],
      [[deep], /deeper/],
      [[], /empty/],
    ];
    for (const [batch, reason] of batches) {
      const err: unknown = await lease.append(...(batch as object[])).then(
        () => null,
        (e: unknown) => e,
      );
      assert.ok(err instanceof InvalidRecord, `${String(err)} for ${reason}`);
      assert.equal(err.code, 'invalid_record');
      assert.match(err.detail, reason);
    }
    assert.equal(lease.revoked, null);
    await lease.append({ ok: true, skipped: undefined });
    await lease.release();
    assert.deepEqual(lines(path), [{ ok: true }]);
    assert.equal(sl.closed, false);
  });

  it('rewrites the whole file under a compaction lease, and only under one', async () => {
    const path = freshPath('rewrite');
    const lane = sl.lane('compactor');
    await lane.append(path, { n: 1 }, { n: 2 }, { n: 3 });
    const prompt = await other.lane('turn').lease(path);
    assert.ok(prompt !== null);
    await assert.rejects(prompt.rewrite([{ summary: 'no' }]), NotHolder);
    await prompt.release();
    const lease = await lane.lease(path, { purpose: 'compaction' });
    assert.ok(lease !== null);
    assert.equal(await lease.rewrite([{ summary: '1-3' }, { n: 4 }]), 2);
    await lease.append({ n: 5 });
    await lease.release();
    assert.deepEqual(lines(path), [{ summary: '1-3' }, { n: 4 }, { n: 5 }]);
  });

  it('raises TooLarge for a frame over maxFrameBytes before sending; the connection stays', async () => {
    const small = await connect(address(), { maxFrameBytes: 4096 });
    try {
      const path = freshPath('too-large');
      await using lease = await small.lane('big').lease(path);
      assert.ok(lease !== null);
      await assert.rejects(lease.append({ text: 'x'.repeat(5000) }), TooLarge);
      await lease.append({ text: 'fits' });
      assert.deepEqual(lines(path), [{ text: 'fits' }]);
      assert.equal(small.closed, false);
    } finally {
      await small.close();
    }
  });

  it('answers a release of a lease this lane does not hold with NotHolder', async () => {
    await assert.rejects(sl.request('release', { lease: 'no-such-lease' }), NotHolder);
  });

  it('reports external changes to the holder, from the first one on', async () => {
    const path = freshPath('external');
    const seen: string[] = [];
    const lease = await sl.lane('watcher').lease(path, {
      onExternalChange: (event) => seen.push(event.kind),
    });
    assert.ok(lease !== null);
    await lease.append({ n: 1 });
    const event = new Promise((resolve) => lease.on('external_change', resolve));
    writeFileSync(path, '{"rewritten":"outside"}\n{"more":1}\n');
    await lease.append({ n: 2 }); // the service notices the change when it next writes
    assert.equal(((await event) as { kind: string }).kind, lease.externalChanges[0]);
    assert.deepEqual(seen, [...lease.externalChanges]);
    await lease.release();
  });
});
