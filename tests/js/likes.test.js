// Unit tests of likes as a toggle per browser (static/likes.js).

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import { createCore } from '../../static/core.js';
import { EVENT_SETTLED, EVENT_FAILED } from '../../static/ops.js';
import { createLikes, MAX_FAILED_COMPENSATIONS } from '../../static/likes.js';
import {
  isLiked, toggleDelta, compensation, intentOf, clickSettled, clickWithdrawn, latestIntents,
} from '../../static/like-intents.js';
import {
  readContributions, sumShares, readTabRecord, browserShares, tabRecords, readOrphans, TAB_RECORD_PREFIX,
  LEGACY_LEDGER_PREFIX, LEGACY_LIKED_KEY, CLICKS_KEY, ORPHANS_PREFIX, ADOPT_AFTER_MS, TAB_ID_KEY, ABSORB_AFTER_MS,
} from '../../static/like-records.js';

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

  test('the first click in play withdrawn leaves the toggle as it was before it, as the intent', () => {
    assert.deepEqual(clickWithdrawn([clicks[0]], 'l1'), [{ key: null, liked: false, at: 1 }]);
    assert.deepEqual(intentOf(clickWithdrawn(clickWithdrawn(clicks, 'l1'), 'u1')), clicks[2]);
    assert.deepEqual(intentOf(clickWithdrawn(clickWithdrawn(clickWithdrawn(clicks, 'l1'), 'u1'), 'l2')),
      { key: null, liked: false, at: 1 });
    assert.equal(clickWithdrawn(clicks, 'other'), clicks);
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

  test('a stored tab record is read leniently', () => {
    const record = readTabRecord('{"share":{"a":1,"b":0,"c":"x"},"pending":{"a":-1},"intent":{"a":[true,5],"b":[1,2],"c":[false]}}');
    assert.deepEqual([[...record.share], [...record.pending], [...record.intent]], [[['a', 1]], [['a', -1]], [['a', [true, 5]]]]);
    for (const stored of ['nope', null, '[1]', '{"share":[1],"pending":"x"}']) {
      const empty = readTabRecord(stored);
      assert.deepEqual([empty.share.size, empty.pending.size, empty.intent.size], [0, 0, 0], String(stored));
    }
  });

  test("the browser's shares: every tab's record, the ledgers and the liked set from before", () => {
    const storage = memoryStorage();
    storage.setItem(`${TAB_RECORD_PREFIX}a`, JSON.stringify({ share: { x: 1, y: -1 }, pending: { x: 5 } }));
    storage.setItem(`${LEGACY_LEDGER_PREFIX}b`, JSON.stringify({ y: 1, z: 1 }));
    storage.setItem(LEGACY_LIKED_KEY, JSON.stringify(['w']));
    storage.setItem('unrelated', '{"x": 1}');
    assert.deepEqual(Object.fromEntries(browserShares(storage)), { x: 1, z: 1, w: 1 });
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
function tab({
  server, local, session = memoryStorage(), alive = async () => true, name = 'tab', clock = { time: 1000 }, restored = [],
  identityPending = false, live = async () => undefined, done = new Set(),
}) {
  const core = createCore({ now: () => clock.time, stuckMs: 5000, syncMs: 800 });
  core.restore(restored); // as sync does after a reload, before the snapshot
  core.loadSnapshot({ tasks: [server.task('t')], watermark: 10 });
  const sent = [];
  const retried = [];
  const asked = [];
  const timers = [];
  let count = 0;
  const sync = {
    like(taskId, delta, key = `${name}-${(count += 1)}`, { compensating = false } = {}) {
      const op = core.issue({ kind: 'like', key, task_id: taskId, delta, compensating });
      core.accepted(op.key, { command_id: `cmd-${op.key}` });
      sent.push(op);
      return op;
    },
    retry(key) {
      retried.push(key);
      core.resending(key);
    },
    async outcomesOf(ops) {
      asked.push(...ops.map((op) => op.key));
      return new Map(ops.filter((op) => done.has(op.key)).map((op) => [op.key, { type: EVENT_SETTLED }]));
    },
  };
  let ids = 0;
  const likes = createLikes({
    core,
    sync,
    local,
    session,
    now: () => (clock.time += 1),
    isTabAlive: alive,
    liveTabs: live,
    newId: () => `${name}-id-${(ids += 1)}`,
    later: (callback, ms) => timers.push({ callback, ms }),
    identityPending,
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
    retried,
    asked,
    session,
    /** Run the timers set so far (the clock is moved by the test). */
    runTimers: () => timers.splice(0).forEach(({ callback }) => callback()),
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

/** A server and one tab on it. */
function oneTab() {
  const server = fakeServer();
  return { server, a: tab({ server, local: memoryStorage() }) };
}

const flush = () => new Promise((resolve) => setImmediate(resolve));

describe('createLikes: the toggle of one tab', () => {
  test('like, unlike, like, and the first like fails: the last click stands, liked', () => {
    const { server, a } = oneTab();
    const [like1, unlike, like2] = [a.click(), a.click(), a.click()];
    assert.deepEqual([like1.delta, unlike.delta, like2.delta], [1, -1, 1]);
    a.fail(like1);
    assert.equal(a.sent.length, 4, 'one like sent to make up for the failed one');
    assert.equal(a.sent[3].delta, 1);
    assert.deepEqual(a.sent.map((op) => op.compensating ?? false), [false, false, false, true], 'marked as the page\'s');
    assert.equal(a.liked(), true);
    a.settleAll();
    assert.equal(server.task('t').likes, 1);
    assert.equal(a.liked(), true);
  });

  test('a like that fails on its own rolls back and is not re-sent', () => {
    const { a } = oneTab();
    a.fail(a.click());
    assert.equal(a.sent.length, 1);
    assert.equal(a.liked(), false);
  });

  test('an unlike that fails under nothing else leaves the like, and sends nothing', () => {
    const { server, a } = oneTab();
    a.settle(a.click());
    a.fail(a.click());
    assert.equal(a.sent.length, 2);
    assert.equal(a.liked(), true);
    assert.equal(server.task('t').likes, 1);
  });

  test('a discarded like applied after a later like and unlike settled is taken back: the last click was unlike', () => {
    const { server, a } = oneTab();
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
    const { server, a } = oneTab();
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

  test('a discarded like applied after all, with no other click, is taken back: the toggle was not liked before it', () => {
    const { server, a } = oneTab();
    const lost = a.click();
    a.core.discard(lost.key);
    a.settle(lost);
    assert.deepEqual(a.sent.map((op) => op.delta), [1, -1]);
    a.settleAll();
    assert.equal(server.task('t').likes, 0);
    assert.equal(a.liked(), false);
  });

  test('compensations that all fail stop after a few in a row', () => {
    const { a } = oneTab();
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
    const { server, a } = oneTab();
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

  test('compensations that stopped after failing in a row go on after a reload', () => {
    const server = fakeServer();
    const local = memoryStorage();
    const session = memoryStorage();
    const a = tab({ server, local, session });
    const like = a.click();
    const unlike = a.click();
    a.fail(like);
    a.settle(unlike); // the share is -1; the user's last click was Unlike: one like is owed
    for (let failures = 0; failures < MAX_FAILED_COMPENSATIONS; failures += 1) a.fail(a.core.pendingOps()[0]);
    assert.equal(a.core.pendingOps().length, 0, 'it stopped');
    a.likes.stop();
    const again = tab({ server, local, session });
    assert.deepEqual(again.sent.map((op) => op.delta), [1], 'the reloaded tab sends the like owed');
    again.settleAll();
    assert.equal(server.task('t').likes, 0);
    assert.equal(again.liked(), false);
  });

  test('a like on a task that is gone is not made up for', () => {
    const { a } = oneTab();
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
    const again = tab({ server, local, session, restored: a.core.persistedOps() });
    assert.equal(again.likes.tabId, a.likes.tabId);
    assert.equal(again.likes.isLiked('t', 0), true, 'the settled like is in the share');
    assert.equal(again.sent.length, 0, 'nothing owed: the unlike is pending still');
    again.fail(again.core.getOp(like1.key));
    assert.equal(again.sent.length, 0, 'its click is remembered: the rollback to liked stands, nothing sent');
    assert.equal(again.liked(), true);
  });

  test('stored clicks and ledgers are read leniently: bad ones count as none', () => {
    const server = fakeServer();
    for (const stored of ['nope', '{}', '[["t", "x"]]', '[["t", [{"key": 1}]]]', '[[1, []]]']) {
      const session = memoryStorage();
      session.setItem(CLICKS_KEY, stored);
      const local = memoryStorage();
      local.setItem(`${TAB_RECORD_PREFIX}other`, stored);
      local.setItem(`${LEGACY_LEDGER_PREFIX}other`, stored);
      const a = tab({ server, local, session });
      assert.equal(a.liked(), false, stored);
      assert.equal(a.click().delta, 1, stored);
    }
  });
});

/** Tabs a and b of one browser; a has a like pending; b takes every other tab for closed. */
/** A server, shared storage and clock, and tab `a` with a like pending. */
function aWithLikePending() {
  const server = fakeServer();
  const local = memoryStorage();
  const clock = { time: 1000 };
  const a = tab({ server, local, name: 'a', clock });
  return { server, local, clock, a, like: a.click() };
}

function likePendingInA(optionsOfB = {}) {
  const { server, local, clock, a, like } = aWithLikePending();
  const b = tab({ server, local, name: 'b', clock, alive: async () => false, ...optionsOfB });
  return { server, local, clock, a, like, b };
}

describe('createLikes: two tabs of one browser', () => {
  test('both like in one window: one unlike, from the tab whose click came last, whichever settles first', async () => {
    for (const order of [['a', 'b'], ['b', 'a']]) {
      const server = fakeServer();
      const local = memoryStorage();
      const clock = { time: 1000 };
      const tabs = { a: tab({ server, local, name: 'a', clock }), b: tab({ server, local, name: 'b', clock }) };
      const ops = { a: tabs.a.click(), b: tabs.b.click() };
      tabs.a.likes.storageChanged(`${TAB_RECORD_PREFIX}${tabs.b.likes.tabId}`);
      for (const name of order) {
        tabs[name].settle(ops[name]);
        const other = name === 'a' ? tabs.b : tabs.a;
        other.likes.storageChanged(`${TAB_RECORD_PREFIX}${tabs[name].likes.tabId}`);
        await flush();
      }
      assert.equal(tabs.a.sent.length, 1, `${order}: tab a, whose click came first, sends nothing more`);
      assert.deepEqual(tabs.b.sent.map((op) => op.delta), [1, -1], `${order}: tab b makes up for the second like`);
      tabs.b.settleAll();
      tabs.a.likes.storageChanged(`${TAB_RECORD_PREFIX}${tabs.b.likes.tabId}`);
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
    a.likes.storageChanged(`${TAB_RECORD_PREFIX}${b.likes.tabId}`);
    a.settle(lost); // a's discarded like applied after all: the browser's share is 2
    await flush();
    assert.deepEqual(a.sent.map((op) => op.delta), [1, -1]);
    a.settleAll();
    assert.equal(server.task('t').likes, 1);
  });

  test("another tab's pending like counts for compensation at once", () => {
    const server = fakeServer();
    const local = memoryStorage();
    const a = tab({ server, local, name: 'a' });
    const b = tab({ server, local, name: 'b' });
    a.click();
    b.click(); // b's toggle does not show a's pending like: its click likes too
    b.likes.storageChanged(`${TAB_RECORD_PREFIX}${a.likes.tabId}`);
    assert.deepEqual(b.sent.map((op) => op.delta), [1, -1], 'b, whose click is the latest, takes one back at once');
  });

  test('a tab closed with a like pending: another takes it over and counts it; the tab reopened leaves it', async () => {
    const { server, local, clock, a, like } = aWithLikePending();
    const aId = a.likes.tabId;
    const b = tab({ server, local, name: 'b', clock, alive: async (id) => id !== aId });
    a.likes.leave();
    a.likes.stop();
    b.likes.storageChanged(`${ORPHANS_PREFIX}${aId}`);
    await flush();
    assert.equal(b.core.pendingOps().length, 0, 'not at once: the tab may be reloading');
    clock.time += ADOPT_AFTER_MS;
    b.runTimers();
    await flush();
    assert.deepEqual(b.core.pendingOps().map((op) => op.key), [like.key], 'taken over');
    assert.deepEqual(b.asked, [like.key], 'asked after first: it may have applied before b loaded');
    b.settle(like);
    assert.equal(browserShares(local).get('t'), 1, 'counted once, by the tab that took it');
    assert.equal(b.liked(), true);

    // The closed tab reopened with its session (its pending ops restored): they are b's.
    const reopened = tab({ server, local, session: a.session, name: 'a2', clock, restored: a.core.persistedOps() });
    reopened.settle(reopened.core.getOp(like.key) ?? like);
    assert.equal(browserShares(local).get('t'), 1, 'not counted twice');
    assert.equal(reopened.sent.length, 0);
  });

  test('a like that settles before the page knows its id, then a reload: the next page counts it', async () => {
    const server = fakeServer();
    const local = memoryStorage();
    const a = tab({ server, local, name: 'a', identityPending: true });
    a.settle(a.click());
    assert.equal(a.liked(), true);
    a.likes.leave(); // reloaded before its lock came: no record written
    a.likes.stop();
    assert.equal(browserShares(local).get('t') ?? 0, 0);
    const reloaded = tab({ server, local, session: a.session, name: 'a2', restored: a.core.persistedOps(), identityPending: true });
    assert.equal(reloaded.liked(), true);
    await reloaded.likes.confirmTab();
    assert.equal(browserShares(local).get('t'), 1, 'in its record now');
    const again = tab({ server, local, session: a.session, name: 'a3' });
    assert.equal(again.liked(), true);
    assert.equal(browserShares(local).get('t'), 1, 'and not twice: the note of it was cleared');
  });

  test('a like taken over that had applied already is counted at once, never shown pending', async () => {
    const { server, local, clock, a, like } = aWithLikePending();
    server.apply(like); // applied; its event reached no tab that is still open
    a.likes.leave();
    a.likes.stop();
    const b = tab({ server, local, name: 'b', clock, alive: async (id) => id !== a.likes.tabId, done: new Set([like.key]) });
    clock.time += ADOPT_AFTER_MS;
    b.likes.storageChanged(`${ORPHANS_PREFIX}${a.likes.tabId}`);
    await flush();
    assert.deepEqual(b.asked, [like.key]);
    assert.deepEqual(b.core.pendingOps(), []);
    assert.equal(browserShares(local).get('t'), 1);
    assert.equal(b.liked(), true);
    assert.deepEqual(b.sent, []);
  });

  test('a tab reloaded with a like pending takes it back; no other tab takes it over', async () => {
    const { server, local, clock, a, like, b } = likePendingInA();
    a.likes.leave();
    a.likes.stop();
    b.likes.storageChanged(`${ORPHANS_PREFIX}${a.likes.tabId}`);
    const reloaded = tab({ server, local, session: a.session, name: 'a', clock, restored: a.core.persistedOps() });
    clock.time += ADOPT_AFTER_MS;
    b.runTimers();
    await flush();
    assert.equal(b.core.pendingOps().length, 0);
    reloaded.settle(reloaded.core.getOp(like.key));
    assert.equal(browserShares(local).get('t'), 1);
  });

  test('a page back from the back/forward cache takes its pending likes back', async () => {
    const { clock, a, like, b } = likePendingInA();
    a.likes.leave();
    a.likes.resume();
    clock.time += ADOPT_AFTER_MS;
    b.likes.storageChanged(`${ORPHANS_PREFIX}${a.likes.tabId}`);
    await flush();
    assert.equal(b.core.pendingOps().length, 0, 'nothing left to take over');
    assert.deepEqual(a.core.pendingOps().map((op) => op.key), [like.key]);
  });

  test('a like taken over after its event came is counted at once', async () => {
    const { server, local, clock, a, like, b } = likePendingInA();
    a.likes.leave();
    b.settle(like); // the event reaches b, which has no op of that key yet
    clock.time += ADOPT_AFTER_MS;
    b.likes.storageChanged(`${ORPHANS_PREFIX}${a.likes.tabId}`);
    await flush();
    assert.deepEqual(b.sent, [], 'nothing pending, nothing to make up for');
    assert.equal(b.core.pendingOps().length, 0);
    assert.equal(browserShares(local).get('t'), 1);
  });

  test('a page opened as a copy of a tab takes an id, a share and clicks of its own', () => {
    const server = fakeServer();
    const local = memoryStorage();
    const clock = { time: 1000 };
    const a = tab({ server, local, name: 'a', clock });
    a.settle(a.click());
    const pendingUnlike = a.click();
    const session = memoryStorage();
    for (const key of [TAB_ID_KEY, CLICKS_KEY]) session.setItem(key, a.session.getItem(key));
    clock.time += 100;
    const copy = tab({ server, local, session, name: 'copy', clock, restored: a.core.persistedOps() });
    assert.equal(copy.likes.tabId, a.likes.tabId, 'it came with the same id');
    const copyId = copy.likes.becomeCopy();
    assert.notEqual(copyId, a.likes.tabId);
    assert.equal(session.getItem(TAB_ID_KEY), copyId);
    // The unlike both pages track settles in both: the tab that clicked counts it, once.
    a.settle(pendingUnlike);
    copy.core.applyEvent({
      id: server.nextId(),
      type: EVENT_SETTLED,
      data: {
        command_id: `cmd-${pendingUnlike.key}`, idempotency_key: pendingUnlike.key, task_id: 't', kind: 'like', task: server.task('t'),
      },
    });
    assert.equal(copy.core.pendingOps().length, 0);
    assert.equal(browserShares(local).get('t') ?? 0, 0);
    assert.equal(server.task('t').likes, 0);
    assert.deepEqual(copy.sent, [], 'nothing to make up for');
  });

  test('a copy that clicks before it knows it is one: its click is its own, and the tab it copied keeps its record', () => {
    const server = fakeServer();
    const local = memoryStorage();
    const clock = { time: 1000 };
    const a = tab({ server, local, name: 'a', clock });
    a.settle(a.click()); // a likes t
    const session = memoryStorage();
    for (const key of [TAB_ID_KEY, CLICKS_KEY]) session.setItem(key, a.session.getItem(key));
    clock.time += 100;
    const before = local.getItem(`${TAB_RECORD_PREFIX}${a.likes.tabId}`);
    const copy = tab({ server, local, session, name: 'copy', clock, identityPending: true });
    const unlike = copy.click(); // within the detection window
    assert.equal(unlike.delta, -1);
    assert.equal(local.getItem(`${TAB_RECORD_PREFIX}${a.likes.tabId}`), before, 'nothing written under the id it came with');
    copy.settle(unlike);
    copy.likes.becomeCopy();
    assert.equal(browserShares(local).get('t') ?? 0, 0, "the copy's unlike counts, once");
    assert.equal(server.task('t').likes, 0);
    assert.deepEqual(copy.sent.map((op) => op.delta), [-1], 'nothing to make up for');
    assert.equal(copy.liked(), false);
  });

  test('a page that finds its tab lock free takes over what a page of that id left (the tab it copied, closed)', async () => {
    const { local, a, like } = likePendingInA();
    const session = memoryStorage();
    session.setItem(TAB_ID_KEY, a.session.getItem(TAB_ID_KEY));
    const copy = tab({ server: fakeServer(), local, session, name: 'copy', identityPending: true });
    a.likes.leave(); // the original closes with its like pending; the copy never had it
    await copy.likes.confirmTab();
    assert.deepEqual(copy.core.pendingOps().map((op) => op.key), [like.key]);
  });

  test('a 202 that comes after pagehide does not put the like back among the pending', () => {
    const server = fakeServer();
    const local = memoryStorage();
    const a = tab({ server, local, name: 'a' });
    const op = a.core.issue({ kind: 'like', key: 'late-202', task_id: 't', delta: 1 });
    a.likes.leave();
    a.core.accepted(op.key, { command_id: 'cmd-late-202' });
    assert.deepEqual(readTabRecord(local.getItem(`${TAB_RECORD_PREFIX}${a.likes.tabId}`)).pending.size, 0);
    assert.equal(JSON.parse(local.getItem(`${ORPHANS_PREFIX}${a.likes.tabId}`)).ops[0].command_id, 'cmd-late-202',
      'the orphan gets its command id');
  });

  test('a tab takes the latest click of another into its toggle', () => {
    const server = fakeServer();
    const local = memoryStorage();
    const a = tab({ server, local, name: 'a' });
    const b = tab({ server, local, name: 'b' });
    b.settle(b.click());
    assert.equal(a.likes.storageChanged(`${TAB_RECORD_PREFIX}${b.likes.tabId}`), true);
    assert.equal(a.liked(), true);
    assert.equal(a.likes.storageChanged('something.else'), false);
    assert.equal(a.click().delta, -1, 'a click in a unlikes');
  });
});

// ---- a property: two tabs, random clicks, failures, discards, late storage events -----------

/** A small seeded random source (mulberry32). */
/**
 * A tab `a` that liked `t`, saw it settle, and was closed; `openTab` opens another that
 * sees it closed.
 */
function likedAndClosed() {
  const server = fakeServer();
  const local = memoryStorage();
  const clock = { time: 1000 };
  const a = tab({ server, local, name: 'a', clock });
  a.settle(a.click());
  a.likes.leave();
  a.likes.stop();
  const openTab = () => tab({ server, local, name: 'b', clock, alive: async (id) => id !== a.likes.tabId });
  return { server, local, clock, a, openTab };
}

describe('createLikes: the records of closed tabs and deleted tasks', () => {
  test('a tab closed over an hour ago is taken into an open one: its share counted once, its intent kept, its key gone', async () => {
    const { local, clock, a, openTab } = likedAndClosed();
    const aKey = `${TAB_RECORD_PREFIX}${a.likes.tabId}`;
    const b = openTab();
    await flush();
    assert.notEqual(local.getItem(aKey), null, 'not within the hour');
    clock.time += ABSORB_AFTER_MS;
    b.runTimers();
    await flush();
    assert.equal(local.getItem(aKey), null);
    assert.deepEqual(tabRecords(local).map(([id]) => id), [b.likes.tabId]);
    assert.equal(browserShares(local).get('t'), 1);
    assert.equal(b.liked(), true);
    assert.deepEqual(b.sent, [], 'nothing to make up for');
    const [, record] = tabRecords(local)[0];
    assert.equal(record.intent.get('t')[0], true, "a's click is b's intent now");
    assert.equal(b.click().delta, -1, 'a click in b unlikes');
  });

  test('a record being taken in counts once, for every reader, before its key goes', () => {
    const local = memoryStorage();
    local.setItem(`${TAB_RECORD_PREFIX}x`, JSON.stringify({ share: { t: 1 }, left: 5 }));
    local.setItem(`${TAB_RECORD_PREFIX}y`, JSON.stringify({ share: { t: 1, u: 1 }, absorbed: ['x', 'w'] }));
    assert.deepEqual(Object.fromEntries(browserShares(local)), { t: 1, u: 1 });
    assert.deepEqual(tabRecords(local).map(([id]) => id), ['y']);
    // Its tab back and open (no `left`): its record counts again, whoever names it.
    local.setItem(`${TAB_RECORD_PREFIX}x`, JSON.stringify({ share: { v: 1 } }));
    assert.deepEqual(Object.fromEntries(browserShares(local)), { t: 1, u: 1, v: 1 });
  });

  test('not taken in: a tab still open, one that closed without saying so, one closed within the hour', async () => {
    const server = fakeServer();
    const local = memoryStorage();
    const clock = { time: 10 * ABSORB_AFTER_MS };
    const records = {
      held: { share: { t: 1 }, left: 0 },
      crashed: { share: { t: -1 }, pending: { t: 1 } },
      recent: { share: { t: 1 }, left: clock.time - 1000 },
    };
    for (const [id, record] of Object.entries(records)) local.setItem(`${TAB_RECORD_PREFIX}${id}`, JSON.stringify(record));
    const b = tab({ server, local, name: 'b', clock, alive: async (id) => id === 'held' });
    await flush();
    assert.deepEqual(tabRecords(local).map(([id]) => id).sort(), ['b-id-1', 'crashed', 'held', 'recent']);
    assert.equal(browserShares(local).get('t'), 1);
    clock.time += ABSORB_AFTER_MS;
    b.runTimers();
    await flush();
    assert.deepEqual(tabRecords(local).map(([id]) => id).sort(), ['b-id-1', 'crashed', 'held']);
    assert.equal(browserShares(local).get('t'), 1);
    assert.deepEqual(b.sent, []);
  });

  test('a closed tab whose session is restored after its record was taken in counts nothing twice', async () => {
    const { server, local, clock, a, openTab } = likedAndClosed();
    clock.time += ABSORB_AFTER_MS;
    openTab();
    await flush();
    const restored = tab({ server, local, session: a.session, name: 'a2', clock });
    await flush();
    assert.equal(restored.likes.tabId, a.likes.tabId);
    assert.equal(browserShares(local).get('t'), 1);
    assert.equal(restored.liked(), true, "b's share shows here");
    assert.deepEqual(restored.sent, []);
  });

  test('a page that read its record before it was taken in drops that share once it knows its id', async () => {
    const { server, local, clock, a, openTab } = likedAndClosed();
    clock.time += ABSORB_AFTER_MS;
    const restored = tab({ server, local, session: a.session, name: 'a2', clock, identityPending: true });
    openTab();
    await flush();
    assert.equal(local.getItem(`${TAB_RECORD_PREFIX}${a.likes.tabId}`), null, 'taken in meanwhile');
    await restored.likes.confirmTab();
    assert.equal(browserShares(local).get('t'), 1, 'counted once');
    assert.equal(restored.liked(), true);
    assert.deepEqual(restored.sent, []);
    // Its record counts again: an unlike there takes the browser's like back.
    restored.settle(restored.click());
    assert.deepEqual(tabRecords(local).map(([id]) => id).sort(), [a.likes.tabId, 'b-id-1']);
    assert.equal(browserShares(local).get('t') ?? 0, 0);
  });

  test('a tab gone without pagehide (a crash) with a like pending: another takes the like over once its lock stays free', async () => {
    const server = fakeServer();
    const local = memoryStorage();
    const clock = { time: 1000 };
    const a = tab({ server, local, name: 'a', clock });
    a.settle(a.click());
    a.settle(a.click()); // unliked
    const like = a.click();
    a.likes.stop(); // crashed: no leave()
    const aId = a.likes.tabId;
    let aAlive = true;
    const b = tab({ server, local, name: 'b', clock, alive: async (id) => (id === aId ? aAlive : true) });
    await flush();
    assert.equal(b.core.pendingOps().length, 0, 'not while its lock is held');
    aAlive = false;
    b.runTimers(); // the periodic look
    await flush();
    assert.equal(b.core.pendingOps().length, 0, 'not at the first look: it may be starting');
    clock.time += ADOPT_AFTER_MS;
    b.runTimers();
    await flush();
    assert.deepEqual(b.core.pendingOps().map((op) => op.key), [like.key], 'taken over');
    assert.deepEqual(tabRecords(local).map(([id]) => id), [b.likes.tabId], "a's record taken in");
    assert.deepEqual(readOrphans(local.getItem(`${ORPHANS_PREFIX}${aId}`)).taken, [like.key]);
    assert.deepEqual(b.sent, [], 'nothing to make up for');
    assert.equal(b.liked(), true, "a's pending like, b's now");
    b.settle(like);
    assert.equal(browserShares(local).get('t'), 1);
    assert.equal(b.click().delta, -1, "a's last click is b's intent: a click unlikes");

    // The crashed tab restored with its session (a discarded tab coming back): the like is b's.
    const restored = tab({ server, local, session: a.session, name: 'a2', clock, restored: a.core.persistedOps() });
    await flush();
    restored.settle(restored.core.getOp(like.key) ?? like);
    assert.equal(browserShares(local).get('t') ?? 0, 1, 'counted once, with b\'s unlike still pending');
    assert.deepEqual(restored.sent, []);
  });

  test("a crashed tab's like whose event came before the takeover is counted at once, and nothing is sent", async () => {
    const server = fakeServer();
    const local = memoryStorage();
    const clock = { time: 1000 };
    const a = tab({ server, local, name: 'a', clock });
    const like = a.click();
    a.likes.stop();
    const b = tab({ server, local, name: 'b', clock, alive: async (id) => id !== a.likes.tabId });
    b.settle(like); // b's core sees the event of an op it does not have
    await flush();
    clock.time += ADOPT_AFTER_MS;
    b.runTimers();
    await flush();
    assert.deepEqual(b.core.pendingOps(), []);
    assert.deepEqual(b.sent, [], 'the record taken in and the op taken over count once, not twice, meanwhile');
    assert.equal(browserShares(local).get('t'), 1);
    assert.equal(b.liked(), true);
  });

  test('a tab gone without pagehide is left alone when locks cannot tell, or its record has pending deltas without ops', async () => {
    const server = fakeServer();
    const local = memoryStorage();
    const clock = { time: 1000 };
    local.setItem(`${TAB_RECORD_PREFIX}old`, JSON.stringify({ share: { u: 1 }, pending: { u: -1 } }));
    const a = tab({ server, local, name: 'a', clock });
    a.click();
    a.likes.stop();
    const b = tab({ server, local, name: 'b', clock, alive: async (id) => (id === 'old' ? false : undefined) });
    for (let look = 0; look < 3; look += 1) {
      clock.time += ADOPT_AFTER_MS;
      b.runTimers();
      await flush();
    }
    assert.deepEqual(b.core.pendingOps(), []);
    assert.equal(tabRecords(local).length, 3);
  });

  test('of two open tabs, only the one with the least id takes in a closed tab or takes over its likes', async () => {
    const { server, local, clock, a } = likedAndClosed();
    const live = async () => ['b-id-1', 'c-id-1'];
    const notA = async (id) => id !== a.likes.tabId;
    const c = tab({ server, local, name: 'c', clock, alive: notA, live });
    const b = tab({ server, local, name: 'b', clock, alive: notA, live });
    await flush();
    clock.time += ABSORB_AFTER_MS;
    c.runTimers();
    await flush();
    assert.equal(tabRecords(local).length, 3, 'not c: its storage may not show yet what b wrote');
    b.runTimers();
    await flush();
    assert.deepEqual(tabRecords(local).map(([id]) => id).sort(), ['b-id-1', 'c-id-1']);
    assert.equal(browserShares(local).get('t'), 1);
  });

  test('a tab that is not the one to take over orphans looks again, and takes them once it is', async () => {
    let live = ['a-id-1', 'c-id-1'];
    const { clock, a, like, b } = likePendingInA({ live: async () => live });
    const aId = a.likes.tabId;
    a.likes.leave();
    a.likes.stop();
    clock.time += ADOPT_AFTER_MS;
    b.likes.storageChanged(`${ORPHANS_PREFIX}${aId}`);
    await flush();
    assert.deepEqual(b.core.pendingOps(), [], 'c, open, has the least id');
    live = [b.likes.tabId]; // c closed
    clock.time += ADOPT_AFTER_MS;
    b.runTimers();
    await flush();
    assert.deepEqual(b.core.pendingOps().map((op) => op.key), [like.key]);
  });

  test('a record taken in keeps the share of a task this view has not seen yet; its delete drops it', async () => {
    const server = fakeServer();
    const local = memoryStorage();
    const clock = { time: 10 * ABSORB_AFTER_MS };
    local.setItem(`${TAB_RECORD_PREFIX}gone`, JSON.stringify({ share: { newer: 1 }, intent: { newer: [true, 5] }, left: 0 }));
    const b = tab({ server, local, name: 'b', clock, alive: async (id) => id !== 'gone' });
    await flush();
    assert.deepEqual(tabRecords(local).map(([id, record]) => [id, Object.fromEntries(record.share)]), [['b-id-1', { newer: 1 }]],
      'kept, though this view does not have the task (it is behind)');
    b.core.applyEvent({
      id: server.nextId(),
      type: EVENT_SETTLED,
      data: { command_id: 'cmd-del', idempotency_key: 'del', task_id: 'newer', kind: 'delete', version: 3, window_ms: 700 },
    });
    assert.deepEqual(Object.fromEntries(tabRecords(local)[0][1].share), {});
  });

  test('a click writes its op and its intent at once: the tab holding the intent before does not undo it', () => {
    const server = fakeServer();
    const tabs = {};
    // Every write reaches the other tab at once, as a storage event would, in between too.
    const local = memoryStorage();
    const setItem = local.setItem;
    local.setItem = (key, value) => {
      setItem(key, value);
      for (const other of Object.values(tabs)) if (key !== `${TAB_RECORD_PREFIX}${other.likes.tabId}`) other.likes.storageChanged(key);
    };
    tabs.a = tab({ server, local, name: 'a' });
    tabs.b = tab({ server, local, name: 'b' });
    tabs.a.settle(tabs.a.click());
    tabs.b.likes.storageChanged(`${TAB_RECORD_PREFIX}${tabs.a.likes.tabId}`);
    const unlike = tabs.b.click();
    assert.equal(unlike.delta, -1);
    assert.deepEqual(tabs.a.sent.map((op) => op.delta), [1], 'a sent nothing after its own like');
  });

  test('a deleted task leaves no share or clicks in the record', () => {
    const server = fakeServer();
    const local = memoryStorage();
    const a = tab({ server, local });
    a.settle(a.click());
    assert.equal(JSON.parse(a.session.getItem(CLICKS_KEY)).length, 1);
    assert.equal(browserShares(local).get('t'), 1);
    a.core.applyEvent({
      id: server.nextId(),
      type: EVENT_SETTLED,
      data: { command_id: 'cmd-del', idempotency_key: 'del', task_id: 't', kind: 'delete', version: 3, window_ms: 700 },
    });
    const [[, record]] = tabRecords(local);
    assert.deepEqual([...record.share], []);
    assert.deepEqual([...record.intent], []);
    assert.deepEqual(JSON.parse(a.session.getItem(CLICKS_KEY)), []);
  });
});

function seeded(seed) {
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  next.below = (n) => Math.floor(next() * n);
  return next;
}

/**
 * Two tabs of one browser against a server that applies each task's commands in order and
 * fails some; the user clicks in either tab and discards pending ops now and then; each
 * tab hears the other's storage writes late and out of order. Then the faults stop and
 * everything is delivered. Returns the server's count and the browser's share.
 */
function simulate(seed, { steps, failRate, discardRate, spread }) {
  const random = seeded(seed);
  const queue = [];
  const storageEvents = [];
  const tabs = [];
  const shared = memoryStorage();
  let likes = 0;
  let version = 1;
  let eventId = 10;
  const snapshotTask = () => ({ id: 't', title: 't', notes: '', done: false, likes, version, updated_at: 'x' });
  const clock = { time: 1000 };
  for (const name of ['a', 'b']) {
    const core = createCore({ now: () => clock.time, stuckMs: 5000, syncMs: 800 });
    core.loadSnapshot({ tasks: [snapshotTask()], watermark: eventId });
    const tab = { name, core };
    let count = 0;
    const sync = {
      like(taskId, delta) {
        const op = core.issue({ kind: 'like', key: `${name}-${(count += 1)}`, task_id: taskId, delta });
        core.accepted(op.key, { command_id: `cmd-${op.key}` });
        queue.push(op);
        return op;
      },
    };
    // This tab's writes reach the other tab as storage events, later.
    const local = {
      get length() { return shared.length; },
      key: (index) => shared.key(index),
      getItem: (key) => shared.getItem(key),
      removeItem: (key) => shared.removeItem(key),
      setItem(key, value) {
        shared.setItem(key, value);
        for (const other of tabs) if (other !== tab) storageEvents.push({ to: other, key });
      },
    };
    tab.likes = createLikes({
      core, sync, local, session: memoryStorage(), now: () => (clock.time += 1), newId: () => `tab-${name}`, later: () => {},
    });
    tabs.push(tab);
  }
  function applyNext(rate) {
    const op = queue.shift();
    const failed = random() < rate;
    if (!failed) {
      likes += op.delta;
      version += 1;
    }
    eventId += 1;
    const data = failed
      ? { reason: 'injected', message: 'injected', current: snapshotTask() }
      : { task: snapshotTask(), version, window_ms: 700 };
    for (const tab of tabs) {
      tab.core.applyEvent({
        id: eventId,
        type: failed ? EVENT_FAILED : EVENT_SETTLED,
        data: { command_id: `cmd-${op.key}`, idempotency_key: op.key, task_id: 't', kind: 'like', ...data },
      });
    }
  }
  const deliverStorageEvent = (index) => {
    const { to, key } = storageEvents.splice(index, 1)[0];
    to.likes.storageChanged(key);
  };
  for (let step = 0; step < steps; step += 1) {
    const tab = tabs[random.below(2)];
    const roll = random();
    if (roll < 0.3) tab.likes.toggle('t');
    else if (roll < 0.6) {
      if (queue.length) applyNext(failRate);
    } else if (roll < 0.6 + discardRate) {
      const ops = tab.core.pendingOps();
      if (ops.length) tab.core.discard(ops[random.below(ops.length)].key);
    } else if (storageEvents.length) {
      deliverStorageEvent(random.below(Math.min(spread, storageEvents.length)));
    }
  }
  for (let guard = 0; guard < 100_000 && (queue.length || storageEvents.length); guard += 1) {
    if (storageEvents.length) deliverStorageEvent(0);
    else applyNext(0);
  }
  const pending = (tab) => tab.core.pendingOps().reduce((net, op) => net + op.delta, 0);
  return {
    drained: !queue.length && !storageEvents.length,
    likes,
    share: browserShares(shared).get('t') ?? 0,
    shown: tabs.map((tab) => tab.likes.isLiked('t', pending(tab))),
  };
}

describe('createLikes: a property over random runs of two tabs', () => {
  const cases = [
    { steps: 200, failRate: 0.3, discardRate: 0.05, spread: 3 },
    { steps: 400, failRate: 0.6, discardRate: 0.02, spread: 10 },
    { steps: 300, failRate: 0.3, discardRate: 0.3, spread: 20 },
  ];
  for (const params of cases) {
    test(`the share ends in 0..1, equal to the server's count and shown alike in both tabs (${JSON.stringify(params)})`, () => {
      for (let seed = 1; seed <= 100; seed += 1) {
        const { drained, likes, share, shown } = simulate(seed, params);
        assert.equal(drained, true, `seed ${seed}`);
        assert.equal(share, likes, `seed ${seed}: the share is the server's count`);
        assert.ok(share === 0 || share === 1, `seed ${seed}: share ${share}`);
        assert.deepEqual(shown, [share === 1, share === 1], `seed ${seed}: both toggles show it`);
      }
    });
  }
});
