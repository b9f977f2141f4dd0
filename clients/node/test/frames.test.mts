// What the client reads is bounded (#19 finding 7): a hostile peer on a real Unix socket says
// hello like a service, then sends an oversized header, a huge frame in small pieces, or a
// frame of nested arrays. The client refuses each one with a typed error, closes, and lives.
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, it } from 'node:test';

import { BadFrame, SessionLaneError, TooLarge, Unavailable, connect } from 'sessionlane';
import { framed, scriptedService } from './helpers.mjs';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'sl-frames-'));
after(() => rmSync(dir, { recursive: true, force: true }));

/** Bytes `socket` could write of `data`, in 64 KiB pieces as the reader drains them. */
async function trickle(socket: net.Socket, data: Buffer): Promise<number> {
  let written = 0;
  let gone = false;
  socket.once('close', () => (gone = true));
  socket.on('error', () => (gone = true));
  for (let at = 0; at < data.length && !gone; at += 64 * 1024) {
    const piece = data.subarray(at, at + 64 * 1024);
    if (!socket.write(piece)) {
      // Not events.once: it rejects on the 'error' a reset brings.
      await new Promise<void>((resolve) => {
        const done = (): void => {
          socket.off('drain', done).off('close', done).off('error', done);
          resolve();
        };
        socket.on('drain', done).on('close', done).on('error', done);
      });
    }
    if (!gone) written += piece.length;
  }
  return written;
}

/**
 * A peer that welcomes the hello, then answers each request (its id) with
 * `attack(socket, id)`; resolves `written` with what the first attack got out.
 */
async function hostile(
  attack: (socket: net.Socket, id: unknown) => Promise<number>,
): Promise<{ address: string; server: net.Server; written: Promise<number> }> {
  let report: (bytes: number) => void = () => undefined;
  const written = new Promise<number>((resolve) => (report = resolve));
  const { address, server } = await scriptedService(
    (request, _send, socket) => void attack(socket, request['id']).then(report),
    join(dir, `peer-${Math.random().toString(36).slice(2)}.sock`),
  );
  return { address, server, written };
}

/** The error a pending call got when the connection closed on a bad frame: its cause. */
function causedBy(cls: typeof SessionLaneError): (err: unknown) => boolean {
  return (err: unknown) => {
    assert.ok(err instanceof Unavailable, `${String(err)} is not Unavailable`);
    assert.ok(err.cause instanceof cls, `cause ${String(err.cause)} is not a ${cls.name}`);
    return true;
  };
}

describe('bounded reads', () => {
  it('refuses a header over maxFrameBytes before reading its body', async () => {
    // 64 MiB announced and sent in pieces: the client must stop at the header.
    const body = Buffer.alloc(64 * MiB, 0xa1);
    const { address, server, written } = await hostile(async (socket) => {
      const header = Buffer.alloc(4);
      header.writeUInt32BE(body.length, 0);
      socket.write(header);
      return trickle(socket, body);
    });
    try {
      const sl = await connect(address, { keepaliveMs: 0, maxFrameBytes: 1 * MiB });
      const closed = once(sl, 'close');
      await assert.rejects(sl.status(), causedBy(TooLarge));
      const [reason] = (await closed) as [string];
      assert.match(reason, /announced a frame of 67108864 bytes, over max_frame_bytes/);
      // What the peer got out before the client hung up: socket buffers, not the frame.
      const sent = await written;
      assert.ok(sent < 8 * MiB, `the peer wrote ${sent} bytes before the client closed`);
    } finally {
      server.close();
    }
  });

  it('reads a large frame sent in small pieces in linear time', async () => {
    // Allowed by the caller's maxFrameBytes: 1,024 pieces joined once, not 1,024 times.
    const detail = 'x'.repeat(48 * MiB);
    const { address, server } = await hostile(async (socket, id) =>
      trickle(socket, framed({ v: 1, type: 'error', id, code: 'internal', detail })),
    );
    try {
      const sl = await connect(address, { keepaliveMs: 0, maxFrameBytes: 64 * MiB });
      const before = process.cpuUsage();
      await assert.rejects(sl.status(), (err: unknown) => {
        assert.ok(err instanceof SessionLaneError);
        assert.equal(err.detail.length, detail.length);
        return true;
      });
      const used = process.cpuUsage(before);
      const cpuMs = (used.user + used.system) / 1000;
      // Joining per piece copies ~24 GiB here (many seconds); once, 48 MiB. Both ends are in
      // this process: the peer's writes count too. The bound is 10x what linear takes.
      assert.ok(cpuMs < 5000, `receiving a 48 MiB frame in pieces took ${cpuMs} ms of CPU`);
      await sl.close();
    } finally {
      server.close();
    }
  });

  it('refuses nested arrays past the depth limit without decoding them', async () => {
    // The frame of finding 7: 60 MB of nested one-item arrays (heap exhaustion when decoded).
    const nested = Buffer.alloc(60_000_000, 0x91);
    nested[nested.length - 1] = 0xc0;
    const { address, server } = await hostile(async (socket) => {
      const header = Buffer.alloc(4);
      header.writeUInt32BE(nested.length, 0);
      socket.write(header);
      return trickle(socket, nested);
    });
    try {
      const sl = await connect(address, { keepaliveMs: 0, maxFrameBytes: 64 * MiB });
      const heapBefore = process.memoryUsage().heapUsed;
      await assert.rejects(sl.status(), causedBy(BadFrame));
      const grown = process.memoryUsage().heapUsed - heapBefore;
      assert.ok(grown < 32 * MiB, `the heap grew by ${grown} bytes`);
      assert.equal(sl.closed, true);
    } finally {
      server.close();
    }
  });

  it('refuses a frame that lies about its lengths, or is not a known message', async () => {
    const raw = (body: Buffer): Buffer => {
      const header = Buffer.alloc(4);
      header.writeUInt32BE(body.length, 0);
      return Buffer.concat([header, body]);
    };
    // Why the client refuses it, and the frame (given the request's id) that the peer answers.
    const frames: [string, (id: unknown) => Buffer][] = [
      // a map announcing 2^32-1 entries in 5 bytes
      ['items announced', () => raw(Buffer.from([0xdf, 0xff, 0xff, 0xff, 0xff]))],
      // a string announcing 255 bytes, holding 1
      ['more bytes announced', () => raw(Buffer.from([0xd9, 0xff, 0x41]))],
      // an extension type (a timestamp)
      ['not allowed', () => raw(Buffer.from([0xd6, 0xff, 0, 0, 0, 0]))],
      // a map, then garbage
      ['after the message', () => raw(Buffer.from([0x80, 0x01]))],
      // well-formed msgpack, but not a message the client knows
      ['unknown type', (id) => framed({ v: 1, type: 'surprise', id })],
      [
        'fence is a string',
        (id) => framed({ v: 1, type: 'appended', id, offset: 0, lines: 1, fence: '7' }),
      ],
      [
        'purpose is missing',
        (id) => framed({ v: 1, type: 'granted', id, lease: 'L', fence: 1, path: '/p' }),
      ],
    ];
    for (const [why, frame] of frames) {
      const { address, server } = await hostile(async (socket, id) => {
        const out = frame(id);
        socket.write(out);
        return out.length;
      });
      try {
        const sl = await connect(address, { keepaliveMs: 0 });
        await assert.rejects(sl.status(), (err: unknown) => {
          causedBy(BadFrame)(err);
          assert.match(String((err as Unavailable).cause), new RegExp(why));
          return true;
        }, why);
      } finally {
        server.close();
      }
    }
  });
});
