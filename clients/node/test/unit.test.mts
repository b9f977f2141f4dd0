// What needs no real service: addresses, the error table, record checks, and connection
// loss, driven by a scripted peer on a real socket.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, renameSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, it } from 'node:test';

import {
  DiskError,
  ERROR_CODES,
  InvalidRecord,
  type Lease,
  LeaseRevoked,
  LeaseTimeout,
  PipelineBroken,
  ReadOnly,
  SessionLaneError,
  StaleFence,
  TooManyFiles,
  Unauthorized,
  Unavailable,
  UnknownOutcome,
  checkRecords,
  connect,
  errorFor,
  parseAddress,
} from 'sessionlane';
import { SessionWriteLockTimeoutError } from 'sessionlane/openclaw';
import { type Script, type Send, closedPort, deferred, scriptedService } from './helpers.mjs';

describe('addresses', () => {
  it('accepts HOST:PORT, tcp://HOST:PORT and unix:///path', () => {
    assert.deepEqual(parseAddress('127.0.0.1:7421'), { host: '127.0.0.1', port: 7421 });
    assert.deepEqual(parseAddress('tcp://localhost:7420'), { host: 'localhost', port: 7420 });
    assert.deepEqual(parseAddress('tcp://[::1]:7420'), { host: '::1', port: 7420 });
    assert.deepEqual(parseAddress('unix:///run/sl.sock'), { path: '/run/sl.sock' });
  });

  it('refuses anything else with a TypeError naming the three forms', () => {
    for (const bad of [
      '',
      'localhost',
      'tcp://:7420',
      'tcp://h:0',
      'tcp://h:99999',
      'h:x',
      'unix://rel.sock',
      'http://h/x:1',
    ]) {
      assert.throws(
        () => parseAddress(bad),
        (err: unknown) => err instanceof TypeError,
      );
    }
  });
});

describe('the error table', () => {
  it('maps every wire code to its class, with code, detail and path', () => {
    const expected: Record<string, string> = {
      lease_timeout: 'LeaseTimeout',
      contended: 'Contended',
      stale_fence: 'StaleFence',
      revoked: 'LeaseRevoked',
      not_holder: 'NotHolder',
      path_not_allowed: 'PathNotAllowed',
      invalid_record: 'InvalidRecord',
      too_large: 'TooLarge',
      unauthorized: 'Unauthorized',
      bad_frame: 'BadFrame',
      queue_full: 'QueueFull',
      unavailable: 'Unavailable',
      shutting_down: 'ShuttingDown',
      abandoned: 'LeaseRevoked',
      too_many_files: 'TooManyFiles',
      disk_full: 'DiskFull',
      read_only: 'ReadOnly',
      io_error: 'IOFailure',
      file_moved: 'FileMoved',
      unknown_outcome: 'UnknownOutcome',
      pipeline_broken: 'PipelineBroken',
      reclaim_refused: 'LeaseRevoked',
      internal: 'SessionLaneError',
    };
    assert.deepEqual([...ERROR_CODES].sort(), Object.keys(expected).sort());
    for (const code of ERROR_CODES) {
      const err = errorFor(code, 'why', '/p.jsonl');
      assert.equal(err.constructor.name, expected[code]);
      assert.ok(err instanceof SessionLaneError && err instanceof Error);
      assert.deepEqual([err.code, err.detail, err.path], [code, 'why', '/p.jsonl']);
      assert.equal(err.message, `${code}: why [/p.jsonl]`);
    }
    assert.ok(errorFor('stale_fence') instanceof LeaseRevoked);
    assert.ok(new StaleFence('x') instanceof LeaseRevoked);
    assert.equal(new TooManyFiles('full').code, 'too_many_files');
    assert.ok(errorFor('disk_full') instanceof DiskError && new ReadOnly().code === 'read_only');
    assert.equal(new Unauthorized().code, 'unauthorized');
    assert.equal(errorFor('from_the_future', 'x').constructor, SessionLaneError);
  });

  it('gives the OpenClaw timeout error the shape its callers test', () => {
    const err = new SessionWriteLockTimeoutError({
      timeoutMs: 5,
      owner: 'owner=unknown',
      lockPath: '/s/a.jsonl.lock',
    });
    assert.equal(err.code, 'OPENCLAW_SESSION_WRITE_LOCK_TIMEOUT');
    assert.equal(err.name, 'SessionWriteLockTimeoutError');
    assert.equal(err.message, 'session file locked (timeout 5ms): owner=unknown /s/a.jsonl.lock');
  });
});

