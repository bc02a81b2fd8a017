// Unit tests of the sync engine and the transport's retry policy, with fake HTTP.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import { createCore } from '../../static/core.js';
import { createSync, STORAGE_KEY, CONFLICTS_KEY, DISCARDED_KEY } from '../../static/sync.js';
import { createTransport } from '../../static/transport.js';

function task(id, fields = {}) {
  return { id, title: `task ${id}`, notes: '', done: false, likes: 0, version: 1, updated_at: '2025-01-01T00:00:00Z', ...fields };
}

function memoryStorage(initial = {}) {
  const values = new Map(Object.entries(initial));
  return { getItem: (key) => values.get(key) ?? null, setItem: (key, value) => values.set(key, value) };
}

const flush = () => new Promise((resolve) => setImmediate(resolve));

/** The stream's `command:failed` event for `op` (sent as `cmd-KEY` by the fake transport). */
function failOnStream(transport, op, reason, current = null) {
  transport.streams.at(-1).handlers.onEvent({
    id: 6,
    type: 'command:failed',
    data: {
      command_id: `cmd-${op.key}`, idempotency_key: op.key, task_id: op.task_id, kind: op.kind, reason, message: '', current,
    },
  });
}

/** A fake transport recording calls; behaviour overridable per test. */
function fakeTransport(overrides = {}) {
  const calls = [];
  let commandCount = 0;
  const transport = {
    calls,
    streams: [],
    sendCommand: async (request, key) => {
      calls.push(['send', request.method, request.path, key]);
      commandCount += 1;
      return { outcome: 'accepted', command_id: `cmd-${key}`, accepted_at: 'now', replayed: false };
    },
    fetchSnapshot: async () => ({ tasks: [task('a')], watermark: 5 }),
    fetchCommand: async (commandId) => {
      calls.push(['status', commandId]);
      return { command_id: commandId, status: 'pending' };
    },
    fetchTask: async (id) => {
      calls.push(['task', id]);
      return task(id);
    },
    fetchCounts: async (id) => {
      calls.push(['counts', id]);
      return { id, likes: 0, version: 1 };
    },
    openEvents(lastEventId, handlers) {
      const stream = { lastEventId, handlers, closed: false, close() { this.closed = true; } };
      transport.streams.push(stream);
      handlers.onOpen?.();
      return stream;
    },
    get commandCount() { return commandCount; },
    ...overrides,
  };
  return transport;
}

/**
 * A core and a sync engine over `transport`. With `timers` (an array), the engine's
 * `setTimeout` only records `{fn, ms}` there: a test runs them when it chooses.
 */
function setup({ transport = fakeTransport(), storage = memoryStorage(), now = () => 1_000_000, timers = null } = {}) {
  const core = createCore({ now, stuckMs: 5000, syncMs: 800 });
  let tick = null;
  let id = 0;
  const sync = createSync({
    core,
    transport,
    storage,
    newId: () => `id-${(id += 1)}`,
    setInterval: (fn) => { tick = fn; return 1; },
    clearInterval: () => {},
    ...(timers ? { setTimeout: (fn, ms) => timers.push({ fn, ms }) } : {}),
  });
  return { core, sync, transport, storage, tick: () => tick() };
}

/** `transport`'s sends find no answer (recorded as `unreachable`) while `reachable()` is false. */
function unansweredWhile(transport, reachable) {
  const accept = transport.sendCommand;
  transport.sendCommand = async (request, key) => {
    if (reachable()) return accept(request, key);
    transport.calls.push(['unreachable', key]);
    return { outcome: 'unavailable', offline: true, detail: 'network error: Failed to fetch' };
  };
}

/** `transport`'s sends are refused with `status` (recorded as `refused`) while `refusing()` holds. */
function refusedWhile(transport, refusing, status) {
  const accept = transport.sendCommand;
  transport.sendCommand = async (request, key) => {
    if (!refusing()) return accept(request, key);
    transport.calls.push(['refused', key]);
    return { outcome: 'unavailable', offline: false, status, detail: `${status}: refused for now` };
  };
}

/**
 * A started engine whose sends `failing(transport)` makes fail (`unansweredWhile`,
 * `refusedWhile`), its timers held in `timers`, after the edit `k` of task a was issued.
 */
async function editWhileFailing(failing, title) {
  const transport = fakeTransport();
  failing(transport);
  const timers = [];
  const { core, sync } = setup({ transport, timers });
  await sync.start();
  sync.editTask('a', { title }, 'k');
  await flush();
  return { core, sync, transport, timers };
}

