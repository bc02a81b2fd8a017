// Unit tests of likes as a toggle per browser (static/likes.js).

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import { createCore, EVENT_SETTLED, EVENT_FAILED } from '../../static/core.js';
import {
  isLiked, toggleDelta, compensation, readContributions, sumShares, intentOf, clickSettled, clickWithdrawn,
  latestIntents, readIntents, createLikes, MAX_FAILED_COMPENSATIONS, LEDGER_PREFIX, INTENT_PREFIX, CLICKS_KEY,
} from '../../static/likes.js';

test('the toggle reads settled and pending together', () => {
  assert.equal(isLiked(0, 0), false);
  assert.equal(isLiked(0, 1), true, 'a pending like shows at once');
  assert.equal(isLiked(1, -1), false, 'a pending unlike too');
  assert.deepEqual([toggleDelta(0, 0), toggleDelta(1, 0), toggleDelta(0, 1), toggleDelta(1, -1)], [1, -1, -1, 1]);
});

test('rapid like, unlike, like compose to one like', () => {
  let pending = 0;
  for (let click = 0; click < 3; click += 1) pending += toggleDelta(0, pending);
  assert.equal(pending, 1);
});

test('a failed like under a pending unlike is compensated, so the share ends at 0', () => {
  // like (+1) then unlike (-1) were sent; the like failed: what is left is -1.
  assert.equal(compensation(0, -1), 1);
  // a discarded like applied after all, and the user liked again: +2.
  assert.equal(compensation(2, 0), -1);
  assert.equal(compensation(1, 0), 0);
  assert.equal(compensation(0, 0), 0);
  assert.equal(compensation(-1, -1), 2);
});

test('stored contributions are read leniently', () => {
  assert.deepEqual([...readContributions('{"a":1,"b":0,"c":"x","d":-1}')], [['a', 1], ['d', -1]]);
  assert.deepEqual([...readContributions('not json')], []);
  assert.deepEqual([...readContributions('[1,2]')], []);
  assert.deepEqual([...readContributions(null)], []);
});

test("the browser's share is every tab's ledger summed; a task at 0 has none", () => {
  const tabA = new Map([['a', 1], ['b', 1]]);
  const tabB = new Map([['a', 1], ['b', -1], ['c', -1]]);
  assert.deepEqual([...sumShares([tabA, tabB, new Map()])], [['a', 2], ['c', -1]]);
  assert.deepEqual([...sumShares([])], []);
});

describe('intents: the last click still in play', () => {
  const clicks = [
    { key: 'l1', liked: true, at: 1 },
    { key: 'u1', liked: false, at: 2 },
    { key: 'l2', liked: true, at: 3 },
  ];

  test('a withdrawn click gives the toggle back to the one before it', () => {
    assert.equal(intentOf(clicks).key, 'l2');
    assert.equal(intentOf(clickWithdrawn(clicks, 'l2')).key, 'u1');
    assert.equal(intentOf(clickWithdrawn(clicks, 'l1')).key, 'l2');
    assert.equal(intentOf([]), undefined);
  });

  test('a settled click drops the ones before it, which can never be the intent again', () => {
    assert.deepEqual(clickSettled(clicks, 'u1').map(({ key }) => key), ['u1', 'l2']);
    assert.deepEqual(clickSettled(clicks, 'other'), clicks);
  });

  test("the browser's intent is the latest click of any tab, ties to the greater tab id", () => {
    const latest = latestIntents([
      ['tab-a', new Map([['x', [true, 5]], ['y', [false, 7]]])],
      ['tab-b', new Map([['x', [false, 6]], ['y', [true, 7]]])],
    ]);
    assert.deepEqual(Object.fromEntries(latest), {
      x: { liked: false, at: 6, tab: 'tab-b' },
      y: { liked: true, at: 7, tab: 'tab-b' },
    });
  });

  test('stored intents are read leniently', () => {
    assert.deepEqual([...readIntents('{"a":[true,5],"b":[1,2],"c":[false],"d":"x"}')], [['a', [true, 5]]]);
    assert.deepEqual([...readIntents('nope')], []);
  });

  test('compensation goes to the intent when there is one', () => {
    // like, unlike, like; the first like failed: eventual 0, and the user asked for liked.
    assert.equal(compensation(0, 0, true), 1);
    // a discarded like applied after the user's unlike settled.
    assert.equal(compensation(1, 0, false), -1);
    assert.equal(compensation(2, 0, true), -1);
    assert.equal(compensation(1, 0, true), 0);
  });
});