describe('record checks', () => {
  it('accept plain JSON objects, leaving undefined properties out', () => {
    checkRecords([{ a: 1, b: 'x', c: [1, null, { d: true }], e: undefined, f: 2n ** 63n }]);
    checkRecords([Object.assign(Object.create(null) as object, { bare: 1 })]);
  });

  it('refuse the first unencodable record with InvalidRecord naming its index', () => {
    class Custom {
      x = 1;
    }
    const cases: [unknown[], RegExp][] = [
      [[{ ok: 1 }, new Custom()], /record 1: not a plain object \(got a Custom\)/],
      [[{ nested: { deeper: [undefined] } }], /undefined in an array/],
      [[{ big: -(2n ** 63n) - 1n }], /64 bits/],
      [[{ inf: Infinity }], /Infinity/],
      [[{ [Symbol('k')]: 1 }], /symbol key/],
      [[{ sym: Symbol('v') }], /symbol/],
      [[{ ['\udc00']: 1 }], /key with a lone surrogate/],
      [[{ m: new Map() }], /Map/],
    ];
    for (const [records, reason] of cases) {
      assert.throws(
        () => checkRecords(records as object[]),
        (err: unknown) => {
          assert.ok(err instanceof InvalidRecord);
          assert.match(err.detail, reason);
          return true;
        },
      );
    }
  });

  it('allow a shared (non-circular) object twice', () => {
    const shared = { s: 1 };
    checkRecords([{ a: shared, b: shared, c: [shared, shared] }]);
  });
});

/**
 * Holds back the grant of the last acquire (which `onAcquire` may answer meanwhile, say
 * `queued`) until a keepalive arrives: then grants it, as lease `LATE`, before the keepalive's
 * own reply. Answers a release, telling `released` which lease it named.
 */
function lateGrant(
  released: (lease: unknown) => void,
  onAcquire: (id: unknown, send: Send) => void = () => undefined,
): Script {
  let waiting: unknown = null;
  let path: unknown = null;
  return (request, send) => {
    if (request['type'] === 'acquire') {
      waiting = request['id'];
      path = request['path'];
      onAcquire(waiting, send);
    } else if (request['type'] === 'keepalive') {
      send({ type: 'granted', id: waiting, lease: 'LATE', fence: 3, path, purpose: 'prompt' });
      send({ type: 'alive', id: request['id'] });
    } else if (request['type'] === 'release') {
      released(request['lease']);
      send({ type: 'released', id: request['id'], lease: request['lease'] });
    }
  };
}

/** Grants the first acquire, queues the second and then drops the connection. */
function grantOnceThenDrop(): Script {
  let acquires = 0;
  return (request, send, socket) => {
    if (request['type'] !== 'acquire') return;
    if (acquires++ === 0) {
      send({
        type: 'granted',
        id: request['id'],
        lease: 'L1',
        fence: 7,
        path: request['path'],
        purpose: 'prompt',
      });
    } else {
      send({ type: 'queued', id: request['id'], position: 1 });
      socket.destroy(); // the service goes away while a request waits
    }
  };
}

/**
 * A service that "restarts" under its client: it grants a lease with a reclaim secret, queues
 * a second acquire, accepts the first append and drops the connection before answering it;
 * on the next connection it answers the reclaim, the waiting acquire and the resent append
 * (recording what it was sent).
 */
function restartingService(seen: Record<string, unknown>[]): Script {
  let connections = 0;
  let lastSocket: net.Socket | null = null;
  return (request, send, socket) => {
    if (socket !== lastSocket) {
      lastSocket = socket;
      connections += 1;
    }
    seen.push({ connection: connections, ...request });
    const id = request['id'];
    if (connections === 1 && request['type'] === 'acquire') {
      if (request['lane'] === 'a') {
        send({ type: 'granted', id, lease: 'L1', fence: 7, path: request['path'],
               purpose: 'prompt', secret: 'S'.repeat(32) });
      } else {
        send({ type: 'queued', id, position: 1 });
      }
    } else if (connections === 1 && request['type'] === 'append') {
      socket.destroy(); // the service dies before the append's answer
    } else if (request['type'] === 'acquire' && request['reclaim'] !== undefined) {
      send({ type: 'granted', id, lease: 'L1', fence: 7, path: request['path'],
             purpose: 'prompt', secret: 'S'.repeat(32) });
    } else if (request['type'] === 'acquire') {
      send({ type: 'granted', id, lease: 'L2', fence: 8, path: request['path'],
             purpose: 'prompt', secret: 'T'.repeat(32) });
    } else if (request['type'] === 'append') {
      send({ type: 'appended', id, offset: 0, lines: 1, fence: 7 });
    } else if (request['type'] === 'release') {
      send({ type: 'released', id, lease: request['lease'] });
    }
  };
}

