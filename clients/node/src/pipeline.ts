/**
 * Pipelined appends (`Lease.appendPipelined`): many appends of one lease in flight at once,
 * acknowledged in order, and none written after one that failed.
 *
 * The guarantee is the service's: each append names the one before it (`after`, its `aid`), and
 * the file refuses (`pipeline_broken`, nothing written) one whose predecessor is not the last
 * append written under the lease (`docs/protocol.md`, `append`). This module builds the
 * appends, keeps the window full, rides out a service restart (the unanswered appends are sent
 * again one at a time, never by the connection in bulk) and says in `PipelineBroken` which
 * records were written. The same algorithm as the Python client's `_pipeline.py`.
 *
 * The records go in groups (`planGroups`): one append carries up to a quarter of the window's
 * records and asks for the offset of each line (`offsets`); the window counts records in
 * flight. The caller still gets one `AppendResult` per record, and `PipelineBroken` speaks of
 * records (`docs/pipelining.md`).
 */

import { randomBytes } from 'node:crypto';

import {
  DiskError,
  PipelineBroken,
  SessionLaneError,
  StaleFence,
  Unavailable,
  UnknownOutcome,
  errorFor,
} from './errors.js';
import type { LeaseState } from './lease.js';
import { expectReply } from './replies.js';
import {
  checkRecords,
  type AppendResult,
  type Durability,
  type Reply,
  type TranscriptRecord,
  packedBytes,
} from './wire.js';

/** Options of `Lease.appendPipelined`. */
export interface PipelineOptions {
  /** How many records may be in flight at once: 1 to 1024 (default 64). */
  window?: number;
  /** `fsync` (the default: durable before the reply) or `flush` (written to the OS). */
  durability?: Durability;
  /** The last append also releases the lease once durable (append and release). */
  release?: boolean;
}

/** The largest `window` a pipeline may ask for. */
export const MAX_WINDOW = 1024;

/** How many lost connections one pipeline rides out (with `reconnectForMs`) before it fails. */
const MAX_REVIVALS = 8;

/** What a pipeline needs of its lease. */
export interface PipelineLease {
  readonly id: string;
  readonly fence: number;
  readonly path: string;
  /** The shared lease state: `suspended` while the connection is revived, `revoked`. */
  readonly state: LeaseState;
  /** Throw `LeaseRevoked` (nothing sent) if the lease may no longer write. */
  checkUsable(): void;
  /** Send one append of the lease (not resent by the connection after a restart). */
  send(fields: Record<string, unknown>): Promise<Reply>;
  /** The largest frame body the service takes (`max_frame_bytes`). */
  readonly maxFrameBytes: number;
}

/** The results of one append's records, or why it failed. */
type Outcome = AppendResult[] | SessionLaneError;

/**
 * Bytes of an append's frame besides its records, at most: the other fields (a lease id of at
 * most 128 characters, ids of 16 hex digits, a fence) and their names.
 */
const FRAME_ROOM = 512;

/**
 * `records` in groups of at most a quarter of `window` (at least one), a group cut early where
 * its records would take more than `limit` bytes of msgpack. A record too large alone is a
 * group alone (its frame is refused before it is sent: `TooLarge`).
 */
export function planGroups(
  records: readonly TranscriptRecord[],
  window: number,
  limit: number,
): TranscriptRecord[][] {
  const size = Math.max(1, Math.floor(window / 4));
  const groups: TranscriptRecord[][] = [];
  let group: TranscriptRecord[] = [];
  let bytes = 0;
  for (const record of records) {
    const length = packedBytes(record);
    if (group.length > 0 && (group.length === size || bytes + length + 5 > limit)) {
      groups.push(group);
      group = [];
      bytes = 0;
    }
    group.push(record);
    bytes += length;
  }
  if (group.length > 0) groups.push(group);
  return groups;
}

/**
 * `Lease.appendPipelined`: the records in groups, one append per group, up to `window`
 * records in flight, in order; one `AppendResult` per record.
 */
