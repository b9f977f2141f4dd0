/**
 * Lanes and leases: the shape of the Python client (`lane.lease(path)` -> a lease whose writes
 * carry its fence), with an `AbortSignal` and `Symbol.asyncDispose` for Node.
 *
 * One `LeaseState` per lease id on a connection; a reentrant grant (the same lane asking again
 * for a path it holds) gets its own `Lease` view of the shared state, so each level releases
 * exactly once and events reach every level.
 */

import { randomBytes } from 'node:crypto';

import { anchor } from './address.js';
import {
  AbortRequestedError,
  LeaseRevoked,
  NotHolder,
  SessionLaneError,
  StaleFence,
  Unavailable,
} from './errors.js';
import { appendPipelined, type PipelineOptions } from './pipeline.js';
import {
  checkRecords,
  type AppendResult,
  type Durability,
  type ExternalChangeKind,
  type OnContention,
  type Priority,
  type Purpose,
  type GrantedReply,
  type Reply,
  type TranscriptRecord,
} from './wire.js';
import { expectReply } from './replies.js';
import './dispose.js';

/** How a `LeaseState` reaches its views' listeners (module-private). */
const EMIT = Symbol('emit');

/** Why a lease is no longer held: a `revoked` event's reason, or what the client saw. */
export type LeaseLossReason =
  | 'max_hold'
  | 'recovery'
  | 'abandoned'
  | 'actor_restart'
  | 'shutdown'
  | 'member_lost'
  | 'stale_fence'
  | 'connection_lost'
  | 'connection_closed'
  | 'restart'
  | (string & {});

/** The `revoked` event of a lease. */
export interface RevokedEvent {
  readonly lease: string;
  readonly path: string;
  readonly reason: LeaseLossReason;
}

/** The `abort_requested` event: a recovery asks the holder to finish within `graceMs`. */
export interface AbortRequestedEvent {
  readonly lease: string;
  readonly path: string;
  readonly graceMs: number;
}

/** The `external_change` event: the file changed outside sessionlane; the turn goes on. */
export interface ExternalChangeEvent {
  readonly lease: string;
  readonly path: string;
  readonly kind: ExternalChangeKind;
}

/** The events a `Lease` emits, by name. */
export interface LeaseEvents {
  revoked: RevokedEvent;
  abort_requested: AbortRequestedEvent;
  external_change: ExternalChangeEvent;
}

/** Options of `Lane.lease`. */
export interface LeaseOptions {
  /** `prompt` (a whole turn, the default), `write`, `compaction` (may rewrite) or `recovery`. */
  purpose?: Purpose;
  /** Queue this long before `LeaseTimeout` (default 60 s); `null`: the service's default. */
  waitTimeoutMs?: number | null;
  /** Revoked (event `revoked`, reason `max_hold`) if held longer; default: the service's. */
  maxHoldMs?: number | null;
  /** `wait` (queue, the default), `fail` (`Contended` at once) or `skip` (resolve `null`). */
  onContention?: OnContention;
  /** Called with the 1-based queue position when the request has to wait. */
  onQueued?: (position: number) => void;
  /** Called for every `external_change` of the granted lease, from the first one on. */
  onExternalChange?: (event: ExternalChangeEvent) => void;
  /**
   * Give up waiting when this aborts: the promise rejects with the signal's reason at once,
   * and a grant that still comes is released as it arrives (as the Python client does for an
   * acquire its caller gave up). Already aborted: nothing is sent.
   */
  signal?: AbortSignal;
}

/** Options of the append methods. */
export interface AppendOptions {
  /** `fsync` (the default: durable before the reply) or `flush` (written to the OS). */
  durability?: Durability;
  /**
   * Append and release: once the records are durable the service releases this level of the
   * lease in the same step and hands the file to the next waiter; the lease then counts as
   * released (a later `release()` does nothing). If the append fails, nothing was released:
   * the lease is still held.
   */
  release?: boolean;
}

