/**
 * A drop-in for OpenClaw's `acquireSessionWriteLock` (`src/agents/session-write-lock.ts`,
 * OpenClaw up to 2026.8), backed by sessionlane leases and, for processes not yet migrated,
 * OpenClaw's own `<sessionFile>.lock`:
 *
 *     import { createSessionWriteLocks } from 'sessionlane/openclaw';
 *     const { acquireSessionWriteLock } = createSessionWriteLocks({ lane: 'openclaw' });
 *
 *     const lock = await acquireSessionWriteLock({ sessionFile, timeoutMs: 60_000 });
 *     try { ... } finally { await lock.release(); }
 *
 * Same parameters, same result (`{ release() }`), and on timeout the same error its callers
 * test: `code` `OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT`, name `SessionWriteLockTimeoutError`,
 * message `session file locked (timeout <n>ms): <owner> <lockPath>`, the owner in OpenClaw's
 * form `pid=<n> alive=<bool> ageMs=<n>` read from the holder's lock file.
 *
 * An acquire, within one `timeoutMs` budget (default: `OPENCLAW_SESSION_WRITE_LOCK_ACQUIRE_TIMEOUT_MS`,
 * else 60 s):
 *
 * 1. creates the session file's directory, as OpenClaw does (`createDirectory: false` to refuse
 *    a missing one);
 * 2. takes a lease (a `prompt` lease at `interactive` priority, both configurable) on the
 *    service, in its queue with every other sessionlane writer. An unreachable or restarting
 *    service is retried (50 ms, growing to 1 s) until the budget runs out; then the timeout
 *    error names the service and carries the last error as `cause`. The budget bounds a
 *    connection riding out a lost service too (`reconnectForMs` is how long a held lock
 *    waits for its service to come back, never how long an acquire waits);
 * 3. then takes `<sessionFile>.lock` in OpenClaw's format with this process's pid and start
 *    time, waiting (50 ms polls) while a live OpenClaw process holds it: processes still on
 *    OpenClaw's lock wait for the drop-in, and the drop-in waits for them (the module
 *    `openclaw-lockfile`). Lease first, lock file second: two drop-ins never wait on each other
 *    crosswise. `lockFile: false` skips this step (a fleet fully migrated).
 *
 * What changes for callers: waiters are served in order and by priority rather than by
 * polling; `staleMs` only judges un-migrated lock files (the service knows who is alive: a dead
 * holder's connection drops and its lease goes); `maxHoldMs` is the lease's max hold, enforced
 * by the service, which tells the holder (the lock's `signal` aborts with a `LeaseRevoked`,
 * reason `max_hold`) and then lets the lock file go (so does a recovery that took the lease
 * once its grace ran out, reason `recovery`). A lease lost any other way (reason
 * `shutdown`, `actor_restart`, `connection_lost`) also aborts `signal` with a `LeaseRevoked`,
 * but the lock file stays until `release()`: the caller still believes it writes, so processes
 * on OpenClaw's lock keep waiting.
 *
 * Reentrancy is the lane's: with `allowReentrant: true`, an acquire of a file this object
 * already holds gets the same lease (nesting counted; each `release` undoes one level). Without
 * it (the default, as in OpenClaw), a second acquire waits for the first like any other writer.
 */

import { realpathSync } from 'node:fs';
import { lstat, mkdir, unlink } from 'node:fs/promises';
import { basename, dirname, resolve as resolvePath } from 'node:path';

import { DEFAULT_ADDRESS } from './address.js';
import { type ConnectOptions, type SessionLane, connect } from './client.js';
import { LeaseRevoked, LeaseTimeout, SessionLaneError, ShuttingDown, Unavailable } from './errors.js';
import type { Lease } from './lease.js';
import { acquireLockFile, describeOwner, readSnapshot, type HeldLockFile } from './openclaw-lockfile.js';
import type { Priority, Purpose } from './wire.js';
import './dispose.js';

