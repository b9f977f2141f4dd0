/**
 * OpenClaw's own `<sessionFile>.lock` (its `src/agents/session-write-lock.ts`, versions up to
 * 2026.8), taken by the drop-in so that processes still on OpenClaw's lock and processes on
 * sessionlane exclude each other: a half-migrated fleet.
 *
 * The protocol, as OpenClaw's acquirer follows it (and as `sessionlane.actors.openclaw_lock`
 * does on the Python side):
 *
 * - the lock is created with `open(path, "wx")` (O_CREAT | O_EXCL) and holds
 *   `JSON.stringify({pid, createdAt, maxHoldMs?, starttime?}, null, 2) + "\n"`; `starttime` is
 *   field 22 of `/proc/<pid>/stat` (Linux only, omitted elsewhere);
 * - a lock is stale for `missing-pid`, `dead-pid`, `recycled-pid`, `invalid-createdAt`,
 *   `too-old` (past `staleMs`), `hold-exceeded` (past its own `maxHoldMs`) or `orphan-self-pid`
 *   (our pid and start time, but not held here); `too-old` / `hold-exceeded` alone are only
 *   reported (a live holder keeps its lock), a malformed payload alone counts only once the
 *   file's mtime is older than the grace, and anything else is removed if unchanged;
 * - a waiter retries every 50 ms within one timeout budget.
 *
 * What the drop-in writes, so that an un-migrated OpenClaw finds its lock alive: this
 * process's pid and start time (the drop-in runs inside the OpenClaw process, whose argv is
 * OpenClaw's, so OpenClaw's `non-openclaw-owner` check passes too), `createdAt` now, and
 * `maxHoldMs` only when the caller gave one (OpenClaw reports a lock past it as stale, so
 * writing a default would turn a long turn into stale errors for the others), and
 * `sessionlaneLease`, the lease it is held for (OpenClaw ignores it; a service with
 * `legacy_lock` on lets that lease's writes go under this lock instead of waiting for it).
 */

import { closeSync, openSync, readFileSync, unlinkSync } from 'node:fs';
import { open, readFile, stat, unlink } from 'node:fs/promises';

/** OpenClaw's defaults. */
export const DEFAULT_STALE_MS = 30 * 60 * 1000;
const RETRY_DELAY_MS = 50;
const ORPHAN_PAYLOAD_GRACE_MS = 30_000;
const SHORT_TIMEOUT_ORPHAN_PAYLOAD_GRACE_MS = 5_000;

/** A stale reason, spelled as OpenClaw spells it. */
export type StaleReason =
  | 'missing-pid'
  | 'dead-pid'
  | 'recycled-pid'
  | 'invalid-createdAt'
  | 'too-old'
  | 'hold-exceeded'
  | 'orphan-self-pid';

const REPORT_ONLY = new Set<StaleReason>(['too-old', 'hold-exceeded']);
const MALFORMED = new Set<StaleReason>(['missing-pid', 'invalid-createdAt']);

/** The fields of a lock file that matter (invalid fields are `null`). */
export interface LockPayload {
  pid: number | null;
  createdAtMs: number | null;
  starttime: number | null;
  maxHoldMs: number | null;
}

/** What a lock file looked like: its raw text and identity. */
export interface LockSnapshot {
  raw: string;
  ino: number;
  dev: number;
  mtimeMs: number;
  payload: LockPayload | null;
}

/** Start time of `pid` in clock ticks (`/proc/<pid>/stat` field 22), or null off Linux. */
export function processStartTime(pid: number): number | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // The command name (field 2) is in parentheses and may contain spaces or ')'.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const value = Number(fields[19]); // field 22 is the 20th after the name
  return Number.isSafeInteger(value) && value > 0 ? value : null;
}

/** OpenClaw's `isPidAlive`: signal 0 reaches it, or it exists under another user. */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Parse a lock file's text; null when it is not a JSON object. */
export function parseLockPayload(raw: string): LockPayload | null {
  let value: unknown;
  try {
    value = JSON.parse(raw);
  } catch {
    return null;
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) return null;
  const fields = value as Record<string, unknown>;
  const positiveInt = (v: unknown): number | null =>
    typeof v === 'number' && Number.isSafeInteger(v) && v > 0 ? v : null;
  const created = typeof fields['createdAt'] === 'string' ? Date.parse(fields['createdAt']) : NaN;
  const maxHold = fields['maxHoldMs'];
  return {
    pid: positiveInt(fields['pid']),
    createdAtMs: Number.isFinite(created) ? created : null,
    starttime: positiveInt(fields['starttime']),
    maxHoldMs: typeof maxHold === 'number' && maxHold > 0 ? maxHold : null,
  };
}