/** Options of a low-level request (`SessionLane.request`). */
export interface RequestOptions<T = Reply> {
  /** How long the service may take on its own (an acquire's wait); `null`: no limit. */
  timeoutMs?: number | null;
  /** Called with the queue position for each `queued` note. */
  onQueued?: (position: number) => void;
  /**
   * Turn the final (non-error) reply into the result, synchronously as it arrives: before any
   * event that follows it on the wire is applied (a grant is tracked before its events).
   */
  map?: (reply: Reply) => T;
  /** Stop waiting when this aborts (rejects with its reason); a late grant is released. */
  signal?: AbortSignal | undefined;
  /**
   * `false`: a lost connection fails it even when it could be sent again after a restart
   * (a pipeline resends its own appends, in order, one at a time).
   */
  resend?: boolean;
}

/** What a `Lane` and a `Lease` need from their connection (implemented by `SessionLane`). */
export interface LeaseHost {
  request<T = Reply>(
    type: string,
    fields: Record<string, unknown>,
    options?: RequestOptions<T>,
  ): Promise<T>;
  track(state: LeaseState): LeaseState;
  untrack(state: LeaseState): void;
  abandoned(leases: readonly string[]): void;
  /** The largest frame body the service takes (`maxFrameBytes`: a larger one is refused). */
  maxFrameBytes(): number;
  /**
   * `request` for a request of the lease `state`: one that waited for the connection to be
   * revived is sent only if the lease was taken back (else `LeaseRevoked`, nothing sent).
   */
  leaseRequest(
    state: LeaseState,
    type: string,
    fields: Record<string, unknown>,
    options?: RequestOptions,
  ): Promise<Reply>;
}

/** What the client knows about one lease, updated by events as they arrive. */
export class LeaseState {
  abortRequested = false;
  abortGraceMs: number | null = null;
  revoked: LeaseLossReason | null = null;
  readonly externalChanges: ExternalChangeKind[] = [];
  /** Every level of the lease was released. */
  released = false;
  /** Nesting depth: a reentrant grant shares this state and adds one. */
  holds = 0;
  readonly controller = new AbortController();
  readonly views = new Set<Lease>();
  /** The lane name holding it and its priority: a reclaim asks on the same name. */
  lane = '';
  priority: Priority = 'interactive';
  /** The reclaim secret of its `granted` (null: an older service; never reclaimed). */
  secret: string | null = null;
  /** The connection ended (a service restart?): reclaimed before the next write. */
  suspended = false;

  constructor(
    readonly lease: string,
    readonly path: string,
    readonly fence: number,
    readonly purpose: Purpose,
  ) {}

  /** The lease is gone (first reason wins): abort the signal, tell every view. */
  revoke(reason: LeaseLossReason): void {
    if (this.revoked !== null || this.released) return;
    this.revoked = reason;
    this.controller.abort(
      new LeaseRevoked(`lease ${this.lease} was revoked (${reason})`, { path: this.path, reason }),
    );
    const event: RevokedEvent = { lease: this.lease, path: this.path, reason };
    for (const view of this.views) view[EMIT]('revoked', event);
  }

  requestAbort(graceMs: number): void {
    this.abortRequested = true;
    this.abortGraceMs = graceMs;
    if (!this.controller.signal.aborted) {
      this.controller.abort(new AbortRequestedError(this.lease, this.path, graceMs));
    }
    const event: AbortRequestedEvent = { lease: this.lease, path: this.path, graceMs };
    for (const view of this.views) view[EMIT]('abort_requested', event);
  }

  externalChange(kind: ExternalChangeKind): void {
    this.externalChanges.push(kind);
    const event: ExternalChangeEvent = { lease: this.lease, path: this.path, kind };
    for (const view of this.views) view[EMIT]('external_change', event);
  }

  checkUsable(): void {
    if (this.revoked !== null) {
      throw new LeaseRevoked(
        `lease ${this.lease} was revoked (${this.revoked}); nothing was written`,
        { path: this.path, reason: this.revoked },
      );
    }
    if (this.released) {
      throw new LeaseRevoked(`lease ${this.lease} was released`, {
        path: this.path,
        reason: 'released',
      });
    }
  }
}