/** The `code` OpenClaw's callers test for. */
export const SESSION_WRITE_LOCK_TIMEOUT_CODE = 'OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT';
/** OpenClaw's default acquire timeout (`session.writeLock.acquireTimeoutMs`). */
export const DEFAULT_ACQUIRE_TIMEOUT_MS = 60_000;
/** How long the locks ride out a restart of the service (`connectOptions.reconnectForMs`). */
export const DEFAULT_RECONNECT_FOR_MS = 60_000;
/** The environment variable OpenClaw reads for its acquire timeout. */
export const ACQUIRE_TIMEOUT_ENV = 'OPENCLAW_SESSION_WRITE_LOCK_ACQUIRE_TIMEOUT_MS';
/** How a lost lease may be typed: re-exported for callers of this module. */
export { LeaseRevoked, ShuttingDown, Unavailable };
/** The prompt-window integration for OpenClaw 2026.7/2026.8's attempt controller. */
export {
  holdAcrossPrompt,
  holdsAcrossPrompt,
  type PromptControllerParams,
  type PromptReleasingController,
} from './openclaw-prompt.js';
/** OpenClaw's lock-file protocol, for tools that read what the drop-in writes. */
export {
  describeOwner,
  parseLockPayload,
  processStartTime,
  readSnapshot as readLockSnapshot,
} from './openclaw-lockfile.js';
/** What `timeoutMs: Infinity` asks the service for (about 24.8 days, not its default). */
const FOREVER_MS = 2 ** 31 - 1;

/** Options of `createSessionWriteLocks`. */
export interface SessionWriteLocksOptions {
  /** The service (default `tcp://127.0.0.1:7420`). */
  address?: string;
  /** The lane name these locks use on the service (default `openclaw`). */
  lane?: string;
  /** The service's token, when it requires one. */
  token?: string;
  /** Lease priority (default `interactive`). */
  priority?: Priority;
  /** Lease purpose (default `prompt`: a whole turn, model wait included). */
  purpose?: Purpose;
  /**
   * Create the session file's directory before acquiring, as OpenClaw's lock does (default
   * true; false: the service refuses a file whose directory does not exist).
   */
  createDirectory?: boolean;
  /**
   * Also hold OpenClaw's `<sessionFile>.lock` while the lease is held, and wait for a live
   * OpenClaw holder of it first (default true: safe in a half-migrated fleet). Turn it off
   * only once no process uses OpenClaw's own lock any more.
   */
  lockFile?: boolean;
  /** The environment the acquire timeout is read from (default `process.env`). */
  env?: Readonly<Record<string, string | undefined>>;
  /** Further connection options (`client`, `keepaliveMs`, `timeoutMs`, `maxFrameBytes`). */
  connectOptions?: Omit<ConnectOptions, 'token'>;
}

/** The parameters of OpenClaw's `acquireSessionWriteLock`. */
export interface AcquireSessionWriteLockParams {
  sessionFile: string;
  /**
   * How long to wait in all (default: `OPENCLAW_SESSION_WRITE_LOCK_ACQUIRE_TIMEOUT_MS` when it
   * is a positive integer or `Infinity`, else 60 s; `Infinity` waits forever; non-positive:
   * the default).
   */
  timeoutMs?: number;
  /** When an un-migrated process's lock file counts as stale (default 30 min, as OpenClaw). */
  staleMs?: number;
  /** The lease's max hold (default: the service's `max_hold_ms`). */
  maxHoldMs?: number;
  /** Join a lease this object already holds on the file (nesting counted). Default false. */
  allowReentrant?: boolean;
}

/** A held session write lock (`await using lock = ...` releases it too). */
export interface SessionWriteLock extends AsyncDisposable {
  /** Release (one level of) the lock; a lock already lost or released is not an error. */
  release(): Promise<void>;
  /** The lease behind the lock (fence, appends, events). */
  readonly lease: Lease;
  /**
   * Aborts when a recovery asks the holder to finish (reason `AbortRequestedError`), or when
   * the lease is lost (reason `LeaseRevoked`, whose `reason` says how).
   */
  readonly signal: AbortSignal;
  /** The `<sessionFile>.lock` path (held while the lock is, unless `lockFile: false`). */
  readonly lockPath: string;
}

/** What `createSessionWriteLocks` returns. */
export interface SessionWriteLocks extends AsyncDisposable {
  acquireSessionWriteLock(params: AcquireSessionWriteLockParams): Promise<SessionWriteLock>;
  /** Close the connection (the service releases whatever it still holds). */
  close(): Promise<void>;
}

