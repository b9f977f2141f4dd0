/**
 * The wire format (`docs/protocol.md`): each frame is a 4-byte big-endian length followed by
 * one msgpack map carrying `v` (1) and `type`. Requests carry an `id` their replies echo;
 * events carry none.
 *
 * Records are checked here before anything is encoded: a record the service would refuse
 * (or could not even decode) raises `InvalidRecord` on the caller's side, and the connection
 * stays usable.
 */

import { Decoder, Encoder } from '@msgpack/msgpack';

import { BadFrame, InvalidRecord, TooLarge } from './errors.js';
import { parseReply } from './replies.js';

export const PROTOCOL_VERSION = 1;
export const HEADER_BYTES = 4;
/** The service's default `max_frame_bytes`; a larger frame would close the connection. */
export const DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024;
/** How deep a record may nest, the record itself counting as level 1 (as the service counts). */
export const MAX_RECORD_DEPTH = 100;

export type Purpose = 'prompt' | 'write' | 'compaction' | 'recovery';
export type Priority = 'recovery' | 'interactive' | 'background';
export type OnContention = 'wait' | 'fail' | 'skip';
export type Durability = 'fsync' | 'flush';
export type RevokeReason =
  | 'max_hold'
  | 'recovery'
  | 'abandoned'
  | 'actor_restart'
  | 'shutdown'
  | 'member_lost';
export type ExternalChangeKind = 'append' | 'truncate' | 'replace';

/**
 * One transcript line: a plain object of JSON values (null, booleans, finite numbers, BigInts
 * within 64 bits, well-formed strings, arrays, plain objects). Properties whose value is
 * `undefined` are left out, as `JSON.stringify` does. Checked at run time.
 */
export type TranscriptRecord = object;

/** Where an append landed: byte offset of its first line, lines written, the fence. */
export interface AppendResult {
  readonly offset: number;
  readonly lines: number;
  readonly fence: number;
}

/** A request id: the client's numbers, echoed by the reply (null on a connection-level error). */
export type RequestId = string | number;

/** A message as it is sent (snake_case fields, as in `docs/protocol.md`). */
export type WireMessage = {
  readonly v?: number;
  readonly type: string;
  readonly id?: RequestId | null;
  readonly [field: string]: unknown;
};

type Reply_<T extends string, F> = { readonly v?: number; readonly type: T } & {
  readonly id: RequestId | null;
} & { readonly [K in keyof F]: F[K] };

type Event_<T extends string, F> = { readonly v?: number; readonly type: T; readonly id: null } & {
  readonly [K in keyof F]: F[K];
};

/** One transcript in a `status` reply, as on the wire. */
export type WireFileStatus = {
  readonly path: string;
  readonly fence: number;
  readonly holder: {
    readonly lane: string;
    readonly lease: string;
    readonly purpose: Purpose;
    readonly held_ms: number;
  } | null;
  readonly queue: readonly {
    readonly lane: string;
    readonly purpose: Purpose;
    readonly priority: Priority;
    readonly waited_ms: number;
  }[];
  readonly counters: Readonly<Record<string, number>>;
};

export type WelcomeReply = Reply_<
  'welcome',
  { server: string; protocol: number; proof: Uint8Array | null }
>;
export type ChallengeReply = Reply_<'challenge', { nonce: Uint8Array }>;
export type QueuedReply = Reply_<'queued', { position: number }>;
export type GrantedReply = Reply_<
  'granted',
  { lease: string; fence: number; path: string; purpose: Purpose; secret: string | null }
>;
export type SkippedReply = Reply_<'skipped', { path: string | null }>;
export type ErrorReply = Reply_<'error', { code: string; detail: string; path: string | null }>;
export type ReleasedReply = Reply_<'released', { lease: string }>;
export type AbandonedReply = Reply_<'abandoned', { leases: readonly string[] }>;
export type AppendedReply = Reply_<
  'appended',
  {
    offset: number;
    lines: number;
    fence: number;
    released?: boolean;
    /** The offset of each line, when the append asked for them (`offsets`). */
    offsets?: readonly number[] | null;
  }
