// Unit tests of the chart's pure helpers.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import { percentile, rollingPercentiles, linePath, niceCeiling } from '../../static/stats.js';

test('nearest-rank percentiles', () => {
  assert.equal(percentile([], 50), null);
  assert.equal(percentile([700], 99), 700);
  const hundred = Array.from({ length: 100 }, (_, index) => index + 1);
  assert.equal(percentile(hundred, 50), 50);
  assert.equal(percentile(hundred, 99), 99);
  assert.equal(percentile([5, 1, 3], 50), 3, 'order of input does not matter');
});

test('rolling percentiles only see the trailing span', () => {
  const samples = [{ at: 0, ms: 100 }, { at: 10, ms: 900 }, { at: 40_000, ms: 200 }];
  const points = rollingPercentiles(samples, 30_000);
  assert.deepEqual(points.map((point) => [point.p50, point.p99]), [[100, 100], [100, 900], [200, 200]]);
});

test('line paths map time to x and milliseconds to y, clamped at the top', () => {
  const box = { from: 0, to: 100, maxMs: 1000, width: 200, height: 100 };
  const d = linePath([{ at: 0, v: 0 }, { at: 50, v: 500 }, { at: 100, v: 5000 }], (point) => point.v, box);
  assert.equal(d, 'M0.0,100.0 L100.0,50.0 L200.0,0.0');
  assert.equal(linePath([], (point) => point.v, box), '');
  assert.equal(linePath([{ at: 50, v: 500 }], (point) => point.v, box), 'M100.0,50.0 h0', 'one point: a dot');
});

test('the y axis rounds up to 1, 2 or 5 times a power of ten', () => {
  assert.equal(niceCeiling(0), 1000);
  assert.equal(niceCeiling(1200), 2000);
  assert.equal(niceCeiling(4100), 5000);
  assert.equal(niceCeiling(5001), 10_000);
});
