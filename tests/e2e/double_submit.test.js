// Keyed retries: one user intent = one idempotency key. A double Enter, a double click or
// a network-level retry produce exactly one row on the server.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import {
  startServer, launchBrowser, openApp, eventually, recordCommands, taskByTitle, taskItem, shown, waitSettled,
} from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

async function titlesOnServer(server) {
  return (await server.api.tasks()).tasks.map((task) => task.title);
}

test('double Enter and double click on one draft create exactly one row each', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const { page } = await openApp(browser, server.url);
    const commands = recordCommands(page);
    const input = page.getByTestId('new-title');

    await input.fill('entered twice');
    await input.press('Enter');
    await input.press('Enter');
    await input.fill('clicked twice');
    await page.getByTestId('add').dblclick();

    await eventually(async () => assert.deepEqual(await titlesOnServer(server), ['entered twice', 'clicked twice']));
    for (const title of ['entered twice', 'clicked twice']) {
      assert.equal(await taskByTitle(page, title).count(), 1, `one item for “${title}”`);
      await waitSettled(page, await taskByTitle(page, title).getAttribute('data-id'));
    }
    const creates = commands.filter((command) => command.method === 'POST');
    assert.equal(new Set(creates.map((command) => command.key)).size, 2, 'one key per intent');
  } finally {
    await server.stop();
  }
});

test('a create whose 202 is lost on the network is retried with the same key: one row', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const { page } = await openApp(browser, server.url);
    const commands = recordCommands(page);
    let lostAnswers = 0;
    // The first POST reaches the server, which accepts it; its answer is then lost.
    await page.route('**/api/tasks', async (route) => {
      if (route.request().method() === 'POST' && lostAnswers === 0) {
        lostAnswers += 1;
        await route.fetch();
        await route.abort('connectionreset');
        return;
      }
      await route.continue();
    });

    await page.getByTestId('new-title').fill('answer lost');
    await page.getByTestId('new-title').press('Enter');
    const item = taskByTitle(page, 'answer lost');
    await waitSettled(page, await item.getAttribute('data-id'));

    // The settle event can arrive before the retry, whose backoff (250 ms) is close to
    // the delay: wait for the retry rather than race it.
    const creates = () => commands.filter((command) => command.method === 'POST');
    await eventually(async () => assert.ok(creates().length >= 2, 'the transport retried'));
    assert.equal(new Set(creates().map((command) => command.key)).size, 1, 'every attempt carries the same key');
    assert.deepEqual(await titlesOnServer(server), ['answer lost'], 'the server applied it once');
    assert.equal(await item.count(), 1);
  } finally {
    await server.stop();
  }
});

test('a double click on Like, Done or Delete is one intent: nothing undone, no neighbour hit', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const tasks = [];
    for (const title of ['first', 'second', 'third']) tasks.push(await server.api.createSettled(title));
    const { page, pageErrors } = await openApp(browser, server.url);
    const commands = recordCommands(page);
    for (const task of tasks) await taskItem(page, task.id).waitFor();

    await taskItem(page, tasks[0].id).getByTestId('like').dblclick();
    await taskItem(page, tasks[0].id).getByTestId('done').dblclick();
    // The second click finds the row being deleted, its Delete disabled.
    await taskItem(page, tasks[1].id).getByTestId('delete').dblclick();

    await eventually(async () => {
      const { tasks: left } = await server.api.tasks();
      assert.deepEqual(left.map((task) => [task.title, task.likes, task.done]), [
        ['first', 1, true],
        ['third', 0, false],
      ]);
    });
    await waitSettled(page, tasks[0].id);
    assert.deepEqual(await shown(page, tasks[0].id), {
      title: 'first', likes: 1, done: true, pending: false, state: 'settled',
    });
    assert.deepEqual(
      commands.map((command) => `${command.method} ${command.path}`),
      [
        `POST /api/tasks/${tasks[0].id}/likes`,
        `PATCH /api/tasks/${tasks[0].id}`,
        `DELETE /api/tasks/${tasks[1].id}`,
      ],
      'one command per double click',
    );
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});