describe('riding out a restart (reconnectForMs)', () => {
  it('reclaims the lease, resends the append with its id and the waiting acquire', async () => {
    const seen: Record<string, unknown>[] = [];
    const { address, server } = await scriptedService(restartingService(seen));
    try {
      const sl = await connect(address, { keepaliveMs: 0, reconnectForMs: 5_000 });
      const lease = await sl.lane('a').lease('/s/a.jsonl');
      assert.ok(lease !== null);
      const waiting = sl.lane('b').lease('/s/a.jsonl', { waitTimeoutMs: 30_000 });
      const appended = await lease.append({ n: 1 });
      assert.deepEqual(appended, { offset: 0, lines: 1, fence: 7 });
      assert.equal(lease.revoked, null);
      assert.equal(lease.signal.aborted, false);
      const next = await waiting;
      assert.equal(next?.fence, 8);
      const second = seen.filter((r) => r['connection'] === 2);
      const reclaim = second.find((r) => r['reclaim'] !== undefined);
      assert.deepEqual(reclaim?.['reclaim'], { lease: 'L1', fence: 7, secret: 'S'.repeat(32) });
      assert.equal(reclaim?.['lane'], 'a');
      const [before, after] = seen.filter((r) => r['type'] === 'append');
      assert.ok(typeof before?.['aid'] === 'string');
      assert.equal(after?.['aid'], before?.['aid'], 'the append is resent with its id');
      const resent = second.find((r) => r['type'] === 'acquire' && r['lane'] === 'b');
      assert.ok(typeof resent?.['waited_ms'] === 'number');
      await lease.release();
      await next?.release();
      await sl.close();
    } finally {
      server.close();
    }
  });
});

/**
 * A service that restarts under its client and refuses the reclaim (the file changed, say):
 * it grants a lease, drops the connection at the first append, and on the next connection
 * hands the reclaim to `refuse` to answer when the test says so (recording what it was sent).
 */
function refusingService(
  seen: Record<string, unknown>[],
  reclaimed: (answer: () => void) => void,
): Script {
  let connections = 0;
  let lastSocket: net.Socket | null = null;
  return (request, send, socket) => {
    if (socket !== lastSocket) {
      lastSocket = socket;
      connections += 1;
    }
    seen.push({ connection: connections, ...request });
    const id = request['id'];
    if (connections === 1 && request['type'] === 'acquire') {
      send({ type: 'granted', id, lease: 'L1', fence: 7, path: request['path'],
             purpose: 'prompt', secret: 'S'.repeat(32) });
    } else if (connections === 1) {
      socket.destroy(); // the service dies before the answer
    } else if (request['type'] === 'acquire' && request['reclaim'] !== undefined) {
      reclaimed(() => send({ type: 'error', id, code: 'reclaim_refused',
                             detail: 'the file changed since the holder\'s last write' }));
    } else {
      send({ type: 'error', id, code: 'stale_fence', detail: 'must be reclaimed first' });
    }
  };
}

describe('a reclaim refused after a restart', () => {
  it('fails the append in flight and one made meanwhile with LeaseRevoked, sending neither', async () => {
    const seen: Record<string, unknown>[] = [];
    const reclaim = deferred<() => void>();
    const { address, server } = await scriptedService(refusingService(seen, reclaim.resolve));
    try {
      const sl = await connect(address, { keepaliveMs: 0, reconnectForMs: 5_000 });
      const lease = await sl.lane('a').lease('/s/a.jsonl');
      assert.ok(lease !== null);
      const inFlight = lease.append({ n: 1 }).catch((err: unknown) => err);
      const answer = await reclaim.promise; // the revival's reclaim reached the new service
      const meanwhile = lease.append({ n: 2 }).catch((err: unknown) => err);
      answer();
      for (const err of [await inFlight, await meanwhile]) {
        assert.ok(err instanceof LeaseRevoked, String(err));
        assert.equal(err.reason, 'restart');
      }
      assert.ok(await inFlight instanceof UnknownOutcome, 'the append sent may be in the file');
      assert.ok(!(await meanwhile instanceof UnknownOutcome), 'the one made meanwhile was not sent');
      assert.equal(lease.revoked, 'restart');
      const second = seen.filter((r) => r['connection'] === 2);
      assert.deepEqual(second.map((r) => r['type']), ['acquire'], 'only the reclaim was sent');
      await lease.release({ quiet: true });
      await sl.close();
    } finally {
      server.close();
    }
  });
});