// ---- createLikes, wired to a real core and a fake sync engine --------------------------------

/** localStorage or sessionStorage in memory. */
function memoryStorage() {
  const values = new Map();
  return {
    get length() { return values.size; },
    key: (index) => [...values.keys()][index] ?? null,
    getItem: (key) => values.get(key) ?? null,
    setItem: (key, value) => values.set(key, String(value)),
    removeItem: (key) => values.delete(key),
  };
}

/** The server's likes and version per task, shared by every tab of a test. */
function fakeServer() {
  const tasks = new Map();
  let eventId = 10;
  return {
    task: (id) => ({ id, title: `task ${id}`, notes: '', done: false, likes: 0, version: 1, updated_at: '2025-01-01T00:00:00Z', ...tasks.get(id) }),
    apply(op) {
      const now = this.task(op.task_id);
      tasks.set(op.task_id, { likes: now.likes + op.delta, version: now.version + 1 });
      return this.task(op.task_id);
    },
    nextId: () => (eventId += 1),
  };
}

/**
 * One tab: a core with task `t` confirmed, a sync engine that only records, and the
 * likes under test. `settle` and `fail` deliver an op's event as the stream would.
 */
function tab({ server, local, session = memoryStorage(), alive = async () => true, name = 'tab', clock = { time: 1000 } }) {
  const core = createCore({ now: () => clock.time, stuckMs: 5000, syncMs: 800 });
  core.loadSnapshot({ tasks: [server.task('t')], watermark: 10 });
  const sent = [];
  let count = 0;
  const sync = {
    like(taskId, delta) {
      const op = core.issue({ kind: 'like', key: `${name}-${(count += 1)}`, task_id: taskId, delta });
      core.accepted(op.key, { command_id: `cmd-${op.key}` });
      sent.push(op);
      return op;
    },
  };
  let ids = 0;
  const likes = createLikes({
    core, sync, local, session, now: () => (clock.time += 1), isTabAlive: alive, newId: () => `${name}-id-${(ids += 1)}`,
  });
  const event = (op, type, data) => core.applyEvent({
    id: server.nextId(),
    type,
    data: { command_id: `cmd-${op.key}`, idempotency_key: op.key, task_id: op.task_id, kind: 'like', ...data },
  });
  return {
    core,
    likes,
    sent,
    session,
    click: () => likes.toggle('t'),
    settle: (op) => event(op, EVENT_SETTLED, { task: server.apply(op), version: server.task(op.task_id).version, window_ms: 700 }),
    fail: (op, reason = 'injected') => event(op, EVENT_FAILED, { reason, message: reason, current: server.task(op.task_id) }),
    /** Whether the toggle shows Liked, with this tab's pending deltas. */
    liked: () => likes.isLiked('t', core.pendingOps().reduce((net, op) => net + op.delta, 0)),
    /** Settle every like this tab has pending, compensations included, until none is left. */
    settleAll() {
      for (let guard = 0; guard < 20 && core.pendingOps().length; guard += 1) this.settle(core.pendingOps()[0]);
    },
  };
}

const flush = () => new Promise((resolve) => setImmediate(resolve));

