// Connect, take a lease on a transcript, append to it, release: the sessionlane Node client.
//
//     npm install sessionlane          (or, from this repository: see README.md here)
//     sessionlane serve --root /srv/sessions &
//     node append.mjs /srv/sessions/demo.jsonl
//
// The address is $SESSIONLANE_LISTEN, else tcp://127.0.0.1:7420; a service with a token_file
// wants its token in $SESSIONLANE_TOKEN_FILE here. Prints one JSON line per append.
import { readFileSync } from 'node:fs';

import { connect, LeaseTimeout } from 'sessionlane';

const [path = 'demo.jsonl', lane = 'agent:example'] = process.argv.slice(2);
const tokenFile = process.env.SESSIONLANE_TOKEN_FILE;
// A token file's trailing newline is not part of the token: the client trims it.
const token = tokenFile ? readFileSync(tokenFile, 'utf8') : undefined;

const sl = await connect(undefined, { token, client: 'examples/node' });
try {
  const lease = await sl.lane(lane).lease(path, {
    waitTimeoutMs: 10_000,
    onQueued: (position) => console.error(`waiting: position ${position} in the queue`),
  });
  if (lease === null) throw new Error('unreachable: onContention is "wait"');
  try {
    for (const text of ['hello', 'world']) {
      // Every write carries the lease's fence: a holder that lost the lease writes nothing.
      const { offset, lines, fence } = await lease.append({ type: 'message', lane, text });
      console.log(JSON.stringify({ offset, lines, fence }));
    }
  } finally {
    await lease.release({ quiet: true }); // `await using lease = ...` in TypeScript
  }
} catch (err) {
  if (!(err instanceof LeaseTimeout)) throw err;
  console.error(`${path} stayed busy: ${err.detail}`);
  process.exitCode = 2;
} finally {
  await sl.close();
}
