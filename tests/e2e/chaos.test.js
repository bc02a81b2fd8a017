// The "done when", automated: failure rate 0.3 and drop rate 0.1, fast clicks
// through every action in two tabs. Every item ends settled, rolled back with a notice, or
// offering Retry: never spinning, never duplicated, never silently overwritten. Once the
// faults stop, both tabs converge on exactly what the server has.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import { startServer, launchBrowser, openApp, openTab, eventually, renameViaUi, seededRandom } from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

/** Every item of a tab: id, shown values and state. */
function itemsOf(page) {
  return page.locator('[data-testid="task"]').evaluateAll((nodes) => nodes.map((li) => ({
    id: li.dataset.id,
    title: li.querySelector('[data-testid="title"]').textContent,
    likes: Number(li.querySelector('[data-testid="likes"]').textContent),
    done: li.querySelector('[data-testid="done"]').checked,
    state: li.dataset.state,
    deleting: li.dataset.deleting === 'true',
  })));
}

const byId = (a, b) => a.id.localeCompare(b.id);

test('fast clicks in two tabs under failures and drops: every item settles, rolls back or offers Retry', async () => {
  const SEED = Number(process.env.CHAOS_SEED || 20251122);
  const server = await startServer(['--delay-ms', '300', '--redeliver-after-ms', '1500', '--seed', String(SEED)]);
  try {
    for (const title of ['alpha', 'beta', 'gamma']) await server.api.createSettled(title);
    const { page: tabA, context, pageErrors } = await openApp(browser, server.url, '?stuck_ms=2500');
    const { page: tabB } = await openTab(context, server.url, '?stuck_ms=2500');
    await server.api.setFaults({ failure_rate: 0.3, drop_rate: 0.1 });

    // Short action timeouts while clicking at random: an item may vanish under a click.
    for (const page of [tabA, tabB]) page.setDefaultTimeout(500);
    const next = seededRandom(SEED);
    let created = 0;
    let missed = 0;
    for (let step = 0; step < 36; step += 1) {
      const page = next() < 0.5 ? tabA : tabB;
      // The user switches to the tab before clicking (a background tab gets no frames).
      await page.bringToFront();
      // Not a row being deleted either: its controls are disabled.
      const items = (await itemsOf(page)).filter((item) => item.state !== 'stuck' && !item.deleting);
      const pick = items[Math.floor(next() * items.length)];
      const roll = next();
      const item = pick && page.locator(`[data-testid="task"][data-id="${pick.id}"]`);
      // Items come and go under our feet (another tab deletes, a create fails): a click
      // that finds its item gone is simply a click that missed.
      const attempt = (action) => action().catch(() => { missed += 1; });
      if (!pick || roll < 0.2) {
        created += 1;
        await page.getByTestId('new-title').fill(`created ${created}`);
        await page.getByTestId('new-title').press('Enter');
      } else if (roll < 0.5) {
        await attempt(() => item.getByTestId('like').click());
      } else if (roll < 0.7) {
        await attempt(() => item.getByTestId('done').click());
      } else if (roll < 0.92) {
        await attempt(() => renameViaUi(page, pick.id, `renamed ${step}`));
      } else if (items.length > 3) {
        await attempt(() => item.getByTestId('delete').click());
      }
    }

    assert.ok(missed <= 6, `most clicks land (${missed} missed)`);
    const noticesShown = (await tabA.getByTestId('notice').count()) + (await tabB.getByTestId('notice').count());
    assert.ok(noticesShown > 0, 'with a 30 % failure rate some write failed, and said so');

    // Never spinning: once the clicks stop, within the timeout every item is settled,
    // offering Retry, or showing a conflict. No item stays "pending" for ever.
    await eventually(async () => {
      for (const page of [tabA, tabB]) {
        const states = (await itemsOf(page)).map((item) => item.state);
        assert.ok(states.every((state) => ['settled', 'stuck', 'conflict'].includes(state)), `states: ${states}`);
      }
    }, { timeout: 15_000 });

    // Faults off; retry what is stuck, take theirs where there is a conflict.
    await server.api.setFaults({ failure_rate: 0, drop_rate: 0 });
    await eventually(async () => {
      for (const page of [tabA, tabB]) {
        await page.bringToFront();
        for (const button of await page.getByRole('button', { name: 'Retry' }).all()) await button.click().catch(() => {});
        for (const button of await page.getByRole('button', { name: 'Take theirs' }).all()) await button.click().catch(() => {});
        const states = (await itemsOf(page)).map((item) => item.state);
        assert.ok(states.every((state) => state === 'settled'), `states: ${states}`);
      }
    }, { timeout: 20_000 });

    // Converged: each tab shows exactly the server's rows, once each.
    await eventually(async () => {
      const { tasks } = await server.api.tasks();
      const truth = tasks.map(({ id, title, likes, done }) => ({ id, title, likes, done, state: 'settled', deleting: false })).sort(byId);
      for (const page of [tabA, tabB]) {
        const shownItems = await itemsOf(page);
        assert.equal(new Set(shownItems.map((item) => item.id)).size, shownItems.length, 'no duplicated item');
        assert.deepEqual([...shownItems].sort(byId), truth);
      }
    });
    assert.deepEqual(pageErrors, []);
  } finally {
    await server.stop();
  }
});