/** OpenClaw's timeout error, same name, code, fields and message. */
export class SessionWriteLockTimeoutError extends Error {
  readonly code = SESSION_WRITE_LOCK_TIMEOUT_CODE;
  readonly timeoutMs: number;
  readonly owner: string;
  readonly lockPath: string;

  constructor(params: { timeoutMs: number; owner: string; lockPath: string; cause?: unknown }) {
    super(
      `session file locked (timeout ${params.timeoutMs}ms): ${params.owner} ${params.lockPath}`,
      { cause: params.cause },
    );
    this.name = 'SessionWriteLockTimeoutError';
    this.timeoutMs = params.timeoutMs;
    this.owner = params.owner;
    this.lockPath = params.lockPath;
  }
}

/** True for a `SessionWriteLockTimeoutError`, or anything carrying its code (as OpenClaw's). */
export function isSessionWriteLockTimeoutError(err: unknown): boolean {
  return (
    err instanceof SessionWriteLockTimeoutError ||
    Boolean(
      err &&
      typeof err === 'object' &&
      (err as { code?: unknown }).code === SESSION_WRITE_LOCK_TIMEOUT_CODE,
    )
  );
}

/** The lane names one connection uses per file: one per concurrent acquire, reused. */
class LaneSlots {
  /** file -> lane name -> acquires using it (waiting or holding). */
  readonly #using = new Map<string, Map<string, number>>();
  /** file -> the lane that holds it (for reentrant acquires). */
  readonly #holder = new Map<string, string>();

  constructor(
    readonly sl: SessionLane,
    readonly base: string,
  ) {}

  /** The lane an acquire of `file` uses. */
  take(file: string, reentrant: boolean): string {
    let using = this.#using.get(file);
    if (using === undefined) this.#using.set(file, (using = new Map()));
    const held = this.#holder.get(file);
    let name: string;
    if (reentrant && held !== undefined) {
      name = held;
    } else {
      let n = 1;
      while (using.has((name = n === 1 ? this.base : `${this.base}#${n}`))) n += 1;
    }
    using.set(name, (using.get(name) ?? 0) + 1);
    return name;
  }

  granted(file: string, name: string): void {
    this.#holder.set(file, name);
  }