/**
 * A service that grants lane `a` a lease with a reclaim secret and queues every other
 * acquire; `stop()` stops it as a killed service would: its connection drops and nothing
 * listens at its address any more.
 */
async function stoppableService(
  onAppend: () => void = () => undefined,
): Promise<{ address: string; stop: () => void }> {
  let live: net.Socket | null = null;
  const { address, server } = await scriptedService((request, send, socket) => {
    live = socket;
    const id = request['id'];
    if (request['type'] === 'append') onAppend(); // and never answered
    if (request['type'] !== 'acquire') return;
    if (request['lane'] === 'a') {
      send({ type: 'granted', id, lease: 'L1', fence: 7, path: request['path'],
             purpose: 'prompt', secret: 'S'.repeat(32) });
    } else {
      send({ type: 'queued', id, position: 1 });
    }
  });
  const stop = (): void => {
    server.close();
    (live as net.Socket | null)?.destroy();
  };
  return { address, stop };
}

describe('an acquire budget while the connection rides out a lost service', () => {
  it('bounds an acquire queued before the loss and one made during it; the lease rides on', async () => {
    const { address, stop } = await stoppableService();
    const sl = await connect(address, { keepaliveMs: 0, reconnectForMs: 60_000 });
    try {
      const lease = await sl.lane('a').lease('/s/a.jsonl');
      assert.ok(lease !== null);
      const queued = deferred();
      const started = Date.now();
      const waiting = sl
        .lane('b')
        .lease('/s/a.jsonl', { waitTimeoutMs: 400, onQueued: () => queued.resolve() })
        .catch((err: unknown) => err);
      await queued.promise;
      stop(); // the connection rides out for 60 s: far past either acquire's 400 ms
      const queuedErr = await waiting;
      const meanwhile = await sl
        .lane('c')
        .lease('/s/a.jsonl', { waitTimeoutMs: 400 })
        .catch((err: unknown) => err);
      for (const err of [queuedErr, meanwhile]) {
        assert.ok(err instanceof LeaseTimeout, String(err));
        assert.ok(err.cause instanceof Unavailable, 'the service was away');
        assert.equal(err.path, '/s/a.jsonl');
      }
      assert.ok(Date.now() - started < 20_000, 'each acquire gave up at its own budget');
      assert.equal(lease.revoked, null, 'the held lease still rides out the loss');
      assert.equal(lease.signal.aborted, false);
    } finally {
      await sl.close();
    }
  });
});

describe('a lease the stopped service cannot give back', () => {
  it('is lost after one ride-out window; a call made meanwhile waits for it', async () => {
    const arrived = deferred();
    const { address, stop } = await stoppableService(arrived.resolve);
    const windowMs = 1_500;
    const sl = await connect(address, { keepaliveMs: 0, reconnectForMs: windowMs });
    try {
      const lease = await sl.lane('a').lease('/s/a.jsonl');
      assert.ok(lease !== null);
      const inFlight = lease.append({ n: 1 }).catch((err: unknown) => err);
      await arrived.promise;
      stop();
      const stopped = Date.now();
      const meanwhile = await lease.append({ n: 2 }).catch((err: unknown) => err);
      const took = Date.now() - stopped;
      // (Sent before the client saw the loss, it is of unknown outcome, a LeaseRevoked too.)
      assert.ok(meanwhile instanceof LeaseRevoked, String(meanwhile));
      assert.ok(took < 2 * windowMs, `${took} ms: more than one ${windowMs} ms window`);
      assert.ok((await inFlight) instanceof UnknownOutcome, 'the append sent may be in the file');
      assert.notEqual(lease.revoked, null);
    } finally {
      await sl.close();
    }
  });
});

/**
 * A service whose append with `release` released the lease before it died: the reclaim is
 * refused (the lease is gone), the resent append answered as written from the lease record.
 */
