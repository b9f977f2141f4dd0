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
 * reconnection; connect again.
 *
 * The socket keeps the process alive only while a call is pending or a lease is held: an idle
 * connection holding nothing does not stop a script from exiting.
 */

import net from 'node:net';
import { EventEmitter } from 'node:events';

import { DEFAULT_ADDRESS, anchor, parseAddress } from './address.js';
import { SessionLaneError, Unauthorized, Unavailable, errorFor } from './errors.js';
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
  type ExternalChangeKind,
  type Priority,
  type Purpose,
  type WireMessage,
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
  /** Largest frame sent or accepted (default 8 MiB, the service's default). */
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
  event: [message: WireMessage];
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
const MAX_TIMER_MS = 2_147_483_647;

interface Pending {
  readonly type: string;
  readonly path: string | null;
  readonly resolve: (value: unknown) => void;
  readonly reject: (error: Error) => void;
  readonly onQueued: ((position: number) => void) | undefined;
  readonly map: ((reply: WireMessage) => unknown) | undefined;
  readonly timer: NodeJS.Timeout | undefined;
}

/**
 * Connect, check who runs the service, and say hello. Rejects with `Unavailable` (refused at
 * once) or `Unauthorized` (the service is not the expected user's, or did not prove the token,
 * or refused us); nothing is sent to a service that fails its checks.
 */