/** OpenClaw's owner text for error messages: `pid=<n> alive=<bool> ageMs=<n>`. */
export function describeOwner(snapshot: LockSnapshot | null, nowMs = Date.now()): string {
  const payload = snapshot?.payload;
  if (!payload || payload.pid === null) return 'owner=unknown';
  const age = payload.createdAtMs === null ? '?' : String(Math.max(0, nowMs - payload.createdAtMs));
  return `pid=${payload.pid} alive=${pidAlive(payload.pid)} ageMs=${age}`;
}

/** Why the lock of `payload` is stale at `nowMs`, in OpenClaw's order (the acquirer's view). */
export function staleReasons(
  payload: LockPayload | null,
  nowMs: number,
  staleMs: number = DEFAULT_STALE_MS,
): StaleReason[] {
  const reasons: StaleReason[] = [];
  const pid = payload?.pid ?? null;
  if (pid === null) {
    reasons.push('missing-pid');
  } else if (!pidAlive(pid)) {
    reasons.push('dead-pid');
  } else if (payload?.starttime != null) {
    const current = processStartTime(pid);
    if (current !== null && current !== payload.starttime) reasons.push('recycled-pid');
  }
  const created = payload?.createdAtMs ?? null;
  if (created === null) {
    reasons.push('invalid-createdAt');
  } else {
    if (nowMs - created > staleMs) reasons.push('too-old');
    if (payload?.maxHoldMs != null && nowMs - created > payload.maxHoldMs) {
      reasons.push('hold-exceeded');
    }
  }
  if (pid === process.pid) {
    // Never one of ours (held locks are not judged): a lock our process left behind.
    const recorded = payload?.starttime ?? null;
    if (recorded === null || recorded === processStartTime(process.pid)) {
      reasons.push('orphan-self-pid');
    }
  }
  return reasons;
}

/** Whether a lock showing `reasons` may be removed (OpenClaw's rules, see the module). */
export function removable(reasons: StaleReason[], mtimeAgeMs: number, graceMs: number): boolean {
  if (reasons.length === 0) return false;
  if (reasons.every((r) => REPORT_ONLY.has(r))) return false;
  if (reasons.every((r) => MALFORMED.has(r))) return mtimeAgeMs > graceMs;
  return true;
}

/** The lock file's text and identity, or null when there is none. */
export async function readSnapshot(lockPath: string): Promise<LockSnapshot | null> {
  try {
    const [raw, st] = await Promise.all([readFile(lockPath, 'utf8'), stat(lockPath)]);
    return { raw, ino: st.ino, dev: st.dev, mtimeMs: st.mtimeMs, payload: parseLockPayload(raw) };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw err;
  }
}

function sameLock(a: LockSnapshot, b: LockSnapshot | null): boolean {
  return b !== null && a.raw === b.raw && a.ino === b.ino && a.dev === b.dev;
}

