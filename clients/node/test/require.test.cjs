// The CommonJS entry points: `require` gets the same classes as `import`.
'use strict';
const assert = require('node:assert/strict');
const { describe, it } = require('node:test');

describe('the CommonJS build', () => {
  it('exports the client and the drop-in under require', () => {
    const sessionlane = require('sessionlane');
    const openclaw = require('sessionlane/openclaw');
    assert.equal(typeof sessionlane.connect, 'function');
    assert.equal(typeof sessionlane.createSessionWriteLocks, 'function');
    assert.equal(openclaw.createSessionWriteLocks, sessionlane.createSessionWriteLocks);
    assert.equal(sessionlane.VERSION, require('../package.json').version);
  });

  it('shares one copy of every class with the ES module entry', async () => {
    const required = require('sessionlane');
    const imported = await import('sessionlane');
    assert.equal(imported.SessionLaneError, required.SessionLaneError);
    assert.ok(new imported.StaleFence('x') instanceof required.LeaseRevoked);
    assert.deepEqual(Object.keys(imported).sort(), Object.keys(required).sort());
  });
});