/** A named lane on one connection. The same name on two connections is two lanes. */
export class Lane {
  readonly #host: LeaseHost;

  /** Not for direct use: `SessionLane.lane(name, { priority })` makes lanes. */
  constructor(
    host: LeaseHost,
    readonly name: string,
    readonly priority: Priority,
  ) {
    this.#host = host;
  }

  /**
   * Ask for a lease on `path`. Resolves with the `Lease`, or `null` when `onContention` is
   * `skip` and the path is busy. Rejects with `LeaseTimeout`, `Contended`, `PathNotAllowed`,
   * `QueueFull`, `TooManyFiles`, `ShuttingDown`, `Unavailable`... (all `SessionLaneError`).
   * The same lane asking again for a path it holds gets the same lease (nesting counted).
   */
  async lease(path: string, options: LeaseOptions = {}): Promise<Lease | null> {
    const wait = options.waitTimeoutMs === undefined ? 60_000 : options.waitTimeoutMs;
    const maxHold = options.maxHoldMs ?? null;
    return this.#host.request<Lease | null>(
      'acquire',
      {
        lane: this.name,
        path: anchor(path),
        purpose: options.purpose ?? 'prompt',
        priority: this.priority,
        wait_timeout_ms: wait === null ? undefined : Math.max(0, Math.floor(wait)),
        max_hold_ms: maxHold === null ? undefined : Math.max(1, Math.floor(maxHold)),
        on_contention: options.onContention ?? 'wait',
      },
      {
        timeoutMs: wait,
        onQueued: options.onQueued,
        signal: options.signal,
        map: (reply) => {
          if (reply.type === 'skipped') return null;
          const lease = grantedLease(this.#host, reply, this.name, this.priority);
          if (options.onExternalChange !== undefined) {
            lease.on('external_change', options.onExternalChange);
          }
          return lease;
        },
      },
    );
  }

  /** A short write without a lease: queued like a `write` lease, never interleaved. */
  append(path: string, ...records: TranscriptRecord[]): Promise<AppendResult> {
    return this.appendRecords(path, records);
  }

  /** `append` with options. */
  async appendRecords(
    path: string,
    records: readonly TranscriptRecord[],
    options: AppendOptions = {},
  ): Promise<AppendResult> {
    checkRecords(records);
    const reply = await this.#host.request('append', {
      lane: this.name,
      path: anchor(path),
      records,
      durability: options.durability,
    });
    return appendResult(reply);
  }

  /** Drop this lane's leases and queued requests (on `path` only, if given); their ids. */
  async abandon(path?: string | null, options: { reason?: string } = {}): Promise<string[]> {
    const reply = await this.#host.request('abandon', {
      lane: this.name,
      path: path ? anchor(path) : undefined,
      reason: options.reason,
    });
    const { leases } = expectReply(reply, 'abandoned');
    this.#host.abandoned(leases);
    return [...leases];
  }
}

type Listener<E extends keyof LeaseEvents> = (event: LeaseEvents[E]) => void;

/**
 * A granted lease. Writes carry its fence; a revoked lease refuses to write (nothing is sent).
 *
 * `signal` aborts when a recovery asks the holder to finish (reason: `AbortRequestedError`)
 * or when the lease is lost (reason: `LeaseRevoked`). `await using lease = await lane.lease(p)`
 * releases it at the end of the block.
 */
