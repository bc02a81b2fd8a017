// Unit tests of the order the list shows tasks in (task-order.js): the server's, as far
// as a tab can know it. The core's tests cover it again through its API.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import { createCore } from '../../static/core.js';
import { EVENT_SETTLED } from '../../static/ops.js';
import { createTaskOrder, creationKey } from '../../static/task-order.js';

describe('creationKey', () => {
  test('orders the server’s times as strings, to the nanosecond, whatever digits they carry', () => {
    const times = [
      '2026-11-28T08:31:43Z',
      '2026-11-28T08:31:43.0000001Z',
      '2026-11-28T08:31:43.5Z',
      '2026-11-28T08:31:43.753559446Z',
      '2026-11-28T08:31:44.01Z',
    ];
    const keys = times.map(creationKey);
    assert.deepEqual([...keys].sort(), keys);
    assert.equal(keys[2], '2026-11-28T08:31:43.500000000');
    for (const other of ['', null, '2026-11-28T08:31:43+01:00', '2026-11-28 08:31:43Z', '2026-11-28T08:31:43.1234567891Z']) {
      assert.equal(creationKey(other), null, String(other));
    }
  });
});

describe('task order', () => {
  const at = (seconds) => `2026-11-28T08:00:${String(seconds).padStart(2, '0')}.5Z`;
  /** A task learned of by its create's event: listed, then placed by its time. */
  const heard = (order, id, seconds) => {
    order.add(id);
    order.created(id, at(seconds));
  };

  test('a snapshot’s tasks come first; those created since go by when the server took them, the tab’s own untaken creates last', () => {
    const order = createTaskOrder();
    order.snapshot(['s1', 's2'], () => false);
    order.add('mine', { awaiting: true });
    heard(order, 'c3', 3);
    heard(order, 'c1', 1);
    assert.deepEqual(order.ids, ['s1', 's2', 'c1', 'c3', 'mine']);
    order.created('mine', at(2));
    assert.deepEqual(order.ids, ['s1', 's2', 'c1', 'mine', 'c3']);
    // Told again (its event after its 202): the same list, not a copy.
    const before = order.ids;
    order.created('mine', at(2));
    assert.equal(order.ids, before);
    // A snapshot's task stays where the snapshot has it; an unlisted task is not added.
    order.created('s1', at(9));
    order.created('gone', at(0));
    assert.equal(order.ids, before);
  });

  test('a task known without its create’s time stays where it came: later creates go after it', () => {
    const order = createTaskOrder();
    order.snapshot(['s1'], () => false);
    heard(order, 'c1', 1);
    order.add('fetched');
    heard(order, 'c2', 2);
    heard(order, 'c0', 0);
    assert.deepEqual(order.ids, ['s1', 'c1', 'fetched', 'c0', 'c2']);
  });

  test('a new snapshot lists its tasks first and keeps only the creates still on their way', () => {
    const order = createTaskOrder();
    order.snapshot(['s1'], () => false);
    order.add('mine', { awaiting: true });
    heard(order, 'c2', 2);
    heard(order, 'c1', 1);
    order.snapshot(['s1', 'c1', 'c2'], (id) => id === 'mine');
    assert.deepEqual(order.ids, ['s1', 'c1', 'c2', 'mine']);
    heard(order, 'c3', 0);
    assert.deepEqual(order.ids, ['s1', 'c1', 'c2', 'c3', 'mine'], 'after the snapshot’s tasks, whatever its time');
    // A snapshot's task gone and back (fetched again) is one created since like any other.
    order.remove('s1');
    order.add('s1');
    order.created('s1', at(5));
    assert.deepEqual(order.ids, ['c1', 'c2', 'c3', 's1', 'mine']);
  });
});

describe('the core lists tasks in the server’s order', () => {
  test('a tab that predicted its own create before it heard of an earlier one lists them as the server does', () => {
    const core = createCore({ now: () => 1_000_000 });
    core.loadSnapshot({ tasks: [], watermark: 0 });
    const mine = core.issue({ kind: 'create', key: 'k2', task_id: 'second', title: 'second' });
    core.accepted('k2', { command_id: 'cmd-2', accepted_at: '2026-11-28T08:00:01.000000002Z' });
    const theirs = { id: 'first', title: 'first', notes: '', done: false, likes: 0, version: 1, updated_at: '2026-11-28T08:00:01.7Z' };
    core.applyEvent({
      id: 1,
      type: EVENT_SETTLED,
      data: {
        command_id: 'cmd-1', idempotency_key: 'k1', task_id: 'first', kind: 'create', version: 1, task: theirs,
        accepted_at: '2026-11-28T08:00:01.000000001Z',
      },
    });
    assert.deepEqual(core.getSnapshot().items.map((item) => item.id), ['first', 'second']);
    assert.equal(mine.task_id, 'second');
  });

  test('a tab’s own create goes by the time its 202 gave, ahead of a later create heard of first, also after a reload', () => {
    const core = createCore({ now: () => 1_000_000 });
    core.loadSnapshot({ tasks: [], watermark: 0 });
    core.issue({ kind: 'create', key: 'k1', task_id: 'mine', title: 'mine' });
    core.accepted('k1', { command_id: 'cmd-1', accepted_at: '2026-11-28T08:00:01.1Z' });
    const theirs = (id, version) => ({ id, title: id, notes: '', done: false, likes: 0, version, updated_at: '2026-11-28T08:00:02Z' });
    const event = (id, accepted_at) => ({
      id: id === 'theirs' ? 1 : 2,
      type: EVENT_SETTLED,
      data: { command_id: `cmd-${id}`, idempotency_key: `k-${id}`, task_id: id, kind: 'create', version: 1, task: theirs(id, 1), accepted_at },
    });
    core.applyEvent(event('theirs', '2026-11-28T08:00:01.2Z'));
    assert.deepEqual(core.getSnapshot().items.map((item) => item.id), ['mine', 'theirs']);

    // Reloaded: the op comes back with the time of its 202.
    const reloaded = createCore({ now: () => 1_000_000 });
    reloaded.restore(core.persistedOps());
    reloaded.loadSnapshot({ tasks: [], watermark: 0 });
    reloaded.applyEvent(event('theirs', '2026-11-28T08:00:01.2Z'));
    assert.deepEqual(reloaded.getSnapshot().items.map((item) => item.id), ['mine', 'theirs']);
  });
});
