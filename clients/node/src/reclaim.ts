/**
 * What a `SessionLane` decides when it rides out a restart of the service, without I/O: which
 * requests in flight may be sent again on the next connection, how a waiting acquire says how
 * long it already waited, and the reclaim of a lease (`docs/protocol.md`, Reclaim after a
 * restart).
 */

import type { LeaseState } from './lease.js';

/**
 * Whether a request whose answer was lost may be sent again on the next connection: an
 * acquire (it waits again), a release, a status, and an append that carries an append id (the
 * service answers one it already wrote without writing it twice). Nothing else.
 */
export function resendable(type: string, fields: Record<string, unknown>): boolean {
  if (type === 'acquire' || type === 'release' || type === 'status') return true;
  return type === 'append' && typeof fields['aid'] === 'string';
}

/** A waiting acquire sent again after `waitedMs`: it keeps its place, with what is left. */
export function waitedFields(
  fields: Record<string, unknown>,
  waitedMs: number,
): Record<string, unknown> {
  const next: Record<string, unknown> = { ...fields, waited_ms: Math.max(0, waitedMs) };
  const wait = fields['wait_timeout_ms'];
  if (typeof wait === 'number') next['wait_timeout_ms'] = Math.max(0, wait - waitedMs);
  return next;
}

/** The `acquire` that takes `state` back from the restarted service (same lane name). */
export function reclaimFields(state: LeaseState): Record<string, unknown> {
  return {
    lane: state.lane,
    path: state.path,
    purpose: state.purpose,
    priority: state.priority,
    reclaim: { lease: state.lease, fence: state.fence, secret: state.secret },
  };
}
