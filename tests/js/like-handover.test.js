// Unit tests of what becomes of the like records of closed and crashed tabs and of deleted
// tasks (static/likes.js, static/like-handover.js).

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import { EVENT_SETTLED } from '../../static/ops.js';
import {
  browserShares, tabRecords, readOrphans, TAB_RECORD_PREFIX, CLICKS_KEY, ORPHANS_PREFIX, ADOPT_AFTER_MS, ABSORB_AFTER_MS,
} from '../../static/like-records.js';
import { memoryStorage, fakeServer, tab, flush, likePendingInA, likedAndClosed } from './like-tabs.js';

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
    await b.lookAfterAdoptWait();
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
    await b.lookAfterAdoptWait();
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
      await b.lookAfterAdoptWait();
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
    await b.lookAfterAdoptWait();
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
