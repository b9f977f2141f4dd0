/**
 * What the client verifies before it says anything (`docs/security-clients.md`).
 *
 * - **Who owns the service's socket.** Without a token, by default, the service must run as
 *   this process's user (`serviceUser` names another, `'*'` anyone). On Linux over TCP, the
 *   owner of the service's end of the connection is read from `/proc/net/tcp{,6}` (the socket
 *   whose local end is the service's address and whose remote end is ours), as the service
 *   reads its peers'. Node has no `SO_PEERCRED`: for a Unix socket, the owner of the socket
 *   file is taken (whoever bound it; another user cannot bind a path in a directory they cannot
 *   write). Elsewhere the owner cannot be told.
 * - **The token, without sending it.** With a token, the hello carries a fresh nonce, the
 *   service answers `challenge` with its own, the client answers `proof`
 *   (HMAC-SHA256(token, "sessionlane client proof\0" ‖ Nc ‖ Ns)) and the `welcome` must carry
 *   the service's proof (the same with "sessionlane server proof\0"), checked in constant time.
 */

import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync, statSync } from 'node:fs';
import { isIPv4, isIPv6 } from 'node:net';
import { endianness } from 'node:os';

import type { Target } from './address.js';

export const NONCE_BYTES = 32;
const CLIENT_LABEL = Buffer.from('sessionlane client proof\0', 'latin1');
const SERVER_LABEL = Buffer.from('sessionlane server proof\0', 'latin1');
/** TCP states whose reported uid is the owner's (not TIME_WAIT: the kernel reports 0). */
const OWNED_STATES = new Set([0x01, 0x04, 0x05, 0x08, 0x09, 0x0b]);

/** `serviceUser` that trusts whoever listens at the address. */
export const ANY_USER = '*';

export function newNonce(): Buffer {
  return randomBytes(NONCE_BYTES);
}

function proof(label: Buffer, token: string, clientNonce: Uint8Array, serverNonce: Uint8Array): Buffer {
  return createHmac('sha256', Buffer.from(token, 'utf8'))
    .update(label)
    .update(clientNonce)
    .update(serverNonce)
    .digest();
}

/** What the client sends in `proof`. */
export function clientProof(token: string, clientNonce: Uint8Array, serverNonce: Uint8Array): Buffer {
  return proof(CLIENT_LABEL, token, clientNonce, serverNonce);
}

/** Whether `given` is the service's proof for this token and these nonces (constant time). */
export function serverProofMatches(
  given: unknown,
  token: string,
  clientNonce: Uint8Array,
  serverNonce: Uint8Array,
): boolean {
  if (!(given instanceof Uint8Array)) return false;
  const expected = proof(SERVER_LABEL, token, clientNonce, serverNonce);
  return given.byteLength === expected.byteLength && timingSafeEqual(given, expected);
}

/** `serviceUser` as a uid, `'*'`, or undefined (the default); a name is looked up in /etc/passwd. */
export function resolveServiceUser(user: number | string | undefined): number | string | undefined {
  if (user === undefined || user === ANY_USER) return user;
  if (typeof user === 'number') {
    if (!Number.isInteger(user) || user < 0) throw new TypeError(`serviceUser: not a uid: ${user}`);
    return user;
  }
  if (/^\d+$/.test(user)) return Number(user);
  let passwd = '';
  try {
    passwd = readFileSync('/etc/passwd', 'utf8');
  } catch {
    // no passwd file: the name cannot be known
  }
  for (const line of passwd.split('\n')) {
    const fields = line.split(':');
    if (fields[0] === user && fields[2] !== undefined && /^\d+$/.test(fields[2])) {
      return Number(fields[2]);
    }
  }
  throw new TypeError(`serviceUser '${user}': no such user on this machine`);
}

/** The uid owning the service's end of a connected socket, or null if it cannot be told. */
export function serviceOwner(
  target: Target,
  local: { address?: string | undefined; port?: number | undefined },
  remote: { address?: string | undefined; port?: number | undefined },
): number | null {
  if (process.platform !== 'linux') return null;
  if ('path' in target) {
    try {
      const info = statSync(target.path);
      return info.isSocket() ? info.uid : null;
    } catch {
      return null;
    }
  }
  if (!local.address || !local.port || !remote.address || !remote.port) return null;
  for (const [table, serviceEnd, ourEnd] of candidates(remote.address, remote.port, local.address, local.port)) {
    let text: string;
    try {
      text = readFileSync(table, 'latin1');
    } catch {
      continue;
    }
    const uid = ownerInTable(text, serviceEnd, ourEnd);
    if (uid !== null) return uid;
  }
  return null;
}