/** Unlink the lock if it is still the one of `snapshot`; another lock is left alone. */
export async function removeIfUnchanged(
  lockPath: string,
  snapshot: LockSnapshot,
): Promise<'removed' | 'changed' | 'gone'> {
  const current = await readSnapshot(lockPath);
  if (current === null) return 'gone';
  if (!sameLock(snapshot, current)) return 'changed';
  try {
    await unlink(lockPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'gone';
    throw err;
  }
  return 'removed';
}

/** The lock text OpenClaw writes for this process. */
export function encodeLockPayload(
  createdAtMs: number,
  maxHoldMs: number | null,
  lease: string | null = null,
): string {
  const payload: Record<string, unknown> = {
    pid: process.pid,
    createdAt: new Date(createdAtMs).toISOString(),
  };
  if (maxHoldMs !== null && Number.isFinite(maxHoldMs)) payload['maxHoldMs'] = Math.round(maxHoldMs);
  const starttime = processStartTime(process.pid);
  if (starttime !== null) payload['starttime'] = starttime;
  // Ignored by OpenClaw; a service with `legacy_lock` on lets this lease's writes go under it.
  if (lease !== null) payload['sessionlaneLease'] = lease;
  return `${JSON.stringify(payload, null, 2)}\n`;
}

/** Create the lock exclusively; null when it exists. */
async function create(lockPath: string, text: string): Promise<LockSnapshot | null> {
  let handle;
  try {
    handle = await open(lockPath, 'wx', 0o600);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EEXIST') return null;
    throw err;
  }
  try {
    await handle.writeFile(text, 'utf8');
    const st = await handle.stat();
    return { raw: text, ino: st.ino, dev: st.dev, mtimeMs: st.mtimeMs, payload: parseLockPayload(text) };
  } catch (err) {
    await handle.close().catch(() => undefined);
    await unlink(lockPath).catch(() => undefined);
    throw err;
  } finally {
    await handle.close().catch(() => undefined);
  }
}

/**
 * Lock files this process holds, with the lease each is held for and how many acquires share
 * it (a reentrant acquire joins the same lease); removed at exit if still ours, as OpenClaw
 * does. A lock file in this map is never judged stale by this process.
 */
interface HeldEntry {
  snapshot: LockSnapshot;
  lease: string | null;
  count: number;
}
const held = new Map<string, HeldEntry>();
let exitHookInstalled = false;

function releaseAllSync(): void {
  for (const [lockPath, entry] of held) {
    try {
      const fd = openSync(lockPath, 'r');
      try {
        if (readFileSync(fd, 'utf8') === entry.snapshot.raw) unlinkSync(lockPath);
      } finally {
        closeSync(fd);
      }
    } catch {
      // Gone or unreadable: nothing of ours to remove.
    }
  }
  held.clear();
}

/** A handle on one level of a held lock file; the file goes with the last level. */
function handle(lockPath: string, entry: HeldEntry): HeldLockFile {
  let released = false;
  return {
    lockPath,
    snapshot: entry.snapshot,
    release: async () => {
      if (released) return;
      released = true;
      entry.count -= 1;
      if (entry.count > 0 || held.get(lockPath) !== entry) return;
      held.delete(lockPath);
      await removeIfUnchanged(lockPath, entry.snapshot);
    },
  };
}

/** The outcome of a bounded wait for the lock file. */
export type LockFileOutcome =
  | { held: HeldLockFile }
  | { timedOut: true; owner: string; snapshot: LockSnapshot | null };

/** A lock file this process holds; `release` removes it if it is unchanged. */
export interface HeldLockFile {
  readonly lockPath: string;
  readonly snapshot: LockSnapshot;
  release(): Promise<void>;
}

/**
 * Take `lockPath` as OpenClaw's acquirer would: create it; while a live owner holds it, retry
 * every 50 ms until `deadlineMs` (a `Date.now()` value; Infinity waits forever); remove a
 * stale lock if unchanged. Never takes a lock a live OpenClaw process holds.
 */
export async function acquireLockFile(params: {
  lockPath: string;
  deadlineMs: number;
  timeoutMs: number;
  maxHoldMs: number | null;
  staleMs?: number;
  /** The lease this lock file is held for (written as `sessionlaneLease`). */
  lease?: string;
  signal?: AbortSignal;
}): Promise<LockFileOutcome> {
  const staleMs = params.staleMs ?? DEFAULT_STALE_MS;
  const grace = Math.min(
    staleMs,
    params.timeoutMs < 30_000 ? SHORT_TIMEOUT_ORPHAN_PAYLOAD_GRACE_MS : ORPHAN_PAYLOAD_GRACE_MS,
  );
  let last: LockSnapshot | null = null;
  for (;;) {
    params.signal?.throwIfAborted();
    const ours = held.get(params.lockPath);
    if (ours !== undefined && params.lease !== undefined && ours.lease === params.lease) {
      ours.count += 1; // a reentrant acquire on the same lease
      return { held: handle(params.lockPath, ours) };
    }
    const text = encodeLockPayload(Date.now(), params.maxHoldMs, params.lease ?? null);
    const mine = ours === undefined ? await create(params.lockPath, text) : null;
    if (mine !== null) {
      if (!exitHookInstalled) {
        exitHookInstalled = true;
        process.once('exit', releaseAllSync);
      }
      const entry: HeldEntry = { snapshot: mine, lease: params.lease ?? null, count: 1 };
      held.set(params.lockPath, entry);
      return { held: handle(params.lockPath, entry) };
    }
    const snapshot = await readSnapshot(params.lockPath);
    if (snapshot === null && ours === undefined) continue; // released since our create
    if (snapshot !== null) {
      last = snapshot;
      const now = Date.now();
      // Held by this process for another lease (another drop-in object): wait, never stale.
      const reasons = ours !== undefined ? [] : staleReasons(snapshot.payload, now, staleMs);
      if (removable(reasons, now - snapshot.mtimeMs, grace)) {
        await removeIfUnchanged(params.lockPath, snapshot);
        continue;
      }
    }
    const left = params.deadlineMs - Date.now();
    if (left <= 0) return { timedOut: true, owner: describeOwner(last), snapshot: last };
    await sleep(Math.min(RETRY_DELAY_MS, left), params.signal);
  }
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(done, ms);
    function done(): void {
      signal?.removeEventListener('abort', aborted);
      resolve();
    }
    function aborted(): void {
      clearTimeout(timer);
      reject(signal?.reason);
    }
    signal?.addEventListener('abort', aborted, { once: true });
  });
}
