// The sync indicator: a pulsing dot in the page chrome, in the DOM only while some pending
// operation is older than 800 ms; hovering it says how many and how old.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import {
  startServer, launchBrowser, openApp, eventually, taskItem, waitSettled, waitForLive,
} from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/** In the page: timestamps of the last click and of the indicator entering / leaving the DOM. */
function recordIndicator() {
  window.indicatorLog = [];
  document.addEventListener('click', () => window.indicatorLog.push({ what: 'click', at: performance.now() }), true);
  let present = false;
  new MutationObserver(() => {
    const now = Boolean(document.querySelector('[data-testid="sync-indicator"]'));
    if (now !== present) {
      present = now;
      window.indicatorLog.push({ what: now ? 'shown' : 'removed', at: performance.now() });
    }
  }).observe(document, { subtree: true, childList: true });
}

test('the sync dot appears only after 800 ms of pending, says how many and how old, and leaves after settle', async () => {
  const server = await startServer(['--delay-ms', '2500']);
  try {
    const task = await server.api.createSettled('slow one');
    const { page, context } = await openApp(browser, server.url);
    await context.addInitScript(recordIndicator);
    await page.reload();
    await waitForLive(page);
    const indicator = page.getByTestId('sync-indicator');
    assert.equal(await indicator.count(), 0, 'absent while nothing is pending');

    const item = taskItem(page, task.id);
    await item.getByTestId('like').click();
    await item.getByTestId('like').click(); // unlike: two pending ops
    await indicator.waitFor();
    await eventually(async () => assert.match(await indicator.getAttribute('title'), /^2 changes waiting for the server, the oldest for \d+\.\d s$/));

    await indicator.hover();
    const tooltip = page.getByTestId('sync-tooltip');
    assert.ok(await tooltip.isVisible(), 'hovering shows the explanation');
    assert.match(await tooltip.textContent(), /2 changes waiting/);

    await waitSettled(page, task.id);
    await eventually(async () => assert.equal(await indicator.count(), 0, 'gone from the DOM after settle'));

    const log = await page.evaluate(() => window.indicatorLog);
    const clickAt = log.find((entry) => entry.what === 'click').at;
    const shownAt = log.find((entry) => entry.what === 'shown').at;
    assert.ok(shownAt - clickAt >= 790, `shown ${Math.round(shownAt - clickAt)} ms after the click, not before 800`);
    assert.deepEqual(log.filter((entry) => entry.what !== 'click').map((entry) => entry.what), ['shown', 'removed'],
      'one appearance, one removal: no blinking');
  } finally {
    await server.stop();
  }
});

test('a write settled within the threshold never lights the dot', async () => {
  const server = await startServer(['--delay-ms', '100']);
  try {
    const task = await server.api.createSettled('fast one');
    const { page, context } = await openApp(browser, server.url);
    await context.addInitScript(recordIndicator);
    await page.reload();
    await waitForLive(page);
    await taskItem(page, task.id).getByTestId('like').click();
    await waitSettled(page, task.id);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    const log = await page.evaluate(() => window.indicatorLog);
    assert.deepEqual(log.filter((entry) => entry.what !== 'click'), []);
  } finally {
    await server.stop();
  }
});
