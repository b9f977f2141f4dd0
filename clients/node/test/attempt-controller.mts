// A small re-creation of the attempt lock controller of OpenClaw 2026.7/2026.8
// (`createEmbeddedAttemptSessionLockController` in
// `src/agents/pi-embedded-runner/run/attempt.session-lock.ts`), written for these tests from
// its documented behaviour: what matters to the prompt window, nothing else.
//
// - The session write lock is taken eagerly when the controller is made.
// - `releaseForPrompt()` snapshots the transcript's stat fingerprint (dev, ino, size, mtime,
//   ctime), activates the fence and releases the lock around the provider call.
// - `reacquireAfterPrompt()` is a no-op after a takeover or while the lock is held; otherwise
//   it takes the lock again and checks the fence.
// - `withSessionWriteLock(run)` throws after a takeover; reuses the held lock, or takes a short
//   one (a lock timeout marks a takeover); checks the fence, runs, and moves the fence past the
//   write it made.
// - `acquireForCleanup()` returns a no-op lock after a takeover, else the held or a fresh lock,
//   fence checked (a mismatch: takeover, no-op lock).
// - `releaseHeldLockForAbort()` releases like `releaseForPrompt` (the abort path);
//   `dispose()` releases a lock still held.
// - A fence mismatch is `EmbeddedAttemptSessionTakeoverError`, and sticky.
//
// Left out: the in-process maps of "owned" and "trusted" fingerprints (writes by other
// controllers of the same process under OpenClaw's lock), the benign-append and benign-rewrite
// rules, retained-use accounting and event-queue draining. The writer in the window in these
// tests is another lane writing the file itself, which OpenClaw's fence treats as external in
// every version.
import { stat } from 'node:fs/promises';

export interface Lock {
  release(): Promise<void>;
}

export interface LockOptions {
  sessionFile: string;
  timeoutMs: number;
  staleMs: number;
  maxHoldMs: number;
}

export interface ControllerParams {
  acquireSessionWriteLock: (params: LockOptions) => Promise<Lock>;
  lockOptions: LockOptions;
}

export interface AttemptController {
  releaseForPrompt(): Promise<void>;
  reacquireAfterPrompt(): Promise<void>;
  releaseHeldLockForAbort(): Promise<void>;
  withSessionWriteLock<T>(run: () => Promise<T> | T): Promise<T>;
  acquireForCleanup(): Promise<Lock>;
  dispose(): Promise<void>;
  hasSessionTakeover(): boolean;
}

export class EmbeddedAttemptSessionTakeoverError extends Error {
  constructor(sessionFile: string) {
    super(`session file changed while embedded prompt lock was released: ${sessionFile}`);
    this.name = 'EmbeddedAttemptSessionTakeoverError';
  }
}

type Fingerprint = string; // "absent", or dev:ino:size:mtimeNs:ctimeNs

async function fingerprint(file: string): Promise<Fingerprint> {
  try {
    const st = await stat(file, { bigint: true });
    return `${st.dev}:${st.ino}:${st.size}:${st.mtimeNs}:${st.ctimeNs}`;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'absent';
    throw err;
  }
}

function isLockTimeout(err: unknown): boolean {
  return (err as { code?: unknown } | null)?.code === 'OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT';
}

const noopLock: Lock = { release: async () => {} };

export async function createEmbeddedAttemptSessionLockController(
  params: ControllerParams,
): Promise<AttemptController> {
  const file = params.lockOptions.sessionFile;
  const acquire = (): Promise<Lock> => params.acquireSessionWriteLock({ ...params.lockOptions });
  let held: Lock | undefined = await acquire();
  let fence: Fingerprint | undefined;
  let fenceActive = false;
  let takeover = false;

  async function assertFence(): Promise<void> {
    if (!fenceActive) return;
    if ((await fingerprint(file)) === fence) return;
    takeover = true;
    throw new EmbeddedAttemptSessionTakeoverError(file);
  }

  async function releaseWithFence(): Promise<void> {
    if (held === undefined) return;
    const lock = held;
    held = undefined;
    fence = await fingerprint(file);
    fenceActive = true;
    await lock.release();
  }

  return {
    releaseForPrompt: releaseWithFence,
    releaseHeldLockForAbort: releaseWithFence,

    async reacquireAfterPrompt(): Promise<void> {
      if (takeover || held !== undefined) return;
      const lock = await acquire();
      held = lock;
      try {
        await assertFence();
      } catch (err) {
        held = undefined;
        await lock.release();
        throw err;
      }
    },

    async withSessionWriteLock<T>(run: () => Promise<T> | T): Promise<T> {
      if (takeover) throw new EmbeddedAttemptSessionTakeoverError(file);
      let lock = held;
      const owned = lock === undefined;
      if (lock === undefined) {
        try {
          lock = await acquire();
        } catch (err) {
          if (isLockTimeout(err)) takeover = true;
          throw err;
        }
      }
      try {
        await assertFence();
        const before = await fingerprint(file);
        try {
          return await run();
        } finally {
          const after = await fingerprint(file);
          if (!takeover && fenceActive && after !== before) fence = after;
        }
      } finally {
        if (owned) await lock.release();
      }
    },

    async acquireForCleanup(): Promise<Lock> {
      if (takeover) return noopLock;
      try {
        held ??= await acquire();
      } catch (err) {
        if (isLockTimeout(err)) {
          takeover = true;
          return noopLock;
        }
        throw err;
      }
      const lock = held;
      held = undefined;
      try {
        await assertFence();
      } catch (err) {
        await lock.release();
        if (err instanceof EmbeddedAttemptSessionTakeoverError) return noopLock;
        throw err;
      }
      return lock;
    },

    async dispose(): Promise<void> {
      const lock = held;
      held = undefined;
      await lock?.release();
    },

    hasSessionTakeover: () => takeover,
  };
}
