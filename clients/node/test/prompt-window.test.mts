// The prompt window of OpenClaw 2026.7/2026.8's attempt controller (a re-creation of its
// logic, ./attempt-controller.mts) on the drop-in, against a real `sessionlane serve`: without
// the integration another lane writes while the attempt waits for the model, and the attempt
// fails with a takeover; with `holdAcrossPrompt` the prompt lease spans the model call, the
// other lane waits its turn and nothing fails.
import assert from 'node:assert/strict';
import { appendFile } from 'node:fs/promises';
import { after, before, describe, it } from 'node:test';

import {
  createSessionWriteLocks,
  holdAcrossPrompt,
  isSessionWriteLockTimeoutError,
  type SessionWriteLocks,
} from 'sessionlane/openclaw';

import {
  EmbeddedAttemptSessionTakeoverError,
  createEmbeddedAttemptSessionLockController,
  type AttemptController,
} from './attempt-controller.mjs';
import { address, freshPath, lines, needsService } from './helpers.mjs';

const write = (file: string, writer: string): Promise<void> =>
  appendFile(file, `${JSON.stringify({ writer })}\n`);

describe("the prompt window of OpenClaw's attempt controller", needsService, () => {
  let attempts: SessionWriteLocks;
  let heartbeat: SessionWriteLocks;

  before(() => {
    attempts = createSessionWriteLocks({ address: address(), lane: 'openclaw:main' });
    heartbeat = createSessionWriteLocks({ address: address(), lane: 'openclaw:heartbeat' });
  });

  after(async () => {
    await attempts.close();
    await heartbeat.close();
  });

  function controller(
    sessionFile: string,
    locks: SessionWriteLocks,
    patched: boolean,
  ): Promise<AttemptController> {
    const create = patched
      ? holdAcrossPrompt(createEmbeddedAttemptSessionLockController)
      : createEmbeddedAttemptSessionLockController;
    return create({
      acquireSessionWriteLock: locks.acquireSessionWriteLock,
      lockOptions: { sessionFile, timeoutMs: 30_000, staleMs: 1_800_000, maxHoldMs: 300_000 },
    });
  }

  it('without the integration a write in the window is a takeover, drop-in or not', async () => {
    const sessionFile = freshPath('pw-unpatched');
    const attempt = await controller(sessionFile, attempts, false);
    await attempt.withSessionWriteLock(() => write(sessionFile, 'prep'));
    await attempt.releaseForPrompt();
    // The model call: the lock is free, another lane takes it and writes.
    const other = await heartbeat.acquireSessionWriteLock({ sessionFile, timeoutMs: 5_000 });
    await write(sessionFile, 'heartbeat');
    await other.release();
    await assert.rejects(attempt.reacquireAfterPrompt(), EmbeddedAttemptSessionTakeoverError);
    assert.equal(attempt.hasSessionTakeover(), true);
    await assert.rejects(
      attempt.withSessionWriteLock(() => write(sessionFile, 'reply')),
      EmbeddedAttemptSessionTakeoverError,
    );
    await attempt.dispose();
    assert.deepEqual(lines(sessionFile), [{ writer: 'prep' }, { writer: 'heartbeat' }]);
  });

  it('with holdAcrossPrompt the lease spans the model call: the other lane waits', async () => {
    const sessionFile = freshPath('pw-patched');
    const attempt = await controller(sessionFile, attempts, true);
    await attempt.withSessionWriteLock(() => write(sessionFile, 'prep'));
    await attempt.releaseForPrompt(); // a no-op under a prompt lease
    // The model call: the other lane cannot take the file...
    await assert.rejects(
      heartbeat.acquireSessionWriteLock({ sessionFile, timeoutMs: 200 }),
      (err: unknown) => isSessionWriteLockTimeoutError(err),
    );
    // ...and queues for it.
    const waiting = heartbeat.acquireSessionWriteLock({ sessionFile, timeoutMs: 30_000 });
    await attempt.reacquireAfterPrompt();
    await attempt.withSessionWriteLock(() => write(sessionFile, 'reply'));
    const cleanup = await attempt.acquireForCleanup();
    await write(sessionFile, 'cleanup');
    await cleanup.release();
    await attempt.dispose();
    assert.equal(attempt.hasSessionTakeover(), false);
    const other = await waiting;
    await write(sessionFile, 'heartbeat');
    await other.release();
    assert.deepEqual(
      lines(sessionFile).map((r) => (r as { writer: string }).writer),
      ['prep', 'reply', 'cleanup', 'heartbeat'],
    );
  });

  it('under the integration an abort still lets the lock go', async () => {
    const sessionFile = freshPath('pw-abort');
    const attempt = await controller(sessionFile, attempts, true);
    await attempt.releaseForPrompt();
    await attempt.releaseHeldLockForAbort();
    const other = await heartbeat.acquireSessionWriteLock({ sessionFile, timeoutMs: 5_000 });
    await other.release();
    await attempt.dispose();
  });

  it('a lock that is not a prompt lease is released for the prompt as before', async () => {
    const sessionFile = freshPath('pw-write-lease');
    const writeLocks = createSessionWriteLocks({ address: address(), purpose: 'write' });
    try {
      const attempt = await controller(sessionFile, writeLocks, true);
      await attempt.releaseForPrompt();
      const other = await heartbeat.acquireSessionWriteLock({ sessionFile, timeoutMs: 5_000 });
      await other.release();
      await attempt.dispose();
    } finally {
      await writeLocks.close();
    }
  });
});
