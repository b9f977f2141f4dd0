/** Service addresses: `HOST:PORT`, `tcp://HOST:PORT` or `unix:///path` (as everywhere else). */

import { isAbsolute } from 'node:path';

export const DEFAULT_ADDRESS = 'tcp://127.0.0.1:7420';

/** The environment variable a service in the same environment listens on. */
export const ADDRESS_ENV = 'SESSIONLANE_LISTEN';

/** `$SESSIONLANE_LISTEN` (what a service in the same environment listens on), else
 * `DEFAULT_ADDRESS`, as the Python client does. Read at each call. */
export function defaultAddress(): string {
  return process.env[ADDRESS_ENV] || DEFAULT_ADDRESS;
}

/** Where to connect: a TCP host and port, or a Unix socket path. */
export type Target = { host: string; port: number } | { path: string };

/**
 * Parse an address. `HOST:PORT` and `tcp://HOST:PORT` (IPv6 hosts in brackets) give a TCP
 * target, `unix:///abs/path` a Unix socket; anything else throws a `TypeError` naming the forms.
 */
export function parseAddress(address: string): Target {
  if (address.startsWith('unix://')) {
    const path = address.slice('unix://'.length);
    if (!path.startsWith('/')) {
      throw new TypeError(`a unix socket path must be absolute: ${address}`);
    }
    return { path };
  }
  const rest = address.startsWith('tcp://') ? address.slice('tcp://'.length) : address;
  const colon = rest.lastIndexOf(':');
  const portText = rest.slice(colon + 1);
  const port = /^\d+$/.test(portText) ? Number(portText) : NaN;
  let host = colon > 0 ? rest.slice(0, colon) : '';
  if (host.startsWith('[') && host.endsWith(']')) host = host.slice(1, -1);
  if (colon < 0 || !host || host.includes('/') || !(port > 0 && port <= 65535)) {
    throw new TypeError(
      `not a sessionlane address: ${address} (expected HOST:PORT, tcp://HOST:PORT or unix:///path)`,
    );
  }
  return { host, port };
}

/**
 * Relative paths are the caller's: anchor them at the working directory. No lexical `..`
 * folding: the service resolves symlinks first, as the OS would.
 */
export function anchor(path: string): string {
  return isAbsolute(path) ? path : `${process.cwd()}/${path}`;
}
