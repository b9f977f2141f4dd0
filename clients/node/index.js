'use strict';
/**
 * sessionlane client for Node.js.
 *
 * Speaks the gateway's wire protocol (shared/DESIGN.md, "Wire protocol"): each frame is a
 * 4-byte big-endian length followed by one msgpack map carrying `v` (1) and `type`; requests
 * carry an `id` that their replies echo; events (`revoked`, `abort_requested`,
 * `external_change`) carry none and are emitted as `'event'`.
 *
 *     const { connect } = require('sessionlane-client');
 *     const sl = await connect('tcp://127.0.0.1:7420');
 *     sl.on('event', (ev) => console.log('event', ev));
 *     const lease = await sl.acquire({ lane: 'agent:main', path: '/srv/s/a.jsonl' });
 *     await sl.append({ lease: lease.lease, fence: lease.fence, records: [{ type: 'message' }] });
 *     await sl.release(lease.lease);
 *     sl.close();
 *
 * Every request returns a promise of its final reply: `queued` notes are skipped (pass
 * `onQueued` to `acquire` to see them), an `error` reply rejects with a `SessionLaneError`
 * carrying `code`, `detail` and `path`. When the connection goes, every pending promise
 * rejects with code `unavailable`, and the service abandons the connection's leases.
 *
 * Records must be plain JSON-like objects: msgpack extension types (a `Date`, for example)
 * are refused by the service with `bad_frame`.
 */

const net = require('node:net');
const { EventEmitter } = require('node:events');
const { encode, decode } = require('@msgpack/msgpack');

const PROTOCOL_VERSION = 1;
const HEADER_BYTES = 4;
const DEFAULT_ADDRESS = 'tcp://127.0.0.1:7420';
const DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024;
const DEFAULT_KEEPALIVE_MS = 5000;

/** A failure reported by the service (or the loss of the connection: code `unavailable`). */
class SessionLaneError extends Error {
  constructor(code, detail = '', path = null) {
    super(`${code}: ${detail}${path ? ` [${path}]` : ''}`);
    this.name = 'SessionLaneError';
    this.code = code;
    this.detail = detail;
    this.path = path;
  }
}

/** `tcp://HOST:PORT` -> {host, port}; `unix:///path` -> {path}. */
function parseAddress(address) {
  if (address.startsWith('unix://')) {
    const path = address.slice('unix://'.length);
    if (!path.startsWith('/')) throw new TypeError(`a unix socket path must be absolute: ${address}`);
    return { path };
  }
  if (address.startsWith('tcp://')) {
    const rest = address.slice('tcp://'.length);
    const colon = rest.lastIndexOf(':');
    const port = Number(rest.slice(colon + 1));
    let host = colon > 0 ? rest.slice(0, colon) : '';
    if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
    if (colon < 0 || !host || !Number.isInteger(port) || port <= 0 || port > 65535) {
      throw new TypeError(`expected tcp://HOST:PORT, got ${address}`);
    }
    return { host, port };
  }
  throw new TypeError(`not a sessionlane address: ${address} (tcp://HOST:PORT or unix:///path)`);
}

/** Frame one message: 4-byte big-endian length, then the msgpack map. */
function frame(message) {
  const body = encode(message, { ignoreUndefined: true });
  const out = Buffer.allocUnsafe(HEADER_BYTES + body.byteLength);
  out.writeUInt32BE(body.byteLength, 0);
  Buffer.from(body.buffer, body.byteOffset, body.byteLength).copy(out, HEADER_BYTES);
  return out;
}

/** Relative paths are the caller's: anchor them at the working directory (no `..` folding). */
function absolute(path) {
  if (path === undefined || path === null) return path;
  return path.startsWith('/') ? path : `${process.cwd()}/${path}`;
}

/**
 * One connection to a sessionlane service. Create it with `connect()`.
 *
 * Events: `'event'` (a revoked / abort_requested / external_change message),
 * `'close'` (the connection is gone; argument: the reason).
 */
class SessionLane extends EventEmitter {
  constructor(socket, options) {
    super();
    this.socket = socket;
    this.maxFrameBytes = options.maxFrameBytes || DEFAULT_MAX_FRAME_BYTES;
    this.server = null;
    this.closed = false;
    this._nextId = 0;
    this._pending = new Map(); // id -> {resolve, reject, onQueued, type}
    this._buffer = Buffer.alloc(0);
    this._lastSent = Date.now();
    socket.on('data', (chunk) => this._onData(chunk));
    socket.on('error', (err) => this._lost(`connection error: ${err.message}`));
    socket.on('close', () => this._lost('connection closed by the service'));
    const period = options.keepaliveMs === undefined ? DEFAULT_KEEPALIVE_MS : options.keepaliveMs;
    if (period > 0) {
      // Prove we are alive while idle: the service drops a connection silent for 3 periods.
      this._keepalive = setInterval(() => {
        if (!this.closed && Date.now() - this._lastSent >= period) {
          this.keepalive().catch(() => {});
        }
      }, period);
      this._keepalive.unref();
    }
  }

