/**
 * Holding the session through the model call: the prompt-window integration for the attempt
 * lock controller of OpenClaw 2026.7 and 2026.8
 * (`createEmbeddedAttemptSessionLockController`, `attempt.session-lock.ts`).
 *
 * That controller takes the session write lock eagerly, then `releaseForPrompt()` lets it go
 * around the provider call (with a stat fence on the transcript), and the next write, a
 * `reacquireAfterPrompt()` or the cleanup takes it again and checks the fence: any write by
 * another lane in the window is an `EmbeddedAttemptSessionTakeoverError`. The drop-in alone
 * changes who waits, not that window: the lock is free during the model call, another lane
 * takes it and writes, and the fence still trips.
 *
 * Under a sessionlane `prompt` lease the window has no reason to exist: the lease is meant to
 * span the turn, the model wait included, and other lanes queue (a recovery still reaches the
 * holder, through the lock's `signal`). So `releaseForPrompt()` becomes a no-op while the
 * controller's lock is a drop-in `prompt` lease; `reacquireAfterPrompt()` (2026.8) is already a
 * no-op while the lock is held, and so is the fence, which never activates. What still
 * releases: the abort paths (`releaseHeldLockForAbort()`), `acquireForCleanup()`'s lock and
 * `dispose()`, unchanged.
 *
 * Two ways to apply it (docs/openclaw.md): wrap the factory where the attempt creates its
 * controller (`holdAcrossPrompt(createEmbeddedAttemptSessionLockController)`), or add one line at
 * the top of `releaseForPrompt` in the controller itself (`if (heldLock &&
 * holdsAcrossPrompt(heldLock)) return;`).
 */

import type { SessionWriteLock } from './openclaw.js';

/** Whether `lock` is a drop-in lock whose lease spans the model call (a live `prompt` lease). */
export function holdsAcrossPrompt(lock: unknown): boolean {
  if (lock === null || typeof lock !== 'object' || !('lease' in lock)) return false;
  const lease = (lock as SessionWriteLock).lease;
  return (
    typeof lease === 'object' &&
    lease !== null &&
    lease.purpose === 'prompt' &&
    lease.revoked === null &&
    !(lock as SessionWriteLock).signal.aborted
  );
}

/** The part of OpenClaw's controller this integration touches. */
export interface PromptReleasingController {
  releaseForPrompt(): Promise<void>;
}

/** The parameters of OpenClaw's controller factory that matter here. */
export interface PromptControllerParams {
  acquireSessionWriteLock: (...args: never[]) => Promise<{ release(): Promise<void> }>;
}

/**
 * Wrap OpenClaw's `createEmbeddedAttemptSessionLockController` so that its `releaseForPrompt()`
 * is a no-op while the lock it took eagerly is still held as a drop-in `prompt` lease. Every
 * other member of the controller is OpenClaw's own. The eager lock is the first one the
 * factory acquires; once the controller lets it go (abort, cleanup, dispose), or the lease is
 * lost, `releaseForPrompt()` is OpenClaw's again.
 */
export function holdAcrossPrompt<
  P extends PromptControllerParams,
  C extends PromptReleasingController,
>(factory: (params: P) => Promise<C>): (params: P) => Promise<C> {
  return async (params: P): Promise<C> => {
    let eager: { lock: { release(): Promise<void> }; released: boolean } | null = null;
    const acquire = params.acquireSessionWriteLock;
    const tracking = (async (...args: never[]) => {
      const lock = await acquire(...args);
      if (eager !== null) return lock;
      const entry = { lock, released: false };
      eager = entry;
      const release = async (): Promise<void> => {
        entry.released = true;
        await lock.release();
      };
      return { ...lock, release, [Symbol.asyncDispose]: release };
    }) as P['acquireSessionWriteLock'];
    const controller = await factory({ ...params, acquireSessionWriteLock: tracking });
    const releaseForPrompt = controller.releaseForPrompt.bind(controller);
    controller.releaseForPrompt = async (): Promise<void> => {
      const held = eager as { lock: unknown; released: boolean } | null;
      if (held !== null && !held.released && holdsAcrossPrompt(held.lock)) return;
      await releaseForPrompt();
    };
    return controller;
  };
}
