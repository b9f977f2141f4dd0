// A write whose own connection is lost after it was sent may be in the file (#22): the client
// raises UnknownOutcome ("read the file"), never StaleFence or a plain Unavailable, as the
// Python client does (tests/test_unknown_outcome.py). The service here is a peer on a real Unix
// socket that grants, then closes the connection the moment an append (or rewrite) arrives.
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';

import { LeaseRevoked, StaleFence, UnknownOutcome, Unavailable, connect } from 'sessionlane';
import { scriptedService } from './helpers.mjs';

const dir = mkdtempSync(join(tmpdir(), 'sl-unknown-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** A service that grants every acquire and cuts the connection when a write arrives. */
async function cutOnWrite(): Promise<{ address: string; server: net.Server; cut: Promise<string> }> {
  let report: (type: string) => void = () => undefined;
  const cut = new Promise<string>((resolve) => (report = resolve));
  const { address, server } = await scriptedService(
    (request, send, socket) => {
      const id = request['id'];
      if (request['type'] === 'acquire') {
        const { path, purpose } = request;
        send({ type: 'granted', id, lease: 'l-1', fence: 3, path, purpose });
      } else if (request['type'] === 'append' || request['type'] === 'rewrite') {
        socket.destroy(); // the write was received: its answer never comes
        report(String(request['type']));
      }
    },
    join(dir, `peer-${Math.random().toString(36).slice(2)}.sock`),
  );
  return { address, server, cut };
}

describe('a write whose connection is lost after it was sent', () => {
  it('raises UnknownOutcome under a lease, which is revoked (connection_lost)', async () => {
    const { address, server, cut } = await cutOnWrite();
    try {
      const sl = await connect(address, { keepaliveMs: 0 });
      const lease = await sl.lane('main').lease('/srv/a.jsonl');
      assert.ok(lease !== null);
      const appending = lease.append({ n: 1 });
      assert.equal(await cut, 'append');
      await assert.rejects(appending, (err: unknown) => {
        assert.ok(err instanceof UnknownOutcome, `${String(err)} is not UnknownOutcome`);
        assert.ok(!(err instanceof StaleFence), 'never "nothing written"');
        assert.equal(err.code, 'unknown_outcome');
        assert.equal(err.reason, 'connection_lost');
        assert.match(err.detail, /read it to know/);
        return true;
      });
      assert.equal(lease.revoked, 'connection_lost');
      assert.ok(lease.signal.aborted);
      assert.ok(lease.signal.reason instanceof LeaseRevoked);
    } finally {
      server.close();
    }
  });

  it('raises UnknownOutcome for a lane append and a rewrite too', async () => {
    for (const write of ['lane append', 'rewrite'] as const) {
      const { address, server, cut } = await cutOnWrite();
      try {
        const sl = await connect(address, { keepaliveMs: 0 });
        const lane = sl.lane('main');
        const writing =
          write === 'lane append'
            ? lane.append('/srv/a.jsonl', { n: 1 })
            : (await lane.lease('/srv/a.jsonl', { purpose: 'compaction' }))!.rewrite([{ n: 1 }]);
        await cut;
        await assert.rejects(writing, UnknownOutcome, write);
        // A request that writes nothing is only Unavailable.
        await assert.rejects(sl.status(), Unavailable);
      } finally {
        server.close();
      }
    }
  });
});
