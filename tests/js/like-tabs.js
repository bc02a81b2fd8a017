// What the likes tests share: storage in memory, a fake server, and a tab (a real core,
// a sync engine that only records, and the toggle under test, createLikes).

import { createCore } from '../../static/core.js';
import { EVENT_SETTLED, EVENT_FAILED } from '../../static/ops.js';
import { createLikes } from '../../static/likes.js';
import { ADOPT_AFTER_MS } from '../../static/like-records.js';

/** localStorage or sessionStorage in memory. */
export function memoryStorage() {
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
export function fakeServer() {
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
export function tab({
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
    /** Move the clock past the wait before orphans are taken over, run the timers set so far, let them finish. */
    async lookAfterAdoptWait() {
      clock.time += ADOPT_AFTER_MS;
      this.runTimers();
      await flush();
    },
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
export function oneTab() {
  const server = fakeServer();
  return { server, a: tab({ server, local: memoryStorage() }) };
}

/** Let pending promises (the toggle's lock and storage work) run. */
export const flush = () => new Promise((resolve) => setImmediate(resolve));

/** A server, shared storage and a clock, and tab `a` on them with a like of `t` pending. */
export function aWithLikePending() {
  const server = fakeServer();
  const local = memoryStorage();
  const clock = { time: 1000 };
  const a = tab({ server, local, name: 'a', clock });
  return { server, local, clock, a, like: a.click() };
}

/** `aWithLikePending`, and a tab `b` beside it that sees every other tab as gone. */
export function likePendingInA(optionsOfB = {}) {
  const { server, local, clock, a, like } = aWithLikePending();
  const b = tab({ server, local, name: 'b', clock, alive: async () => false, ...optionsOfB });
  return { server, local, clock, a, like, b };
}

/**
 * A tab `a` that liked `t`, saw it settle, and was closed; `openTab` opens another that
 * sees it closed.
 */
export function likedAndClosed() {
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
