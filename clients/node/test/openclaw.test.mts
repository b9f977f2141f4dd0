// The OpenClaw drop-in against a real `sessionlane serve`.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { existsSync, realpathSync } from 'node:fs';
import { basename, dirname } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { LeaseRevoked, PathNotAllowed, connect, type SessionLane } from 'sessionlane';
import {
  SessionWriteLockTimeoutError,
  createSessionWriteLocks,
  isSessionWriteLockTimeoutError,
  type SessionWriteLocks,
} from 'sessionlane/openclaw';

import { address, freshPath, lines, needsService } from './helpers.mjs';

describe('the OpenClaw session write lock drop-in', needsService, () => {
  let locks: SessionWriteLocks;
  let rival: SessionWriteLocks;
  let observer: SessionLane;

  before(async () => {
    locks = createSessionWriteLocks({ address: address(), lane: 'openclaw:main' });
    rival = createSessionWriteLocks({ address: address(), lane: 'openclaw:cron' });
    observer = await connect(address(), { client: 'node-test-observer' });
  });

  after(async () => {
    await locks.close();
    await rival.close();
    await observer.close();
  });

  it('acquires a prompt lease at interactive priority and releases it', async () => {
    const sessionFile = freshPath('oc-basic');
    const lock = await locks.acquireSessionWriteLock({ sessionFile, timeoutMs: 10_000 });
    const held = (await observer.status(sessionFile)).files[0]!.holder!;
    assert.deepEqual(
      [held.lane, held.purpose, held.lease],
      ['openclaw:main', 'prompt', lock.lease.id],
    );
    await lock.lease.append({ type: 'message', text: 'hi' });
    await lock.release();
    await lock.release(); // a second release is a no-op, as OpenClaw's
    assert.equal((await observer.status(sessionFile)).files[0]!.holder, null);
    assert.deepEqual(lines(sessionFile), [{ type: 'message', text: 'hi' }]);
  });

  it('rejects on timeout with the error OpenClaw callers test for', async () => {
    const sessionFile = freshPath('oc-timeout');
    const held = await locks.acquireSessionWriteLock({ sessionFile, timeoutMs: 10_000 });
    const err = await rival
      .acquireSessionWriteLock({ sessionFile, timeoutMs: 50, staleMs: 1 })
      .then(
        () => null,
        (e: unknown) => e,
      );
    assert.ok(err instanceof SessionWriteLockTimeoutError);
    assert.ok(isSessionWriteLockTimeoutError(err));
    assert.ok(isSessionWriteLockTimeoutError({ code: 'OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT' }));
    assert.equal(err.code, 'OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT');
    assert.equal(err.name, 'SessionWriteLockTimeoutError');
    assert.equal(err.timeoutMs, 50);
    const lockPath = `${realpathSync(dirname(sessionFile))}/${basename(sessionFile)}.lock`;
    assert.equal(err.lockPath, lockPath);
    assert.match(err.owner, /^lane=openclaw:main lease=\S+ heldMs=\d+$/);
    assert.equal(err.message, `session file locked (timeout 50ms): ${err.owner} ${lockPath}`);
    await held.release();
  });

  it('hands the file to a waiter when the holder releases', async () => {
    const sessionFile = freshPath('oc-handoff');
    const held = await locks.acquireSessionWriteLock({ sessionFile });
    const waiting = rival.acquireSessionWriteLock({ sessionFile, timeoutMs: 60_000 });
    // A bounded poll on what the service reports: the rival is in the queue.
    const deadline = Date.now() + 30_000;
    for (;;) {
      const file = (await observer.status(sessionFile)).files[0]!;
      if (file.queue.some((entry) => entry.lane === 'openclaw:cron')) break;
      assert.ok(Date.now() < deadline, 'the rival never queued');
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    await held.release();
    const next = await waiting;
    assert.ok(next.lease.fence > held.lease.fence);
    await next.release();
  });

  it('turns maxHoldMs into the lease max hold: the signal aborts and release is a no-op', async () => {
    const sessionFile = freshPath('oc-maxhold');
    const lock = await locks.acquireSessionWriteLock({ sessionFile, maxHoldMs: 200 });
    if (!lock.signal.aborted) await once(lock.signal, 'abort');
    assert.ok(lock.signal.reason instanceof LeaseRevoked);
    assert.equal(lock.lease.revoked, 'max_hold');
    await lock.release(); // the lease is gone already: not an error
    const next = await rival.acquireSessionWriteLock({ sessionFile, timeoutMs: 10_000 });
    assert.ok(next.lease.fence > lock.lease.fence);
    await next.release();
  });

  it('with allowReentrant joins the lease it holds, nesting counted', async () => {
    const sessionFile = freshPath('oc-reentrant');
    const outer = await locks.acquireSessionWriteLock({ sessionFile });
    const inner = await locks.acquireSessionWriteLock({
      sessionFile,
      allowReentrant: true,
      timeoutMs: 50,
    });
    assert.equal(inner.lease.id, outer.lease.id);
    await inner.release();
    const holder = (await observer.status(sessionFile)).files[0]!.holder;
    assert.equal(holder?.lease, outer.lease.id, 'the outer level still holds');
    await outer.release();
    assert.equal((await observer.status(sessionFile)).files[0]!.holder, null);
  });

  it('without allowReentrant a second acquire from the same object waits like any writer', async () => {
    const sessionFile = freshPath('oc-not-reentrant');
    const first = await locks.acquireSessionWriteLock({ sessionFile });
    await assert.rejects(
      locks.acquireSessionWriteLock({ sessionFile, timeoutMs: 50 }),
      (err: unknown) => isSessionWriteLockTimeoutError(err),
    );
    const second = locks.acquireSessionWriteLock({ sessionFile, timeoutMs: 60_000 });
    await first.release();
    const lock = await second;
    assert.notEqual(lock.lease.id, first.lease.id);
    assert.ok(lock.lease.fence > first.lease.fence);
    await lock.release();
  });

  it('creates the session directory only when told to, as OpenClaw did', async () => {
    const sessionFile = `${dirname(freshPath('oc-dir'))}/new-${process.pid}-${Date.now()}/s.jsonl`;
    await assert.rejects(locks.acquireSessionWriteLock({ sessionFile }), PathNotAllowed);
    assert.equal(existsSync(dirname(sessionFile)), false, 'nothing created');
    const creating = createSessionWriteLocks({ address: address(), createDirectory: true });
    try {
      await using lock = await creating.acquireSessionWriteLock({ sessionFile });
      await lock.lease.append({ first: true });
    } finally {
      await creating.close();
    }
    assert.deepEqual(lines(sessionFile), [{ first: true }]);
  });

  it('keeps serving acquires on its connection, and refuses them once closed', async () => {
    const own = createSessionWriteLocks({ address: address(), lane: 'openclaw:own' });
    const sessionFile = freshPath('oc-closed');
    try {
      for (let turn = 0; turn < 3; turn += 1) {
        const lock = await own.acquireSessionWriteLock({ sessionFile });
        await lock.lease.append({ turn });
        await lock.release();
      }
    } finally {
      await own.close();
    }
    assert.deepEqual(lines(sessionFile), [{ turn: 0 }, { turn: 1 }, { turn: 2 }]);
    await assert.rejects(own.acquireSessionWriteLock({ sessionFile }), /closed/);
  });
});
