/**
 * One connection to a sessionlane service: `connect()` resolves to a `SessionLane`.
 *
 *     const sl = await connect('tcp://127.0.0.1:7420');
 *     const lane = sl.lane('agent:main', { priority: 'interactive' });
 *     {
 *       await using lease = await lane.lease('/srv/sessions/a.jsonl');
 *       await lease?.append({ type: 'message', text: 'hi' });
 *     }
 *     await sl.close();
 *
 * While idle the client sends a `keepalive` (every 5 s by default), so the service does not
 * take it for gone. When the connection is lost, every pending call rejects with
 * `Unavailable` and every lease on it is revoked (its signal aborts, its next write raises
 * `LeaseRevoked` and sends nothing): the service has abandoned them. There is no automatic
 * reconnection beyond that; connect again (`reconnectForMs` keeps a connect trying while the
 * service is not listening yet, as the Python client's `reconnect_for` does). With
 * `reconnectForMs`, a restart of the service is ridden out too: the client reconnects for that
 * long, takes its leases back (same lease, same fence: their signals do not abort), and sends
 * again the acquires still waiting and the appends and releases whose answers were lost
 * (appends carry an id, so none is written twice); calls made meanwhile wait for it.
 *
 * The socket keeps the process alive only while a call is pending or a lease is held: an idle
 * connection holding nothing does not stop a script from exiting.
 *
 * Why one module of about 1,050 lines: a `SessionLane` is one connection's state (socket,
 * pending requests, leases), and the revival after a restart swaps the socket under that
 * state; what the revival decides without touching it is in `reclaim.ts`.
 */

import net from 'node:net';
import { EventEmitter } from 'node:events';

import { anchor, defaultAddress, parseAddress, type Target } from './address.js';
import {
  LeaseRevoked,
  LeaseTimeout,
  StaleFence,
  SessionLaneError,
  Unauthorized,
  Unavailable,
  UnknownOutcome,
  errorFor,
} from './errors.js';
import {
  acquireBudget,
  awaitWithin,
  budgetFields,
  reclaimFields,
  resendable,
  waitedFields,
} from './reclaim.js';
import {
  Lane,
  grantedLease,
  type Lease,
  type LeaseHost,
  type LeaseState,
  type RequestOptions,
} from './lease.js';
import {
  DEFAULT_MAX_FRAME_BYTES,
  FrameReader,
  PROTOCOL_VERSION,
  frame,
  type Priority,
  type Purpose,
  type Reply,
  type ServiceEvent,
  type StatusReply,
} from './wire.js';
import {
  clientProof,
  newNonce,
  resolveServiceUser,
  serverProofMatches,
  serviceOwner,
  serviceRefusal,
} from './trust.js';
import './dispose.js';

/** Options of `connect`. */
export interface ConnectOptions {
  /**
   * The shared secret from the service's `token_file` (when it requires one). It is never sent:
   * the client and the service prove they know it (`docs/protocol.md`, "Token proof").
   */
  token?: string;
  /**
   * Who must run the service: a uid, a user name, or `'*'` for anyone. By default, without a
   * token, this process's user (checked on the connected socket before anything is sent);
   * with a token, nobody in particular (the service's proof of the token decides). See
   * `docs/security-clients.md`.
   */
  serviceUser?: number | string;
  /** A name for the service's diagnostics; default `node:<pid>`. */
  client?: string;
  /** Keepalive period while idle, in ms (default 5000; 0 disables). */
  keepaliveMs?: number;
  /** How long connecting, or a reply beyond the service's own waits, may take (ms; 40000). */
  timeoutMs?: number;
  /**
   * How long (ms) a connect keeps trying while nobody listens at the address (a service
   * starting or restarting: refused, no socket file, reset), backing off from 50 ms to 1 s,
   * as the Python client's `reconnect_for` (default 0: one attempt). Once connected, how long
   * a lost connection is ridden out: a restarted service gives the leases back.
   */
  reconnectForMs?: number;
  /**
   * How long (ms) the first connect keeps trying while nobody listens (default:
   * `reconnectForMs`). A caller that retries within its own budget (the OpenClaw drop-in)
   * sets it to 0 and keeps `reconnectForMs` for the restarts of a service once connected.
   */
  connectForMs?: number;
  /** Called before each retry of a refused connect, with the refusal and the wait (ms). */
  onRetry?: (error: Error, delayMs: number) => void;
  /**
   * Largest frame sent or accepted (default 8 MiB, the service's default). A frame from the
   * service announcing more is refused before it is read: the connection closes (`TooLarge`).
   */
  maxFrameBytes?: number;
}