describe('createLikes: the toggle of one tab', () => {
  test('like, unlike, like, and the first like fails: the last click stands, liked', () => {
    const server = fakeServer();
    const a = tab({ server, local: memoryStorage() });
    const [like1, unlike, like2] = [a.click(), a.click(), a.click()];
    assert.deepEqual([like1.delta, unlike.delta, like2.delta], [1, -1, 1]);
    a.fail(like1);
    assert.equal(a.sent.length, 4, 'one like sent to make up for the failed one');
    assert.equal(a.sent[3].delta, 1);
    assert.equal(a.liked(), true);
    a.settleAll();
    assert.equal(server.task('t').likes, 1);
    assert.equal(a.liked(), true);
  });

  test('a like that fails on its own rolls back and is not re-sent', () => {
    const server = fakeServer();
    const a = tab({ server, local: memoryStorage() });
    a.fail(a.click());
    assert.equal(a.sent.length, 1);
    assert.equal(a.liked(), false);
  });

  test('an unlike that fails under nothing else leaves the like, and sends nothing', () => {
    const server = fakeServer();
    const a = tab({ server, local: memoryStorage() });
    a.settle(a.click());
    a.fail(a.click());
    assert.equal(a.sent.length, 2);
    assert.equal(a.liked(), true);
    assert.equal(server.task('t').likes, 1);
  });

  test('a discarded like applied after a later like and unlike settled is taken back: the last click was unlike', () => {
    const server = fakeServer();
    const a = tab({ server, local: memoryStorage() });
    const lost = a.click();
    a.core.discard(lost.key);
    assert.equal(a.liked(), false);
    a.settle(a.click()); // like
    a.settle(a.click()); // unlike
    assert.equal(a.liked(), false);
    a.settle(lost); // applied after all
    assert.equal(server.task('t').likes, 1);
    assert.equal(a.sent.at(-1).delta, -1, 'an unlike makes up for it');
    a.settleAll();
    assert.equal(server.task('t').likes, 0);
    assert.equal(a.liked(), false);
  });

  test('a discarded like applied after all, with a like and an unlike queued behind it, is taken back', () => {
    const server = fakeServer();
    const a = tab({ server, local: memoryStorage() });
    const lost = a.click();
    a.core.discard(lost.key);
    const like = a.click();
    const unlike = a.click();
    a.settle(lost); // a task's commands apply in order: the lost like first
    a.settle(like);
    a.settle(unlike);
    assert.deepEqual(a.sent.map((op) => op.delta), [1, 1, -1, -1]);
    a.settleAll();
    assert.equal(server.task('t').likes, 0);
    assert.equal(a.liked(), false);
  });

  test('compensations that all fail stop after a few in a row', () => {
    const server = fakeServer();
    const a = tab({ server, local: memoryStorage() });
    const like = a.click();
    const unlike = a.click(); // pending
    a.fail(like);
    for (let guard = 0; guard < 20; guard += 1) {
      const next = a.core.pendingOps().find((op) => op.key !== unlike.key);
      if (!next) break;
      a.fail(next);
    }
    assert.equal(a.sent.length, 2 + MAX_FAILED_COMPENSATIONS);
  });

  test('compensations go on past a few failures when others settle between them: the share is not stranded', () => {
    // The intent is liked; likes that are not the user's (another tab's, say) keep
    // raising the share to 2, and the unlikes that make up for them settle, then fail
    // three times in a row (a failure rate), then settle again.
    const server = fakeServer();
    const a = tab({ server, local: memoryStorage() });
    a.settle(a.click());
    const compensations = () => a.sent.slice(1);
    for (let round = 0; round < 2; round += 1) {
      a.settle(a.core.issue({ kind: 'like', key: `extra-${round}`, task_id: 't', delta: 1 }));
      a.settle(a.core.pendingOps()[0]);
    }
    a.settle(a.core.issue({ kind: 'like', key: 'extra-2', task_id: 't', delta: 1 }));
    for (let failures = 0; failures < 3; failures += 1) a.fail(a.core.pendingOps()[0]);
    a.settle(a.core.pendingOps()[0]);
    assert.deepEqual(compensations().map((op) => op.delta), [-1, -1, -1, -1, -1, -1]);
    assert.equal(a.core.pendingOps().length, 0);
    assert.equal(server.task('t').likes, 1);
    assert.equal(a.liked(), true);
  });

  test('a like on a task that is gone is not made up for', () => {
    const server = fakeServer();
    const a = tab({ server, local: memoryStorage() });
    const like = a.click();
    a.click();
    a.fail(like, 'not_found');
    assert.equal(a.sent.length, 2);
  });

  test('the share and the clicks in play survive a reload of the tab', () => {
    const server = fakeServer();
    const local = memoryStorage();
    const session = memoryStorage();
    const a = tab({ server, local, session });
    a.settle(a.click());
    const like1 = a.click(); // unlike, pending across the reload
    a.likes.stop();
    const again = tab({ server, local, session });
    assert.equal(again.likes.tabId, a.likes.tabId);
    assert.equal(again.likes.isLiked('t', 0), true, 'the settled like is in the share');
    // the pending unlike is restored by sync in the app; here it is re-issued under its key
    const op = again.core.issue({ kind: 'like', key: like1.key, task_id: 't', delta: -1 });
    again.core.accepted(op.key, { command_id: `cmd-${op.key}` });
    again.fail(op);
    assert.equal(again.sent.length, 0, 'its click is remembered: the rollback to liked stands, nothing sent');
    assert.equal(again.liked(), true);
  });

  test('stored clicks and ledgers are read leniently: bad ones count as none', () => {
    const server = fakeServer();
    for (const stored of ['nope', '{}', '[["t", "x"]]', '[["t", [{"key": 1}]]]', '[[1, []]]']) {
      const session = memoryStorage();
      session.setItem(CLICKS_KEY, stored);
      const local = memoryStorage();
      local.setItem(`${LEDGER_PREFIX}other`, stored);
      const a = tab({ server, local, session });
      assert.equal(a.liked(), false, stored);
      assert.equal(a.click().delta, 1, stored);
    }
  });
});

