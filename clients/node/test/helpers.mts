// Shared by the tests: the service pytest started, fresh transcript paths, file contents, and
// a scripted stand-in for the service on a real socket.
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';

import { Decoder, Encoder } from '@msgpack/msgpack';

/** The service under test (`tests/test_node_client.py` starts it and sets these). */
export const ADDRESS = process.env['NODE_TEST_SESSIONLANE_ADDRESS'];
export const ROOT = process.env['NODE_TEST_SESSIONLANE_ROOT'];

/** For `describe(..., needsService, ...)`: skipped, with the reason, without a service. */
export const needsService =
  ADDRESS && ROOT
    ? {}
    : { skip: 'NODE_TEST_SESSIONLANE_ADDRESS and NODE_TEST_SESSIONLANE_ROOT are not set' };

export function address(): string {
  if (!ADDRESS) throw new Error('NODE_TEST_SESSIONLANE_ADDRESS is not set');
  return ADDRESS;
}

/** A transcript path inside the root that no other test uses. */
export function freshPath(name: string): string {
  if (!ROOT) throw new Error('NODE_TEST_SESSIONLANE_ROOT is not set');
  return `${ROOT}/${name}-${randomUUID()}.jsonl`;
}

/** The records in the file, in order (none if it does not exist). */
export function lines(path: string): unknown[] {
  if (!existsSync(path)) return [];
  return readFileSync(path, 'utf8')
    .split('\n')
    .filter((line) => line !== '')
    .map((line) => JSON.parse(line) as unknown);
}

/** A promise and the function that resolves it. */
export function deferred<T = void>(): { promise: Promise<T>; resolve: (value: T) => void } {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** Sends one message (the protocol version `v: 1` is added) to the client. */
export type Send = (message: object) => void;

/** What a scripted service does with each request after the hello. */
export type Script = (request: Record<string, unknown>, send: Send, socket: net.Socket) => void;

const encoder = new Encoder();

/** `message` as the service frames it: a 4-byte big-endian length, then the msgpack body. */
export function framed(message: object): Buffer {
  const body = encoder.encode(message);
  const header = Buffer.alloc(4);
  header.writeUInt32BE(body.byteLength, 0);
  return Buffer.concat([header, body]);
}

/**
 * A scripted peer on a real socket: a Unix socket at `unixPath`, else TCP on loopback. It
 * welcomes each connection's hello as server `scripted`, hands every other request to
 * `script` in the order it arrived, and reads nothing more from a connection the script
 * destroyed. Errors on its side of a connection are ignored (the client may cut it).
 */
export async function scriptedService(
  script: Script,
  unixPath?: string,
): Promise<{ address: string; server: net.Server }> {
  const decoder = new Decoder();
  const server = net.createServer((socket) => {
    let buffer = Buffer.alloc(0);
    const send: Send = (message) => socket.write(framed({ v: 1, ...message }));
    socket.on('error', () => undefined);
    socket.on('data', (chunk) => {
      buffer = Buffer.concat([buffer, chunk]);
      while (
        !socket.destroyed &&
        buffer.length >= 4 &&
        buffer.length >= 4 + buffer.readUInt32BE(0)
      ) {
        const length = buffer.readUInt32BE(0);
        const request = decoder.decode(buffer.subarray(4, 4 + length)) as Record<string, unknown>;
        buffer = buffer.subarray(4 + length);
        if (request['type'] === 'hello') {
          send({ type: 'welcome', id: request['id'], server: 'scripted', protocol: 1 });
        } else {
          script(request, send, socket);
        }
      }
    });
  });
  if (unixPath !== undefined) {
    server.listen(unixPath);
    await once(server, 'listening');
    return { address: `unix://${unixPath}`, server };
  }
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as net.AddressInfo;
  return { address: `127.0.0.1:${port}`, server };
}

/** A loopback TCP port that nothing listens on: bound, then closed. */
export async function closedPort(): Promise<number> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address() as net.AddressInfo;
  server.close();
  await once(server, 'close');
  return port;
}
