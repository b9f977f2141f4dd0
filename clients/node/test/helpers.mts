// Shared by the tests: the service pytest started, fresh transcript paths, file contents.
import { randomUUID } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';

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