  /** One acquire of `file` on `name` is over (released, failed or given up). */
  done(file: string, name: string): void {
    const using = this.#using.get(file);
    if (using === undefined) return;
    const left = (using.get(name) ?? 1) - 1;
    if (left > 0) {
      using.set(name, left);
      return;
    }
    using.delete(name);
    if (this.#holder.get(file) === name) this.#holder.delete(file);
    if (using.size === 0) this.#using.delete(file);
  }
}

/**
 * Session write locks served by a sessionlane service, with OpenClaw's
 * `acquireSessionWriteLock` signature. One connection, opened at the first acquire and again
 * after it is lost.
 */
export function createSessionWriteLocks(options: SessionWriteLocksOptions = {}): SessionWriteLocks {
  const address = options.address ?? DEFAULT_ADDRESS;
  const base = options.lane ?? 'openclaw';
  const priority = options.priority ?? 'interactive';
  const purpose = options.purpose ?? 'prompt';
  let slots: Promise<LaneSlots> | null = null;
  let closed = false;

  const connected = (): Promise<LaneSlots> => {
    if (closed) return Promise.reject(new Unavailable('these session write locks were closed'));
    if (slots === null) {
      const opening = connect(address, {
        client: `openclaw:${process.pid}`,
        // A restart of the service is invisible: locks are reclaimed, waits go on.
        reconnectForMs: DEFAULT_RECONNECT_FOR_MS,
        // A first connect is tried once: the acquire retries it within its own budget.
        connectForMs: 0,
        ...options.connectOptions,
        token: options.token,
      }).then((sl) => new LaneSlots(sl, base));
      slots = opening;
      // A failed connect is not cached, nor is a connection once lost: the next acquire retries.
      opening.then(
        (made) => made.sl.once('close', () => slots === opening && (slots = null)),
        () => slots === opening && (slots = null),
      );
    }
    return slots;
  };

  async function acquireSessionWriteLock(
    params: AcquireSessionWriteLockParams,
  ): Promise<SessionWriteLock> {
    const timeoutMs = resolveAcquireTimeoutMs(params.timeoutMs, options.env ?? process.env);
    const deadline = Date.now() + timeoutMs;
    const maxHoldMs =
      params.maxHoldMs === undefined ? null : positiveMs(params.maxHoldMs, 0, false);
    if (options.createDirectory !== false) {
      await mkdir(dirname(resolvePath(params.sessionFile)), { recursive: true });
    }
    const file = normalizeSessionFile(params.sessionFile);
    const lockPath = `${file}.lock`;
    const timedOut = (owner: string, cause: unknown): SessionWriteLockTimeoutError =>
      new SessionWriteLockTimeoutError({ timeoutMs, owner, lockPath, cause });
    const existed = await exists(file);

    const { slots, name, lease } = await leaseWithin(file, params, {
      deadline,
      maxHoldMs,
      timedOut,
    });
    let lockFile: HeldLockFile | null = null;
    if (options.lockFile !== false) {
      let outcome;
      try {
        outcome = await acquireLockFile({
          lockPath,
          deadlineMs: deadline,
          timeoutMs,
          maxHoldMs: maxHoldMs === 0 ? null : maxHoldMs,
          staleMs: params.staleMs,
          lease: lease.id,
        });
      } catch (err) {
        await lease.release({ quiet: true }).catch(() => undefined);
        slots.done(file, name);
        throw err;
      }
      if ('timedOut' in outcome) {
        await lease.release({ quiet: true }).catch(() => undefined);
        slots.done(file, name);
        throw timedOut(outcome.owner, null);
      }
      lockFile = outcome.held;
    }
    if (!existed) await removeCreatedEmpty(file);
    slots.granted(file, name);
    const held = lease;
    const heldFile = lockFile;
    // The service took the lease away for the others' sake: let the lock file go too, as
    // OpenClaw's max-hold watchdog would. Lost otherwise, the file stays until release().
    const onLost = (): void => {
      if (held.revoked === 'max_hold' || held.revoked === 'recovery') void heldFile?.release();
    };
    held.signal.addEventListener('abort', onLost);
    let released = false;
    const release = async (): Promise<void> => {
      if (released) return;
      released = true;
      held.signal.removeEventListener('abort', onLost);
      try {
        await heldFile?.release();
      } finally {
        try {
          await held.release({ quiet: true });
        } finally {
          slots.done(file, name);
        }
      }
    };
    return { lease: held, signal: held.signal, lockPath, release, [Symbol.asyncDispose]: release };
  }

  /**
   * The lease on `file`, retrying an unreachable or restarting service until `deadline`; on
   * timeout, OpenClaw's error naming the holder (or the unreachable service).
   */
  async function leaseWithin(
    file: string,
    params: AcquireSessionWriteLockParams,
    budget: {
      deadline: number;
      maxHoldMs: number | null;
      timedOut: (owner: string, cause: unknown) => SessionWriteLockTimeoutError;
    },
  ): Promise<{ slots: LaneSlots; name: string; lease: Lease }> {
    for (let attempt = 1; ; attempt += 1) {
      let slots: LaneSlots;
      try {
        slots = await connected();
      } catch (err) {
        if (closed || !retryable(err)) throw err;
        await backoff(attempt, budget, err);
        continue;
      }
      const name = slots.take(file, params.allowReentrant === true);
      const waitMs = Math.max(1, Math.min(budget.deadline - Date.now(), FOREVER_MS));
      let lease: Lease | null;
      try {
        lease = await slots.sl.lane(name, { priority }).lease(file, {
          purpose,
          waitTimeoutMs: waitMs,
          maxHoldMs: budget.maxHoldMs === 0 ? null : budget.maxHoldMs,
          onContention: 'wait',
        });
      } catch (err) {
        slots.done(file, name);
        if (err instanceof LeaseTimeout && err.cause instanceof Unavailable) {
          // The budget ended while the connection rode out a lost service.
          throw budget.timedOut(`owner=unknown (sessionlane service unreachable at ${address})`, err);
        }
        if (err instanceof LeaseTimeout) {
          throw budget.timedOut(await describeHolder(slots.sl, file), err);
        }
        if (closed || !retryable(err)) throw err;
        await backoff(attempt, budget, err);
        continue;
      }
      if (lease === null) {
        slots.done(file, name); // cannot happen with onContention 'wait'
        throw new SessionLaneError('the service skipped a waiting acquire');
      }
      return { slots, name, lease };
    }
  }

  /** Wait before the next try, or throw the timeout error naming the unreachable service. */
  async function backoff(
    attempt: number,
    budget: {
      deadline: number;
      timedOut: (owner: string, cause: unknown) => SessionWriteLockTimeoutError;
    },
    err: unknown,
  ): Promise<void> {
    const left = budget.deadline - Date.now();
    if (left <= 0) {
      const why = err instanceof ShuttingDown ? 'shutting down' : 'unreachable';
      throw budget.timedOut(`owner=unknown (sessionlane service ${why} at ${address})`, err);
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(1000, 50 * attempt, left)));
  }

