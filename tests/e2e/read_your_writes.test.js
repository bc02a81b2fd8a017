// Read-your-own-writes: the user's change stays visible for the whole consistency window,
// also across a snapshot refresh and a page reload in the middle of it, and the refresh
// reconciles to it: the old value never shows again.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import {
  startServer, launchBrowser, openApp, eventually, renameViaUi, shown, taskItem, waitSettled, waitForLive,
} from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/**
 * Runs in the page before its scripts, after every navigation: records each title and
 * likes value the item of `taskId` ever displays, in order.
 */
function recordDisplayed(taskId) {
  window.displayed = [];
  const record = () => {
    const li = document.querySelector(`[data-testid="task"][data-id="${taskId}"]`);
    if (!li) return;
    const entry = `${li.querySelector('[data-testid="title"]').textContent}|${li.querySelector('[data-testid="likes"]').textContent}`;
    if (window.displayed[window.displayed.length - 1] !== entry) window.displayed.push(entry);
  };
  new MutationObserver(record).observe(document, { subtree: true, childList: true, characterData: true });
}

const displayed = (page) => page.evaluate(() => window.displayed);

/** The app in a fresh context, recording what the item of `taskId` displays. */
async function openRecording(url, taskId) {
  const opened = await openApp(browser, url);
  await opened.context.addInitScript(recordDisplayed, taskId);
  await opened.page.reload();
  await waitForLive(opened.page);
  return opened;
}

test('a rename and a like stay visible through the window, a snapshot refresh and a reload', async () => {
  // A long window so that the refresh and the reload both land inside it.
  const server = await startServer(['--delay-ms', '4000']);
  try {
    const task = await server.api.createSettled('before');
    const { page, pageErrors } = await openRecording(server.url, task.id);
    await eventually(async () => assert.deepEqual(await displayed(page), ['before|0']));

    await renameViaUi(page, task.id, 'after');
    await taskItem(page, task.id).getByTestId('like').click();
    assert.deepEqual(await shown(page, task.id), { title: 'after', likes: 1, done: false, pending: true, state: 'pending' });

    // A snapshot refresh mid-window (what a stream reconnect does): the change stays.
    await page.evaluate(() => window.settle.sync.resync());
    assert.deepEqual(await shown(page, task.id), { title: 'after', likes: 1, done: false, pending: true, state: 'pending' });
    assert.equal((await server.api.task(task.id)).title, 'before', 'the server has not applied it yet');

    // A reload mid-window: the pending ops come back from sessionStorage, keys and all.
    await page.reload();
    await waitForLive(page);
    assert.equal((await server.api.task(task.id)).title, 'before', 'still inside the window after the reload');
    await eventually(async () => assert.equal((await shown(page, task.id))?.title, 'after'));
    assert.equal((await shown(page, task.id)).pending, true);

    await waitSettled(page, task.id);
    assert.deepEqual(await shown(page, task.id), { title: 'after', likes: 1, done: false, pending: false, state: 'settled' });
    assert.deepEqual(await displayed(page), ['after|1'], 'after the reload: only the change, never the old value');
    const onServer = await server.api.task(task.id);
    assert.deepEqual([onServer.title, onServer.likes], ['after', 1], 'applied once, not re-sent twice');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('rapid like, unlike, like compose and settle to one like, never flickering back', async () => {
  const server = await startServer(['--delay-ms', '1000']);
  try {
    const task = await server.api.createSettled('counter');
    const { page } = await openRecording(server.url, task.id);
    const like = taskItem(page, task.id).getByTestId('like');
    await like.click();
    await like.click();
    await like.click();
    assert.equal((await shown(page, task.id)).likes, 1);
    await waitSettled(page, task.id);
    assert.equal((await shown(page, task.id)).likes, 1);
    assert.equal((await server.api.task(task.id)).likes, 1);
    assert.deepEqual(await displayed(page), ['counter|0', 'counter|1', 'counter|0', 'counter|1'],
      'each click shows at once; settling changes nothing on screen');
  } finally {
    await server.stop();
  }
});

test('a rename made just before the server is killed stays visible through the stream reconnect and settles from it', async () => {
  const server = await startServer(['--delay-ms', '3000']);
  try {
    const task = await server.api.createSettled('before');
    const { page, pageErrors } = await openRecording(server.url, task.id);
    const streamRequests = [];
    page.on('request', (request) => {
      if (new URL(request.url()).pathname === '/api/events') streamRequests.push(request.url());
    });

    await renameViaUi(page, task.id, 'after');
    // The 202 is in: the command is durable, whatever happens to the process now.
    await eventually(async () => assert.ok(
      await page.evaluate(() => window.settle.core.pendingOps().length === 1
        && window.settle.core.pendingOps().every((op) => op.command_id)),
    ));
    await server.crashAndRestart();
    assert.equal((await shown(page, task.id)).title, 'after', 'the change stays while the stream is down');

    // EventSource reconnects by itself, resuming after the last event it had; the
    // resumed command settles and its event closes the window.
    await waitSettled(page, task.id);
    assert.ok(streamRequests.length >= 1, 'the stream was opened again');
    assert.equal(await page.evaluate(() => window.settle.core.getSnapshot().window_samples.length), 1,
      'settled by its event on the resumed stream, not by the status check of the timeout path');
    assert.deepEqual(await shown(page, task.id), { title: 'after', likes: 0, done: false, pending: false, state: 'settled' });
    assert.deepEqual(await displayed(page), ['before|0', 'after|0'], 'never back to the old title');
    assert.equal((await server.api.task(task.id)).title, 'after');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});