describe('the sync engine', () => {
  test('start loads the snapshot and opens the stream at its watermark', async () => {
    const { core, sync, transport } = setup();
    await sync.start();
    assert.equal(core.getSnapshot().items.length, 1);
    assert.equal(transport.streams[0].lastEventId, 5);
    assert.equal(core.getSnapshot().connection, 'live');
  });

  test('while the snapshot cannot be had the page says the server is unreachable, and goes live once it comes', async () => {
    let reachable = false;
    const transport = fakeTransport();
    const snapshot = transport.fetchSnapshot;
    transport.fetchSnapshot = async () => {
      if (!reachable) throw new Error('GET /api/tasks: 503 overloaded');
      return snapshot();
    };
    const timers = [];
    const { core, sync } = setup({ transport, timers });
    const started = sync.start();
    await flush();
    assert.deepEqual([core.getSnapshot().connection, core.getSnapshot().loaded], ['unreachable', false]);
    timers.shift().fn(); // the next try: still nothing
    await flush();
    assert.equal(core.getSnapshot().connection, 'unreachable');
    reachable = true;
    timers.shift().fn();
    await started;
    assert.deepEqual([core.getSnapshot().connection, core.getSnapshot().loaded], ['live', true]);
  });

  test('a command no attempt could send is stuck at once, and sent again under its key when the stream is back', async () => {
    let reachable = true;
    const transport = fakeTransport();
    unansweredWhile(transport, () => reachable);
    const { core, sync } = setup({ transport });
    await sync.start();
    reachable = false;
    sync.editTask('a', { title: 'made offline' }, 'k');
    await flush();
    const [op] = core.getSnapshot().items[0].ops;
    assert.deepEqual([op.state, op.unreached?.offline], ['stuck', true], 'stuck at once, not "still processing"');

    // The browser's EventSource reconnects by itself once the server is back.
    reachable = true;
    transport.streams[0].handlers.onOpen();
    await flush();
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'send' || call[0] === 'unreachable').map((call) => call.at(-1)), ['k', 'k']);
    assert.deepEqual([core.getOp('k').state, core.getOp('k').command_id], ['pending', 'cmd-k']);
  });

  test('a command whose attempts failed after the stream came back is sent again after a pause, longer each time', async () => {
    let reachable = false;
    // The stream is open (`live`) when the last attempt gives up: no `onOpen` is coming.
    const { core, transport, timers } = await editWhileFailing(
      (transport) => unansweredWhile(transport, () => reachable), 'sent as the server came back');
    assert.equal(core.getOp('k').state, 'stuck');
    assert.deepEqual(timers.map((timer) => timer.ms), [1000]);

    timers.shift().fn(); // still no answer: stuck again, and the next pause is longer
    await flush();
    assert.equal(core.getOp('k').state, 'stuck');
    assert.deepEqual(timers.map((timer) => timer.ms), [2000]);

    reachable = true;
    timers.shift().fn();
    await flush();
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'send' || call[0] === 'unreachable').map((call) => call[0]), ['unreachable', 'unreachable', 'send']);
    assert.deepEqual([core.getOp('k').state, core.getOp('k').command_id], ['pending', 'cmd-k']);
    assert.equal(timers.length, 0, 'nothing more is scheduled once it is taken');
  });

  test('a command the server refused for now (503 on every attempt) is sent again after a pause, until it is taken', async () => {
    let full = true;
    const { core, transport, timers } = await editWhileFailing(
      (transport) => refusedWhile(transport, () => full, 503), 'sent while the backlog is full');
    assert.deepEqual([core.getOp('k').state, core.getOp('k').unreached?.offline], ['stuck', false]);
    assert.deepEqual(timers.map((timer) => timer.ms), [1000]);
    timers.shift().fn();
    await flush();
    assert.deepEqual(timers.map((timer) => timer.ms), [2000], 'refused again: a longer pause');
    full = false;
    timers.shift().fn();
    await flush();
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'send' || call[0] === 'refused').map((call) => call[0]), ['refused', 'refused', 'send']);
    assert.deepEqual([core.getOp('k').state, core.getOp('k').command_id], ['pending', 'cmd-k']);
    assert.equal(timers.length, 0);
  });

  test('a command refused with a 500 on every attempt waits for the Retry: no pause, nothing sent by itself', async () => {
    let broken = true;
    const { core, sync, transport, timers } = await editWhileFailing(
      (transport) => refusedWhile(transport, () => broken, 500), 'while the server is broken');
    assert.deepEqual([core.getOp('k').state, core.getOp('k').unreached.status, timers.length], ['stuck', 500, 0]);
    await sync.online();
    assert.equal(transport.calls.filter((call) => call[0] === 'refused').length, 1, 'not even when the browser comes online');
    broken = false;
    await sync.retry('k');
    assert.deepEqual([core.getOp('k').state, core.getOp('k').command_id], ['pending', 'cmd-k']);
  });

  test('a command that found no answer while the stream was down waits for the stream, not a timer', async () => {
    const transport = fakeTransport();
    unansweredWhile(transport, () => false);
    const timers = [];
    const { core, sync } = setup({ transport, timers });
    await sync.start();
    transport.streams[0].handlers.onError({ closed: false });
    sync.editTask('a', { title: 'offline' }, 'k');
    await flush();
    assert.deepEqual([core.getOp('k').state, timers.length], ['stuck', 0]);
  });

  test('back online, what no attempt could send goes at once, not at the end of its pause', async () => {
    let reachable = false;
    const { core, sync, transport, timers } = await editWhileFailing(
      (transport) => unansweredWhile(transport, () => reachable), 'made offline');
    assert.deepEqual([core.getOp('k').state, timers.map((timer) => timer.ms)], ['stuck', [1000]]);
    reachable = true;
    await sync.online();
    assert.deepEqual([core.getOp('k').state, core.getOp('k').command_id], ['pending', 'cmd-k']);
    timers.shift().fn(); // the pause ends: nothing left to send
    await flush();
    assert.equal(transport.calls.filter((call) => call[0] === 'send').length, 1);
  });

  test('a stream that fails to open again three times running says the server is unreachable; open, live', async () => {
    const transport = fakeTransport();
    const { core, sync } = setup({ transport });
    await sync.start();
    const stream = transport.streams[0].handlers;
    stream.onError({ closed: false });
    stream.onError({ closed: false });
    assert.equal(core.getSnapshot().connection, 'reconnecting', 'a drop, and one failed try');
    stream.onError({ closed: false });
    assert.equal(core.getSnapshot().connection, 'unreachable');
    stream.onOpen();
    assert.equal(core.getSnapshot().connection, 'live');
    stream.onError({ closed: false });
    assert.equal(core.getSnapshot().connection, 'reconnecting', 'counted again from the last open');
    stream.onError({ closed: false });
    stream.onError({ closed: true });
    assert.equal(core.getSnapshot().connection, 'reconnecting', 'an error answer: the server was reached');
    stream.onError({ closed: false });
    assert.equal(core.getSnapshot().connection, 'reconnecting', 'counted again from the answer');
  });

  test('a command waiting its turn behind a slow send is not sent twice when the stream opens', async () => {
    let release;
    const transport = fakeTransport();
    const accept = transport.sendCommand;
    transport.sendCommand = async (request, key) => {
      if (key === 'slow') await new Promise((resolve) => { release = resolve; });
      return accept(request, key);
    };
    let clock = 1_000_000;
    const { core, sync, tick } = setup({ transport, now: () => clock });
    await sync.start();
    sync.editTask('a', { title: 'slow' }, 'slow');
    sync.like('a', 1, 'behind');
    await flush();
    clock += 5000;
    tick(); // neither has its 202: both stuck
    assert.deepEqual(core.pendingOps().map((op) => op.state), ['stuck', 'stuck']);
    transport.streams[0].handlers.onOpen();
    await sync.retry('behind');
    // Both shown as being sent again (they are: one on the wire, one waiting its turn),
    // neither sent a second time.
    assert.deepEqual(core.pendingOps().map((op) => op.state), ['sending', 'sending']);
    release();
    await flush();
    await flush();
    const sends = transport.calls.filter((call) => call[0] === 'send').map((call) => call[3]);
    assert.deepEqual(sends, ['slow', 'behind'], 'each once, in issue order');
  });

  test('the same intent twice sends one command', async () => {
    const { sync, transport } = setup();
    await sync.start();
    sync.createTask({ title: 'once', id: 'n', key: 'k' });
    sync.createTask({ title: 'once', id: 'n', key: 'k' });
    await flush();
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'send'), [['send', 'POST', '/api/tasks', 'k']]);
  });

  test("a task's commands are sent one after the other, in issue order", async () => {
    const order = [];
    let releaseFirst;
    const transport = fakeTransport({
      sendCommand: async (request, key) => {
        order.push(`start ${key}`);
        if (key === 'first') await new Promise((resolve) => { releaseFirst = resolve; });
        order.push(`end ${key}`);
        return { outcome: 'accepted', command_id: `cmd-${key}` };
      },
    });
    const { sync } = setup({ transport });
    await sync.start();
    sync.like('a', 1, 'first');
    sync.like('a', -1, 'second');
    await flush();
    assert.deepEqual(order, ['start first']);
    releaseFirst();
    await flush();
    await flush();
    assert.deepEqual(order, ['start first', 'end first', 'start second', 'end second']);
  });

  test("the tab's creates are sent one after the other, in the order typed, beside other tasks' commands", async () => {
    const order = [];
    const release = new Map();
    const transport = fakeTransport({
      sendCommand: async (request, key) => {
        order.push(`start ${key}`);
        if (key !== 'like') await new Promise((resolve) => { release.set(key, resolve); });
        order.push(`end ${key}`);
        return { outcome: 'accepted', command_id: `cmd-${key}`, accepted_at: `at-${key}` };
      },
    });
    const { sync } = setup({ transport });
    await sync.start();
    sync.createTask({ title: 'one', id: 'n1', key: 'c1' });
    sync.createTask({ title: 'two', id: 'n2', key: 'c2' });
    sync.createTask({ title: 'three', id: 'n3', key: 'c3' });
    sync.like('a', 1, 'like');
    await flush();
    assert.deepEqual(order, ['start c1', 'start like', 'end like'], 'a like on another task does not wait for them');
    release.get('c1')();
    await flush();
    await flush();
    assert.deepEqual(order.slice(3), ['end c1', 'start c2']);
    release.get('c2')();
    await flush();
    await flush();
    release.get('c3')();
    await flush();
    await flush();
    assert.deepEqual(order.slice(5), ['end c2', 'start c3', 'end c3']);
  });

  test('a create discarded while it waits behind an earlier one is not sent', async () => {
    const order = [];
    let releaseFirst;
    const transport = fakeTransport({
      sendCommand: async (request, key) => {
        order.push(key);
        if (key === 'c1') await new Promise((resolve) => { releaseFirst = resolve; });
        return { outcome: 'accepted', command_id: `cmd-${key}`, accepted_at: `at-${key}` };
      },
    });
    const { core, sync } = setup({ transport });
    await sync.start();
    sync.createTask({ title: 'one', id: 'n1', key: 'c1' });
    sync.createTask({ title: 'two', id: 'n2', key: 'c2' });
    sync.createTask({ title: 'three', id: 'n3', key: 'c3' });
    await flush();
    sync.discard('c2');
    releaseFirst();
    await flush();
    await flush();
    assert.deepEqual(order, ['c1', 'c3'], 'the discarded create never left the page');
    assert.ok(!core.getOp('c2'));
    assert.equal(core.getOp('c3').command_id, 'cmd-c3');
  });

  test('a create sent again (it could not be sent) does not hold up the creates typed after it', async () => {
    let reachable = false;
    const transport = fakeTransport();
    unansweredWhile(transport, () => reachable);
    const timers = [];
    const { core, sync } = setup({ transport, timers });
    await sync.start();
    sync.createTask({ title: 'one', id: 'n1', key: 'c1' });
    await flush();
    assert.equal(core.getOp('c1').state, 'stuck');
    // Sent again, and again no answer: meanwhile the server comes back for the next.
    let holdAgain;
    transport.sendCommand = async (request, key) => {
      if (key === 'c1') {
        await new Promise((resolve) => { holdAgain = resolve; });
        return { outcome: 'unavailable', offline: true, detail: 'network error' };
      }
      transport.calls.push(['send', request.method, request.path, key]);
      return { outcome: 'accepted', command_id: `cmd-${key}`, accepted_at: `at-${key}` };
    };
    sync.retry('c1');
    sync.createTask({ title: 'two', id: 'n2', key: 'c2' });
    await flush();
    assert.equal(core.getOp('c2').command_id, 'cmd-c2', 'two went while one was being sent again');
    holdAgain();
    await flush();
  });

  test('pending ops persist, and after a reload they are reconciled against the snapshot', async () => {
    const first = setup();
    await first.sync.start();
    first.sync.like('a', 1, 'in-snapshot');
    first.sync.like('a', 1, 'still-coming');
    await flush();
    const saved = JSON.parse(first.storage.getItem(STORAGE_KEY));
    assert.deepEqual(saved.map((op) => [op.key, op.command_id]), [
      ['in-snapshot', 'cmd-in-snapshot'],
      ['still-coming', 'cmd-still-coming'],
    ]);
    saved.push({ key: 'never-sent', task_id: 'a', kind: 'update', patch: { title: 'x' }, issued_at: 1 });

    const transport = fakeTransport({
      fetchSnapshot: async () => ({ tasks: [task('a', { likes: 1, version: 2 })], watermark: 10 }),
      fetchCommand: async (commandId) => ({
        command_id: commandId,
        status: commandId === 'cmd-in-snapshot' ? 'settled' : 'pending',
        event_id: commandId === 'cmd-in-snapshot' ? 9 : undefined,
      }),
    });
    const reloaded = setup({ transport, storage: memoryStorage({ [STORAGE_KEY]: JSON.stringify(saved) }) });
    await reloaded.sync.start();
    const [item] = reloaded.core.getSnapshot().items;
    assert.deepEqual(item.ops.map((op) => op.key), ['still-coming', 'never-sent']);
    assert.equal(item.task.likes, 2, 'base 1 (includes the settled like) + the one still coming');
    assert.equal(item.task.title, 'x');
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'send'), [['send', 'PATCH', '/api/tasks/a', 'never-sent']],
      'only the op that never got its 202 is sent again, under its key');
  });

  test('after a reload, a discarded op that applied meanwhile is told by its status', async () => {
    const first = setup();
    await first.sync.start();
    first.sync.like('a', 1, 'given-up');
    await flush();
    first.sync.discard('given-up');
    const saved = first.storage.getItem(DISCARDED_KEY);

    const transport = fakeTransport({
      fetchSnapshot: async () => ({ tasks: [task('a', { likes: 1, version: 2 })], watermark: 10 }),
      fetchCommand: async (commandId) => {
        transport.calls.push(['status', commandId]);
        return { command_id: commandId, status: 'settled', event_id: 9 };
      },
    });
    const reloaded = setup({ transport, storage: memoryStorage({ [DISCARDED_KEY]: saved }) });
    await reloaded.sync.start();
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'status'), [['status', 'cmd-given-up']]);
    assert.deepEqual(reloaded.core.takeDeparted().map(({ op, outcome }) => [op.key, outcome]), [['given-up', 'applied_late']]);
    assert.match(reloaded.core.getSnapshot().notices.at(-1).text, /which you stopped waiting for, was applied after all/);
  });

  test('after a reload, a discarded op that never got its 202 is asked after by its key', async () => {
    const first = setup({ transport: fakeTransport({ sendCommand: () => new Promise(() => {}) }) });
    await first.sync.start();
    first.sync.like('a', 1, 'answer-lost');
    first.sync.like('a', 1, 'never-arrived');
    await flush();
    first.sync.discard('answer-lost');
    first.sync.discard('never-arrived');
    const saved = JSON.parse(first.storage.getItem(DISCARDED_KEY));
    assert.deepEqual(saved.map((op) => [op.key, op.command_id]), [['answer-lost', null], ['never-arrived', null]]);

    const transport = fakeTransport({
      fetchSnapshot: async () => ({ tasks: [task('a', { likes: 1, version: 2 })], watermark: 10 }),
      fetchCommandByKey: async (key) => {
        transport.calls.push(['by key', key]);
        return key === 'answer-lost' ? { command_id: 'cmd-late', idempotency_key: key, status: 'settled', event_id: 9 } : null;
      },
    });
    const reloaded = setup({ transport, storage: memoryStorage({ [DISCARDED_KEY]: JSON.stringify(saved) }) });
    await reloaded.sync.start();
    assert.deepEqual(transport.calls.filter((call) => call[0] !== 'task'), [['by key', 'answer-lost'], ['by key', 'never-arrived']]);
    assert.deepEqual(reloaded.core.takeDeparted().map(({ op, outcome }) => [op.key, outcome]), [['answer-lost', 'applied_late']]);
    assert.deepEqual(reloaded.core.persistedDiscarded().map((op) => op.key), ['never-arrived'],
      'the one the server does not know stays remembered, in case it arrives yet');
  });

  test('a reload keeps pending ops, discarded ops and open conflicts together', async () => {
    const first = setup();
    await first.sync.start();
    const edit = first.sync.editTask('a', { title: 'mine' }, 'edit');
    first.sync.like('a', 1, 'given-up');
    first.sync.like('a', 1, 'still-coming');
    await flush();
    failOnStream(first.transport, edit, 'conflict', task('a', { title: 'theirs', version: 2 }));
    first.sync.discard('given-up');
    await flush();

    // The whole tab's storage comes back, as it does for a reload.
    const transport = fakeTransport({ fetchSnapshot: async () => ({ tasks: [task('a', { title: 'theirs', version: 2 })], watermark: 10 }) });
    const reloaded = setup({ transport, storage: first.storage });
    const started = reloaded.sync.start();
    for (const key of [STORAGE_KEY, DISCARDED_KEY, CONFLICTS_KEY]) {
      assert.equal(JSON.parse(first.storage.getItem(key)).length, 1, `${key} is stored still, should the page go again at once`);
    }
    await started;
    const [item] = reloaded.core.getSnapshot().items;
    assert.deepEqual(item.ops.map((op) => op.key), ['still-coming']);
    assert.equal(item.conflict?.yours.title, 'mine', 'the open conflict is still there');
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'status'), [['status', 'cmd-still-coming'], ['status', 'cmd-given-up']],
      'the discarded op is still remembered, and asked after');
    reloaded.transport.streams.at(-1).handlers.onEvent({
      id: 11,
      type: 'projection:settled',
      data: { command_id: 'cmd-given-up', idempotency_key: 'given-up', task_id: 'a', kind: 'like', version: 3, task: task('a', { title: 'theirs', likes: 1, version: 3 }) },
    });
    assert.match(reloaded.core.getSnapshot().notices.at(-1).text, /which you stopped waiting for, was applied after all/);
  });

  test('a failed like snaps to the counts fragment; a newer row is fetched whole', async () => {
    const transport = fakeTransport({
      fetchCounts: async (id) => {
        transport.calls.push(['counts', id]);
        return { id, likes: 7, version: 3 };
      },
      fetchTask: async (id) => {
        transport.calls.push(['task', id]);
        return task(id, { title: 'moved on', likes: 7, version: 3 });
      },
    });
    const { core, sync } = setup({ transport });
    await sync.start();
    const op = sync.like('a', 1, 'l');
    await flush();
    failOnStream(transport, op, 'injected');
    await flush();
    await flush();
    assert.deepEqual(transport.calls.filter((call) => call[0] !== 'send'), [['counts', 'a'], ['task', 'a']]);
    assert.equal(core.getSnapshot().items[0].task.title, 'moved on');
  });

  test('an open conflict survives a reload, and closing it is kept too', async () => {
    const first = setup();
    await first.sync.start();
    const edit = first.sync.editTask('a', { title: 'mine' }, 'edit');
    await flush();
    failOnStream(first.transport, edit, 'conflict', task('a', { title: 'theirs', version: 2 }));
    await flush();
    const reloaded = setup({ storage: memoryStorage({ [CONFLICTS_KEY]: first.storage.getItem(CONFLICTS_KEY) }) });
    await reloaded.sync.start();
    const [item] = reloaded.core.getSnapshot().items;
    assert.deepEqual([{ ...item.conflict.yours }, item.conflict.theirs.title], [{ title: 'mine' }, 'theirs']);
    reloaded.sync.takeTheirs('a');
    assert.deepEqual(JSON.parse(reloaded.storage.getItem(CONFLICTS_KEY)), []);
  });

  test('a failure saying the task is gone fetches nothing (a 404 would be logged)', async () => {
    const { core, sync, transport } = setup();
    await sync.start();
    const op = sync.like('a', 1, 'l');
    await flush();
    failOnStream(transport, op, 'not_found');
    await flush();
    await flush();
    assert.deepEqual(transport.calls.filter((call) => call[0] !== 'send'), []);
    assert.deepEqual(core.getSnapshot().items, []);
  });

  test('an edit refused only because a like moved the version is sent again, under a new key', async () => {
    const sent = [];
    const transport = fakeTransport({
      sendCommand: async (request, key) => {
        sent.push([key, request.body]);
        return { outcome: 'accepted', command_id: `cmd-${key}` };
      },
    });
    const { core, sync } = setup({ transport });
    await sync.start();
    const edit = sync.editTask('a', { title: 'mine' }, 'edit');
    await flush();
    failOnStream(transport, edit, 'conflict', task('a', { likes: 1, version: 2 }));
    await flush();
    assert.deepEqual(sent.map(([, body]) => body), [{ title: 'mine', base_version: 1 }, { title: 'mine', base_version: 2 }]);
    assert.notEqual(sent[1][0], 'edit', 'a new command: the refused one keeps its key and its answer');
    const [item] = core.getSnapshot().items;
    assert.equal(item.conflict, null);
    assert.deepEqual([item.task.title, item.ops[0].state], ['mine', 'pending']);
  });

  test('a delete the server applied before a reload, whose resend then finds the server refusing, just leaves', async () => {
    // The tab closed right after the click: the delete was kept without its 202.
    const saved = [{ key: 'd', task_id: 'b', kind: 'delete', base_version: 1, made_on: 1, issued_at: 999_000, named: 'task b' }];
    const transport = fakeTransport({
      sendCommand: async () => ({ outcome: 'unavailable', offline: false, detail: '503: overloaded' }),
      // It applied: the task is gone from the snapshot.
      fetchSnapshot: async () => ({ tasks: [task('a')], watermark: 9 }),
    });
    const { core, sync } = setup({ transport, storage: memoryStorage({ [STORAGE_KEY]: JSON.stringify(saved) }) });
    await sync.start();
    await flush();
    assert.deepEqual([core.pendingOps(), core.getSnapshot().notices], [[], []]);
    assert.deepEqual(core.getSnapshot().items.map((item) => item.id), ['a']);
  });

  test('an overdue op is checked on the status endpoint, then Retry re-sends its key', async () => {
    let time = 1_000_000;
    const { core, sync, transport, tick } = setup({ now: () => time });
    await sync.start();
    sync.like('a', 1, 'slow');
    await flush();
    time += 5000;
    tick();
    await flush();
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'status'), [['status', 'cmd-slow']]);
    assert.equal(core.getOp('slow').state, 'stuck');
    await sync.retry('slow');
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'send').map((call) => call[3]), ['slow', 'slow']);
    assert.equal(core.getOp('slow').state, 'pending');
  });

  test('an overdue op whose status read fails (no answer in time, `fetchRead`) is offered Retry, not left checking', async () => {
    let time = 1_000_000;
    const transport = fakeTransport({
      fetchCommand: async () => { throw new DOMException('no answer within 5000 ms', 'TimeoutError'); },
    });
    const { core, sync, tick } = setup({ transport, now: () => time });
    await sync.start();
    sync.like('a', 1, 'slow');
    await flush();
    time += 5000;
    tick();
    assert.equal(core.getOp('slow').state, 'checking');
    await flush();
    assert.equal(core.getOp('slow').state, 'stuck');
  });

  test('an op the status says is done stays until the row it left can be read: nothing shown undone meanwhile', async () => {
    let time = 1_000_000;
    let readable = false;
    const sent = new Set();
    const transport = fakeTransport({
      // The server answers a key sent before as a replay (`Idempotent-Replayed`).
      sendCommand: async (request, key) => {
        const replayed = sent.has(key);
        sent.add(key);
        return { outcome: 'accepted', command_id: `cmd-${key}`, accepted_at: 'now', replayed };
      },
      fetchCommand: async (commandId) => ({ command_id: commandId, status: 'settled', event_id: 9 }),
      fetchTask: async (id) => {
        if (!readable) throw new Error(`GET /api/tasks/${id}: 503`);
        return task(id, { title: 'renamed', version: 2 });
      },
    });
    const { core, sync, tick } = setup({ transport, now: () => time });
    await sync.start();
    sync.editTask('a', { title: 'renamed' }, 'edit');
    await flush();
    time += 5000;
    tick();
    await flush();
    await flush();
    assert.equal(core.getOp('edit').state, 'stuck', 'left for its event or a Retry');
    assert.equal(core.getSnapshot().items[0].task.title, 'renamed', 'not shown as before it');

    readable = true;
    await sync.retry('edit');
    await flush();
    await flush();
    assert.equal(core.getOp('edit'), null);
    assert.deepEqual([core.getSnapshot().items[0].task.title, core.getSnapshot().items[0].pending], ['renamed', false]);
  });

  test('ops taken over are asked after first: the done ones leave as restored, never shown pending', async () => {
    const statuses = { 'cmd-done': 'settled', 'cmd-refused': 'failed', 'cmd-later': 'pending' };
    const transport = fakeTransport({
      fetchCommand: async (commandId) => ({ command_id: commandId, status: statuses[commandId], error: { reason: 'injected' } }),
      // No 202 seen (its tab closed right after the click): asked by key.
      fetchCommandByKey: async (key) => (key === 'applied-unseen' ? { command_id: 'cmd-x', status: 'settled' } : null),
    });
    const { core, sync } = setup({ transport });
    await sync.start();
    const ops = ['done', 'refused', 'later'].map((key, index) => ({
      key, command_id: `cmd-${key}`, task_id: 'a', kind: 'like', delta: 1, issued_at: index,
    }));
    const unseen = ['applied-unseen', 'unsent'].map((key) => ({ key, task_id: 'a', kind: 'like', delta: 1, issued_at: 9 }));
    const known = await sync.outcomesOf([...ops, ...unseen]);
    assert.deepEqual([...known.keys()].sort(), ['applied-unseen', 'done', 'refused']);
    core.restore(ops, known);
    assert.deepEqual(core.takeDeparted().map(({ op, outcome, reason }) => [op.key, outcome, reason]),
      [['done', 'settled', undefined], ['refused', 'failed', 'injected']]);
    assert.deepEqual(core.pendingOps().map((op) => op.key), ['later']);
    assert.equal(core.getSnapshot().items[0].task.likes, 1, 'the snapshot (0) and the like still coming: not the done one again');
  });

  test('a replayed 202 has its status asked at once: the command may have applied before this page', async () => {
    const transport = fakeTransport({
      sendCommand: async (request, key) => ({ outcome: 'accepted', command_id: `cmd-${key}`, accepted_at: 'now', replayed: key === 'again' }),
      fetchCommand: async (commandId) => {
        transport.calls.push(['status', commandId]);
        return { command_id: commandId, status: 'settled', event_id: 4 };
      },
    });
    const { core, sync } = setup({ transport });
    await sync.start();
    sync.like('a', 1, 'first');
    sync.like('a', 1, 'again');
    await flush();
    await flush();
    assert.deepEqual(transport.calls.filter((call) => call[0] === 'status'), [['status', 'cmd-again']]);
    assert.deepEqual(core.pendingOps().map((op) => op.key), ['first'], 'the replayed one settled by its status');
  });

  test('a live stream over which requests find no answer says the server is not answering, until an answer or an event', async () => {
    let hear = null;
    const transport = fakeTransport({ watchAnswers: (listener) => { hear = listener; return () => { hear = null; }; } });
    const { core, sync } = setup({ transport });
    await sync.start();
    assert.equal(core.getSnapshot().connection, 'live');
    hear(false); // a read timed out with the stream still open: a server frozen, say
    assert.equal(core.getSnapshot().connection, 'unresponsive');
    hear(true);
    assert.equal(core.getSnapshot().connection, 'live');
    hear(false);
    transport.streams.at(-1).handlers.onEvent({ id: 6, type: 'projection:settled', data: { command_id: 'x', task_id: 'a', kind: 'like', version: 2, task: task('a', { version: 2 }) } });
    assert.equal(core.getSnapshot().connection, 'live', 'an event is an answer too');
    transport.streams.at(-1).handlers.onError({ closed: false });
    hear(false);
    assert.equal(core.getSnapshot().connection, 'reconnecting', 'only a live stream turns unresponsive');
    sync.stop();
    assert.equal(hear, null, 'stopped, it no longer listens');
  });

  test('a reset event refetches the snapshot and reopens the stream from its watermark', async () => {
    const snapshots = [
      { tasks: [task('a')], watermark: 5 },
      { tasks: [task('a', { title: 'renamed elsewhere', version: 2 }), task('b')], watermark: 9 },
    ];
    const transport = fakeTransport({
      fetchSnapshot: async () => {
        transport.calls.push(['snapshot']);
        return snapshots.shift();
      },
    });
    const { core, sync } = setup({ transport });
    await sync.start();
    // The reset's id is not where the stream goes on from: the new snapshot's watermark is.
    transport.streams[0].handlers.onEvent({ id: 7, type: 'reset', data: { watermark: 7, reason: 'history_lost' } });
    await flush();
    await flush();
    assert.equal(transport.calls.filter((call) => call[0] === 'snapshot').length, 2, 'fetched again');
    assert.equal(transport.streams.length, 2);
    assert.equal(transport.streams[0].closed, true);
    assert.equal(transport.streams[1].lastEventId, 9, 'from the new snapshot');
    assert.equal(core.watermark, 9);
    const items = core.getSnapshot().items;
    assert.deepEqual(items.map((item) => [item.id, item.task.title]), [['a', 'renamed elsewhere'], ['b', 'task b']]);
  });
});

