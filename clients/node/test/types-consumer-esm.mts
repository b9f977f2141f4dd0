// Compiled (not run) by `npm test`: the ES module entry points' types, with full lib checks.
import { connect, LeaseTimeout, type Lease } from 'sessionlane';
import { createSessionWriteLocks, SessionWriteLockTimeoutError } from 'sessionlane/openclaw';

export async function once(path: string): Promise<number> {
  await using sl = await connect('unix:///run/sessionlane.sock');
  try {
    await using lease: Lease | null = await sl.lane('esm').lease(path, { waitTimeoutMs: null });
    return lease?.fence ?? -1;
  } catch (err) {
    if (err instanceof LeaseTimeout) return -1;
    throw err;
  }
}

export async function locked(sessionFile: string): Promise<void> {
  await using locks = createSessionWriteLocks();
  try {
    const lock = await locks.acquireSessionWriteLock({ sessionFile });
    await lock.release();
  } catch (err) {
    if (!(err instanceof SessionWriteLockTimeoutError)) throw err;
  }
}
