/**
 * The error table: one exception class per wire error code, all under `SessionLaneError`.
 *
 * The same hierarchy as the Python client (`sessionlane.messages.errors`): `StaleFence` is a
 * `LeaseRevoked`, and the `abandoned` code (a queued request cancelled because its own lane
 * abandoned) maps to `LeaseRevoked`. Unknown codes map to the base class, so a newer service
 * never breaks an older client.
 */

/** Every code an `error` reply can carry (see `docs/protocol.md`). */
export type ErrorCode =
  | 'lease_timeout'
  | 'contended'
  | 'stale_fence'
  | 'revoked'
  | 'not_holder'
  | 'path_not_allowed'
  | 'invalid_record'
  | 'too_large'
  | 'unauthorized'
  | 'bad_frame'
  | 'queue_full'
  | 'unavailable'
  | 'shutting_down'
  | 'abandoned'
  | 'too_many_files'
  | 'disk_full'
  | 'read_only'
  | 'io_error'
  | 'file_moved'
  | 'unknown_outcome'
  | 'pipeline_broken'
  | 'reclaim_refused'
  | 'internal';

/** The codes of the error table, in its order. */
export const ERROR_CODES: readonly ErrorCode[] = Object.freeze([
  'lease_timeout',
  'contended',
  'stale_fence',
  'revoked',
  'not_holder',
  'path_not_allowed',
  'invalid_record',
  'too_large',
  'unauthorized',
  'bad_frame',
  'queue_full',
  'unavailable',
  'shutting_down',
  'abandoned',
  'too_many_files',
  'disk_full',
  'read_only',
  'io_error',
  'file_moved',
  'unknown_outcome',
  'pipeline_broken',
  'reclaim_refused',
  'internal',
]);

/** What a `SessionLaneError` is made with besides its detail. */
export interface SessionLaneErrorOptions {
  /** The canonical path concerned. */
  path?: string | null;
  /** The wire code (default: the class's). */
  code?: ErrorCode;
  /** What caused it (a socket error, a bad frame, the error a retry saw last), as `Error.cause`. */
  cause?: unknown;
}

/**
 * Base of every sessionlane failure: `code` is the wire error code, `detail` a human-readable
 * explanation, `path` the canonical path concerned (or null).
 */
export class SessionLaneError extends Error {
  readonly code: ErrorCode;
  readonly detail: string;
  readonly path: string | null;

  constructor(detail = '', options: SessionLaneErrorOptions = {}) {
    const code = options.code ?? (new.target as unknown as { defaultCode: ErrorCode }).defaultCode;
    const path = options.path ?? null;
    super(
      `${code}: ${detail}${path ? ` [${path}]` : ''}`,
      options.cause === undefined ? undefined : { cause: options.cause },
    );
    this.name = new.target.name;
    this.code = code;
    this.detail = detail;
    this.path = path;
  }

  /** The code an instance gets when none is given. */
  static defaultCode: ErrorCode = 'internal';
}

/** A waiting acquire was not granted within its wait timeout. */
export class LeaseTimeout extends SessionLaneError {
  static override defaultCode: ErrorCode = 'lease_timeout';
}

/** `onContention: 'fail'` met a holder or a queue, or a recovery is already pending. */
export class Contended extends SessionLaneError {
  static override defaultCode: ErrorCode = 'contended';
}

/**
 * The lease ended without its holder's release; nothing more is written under it. `reason`
 * says how (`max_hold`, `recovery`, `abandoned`, `actor_restart`, `shutdown`,
 * `connection_lost`, `released`, ...), or is null where the client only learned that it is gone.
 */
export class LeaseRevoked extends SessionLaneError {
  static override defaultCode: ErrorCode = 'revoked';
  readonly reason: string | null;

  constructor(detail = '', options: SessionLaneErrorOptions & { reason?: string | null } = {}) {
    super(detail, options);
    this.reason = options.reason ?? null;
  }
}

/** A write carried a fence that is no longer current; nothing was written. */
export class StaleFence extends LeaseRevoked {
  static override defaultCode: ErrorCode = 'stale_fence';
}

/**
 * A write was sent and its answer can never come (the route to the file's member or the file's
 * actor was lost after it left): it may or may not be in the file, read the file to know. The
 * lease it used is gone as well.
 */
export class UnknownOutcome extends LeaseRevoked {
  static override defaultCode: ErrorCode = 'unknown_outcome';
}

/** A release came from a lane that does not hold the lease. */
export class NotHolder extends SessionLaneError {
  static override defaultCode: ErrorCode = 'not_holder';
}

/** The path resolves outside the roots, is not a regular file, or has a wrong suffix. */
export class PathNotAllowed extends SessionLaneError {
  static override defaultCode: ErrorCode = 'path_not_allowed';
}

/** A record is not a plain JSON object, cannot be encoded, or is over `max_record_bytes`. */
export class InvalidRecord extends SessionLaneError {
  static override defaultCode: ErrorCode = 'invalid_record';
}

/** A frame exceeded `max_frame_bytes`. */
export class TooLarge extends SessionLaneError {
  static override defaultCode: ErrorCode = 'too_large';
}

/** The connection did not present the configured token (or is not admitted). */
export class Unauthorized extends SessionLaneError {
  static override defaultCode: ErrorCode = 'unauthorized';
}