  async function close(): Promise<void> {
    closed = true;
    const current = slots;
    slots = null;
    if (current !== null) {
      const made = await current.catch(() => null);
      await made?.sl.close();
    }
  }

  return { acquireSessionWriteLock, close, [Symbol.asyncDispose]: close };
}

/**
 * The acquire budget: `timeoutMs` when positive (or Infinity), else the environment's
 * `OPENCLAW_SESSION_WRITE_LOCK_ACQUIRE_TIMEOUT_MS` (digits, or `Infinity`, as OpenClaw reads
 * it), else 60 s.
 */
export function resolveAcquireTimeoutMs(
  timeoutMs: number | undefined,
  env: Readonly<Record<string, string | undefined>> = process.env,
): number {
  const given = positiveMs(timeoutMs, 0, true);
  if (given > 0) return given;
  const raw = env[ACQUIRE_TIMEOUT_ENV]?.trim();
  if (raw === 'Infinity') return Infinity;
  if (raw !== undefined && /^\d+$/.test(raw)) {
    const value = Number(raw);
    if (Number.isSafeInteger(value) && value > 0) return value;
  }
  return DEFAULT_ACQUIRE_TIMEOUT_MS;
}

async function exists(file: string): Promise<boolean> {
  try {
    await lstat(file);
    return true;
  } catch {
    return false;
  }
}

/**
 * A lock-only acquire leaves no transcript behind: the service opens (so creates) the file it
 * serves, so when the file did not exist before the acquire and is still an empty regular file
 * now (under the lease and the lock file: nobody else writes it), it is removed again, and
 * OpenClaw sees what its own lock would have left (`hadSessionFile` false, no session store).
 * The service adopts the file's absence before its next write (it recreates it then).
 */
async function removeCreatedEmpty(file: string): Promise<void> {
  try {
    const st = await lstat(file);
    if (st.isFile() && st.size === 0) await unlink(file);
  } catch {
    // Already gone, or not ours to judge: leave it.
  }
}

/** A failure the acquire retries within its budget: the service is away or restarting. */
function retryable(err: unknown): boolean {
  return err instanceof Unavailable || err instanceof ShuttingDown;
}

/** OpenClaw's `resolvePositiveMs`: non-positive or not a number gives the fallback. */
function positiveMs(value: number | undefined, fallback: number, allowInfinity: boolean): number {
  if (typeof value !== 'number' || Number.isNaN(value) || value <= 0) return fallback;
  if (value === Infinity) return allowInfinity ? value : fallback;
  return value;
}

/** OpenClaw's normalization: the directory's realpath plus the file name. */
function normalizeSessionFile(sessionFile: string): string {
  const resolved = resolvePath(sessionFile);
  try {
    return `${realpathSync(dirname(resolved))}/${basename(resolved)}`;
  } catch {
    return resolved;
  }
}

/**
 * OpenClaw's owner text for the holder of `file`: every drop-in holder (and every process on
 * OpenClaw's own lock) keeps `<file>.lock` with its pid, so it is read from there;
 * `owner=unknown` when the holder is a sessionlane client without one.
 */
async function describeHolder(sl: SessionLane, file: string): Promise<string> {
  try {
    const snapshot = await readSnapshot(`${file}.lock`);
    if (snapshot?.payload?.pid != null) return describeOwner(snapshot);
  } catch {
    // The owner is only for the message.
  }
  try {
    const holder = (await sl.status(file)).files[0]?.holder;
    if (holder) return `owner=unknown (lane=${holder.lane} heldMs=${holder.heldMs})`;
  } catch {
    // As above.
  }
  return 'owner=unknown';
}