describe('createLikes: two tabs of one browser', () => {
  test('both like in one window: one unlike, from the tab whose click came last, whichever settles first', async () => {
    for (const order of [['a', 'b'], ['b', 'a']]) {
      const server = fakeServer();
      const local = memoryStorage();
      const clock = { time: 1000 };
      const tabs = { a: tab({ server, local, name: 'a', clock }), b: tab({ server, local, name: 'b', clock }) };
      const ops = { a: tabs.a.click(), b: tabs.b.click() };
      tabs.a.likes.storageChanged(`${INTENT_PREFIX}${tabs.b.likes.tabId}`);
      for (const name of order) {
        tabs[name].settle(ops[name]);
        const other = name === 'a' ? tabs.b : tabs.a;
        other.likes.storageChanged(`${LEDGER_PREFIX}${tabs[name].likes.tabId}`);
        await flush();
      }
      assert.equal(tabs.a.sent.length, 1, `${order}: tab a, whose click came first, sends nothing more`);
      assert.deepEqual(tabs.b.sent.map((op) => op.delta), [1, -1], `${order}: tab b makes up for the second like`);
      tabs.b.settleAll();
      tabs.a.likes.storageChanged(`${LEDGER_PREFIX}${tabs.b.likes.tabId}`);
      await flush();
      assert.equal(server.task('t').likes, 1, `${order}: one like`);
      assert.equal(tabs.a.liked(), true);
      assert.equal(tabs.b.liked(), true);
    }
  });

  test('the tab whose click came last was closed: another tab makes up for its own op', async () => {
    const server = fakeServer();
    const local = memoryStorage();
    const clock = { time: 1000 };
    const a = tab({ server, local, name: 'a', clock, alive: async () => false });
    const b = tab({ server, local, name: 'b', clock });
    const lost = a.click();
    a.core.discard(lost.key);
    b.settle(b.click()); // b liked last, then b was closed
    a.likes.storageChanged(`${LEDGER_PREFIX}${b.likes.tabId}`);
    a.settle(lost); // a's discarded like applied after all: the browser's share is 2
    await flush();
    assert.deepEqual(a.sent.map((op) => op.delta), [1, -1]);
    a.settleAll();
    assert.equal(server.task('t').likes, 1);
  });

  test('a tab takes the latest click of another into its toggle', () => {
    const server = fakeServer();
    const local = memoryStorage();
    const a = tab({ server, local, name: 'a' });
    const b = tab({ server, local, name: 'b' });
    b.settle(b.click());
    assert.equal(a.likes.storageChanged(`${LEDGER_PREFIX}${b.likes.tabId}`), true);
    assert.equal(a.liked(), true);
    assert.equal(a.likes.storageChanged('something.else'), false);
    assert.equal(a.click().delta, -1, 'a click in a unlikes');
  });
});