  /** Send `{type, ...fields}` with a fresh id; resolve with its final reply. */
  request(type, fields = {}, { onQueued } = {}) {
    if (this.closed) {
      return Promise.reject(new SessionLaneError('unavailable', 'the connection is closed'));
    }
    this._nextId += 1;
    const id = this._nextId;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject, onQueued, type });
      this._lastSent = Date.now();
      this.socket.write(frame({ v: PROTOCOL_VERSION, type, id, ...fields }));
    });
  }

  /**
   * Ask for a lease. Resolves with `{type: 'granted', lease, fence, path, purpose}`, or with
   * `{type: 'skipped'}` when `onContention` is `'skip'` and the path is busy.
   */
  acquire({
    lane,
    path,
    purpose = 'prompt',
    priority,
    waitTimeoutMs,
    maxHoldMs,
    onContention,
    onQueued,
  }) {
    return this.request(
      'acquire',
      {
        lane,
        path: absolute(path),
        purpose,
        priority,
        wait_timeout_ms: waitTimeoutMs,
        max_hold_ms: maxHoldMs,
        on_contention: onContention,
      },
      { onQueued },
    );
  }

  /** Release one level of a held lease. Resolves with `{type: 'released', lease}`. */
  release(lease) {
    return this.request('release', { lease });
  }

  /**
   * Append records: under `{lease, fence}`, or as a queued short write of `{lane, path}`.
   * Resolves with `{type: 'appended', offset, lines, fence}`.
   */
  append({ lease, fence, lane, path, records, durability }) {
    return this.request('append', {
      records,
      lease,
      fence,
      lane,
      path: absolute(path),
      durability,
    });
  }

  /** Replace the whole transcript (compaction leases). Resolves with `{type: 'rewritten'}`. */
  rewrite({ lease, fence, records }) {
    return this.request('rewrite', { lease, fence, records });
  }

  /** Drop a lane's leases and queued requests. Resolves with `{type: 'abandoned', leases}`. */
  abandon({ lane, path, reason }) {
    return this.request('abandon', { lane, path: absolute(path), reason });
  }

  /** Take a recovery lease: the holder is asked to abort, then revoked after `graceMs`. */
  recover({ lane = 'recovery', path, reason = 'stuck', graceMs = 5000 }) {
    return this.request('recover', { lane, path: absolute(path), reason, grace_ms: graceMs });
  }

  /** Holders, queues, fences and counters. Resolves with `{type: 'status', files}`. */
  status(path) {
    return this.request('status', { path: absolute(path) });
  }

  /** Resolves with `{type: 'alive'}`. */
  keepalive() {
    return this.request('keepalive');
  }

  /** Close the connection; the service abandons every lease held on it. */
  close() {
    this.socket.end();
    this._lost('closed by the client');
  }

  _onData(chunk) {
    this._buffer = this._buffer.length ? Buffer.concat([this._buffer, chunk]) : chunk;
    while (this._buffer.length >= HEADER_BYTES) {
      const length = this._buffer.readUInt32BE(0);
      if (length > this.maxFrameBytes) {
        this.socket.destroy();
        this._lost(`the service sent a frame of ${length} bytes`);
        return;
      }
      if (this._buffer.length < HEADER_BYTES + length) break;
      const body = this._buffer.subarray(HEADER_BYTES, HEADER_BYTES + length);
      this._buffer = this._buffer.subarray(HEADER_BYTES + length);
      let message;
      try {
        message = decode(body);
      } catch (err) {
        this.socket.destroy();
        this._lost(`undecodable frame from the service: ${err.message}`);
        return;
      }
      this._deliver(message);
    }
  }

  _deliver(message) {
    if (message === null || typeof message !== 'object') return;
    if (message.id === undefined || message.id === null) {
      this.emit('event', message);
      return;
    }
    const waiter = this._pending.get(message.id);
    if (waiter === undefined) return;
    if (message.type === 'queued') {
      if (waiter.onQueued) waiter.onQueued(message);
      return;
    }
    this._pending.delete(message.id);
    if (message.type === 'error') {
      waiter.reject(new SessionLaneError(message.code, message.detail || '', message.path || null));
    } else {
      waiter.resolve(message);
    }
  }

  _lost(reason) {
    if (this.closed) return;
    this.closed = true;
    if (this._keepalive) clearInterval(this._keepalive);
    for (const waiter of this._pending.values()) {
      waiter.reject(new SessionLaneError('unavailable', `${reason} before the ${waiter.type} reply`));
    }
    this._pending.clear();
    this.emit('close', reason);
  }
}

/**
 * Connect and say hello. Options: `token` (when the service has a `token_file`), `client` (a
 * name for diagnostics), `keepaliveMs` (0 disables), `maxFrameBytes`.
 */
function connect(address = DEFAULT_ADDRESS, options = {}) {
  const target = parseAddress(address);
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(target);
    const refused = (err) => {
      reject(new SessionLaneError('unavailable', `cannot reach sessionlane at ${address}: ${err.message}`));
    };
    socket.once('error', refused);
    socket.once('connect', () => {
      socket.removeListener('error', refused);
      if (target.host !== undefined) socket.setNoDelay(true);
      const sl = new SessionLane(socket, options);
      const hello = { client: options.client || `node:${process.pid}`, token: options.token };
      sl.request('hello', hello).then(
        (welcome) => {
          sl.server = welcome.server;
          resolve(sl);
        },
        (err) => {
          sl.close();
          reject(err);
        },
      );
    });
  });
}

module.exports = {
  DEFAULT_ADDRESS,
  PROTOCOL_VERSION,
  SessionLane,
  SessionLaneError,
  connect,
  frame,
  parseAddress,
};