function releasedBeforeTheCrash(seen: Record<string, unknown>[], written: boolean): Script {
  let connections = 0;
  let lastSocket: net.Socket | null = null;
  return (request, send, socket) => {
    if (socket !== lastSocket) {
      lastSocket = socket;
      connections += 1;
    }
    seen.push({ connection: connections, ...request });
    const id = request['id'];
    if (connections === 1 && request['type'] === 'acquire') {
      send({ type: 'granted', id, lease: 'L1', fence: 7, path: request['path'],
             purpose: 'prompt', secret: 'S'.repeat(32) });
    } else if (connections === 1) {
      socket.destroy(); // written and released, then the service dies before the answer
    } else if (request['type'] === 'acquire') {
      send({ type: 'error', id, code: 'reclaim_refused', detail: 'no longer held here' });
    } else if (written) {
      send({ type: 'appended', id, offset: 0, lines: 1, fence: 7, released: true });
    } else {
      send({ type: 'error', id, code: 'stale_fence', detail: 'not current' });
    }
  };
}

describe('an append that released before a restart', () => {
  it('is sent again though its lease is not reclaimed, and answered as written', async () => {
    for (const written of [true, false]) {
      const seen: Record<string, unknown>[] = [];
      const { address, server } = await scriptedService(releasedBeforeTheCrash(seen, written));
      try {
        const sl = await connect(address, { keepaliveMs: 0, reconnectForMs: 5_000 });
        const lease = await sl.lane('a').lease('/s/a.jsonl');
        assert.ok(lease !== null);
        const outcome = await lease
          .appendRecords([{ n: 1 }], { release: true })
          .catch((err: unknown) => err);
        const [before, after] = seen.filter((r) => r['type'] === 'append');
        assert.equal(after?.['aid'], before?.['aid'], 'resent with its id');
        assert.equal(after?.['release'], true);
        if (written) {
          assert.deepEqual(outcome, { offset: 0, lines: 1, fence: 7 });
          assert.equal(lease.released, true);
        } else {
          // Sent before the loss: it may be in the file (the next holder may have released
          // since the lease record kept it), so of unknown outcome, never "not written".
          assert.ok(outcome instanceof UnknownOutcome, String(outcome));
          assert.equal(outcome.reason, 'restart');
        }
        await sl.close();
      } finally {
        server.close();
      }
    }
  });
});

describe('connection loss', () => {
  it('rejects pending calls with Unavailable and revokes every lease, aborting its signal', async () => {
    const { address, server } = await scriptedService(grantOnceThenDrop());
    try {
      const sl = await connect(address, { keepaliveMs: 0 });
      assert.equal(sl.server, 'scripted');
      const lease = await sl.lane('a').lease('/s/a.jsonl');
      assert.ok(lease !== null);
      assert.equal(lease.fence, 7);
      const closed = once(sl, 'close');
      let position = 0;
      let revokedAtRejection: string | null = null;
      const waiting = sl
        .lane('b')
        .lease('/s/b.jsonl', { onQueued: (p) => (position = p) })
        .catch((err: unknown) => {
          revokedAtRejection = lease.revoked;
          throw err;
        });
      await assert.rejects(waiting, Unavailable);
      assert.equal(position, 1);
      assert.equal(revokedAtRejection, 'connection_lost', 'revoked before the rejection');
      await closed;
      assert.equal(sl.closed, true);
      assert.equal(lease.signal.aborted, true);
      assert.ok(lease.signal.reason instanceof LeaseRevoked);
      await assert.rejects(lease.append({ n: 1 }), LeaseRevoked);
      await assert.rejects(sl.status(), Unavailable);
      await lease.release({ quiet: true });
    } finally {
      server.close();
    }
  });

  it('releases a grant that arrives after its caller gave up waiting', async () => {
    const release = deferred<unknown>();
    // No answer to the acquire: the grant comes after the caller gave up.
    const { address, server } = await scriptedService(lateGrant(release.resolve));
    try {
      const sl = await connect(address, { keepaliveMs: 0, timeoutMs: 100 });
      await assert.rejects(
        sl.lane('a').lease('/s/late.jsonl', { waitTimeoutMs: 0 }),
        (err: unknown) => {
          assert.ok(err instanceof Unavailable);
          assert.match(err.detail, /no reply to acquire/);
          return true;
        },
      );
      await sl.request('keepalive', {});
      assert.equal(await release.promise, 'LATE');
      await sl.close();
    } finally {
      server.close();
    }
  });

  it('fails at once with Unavailable when nothing listens', async () => {
    const port = await closedPort();
    await assert.rejects(connect(`tcp://127.0.0.1:${port}`), (err: unknown) => {
      assert.ok(err instanceof Unavailable);
      assert.match(err.detail, /cannot reach sessionlane/);
      return true;
    });
  });
});

