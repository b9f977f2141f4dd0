// Compiled (not run) by `npm test`: the package's types as an application uses them.
import {
  connect,
  createSessionWriteLocks,
  isSessionWriteLockTimeoutError,
  LeaseRevoked,
  SessionLaneError,
  type AppendResult,
  type ErrorCode,
  type Lease,
  type LeaseOptions,
  type SessionLane,
  type StatusReport,
} from 'sessionlane';
import {
  createSessionWriteLocks as fromSubpath,
  type SessionWriteLock,
} from 'sessionlane/openclaw';

interface Message {
  type: 'message';
  role: 'user' | 'assistant';
  text: string;
}

export async function turn(path: string, message: Message): Promise<number | null> {
  await using sl: SessionLane = await connect('127.0.0.1:7420', { token: 'secret', client: 'app' });
  const options: LeaseOptions = { purpose: 'prompt', waitTimeoutMs: 5_000, onContention: 'skip' };
  await using lease: Lease | null = await sl
    .lane('agent:main', { priority: 'background' })
    .lease(path, options);
  if (lease === null) return null;
  lease.on('external_change', (event) => console.log(event.kind, event.path));
  lease.on('revoked', (event) => console.log(event.reason));
  const signal: AbortSignal = lease.signal;
  signal.addEventListener('abort', () => console.log(signal.reason));
  const result: AppendResult = await lease.append(message, { type: 'note', n: 1 });
  await lease.appendRecords([message], { durability: 'flush' });
  const report: StatusReport = await sl.status(path);
  const held: number | undefined = report.files[0]?.holder?.heldMs;
  console.log(held, lease.fence, lease.id, lease.abortRequested, lease.revoked);
  return result.offset;
}

export async function dropIn(sessionFile: string): Promise<void> {
  const { acquireSessionWriteLock, close } = createSessionWriteLocks({ lane: 'openclaw' });
  try {
    const lock: SessionWriteLock = await acquireSessionWriteLock({
      sessionFile,
      timeoutMs: 60_000,
      staleMs: 1_800_000,
      maxHoldMs: 300_000,
      allowReentrant: true,
    });
    await lock.release();
  } catch (err) {
    if (isSessionWriteLockTimeoutError(err)) return;
    if (err instanceof SessionLaneError) {
      const code: ErrorCode = err.code;
      console.log(code, err.detail, err.path, err instanceof LeaseRevoked);
    }
    throw err;
  } finally {
    await close();
  }
  void fromSubpath;
}
