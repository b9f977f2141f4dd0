/**
 * `Symbol.asyncDispose` for Node 20 releases that predate it (20.0 to 20.3), under the
 * registered name TypeScript's `await using` helpers look up as well.
 */

if (typeof Symbol.asyncDispose !== 'symbol') {
  Object.defineProperty(Symbol, 'asyncDispose', {
    value: Symbol.for('nodejs.asyncDispose'),
    configurable: false,
    enumerable: false,
    writable: false,
  });
}

export {};