describe('giving up a queued acquire with a signal', () => {
  it('rejects with the reason at once and releases the grant that comes late', async () => {
    let acquires = 0;
    const release = deferred<unknown>();
    const queued = deferred();
    // Queued; the grant comes once the holder before us released, after the caller gave up.
    const { address, server } = await scriptedService(
      lateGrant(release.resolve, (id, send) => {
        acquires += 1;
        send({ type: 'queued', id, position: 1 });
      }),
    );
    try {
      const sl = await connect(address, { keepaliveMs: 0 });
      const controller = new AbortController();
      const lease = sl.lane('a').lease('/s/q.jsonl', {
        signal: controller.signal,
        onQueued: () => queued.resolve(),
      });
      await queued.promise;
      const why = new Error('the turn was cancelled');
      controller.abort(why);
      await assert.rejects(lease, (err: unknown) => err === why);
      await sl.request('keepalive', {});
      assert.equal(await release.promise, 'LATE');
      // Aborted already: nothing is sent.
      await assert.rejects(
        sl.lane('a').lease('/s/q.jsonl', { signal: AbortSignal.abort() }),
        (err: unknown) => err instanceof DOMException && err.name === 'AbortError',
      );
      assert.equal(acquires, 1);
      await sl.close();
    } finally {
      server.close();
    }
  });
});

describe('the default address', () => {
  it('is $SESSIONLANE_LISTEN when it is set', async () => {
    const { address, server } = await scriptedService(() => undefined);
    const before = process.env['SESSIONLANE_LISTEN'];
    process.env['SESSIONLANE_LISTEN'] = `tcp://${address}`;
    try {
      const sl = await connect();
      assert.equal(sl.address, `tcp://${address}`);
      assert.equal(sl.server, 'scripted');
      await sl.close();
    } finally {
      if (before === undefined) delete process.env['SESSIONLANE_LISTEN'];
      else process.env['SESSIONLANE_LISTEN'] = before;
      server.close();
    }
  });
});

describe('error causes', () => {
  it('keep what caused them: the socket error of a refused connect', async () => {
    const port = await closedPort();
    await assert.rejects(connect(`tcp://127.0.0.1:${port}`), (err: unknown) => {
      assert.ok(err instanceof Unavailable);
      assert.ok(err.cause instanceof Error);
      assert.equal((err.cause as NodeJS.ErrnoException).code, 'ECONNREFUSED');
      return true;
    });
  });
});