export class Lease implements AsyncDisposable {
  readonly #host: LeaseHost;
  readonly #state: LeaseState;
  #levelReleased = false;
  readonly #listeners: { readonly [E in keyof LeaseEvents]: Set<Listener<E>> } = {
    revoked: new Set(),
    abort_requested: new Set(),
    external_change: new Set(),
  };

  /** Not for direct use: leases come from `Lane.lease` and `SessionLane.recover`. */
  constructor(
    host: LeaseHost,
    state: LeaseState,
    readonly lane: string,
  ) {
    this.#host = host;
    this.#state = state;
    state.views.add(this);
  }

  /** The lease id. */
  get id(): string {
    return this.#state.lease;
  }

  /** The fence every write carries; strictly increasing per path. */
  get fence(): number {
    return this.#state.fence;
  }

  /** The canonical path. */
  get path(): string {
    return this.#state.path;
  }

  get purpose(): Purpose {
    return this.#state.purpose;
  }

  /** Aborted on `abort_requested` and when the lease is lost, with the reason. */
  get signal(): AbortSignal {
    return this.#state.controller.signal;
  }

  /** A recovery asked this holder to finish or release. */
  get abortRequested(): boolean {
    return this.#state.abortRequested;
  }

  /** The grace the recovery gave, in ms, once `abortRequested`. */
  get abortGraceMs(): number | null {
    return this.#state.abortGraceMs;
  }

  /** Why the lease was lost (`max_hold`, `recovery`, `connection_lost`, ...), or null. */
  get revoked(): LeaseLossReason | null {
    return this.#state.revoked;
  }

  /** The kinds of the `external_change` events seen so far. */
  get externalChanges(): readonly ExternalChangeKind[] {
    return [...this.#state.externalChanges];
  }

  /** This level was released (other levels of a nested lease may still hold). */
  get released(): boolean {
    return this.#levelReleased;
  }

  /** Listen to `revoked`, `abort_requested` or `external_change`. */
  on<E extends keyof LeaseEvents>(event: E, listener: Listener<E>): this {
    this.#listeners[event].add(listener);
    return this;
  }

  off<E extends keyof LeaseEvents>(event: E, listener: Listener<E>): this {
    this.#listeners[event].delete(listener);
    return this;
  }

  [EMIT]<E extends keyof LeaseEvents>(event: E, payload: LeaseEvents[E]): void {
    const listeners: Set<Listener<E>> = this.#listeners[event];
    for (const listener of [...listeners]) {
      try {
        listener(payload);
      } catch (err) {
        // A listener's bug must not stop the connection's reader: report it as Node does.
        process.nextTick(() => {
          throw err;
        });
      }
    }
  }

  /** Append records durably under this lease, all or nothing. */
  append(...records: TranscriptRecord[]): Promise<AppendResult> {
    return this.appendRecords(records);
  }

  /** `append` with options. */
  async appendRecords(
    records: readonly TranscriptRecord[],
    options: AppendOptions = {},
  ): Promise<AppendResult> {
    const release = checkRelease(options.release);
    this.#checkUsable();
    checkRecords(records);
    const reply = await this.#call('append', {
      lease: this.id,
      fence: this.fence,
      records,
      durability: options.durability,
      // An append id: resent after a service restart, the append is not written twice.
      aid: randomBytes(8).toString('hex'),
      release: release ? true : undefined,
    });
    const result = appendResult(reply);
    if (release) this.#releasedByAppend();
    return result;
  }

  /** The service released this level with an append (append and release). */
  #releasedByAppend(): void {
    if (this.#levelReleased) return;
    this.#levelReleased = true;
    this.#state.views.delete(this);
    this.#host.untrack(this.#state);
  }

  /**
   * Append the records, up to `window` of them in flight at once, in groups (one append of up
   * to a quarter of the window each, written all or nothing). Written in order and
   * acknowledged in order: resolves with one result per record. If one fails, none after it
   * is written (the service refuses them, each naming the one before it): rejects with
   * `PipelineBroken`, whose `written`, `failed`, `unknown` and `cause` say which records were.
   * A lost connection ridden out (`reconnectForMs`) takes the lease back and sends the
   * unanswered appends again, one at a time (their append ids answer the ones already
   * written), then goes on with the window. `release`: the last append also releases this
   * level of the lease once durable (append and release); a pipeline that stops before it
   * leaves the lease held.
   */
  async appendPipelined(
    records: readonly TranscriptRecord[],
    options: PipelineOptions = {},
  ): Promise<AppendResult[]> {
    const release = checkRelease(options.release);
    const results = await appendPipelined(
      {
        id: this.id,
        fence: this.fence,
        path: this.path,
        state: this.#state,
        checkUsable: () => this.#checkUsable(),
        send: (fields) =>
          this.#host.leaseRequest(this.#state, 'append', fields, { resend: false }),
        maxFrameBytes: this.#host.maxFrameBytes(),
      },
      records,
      options,
    );
    if (release && records.length > 0) this.#releasedByAppend();
    return results;
  }

  /** Replace the whole file atomically (compaction leases); resolves with the line count. */
  async rewrite(records: readonly TranscriptRecord[]): Promise<number> {
    this.#checkUsable();
    checkRecords(records);
    const reply = await this.#call('rewrite', { lease: this.id, fence: this.fence, records });
    return expectReply(reply, 'rewritten').lines;
  }

  /**
   * Release one level of the lease. `quiet`: a lease already lost (revoked, connection gone,
   * not held) is not an error. Releasing twice is a no-op.
   */
  async release(options: { quiet?: boolean } = {}): Promise<void> {
    if (this.#levelReleased) return;
    this.#levelReleased = true;
    const quiet = options.quiet ?? false;
    try {
      if (quiet && this.#state.revoked !== null) return;
      this.#state.checkUsable();
      await this.#call('release', { lease: this.id });
    } catch (err) {
      const lost =
        err instanceof NotHolder || err instanceof LeaseRevoked || err instanceof Unavailable;
      if (!(quiet && lost)) throw err;
    } finally {
      this.#state.views.delete(this);
      this.#host.untrack(this.#state);
    }
  }

  /** `await using`: release quietly at the end of the block. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.release({ quiet: true });
  }

  toString(): string {
    return `Lease(${this.id}, path=${this.path}, fence=${this.fence}, purpose=${this.purpose})`;
  }

  #checkUsable(): void {
    if (this.#levelReleased) {
      throw new LeaseRevoked(`lease ${this.id} was released`, {
        path: this.path,
        reason: 'released',
      });
    }
    this.#state.checkUsable();
  }

  async #call(type: string, fields: Record<string, unknown>): Promise<Reply> {
    try {
      return await this.#host.leaseRequest(this.#state, type, fields);
    } catch (err) {
      if (err instanceof StaleFence) {
        this.#state.revoke('stale_fence');
      } else if (err instanceof Unavailable && this.#state.revoked !== null) {
        // The connection went (its lanes die with it): the lease is lost, not just late.
        throw new LeaseRevoked(`lease ${this.id} lost: ${err.detail}`, {
          path: this.path,
          reason: this.#state.revoked,
        });
      }
      if (err instanceof SessionLaneError && err.path === null) {
        throw withPath(err, this.path);
      }
      throw err;
    }
  }
}

/** Track a `granted` reply on `host` and return a view of it for `lane`. */
export function grantedLease(
  host: LeaseHost,
  reply: Reply,
  lane: string,
  priority: Priority,
): Lease {
  const granted: GrantedReply = expectReply(reply, 'granted');
  const fresh = new LeaseState(granted.lease, granted.path, granted.fence, granted.purpose);
  fresh.lane = lane;
  fresh.priority = priority;
  fresh.secret = granted.secret;
  const state = host.track(fresh);
  return new Lease(host, state, lane);
}

function checkRelease(release: unknown): boolean {
  if (release !== undefined && typeof release !== 'boolean') {
    throw new TypeError(`release must be a boolean, got ${String(release)}`);
  }
  return release === true;
}

function appendResult(reply: Reply): AppendResult {
  const { offset, lines, fence } = expectReply(reply, 'appended');
  return { offset, lines, fence };
}

function withPath(err: SessionLaneError, path: string): SessionLaneError {
  const cls = err.constructor as new (
    detail: string,
    options: {
      path: string;
      code: SessionLaneError['code'];
      cause: unknown;
      reason?: string | null;
    },
  ) => SessionLaneError;
  // A LeaseRevoked (UnknownOutcome, StaleFence) keeps its reason.
  const reason = err instanceof LeaseRevoked ? { reason: err.reason } : {};
  return new cls(err.detail, { path, code: err.code, cause: err.cause, ...reason });
}
