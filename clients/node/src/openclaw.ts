/**
 * A drop-in for OpenClaw's `acquireSessionWriteLock` (`src/agents/session-write-lock.ts`),
 * backed by sessionlane leases instead of `<sessionFile>.lock` files:
 *
 *     import { createSessionWriteLocks } from 'sessionlane/openclaw';
 *     const { acquireSessionWriteLock } = createSessionWriteLocks({ lane: 'openclaw' });
 *
 *     const lock = await acquireSessionWriteLock({ sessionFile, timeoutMs: 60_000 });
 *     try { ... } finally { await lock.release(); }
 *
 * Same parameters, same result (`{ release() }`), and on timeout the same error shape its
 * callers test: `code` `OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT`, name
 * `SessionWriteLockTimeoutError`, message `session file locked (timeout <n>ms): <owner>
 * <lockPath>`. What changes: the lease is a `prompt` lease at `interactive` priority (both
 * configurable); waiters are served in order rather than by polling; `staleMs` is accepted and
 * ignored (the service knows who is alive: a dead holder's connection drops and its lease goes);
 * `maxHoldMs` is the lease's max hold, enforced by the service, which tells the holder (the
 * lock's `signal` aborts) instead of releasing behind its back. No `.lock` file is written.
 *
 * Reentrancy is the lane's: with `allowReentrant: true`, an acquire of a file this object
 * already holds gets the same lease (nesting counted; each `release` undoes one level). Without
 * it (the default, as in OpenClaw), a second acquire waits for the first like any other writer.
 */

import { realpathSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { basename, dirname, resolve as resolvePath } from 'node:path';

import { DEFAULT_ADDRESS } from './address.js';
import { type ConnectOptions, type SessionLane, connect } from './client.js';
import { LeaseTimeout, SessionLaneError, Unavailable } from './errors.js';
import type { Lease } from './lease.js';
import type { Priority, Purpose } from './wire.js';
import './dispose.js';

/** The `code` OpenClaw's callers test for. */
export const SESSION_WRITE_LOCK_TIMEOUT_CODE = 'OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT';
/** OpenClaw's default acquire timeout (`session.writeLock.acquireTimeoutMs`). */
export const DEFAULT_ACQUIRE_TIMEOUT_MS = 60_000;
/** How long the locks ride out a restart of the service (`connectOptions.reconnectForMs`). */
export const DEFAULT_RECONNECT_FOR_MS = 60_000;
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
   * false: the service refuses a file whose directory does not exist, and nothing is created).
   */
  createDirectory?: boolean;
  /** Further connection options (`client`, `keepaliveMs`, `timeoutMs`, `maxFrameBytes`). */
  connectOptions?: Omit<ConnectOptions, 'token'>;
}

/** The parameters of OpenClaw's `acquireSessionWriteLock`. */
export interface AcquireSessionWriteLockParams {
  sessionFile: string;
  /** How long to wait (default 60 s; `Infinity` waits forever; non-positive: the default). */
  timeoutMs?: number;
  /** Accepted and ignored: the service knows whether the holder is alive. */
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
  /** Aborts when a recovery asks the holder to finish, or when the lease is lost. */
  readonly signal: AbortSignal;
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
    const timeoutMs = positiveMs(params.timeoutMs, DEFAULT_ACQUIRE_TIMEOUT_MS, true);
    const maxHoldMs =
      params.maxHoldMs === undefined ? null : positiveMs(params.maxHoldMs, 0, false);
    if (options.createDirectory === true) {
      await mkdir(dirname(resolvePath(params.sessionFile)), { recursive: true });
    }
    const file = normalizeSessionFile(params.sessionFile);
    const owner = await connected();
    const name = owner.take(file, params.allowReentrant === true);
    let lease: Lease | null;
    try {
      lease = await owner.sl.lane(name, { priority }).lease(file, {
        purpose,
        waitTimeoutMs: Math.min(timeoutMs, FOREVER_MS),
        maxHoldMs: maxHoldMs === 0 ? null : maxHoldMs,
        onContention: 'wait',
      });
    } catch (err) {
      owner.done(file, name);
      if (err instanceof LeaseTimeout) {
        throw new SessionWriteLockTimeoutError({
          timeoutMs,
          owner: await describeHolder(owner.sl, file),
          lockPath: `${err.path ?? file}.lock`,
          cause: err,
        });
      }
      throw err;
    }
    if (lease === null) {
      owner.done(file, name); // cannot happen with onContention 'wait'
      throw new SessionLaneError('the service skipped a waiting acquire');
    }
    owner.granted(file, name);
    const held = lease;
    let released = false;
    const release = async (): Promise<void> => {
      if (released) return;
      released = true;
      try {
        await held.release({ quiet: true });
      } finally {
        owner.done(file, name);
      }
    };
    return { lease: held, signal: held.signal, release, [Symbol.asyncDispose]: release };
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

async function describeHolder(sl: SessionLane, file: string): Promise<string> {
  try {
    const holder = (await sl.status(file)).files[0]?.holder;
    if (holder) return `lane=${holder.lane} lease=${holder.lease} heldMs=${holder.heldMs}`;
  } catch {
    // The owner is only for the message.
  }
  return 'owner=unknown';
}