>;
export type RewrittenReply = Reply_<'rewritten', { lines: number; fence: number }>;
export type StatusReply = Reply_<'status', { files: readonly WireFileStatus[] }>;
export type AliveReply = Reply_<'alive', object>;
export type RevokedEvent_ = Event_<'revoked', { lease: string; path: string; reason: string }>;
export type AbortRequestedEvent_ = Event_<
  'abort_requested',
  { lease: string; path: string; grace_ms: number }
>;
export type ExternalChangeEvent_ = Event_<
  'external_change',
  { lease: string; path: string; kind: ExternalChangeKind }
>;

/** An event: a message without an id (an `error` without one ends the connection). */
export type ServiceEvent =
  | RevokedEvent_
  | AbortRequestedEvent_
  | ExternalChangeEvent_
  | (ErrorReply & { readonly id: null });

/** Every message the service sends, told apart by `type` (checked as it is decoded). */
export type Reply =
  | WelcomeReply
  | ChallengeReply
  | QueuedReply
  | GrantedReply
  | SkippedReply
  | ErrorReply
  | ReleasedReply
  | AbandonedReply
  | AppendedReply
  | RewrittenReply
  | StatusReply
  | AliveReply
  | RevokedEvent_
  | AbortRequestedEvent_
  | ExternalChangeEvent_;

/** The reply of the given `type`. */
export type ReplyOf<T extends Reply['type']> = Extract<Reply, { type: T }>;

/**
 * How deep a message from the service may nest, its own map counting as level 1: a record's
 * `MAX_RECORD_DEPTH` levels with room for the message around it. Deeper is refused before
 * anything is decoded (a frame of nested arrays would otherwise cost a decoder object a byte).
 */
export const MAX_MESSAGE_DEPTH = MAX_RECORD_DEPTH + 28;

const encoder = new Encoder({ ignoreUndefined: true, useBigInt64: true });

/** How many bytes `value` takes in a frame (msgpack, as `frame` encodes it). */
export function packedBytes(value: unknown): number {
  return encoder.encode(value).byteLength;
}

/** Frame one message: 4-byte big-endian length, then the msgpack map. */
export function frame(message: WireMessage, maxFrameBytes = DEFAULT_MAX_FRAME_BYTES): Buffer {
  const body = encoder.encode(message);
  if (body.byteLength > maxFrameBytes) {
    throw new TooLarge(
      `a ${message.type} of ${body.byteLength} bytes exceeds max_frame_bytes (${maxFrameBytes});` +
        ' nothing was sent',
    );
  }
  const out = Buffer.allocUnsafe(HEADER_BYTES + body.byteLength);
  out.writeUInt32BE(body.byteLength, 0);
  out.set(body, HEADER_BYTES);
  return out;
}

/**
 * Splits a byte stream into frames and decodes them into `Reply`s, in bounded memory and
 * linear time: a header announcing more than `maxFrameBytes` is refused (`TooLarge`) before
 * any of its body is kept; the chunks of a body are listed and joined once, when it is whole;
 * a body is scanned (depth, lengths, no extension types) before it is decoded, then checked
 * against its type. Anything else is `BadFrame`. After an error the reader is spent: the
 * connection must close.
 */
export class FrameReader {
  readonly #chunks: Buffer[] = [];
  #buffered = 0;
  /** The body length announced by the current header, once it is read. */
  #length: number | null = null;
  readonly #decoder: Decoder;

  constructor(private readonly maxFrameBytes: number) {
    // Lengths are bounded by the frame itself (the scan checks them against what is left).
    this.#decoder = new Decoder({ useBigInt64: false });
  }

  /** Forget what is held (a new connection starts a new stream). */
  reset(): void {
    this.#chunks.length = 0;
    this.#buffered = 0;
    this.#length = null;
  }

  /** Bytes held that do not yet make a whole frame. */
  get pending(): number {
    return this.#buffered;
  }