/** One transcript in a `status` report. */
export interface FileStatus {
  readonly path: string;
  readonly fence: number;
  readonly holder: {
    readonly lane: string;
    readonly lease: string;
    readonly purpose: Purpose;
    readonly heldMs: number;
  } | null;
  readonly queue: readonly {
    readonly lane: string;
    readonly purpose: Purpose;
    readonly priority: Priority;
    readonly waitedMs: number;
  }[];
  readonly counters: Readonly<Record<string, number>>;
}

/** Holders, queues, fences and counters (`SessionLane.status`). */
export interface StatusReport {
  readonly files: readonly FileStatus[];
}

/**
 * The events of a `SessionLane`: `event` (every event message as it came: `revoked`,
 * `abort_requested`, `external_change`) and `close` (the connection is gone; the reason).
 */
export interface SessionLaneEvents {
  event: [message: ServiceEvent];
  close: [reason: string];
}

type SessionLaneListener<E extends keyof SessionLaneEvents> = (
  ...args: SessionLaneEvents[E]
) => void;

// Typed listeners without relying on a generic EventEmitter in the consumer's @types/node.
export interface SessionLane {
  on<E extends keyof SessionLaneEvents>(event: E, listener: SessionLaneListener<E>): this;
  once<E extends keyof SessionLaneEvents>(event: E, listener: SessionLaneListener<E>): this;
  off<E extends keyof SessionLaneEvents>(event: E, listener: SessionLaneListener<E>): this;
}

/** How long a reply may take beyond the service's own waits, unless told otherwise. */
const DEFAULT_TIMEOUT_MS = 40_000;
/** A pause between reconnect attempts; it keeps the process alive (a call is waiting). */
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const MAX_TIMER_MS = 2_147_483_647;

interface Pending {
  readonly type: string;
  /** The request as sent (sent again after a service restart, when that is safe). */
  fields: Record<string, unknown>;
  /** When it was first sent (ms). */
  readonly sentAt: number;
  /** A hello, proof or reclaim of a revival: fails with its connection, never sent again. */
  readonly revival: boolean;
  /** May be sent again after a restart if safe (false: its caller resends, as a pipeline). */
  readonly resend: boolean;
  readonly path: string | null;
  /** When an acquire's own wait ends (ms; null: none): it bounds a ride-out too. */
  readonly budgetEnd: number | null;
  readonly resolve: (value: unknown) => void;
  readonly reject: (error: Error) => void;
  readonly onQueued: ((position: number) => void) | undefined;
  readonly map: ((reply: Reply) => unknown) | undefined;
  readonly timer: NodeJS.Timeout | undefined;
  /** Stops listening to the caller's signal. */
  readonly unlisten: (() => void) | undefined;
}

/**
 * Connect, check who runs the service, and say hello. Rejects with `Unavailable` (refused at
 * once) or `Unauthorized` (the service is not the expected user's, or did not prove the token,
 * or refused us); nothing is sent to a service that fails its checks.
 */
export async function connect(
  address: string = defaultAddress(),
  options: ConnectOptions = {},
): Promise<SessionLane> {
  const socket = await dialService(address, options);
  const sl = new SessionLane(address, socket, options);
  try {
    sl.server = await handshake(address, options, (type, fields) => sl.request(type, fields));
  } catch (err) {
    await sl.close();
    throw err;
  }
  return sl;
}

/** Milliseconds before each new look at the owner of the service's end (about 0.2 s in all). */
const OWNER_LOOKUP_DELAYS_MS = [1, 2, 5, 10, 20, 50, 100];

/**
 * A connected socket to the service at `address`, its owner checked: rejects `Unavailable`
 * (nobody listens, after `reconnectForMs` of retries) or `Unauthorized` (another user's).
 */
async function dialService(address: string, options: ConnectOptions): Promise<net.Socket> {
  const target = parseAddress(address);
  const serviceUser = resolveServiceUser(options.serviceUser);
  const token = options.token === undefined ? undefined : options.token.trim();
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const socket = await dialWithin(target, timeoutMs, options).catch((err: unknown) => {
    const why = err instanceof Error ? err.message : String(err);
    throw new Unavailable(`cannot reach sessionlane at ${address}: ${why}`, { cause: err });
  });
  if ('host' in target) socket.setNoDelay(true);
  const lookOwner = (): number | null =>
    serviceOwner(
      target,
      { address: socket.localAddress, port: socket.localPort },
      { address: socket.remoteAddress, port: socket.remotePort },
    );
  let owner = lookOwner();
  // The service's end of a TCP connection shows its owner only once the kernel has processed
  // the client's last handshake packet, which on a busy machine can come just after
  // `connect` resolved: look again, briefly, before calling the owner unknown. Nothing
  // listens on the socket meanwhile: an error it gets (a reset) is kept, never thrown at
  // the process as an unhandled 'error' event.
  let lost: Error | undefined;
  const keep = (err: Error): void => {
    lost = err;
  };
  socket.on('error', keep);
  try {
    for (const delayMs of OWNER_LOOKUP_DELAYS_MS) {
      if (owner !== null || lost || !('host' in target) || process.platform !== 'linux') break;
      await new Promise((resolve) => setTimeout(resolve, delayMs));
      owner = lookOwner();
    }
  } finally {
    socket.off('error', keep);
  }
  if (lost || socket.destroyed) {
    socket.destroy();
    const why = lost ? lost.message : 'the connection closed';
    throw new Unavailable(`cannot reach sessionlane at ${address}: ${why}`, { cause: lost });
  }
  const refusal = serviceRefusal(address, owner, token, serviceUser);
  if (refusal !== null) {
    socket.destroy();
    throw new Unauthorized(refusal);
  }
  return socket;
}

