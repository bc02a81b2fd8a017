// Unit tests of what the like toggle keeps in storage, read back (static/like-records.js).

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  readContributions, sumShares, readTabRecord, browserShares, TAB_RECORD_PREFIX, LEGACY_LEDGER_PREFIX, LEGACY_LIKED_KEY,
} from '../../static/like-records.js';
import { memoryStorage } from './like-tabs.js';

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