/** The uid on the line of a /proc/net/tcp table with these local and remote addresses. */
export function ownerInTable(table: string, local: string, remote: string): number | null {
  const needle = ` ${local} ${remote} `;
  let from = 0;
  for (;;) {
    const at = table.indexOf(needle, from);
    if (at < 0) return null;
    from = at + needle.length;
    const end = table.indexOf('\n', at);
    const cols = table.slice(at, end < 0 ? undefined : end).trim().split(/\s+/);
    // cols: local, remote, st, tx:rx, tr:when, retrnsmt, uid, ...
    const state = Number.parseInt(cols[2] ?? '', 16);
    const uid = Number(cols[6]);
    if (OWNED_STATES.has(state) && Number.isInteger(uid)) return uid;
  }
}

type Candidate = [table: string, serviceEnd: string, ourEnd: string];

function candidates(serviceHost: string, servicePort: number, ourHost: string, ourPort: number): Candidate[] {
  const service = ipBytes(serviceHost);
  const ours = ipBytes(ourHost);
  if (service === null || ours === null) return [];
  const found: Candidate[] = [];
  const serviceV4 = v4Of(service);
  const oursV4 = v4Of(ours);
  if (serviceV4 !== null && oursV4 !== null) {
    found.push(['/proc/net/tcp', procAddress(serviceV4, servicePort), procAddress(oursV4, ourPort)]);
    found.push(['/proc/net/tcp6', procAddress(mapped(serviceV4), servicePort), procAddress(mapped(oursV4), ourPort)]);
  } else if (service.length === 16 && ours.length === 16) {
    found.push(['/proc/net/tcp6', procAddress(service, servicePort), procAddress(ours, ourPort)]);
  }
  return found;
}

/** `ip:port` as /proc/net/tcp prints it: each 32-bit word in native byte order, in hex. */
export function procAddress(ip: Uint8Array, port: number): string {
  let words = '';
  for (let i = 0; i < ip.length; i += 4) {
    const word = Array.from(ip.subarray(i, i + 4));
    if (endianness() === 'LE') word.reverse();
    words += word.map((b) => b.toString(16).padStart(2, '0')).join('');
  }
  return `${words.toUpperCase()}:${port.toString(16).toUpperCase().padStart(4, '0')}`;
}

function v4Of(ip: Uint8Array): Uint8Array | null {
  if (ip.length === 4) return ip;
  const prefix = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
  return prefix.every((b, i) => ip[i] === b) ? ip.subarray(12) : null;
}

function mapped(v4: Uint8Array): Uint8Array {
  return Uint8Array.from([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ...v4]);
}

function ipBytes(host: string): Uint8Array | null {
  const bare = host.split('%')[0] ?? host;
  if (isIPv4(bare)) return Uint8Array.from(bare.split('.').map(Number));
  if (!isIPv6(bare)) return null;
  let text = bare;
  const tail: number[] = [];
  const dotted = /^(.*:)(\d+)\.(\d+)\.(\d+)\.(\d+)$/.exec(text);
  if (dotted) {
    const [a, b, c, d] = dotted.slice(2).map(Number) as [number, number, number, number];
    tail.push((a << 8) | b, (c << 8) | d);
    text = dotted[1] ?? '';
    if (!text.endsWith('::')) text = text.slice(0, -1);
  }
  const halves = text.split('::');
  const parse = (part: string | undefined): number[] =>
    part ? part.split(':').map((p) => Number.parseInt(p, 16)) : [];
  let groups: number[];
  if (halves.length === 1) {
    groups = [...parse(halves[0]), ...tail];
  } else {
    const left = parse(halves[0]);
    const right = [...parse(halves[1]), ...tail];
    groups = [...left, ...new Array<number>(Math.max(0, 8 - left.length - right.length)).fill(0), ...right];
  }
  if (groups.length !== 8) return null;
  const out = new Uint8Array(16);
  groups.forEach((g, i) => {
    out[2 * i] = (g >> 8) & 0xff;
    out[2 * i + 1] = g & 0xff;
  });
  return out;
}

/**
 * Why the service whose socket `owner` owns (null: cannot be told) must not be talked to, or
 * null. Without a token its owner must be `serviceUser` (by default this process's user); with
 * one, the service's proof decides and the owner is checked only if `serviceUser` names one.
 */
export function serviceRefusal(
  address: string,
  owner: number | null,
  token: string | undefined,
  serviceUser: number | string | undefined,
): string | null {
  if (serviceUser === ANY_USER || (serviceUser === undefined && token !== undefined)) return null;
  const ownUid = typeof process.geteuid === 'function' ? process.geteuid() : null;
  const expected = serviceUser === undefined ? ownUid : Number(serviceUser);
  const where = `the service at ${address}`;
  if (owner === null || expected === null) {
    if (token !== undefined) return null;
    return (
      `cannot tell which user runs ${where} (not a local connection, or not Linux):` +
      ' nothing was sent; give the service a token_file and this client its token,' +
      " or pass serviceUser: '*' to trust whoever listens there"
    );
  }
  if (owner === expected) return null;
  const mine = serviceUser === undefined ? " (this client's user)" : '';
  return (
    `${where} runs as uid ${owner}, not uid ${expected}${mine}: nothing was sent (another` +
    ' user may hold the address while the service is stopped); if that user\'s service is' +
    ` meant, pass serviceUser: ${owner}`
  );
}