/** A frame could not be decoded or did not match the protocol. */
export class BadFrame extends SessionLaneError {
  static override defaultCode: ErrorCode = 'bad_frame';
}

/** The path's queue already holds `max_queue` waiters. */
export class QueueFull extends SessionLaneError {
  static override defaultCode: ErrorCode = 'queue_full';
}

/** The service cannot be reached, or the connection was lost before the reply. */
export class Unavailable extends SessionLaneError {
  static override defaultCode: ErrorCode = 'unavailable';
}

/** The service is stopping; queued requests are answered with this. */
export class ShuttingDown extends SessionLaneError {
  static override defaultCode: ErrorCode = 'shutting_down';
}

/** The service already keeps `max_files` transcripts live; retry later. */
export class TooManyFiles extends SessionLaneError {
  static override defaultCode: ErrorCode = 'too_many_files';
}

/**
 * The file system refused a write or a sync; nothing was acknowledged. One of `DiskFull`,
 * `ReadOnly` or `IOFailure`.
 */
export class DiskError extends SessionLaneError {
  static override defaultCode: ErrorCode = 'io_error';
}

/** No space left on the file system, or the quota is used up (ENOSPC, EDQUOT). */
export class DiskFull extends DiskError {
  static override defaultCode: ErrorCode = 'disk_full';
}

/** The file system is mounted read-only (EROFS). */
export class ReadOnly extends DiskError {
  static override defaultCode: ErrorCode = 'read_only';
}

/** The storage failed to read, write or sync (EIO and other I/O errors). */
export class IOFailure extends DiskError {
  static override defaultCode: ErrorCode = 'io_error';
}

/**
 * The transcript or a directory above it was moved or replaced while the write was on its
 * way: the records went to the moved file, nothing was acknowledged; a retry writes to the
 * file now at the path.
 */
export class FileMoved extends SessionLaneError {
  static override defaultCode: ErrorCode = 'file_moved';
}

/** Where one append of a pipeline landed (the `AppendResult` of `wire.ts`). */
export interface PipelinedResult {
  readonly offset: number;
  readonly lines: number;
  readonly fence: number;
}

/**
 * A pipelined append was not written because the one before it in its pipeline was not.
 *
 * The service refuses such an append with this code (nothing written). `Lease.appendPipelined`
 * rejects with it when a pipeline stops: `written` holds the results of its first
 * `written.length` appends, in order; append `failed` (that index) failed with `cause`; of the
 * appends after `written`, the first `unknown` may or may not be in the file (their answers were
 * lost: read the file), and every later one was not written. `failed` is null on a bare refusal
 * from the service.
 */
export class PipelineBroken extends SessionLaneError {
  static override defaultCode: ErrorCode = 'pipeline_broken';
  readonly written: readonly PipelinedResult[];
  readonly failed: number | null;
  readonly unknown: number;

  constructor(
    detail = '',
    options: SessionLaneErrorOptions & {
      written?: readonly PipelinedResult[];
      failed?: number | null;
      unknown?: number;
    } = {},
  ) {
    super(detail, options);
    this.written = Object.freeze([...(options.written ?? [])]);
    this.failed = options.failed ?? null;
    this.unknown = options.unknown ?? 0;
  }
}

const BY_CODE: Readonly<Record<ErrorCode, typeof SessionLaneError>> = {
  lease_timeout: LeaseTimeout,
  contended: Contended,
  stale_fence: StaleFence,
  revoked: LeaseRevoked,
  not_holder: NotHolder,
  path_not_allowed: PathNotAllowed,
  invalid_record: InvalidRecord,
  too_large: TooLarge,
  unauthorized: Unauthorized,
  bad_frame: BadFrame,
  queue_full: QueueFull,
  unavailable: Unavailable,
  shutting_down: ShuttingDown,
  abandoned: LeaseRevoked,
  reclaim_refused: LeaseRevoked,
  too_many_files: TooManyFiles,
  disk_full: DiskFull,
  read_only: ReadOnly,
  io_error: IOFailure,
  file_moved: FileMoved,
  unknown_outcome: UnknownOutcome,
  pipeline_broken: PipelineBroken,
  internal: SessionLaneError,
};

/** The exception for a wire error code (unknown codes map to the base class). */
export function errorFor(code: string, detail = '', path: string | null = null): SessionLaneError {
  const known = ERROR_CODES.find((item) => item === code);
  const cls = known === undefined ? SessionLaneError : BY_CODE[known];
  // An unknown code is kept as the service sent it (a newer service's), on the base class.
  return new cls(detail, { path, code: known ?? (code as ErrorCode) });
}

/**
 * The reason a lease's `signal` aborts with when a recovery asks its holder to finish:
 * not a failure yet (the lease still writes), a request to wrap up within `graceMs`.
 */
export class AbortRequestedError extends Error {
  readonly lease: string;
  readonly path: string;
  readonly graceMs: number;

  constructor(lease: string, path: string, graceMs: number) {
    super(`a recovery asked the holder of ${path} to finish within ${graceMs} ms`);
    this.name = 'AbortRequestedError';
    this.lease = lease;
    this.path = path;
    this.graceMs = graceMs;
  }
}