/** How the handshake sends a request and awaits its reply. */
type Ask = (type: string, fields: Record<string, unknown>) => Promise<Reply>;

/**
 * Say hello on a socket whose owner was checked; with a token, prove it and check the
 * service's proof. Resolves with the service's name (`welcome`'s `server`).
 */
async function handshake(address: string, options: ConnectOptions, ask: Ask): Promise<string> {
  const token = options.token === undefined ? undefined : options.token.trim();
  const nonce = token === undefined ? undefined : newNonce();
  const hello = { client: options.client ?? `node:${process.pid}`, nonce };
  let welcome = await ask('hello', hello).catch((err: unknown) => {
    if (nonce !== undefined && err instanceof SessionLaneError && /nonce/.test(err.message)) {
      throw new Unauthorized(
        `the service at ${address} is older than this client: it does not take the token` +
          ` proof (${err.message}); upgrade the service (this client never sends the token)`,
      );
    }
    throw err;
  });
  let challenge: Uint8Array | undefined;
  if (welcome.type === 'challenge') {
    if (token === undefined || nonce === undefined) {
      throw new Unauthorized(
        `the service at ${address} requires a token (it has a token_file): pass { token }`,
      );
    }
    challenge = welcome.nonce;
    welcome = await ask('proof', { proof: clientProof(token, nonce, challenge) });
  }
  if (welcome.type !== 'welcome') {
    throw new Unauthorized(`the service at ${address} answered the hello with ${welcome.type}`);
  }
  if (token !== undefined && nonce !== undefined) {
    if (challenge === undefined) {
      throw new Unauthorized(
        `the service at ${address} did not ask for the token proof: it has no token_file, or` +
          ' it is not the service; nothing was sent (connect without the token if the' +
          ' service has none)',
      );
    }
    if (!serverProofMatches(welcome.proof ?? undefined, token, nonce, challenge)) {
      throw new Unauthorized(
        `the service at ${address} did not prove it knows the token: it is not the service,` +
          ' or its token_file holds another token; nothing was sent',
      );
    }
  }
  if (welcome.protocol !== PROTOCOL_VERSION) {
    throw new Unavailable(
      `the service at ${address} speaks protocol ${welcome.protocol}, not ${PROTOCOL_VERSION}`,
    );
  }
  return welcome.server;
}

/** Connect failures worth retrying: nobody listening yet (as the Python client's). */
const RETRYABLE = new Set(['ECONNREFUSED', 'ENOENT', 'ECONNRESET']);

/**
 * A connected socket to `target`, retrying a refusal for `reconnectForMs` with the Python
 * client's backoff (50 ms doubling to 1 s); rejects with the last socket error.
 */
