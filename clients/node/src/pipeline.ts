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
} from './wire.js';

/** Options of `Lease.appendPipelined`. */
export interface PipelineOptions {
  /** How many appends may be in flight at once: 1 to 1024 (default 64). */
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
}

type Outcome = AppendResult | SessionLaneError;

/** `Lease.appendPipelined`: one append per record, up to `window` in flight, in order. */
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
  const aids = records.map(() => randomBytes(8).toString('hex'));
  const fieldsOf = (index: number): Record<string, unknown> => ({
    lease: lease.id,
    fence: lease.fence,
    records: [records[index]],
    durability: options.durability,
    aid: aids[index],
    after: index === 0 ? undefined : aids[index - 1],
    release: options.release === true && index === records.length - 1 ? true : undefined,
  });
  const results: AppendResult[] = [];
  let resendUntil = 0; // appends before this index were sent before a restart: one at a time
  let revivals = 0;
  while (results.length < records.length) {
    const start = results.length;
    const careful = start < resendUntil;
    const end = careful ? resendUntil : records.length;
    const outcomes = await batch(lease, start, end, careful ? 1 : window, fieldsOf);
    for (const outcome of outcomes) {
      if (outcome instanceof Error) break;
      results.push(outcome);
    }
    if (results.length === end) continue;
    const rest = outcomes.slice(results.length - start);
    const failed = rest[0] as SessionLaneError;
    // Its connection was lost (`UnknownOutcome` for a write, `Unavailable` before it left).
    const lost = failed instanceof UnknownOutcome || failed instanceof Unavailable;
    if (lost && lease.state.suspended && revivals < MAX_REVIVALS) {
      revivals += 1; // the connection is being revived: the lease is taken back first
      resendUntil = Math.max(resendUntil, results.length + rest.length);
      continue;
    }
    throw broken(lease, results, failed, rest, careful ? resendUntil - results.length : null);
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
): Promise<Outcome[]> {
  const send = (index: number): Promise<Outcome> =>
    lease.send(fieldsOf(index)).then(
      (reply) => {
        const { offset, lines, fence } = expectReply(reply, 'appended');
        return { offset, lines, fence };
      },
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

/** The error of a pipeline stopped at append `results.length`. */
function broken(
  lease: PipelineLease,
  results: readonly AppendResult[],
  failed: SessionLaneError,
  rest: readonly Outcome[],
  /** How many from the failed one on were sent before a restart (maybe written), or null. */
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
  const unknown = sentBefore ?? told;
  const index = results.length;
  const what =
    unknown > 0
      ? `appends ${index} to ${index + unknown - 1} may or may not be in the file (read it), ` +
        'and the ones after them were not written'
      : `append ${index} and the ones after it were not written`;
  return new PipelineBroken(
    `pipeline stopped after ${index} appends written: ${cause.code}: ${cause.detail}; ${what}`,
    { path: lease.path, written: results, failed: index, unknown, cause },
  );
}

/** Whether a failed append may be in the file all the same (its answer or its sync failed). */
function maybeWritten(err: SessionLaneError): boolean {
  if (err instanceof Unavailable || err instanceof DiskError) return true;
  return err.code === 'internal' || err.code === 'unknown_outcome';
}
