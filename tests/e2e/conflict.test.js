// Legible conflicts: an edit refused with `conflict` opens an inline yours / theirs view.
// Keep mine re-submits on the current version under a new key; Take theirs sends nothing.
// No silent overwrite either way.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import {
  startServer, launchBrowser, openApp, eventually, renameViaUi, shown, taskItem, recordCommands, waitSettled, waitForLive, deleting,
} from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/**
 * Another writer's rename, accepted before the UI's so that it applies first. The window
 * (3 s) is long enough for the UI to issue its rename before it has seen this one settle,
 * even on a slow machine; the tests check that it did (base_version 1).
 */
async function secondWriterRenames(server, taskId, title, baseVersion) {
  await server.api.command('PATCH', `/api/tasks/${taskId}`, { title, base_version: baseVersion });
}

/** The UI's rename went out on the version it had seen before the other writer's. */
async function sentOnVersionOne(commands) {
  await eventually(() => assert.deepEqual(
    commands.filter((command) => command.method === 'PATCH').map((command) => command.body.base_version),
    [1],
  ));
}

/** A settled task 'shared' on the server, and the app open on it, recording its commands. */
async function openOnSharedTask(server) {
  const task = await server.api.createSettled('shared');
  const { page, pageErrors } = await openApp(browser, server.url);
  const commands = recordCommands(page);
  const item = taskItem(page, task.id);
  await item.waitFor();
  return { task, page, pageErrors, commands, item };
}

/** The item's conflict view, once open, with the UI's 'mine' against their 'theirs'. */
async function conflictShown(item) {
  const conflict = item.getByTestId('conflict');
  await conflict.waitFor();
  assert.match(await conflict.getByTestId('conflict-yours').textContent(), /Title: mine/);
  assert.match(await conflict.getByTestId('conflict-theirs').textContent(), /Title: theirs/);
  return conflict;
}