export async function appendPipelined(
  lease: PipelineLease,
  records: readonly TranscriptRecord[],
  options: PipelineOptions = {},
): Promise<AppendResult[]> {
  const window = options.window ?? 64;
  if (!Number.isInteger(window) || window < 1 || window > MAX_WINDOW) {
    throw new RangeError(`window must be an integer from 1 to ${MAX_WINDOW}, got ${window}`);
  }
  lease.checkUsable();
  checkRecords(records);
  const room = FRAME_ROOM + Buffer.byteLength(lease.id);
  const groups = planGroups(records, window, lease.maxFrameBytes - room);
  const aids = groups.map(() => randomBytes(8).toString('hex'));
  const fieldsOf = (index: number): Record<string, unknown> => ({
    lease: lease.id,
    fence: lease.fence,
    records: groups[index],
    durability: options.durability,
    aid: aids[index],
    after: index === 0 ? undefined : aids[index - 1],
    release: options.release === true && index === groups.length - 1 ? true : undefined,
    offsets: groups[index]!.length > 1 ? true : undefined,
  });
  const inFlight = Math.max(1, Math.floor(window / Math.max(1, Math.floor(window / 4))));
  const results: AppendResult[] = [];
  let done = 0; // appends answered `appended`: their records' results are in `results`
  let resendUntil = 0; // appends before this index were sent before a restart: one at a time
  let revivals = 0;
  while (done < groups.length) {
    const start = done;
    const careful = start < resendUntil;
    const end = careful ? resendUntil : groups.length;
    const outcomes = await batch(lease, start, end, careful ? 1 : inFlight, fieldsOf, groups);
    for (const outcome of outcomes) {
      if (outcome instanceof Error) break;
      results.push(...outcome);
      done += 1;
    }
    if (done === end) continue;
    const rest = outcomes.slice(done - start);
    const failed = rest[0] as SessionLaneError;
    // Its connection was lost (`UnknownOutcome` for a write, `Unavailable` before it left).
    const lost = failed instanceof UnknownOutcome || failed instanceof Unavailable;
    if (lost && lease.state.suspended && revivals < MAX_REVIVALS) {
      revivals += 1; // the connection is being revived: the lease is taken back first
      resendUntil = Math.max(resendUntil, done + rest.length);
      continue;
    }
    const sentBefore = careful ? resendUntil - done : null;
    throw broken(lease, results, failed, rest, groups.slice(done), sentBefore);
  }
  return results;
}

/**
 * Send appends `start` to `end` with at most `window` in flight; their outcomes in order, up
 * to the first failure and the ones already sent after it.
 */
async function batch(
  lease: PipelineLease,
  start: number,
  end: number,
  window: number,
  fieldsOf: (index: number) => Record<string, unknown>,
  groups: readonly (readonly TranscriptRecord[])[],
): Promise<Outcome[]> {
  const send = (index: number): Promise<Outcome> =>
    lease.send(fieldsOf(index)).then(
      (reply) => recordResults(expectReply(reply, 'appended'), groups[index]!.length, index),
      (err: unknown) => {
        if (err instanceof StaleFence) lease.state.revoke('stale_fence');
        return err instanceof SessionLaneError ? err : errorFor('internal', String(err));
      },
    );
  const inFlight: Promise<Outcome>[] = [];
  const outcomes: Outcome[] = [];
  let next = start;
  let stopped = false;
  for (;;) {
    while (!stopped && next < end && inFlight.length < window) inFlight.push(send(next++));
    const head = inFlight.shift();
    if (head === undefined) return outcomes;
    const outcome = await head;
    outcomes.push(outcome);
    if (outcome instanceof Error) stopped = true;
  }
}

/**
 * The result of each of the `count` records of append `index`, answered `reply`; an `internal`
 * error (written, so of unknown outcome to the caller) if it does not say where each line is.
 */
function recordResults(
  reply: { offset: number; lines: number; fence: number; offsets?: readonly number[] | null },
  count: number,
  index: number,
): Outcome {
  const { fence } = reply;
  if (count === 1) return [{ offset: reply.offset, lines: 1, fence }];
  const offsets = reply.offsets;
  const complete = offsets != null && offsets.length === count && reply.lines === count;
  if (!complete) {
    return errorFor(
      'internal',
      `append ${index} of the pipeline was answered without the offsets of its ${count} lines`,
    );
  }
  return offsets!.map((offset) => ({ offset, lines: 1, fence }));
}

/** The error of a pipeline stopped at record `results.length`. */
function broken(
  lease: PipelineLease,
  results: readonly AppendResult[],
  failed: SessionLaneError,
  rest: readonly Outcome[],
  /** The appends from the failed one on. */
  left: readonly (readonly TranscriptRecord[])[],
  /** How many appends from the failed one on were sent before a restart (maybe written). */
  sentBefore: number | null,
): PipelineBroken {
  let cause: SessionLaneError = failed;
  if (failed instanceof Unavailable) {
    const detail = `${failed.detail}: the append may or may not be in the file, read it`;
    cause = new UnknownOutcome(detail, {
      path: lease.path,
      reason: lease.state.revoked ?? 'connection_lost',
      cause: failed,
    });
  }
  // An append answered `appended` after the failed one (resent for us in bulk by a
  // convention's member after an owner's restart) is written, and may be every one before it.
  const maybe = rest.flatMap((o, i) => (!(o instanceof Error) || maybeWritten(o) ? [i] : []));
  const told = maybe.length > 0 ? maybe[maybe.length - 1]! + 1 : 0;
  const appends = sentBefore ?? told;
  const unknown = left.slice(0, Math.max(0, appends)).reduce((sum, g) => sum + g.length, 0);
  const index = results.length;
  const what =
    unknown > 0
      ? `records ${index} to ${index + unknown - 1} may or may not be in the file (read it), ` +
        'and the ones after them were not written'
      : `record ${index} and the ones after it were not written`;
  return new PipelineBroken(
    `pipeline stopped after ${index} records written: ${cause.code}: ${cause.detail}; ${what}`,
    { path: lease.path, written: results, failed: index, unknown, cause },
  );
}

/** Whether a failed append may be in the file all the same (its answer or its sync failed). */
function maybeWritten(err: SessionLaneError): boolean {
  if (err instanceof Unavailable || err instanceof DiskError) return true;
  return err.code === 'internal' || err.code === 'unknown_outcome';
}