describe('the transport', () => {
  function fakeFetch(answers) {
    const requests = [];
    const fetch = async (url, init) => {
      requests.push({ url, ...init });
      const answer = answers.shift();
      if (answer instanceof Error) throw answer;
      return new Response(JSON.stringify(answer.body), { status: answer.status, headers: answer.headers });
    };
    return { fetch, requests };
  }
  const request = { method: 'POST', path: '/api/tasks', body: { id: 'n', title: 't' } };
  const accepted = { status: 202, body: { command_id: 'c1', task_id: 'n', status: 'pending', accepted_at: 'now' } };

  test('network errors, 409 and 5xx are retried under the same key', async () => {
    const { fetch, requests } = fakeFetch([new TypeError('offline'), { status: 409, body: { detail: 'in flight' } },
      { status: 503, body: {} }, accepted]);
    const transport = createTransport({ fetch, sleep: async () => {} });
    const result = await transport.sendCommand(request, 'key-1');
    assert.equal(result.outcome, 'accepted');
    assert.equal(result.command_id, 'c1');
    assert.deepEqual(requests.map((sent) => sent.headers['Idempotency-Key']), ['key-1', 'key-1', 'key-1', 'key-1']);
    assert.equal(new Set(requests.map((sent) => sent.body)).size, 1, 'the very same body every time');
  });

  test("a 503's Retry-After lengthens the pause before the next attempt, within a cap", async () => {
    const waitsFor = async (...answers) => {
      const { fetch } = fakeFetch([...answers, accepted]);
      const waits = [];
      const result = await createTransport({ fetch, sleep: async (ms) => { waits.push(ms); } }).sendCommand(request, 'k');
      assert.equal(result.outcome, 'accepted');
      return waits;
    };
    const busy = (retryAfter) => ({ status: 503, body: { detail: 'overloaded' }, headers: retryAfter ? { 'Retry-After': retryAfter } : {} });
    assert.deepEqual(await waitsFor(busy('1'), busy(null), busy('1')), [1000, 500, 1000], 'asked 1 s; the backoff without it');
    assert.deepEqual(await waitsFor(busy('3600')), [1500], 'an hour is capped');
    const inAMinute = new Date(Date.now() + 60_000).toUTCString();
    assert.deepEqual(await waitsFor(busy(inAMinute)), [1500], 'a date to come is capped');
    const past = new Date(Date.now() - 60_000).toUTCString();
    assert.deepEqual(await waitsFor(busy(past), busy('soon'), busy('-5')), [250, 500, 1000], 'a date gone, garbage, a negative: the backoff');
  });

  test('a 4xx is a rejection carrying the problem detail', async () => {
    const { fetch } = fakeFetch([{ status: 422, body: { type: 'invalid', title: 'Invalid', status: 422, detail: 'title too long' } }]);
    const result = await createTransport({ fetch, sleep: async () => {} }).sendCommand(request, 'k');
    assert.deepEqual(result, { outcome: 'rejected', status: 422, detail: 'title too long' });
  });

  test('after the last attempt the command is reported unavailable, not failed', async () => {
    const { fetch, requests } = fakeFetch([new TypeError('x'), new TypeError('x'), new TypeError('x'), new TypeError('x')]);
    const result = await createTransport({ fetch, sleep: async () => {} }).sendCommand(request, 'k');
    assert.equal(result.outcome, 'unavailable');
    assert.equal(requests.length, 4);
  });

  test('an attempt that gets no answer is abandoned after its timeout, and the next goes under the same key', async () => {
    const keys = [];
    // A server frozen with its socket open: no answer until the request is aborted.
    const fetch = (url, init) => {
      keys.push(init.headers['Idempotency-Key']);
      return new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(init.signal.reason)));
    };
    const transport = createTransport({ fetch, sleep: async () => {}, attemptTimeoutMs: 20 });
    // Node does not wait for AbortSignal.timeout's timer by itself.
    const keepAlive = setInterval(() => {}, 1_000);
    const result = await transport.sendCommand(request, 'k').finally(() => clearInterval(keepAlive));
    assert.deepEqual([result.outcome, result.offline], ['unavailable', true]);
    assert.match(result.detail, /network error: .*timed? ?out/i);
    assert.deepEqual(keys, ['k', 'k', 'k', 'k']);
  });

  test('a read that gets no answer, or whose body stalls, is abandoned; the snapshot may take long while it keeps coming', async () => {
    const frozen = (url, init) => new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(init.signal.reason)));
    await assert.rejects(createTransport({ fetch: frozen, attemptTimeoutMs: 20 }).fetchCommand('c1'), { name: 'TimeoutError' });
    await assert.rejects(createTransport({ fetch: frozen, attemptTimeoutMs: 20 }).fetchSnapshot(), { name: 'TimeoutError' });

    const encoder = new TextEncoder();
    // A body in `parts`, one every `everyMs` after the head, then (unless `stalls`) its end.
    const trickle = (parts, everyMs, { stalls = false } = {}) => async () => new Response(new ReadableStream({
      async start(controller) {
        for (const part of parts) {
          controller.enqueue(encoder.encode(part));
          await new Promise((resolve) => setTimeout(resolve, everyMs));
        }
        if (!stalls) controller.close();
      },
    }), { status: 200, headers: { 'Content-Type': 'application/json' } });

    // The head at once, then the body stops half-way: a small read and the snapshot alike.
    const stalled = trickle(['{"command_id":'], 1, { stalls: true });
    await assert.rejects(createTransport({ fetch: stalled, attemptTimeoutMs: 20 }).fetchCommand('c1'), { name: 'TimeoutError' });
    const snapshotStalls = trickle(['{"tasks":[],', '"watermark"'], 5, { stalls: true });
    await assert.rejects(createTransport({ fetch: snapshotStalls, attemptTimeoutMs: 20 }).fetchSnapshot(), { name: 'TimeoutError' });
    // No stream to watch (a fake, or a polyfill): still bounded.
    const bodiless = async () => ({ ok: true, status: 200, body: null, json: () => new Promise(() => {}) });
    await assert.rejects(createTransport({ fetch: bodiless, attemptTimeoutMs: 20 }).fetchSnapshot(), { name: 'TimeoutError' });

    // A body that keeps coming, in five times the timeout: a small read must be whole by
    // its deadline, the snapshot is read to its end.
    const parts = ['{"tasks"', ':[]', ',', '"watermark"', ':', '7', '}'];
    const slow = trickle(parts, 15);
    await assert.rejects(createTransport({ fetch: slow, attemptTimeoutMs: 20 }).fetchCommand('c1'), { name: 'TimeoutError' });
    assert.deepEqual(await createTransport({ fetch: slow, attemptTimeoutMs: 20 }).fetchSnapshot(), { tasks: [], watermark: 7 });

  });

  test('every request says whether it found an answer: a timeout without one is heard as none', async () => {
    const heard = [];
    const frozen = (url, init) => new Promise((_, reject) => init.signal.addEventListener('abort', () => reject(init.signal.reason)));
    const frozenTransport = createTransport({ fetch: frozen, sleep: async () => {}, attemptTimeoutMs: 20 });
    const stopHearing = frozenTransport.watchAnswers((answered) => heard.push(answered));
    await assert.rejects(frozenTransport.fetchCommand('c1'), { name: 'TimeoutError' });
    const keepAlive = setInterval(() => {}, 1_000); // Node does not wait for AbortSignal.timeout's timer
    await frozenTransport.sendCommand({ method: 'POST', path: '/api/tasks', body: { title: 't' } }, 'k', { attempts: 1 })
      .finally(() => clearInterval(keepAlive));
    assert.deepEqual(heard, [false, false]);
    stopHearing();

    const { fetch } = fakeFetch([{ status: 200, body: { command_id: 'c1' } }, { status: 503, body: { detail: 'busy' } }]);
    const answering = createTransport({ fetch, sleep: async () => {} });
    answering.watchAnswers((answered) => heard.push(answered));
    await answering.fetchCommand('c1');
    await answering.sendCommand({ method: 'POST', path: '/api/tasks', body: { title: 't' } }, 'k', { attempts: 1 });
    assert.deepEqual(heard, [false, false, true, true], 'a 503 is an answer');
  });

  test('a command is looked up by its key percent-encoded, and an unknown one is null', async () => {
    const found = { command_id: 'c1', idempotency_key: 'a+b/c?d&e', status: 'settled', event_id: 3 };
    const { fetch, requests } = fakeFetch([{ status: 200, body: found }, { status: 404, body: { detail: 'no command' } }]);
    const transport = createTransport({ fetch, sleep: async () => {} });
    assert.deepEqual(await transport.fetchCommandByKey('a+b/c?d&e'), found);
    assert.equal(await transport.fetchCommandByKey('gone'), null);
    assert.deepEqual(requests.map((r) => r.url), ['/api/commands?key=a%2Bb%2Fc%3Fd%26e', '/api/commands?key=gone']);
  });

  test('a body-less DELETE sends no content type', async () => {
    const { fetch, requests } = fakeFetch([accepted]);
    await createTransport({ fetch, sleep: async () => {} }).sendCommand({ method: 'DELETE', path: '/api/tasks/n', body: null }, 'k');
    assert.equal(requests[0].body, undefined);
    assert.equal(requests[0].headers['Content-Type'], undefined);
  });
});
