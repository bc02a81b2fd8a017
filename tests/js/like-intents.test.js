// Unit tests of the like toggle's arithmetic (static/like-intents.js).

import { test, describe } from 'node:test';
import assert from 'node:assert/strict';

import {
  isLiked, toggleDelta, compensation, intentOf, clickSettled, clickWithdrawn, latestIntents,
} from '../../static/like-intents.js';

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

  test('compensation goes to the intent when there is one', () => {
    // like, unlike, like; the first like failed: eventual 0, and the user asked for liked.
    assert.equal(compensation(0, 0, true), 1);
    // a discarded like applied after the user's unlike settled.
    assert.equal(compensation(1, 0, false), -1);
    assert.equal(compensation(2, 0, true), -1);
    assert.equal(compensation(1, 0, true), 0);
  });
});
