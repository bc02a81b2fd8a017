// A failed optimistic write rolls back to the pre-mutation state: no orphaned prediction,
// a notice that says what failed and why, a failed delete back in its place.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import {
  startServer, launchBrowser, openApp, eventually, createViaUi, renameViaUi, shown, listedTitles, taskItem,
  deleting,
} from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/** Every like delta the page sends, in order. */
/**
 * The like commands `page` sends, one delta per Idempotency-Key in the order first sent:
 * a key sent again (its 202 lost to a reload, say) is one command, which the server
 * applies at most once; a second intent is a second key.
 */
function likeDeltas(page) {
  const byKey = new Map();
  page.on('request', (request) => {
    if (request.method() !== 'POST' || !request.url().endsWith('/likes')) return;
    const key = request.headers()['idempotency-key'];
    if (!byKey.has(key)) byKey.set(key, request.postDataJSON().delta);
  });
  return { get values() { return [...byKey.values()]; } };
}

test('a failed create shows at once, then disappears with a notice and leaves no row', async () => {
  const server = await startServer(['--failure-rate', '1', '--delay-ms', '400']);
  try {
    const { page, pageErrors, consoleErrors } = await openApp(browser, server.url);
    const id = await createViaUi(page, 'doomed task');
    assert.equal((await shown(page, id)).pending, true, 'predicted at once, marked pending');

    await eventually(async () => assert.equal(await shown(page, id), null, 'the prediction is gone'));
    const notice = page.getByTestId('notice').filter({ hasText: 'Create “doomed task” failed' });
    await notice.waitFor();
    assert.match(await notice.textContent(), /injected/);
    assert.doesNotMatch(await notice.textContent(), /×/, 'the text is the message alone');
    assert.equal(await page.locator('[data-testid="task"]').count(), 0, 'no orphaned row');
    assert.equal((await server.api.tasks()).tasks.length, 0);
    assert.deepEqual(pageErrors, []);
    assert.deepEqual(consoleErrors, [], 'nothing is fetched for a row that never was');
  } finally {
    await server.stop();
  }
});