describe('reconnectForMs', () => {
  it('keeps a connect trying while nobody listens, backing off as the Python client', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sl-retry-'));
    const path = join(dir, 'sl.sock');
    // The service binds elsewhere and appears at the address only after the first refusal.
    const { server } = await scriptedService(() => undefined, `${path}.starting`);
    try {
      const retries: [string | undefined, number][] = [];
      const sl = await connect(`unix://${path}`, {
        keepaliveMs: 0,
        reconnectForMs: 30_000,
        onRetry: (err, delayMs) => {
          retries.push([(err as NodeJS.ErrnoException).code, delayMs]);
          if (retries.length === 2) renameSync(`${path}.starting`, path);
        },
      });
      assert.equal(sl.server, 'scripted');
      assert.deepEqual(retries, [
        ['ENOENT', 50],
        ['ENOENT', 100],
      ]);
      await sl.close();
      // Without it: one attempt, the refusal as the cause.
      const refusals: unknown[] = [];
      await assert.rejects(
        connect(`unix://${path}.gone`, { onRetry: (err) => refusals.push(err) }),
        (err: unknown) => {
          assert.ok(err instanceof Unavailable);
          assert.equal((err.cause as NodeJS.ErrnoException).code, 'ENOENT');
          return true;
        },
      );
      assert.deepEqual(refusals, []);
    } finally {
      server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

/**
 * A service that grants lane `a` a lease and writes its appends in memory: each is answered
 * at the offset of its first line, with the offset of each line when it asks (`offsets`), and
 * one whose records include `{ fail: code }` is answered with that error code, as is every
 * append after it (`pipeline_broken`). `seen` gets each append's records and fields.
 */
function groupWritingService(seen: Record<string, unknown>[]) {
  let size = 0;
  let broken = false;
  return (request: Record<string, unknown>, send: Send): void => {
    const id = request['id'];
    if (request['type'] === 'acquire') {
      send({ type: 'granted', id, lease: 'L1', fence: 7, path: request['path'],
             purpose: 'prompt' });
      return;
    }
    if (request['type'] !== 'append') return;
    seen.push(request);
    const records = request['records'] as Record<string, unknown>[];
    const failing = records.find((r) => typeof r['fail'] === 'string');
    if (broken || failing !== undefined) {
      const code = broken ? 'pipeline_broken' : (failing!['fail'] as string);
      broken = true;
      send({ type: 'error', id, code, detail: 'scripted' });
      return;
    }
    const offsets: number[] = [];
    for (const record of records) {
      offsets.push(size);
      size += Buffer.byteLength(JSON.stringify(record)) + 1;
    }
    const answer = { type: 'appended', id, offset: offsets[0], lines: records.length, fence: 7 };
    send(request['offsets'] === true ? { ...answer, offsets } : answer);
  };
}

/** A lease on a scripted service that writes groups (``groupWritingService``): ``body`` gets it
 * and the appends the service saw. */
async function onGroupWritingService(
  options: { maxFrameBytes?: number },
  body: (lease: Lease, seen: Record<string, unknown>[]) => Promise<void>,
): Promise<void> {
  const seen: Record<string, unknown>[] = [];
  const { address, server } = await scriptedService(groupWritingService(seen));
  const sl = await connect(address, { keepaliveMs: 0, ...options });
  try {
    const lease = await sl.lane('a').lease('/s/a.jsonl');
    assert.ok(lease !== null);
    await body(lease, seen);
  } finally {
    await sl.close();
    server.close();
  }
}

describe('a pipeline in groups (against a scripted service)', () => {
  it('sends a quarter of the window per append and answers each record at its own offset', async () => {
    await onGroupWritingService({}, async (lease, seen) => {
      const records = Array.from({ length: 50 }, (_, n) => ({ n }));
      const results = await lease.appendPipelined(records, { window: 16 });
      assert.deepEqual(seen.map((r) => (r['records'] as unknown[]).length), [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 2]);
      assert.ok(seen.every((r) => r['offsets'] === true));
      assert.deepEqual(seen.slice(1).map((r) => r['after']), seen.slice(0, -1).map((r) => r['aid']));
      let at = 0;
      results.forEach((result, n) => {
        assert.deepEqual(result, { offset: at, lines: 1, fence: 7 });
        at += Buffer.byteLength(JSON.stringify(records[n])) + 1;
      });
    });
  });

  it('cuts a group short where its frame would pass maxFrameBytes', async () => {
    await onGroupWritingService({ maxFrameBytes: 2_000 }, async (lease, seen) => {
      const records = Array.from({ length: 20 }, (_, n) => ({ n, pad: 'x'.repeat(300) }));
      const results = await lease.appendPipelined(records, { window: 64 });
      assert.equal(results.length, 20);
      const sizes = seen.map((r) => (r['records'] as unknown[]).length);
      assert.ok(sizes.every((k) => k >= 1 && k <= 4), JSON.stringify(sizes)); // 1,488 bytes
      assert.equal(sizes.reduce((a, b) => a + b, 0), 20);
    });
  });

  for (const [code, unknown] of [['invalid_record', 0], ['disk_full', 4]] as const) {
    it(`stops at the group that failed (${code}): written, failed, unknown in records`, async () => {
      await onGroupWritingService({}, async (lease) => {
        const records: Record<string, unknown>[] = Array.from({ length: 40 }, (_, n) => ({ n }));
        records[13] = { fail: code }; // in the group of records 12 to 15
        const err = await lease.appendPipelined(records, { window: 16 }).then(
          () => assert.fail('the pipeline went through'),
          (caught: unknown) => caught,
        );
        assert.ok(err instanceof PipelineBroken, String(err));
        assert.deepEqual([err.failed, err.unknown, err.written.length], [12, unknown, 12]);
        assert.ok(err.cause instanceof SessionLaneError && err.cause.code === code, String(err.cause));
        const what = unknown > 0 ? /records 12 to 15 may or may not be in the file/ : /record 12 and the ones after it were not written/;
        assert.match(err.detail, what);
      });
    });
  }
});
