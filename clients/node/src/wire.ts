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

import { InvalidRecord, TooLarge } from './errors.js';

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

/** A message as it crosses the wire (snake_case fields, as in `docs/protocol.md`). */
export interface WireMessage {
  readonly v?: number;
  readonly type: string;
  readonly id?: string | number | null;
  readonly [field: string]: unknown;
}

const encoder = new Encoder({ ignoreUndefined: true, useBigInt64: true });
const decoder = new Decoder();

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

/** Splits a byte stream into frame bodies and decodes them. */
export class FrameReader {
  #buffer: Buffer = Buffer.alloc(0);

  constructor(private readonly maxFrameBytes: number) {}

  /** The messages completed by `chunk`; throws on an oversized or undecodable frame. */
  feed(chunk: Buffer): WireMessage[] {
    this.#buffer = this.#buffer.length ? Buffer.concat([this.#buffer, chunk]) : chunk;
    const messages: WireMessage[] = [];
    while (this.#buffer.length >= HEADER_BYTES) {
      const length = this.#buffer.readUInt32BE(0);
      if (length > this.maxFrameBytes) {
        throw new Error(`the service sent a frame of ${length} bytes`);
      }
      if (this.#buffer.length < HEADER_BYTES + length) break;
      const body = this.#buffer.subarray(HEADER_BYTES, HEADER_BYTES + length);
      this.#buffer = this.#buffer.subarray(HEADER_BYTES + length);
      const message = decoder.decode(body);
      if (message === null || typeof message !== 'object' || Array.isArray(message)) {
        throw new Error('the service sent a frame that is not a map');
      }
      messages.push(message as WireMessage);
    }
    return messages;
  }
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