async function dialWithin(
  target: Target,
  timeoutMs: number,
  options: ConnectOptions,
): Promise<net.Socket> {
  const deadline = Date.now() + Math.max(0, options.connectForMs ?? options.reconnectForMs ?? 0);
  for (let delay = 50; ; delay = Math.min(1_000, delay * 2)) {
    try {
      return await dial(target, timeoutMs);
    } catch (err) {
      const code = err instanceof Error && 'code' in err ? err.code : undefined;
      const retry = typeof code === 'string' && RETRYABLE.has(code);
      if (!retry || !(err instanceof Error) || Date.now() + delay > deadline) throw err;
      options.onRetry?.(err, delay);
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

/** One attempt: a connected socket, or the socket's error. */
function dial(target: Target, timeoutMs: number): Promise<net.Socket> {
  return new Promise<net.Socket>((resolve, reject) => {
    const socket = net.createConnection(target);
    const refused = (err: Error): void => {
      clearTimeout(timer);
      reject(err);
    };
    // A host that drops the SYN would otherwise keep us for the kernel's minutes.
    const timer = setTimeout(() => {
      socket.destroy(new Error(`no connection within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('error', refused);
    socket.once('connect', () => {
      clearTimeout(timer);
      const self =
        socket.remotePort !== undefined &&
        socket.localPort === socket.remotePort &&
        socket.localAddress === socket.remoteAddress;
      if (self) {
        // A connect to a loopback port nobody listens on met itself (the kernel picked that
        // port for our end): a refusal, retried like one. Reset, not closed, so no TIME_WAIT
        // keeps the port the restarting service needs.
        socket.resetAndDestroy();
        reject(Object.assign(new Error('connected to itself: nothing listens there'), {
          code: 'ECONNREFUSED',
        }));
        return;
      }
      socket.off('error', refused);
      resolve(socket);
    });
  });
}

/** One connection to a sessionlane service. Create it with `connect()`. */
// eslint-disable-next-line @typescript-eslint/no-unsafe-declaration-merging
export class SessionLane extends EventEmitter implements AsyncDisposable {
  /** The service's name and version, from its `welcome`. */
  server: string | null = null;
  #socket: net.Socket;
  readonly #options: ConnectOptions;
  /** While the connection is being revived after a loss: what calls made meanwhile await. */
  #reviving: Promise<void> | null = null;
  readonly #reader: FrameReader;
  readonly #maxFrameBytes: number;
  readonly #timeoutMs: number;
  readonly #pending = new Map<number, Pending>();
  /** Acquires whose caller stopped waiting: a grant that still comes is released at once. */
  readonly #orphans = new Set<number>();
  readonly #leases = new Map<string, LeaseState>();
  readonly #keepalive: NodeJS.Timeout | undefined;
  #nextId = 0;
  #lastSent = Date.now();
  #closed = false;
  /** The detail of an `error` the service sent without an id (it closes the connection next). */
  #farewell = '';
  /** Why the connection under revival was lost (for the errors of calls that stop waiting). */
  #lostBecause = '';
  /** What this connection's lanes and leases use (kept off the public surface). */
  readonly #host: LeaseHost = {
    request: (type, fields, options) => this.request(type, fields, options),
    track: (state) => this.#track(state),
    untrack: (state) => this.#untrack(state),
    abandoned: (leases) => this.#abandoned(leases),
    maxFrameBytes: () => this.#maxFrameBytes,
    leaseRequest: (state, type, fields, options) =>
      this.#leaseRequest(state, type, fields, options),
  };

  /** Not for direct use: `connect()` makes connections. */
  constructor(
    readonly address: string,
    socket: net.Socket,
    options: ConnectOptions,
  ) {
    super();
    this.#options = options;
    this.#socket = socket;
    this.#maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    this.#reader = new FrameReader(this.#maxFrameBytes);
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#attach(socket);
    const period = options.keepaliveMs ?? 5_000;
    if (period > 0) {
      // The service hears from us only when we send: keep alive by what we sent, not by
      // what we received (a holder fed events may send nothing for long).
      // Checked twice a period, so the service never hears nothing for more than 1.5.
      this.#keepalive = setInterval(
        () => {
          if (!this.#closed && this.#reviving === null && Date.now() - this.#lastSent >= period) {
            this.request('keepalive', {}).catch(() => undefined);
          }
        },
        Math.max(1, Math.floor(period / 2)),
      );
      this.#keepalive.unref();
    }
  }

  /** Read from `socket`; what it reports counts only while it is the current one. */
  #attach(socket: net.Socket): void {
    socket.unref();
    socket.on('data', (chunk: Buffer) => socket === this.#socket && this.#onData(chunk));
    socket.on('error', (err) => {
      if (socket === this.#socket) this.#lost(`connection error: ${err.message}`);
    });
    socket.on('close', () => {
      if (socket !== this.#socket) return;
      this.#lost(`connection closed by the service${this.#farewell ? `: ${this.#farewell}` : ''}`);
    });
  }

  /** The connection is gone (closed by either side or lost). */
  get closed(): boolean {
    return this.#closed;
  }

  /** A lane of this connection (created on the service at its first request). */
  lane(name: string, options: { priority?: Priority } = {}): Lane {
    return new Lane(this.#host, name, options.priority ?? 'interactive');
  }

  /**
   * Take a recovery lease on `path`: the holder is asked to abort (`abort_requested`), and
   * revoked if it has not released within `graceMs` (default 5000); then this is granted.
   */
  recover(
    path: string,
    options: { reason?: string; graceMs?: number; lane?: string } = {},
  ): Promise<Lease> {
    const graceMs = Math.max(0, Math.floor(options.graceMs ?? 5_000));
    const lane = options.lane ?? 'recovery';
    return this.request(
      'recover',
      { lane, path: anchor(path), reason: options.reason ?? 'stuck', grace_ms: graceMs },
      {
        timeoutMs: graceMs,
        map: (reply) => grantedLease(this.#host, reply, lane, 'recovery'),
      },
    );
  }

  /** Holders, queues, fences and counters, for `path` or every active file. */
  status(path?: string | null): Promise<StatusReport> {
    return this.request('status', { path: path ? anchor(path) : undefined }, { map: statusReport });
  }

  /** Close the connection: the service abandons every lease held on it. */
  async close(): Promise<void> {
    const socket = this.#socket;
    const closed = new Promise<void>((resolve) =>
      socket.destroyed ? resolve() : socket.once('close', () => resolve()),
    );
    this.#lost('closed by the client', 'connection_closed');
    socket.end();
    socket.destroySoon();
    await closed;
  }

  /** `await using sl = await connect()`: close at the end of the block. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /**
   * Low level: send `{type, ...fields}` with a fresh id and resolve with its final reply
   * (`queued` notes go to `onQueued`); an `error` reply rejects with its `SessionLaneError`
   * subclass. Fields are snake_case, as on the wire (`docs/protocol.md`).
   */
  request<T = Reply>(
    type: string,
    fields: Record<string, unknown>,
    options: RequestOptions<T> = {},
  ): Promise<T> {
    if (this.#closed) {
      return Promise.reject(new Unavailable('the connection is closed'));
    }
    const reviving = this.#reviving;
    if (reviving !== null) {
      // The service restarted: wait for the next connection (and the reclaims) first.
      // An acquire waits no longer than its own wait: LeaseTimeout, nothing sent.
      const budget = acquireBudget(type, options.timeoutMs);
      const expired = (): Error => this.#outOfBudget(budget ?? 0, fields);
      return awaitWithin(reviving, budget, options.signal, expired, abortReason).then((left) =>
        left === null
          ? this.request(type, fields, options)
          : this.request(type, budgetFields(fields, left), { ...options, timeoutMs: left }),
      );
    }
    return this.#send(type, fields, options);
  }

  /** What an acquire whose wait ended while the service was away gets. */
  #outOfBudget(budgetMs: number, fields: Record<string, unknown>): LeaseTimeout {
    const path = typeof fields['path'] === 'string' ? fields['path'] : null;
    const away = new Unavailable(
      `cannot reach sessionlane at ${this.address}: ${this.#lostBecause}; still reconnecting`,
    );
    return new LeaseTimeout(
      `not granted within ${Math.round(budgetMs)} ms: the service was away (${this.#lostBecause})`,
      { path, cause: away },
    );
  }

  /**
   * A request of the lease `state`: after a revival, only if its reclaim was granted (a
   * refused one revoked it, reason `restart`: `LeaseRevoked`, and nothing reaches the service).
   */
  #leaseRequest(
    state: LeaseState,
    type: string,
    fields: Record<string, unknown>,
    options: RequestOptions = {},
  ): Promise<Reply> {
    const reviving = this.#reviving;
    if (reviving !== null && !this.#closed) {
      return reviving.then(() => {
        state.checkUsable();
        return this.#leaseRequest(state, type, fields, options);
      });
    }
    return this.request(type, fields, options);
  }

  /** Send now, on the current connection (`revival`: a revival's own hello or reclaim). */
  #send<T = Reply>(
    type: string,
    fields: Record<string, unknown>,
    options: RequestOptions<T> = {},
    revival = false,
  ): Promise<T> {
    if (this.#closed) {
      return Promise.reject(new Unavailable('the connection is closed'));
    }
    const signal = options.signal;
    if (signal?.aborted) return Promise.reject(abortReason(signal));
    const id = ++this.#nextId;
    let bytes: Buffer;
    try {
      bytes = frame({ v: PROTOCOL_VERSION, type, id, ...fields }, this.#maxFrameBytes);
    } catch (err) {
      return Promise.reject(
        err instanceof SessionLaneError ? err : errorFor('invalid_record', String(err)),
      );
    }
    const wait = options.timeoutMs === undefined ? 0 : options.timeoutMs;
    const limit = wait === null ? null : wait + this.#timeoutMs;
    const path = typeof fields['path'] === 'string' ? fields['path'] : null;
    const budget = acquireBudget(type, options.timeoutMs);
    const map = options.map;
    return new Promise<T>((resolve, reject) => {
      const timer =
        limit === null || limit > MAX_TIMER_MS
          ? undefined
          : setTimeout(() => this.#noReply(id, type, limit), limit).unref();
      let unlisten: (() => void) | undefined;
      if (signal !== undefined) {
        const onAbort = (): void => this.#givenUp(id, abortReason(signal));
        signal.addEventListener('abort', onAbort, { once: true });
        unlisten = () => signal.removeEventListener('abort', onAbort);
      }
      this.#pending.set(id, {
        type,
        fields,
        sentAt: Date.now(),
        revival,
        resend: options.resend ?? true,
        path,
        budgetEnd: budget === null ? null : Date.now() + budget,
        // Without `map`, T is the reply itself (the default type argument).
        resolve: (value) => resolve(value as T),
        reject,
        onQueued: options.onQueued,
        map,
        timer,
        unlisten,
      });
      this.#refresh();
      this.#lastSent = Date.now();
      this.#socket.write(bytes);
    });
  }

  /** Record a grant; a reentrant grant of a tracked lease shares its state. */
  #track(state: LeaseState): LeaseState {
    const known = this.#leases.get(state.lease);
    if (known !== undefined) {
      known.holds += 1;
      return known;
    }
    if (this.#closed) {
      state.revoke('connection_lost');
      return state;
    }
    state.holds = 1;
    this.#leases.set(state.lease, state);
    this.#refresh();
    return state;
  }

  /** One level of `state` was released (or given up); the last one forgets it. */
  #untrack(state: LeaseState): void {
    state.holds -= 1;
    if (state.holds > 0) return;
    state.released = true;
    if (this.#leases.get(state.lease) === state) this.#leases.delete(state.lease);
    this.#refresh();
  }

  /** The service confirmed an `abandon`: those leases are gone. */
  #abandoned(leases: readonly string[]): void {
    for (const id of leases) {
      const state = this.#leases.get(id);
      this.#leases.delete(id);
      state?.revoke('abandoned');
    }
    this.#refresh();
  }

  #noReply(id: number, type: string, limit: number): void {
    this.#givenUp(id, new Unavailable(`no reply to ${type} within ${Math.round(limit / 1000)} s`));
  }

  /**
   * The caller of request `id` stopped waiting (no reply in time, or its signal aborted):
   * it rejects with `error` now, and a grant that still comes is released as it arrives.
   */
  #givenUp(id: number, error: unknown): void {
    const pending = this.#pending.get(id);
    if (pending === undefined) return;
    this.#settled(id);
    if (pending.type === 'acquire' || pending.type === 'recover') this.#orphans.add(id);
    pending.reject(error instanceof Error ? error : new Error(String(error)));
  }

  #settled(id: number): void {
    const pending = this.#pending.get(id);
    if (pending === undefined) return;
    if (pending.timer !== undefined) clearTimeout(pending.timer);
    pending.unlisten?.();
    this.#pending.delete(id);
    this.#refresh();
  }

  /** Keep the process alive while a call is pending or a lease is held; only then. */
  #refresh(): void {
    const busy = this.#pending.size > 0 || this.#leases.size > 0;
    if (busy && !this.#closed) this.#socket.ref();
    else this.#socket.unref();
  }

  #onData(chunk: Buffer): void {
    let messages: Reply[];
    let failure: unknown = null;
    try {
      messages = this.#reader.feed(chunk);
    } catch (err) {
      messages = [];
      failure = err;
    }
    if (failure !== null) {
      // A bad frame ends the connection: the reader is spent, and what follows is unframed.
      this.#socket.destroy();
      const why = failure instanceof Error ? failure.message : String(failure);
      this.#lost(`bad data from the service (${why})`, 'connection_lost', failure);
      return;
    }
    for (const message of messages) {
      if (this.#closed) return;
      this.#deliver(message);
    }
  }

  #deliver(message: Reply): void {
    if (message.id === null) {
      switch (message.type) {
        case 'revoked':
        case 'abort_requested':
        case 'external_change':
          this.#onEvent(message);
          return;
        case 'error':
          this.#onEvent({ ...message, id: null });
          return;
        default:
          return; // a reply nobody asked for: nothing to do
      }
    }
    const id = message.id;
    if (typeof id !== 'number') return; // not one of ours: ids are this connection's numbers
    const pending = this.#pending.get(id);
    if (pending === undefined) {
      if (this.#orphans.has(id) && message.type !== 'queued') {
        this.#orphans.delete(id);
        if (message.type === 'granted') {
          this.request('release', { lease: message.lease }).catch(() => undefined);
        }
      }
      return;
    }
    if (message.type === 'queued') {
      pending.onQueued?.(message.position);
      return;
    }
    if (
      message.type === 'error' &&
      message.code === 'shutting_down' &&
      pending.type === 'acquire' &&
      this.#reconnectForMs() > 0
    ) {
      return; // the service is stopping: sent again to the next one, once this connection ends
    }
    this.#settled(id);
    if (message.type === 'error') {
      pending.reject(errorFor(message.code, message.detail, message.path ?? pending.path));
      return;
    }
    try {
      pending.resolve(pending.map === undefined ? message : pending.map(message));
    } catch (err) {
      pending.reject(err instanceof Error ? err : new Error(String(err)));
    }
  }

  #onEvent(message: ServiceEvent): void {
    switch (message.type) {
      case 'revoked': {
        const state = this.#leases.get(message.lease);
        if (message.reason === 'shutdown' && state?.secret && this.#reconnectForMs() > 0) {
          state.suspended = true; // a stopping service keeps it for the next one to give back
          break;
        }
        this.#leases.delete(message.lease);
        state?.revoke(message.reason);
        this.#refresh();
        break;
      }
      case 'abort_requested':
        this.#leases.get(message.lease)?.requestAbort(message.grace_ms);
        break;
      case 'external_change':
        this.#leases.get(message.lease)?.externalChange(message.kind);
        break;
      case 'error':
        this.#farewell = `${message.code}: ${message.detail}`;
        break;
    }
    this.emit('event', message);
  }

  #reconnectForMs(): number {
    return this.#options.reconnectForMs ?? 0;
  }

  #lost(reason: string, leaseReason = 'connection_lost', cause?: unknown): void {
    if (this.#closed) return;
    if (this.#reviving !== null) {
      // The connection of a revival went too: its hello or reclaims fail, the revival retries.
      for (const [id, pending] of [...this.#pending.entries()]) {
        if (!pending.revival) continue;
        this.#settled(id);
        pending.reject(new Unavailable(`${reason} before the ${pending.type} reply`, { cause }));
      }
      if (leaseReason === 'connection_closed') this.#end(reason, leaseReason, cause);
      return;
    }
    if (leaseReason === 'connection_lost' && this.#reconnectForMs() > 0) {
      this.#lostBecause = reason;
      this.#reviving = this.#revive(reason);
      return;
    }
    this.#end(reason, leaseReason, cause);
  }

  /**
   * The connection was lost and `reconnectForMs` asks to ride it out: what can be taken back
   * waits (leases with a reclaim secret, requests safe to send again), the rest fails now;
   * then reconnect, reclaim, send again. If no service answers in time, end as without it.
   */
  async #revive(reason: string): Promise<void> {
    for (const [id, pending] of [...this.#pending.entries()]) {
      if (pending.resend && resendable(pending.type, pending.fields)) continue;
      this.#settled(id);
      pending.reject(lostBeforeReply(pending, reason, 'connection_lost'));
    }
    for (const state of [...this.#leases.values()]) {
      if (state.secret !== null) {
        state.suspended = true;
      } else {
        this.#leases.delete(state.lease);
        state.revoke('connection_lost');
      }
    }
    // An acquire waiting in the service when it went waits no longer than its own wait.
    const budgets: NodeJS.Timeout[] = [];
    for (const [id, pending] of this.#pending) {
      const left = pending.budgetEnd === null ? null : pending.budgetEnd - Date.now();
      if (left === null || left > MAX_TIMER_MS) continue;
      const timer = setTimeout(() => {
        this.#givenUp(id, this.#outOfBudget(pending.budgetEnd! - pending.sentAt, pending.fields));
      }, Math.max(0, left));
      budgets.push(timer);
    }
    try {
      await this.#reconnectAndReclaim(reason);
    } finally {
      for (const timer of budgets) clearTimeout(timer);
    }
  }

  /** The revival's loop: reconnect, reclaim, resend, until `reconnectForMs` has passed. */
  async #reconnectAndReclaim(reason: string): Promise<void> {
    const deadline = Date.now() + this.#reconnectForMs();
    let delay = 50;
    let why = reason;
    while (!this.#closed) {
      try {
        const socket = await dialService(this.address, {
          ...this.#options,
          connectForMs: 0,
          reconnectForMs: 0,
        });
        if (this.#closed) {
          socket.destroy();
          return;
        }
        this.#reader.reset();
        this.#socket = socket;
        this.#attach(socket);
        const ask: Ask = (type, fields) => this.#send(type, fields, {}, true);
        this.server = await handshake(this.address, this.#options, ask);
        const refused = await this.#reclaimAll();
        this.#resendPending(refused);
        this.#reviving = null;
        this.#refresh();
        return;
      } catch (err) {
        why = `${reason}; reconnecting: ${(err as Error).message}`;
        // Even a refusal is retried until the deadline: a service still starting may not be
        // found the owner of its socket yet.
        if (this.#closed || Date.now() + delay > deadline) break;
        await sleep(delay);
        delay = Math.min(1_000, delay * 2);
      }
    }
    this.#reviving = null;
    this.#end(why, 'connection_lost');
  }

  /**
   * Take every suspended lease back (same lease and fence), or revoke it (`restart`): the
   * leases refused, by id.
   */
  async #reclaimAll(): Promise<Map<string, LeaseState>> {
    const refused = new Map<string, LeaseState>();
    for (const state of [...this.#leases.values()]) {
      if (!state.suspended || state.secret === null) continue;
      try {
        await this.#send('acquire', reclaimFields(state), {}, true);
        state.suspended = false;
      } catch (err) {
        if (err instanceof Unavailable) throw err; // the new connection went too: again
        this.#leases.delete(state.lease);
        state.suspended = false;
        state.revoke('restart');
        refused.set(state.lease, state);
      }
    }
    return refused;
  }

  /**
   * Send again, on the new connection, what was in flight and is safe to repeat; what a
   * `refused` lease had in flight fails instead (`LeaseRevoked`, reason `restart`).
   */
  #resendPending(refused: ReadonlyMap<string, LeaseState>): void {
    const now = Date.now();
    for (const [id, pending] of [...this.#pending.entries()]) {
      const lease = pending.fields['lease'];
      const lost = typeof lease === 'string' ? refused.get(lease) : undefined;
      if (lost !== undefined && pending.type === 'append' && pending.fields['release'] === true) {
        // An append that releases may have released its lease itself before the restart: the
        // service answers it as written if so. Refused (`stale_fence`), the lease was lost,
        // and the append may still be in the file (the lease record keeps only the file's
        // last appends that released; the next holder may have released since): its outcome
        // is unknown, never "not written".
        this.#pending.set(id, {
          ...pending,
          reject: (err: Error) =>
            pending.reject(
              err instanceof StaleFence
                ? new UnknownOutcome(
                    `lease ${lost.lease} lost: the restarted service refused its reclaim ` +
                      'before the append reply: read the file to know',
                    { path: lost.path, reason: 'restart' },
                  )
                : err,
            ),
        });
      } else if (lost !== undefined) {
        this.#settled(id);
        const why =
          `lease ${lost.lease} lost: the restarted service refused its reclaim before the ` +
          `${pending.type} reply`;
        // A write that was sent may be in the file (a refusal can mean it changed since the
        // lease record): its outcome is unknown, never "not written".
        const write = pending.type === 'append' || pending.type === 'rewrite';
        pending.reject(
          write
            ? new UnknownOutcome(`${why}: read the file to know`, {
                path: lost.path,
                reason: 'restart',
              })
            : new LeaseRevoked(why, { path: lost.path, reason: 'restart' }),
        );
        continue;
      }
      if (pending.type === 'acquire') {
        pending.fields = waitedFields(pending.fields, now - pending.sentAt);
      }
      this.#lastSent = now;
      const bytes = frame(
        { v: PROTOCOL_VERSION, type: pending.type, id, ...pending.fields },
        this.#maxFrameBytes,
      );
      this.#socket.write(bytes);
    }
  }

  #end(reason: string, leaseReason: string, cause?: unknown): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#keepalive !== undefined) clearInterval(this.#keepalive);
    const pending = [...this.#pending.entries()];
    for (const [id] of pending) this.#settled(id);
    const leases = [...this.#leases.values()];
    this.#leases.clear();
    this.#refresh();
    // Leases first: a caller woken by the rejection must already see its lease revoked.
    for (const state of leases) state.revoke(leaseReason);
    for (const [, waiter] of pending) {
      waiter.reject(lostBeforeReply(waiter, reason, leaseReason, cause));
    }
    this.emit('close', reason);
  }
}

/**
 * What a request whose connection ended before its reply gets: a write (`append`, `rewrite`)
 * was sent and may be in the file (`UnknownOutcome`, never "not written"; under a lease, with
 * the lease's `reason`); anything else is `Unavailable`. As the Python client.
 */
function lostBeforeReply(
  pending: Pick<Pending, 'type' | 'fields' | 'path'>,
  reason: string,
  leaseReason: string,
  cause?: unknown,
): SessionLaneError {
  if (pending.type === 'append' || pending.type === 'rewrite') {
    const underLease = typeof pending.fields['lease'] === 'string';
    return new UnknownOutcome(
      `${reason} before the ${pending.type} reply: it may or may not be in the file, read it to know`,
      { cause, path: pending.path, reason: underLease ? leaseReason : null },
    );
  }
  return new Unavailable(`${reason} before the ${pending.type} reply`, { cause });
}

function statusReport(reply: Reply): StatusReport {
  if (reply.type !== 'status') {
    throw errorFor('bad_frame', `the service answered a status with ${reply.type}`);
  }
  return {
    files: reply.files.map((file: StatusReply['files'][number]) => ({
      path: file.path,
      fence: file.fence,
      holder:
        file.holder === null
          ? null
          : {
              lane: file.holder.lane,
              lease: file.holder.lease,
              purpose: file.holder.purpose,
              heldMs: file.holder.held_ms,
            },
      queue: file.queue.map((entry) => ({
        lane: entry.lane,
        purpose: entry.purpose,
        priority: entry.priority,
        waitedMs: entry.waited_ms,
      })),
      counters: file.counters,
    })),
  };
}

/** Why `signal` aborted, as an `Error` (an `AbortError` if its reason is none). */
function abortReason(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  if (reason instanceof Error) return reason;
  return new DOMException(
    reason === undefined ? 'This operation was aborted' : String(reason),
    'AbortError',
  );
}
