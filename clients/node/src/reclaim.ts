/**
 * What a `SessionLane` decides when it rides out a restart of the service, without I/O: which
 * requests in flight may be sent again on the next connection, how a waiting acquire says how
 * long it already waited, the reclaim of a lease (`docs/protocol.md`, Reclaim after a
 * restart), and how a call waits for the revival within its own budget.
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

/** An acquire's own wait (ms), which bounds everything it waits for, a ride-out included. */
export function acquireBudget(type: string, timeoutMs: number | null | undefined): number | null {
  return type === 'acquire' && typeof timeoutMs === 'number' ? Math.max(0, timeoutMs) : null;
}

/** An acquire sent with `leftMs` of its wait left (spent waiting for a revival). */
export function budgetFields(
  fields: Record<string, unknown>,
  leftMs: number,
): Record<string, unknown> {
  return { ...fields, wait_timeout_ms: Math.floor(leftMs) };
}

/**
 * Wait for `revival` within `budgetMs` (null: no budget): resolves with what is left of it
 * (null without one), rejects with `expired()` when it ends first, or with `aborted(signal)`
 * when `signal` aborts first.
 */
export function awaitWithin(
  revival: Promise<void>,
  budgetMs: number | null,
  signal: AbortSignal | undefined,
  expired: () => Error,
  aborted: (signal: AbortSignal) => Error,
): Promise<number | null> {
  if (budgetMs === null && signal === undefined) return revival.then(() => null);
  if (signal?.aborted) return Promise.reject(aborted(signal));
  const started = Date.now();
  return new Promise((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const onAbort = (): void => {
      finish();
      reject(aborted(signal as AbortSignal));
    };
    const finish = (): void => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    if (budgetMs !== null && budgetMs <= MAX_TIMER_MS) {
      timer = setTimeout(() => {
        finish();
        reject(expired());
      }, budgetMs);
    }
    void revival.then(() => {
      finish();
      resolve(budgetMs === null ? null : Math.max(0, budgetMs - (Date.now() - started)));
    });
  });
}

/** The longest delay a Node timer takes. */
const MAX_TIMER_MS = 2_147_483_647;
