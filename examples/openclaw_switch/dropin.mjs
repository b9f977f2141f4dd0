// One OpenClaw process that has switched to the sessionlane drop-in: it takes the session
// write lock with `acquireSessionWriteLock` from `sessionlane/openclaw` (the only line that
// changes in OpenClaw), appends one line to the transcript itself, as OpenClaw's
// SessionManager does, and releases when told to.
//
//     node dropin.mjs ADDRESS SESSION_FILE TIMEOUT_MS LABEL [service]
//
// With `service` the line is appended through the lease instead (the service writes it).
//
// It prints one JSON line per step on stdout: {"event":"held",...} once the lock is held (the
// lease on the service and OpenClaw's <file>.lock), {"event":"timeout",...} when it gives up,
// {"event":"lost",...} if the lease is lost before that, {"event":"released"} after "release"
// arrives on stdin. SESSIONLANE_OPENCLAW_MODULE names the
// module when the package is not installed (the repository's tests point it at the build).
// DROPIN_RECONNECT_FOR_MS, when set, is how long the locks ride out a lost service
// (`connectOptions.reconnectForMs`; default the drop-in's 60 s): a test of what happens once
// that ends sets it short.
import { appendFile } from 'node:fs/promises';
import { createInterface } from 'node:readline';

const { createSessionWriteLocks, isSessionWriteLockTimeoutError } = await import(
  process.env.SESSIONLANE_OPENCLAW_MODULE ?? 'sessionlane/openclaw'
);

const [address, sessionFile, timeout, label, via] = process.argv.slice(2);
const say = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);
const reconnectFor = process.env.DROPIN_RECONNECT_FOR_MS;
const locks = createSessionWriteLocks({
  address,
  lane: `openclaw:${label}`,
  connectOptions: reconnectFor ? { reconnectForMs: Number(reconnectFor) } : undefined,
});
try {
  let lock;
  try {
    lock = await locks.acquireSessionWriteLock({ sessionFile, timeoutMs: Number(timeout) });
  } catch (err) {
    if (!isSessionWriteLockTimeoutError(err)) throw err;
    say({ event: 'timeout', owner: err.owner, message: err.message });
    process.exitCode = 3;
  }
  if (lock) {
    say({ event: 'held', pid: process.pid, lockPath: lock.lockPath });
    // The lease lost without a release (max hold, recovery, service shutdown or restart): a
    // typed LeaseRevoked whose reason says how. OpenClaw's lock file stays until release().
    lock.signal.addEventListener('abort', () => {
      const why = lock.signal.reason;
      say({ event: 'lost', error: why?.name, reason: why?.reason ?? null });
    });
    const record = { writer: label, pid: process.pid };
    if (via === 'service') await lock.lease.append(record);
    else await appendFile(sessionFile, `${JSON.stringify(record)}\n`);
    for await (const line of createInterface({ input: process.stdin })) {
      if (line.trim() === 'release') break;
    }
    await lock.release();
    say({ event: 'released' });
  }
} finally {
  await locks.close();
}