test('a burst of failures leaves every notice on screen until dismissed', async () => {
  const server = await startServer(['--failure-rate', '1', '--delay-ms', '300']);
  try {
    const { page, pageErrors } = await openApp(browser, server.url);
    const titles = Array.from({ length: 10 }, (_, n) => `failing ${n}`);
    for (const title of titles) await createViaUi(page, title);
    const notices = page.getByTestId('notice');
    await eventually(async () => assert.equal(await notices.count(), titles.length));
    // Later failures do not push earlier ones out: each stays to be read.
    await new Promise((resolve) => setTimeout(resolve, 1_000));
    const texts = await notices.allTextContents();
    assert.deepEqual(texts.map((text) => /“(.*)”/.exec(text)?.[1]).sort(), [...titles].sort());
    await page.getByTestId('notice').first().getByRole('button', { name: 'Dismiss notice' }).click();
    assert.equal(await notices.count(), titles.length - 1);
    await page.getByTestId('dismiss-notices').click();
    assert.equal(await notices.count(), 0);
    assert.equal(await page.getByTestId('dismiss-notices').isVisible(), false);
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a failed rename, like and delete snap back to the confirmed state, the delete in its place', async () => {
  const server = await startServer(['--delay-ms', '400']);
  try {
    const first = await server.api.createSettled('first');
    const middle = await server.api.createSettled('middle');
    await server.api.createSettled('last');
    const { page, pageErrors } = await openApp(browser, server.url);
    await eventually(async () => assert.deepEqual(await listedTitles(page), ['first', 'middle', 'last']));
    await server.api.setFaults({ failure_rate: 1 });

    await renameViaUi(page, middle.id, 'renamed');
    await taskItem(page, middle.id).getByTestId('like').click();
    assert.deepEqual(
      { ...(await shown(page, middle.id)), state: undefined },
      { title: 'renamed', likes: 1, done: false, pending: true, state: undefined },
      'both predictions show at once',
    );
    await eventually(async () => assert.deepEqual(
      await shown(page, middle.id),
      { title: 'middle', likes: 0, done: false, pending: false, state: 'settled' },
    ));
    assert.equal(await taskItem(page, middle.id).getByTestId('like').getAttribute('aria-pressed'), 'false',
      'the like toggle rolled back with the count');
    await eventually(async () => assert.equal(await page.getByTestId('notice').count(), 2));

    await taskItem(page, first.id).getByTestId('done').click();
    await taskItem(page, middle.id).getByTestId('delete').click();
    assert.deepEqual(await deleting(page, middle.id), { deleting: true, marker: 'deleting…', pending: true, disabled: true },
      'the delete shows at once, pending like any change, not as if it were done');
    assert.deepEqual(await listedTitles(page), ['first', 'middle', 'last']);
    assert.equal((await shown(page, first.id)).done, true);
    await eventually(async () => {
      assert.deepEqual(await deleting(page, middle.id), { deleting: false, marker: '', pending: false, disabled: false }, 'back as it was');
      assert.deepEqual(await listedTitles(page), ['first', 'middle', 'last'], 'in its place');
      assert.equal((await shown(page, first.id)).done, false);
      assert.equal(await page.locator('[data-testid="task"][data-pending="true"]').count(), 0);
    });
    await page.getByTestId('notice').filter({ hasText: 'Delete “middle” failed' }).waitFor();

    const serverState = await server.api.tasks();
    assert.deepEqual(serverState.tasks.map((task) => [task.title, task.likes, task.done]),
      [['first', 0, false], ['middle', 0, false], ['last', 0, false]]);
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a like that fails under a pending unlike is compensated: the count does not drift', async () => {
  const server = await startServer(['--delay-ms', '3000']);
  try {
    const task = await server.api.createSettled('liked once');
    const { page, pageErrors } = await openApp(browser, server.url);
    const likes = likeDeltas(page);
    const like = taskItem(page, task.id).getByTestId('like');
    await server.api.setFaults({ failure_rate: 1 });
    await like.click();
    assert.equal(await like.getAttribute('aria-pressed'), 'true');
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await like.click();
    assert.deepEqual([await like.getAttribute('aria-pressed'), (await shown(page, task.id)).likes], ['false', 0]);

    // The like fails (its event comes about 3 s after it); the unlike, 1.5 s later, applies.
    await page.getByTestId('notice').filter({ hasText: /^Like “liked once” failed/ }).waitFor({ timeout: 10_000 });
    await server.api.setFaults({ failure_rate: 0 });

    await eventually(async () => {
      assert.deepEqual(await shown(page, task.id), { title: 'liked once', likes: 0, done: false, pending: false, state: 'settled' });
      assert.equal((await server.api.task(task.id)).likes, 0, 'the unlike of a like that never was is taken back');
    }, { timeout: 15_000 });
    assert.deepEqual(likes.values, [1, -1, 1]);
    assert.equal(await like.getAttribute('aria-pressed'), 'false');
    await like.click();
    await eventually(async () => assert.equal((await server.api.task(task.id)).likes, 1), { timeout: 10_000 });
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('like, unlike, like with the first like failed: the last click stands, one like', async () => {
  const server = await startServer(['--delay-ms', '3000']);
  try {
    const task = await server.api.createSettled('three clicks');
    const { page, pageErrors } = await openApp(browser, server.url);
    const deltas = likeDeltas(page);
    const like = taskItem(page, task.id).getByTestId('like');
    await server.api.setFaults({ failure_rate: 1 });
    await like.click();
    await new Promise((resolve) => setTimeout(resolve, 1500));
    await like.click();
    await like.click();
    assert.deepEqual([await like.getAttribute('aria-pressed'), (await shown(page, task.id)).likes], ['true', 1]);

    // The first like fails (its event comes about 3 s after it); the unlike and the like
    // after it, 1.5 s later, apply. The user's last click was Like: the page makes up for
    // the failed one, it does not leave the task unliked.
    await page.getByTestId('notice').filter({ hasText: /^Like “three clicks” failed/ }).waitFor({ timeout: 10_000 });
    await server.api.setFaults({ failure_rate: 0 });
    await eventually(async () => {
      assert.deepEqual(await shown(page, task.id), { title: 'three clicks', likes: 1, done: false, pending: false, state: 'settled' });
      assert.equal((await server.api.task(task.id)).likes, 1);
    }, { timeout: 15_000 });
    assert.deepEqual(deltas.values, [1, -1, 1, 1]);
    assert.equal(await like.getAttribute('aria-pressed'), 'true');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

// Across a reload too, with the two later likes pending: the page keeps the discarded like
// as well as the pending ones (restoring the pending ones once overwrote the discarded).
for (const reload of [false, true]) {
  const across = reload ? ', across a reload with likes pending' : '';
  test(`a discarded like that the server applies after all is taken back when the last click was Unlike${across}`, async () => {
    const server = await startServer(['--delay-ms', '200', '--redeliver-after-ms', '5000']);
    try {
      const task = await server.api.createSettled('lost like');
      const { page, pageErrors } = await openApp(browser, server.url, '?stuck_ms=800');
      const deltas = likeDeltas(page);
      const item = taskItem(page, task.id);
      const like = item.getByTestId('like');
      await server.api.setFaults({ drop_rate: 1 });
      await like.click();
      await item.getByRole('button', { name: 'Discard' }).click();
      await server.api.setFaults({ drop_rate: 0 });
      assert.equal(await like.getAttribute('aria-pressed'), 'false');

      // Like and unlike again. A task's commands apply in order, so both wait behind the
      // dropped like until it is delivered again; then all three apply.
      await like.click();
      await like.click();
      assert.deepEqual([await like.getAttribute('aria-pressed'), (await shown(page, task.id)).likes], ['false', 0]);
      if (reload) await page.reload();
      await page.getByTestId('notice').filter({ hasText: 'was applied after all' }).waitFor({ timeout: 15_000 });
      await eventually(async () => {
        assert.equal((await server.api.task(task.id)).likes, 0, 'the like applied after all is taken back');
        assert.deepEqual(await shown(page, task.id), { title: 'lost like', likes: 0, done: false, pending: false, state: 'settled' });
      }, { timeout: 10_000 });
      assert.deepEqual(deltas.values, [1, 1, -1, -1]);
      assert.equal(await like.getAttribute('aria-pressed'), 'false');
      assert.deepEqual(pageErrors, []);
    } finally {
      await server.stop();
    }
  });
}

test('a like discarded before its 202 and applied while the page was away is learned on return, by its key', async () => {
  const server = await startServer(['--delay-ms', '1500']);
  try {
    const task = await server.api.createSettled('answer lost');
    const { page, pageErrors } = await openApp(browser, server.url, '?stuck_ms=400');
    const deltas = likeDeltas(page);
    // The server gets the like and answers 202; the page never sees the answer.
    let accepted = null;
    await page.route('**/likes', async (route) => {
      accepted = await route.fetch();
    });
    const item = taskItem(page, task.id);
    await item.getByTestId('like').click();
    await item.getByRole('button', { name: 'Discard' }).click();
    assert.equal(await item.getByTestId('like').getAttribute('aria-pressed'), 'false');
    assert.equal(accepted?.status(), 202, 'the server took the like');

    // Away (same tab, same session) while the like applies, so its event is not seen.
    // Leaving cancels the held request; only then may later likes through.
    await page.goto('about:blank');
    await page.unrouteAll({ behavior: 'ignoreErrors' });
    await eventually(async () => assert.equal((await server.api.task(task.id)).likes, 1));
    await page.goto(`${server.url}/?stuck_ms=400`);

    await page.getByTestId('notice').filter({ hasText: 'was applied after all' }).waitFor({ timeout: 15_000 });
    await eventually(async () => {
      assert.equal((await server.api.task(task.id)).likes, 0, 'the like the user gave up on is taken back');
      assert.deepEqual(await shown(page, task.id), { title: 'answer lost', likes: 0, done: false, pending: false, state: 'settled' });
    });
    assert.deepEqual(deltas.values, [1, -1]);
    assert.equal(await taskItem(page, task.id).getByTestId('like').getAttribute('aria-pressed'), 'false');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});
