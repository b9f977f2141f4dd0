/**
 * What the service sends, checked as it is decoded: `parseReply` turns a decoded msgpack map
 * into a `Reply` (a discriminated union on `type`) or throws `BadFrame`, as the Python client's
 * `decode_reply` does. Past this point the client reads typed fields, never casts.
 */

import { BadFrame } from './errors.js';
import type {
  ExternalChangeKind,
  Priority,
  Purpose,
  Reply,
  RequestId,
  WireFileStatus,
} from './wire.js';

const PURPOSES: readonly Purpose[] = ['prompt', 'write', 'compaction', 'recovery'];
const PRIORITIES: readonly Priority[] = ['recovery', 'interactive', 'background'];
const CHANGE_KINDS: readonly ExternalChangeKind[] = ['append', 'truncate', 'replace'];

type Fields = Readonly<Record<string, unknown>>;

/** The `Reply` in `decoded`; `BadFrame` naming the type and field if it is not one. */
export function parseReply(decoded: unknown): Reply {
  const m = record(decoded, 'the service sent a frame that is not a map');
  const type = m['type'];
  const id = requestId(m['id']);
  const f = new Reader(m, typeof type === 'string' ? type : '?');
  const v = m['v'] === undefined ? undefined : f.int('v');
  const base = { v, id };
  switch (type) {
    case 'welcome':
      return {
        ...base,
        type,
        server: f.str('server'),
        protocol: f.int('protocol'),
        proof: f.optional('proof', () => f.bytes('proof')),
      };
    case 'challenge':
      return { ...base, type, nonce: f.bytes('nonce') };
    case 'queued':
      return { ...base, type, position: f.int('position') };
    case 'granted':
      return {
        ...base,
        type,
        lease: f.str('lease'),
        fence: f.int('fence'),
        path: f.str('path'),
        purpose: f.oneOf('purpose', PURPOSES),
        secret: f.optional('secret', () => f.str('secret')),
      };
    case 'skipped':
      return { ...base, type, path: f.optional('path', () => f.str('path')) };
    case 'error':
      return {
        ...base,
        type,
        code: f.str('code'),
        detail: f.optional('detail', () => f.str('detail')) ?? '',
        path: f.optional('path', () => f.str('path')),
      };
    case 'released':
      return { ...base, type, lease: f.str('lease') };
    case 'abandoned':
      return { ...base, type, leases: f.strings('leases') };
    case 'appended':
      return {
        ...base,
        type,
        offset: f.int('offset'),
        lines: f.int('lines'),
        fence: f.int('fence'),
        offsets: f.optional('offsets', () => f.ints('offsets')),
      };
    case 'rewritten':
      return { ...base, type, lines: f.int('lines'), fence: f.int('fence') };
    case 'status':
      return { ...base, type, files: f.list('files', (item) => fileStatus(item)) };
    case 'alive':
      return { ...base, type };
    case 'revoked':
      return {
        ...base,
        id: null,
        type,
        lease: f.str('lease'),
        path: f.str('path'),
        reason: f.str('reason'),
      };
    case 'abort_requested':
      return {
        ...base,
        id: null,
        type,
        lease: f.str('lease'),
        path: f.str('path'),
        grace_ms: f.int('grace_ms'),
      };
    case 'external_change':
      return {
        ...base,
        id: null,
        type,
        lease: f.str('lease'),
        path: f.str('path'),
        kind: f.oneOf('kind', CHANGE_KINDS),
      };
    default:
      throw new BadFrame(`the service sent a message of unknown type ${JSON.stringify(type)}`);
  }
}

