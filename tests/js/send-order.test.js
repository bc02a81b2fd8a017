// Unit tests of what the core keeps beside its stacks: when a task's queued edits go out
// and on which version (send-order.js), and what is remembered of ops once they left
// (departures.js). The core's own tests (core.test.js) cover both again through its API.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import { createDepartures } from '../../static/departures.js';
import { createSendOrder } from '../../static/send-order.js';
import { createStacks } from '../../static/stacks.js';

function setup({ confirmed = true } = {}) {
  let clock = 1000;
  const pending = createStacks();
  const order = createSendOrder({ pending, now: () => clock, confirmed: () => confirmed });
  /** Push an op of task `a`, placed as the core places an edit made on `madeOn`. */
  const edit = (key, madeOn, fields = {}) => {
    const op = Object.freeze({
      key, task_id: 'a', kind: 'update', patch: { title: key }, ...order.placed('a', madeOn), ...fields,
    });
    pending.push(op);
    order.sendIfDue(op);
    return op;
  };
  return { pending, order, edit, advance: (ms) => { clock += ms; } };
}

describe('send order', () => {
  test('an edit with nothing of ours ahead goes out at once, on the version it was made on', () => {
    const { order, edit } = setup();
    edit('k1', 4);
    const [sent] = order.takeOutbox();
    assert.equal(sent.key, 'k1');
    assert.equal(sent.state, 'sending');
    assert.equal(sent.base_version, 4);
    assert.deepEqual(order.takeOutbox(), [], 'taken once');
  });

  test('one made behind ours is queued, and goes out when the ops ahead are gone, counting only our own changes since', () => {
    const { pending, order, edit, advance } = setup();
    const first = edit('k1', 4, { state: 'pending', command_id: 'c1' });
    const second = edit('k2', 4);
    assert.equal(second.state, 'queued');
    assert.equal(second.base_version, undefined);
    assert.deepEqual(order.takeOutbox(), [], 'neither is due: the first is already sent');
    // Our first settled at 5; a version at or below the edit's base is not ours to count.
    order.settledAt('a', 5);
    order.settledAt('a', 3);
    pending.remove(first);
    advance(250);
    order.sendQueued('a');
    const [sent] = order.takeOutbox();
    assert.equal(sent.key, 'k2');
    assert.equal(sent.base_version, 5);
    assert.equal(sent.state, 'sending');
    assert.equal(sent.sent_at, 1250);
    assert.equal(pending.find('k2'), sent, 'replaced on its stack');
  });

  test('the versions of our own changes are remembered up to 32 per task, and forgotten with it', () => {
    const { order, edit } = setup();
    for (let version = 1; version <= 40; version += 1) order.settledAt('a', version);
    assert.equal(order.placed('a', 0).base_version, 32);
    order.forget('a');
    edit('k1', 7);
    assert.equal(order.takeOutbox()[0].base_version, 7);
  });

  test('Retry of a queued edit sends the queued ones ahead of it with it, in order', () => {
    const { order, edit } = setup();
    edit('k1', 4, { state: 'pending', command_id: 'c1' });
    edit('k2', 4);
    edit('k3', 4);
    assert.deepEqual(order.sendNow('k1'), { waitFor: [], sent: false }, 'not queued');
    assert.deepEqual(order.sendNow('k3'), { waitFor: [], sent: true });
    assert.deepEqual(order.takeOutbox().map((op) => [op.key, op.base_version]), [['k2', 4], ['k3', 4]]);
  });

  test('Retry of a queued edit waits while an op ahead has not reached the server, or the task is not created', () => {
    const { order, edit } = setup();
    const unsent = edit('k1', 4, { state: 'stuck', command_id: null });
    order.takeOutbox();
    edit('k2', 4);
    assert.deepEqual(order.sendNow('k2'), { waitFor: [unsent], sent: false });
    assert.deepEqual(order.takeOutbox(), []);

    const uncreated = setup({ confirmed: false });
    const create = uncreated.edit('c', 0, { kind: 'create', state: 'pending', command_id: 'c0' });
    uncreated.edit('k2', 0);
    assert.deepEqual(uncreated.order.sendNow('k2'), { waitFor: [create], sent: false });
  });

  test('an op that left its stack before it was taken is not sent', () => {
    const { pending, order, edit } = setup();
    const op = edit('k1', 4);
    pending.remove(op);
    assert.deepEqual(order.takeOutbox(), []);
  });
});

describe('departures', () => {
  const op = (key) => Object.freeze({ key, task_id: 'a', kind: 'like', delta: 1 });

  test('how ops left is kept until taken, and their keys are remembered as left', () => {
    const departures = createDepartures();
    departures.depart(op('k1'), 'settled');
    departures.depart(op('k2'), 'failed', 'injected');
    assert.deepEqual(departures.takeDeparted().map(({ op: { key }, outcome, reason }) => [key, outcome, reason]),
      [['k1', 'settled', undefined], ['k2', 'failed', 'injected']]);
    assert.deepEqual(departures.takeDeparted(), []);
    assert.ok(departures.hasLeft('k1') && departures.hasLeft('k2') && !departures.hasLeft('k3'));
  });

  test('what is remembered is bounded, the oldest dropping off', () => {
    const departures = createDepartures();
    for (let i = 0; i <= 1000; i += 1) departures.depart(op(`k${i}`), 'settled');
    assert.ok(!departures.hasLeft('k0') && departures.hasLeft('k1') && departures.hasLeft('k1000'));
    for (let i = 0; i <= 500; i += 1) departures.noteUnmatched(`u${i}`, 'projection:settled');
    assert.equal(departures.outcomeOf('u0'), undefined);
    assert.deepEqual(departures.outcomeOf('u500'), { type: 'projection:settled', reason: undefined });
    for (let i = 0; i <= 100; i += 1) departures.noteDiscarded(op(`d${i}`), 'milk');
    assert.equal(departures.persistedDiscarded().length, 100);
    assert.equal(departures.takeDiscarded('d0'), null);
  });

  test('a discarded op keeps the title it had and its 202, and is forgotten once its outcome comes', () => {
    const departures = createDepartures();
    departures.noteDiscarded(op('k1'), 'milk');
    departures.discardedAccepted('k1', 'c1');
    departures.discardedAccepted('k2', 'c2');
    const [saved] = departures.persistedDiscarded();
    assert.equal(saved.title_then, 'milk');
    assert.equal(saved.command_id, 'c1');
    assert.ok(Object.isFrozen(saved));
    assert.equal(departures.takeDiscarded('k1'), saved);
    assert.equal(departures.takeDiscarded('k1'), null);
  });

  test('a restore takes back the discarded ops saved, skipping malformed ones and keys it holds', () => {
    const departures = createDepartures();
    departures.noteDiscarded(op('k1'), 'milk');
    departures.restoreDiscarded([{ ...op('k1'), title_then: 'other' }, { key: 'x' }, null, op('k2')]);
    assert.deepEqual(departures.persistedDiscarded().map((saved) => [saved.key, saved.title_then]),
      [['k1', 'milk'], ['k2', undefined]]);
  });
});
