// Honest pending with a timeout: when the consumer never confirms (drop rate 1), the
// pending state resolves to "still processing" with Retry and Discard, after asking the
// command's status endpoint. Retry re-sends under the same Idempotency-Key.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import {
  startServer, launchBrowser, openApp, eventually, createViaUi, shown, taskItem, recordCommands, waitSettled,
  renameViaUi, EVENTUALLY_MS,
} from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

const DROP_EVERYTHING = ['--drop-rate', '1', '--delay-ms', '200', '--redeliver-after-ms', '1000'];

test('with drop rate 1 a create ends in "still processing" with Retry, which re-sends the same key', async () => {
  const server = await startServer(DROP_EVERYTHING);
  try {
    const { page, pageErrors } = await openApp(browser, server.url, '?stuck_ms=1500');
    const commands = recordCommands(page);
    const statusChecks = [];
    page.on('request', (request) => {
      if (new URL(request.url()).pathname.startsWith('/api/commands/')) statusChecks.push(request.url());
    });
    const acceptedBodies = [];
    page.on('response', async (response) => {
      if (response.request().method() === 'POST' && new URL(response.url()).pathname === '/api/tasks') {
        acceptedBodies.push({ replayed: response.headers()['idempotent-replayed'], body: await response.json() });
      }
    });

    const id = await createViaUi(page, 'lost in the pipe');
    const item = taskItem(page, id);
    assert.equal((await shown(page, id)).state, 'pending');

    await item.getByTestId('stuck').waitFor();
    assert.match(await item.getByTestId('stuck').textContent(), /still processing/);
    assert.equal(await item.getAttribute('data-state'), 'stuck');
    assert.ok(await item.getByRole('button', { name: 'Retry' }).isVisible());
    assert.ok(await item.getByRole('button', { name: 'Discard' }).isVisible());
    assert.ok(statusChecks.length >= 1, 'the status endpoint was asked before offering Retry');

    await item.getByRole('button', { name: 'Retry' }).click();
    // Retry starts the wait over: the row is pending again, no longer stuck (read in
    // one look: the pending spell lasts stuck_ms).
    await eventually(async () => {
      const seen = await item.evaluate((row) => [row.dataset.state, row.querySelectorAll('[data-testid="stuck"]').length]);
      assert.deepEqual(seen, ['pending', 0]);
    });
    await eventually(() => assert.equal(acceptedBodies.length, 2));
    const creates = commands.filter((command) => command.method === 'POST');
    assert.equal(creates.length, 2);
    assert.equal(creates[1].key, creates[0].key, 'Retry reuses the Idempotency-Key');
    assert.deepEqual(creates[1].body, creates[0].body, 'and the very same body');
    assert.equal(acceptedBodies[1].replayed, 'true');
    assert.equal(acceptedBodies[1].body.command_id, acceptedBodies[0].body.command_id, 'one command on the server');

    // Still dropped: after Retry the op waits again, then says so again. It never spins.
    await item.getByTestId('stuck').waitFor();

    await server.api.setFaults({ drop_rate: 0 });
    await waitSettled(page, id);
    assert.equal(await item.getByTestId('stuck').count(), 0);
    const { tasks } = await server.api.tasks();
    assert.deepEqual(tasks.map((task) => task.title), ['lost in the pipe']);
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('Discard drops a stuck prediction and says the server may still apply it', async () => {
  const server = await startServer(DROP_EVERYTHING);
  try {
    const confirmed = await (async () => {
      await server.api.setFaults({ drop_rate: 0 });
      const task = await server.api.createSettled('confirmed title');
      await server.api.setFaults({ drop_rate: 1 });
      return task;
    })();
    const { page } = await openApp(browser, server.url, '?stuck_ms=1000');
    const item = taskItem(page, confirmed.id);
    await item.getByTestId('like').click();
    assert.equal((await shown(page, confirmed.id)).likes, 1);

    await item.getByRole('button', { name: 'Discard' }).click();
    assert.deepEqual(await shown(page, confirmed.id), {
      title: 'confirmed title', likes: 0, done: false, pending: false, state: 'settled',
    });
    await page.getByTestId('notice').filter({ hasText: 'stopped waiting' }).waitFor();
  } finally {
    await server.stop();
  }
});

test('a rename queued behind a change that never settles is offered Retry and Discard too, and Retry sends it on its version', async () => {
  const server = await startServer(DROP_EVERYTHING);
  try {
    await server.api.setFaults({ drop_rate: 0 });
    const confirmed = await server.api.createSettled('queued title');
    await server.api.setFaults({ drop_rate: 1 });
    const { page, pageErrors } = await openApp(browser, server.url, '?stuck_ms=1000');
    const commands = recordCommands(page);
    const item = taskItem(page, confirmed.id);
    await item.getByTestId('done').click();
    await renameViaUi(page, confirmed.id, 'renamed behind it');
    const renames = () => commands.filter((command) => command.method === 'PATCH' && command.body?.title);

    // Both say where they stand, each with its own Retry and Discard; the rename has not
    // gone out, as it waits for the done ahead of it.
    await eventually(async () => assert.equal(await item.getByTestId('stuck').count(), 2));
    const queued = item.getByTestId('stuck').filter({ hasText: 'not sent yet' });
    assert.equal(await queued.count(), 1);
    assert.deepEqual(renames(), []);
    assert.equal((await shown(page, confirmed.id)).title, 'renamed behind it');

    await queued.getByRole('button', { name: 'Retry' }).click();
    await eventually(() => assert.equal(renames().length, 1));
    assert.equal(renames()[0].body.base_version, confirmed.version, 'on the version the user saw: the done is not counted');

    // Let everything through: the done applies first (it was accepted first), the rename
    // then finds the version moved by our own change and goes again on it.
    await server.api.setFaults({ drop_rate: 0 });
    await waitSettled(page, confirmed.id);
    const { tasks } = await server.api.tasks();
    const [task] = tasks.filter((each) => each.id === confirmed.id);
    assert.deepEqual([task.title, task.done], ['renamed behind it', true]);
    assert.deepEqual(await shown(page, confirmed.id), {
      title: 'renamed behind it', likes: 0, done: true, pending: false, state: 'settled',
    });
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('with the server frozen, its sockets open, a change waiting for its event ends offering Retry, and settles once the server goes on', async () => {
  const server = await startServer();
  try {
    const task = await server.api.createSettled('before');
    await server.api.setFaults({ delay_ms: 3000 });
    const { page, pageErrors } = await openApp(browser, server.url, '?stuck_ms=1500');
    const item = taskItem(page, task.id);
    await item.waitFor();

    const accepted = page.waitForResponse((response) => response.request().method() === 'PATCH' && response.status() === 202);
    await renameViaUi(page, task.id, 'made before the freeze');
    await accepted;
    server.freeze();
    // Overdue after 1.5 s, its status read then hangs: it waits at most 5 s for an
    // answer, and the row offers Retry instead of showing "saving…" for as long as the
    // browser lets a request hang.
    await item.getByTestId('stuck').waitFor({ timeout: 15_000 });
    assert.match(await item.getByTestId('stuck').textContent(), /still processing/);
    assert.ok(await item.getByRole('button', { name: 'Retry' }).isVisible());
    assert.equal((await shown(page, task.id)).title, 'made before the freeze');
    // The event stream is still open, but the page does not say "live" of a server that
    // answers nothing.
    const connection = page.getByTestId('connection');
    await eventually(async () => assert.equal(await connection.getAttribute('data-state'), 'unresponsive'));
    assert.equal(await connection.textContent(), 'server not answering…');

    server.thaw();
    await eventually(async () => assert.equal(await connection.getAttribute('data-state'), 'live'));
    await waitSettled(page, task.id);
    assert.equal((await server.api.task(task.id)).title, 'made before the freeze');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a change made while the server is down says no answer came, and goes out by itself when it is back', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const task = await server.api.createSettled('before');
    const { page, pageErrors } = await openApp(browser, server.url);
    const commands = recordCommands(page);
    const item = taskItem(page, task.id);
    await item.waitFor();

    await server.crash();
    await renameViaUi(page, task.id, 'made while down');
    // Every attempt failed: it says so at once (not "still processing": nothing is, that
    // the page knows of), still shows the change, and offers Retry and Discard meanwhile.
    await item.getByTestId('stuck').waitFor({ timeout: EVENTUALLY_MS });
    assert.match(await item.getByTestId('stuck').textContent(), /no answer, the server cannot be reached/);
    assert.equal(await item.getByTestId('pending-marker').textContent(), 'no answer');
    assert.ok(await item.getByRole('button', { name: 'Retry' }).isVisible());
    assert.equal((await shown(page, task.id)).title, 'made while down');
    assert.equal(await server.api.tasks().catch(() => 'unreachable'), 'unreachable');

    await server.restart();
    await waitSettled(page, task.id);
    assert.equal((await server.api.task(task.id)).title, 'made while down');
    const keys = new Set(commands.filter((command) => command.method === 'PATCH').map((command) => command.key));
    assert.equal(keys.size, 1, 'every attempt under one key');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a change the server took says, while the server cannot be reached, that it is still processing there', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const task = await server.api.createSettled('before');
    await server.api.setFaults({ delay_ms: 8000 });
    const { page, pageErrors } = await openApp(browser, server.url, '?stuck_ms=1000');
    const item = taskItem(page, task.id);
    await item.waitFor();
    await renameViaUi(page, task.id, 'taken before the crash');
    // Its 202 came, and its status says pending: still processing, with nothing more to say.
    await eventually(async () => assert.equal(await item.getByTestId('stuck').textContent(),
      'Rename “before” to “taken before the crash”: still processing. The server has not confirmed it yet.RetryDiscard'));

    await server.crash();
    await eventually(async () => assert.equal(await page.getByTestId('connection').textContent(), 'server unreachable, trying again…'));
    assert.match(await item.getByTestId('stuck').textContent(),
      /still processing\. The server has not confirmed it yet\. The server cannot be reached now\./);

    // Back, the server applies it (its 202 was a promise): settled by its event.
    await server.restart();
    await waitSettled(page, task.id);
    assert.equal((await shown(page, task.id)).title, 'taken before the crash');
    assert.equal(await page.getByTestId('connection').textContent(), 'live');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});