function fileStatus(item: unknown): WireFileStatus {
  const f = new Reader(record(item, 'a status file entry is not a map'), 'status file');
  return {
    path: f.str('path'),
    fence: f.int('fence'),
    holder: f.optional('holder', () => {
      const h = new Reader(f.map('holder'), 'status holder');
      return {
        lane: h.str('lane'),
        lease: h.str('lease'),
        purpose: h.oneOf('purpose', PURPOSES),
        held_ms: h.int('held_ms'),
      };
    }),
    queue: f.list('queue', (entry) => {
      const q = new Reader(record(entry, 'a status queue entry is not a map'), 'status queue');
      return {
        lane: q.str('lane'),
        purpose: q.oneOf('purpose', PURPOSES),
        priority: q.oneOf('priority', PRIORITIES),
        waited_ms: q.int('waited_ms'),
      };
    }),
    counters: f.counters('counters'),
  };
}

function record(value: unknown, why: string): Fields {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new BadFrame(why);
  if (value instanceof Uint8Array) throw new BadFrame(why);
  return value as Fields; // a plain object from the decoder: its keys are its fields
}

function requestId(value: unknown): RequestId | null {
  if (value === undefined || value === null) return null;
  if (typeof value === 'string' || (typeof value === 'number' && Number.isInteger(value))) {
    return value;
  }
  throw new BadFrame(`the service sent a message whose id is a ${typeof value}`);
}

/** Typed reads of one map's fields; each failure names the message type and the field. */
class Reader {
  constructor(
    private readonly fields: Fields,
    private readonly what: string,
  ) {}

  #bad(field: string, expected: string): never {
    const got = this.fields[field];
    const seen = got === undefined ? 'missing' : `a ${Array.isArray(got) ? 'list' : typeof got}`;
    throw new BadFrame(
      `the service sent a ${this.what} whose ${field} is ${seen}, not ${expected}`,
    );
  }

  str(field: string): string {
    const value = this.fields[field];
    return typeof value === 'string' ? value : this.#bad(field, 'a string');
  }

  int(field: string): number {
    const value = this.fields[field];
    return typeof value === 'number' && Number.isSafeInteger(value)
      ? value
      : this.#bad(field, 'an integer');
  }

  bytes(field: string): Uint8Array {
    const value = this.fields[field];
    return value instanceof Uint8Array ? value : this.#bad(field, 'bytes');
  }

  map(field: string): Fields {
    const value = this.fields[field];
    return value !== null && typeof value === 'object' && !Array.isArray(value)
      ? record(value, '')
      : this.#bad(field, 'a map');
  }

  oneOf<T extends string>(field: string, allowed: readonly T[]): T {
    const value = this.fields[field];
    const found = allowed.find((item) => item === value);
    return found ?? this.#bad(field, `one of ${allowed.join(', ')}`);
  }

  /** `read()` unless the field is missing or null. */
  optional<T>(field: string, read: () => T): T | null {
    const value = this.fields[field];
    return value === undefined || value === null ? null : read();
  }

  list<T>(field: string, item: (value: unknown) => T): T[] {
    const value = this.fields[field];
    return Array.isArray(value) ? value.map(item) : this.#bad(field, 'a list');
  }

  ints(field: string): number[] {
    return this.list(field, (item) =>
      typeof item === 'number' && Number.isSafeInteger(item)
        ? item
        : this.#bad(field, 'a list of integers'),
    );
  }

  strings(field: string): string[] {
    return this.list(field, (item) =>
      typeof item === 'string' ? item : this.#bad(field, 'a list of strings'),
    );
  }

  counters(field: string): Record<string, number> {
    const out: Record<string, number> = {};
    for (const [key, value] of Object.entries(this.map(field))) {
      if (typeof value !== 'number') this.#bad(field, 'a map of numbers');
      out[key] = value;
    }
    return out;
  }
}

/** `reply` as the reply of type `type`; `BadFrame` if the service answered with another. */
export function expectReply<T extends Reply['type']>(
  reply: Reply,
  type: T,
): Extract<Reply, { type: T }> {
  if (isReply(reply, type)) return reply;
  throw new BadFrame(`the service answered with ${reply.type} where ${type} was expected`);
}

function isReply<T extends Reply['type']>(
  reply: Reply,
  type: T,
): reply is Extract<Reply, { type: T }> {
  return reply.type === type;
}
