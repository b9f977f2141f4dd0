// What the client verifies before it says anything (src/trust.ts), without a service: the
// token proofs of docs/protocol.md's worked example, the /proc/net/tcp owner lookup on
// literal lines, and the refusals.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { endianness } from 'node:os';
import { describe, it } from 'node:test';

import type * as Trust from '../dist/trust.js';

// The compiled test runs from build/test: the package's internals are two levels up.
const trust = createRequire(import.meta.url)('../../dist/trust.js') as typeof Trust;

const range = (from: number, to: number): Uint8Array =>
  Uint8Array.from({ length: to - from }, (_, i) => from + i);

describe('the token proof', () => {
  const token = '0123456789abcdef0123456789abcdef';
  const nc = range(0, 32);
  const ns = range(32, 64);

  it('gives the worked example of docs/protocol.md', () => {
    assert.equal(
      trust.clientProof(token, nc, ns).toString('hex'),
      '1dcff4a3af71ef0485bb9cdff7c324a132690d4e39c3f9b68853a31136cb9b26',
    );
    const server = Buffer.from(
      'eae33381ce57c64253d1699c3c908084372f3add8f6f865463fe34f892093ad2',
      'hex',
    );
    assert.ok(trust.serverProofMatches(server, token, nc, ns));
  });

  it('refuses a missing, short or other proof, and the client proof as the service one', () => {
    const mine = trust.clientProof(token, nc, ns);
    for (const given of [undefined, null, 'proof', new Uint8Array(3), mine]) {
      assert.equal(trust.serverProofMatches(given, token, nc, ns), false);
    }
  });
});

describe('who owns the service socket', () => {
  it('spells addresses as /proc/net/tcp does', () => {
    const le = endianness() === 'LE';
    assert.equal(trust.procAddress(Uint8Array.from([127, 0, 0, 1]), 7420), le ? '0100007F:1CFC' : '7F000001:1CFC');
  });

  it('finds the owner of the one socket with both ends, not in TIME_WAIT', () => {
    const table = [
      '  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode',
      '   0: 0100007F:1CFC 0100007F:D431 06 00000000:00000000 03:00000F5D 00000000     0        0 0',
      '   1: 0100007F:1CFC 0100007F:D432 01 00000000:00000000 00:00000000 00000000 65534        0 1',
      '',
    ].join('\n');
    assert.equal(trust.ownerInTable(table, '0100007F:1CFC', '0100007F:D432'), 65534);
    assert.equal(trust.ownerInTable(table, '0100007F:1CFC', '0100007F:D431'), null, 'TIME_WAIT');
    assert.equal(trust.ownerInTable(table, '0100007F:1CFD', '0100007F:D432'), null);
  });
});

describe('the refusals', () => {
  const me = process.geteuid?.() ?? 0;

  it('without a token, serves only a socket of this user unless told otherwise', () => {
    assert.equal(trust.serviceRefusal('tcp://127.0.0.1:7420', me, undefined, undefined), null);
    const other = me === 65534 ? 65533 : 65534;
    const refusal = trust.serviceRefusal('tcp://127.0.0.1:7420', other, undefined, undefined);
    assert.match(refusal ?? '', new RegExp(`runs as uid ${other}, not uid ${me} \\(this client's user\\)`));
    assert.match(refusal ?? '', new RegExp(`pass serviceUser: ${other}`));
    assert.equal(trust.serviceRefusal('x', other, undefined, other), null);
    assert.equal(trust.serviceRefusal('x', other, undefined, '*'), null);
    assert.match(trust.serviceRefusal('x', null, undefined, undefined) ?? '', /cannot tell which user/);
  });

  it('with a token, leaves the owner to the proof unless a user is named', () => {
    assert.equal(trust.serviceRefusal('x', 12345, 'token-0123456789ab', undefined), null);
    assert.equal(trust.serviceRefusal('x', null, 'token-0123456789ab', 0), null);
    assert.match(trust.serviceRefusal('x', 12345, 'token-0123456789ab', 0) ?? '', /runs as uid 12345/);
  });

  it('resolves a user name, a number, or anyone', () => {
    assert.equal(trust.resolveServiceUser('root'), 0);
    assert.equal(trust.resolveServiceUser('1000'), 1000);
    assert.equal(trust.resolveServiceUser('*'), '*');
    assert.equal(trust.resolveServiceUser(undefined), undefined);
    assert.throws(() => trust.resolveServiceUser('no-such-user-here'), /no such user/);
  });
});