test('a conflicting rename shows yours and theirs; Keep mine re-submits on the current version', async () => {
  const server = await startServer(['--delay-ms', '3000']);
  try {
    const { task, page, pageErrors, commands, item } = await openOnSharedTask(server);

    await secondWriterRenames(server, task.id, 'theirs', 1);
    await renameViaUi(page, task.id, 'mine');
    assert.equal((await shown(page, task.id)).title, 'mine');
    await sentOnVersionOne(commands);

    const conflict = await conflictShown(item);
    assert.equal((await shown(page, task.id)).title, 'theirs', 'the item shows what the server has');
    await page.getByTestId('notice').filter({ hasText: 'someone else changed it first' }).waitFor();

    await conflict.getByRole('button', { name: 'Keep mine' }).click();
    assert.equal(await conflict.isVisible(), false);
    assert.equal((await shown(page, task.id)).title, 'mine', 'keep mine predicts at once');
    await waitSettled(page, task.id);
    assert.equal((await shown(page, task.id)).title, 'mine');
    assert.equal((await server.api.task(task.id)).title, 'mine');

    const patches = commands.filter((command) => command.method === 'PATCH');
    assert.equal(patches.length, 2);
    assert.deepEqual(patches.map((command) => command.body), [
      { title: 'mine', base_version: 1 },
      { title: 'mine', base_version: 2 },
    ]);
    assert.notEqual(patches[1].key, patches[0].key, 'keep mine is a new intent: a new key');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('Take theirs closes the conflict, keeps their value and sends nothing', async () => {
  const server = await startServer(['--delay-ms', '3000']);
  try {
    const { task, page, commands, item } = await openOnSharedTask(server);

    await secondWriterRenames(server, task.id, 'theirs', 1);
    await renameViaUi(page, task.id, 'mine');
    await sentOnVersionOne(commands);
    await item.getByTestId('conflict').waitFor();
    await item.getByRole('button', { name: 'Take theirs' }).click();

    assert.equal(await item.getByTestId('conflict').isVisible(), false);
    assert.deepEqual(await shown(page, task.id), { title: 'theirs', likes: 0, done: false, pending: false, state: 'settled' });
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(commands.length, 1, 'only the original rename was ever sent');
    await eventually(async () => assert.equal((await server.api.task(task.id)).title, 'theirs'));
  } finally {
    await server.stop();
  }
});

test('an editor opened before someone else’s change conflicts on save instead of overwriting it', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const { task, page, pageErrors, commands, item } = await openOnSharedTask(server);

    // The editor opens on version 1; their rename settles while it is open.
    await item.getByTestId('rename').click();
    await item.getByTestId('rename-input').fill('mine');
    await secondWriterRenames(server, task.id, 'theirs', 1);
    await eventually(async () => assert.equal((await shown(page, task.id)).title, 'theirs'));
    await item.getByTestId('save').click();

    await sentOnVersionOne(commands);
    await conflictShown(item);
    assert.equal((await server.api.task(task.id)).title, 'theirs', 'nothing was overwritten');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a like by someone else while the editor is open is no conflict: the rename is re-sent and lands', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const { task, page, pageErrors, commands, item } = await openOnSharedTask(server);

    // The editor opens on version 1; their like settles while it is open (version 2).
    await item.getByTestId('rename').click();
    await item.getByTestId('rename-input').fill('mine');
    await server.api.command('POST', `/api/tasks/${task.id}/likes`, { delta: 1 });
    await eventually(async () => assert.equal((await shown(page, task.id)).likes, 1));
    await item.getByTestId('save').click();

    await eventually(() => assert.deepEqual(
      commands.filter((command) => command.method === 'PATCH').map((command) => command.body),
      [{ title: 'mine', base_version: 1 }, { title: 'mine', base_version: 2 }],
    ));
    await waitSettled(page, task.id);
    assert.deepEqual(await shown(page, task.id), { title: 'mine', likes: 1, done: false, pending: false, state: 'settled' });
    assert.deepEqual(
      { title: (await server.api.task(task.id)).title, likes: (await server.api.task(task.id)).likes },
      { title: 'mine', likes: 1 },
    );
    assert.equal(await item.getByTestId('conflict').isVisible(), false, 'nobody else renamed: nothing to choose');
    assert.equal(await page.getByTestId('notice').count(), 0, 'and nothing failed');
    const patches = commands.filter((command) => command.method === 'PATCH');
    assert.notEqual(patches[1].key, patches[0].key, 'the refused command keeps its key; the re-send is a new one');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a delete made before someone else’s rename reached the page asks instead of deleting their edit', async () => {
  const server = await startServer(['--delay-ms', '3000']);
  try {
    const { task, page, pageErrors, commands, item } = await openOnSharedTask(server);

    await secondWriterRenames(server, task.id, 'theirs', 1);
    await item.getByTestId('delete').click();
    assert.equal((await deleting(page, task.id)).deleting, true, 'the delete is predicted at once');
    assert.deepEqual(commands.map((command) => [command.method, command.body]), [['DELETE', { base_version: 1 }]]);

    const conflict = item.getByTestId('conflict');
    await conflict.waitFor({ timeout: 15_000 });
    assert.match(await conflict.getByTestId('conflict-yours').textContent(), /Deleted: yes/);
    assert.match(await conflict.getByTestId('conflict-theirs').textContent(), /Deleted: no.*Title: theirs/);
    assert.match(await conflict.textContent(), /before your delete applied/);
    assert.equal((await server.api.task(task.id)).title, 'theirs', 'their rename stands');

    await conflict.getByRole('button', { name: 'Take theirs' }).click();
    assert.deepEqual(await shown(page, task.id), { title: 'theirs', likes: 0, done: false, pending: false, state: 'settled' });
    assert.equal(commands.length, 1, 'nothing more was sent');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('an editor sends only what the user changed: their rename while it was open stands beside my notes', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const { task, page, pageErrors, commands, item } = await openOnSharedTask(server);

    await item.getByTestId('rename').click();
    await item.getByTestId('notes-input').fill('my notes');
    await secondWriterRenames(server, task.id, 'theirs', 1);
    await eventually(async () => assert.equal((await shown(page, task.id)).title, 'theirs'));
    // Rename clicked again after typing: the editor keeps what it opened with.
    await item.getByTestId('rename').click();
    assert.equal(await item.getByTestId('rename-input').inputValue(), 'shared');
    await item.getByTestId('save').click();

    await eventually(() => assert.deepEqual(
      commands.filter((command) => command.method === 'PATCH').map((command) => command.body),
      [{ notes: 'my notes', base_version: 1 }, { notes: 'my notes', base_version: 2 }],
    ));
    await waitSettled(page, task.id);
    const row = await server.api.task(task.id);
    assert.deepEqual([row.title, row.notes], ['theirs', 'my notes'], 'both changes stand');
    assert.equal(await item.getByTestId('conflict').isVisible(), false);
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('an editor opened again before anything was typed takes the task as it is now', async () => {
  const server = await startServer(['--delay-ms', '300']);
  try {
    const { task, page, pageErrors, commands, item } = await openOnSharedTask(server);

    await item.getByTestId('rename').click();
    await secondWriterRenames(server, task.id, 'theirs', 1);
    await eventually(async () => assert.equal((await shown(page, task.id)).title, 'theirs'));
    await item.getByTestId('rename').click();
    assert.equal(await item.getByTestId('rename-input').inputValue(), 'theirs');
    await item.getByTestId('rename-input').fill('mine');
    await item.getByTestId('save').click();

    await waitSettled(page, task.id);
    assert.deepEqual(
      commands.filter((command) => command.method === 'PATCH').map((command) => command.body),
      [{ title: 'mine', base_version: 2 }],
      'made on the version it showed: no conflict',
    );
    assert.equal((await server.api.task(task.id)).title, 'mine');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('an open conflict survives a reload: the refused edit still waits for a choice', async () => {
  const server = await startServer(['--delay-ms', '1500']);
  try {
    const { task, page, pageErrors, commands, item } = await openOnSharedTask(server);

    await secondWriterRenames(server, task.id, 'theirs', 1);
    await renameViaUi(page, task.id, 'mine');
    await sentOnVersionOne(commands);
    await conflictShown(item);

    await page.reload();
    await waitForLive(page);
    const conflict = await conflictShown(taskItem(page, task.id));
    await conflict.getByRole('button', { name: 'Keep mine' }).click();
    await waitSettled(page, task.id);
    assert.equal((await server.api.task(task.id)).title, 'mine');
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});

test('a like of mine fails while someone else renames: my rename made behind the like does not overwrite theirs', async () => {
  // The like applies (and fails) at 3 s, their rename at about 3.8 s, mine after. Sent at
  // once, counting the like as applied, mine went out on version 2, which the task reached
  // through their rename instead: the server took it over theirs, never seen. Now it waits
  // for the like, goes out on version 1, and is refused.
  const server = await startServer(['--delay-ms', '3000']);
  try {
    const { task, page, pageErrors, commands, item } = await openOnSharedTask(server);
    await server.api.setFaults({ failure_rate: 1 });
    await item.getByTestId('like').click();
    await new Promise((resolve) => setTimeout(resolve, 800));
    await server.api.command('PATCH', `/api/tasks/${task.id}`, { title: 'theirs' });
    await renameViaUi(page, task.id, 'mine');
    assert.equal((await shown(page, task.id)).title, 'mine', 'predicted at once');
    await page.getByTestId('notice').filter({ hasText: 'like' }).waitFor();
    await server.api.setFaults({ failure_rate: 0 }); // before their rename applies
    await conflictShown(item);
    assert.equal((await server.api.task(task.id)).title, 'theirs');
    assert.deepEqual(
      commands.filter((command) => command.method === 'PATCH').map((command) => command.body),
      [{ title: 'mine', base_version: 1 }],
    );
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});