  /** The messages completed by `chunk`; throws `TooLarge` or `BadFrame` on a bad frame. */
  feed(chunk: Buffer): Reply[] {
    if (chunk.length > 0) {
      this.#chunks.push(chunk);
      this.#buffered += chunk.length;
    }
    const messages: Reply[] = [];
    for (;;) {
      if (this.#length === null) {
        if (this.#buffered < HEADER_BYTES) break;
        const length = this.#take(HEADER_BYTES).readUInt32BE(0);
        if (length > this.maxFrameBytes) {
          throw new TooLarge(
            `the service announced a frame of ${length} bytes, over max_frame_bytes` +
              ` (${this.maxFrameBytes}); nothing of it was read`,
          );
        }
        this.#length = length;
      }
      if (this.#buffered < this.#length) break;
      const body = this.#take(this.#length);
      this.#length = null;
      messages.push(this.#decode(body));
    }
    return messages;
  }

  /** The first `count` buffered bytes, removed: one copy at most. */
  #take(count: number): Buffer {
    const first = this.#chunks[0];
    let out: Buffer;
    if (first !== undefined && first.length >= count) {
      out = first.subarray(0, count);
      if (first.length === count) this.#chunks.shift();
      else this.#chunks[0] = first.subarray(count);
    } else {
      out = Buffer.allocUnsafe(count);
      let filled = 0;
      while (filled < count) {
        const head = this.#chunks[0];
        if (head === undefined) throw new Error('FrameReader: fewer bytes than counted');
        const used = Math.min(head.length, count - filled);
        head.copy(out, filled, 0, used);
        filled += used;
        if (used === head.length) this.#chunks.shift();
        else this.#chunks[0] = head.subarray(used);
      }
    }
    this.#buffered -= count;
    return out;
  }

  #decode(body: Buffer): Reply {
    scanMessage(body, MAX_MESSAGE_DEPTH);
    let decoded: unknown;
    try {
      decoded = this.#decoder.decode(body);
    } catch (err) {
      throw new BadFrame(`the service sent a frame that is not msgpack: ${String(err)}`, {
        cause: err,
      });
    }
    return parseReply(decoded);
  }
}

/**
 * Walk one msgpack value in `body` without building it: throws `BadFrame` if it nests deeper
 * than `maxDepth`, announces more items or bytes than the body holds, uses an extension type
 * or a reserved byte, or leaves bytes over. Iterative, constant work per byte.
 */
export function scanMessage(body: Uint8Array, maxDepth: number): void {
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  const end = body.byteLength;
  // Items still to read in each open container (the outermost: the one top-level value).
  const open: number[] = [1];
  let pos = 0;
  const bad = (why: string): never => {
    throw new BadFrame(`the service sent a bad frame: ${why} (at byte ${pos} of ${end})`);
  };
  const need = (count: number): void => {
    if (pos + count > end) bad(`${count} more bytes announced, ${end - pos} left`);
  };
  const uint = (size: 1 | 2 | 4): number => {
    need(size);
    const value =
      size === 1 ? view.getUint8(pos) : size === 2 ? view.getUint16(pos) : view.getUint32(pos);
    pos += size;
    return value;
  };
  const container = (items: number): void => {
    if (open.length >= maxDepth) bad(`nested deeper than ${maxDepth} levels`);
    // Every item takes at least a byte: a larger count is a lie (and an allocation).
    if (items > end - pos) bad(`${items} items announced, ${end - pos} bytes left`);
    open.push(items);
  };
  while (open.length > 0) {
    const top = open.length - 1;
    if (open[top] === 0) {
      open.pop();
      continue;
    }
    open[top] = (open[top] ?? 1) - 1;
    need(1);
    const byte = view.getUint8(pos);
    pos += 1;
    if (byte <= 0x7f || byte >= 0xe0 || byte === 0xc0 || byte === 0xc2 || byte === 0xc3) continue;
    if (byte >= 0x80 && byte <= 0x8f) container(2 * (byte & 0x0f));
    else if (byte >= 0x90 && byte <= 0x9f) container(byte & 0x0f);
    else if (byte >= 0xa0 && byte <= 0xbf) (need(byte & 0x1f), (pos += byte & 0x1f));
    else {
      switch (byte) {
        case 0xc4:
        case 0xd9: {
          const n = uint(1);
          need(n);
          pos += n;
          break;
        }
        case 0xc5:
        case 0xda: {
          const n = uint(2);
          need(n);
          pos += n;
          break;
        }
        case 0xc6:
        case 0xdb: {
          const n = uint(4);
          need(n);
          pos += n;
          break;
        }
        case 0xcc:
        case 0xd0:
          need(1);
          pos += 1;
          break;
        case 0xcd:
        case 0xd1:
          need(2);
          pos += 2;
          break;
        case 0xca:
        case 0xce:
        case 0xd2:
          need(4);
          pos += 4;
          break;
        case 0xcb:
        case 0xcf:
        case 0xd3:
          need(8);
          pos += 8;
          break;
        case 0xdc:
          container(uint(2));
          break;
        case 0xdd:
          container(uint(4));
          break;
        case 0xde:
          container(2 * uint(2));
          break;
        case 0xdf:
          container(2 * uint(4));
          break;
        default:
          // 0xc1 (never used) and the extension types (c7-c9, d4-d8): nothing the service sends.
          bad(`msgpack type byte 0x${byte.toString(16)} is not allowed`);
      }
    }
  }
  if (pos !== end) bad(`${end - pos} bytes after the message`);
}

const INT64_MIN = -(2n ** 63n);
const UINT64_MAX = 2n ** 64n - 1n;

/**
 * Throw `InvalidRecord` (naming the record's index and the reason) unless every record can
 * become one JSON line. An empty batch is refused as well, as the service refuses it.
 */
export function checkRecords(records: readonly unknown[]): void {
  if (!Array.isArray(records)) {
    throw new InvalidRecord('records must be an array of plain objects');
  }
  if (records.length === 0) {
    throw new InvalidRecord('empty batch: at least one record is required');
  }
  records.forEach((record, index) => {
    if (!isPlainObject(record)) {
      throw new InvalidRecord(`record ${index}: not a plain object (got ${describe(record)})`);
    }
    const problem = checkValue(record, 1, new Set());
    if (problem !== null) {
      throw new InvalidRecord(`record ${index}: ${problem}`);
    }
  });
}

function checkValue(value: unknown, depth: number, ancestors: Set<object>): string | null {
  switch (typeof value) {
    case 'string':
      return value.isWellFormed() ? null : 'a string with a lone surrogate is not valid UTF-8';
    case 'boolean':
      return null;
    case 'number':
      return Number.isFinite(value) ? null : `${value} is not a JSON number`;
    case 'bigint':
      return value >= INT64_MIN && value <= UINT64_MAX
        ? null
        : `the BigInt ${value} does not fit in 64 bits`;
    case 'object':
      break;
    default:
      return `a ${typeof value} is not a JSON value`;
  }
  if (value === null) return null;
  if (depth > MAX_RECORD_DEPTH) return `nested deeper than ${MAX_RECORD_DEPTH} levels`;
  if (ancestors.has(value)) return 'a circular reference';
  ancestors.add(value);
  try {
    if (Array.isArray(value)) {
      for (const item of value) {
        if (item === undefined) return 'undefined in an array is not a JSON value';
        const problem = checkValue(item, depth + 1, ancestors);
        if (problem !== null) return problem;
      }
      return null;
    }
    if (!isPlainObject(value)) return `${describe(value)} is not a JSON value`;
    if (Object.getOwnPropertySymbols(value).length > 0) return 'a symbol key is not a JSON key';
    for (const [key, item] of Object.entries(value)) {
      if (!key.isWellFormed()) return 'a key with a lone surrogate is not valid UTF-8';
      if (item === undefined) continue; // left out, as JSON.stringify does
      const problem = checkValue(item, depth + 1, ancestors);
      if (problem !== null) return `${JSON.stringify(key)}: ${problem}`;
    }
    return null;
  } finally {
    ancestors.delete(value);
  }
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return false;
  const proto = Object.getPrototypeOf(value) as unknown;
  return proto === Object.prototype || proto === null;
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'object') {
    const name = (value as { constructor?: { name?: unknown } }).constructor?.name;
    return typeof name === 'string' && name ? `a ${name}` : 'an object';
  }
  return `a ${typeof value}`;
}
