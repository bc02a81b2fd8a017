// Unit tests of likes as a toggle per browser (static/likes.js): one tab, two tabs of one
// browser, and a property over random runs of two tabs. Closed and crashed tabs are in
// like-handover.test.js.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import { createCore } from '../../static/core.js';
import { EVENT_SETTLED, EVENT_FAILED } from '../../static/ops.js';
import { createLikes, MAX_COMPENSATIONS_PER_CLICK, MAX_FAILED_COMPENSATIONS } from '../../static/likes.js';
import {
  readTabRecord, browserShares, TAB_RECORD_PREFIX, LEGACY_LEDGER_PREFIX, CLICKS_KEY, ORPHANS_PREFIX, ADOPT_AFTER_MS, TAB_ID_KEY,
} from '../../static/like-records.js';
import {
  memoryStorage, fakeServer, tab, oneTab, flush, aWithLikePending, likePendingInA,
} from './like-tabs.js';

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

  test('compensations that all fail pause after a few in a row, and stop at the bound of a click', () => {
    const { a } = oneTab();
    const like = a.click();
    const unlike = a.click(); // pending
    a.fail(like);
    const failAll = () => {
      for (let guard = 0; guard < 50; guard += 1) {
        const next = a.core.pendingOps().find((op) => op.key !== unlike.key);
        if (!next) break;
        a.fail(next);
      }
    };
    failAll();
    assert.equal(a.sent.length, 2 + MAX_FAILED_COMPENSATIONS);
    // Each pause over, one more try, until a click's bound.
    for (let round = 0; round < 30; round += 1) {
      a.runTimers();
      failAll();
    }
    assert.equal(a.sent.length, 2 + MAX_COMPENSATIONS_PER_CLICK);
    a.runTimers();
    assert.equal(a.sent.length, 2 + MAX_COMPENSATIONS_PER_CLICK, 'nothing more, however long');
  });

  test('compensations paused after failing in a row go on once the pause is over, and set the share right', () => {
    const { server, a } = oneTab();
    const like = a.click();
    const unlike = a.click();
    a.fail(like);
    a.settle(unlike); // the share is -1; the last click was Unlike: one like is owed
    for (let failures = 0; failures < MAX_FAILED_COMPENSATIONS; failures += 1) a.fail(a.core.pendingOps()[0]);
    assert.equal(a.core.pendingOps().length, 0, 'paused');
    a.runTimers(); // the pause is over
    assert.deepEqual(a.core.pendingOps().map((op) => op.delta), [1]);
    a.settleAll();
    assert.equal(server.task('t').likes, 0);
    assert.equal(a.liked(), false);
  });

  test('a pause that ends while the page is away (the back/forward cache) ends when it is back', async () => {
    const server = fakeServer();
    const clock = { time: 1000 };
    const a = tab({ server, local: memoryStorage(), clock });
    const like = a.click();
    const unlike = a.click();
    a.fail(like);
    a.settle(unlike); // one like is owed
    for (let failures = 0; failures < MAX_FAILED_COMPENSATIONS; failures += 1) a.fail(a.core.pendingOps()[0]);
    a.likes.leave();
    clock.time += 60_000;
    a.runTimers(); // the pause ends while the page is away: nothing is sent from there
    assert.equal(a.core.pendingOps().length, 0);
    a.likes.resume();
    await flush();
    assert.deepEqual(a.core.pendingOps().map((op) => op.delta), [1], 'back: the owed like goes');
    a.settleAll();
    assert.equal(server.task('t').likes, 0);
    assert.equal(a.liked(), false);
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
    await b.lookAfterAdoptWait();
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

  test('a like left pending by a reload that settles before the page knows its id is counted once', async () => {
    const server = fakeServer();
    const local = memoryStorage();
    const a = tab({ server, local, name: 'a' });
    const like = a.click();
    a.likes.leave(); // the reload: the op is left in the orphans, and in the core's persisted ops
    a.likes.stop();
    const reloaded = tab({
      server, local, session: a.session, name: 'a', restored: a.core.persistedOps(), identityPending: true, done: new Set([like.key]),
    });
    reloaded.settle(reloaded.core.getOp(like.key)); // its event comes before the tab's lock
    await reloaded.likes.confirmTab();
    assert.equal(browserShares(local).get('t'), 1, 'counted once: not taken for a stranger left by another page');
    assert.deepEqual(reloaded.sent, [], 'and nothing sent to make up for a count of 2');
    assert.equal(reloaded.liked(), true);
  });

  test('a tab reloaded with a like pending takes it back; no other tab takes it over', async () => {
    const { server, local, clock, a, like, b } = likePendingInA();
    a.likes.leave();
    a.likes.stop();
    b.likes.storageChanged(`${ORPHANS_PREFIX}${a.likes.tabId}`);
    const reloaded = tab({ server, local, session: a.session, name: 'a', clock, restored: a.core.persistedOps() });
    await b.lookAfterAdoptWait();
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
