// The soak's judgements (tests/soak/checks.js) on small recorded histories: each finds the
// problem it is for, and stays quiet where the client did right.

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import {
  checkRebases, checkConflictViews, checkDuplicates, checkRows, checkShares, checkNoticeTitles, checkShownRows,
  chainStart, histories, outcomes, writesOf, EVENT_SETTLED, EVENT_FAILED,
} from '../soak/checks.js';

const T = '6f1c2a7e-0000-4000-8000-000000000001';
let nextId = 0;
const task = (version, fields = {}) => ({ id: T, title: 'alpha', notes: '', done: false, likes: 0, version, ...fields });
const settled = (key, kind, version, fields) => ({
  id: (nextId += 1), type: EVENT_SETTLED,
  data: { idempotency_key: key, task_id: T, kind, version, task: kind === 'delete' ? null : task(version, fields) },
});
const refused = (key, kind, current, reason = 'conflict') => ({
  id: (nextId += 1), type: EVENT_FAILED, data: { idempotency_key: key, task_id: T, kind, reason, current },
});
const patch = (at, key, body) => ({ at, method: 'PATCH', path: `/api/tasks/${T}`, key, body });

/**
 * Tab a renames alpha to "a-r1" on version 1; a like (b's) moves the version first, so the
 * server refuses it, and a sends it again on version 2, where it settles.
 * `between`: what else settles at version 2 instead of the like.
 */
function rebasedRename(between = settled('b-like', 'like', 2, { likes: 1 })) {
  const sends = [patch(10, 'a-1', { title: 'a-r1', base_version: 1 }), patch(30, 'a-2', { title: 'a-r1', base_version: 2 })];
  const events = [
    settled('create', 'create', 1),
    between,
    refused('a-1', 'update', between.data.task),
    settled('a-2', 'update', 3, { ...between.data.task, title: 'a-r1' }),
  ];
  return { sends, events };
}

describe('versions', () => {
  test('a field\'s writes in a range of versions, with who wrote them', () => {
    const { events } = rebasedRename(settled('b-rename', 'update', 2, { title: 'b-r1' }));
    const history = histories(events).get(T);
    assert.deepEqual(history.map((entry) => entry.version), [1, 2, 3]);
    assert.deepEqual(writesOf(history, 'title', 1, 3), [
      { version: 2, key: 'b-rename', value: 'b-r1' },
      { version: 3, key: 'a-2', value: 'a-r1' },
    ]);
    assert.deepEqual(writesOf(history, 'title', 2, 3).map((write) => write.key), ['a-2']);
    assert.deepEqual(writesOf(history, 'done', 0, 3), []);
  });

  test('a chain of sends of one edit ends at a conflict view the user was shown', () => {
    const { sends, events } = rebasedRename();
    const results = outcomes(events);
    assert.equal(chainStart(sends, sends[1], results, []), sends[0]);
    const view = { at: 20, task_id: T, kind: 'update', yours: { title: 'a-r1' } };
    assert.equal(chainStart(sends, sends[1], results, [view]), sends[1], 'Keep mine is not a rebase');
  });
});

describe('rebases', () => {
  test('an edit sent again over a like is not an overwrite', () => {
    const { sends, events } = rebasedRename();
    assert.deepEqual(checkRebases('a', sends, events, []), []);
  });

  test('an edit sent again over another tab\'s change of the same field is a silent overwrite', () => {
    const { sends, events } = rebasedRename(settled('b-rename', 'update', 2, { title: 'b-r1' }));
    const problems = checkRebases('a', sends, events, []);
    assert.equal(problems.length, 1);
    assert.match(problems[0], /silent overwrite.*title = "b-r1".*version 2/);
  });

  test('nor is it one when the user chose Keep mine in a conflict view', () => {
    const { sends, events } = rebasedRename(settled('b-rename', 'update', 2, { title: 'b-r1' }));
    const views = [{ at: 20, task_id: T, kind: 'update', yours: { title: 'a-r1' }, theirs: task(2, { title: 'b-r1' }) }];
    assert.deepEqual(checkRebases('a', sends, events, views), []);
  });

  test('a new intent of the same delete, made after the last one failed, is no re-send', () => {
    // a's delete, made on 1, is refused at 2 (b's like) and re-sent on 2; that one fails
    // (injected). b renames (3); a, shown b's rename, deletes again: made on 3, it applies.
    const del = (at, key, base) => ({ at, method: 'DELETE', path: `/api/tasks/${T}`, key, body: { base_version: base } });
    const sends = [del(10, 'd1', 1), del(20, 'd2', 2), del(40, 'd3', 3)];
    const events = [
      settled('create', 'create', 1),
      settled('b-like', 'like', 2, { likes: 1 }),
      refused('d1', 'delete', task(2, { likes: 1 })),
      refused('d2', 'delete', task(2, { likes: 1 }), 'injected'),
      settled('b-rename', 'update', 3, { likes: 1, title: 'b-r1' }),
      settled('d3', 'delete', 4),
    ];
    const edits = new Map([['d1', 1], ['d2', 2], ['d3', 3]]);
    assert.deepEqual(checkRebases('a', sends, events, [], edits), []);
    assert.equal(chainStart(sends, sends[1], outcomes(events), [], edits), sends[0], 'd2 is d1 re-sent');
  });

  test('another tab\'s change of another field is not overwritten', () => {
    const { sends, events } = rebasedRename(settled('b-done', 'update', 2, { done: true }));
    assert.deepEqual(checkRebases('a', sends, events, []), []);
  });
});