export async function connect(
  address: string = DEFAULT_ADDRESS,
  options: ConnectOptions = {},
): Promise<SessionLane> {
  const target = parseAddress(address);
  const serviceUser = resolveServiceUser(options.serviceUser);
  const token = options.token === undefined ? undefined : options.token.trim();
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const socket = await new Promise<net.Socket>((resolve, reject) => {
    const socket = net.createConnection(target);
    const refused = (err: Error): void => {
      clearTimeout(timer);
      reject(new Unavailable(`cannot reach sessionlane at ${address}: ${err.message}`));
    };
    // A host that drops the SYN would otherwise keep us for the kernel's minutes.
    const timer = setTimeout(() => {
      socket.destroy(new Error(`no connection within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('error', refused);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.off('error', refused);
      resolve(socket);
    });
  });
  if ('host' in target) socket.setNoDelay(true);
  const owner = serviceOwner(
    target,
    { address: socket.localAddress, port: socket.localPort },
    { address: socket.remoteAddress, port: socket.remotePort },
  );
  const refusal = serviceRefusal(address, owner, token, serviceUser);
  if (refusal !== null) {
    socket.destroy();
    throw new Unauthorized(refusal);
  }
  const sl = new SessionLane(address, socket, options);
  try {
    const nonce = token === undefined ? undefined : newNonce();
    let welcome = await sl
      .request('hello', { client: options.client ?? `node:${process.pid}`, nonce })
      .catch((err: unknown) => {
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
      const theirs = welcome['nonce'];
      if (!(theirs instanceof Uint8Array)) {
        throw new Unauthorized(`the service at ${address} sent a malformed challenge`);
      }
      challenge = theirs;
      welcome = await sl.request('proof', { proof: clientProof(token, nonce, challenge) });
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
      if (!serverProofMatches(welcome['proof'], token, nonce, challenge)) {
        throw new Unauthorized(
          `the service at ${address} did not prove it knows the token: it is not the service,` +
            ' or its token_file holds another token; nothing was sent',
        );
      }
    }
    if (welcome['protocol'] !== PROTOCOL_VERSION) {
      throw new Unavailable(
        `the service at ${address} speaks protocol ${String(welcome['protocol'])},` +
          ` not ${PROTOCOL_VERSION}`,
      );
    }
    sl.server = typeof welcome['server'] === 'string' ? welcome['server'] : null;
  } catch (err) {
    await sl.close();
    throw err;
  }
  return sl;
}

/** One connection to a sessionlane service. Create it with `connect()`. */
// eslint-disable-next-line @typescript-eslint/no-unsafe-declaration-merging
export class SessionLane extends EventEmitter implements AsyncDisposable {
  /** The service's name and version, from its `welcome`. */
  server: string | null = null;
  readonly #socket: net.Socket;
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
  #closedPromise: Promise<void>;
  /** The detail of an `error` the service sent without an id (it closes the connection next). */
  #farewell = '';
  /** What this connection's lanes and leases use (kept off the public surface). */
  readonly #host: LeaseHost = {
    request: (type, fields, options) => this.request(type, fields, options),
    track: (state) => this.#track(state),
    untrack: (state) => this.#untrack(state),
    abandoned: (leases) => this.#abandoned(leases),
  };

  /** Not for direct use: `connect()` makes connections. */
  constructor(
    readonly address: string,
    socket: net.Socket,
    options: ConnectOptions,
  ) {
    super();
    this.#socket = socket;
    this.#maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    this.#reader = new FrameReader(Math.max(this.#maxFrameBytes, 64 * 1024 * 1024));
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.#closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.unref();
    socket.on('data', (chunk: Buffer) => this.#onData(chunk));
    socket.on('error', (err) => this.#lost(`connection error: ${err.message}`));
    socket.on('close', () =>
      this.#lost(`connection closed by the service${this.#farewell ? `: ${this.#farewell}` : ''}`),
    );
    const period = options.keepaliveMs ?? 5_000;
    if (period > 0) {
      // The service hears from us only when we send: keep alive by what we sent, not by
      // what we received (a holder fed events may send nothing for long).
      // Checked twice a period, so the service never hears nothing for more than 1.5.
      this.#keepalive = setInterval(
        () => {
          if (!this.#closed && Date.now() - this.#lastSent >= period) {
            this.request('keepalive', {}).catch(() => undefined);
          }
        },
        Math.max(1, Math.floor(period / 2)),
      );
      this.#keepalive.unref();
    }
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
      { timeoutMs: graceMs, map: (reply) => grantedLease(this.#host, reply, lane) },
    );
  }

  /** Holders, queues, fences and counters, for `path` or every active file. */
  status(path?: string | null): Promise<StatusReport> {
    return this.request('status', { path: path ? anchor(path) : undefined }, { map: statusReport });
  }

  /** Close the connection: the service abandons every lease held on it. */
  async close(): Promise<void> {
    this.#lost('closed by the client', 'connection_closed');
    this.#socket.end();
    this.#socket.destroySoon();
    await this.#closedPromise;
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
  request<T = WireMessage>(
    type: string,
    fields: Record<string, unknown>,
    options: RequestOptions<T> = {},
  ): Promise<T> {
    if (this.#closed) {
      return Promise.reject(new Unavailable('the connection is closed'));
    }
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
    return new Promise<T>((resolve, reject) => {
      const timer =
        limit === null || limit > MAX_TIMER_MS
          ? undefined
          : setTimeout(() => this.#noReply(id, type, limit), limit).unref();
      this.#pending.set(id, {
        type,
        path,
        resolve: resolve as (value: unknown) => void,
        reject,
        onQueued: options.onQueued,
        map: options.map as ((reply: WireMessage) => unknown) | undefined,
        timer,
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
    const pending = this.#pending.get(id);
    if (pending === undefined) return;
    this.#settled(id);
    if (type === 'acquire' || type === 'recover') this.#orphans.add(id);
    pending.reject(new Unavailable(`no reply to ${type} within ${Math.round(limit / 1000)} s`));
  }

  #settled(id: number): void {
    const pending = this.#pending.get(id);
    if (pending === undefined) return;
    if (pending.timer !== undefined) clearTimeout(pending.timer);
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
    let messages: WireMessage[];
    try {
      messages = this.#reader.feed(chunk);
    } catch (err) {
      this.#socket.destroy();
      this.#lost(`undecodable data from the service: ${(err as Error).message}`);
      return;
    }
    for (const message of messages) {
      if (this.#closed) return;
      this.#deliver(message);
    }
  }

  #deliver(message: WireMessage): void {
    if (message.id === undefined || message.id === null) {
      this.#onEvent(message);
      return;
    }
    const id = message.id as number;
    const pending = this.#pending.get(id);
    if (pending === undefined) {
      if (this.#orphans.has(id) && message.type !== 'queued') {
        this.#orphans.delete(id);
        if (message.type === 'granted') {
          this.request('release', { lease: message['lease'] }).catch(() => undefined);
        }
      }
      return;
    }
    if (message.type === 'queued') {
      pending.onQueued?.(message['position'] as number);
      return;
    }
    this.#settled(id);
    if (message.type === 'error') {
      const path = typeof message['path'] === 'string' ? message['path'] : pending.path;
      pending.reject(errorFor(String(message['code']), String(message['detail'] ?? ''), path));
      return;
    }
    try {
      pending.resolve(pending.map === undefined ? message : pending.map(message));
    } catch (err) {
      pending.reject(err as Error);
    }
  }

  #onEvent(message: WireMessage): void {
    const state = this.#leases.get(message['lease'] as string);
    switch (message.type) {
      case 'revoked':
        this.#leases.delete(message['lease'] as string);
        state?.revoke(message['reason'] as string);
        this.#refresh();
        break;
      case 'abort_requested':
        state?.requestAbort(message['grace_ms'] as number);
        break;
      case 'external_change':
        state?.externalChange(message['kind'] as ExternalChangeKind);
        break;
      case 'error':
        this.#farewell = `${String(message['code'])}: ${String(message['detail'] ?? '')}`;
        break;
      default:
        break;
    }
    this.emit('event', message);
  }

  #lost(reason: string, leaseReason = 'connection_lost'): void {
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
      waiter.reject(new Unavailable(`${reason} before the ${waiter.type} reply`));
    }
    this.emit('close', reason);
  }
}

function statusReport(reply: WireMessage): StatusReport {
  const files = (reply['files'] as Record<string, unknown>[] | undefined) ?? [];
  return {
    files: files.map((file) => {
      const holder = file['holder'] as Record<string, unknown> | null | undefined;
      const queue = (file['queue'] as Record<string, unknown>[] | undefined) ?? [];
      return {
        path: file['path'] as string,
        fence: file['fence'] as number,
        holder:
          holder === null || holder === undefined
            ? null
            : {
                lane: holder['lane'] as string,
                lease: holder['lease'] as string,
                purpose: holder['purpose'] as Purpose,
                heldMs: holder['held_ms'] as number,
              },
        queue: queue.map((entry) => ({
          lane: entry['lane'] as string,
          purpose: entry['purpose'] as Purpose,
          priority: entry['priority'] as Priority,
          waitedMs: entry['waited_ms'] as number,
        })),
        counters: (file['counters'] as Record<string, number> | undefined) ?? {},
      };
    }),
  };
}
