/**
 * sessionlane for TypeScript and Node.js: the client of a `sessionlane serve` (one writer per
 * agent transcript, fenced writes, FIFO hand-off), in the shape of the Python client, and an
 * OpenClaw session-write-lock drop-in (`createSessionWriteLocks`, also at `sessionlane/openclaw`).
 *
 * The wire protocol is described in the repository's `docs/protocol.md`.
 */

import './dispose.js';

export {
  ADDRESS_ENV,
  DEFAULT_ADDRESS,
  defaultAddress,
  parseAddress,
  type Target,
} from './address.js';
export {
  connect,
  SessionLane,
  type ConnectOptions,
  type FileStatus,
  type SessionLaneEvents,
  type StatusReport,
} from './client.js';
export {
  AbortRequestedError,
  BadFrame,
  Contended,
  DiskError,
  DiskFull,
  ERROR_CODES,
  FileMoved,
  IOFailure,
  InvalidRecord,
  LeaseRevoked,
  LeaseTimeout,
  NotHolder,
  PathNotAllowed,
  PipelineBroken,
  QueueFull,
  ReadOnly,
  SessionLaneError,
  ShuttingDown,
  StaleFence,
  TooLarge,
  TooManyFiles,
  Unauthorized,
  Unavailable,
  UnknownOutcome,
  errorFor,
  type ErrorCode,
  type PipelinedResult,
  type SessionLaneErrorOptions,
} from './errors.js';
export {
  Lane,
  Lease,
  type AbortRequestedEvent,
  type AppendOptions,
  type ExternalChangeEvent,
  type LeaseEvents,
  type LeaseLossReason,
  type LeaseOptions,
  type RequestOptions,
  type RevokedEvent,
} from './lease.js';
export { MAX_WINDOW, type PipelineOptions } from './pipeline.js';
export {
  DEFAULT_ACQUIRE_TIMEOUT_MS,
  SESSION_WRITE_LOCK_TIMEOUT_CODE,
  SessionWriteLockTimeoutError,
  createSessionWriteLocks,
  isSessionWriteLockTimeoutError,
  type AcquireSessionWriteLockParams,
  type SessionWriteLock,
  type SessionWriteLocks,
  type SessionWriteLocksOptions,
} from './openclaw.js';
export {
  MAX_MESSAGE_DEPTH,
  PROTOCOL_VERSION,
  checkRecords,
  type AppendResult,
  type Durability,
  type ExternalChangeKind,
  type OnContention,
  type Priority,
  type Purpose,
  type Reply,
  type ReplyOf,
  type RequestId,
  type RevokeReason,
  type ServiceEvent,
  type TranscriptRecord,
  type WireMessage,
} from './wire.js';

/** The package version, from its `package.json` (the same as the Python distribution's). */
export const VERSION: string = packageVersion();

function packageVersion(): string {
  // dist/index.js sits beside package.json's folder in the package, as src/ does here.
  const meta: unknown = require('../package.json');
  if (meta !== null && typeof meta === 'object' && 'version' in meta) {
    if (typeof meta.version === 'string') return meta.version;
  }
  throw new Error('sessionlane: its package.json has no version');
}