describe('conflict views', () => {
  const view = (theirs, keptMoving = false) => ({ at: 20, task_id: T, kind: 'update', yours: { title: 'a-r1' }, theirs, kept_moving: keptMoving });
  // Tab a's rename refused, and a view opened instead of a rebase.
  const refusedRename = (between) => ({
    sends: [patch(10, 'a-1', { title: 'a-r1', base_version: 1 })],
    events: [settled('create', 'create', 1), between, refused('a-1', 'update', between.data.task)],
  });

  test('"someone else changed it" with another tab\'s rename behind it is the truth', () => {
    const { sends, events } = refusedRename(settled('b-rename', 'update', 2, { title: 'b-r1' }));
    assert.deepEqual(checkConflictViews('a', sends, events, [view(task(2, { title: 'b-r1' }))]), []);
  });

  test('"someone else changed it" when only a like moved the version is a lie', () => {
    const { sends, events } = refusedRename(settled('b-like', 'like', 2, { likes: 1 }));
    const problems = checkConflictViews('a', sends, events, [view(task(2, { likes: 1 }))]);
    assert.equal(problems.length, 1);
    assert.match(problems[0], /no other tab wrote them between version 1 \(the edit's\) and 2/);
  });

  test('an edit is judged from the version the user saw, not its base_version, which counts the tab\'s own ops ahead', () => {
    // a's like is pending when a renames on version 1: the rename's base_version is 2. b's
    // rename takes version 2 and a's like 3, and a's rename is refused.
    const sends = [patch(10, 'a-1', { title: 'a-r1', base_version: 2 })];
    const events = [
      settled('create', 'create', 1),
      settled('b-rename', 'update', 2, { title: 'b-r1' }),
      settled('a-like', 'like', 3, { title: 'b-r1', likes: 1 }),
      refused('a-1', 'update', task(3, { title: 'b-r1', likes: 1 })),
    ];
    const views = [view(task(3, { title: 'b-r1', likes: 1 }))];
    assert.deepEqual(checkConflictViews('a', sends, events, views, new Map([['a-1', 1]])), []);
    assert.equal(checkConflictViews('a', sends, events, views).length, 1, 'from base_version alone, b\'s rename is out of range');
  });

  test('"the task kept changing" claims no one else\'s change', () => {
    const { sends, events } = refusedRename(settled('b-like', 'like', 2, { likes: 1 }));
    assert.deepEqual(checkConflictViews('a', sends, events, [view(task(2, { likes: 1 }), true)]), []);
  });

  test('a view with no refused send behind it is a problem', () => {
    const problems = checkConflictViews('a', [], [settled('create', 'create', 1)], [view(task(1))]);
    assert.match(problems[0], /no refused send of this tab behind it/);
  });
});

test('duplicates: a key with two outcomes, an intent created twice', () => {
  const events = [settled('k1', 'create', 1), settled('k2', 'like', 2, { likes: 1 }), settled('k2', 'like', 3, { likes: 2 })];
  assert.deepEqual(checkDuplicates(events), ['key k2 has 2 outcomes in the log']);
  const twice = { ...settled('k3', 'create', 1), data: { ...settled('k3', 'create', 1).data, task_id: 'other' } };
  assert.match(checkDuplicates([settled('k1', 'create', 1), twice]).join(), /"alpha" was created 2 times/);
  assert.deepEqual(checkDuplicates([settled('k1', 'create', 1)]), []);
});

test('rows: what shows as settled is the server\'s, stuck offers Retry and Discard, nothing listed twice or missing', () => {
  const tasks = [task(3, { title: 'a-r1', likes: 1 }), { ...task(1, { title: 'beta' }), id: 'beta-id' }];
  const row = (fields) => ({ id: T, state: 'settled', title: 'a-r1', done: false, likes: 1, retry: false, discard: false, ...fields });
  assert.deepEqual(checkRows('a', { rows: [row()], ops: [{ task_id: 'beta-id', kind: 'delete' }] }, tasks), []);
  const problems = checkRows('a', {
    rows: [row({ likes: 2 }), row({ state: 'stuck' }), row({ id: 'gone', state: 'settled' }), row({ id: 'p', state: 'pending' })],
    ops: [],
  }, tasks);
  assert.deepEqual(problems.map((problem) => problem.replace(/^.*?(shows as settled with|is listed twice|is stuck|has no such|is still pending|is not listed).*$/, '$1')), [
    'shows as settled with', 'is listed twice', 'is stuck', 'has no such', 'is still pending', 'is not listed',
  ]);
});

test('likes: each browser\'s share is 0 or 1, the shares add up, and the toggles show them', () => {
  const tasks = [task(4, { likes: 1 })];
  const pressed = (liked) => [{ tab: 'A', id: T, liked }];
  assert.deepEqual(checkShares([{ shares: { [T]: 1 }, pressed: pressed(true) }, { shares: {}, pressed: [] }], tasks), []);
  assert.equal(checkShares([{ shares: { [T]: 2 }, pressed: pressed(true) }, { shares: { [T]: -1 }, pressed: [] }], tasks).length, 1, 'out of 0..1');
  assert.match(checkShares([{ shares: {}, pressed: pressed(false) }], tasks).join(), /do not add up to the server's 1/);
  assert.match(checkShares([{ shares: { [T]: 1 }, pressed: pressed(false) }], tasks).join(), /shows Like with the browser's share at 1/);
});

test('notices name a title the task had', () => {
  const events = [settled('k1', 'create', 1), settled('k2', 'update', 2, { title: 'a-r1' })];
  const notice = (title) => ({ task_id: T, text: `The rename of “${title}” failed: injected.` });
  assert.deepEqual(checkNoticeTitles('a', [notice('alpha'), notice('a-r1')], events, []), []);
  assert.match(checkNoticeTitles('a', [notice('zeta')], events, []).join(), /names "zeta", a title .* never had/);
});

describe('rows across the window', () => {
  // alpha is created (event 1, version 1); tab a renames it to "a-r1" (event 2, version 2).
  const events = () => [
    { ...settled('create', 'create', 1), id: 1 },
    { ...settled('a-1', 'update', 2, { title: 'a-r1' }), id: 2 },
  ];
  const rename = { key: 'a-1', kind: 'update', patch: { title: 'a-r1' } };
  const row = (version, watermark, fields = {}, ops = []) => ({
    load: 1, task_id: T, version, watermark, title: 'alpha', done: false, likes: 0, ops, ...fields,
  });

  test('a pending rename shows until its event, then the version that holds it', () => {
    const samples = [
      row(null, 0, {}, [{ key: 'create', kind: 'create', title: 'alpha' }]),
      row(1, 1),
      row(1, 1, { title: 'a-r1' }, [rename]),
      row(1, 1, { title: 'a-r1', likes: 1 }, [rename, { key: 'a-2', kind: 'like', delta: 1 }]),
      row(2, 2, { title: 'a-r1', likes: 1 }, [{ key: 'a-2', kind: 'like', delta: 1 }]),
      row(2, 2, { title: 'a-r1' }),
      { ...row(2, 2, { title: 'a-r1' }), load: 2 },
    ];
    assert.deepEqual(checkShownRows('a', samples, events()), []);
  });

  test('a row behind a write the tab has applied: its own rename flickers back', () => {
    const problems = checkShownRows('a', [row(1, 1, { title: 'a-r1' }, [rename]), row(1, 2)], events());
    assert.equal(problems.length, 1);
    assert.match(problems[0], /event #2 \(key a-1\) settled version 2; the tab had applied it/);
  });

  test('a pending rename that does not show', () => {
    assert.match(checkShownRows('a', [row(1, 1, {}, [rename])], events()).join(), /its fields: .* gives title "a-r1"/);
  });

  test('a confirmed row the server never had: a field, or a version', () => {
    assert.match(checkShownRows('a', [row(1, 1, { done: true })], events()).join(), /gives done false/);
    assert.match(checkShownRows('a', [row(7, 2)], events()).join(), /a version: the server never had it/);
  });

  test('a version going back, after a reload too', () => {
    const problems = checkShownRows('a', [row(2, 2, { title: 'a-r1' }), { ...row(1, 1), load: 2 }], events());
    assert.equal(problems.length, 1);
    assert.match(problems[0], /a version going back: it showed version 2 before/);
  });
});
