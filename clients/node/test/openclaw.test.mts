// The OpenClaw drop-in against a real `sessionlane serve`.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, realpathSync, unlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { basename, dirname } from 'node:path';
import { after, before, describe, it } from 'node:test';

import { LeaseRevoked, PathNotAllowed, Unavailable, connect, type SessionLane } from 'sessionlane';
import {
  ACQUIRE_TIMEOUT_ENV,
  SessionWriteLockTimeoutError,
  processStartTime,
  resolveAcquireTimeoutMs,
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
    // OpenClaw's owner text, read from the holder's lock file: this process holds it.
    assert.match(err.owner, new RegExp(`^pid=${process.pid} alive=true ageMs=\\d+$`));
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
    assert.ok(existsSync(outer.lockPath), 'and so does its lock file');
    await outer.release();
    assert.equal(existsSync(outer.lockPath), false);
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

  it('creates the session directory as OpenClaw does, unless told not to', async () => {
    const base = `${dirname(freshPath('oc-dir'))}/new-${process.pid}-${Date.now()}`;
    const refusing = createSessionWriteLocks({ address: address(), createDirectory: false });
    try {
      await assert.rejects(
        refusing.acquireSessionWriteLock({ sessionFile: `${base}/a/s.jsonl` }),
        PathNotAllowed,
      );
    } finally {
      await refusing.close();
    }
    assert.equal(existsSync(`${base}/a`), false, 'nothing created');
    const sessionFile = `${base}/b/s.jsonl`;
    {
      await using lock = await locks.acquireSessionWriteLock({ sessionFile });
      await lock.lease.append({ first: true });
    }
    assert.deepEqual(lines(sessionFile), [{ first: true }]);
  });

  it("holds OpenClaw's lock file in OpenClaw's format while the lease is held", async () => {
    const sessionFile = freshPath('oc-lockfile');
    const lock = await locks.acquireSessionWriteLock({ sessionFile, maxHoldMs: 600_000 });
    const lockPath = `${realpathSync(dirname(sessionFile))}/${basename(sessionFile)}.lock`;
    assert.equal(lock.lockPath, lockPath);
    const raw = readFileSync(lockPath, 'utf8');
    const payload = JSON.parse(raw) as Record<string, unknown>;
    assert.equal(raw, `${JSON.stringify(payload, null, 2)}\n`);
    assert.equal(payload['pid'], process.pid);
    assert.equal(payload['maxHoldMs'], 600_000);
    assert.equal(payload['starttime'], processStartTime(process.pid));
    assert.ok(Math.abs(Date.parse(String(payload['createdAt'])) - Date.now()) < 60_000);
    await lock.release();
    assert.equal(existsSync(lockPath), false, 'released with the lease');
  });

  it('leaves no transcript behind when it only locked', async () => {
    const sessionFile = freshPath('oc-lock-only');
    const lock = await locks.acquireSessionWriteLock({ sessionFile });
    assert.equal(existsSync(sessionFile), false, 'hadSessionFile stays false');
    await lock.release();
    assert.equal(existsSync(sessionFile), false);
    // A later writer through the service gets the file back.
    const writer = await locks.acquireSessionWriteLock({ sessionFile });
    await writer.lease.append({ after: true });
    await writer.release();
    assert.deepEqual(lines(sessionFile), [{ after: true }]);
  });

  it('waits for a live foreign lock file, naming its owner, and reclaims a dead one', async () => {
    const sessionFile = freshPath('oc-foreign');
    const lockPath = `${sessionFile}.lock`;
    const live = { pid: process.ppid, createdAt: new Date().toISOString() };
    writeFileSync(lockPath, `${JSON.stringify(live, null, 2)}\n`, { flag: 'wx' });
    const err = await rival.acquireSessionWriteLock({ sessionFile, timeoutMs: 200 }).then(
      () => null,
      (e: unknown) => e,
    );
    assert.ok(err instanceof SessionWriteLockTimeoutError);
    assert.match(err.owner, new RegExp(`^pid=${process.ppid} alive=true ageMs=\\d+$`));
    assert.equal(readFileSync(lockPath, 'utf8'), `${JSON.stringify(live, null, 2)}\n`);
    assert.equal((await observer.status(sessionFile)).files[0]?.holder ?? null, null);

    const child = spawn(process.execPath, ['-e', '']);
    const [code] = (await once(child, 'exit')) as [number];
    assert.equal(code, 0);
    unlinkSync(lockPath);
    writeFileSync(lockPath, JSON.stringify({ pid: child.pid, createdAt: live.createdAt }));
    const lock = await rival.acquireSessionWriteLock({ sessionFile, timeoutMs: 10_000 });
    assert.equal(JSON.parse(readFileSync(lockPath, 'utf8')).pid, process.pid, 'dead-pid reclaimed');
    await lock.release();
  });

  it("judges a foreign lock file by OpenClaw's rules", async () => {
    const sessionFile = freshPath('oc-rules');
    const lockPath = `${sessionFile}.lock`;
    const put = (payload: unknown): string => {
      const text = typeof payload === 'string' ? payload : `${JSON.stringify(payload, null, 2)}\n`;
      writeFileSync(lockPath, text, { flag: 'w' });
      return text;
    };
    const timesOut = async (): Promise<void> => {
      const err = await rival.acquireSessionWriteLock({ sessionFile, timeoutMs: 150 }).then(
        () => null,
        (e: unknown) => e,
      );
      assert.ok(err instanceof SessionWriteLockTimeoutError, String(err));
    };
    const old = new Date(Date.now() - 3 * 3_600_000).toISOString();
    // A live owner past staleMs and past its own maxHoldMs: reported, never removed.
    let text = put({ pid: process.ppid, createdAt: old, maxHoldMs: 1000 });
    await timesOut();
    assert.equal(readFileSync(lockPath, 'utf8'), text);
    // A fresh payload-less file: its owner may be between open("wx") and the payload write.
    text = put('');
    await timesOut();
    assert.equal(readFileSync(lockPath, 'utf8'), text);
    // A live pid whose start time is not the recorded one: recycled, reclaimed.
    const starttime = processStartTime(process.ppid);
    if (starttime !== null) {
      put({ pid: process.ppid, createdAt: new Date().toISOString(), starttime: starttime + 1 });
      const lock = await rival.acquireSessionWriteLock({ sessionFile, timeoutMs: 10_000 });
      assert.equal(JSON.parse(readFileSync(lockPath, 'utf8')).pid, process.pid);
      await lock.release();
    } else {
      unlinkSync(lockPath); // no start times on this platform
    }
    assert.equal(existsSync(lockPath), false);
  });

  it('retries an unreachable service until timeoutMs, then names it', async () => {
    const server = createServer();
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const port = (server.address() as { port: number }).port;
    await new Promise((resolve) => server.close(resolve));
    const away = `tcp://127.0.0.1:${port}`;
    // The drop-in rides out a lost service for 60 s by default: the acquire's budget bounds
    // its connect all the same.
    const lonely = createSessionWriteLocks({ address: away });
    try {
      const started = Date.now();
      const err = await lonely
        .acquireSessionWriteLock({ sessionFile: freshPath('oc-away'), timeoutMs: 400 })
        .then(
          () => null,
          (e: unknown) => e,
        );
      assert.ok(err instanceof SessionWriteLockTimeoutError, String(err));
      const took = Date.now() - started;
      assert.ok(took >= 400, 'the whole budget was used');
      assert.ok(took < 20_000, `the budget, not the 60 s ride-out, ended it (${took} ms)`);
      assert.ok(err.cause instanceof Unavailable);
      assert.ok(err.message.includes(`sessionlane service unreachable at ${away}`), err.message);
      assert.equal(err.code, 'OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT');
    } finally {
      await lonely.close();
    }
  });

  it('takes its default budget from OPENCLAW_SESSION_WRITE_LOCK_ACQUIRE_TIMEOUT_MS', async () => {
    const env = { OPENCLAW_SESSION_WRITE_LOCK_ACQUIRE_TIMEOUT_MS: '150' };
    assert.equal(resolveAcquireTimeoutMs(undefined, env), 150);
    assert.equal(resolveAcquireTimeoutMs(0, env), 150);
    assert.equal(resolveAcquireTimeoutMs(5_000, env), 5_000, 'an explicit timeoutMs wins');
    assert.equal(resolveAcquireTimeoutMs(undefined, { [ACQUIRE_TIMEOUT_ENV]: 'Infinity' }), Infinity);
    for (const bad of ['', '-5', '1.5', 'soon', '0']) {
      assert.equal(resolveAcquireTimeoutMs(undefined, { [ACQUIRE_TIMEOUT_ENV]: bad }), 60_000);
    }
    const sessionFile = freshPath('oc-env');
    const held = await locks.acquireSessionWriteLock({ sessionFile });
    const envLocks = createSessionWriteLocks({ address: address(), lane: 'openclaw:env', env });
    try {
      const err = await envLocks.acquireSessionWriteLock({ sessionFile }).then(
        () => null,
        (e: unknown) => e,
      );
      assert.ok(err instanceof SessionWriteLockTimeoutError);
      assert.equal(err.timeoutMs, 150);
    } finally {
      await envLocks.close();
      await held.release();
    }
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
