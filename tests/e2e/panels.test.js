// The side panels: the fault panel is bound to GET/PUT /api/faults (polled), and the consistency
// window chart draws the client-measured p50/p99 beside the server's /api/metrics.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';

import { startServer, launchBrowser, openApp, eventually, createViaUi, waitSettled, sleep } from './helpers.js';

let browser;
before(async () => { browser = await launchBrowser(); });
after(async () => { await browser?.close(); });

async function faultsOnServer(server) {
  return (await fetch(`${server.url}/api/faults`)).json();
}

test('the fault panel shows the live settings, applies changes and reports refused values', async () => {
  const server = await startServer(['--delay-ms', '250', '--jitter-ms', '10']);
  try {
    const { page } = await openApp(browser, server.url);
    await eventually(async () => {
      assert.equal(await page.getByTestId('fault-delay-ms').inputValue(), '250');
      assert.equal(await page.getByTestId('fault-jitter-ms').inputValue(), '10');
    });

    // Every PUT's body, in the order sent.
    const sent = [];
    page.on('request', (request) => { if (request.method() === 'PUT') sent.push(request.postDataJSON()); });
    await page.getByTestId('fault-failure-rate').fill('0.3');
    await page.getByTestId('fault-drop-rate').fill('0.1');
    await page.getByTestId('fault-apply').click();
    // Each field applies on its own change too, so an earlier "Applied." may be the
    // failure rate's alone: wait for the server to hold both.
    await eventually(async () => {
      assert.equal(await page.getByTestId('fault-status').textContent(), 'Applied.');
      const applied = await faultsOnServer(server);
      assert.deepEqual([applied.delay_ms, applied.jitter_ms, applied.failure_rate, applied.drop_rate], [250, 10, 0.3, 0.1]);
    });
    // The click that blurred the drop rate sent it (its change); the submit after it sends
    // nothing again.
    assert.deepEqual(sent, [{ failure_rate: 0.3 }, { drop_rate: 0.1 }], 'each value sent once');

    // Enter in a field: the value goes out once, whichever of change and submit comes first.
    await page.getByTestId('fault-jitter-ms').fill('20');
    await page.getByTestId('fault-jitter-ms').press('Enter');
    await eventually(async () => assert.equal((await faultsOnServer(server)).jitter_ms, 20));
    // Apply with nothing changed: nothing to send, and the status says the server holds it.
    await page.getByTestId('fault-apply').click();
    await eventually(async () => assert.equal(await page.getByTestId('fault-status').textContent(), 'Applied.'));
    assert.deepEqual(sent.slice(2), [{ jitter_ms: 20 }], 'Enter, then Apply with nothing changed: one PUT');

    // A knob turned elsewhere since the page's last poll: Apply reads the server again, and
    // sends what the form says rather than saying "Applied." of a value it no longer holds.
    let pollsPass = false;
    await page.route('**/api/faults', (route) => (route.request().method() === 'GET' && !pollsPass ? route.abort() : route.continue()));
    await server.api.setFaults({ failure_rate: 0.5 });
    await sleep(2500); // a poll, refused: the page has not seen it
    assert.equal(await page.getByTestId('fault-failure-rate').inputValue(), '0.3');
    await page.getByTestId('fault-failure-rate').focus(); // so that a poll does not rewrite it
    pollsPass = true;
    await page.getByTestId('fault-failure-rate').press('Enter');
    await eventually(async () => assert.equal((await faultsOnServer(server)).failure_rate, 0.3));
    assert.deepEqual(sent.at(-1), { failure_rate: 0.3 });
    await eventually(async () => assert.equal(await page.getByTestId('fault-status').textContent(), 'Applied.'));
    await page.unroute('**/api/faults');

    const puts = [];
    page.on('request', (request) => { if (request.method() === 'PUT') puts.push(request.url()); });
    await page.getByTestId('fault-failure-rate').fill('2');
    await page.getByTestId('fault-apply').click();
    await eventually(async () => assert.equal(await page.getByTestId('fault-status').textContent(),
      'Refused: failure_rate must be in [0, 1], got 2'));
    assert.deepEqual(puts, [], 'out of range: not sent');
    assert.equal((await faultsOnServer(server)).failure_rate, 0.3, 'a refused value changes nothing');
    // A rate between the arrows' steps is a rate all the same.
    await page.getByTestId('fault-failure-rate').fill('0.33');
    await page.getByTestId('fault-apply').click();
    await eventually(async () => assert.equal((await faultsOnServer(server)).failure_rate, 0.33));
  } finally {
    await server.stop();
  }
});

test('the fault panel follows settings turned elsewhere (another tab, a script), and keeps a field being typed in', async () => {
  const server = await startServer(['--delay-ms', '250']);
  try {
    const { page } = await openApp(browser, server.url);
    await eventually(async () => assert.equal(await page.getByTestId('fault-delay-ms').inputValue(), '250'));
    await server.api.setFaults({ failure_rate: 0.4, drop_rate: 0.2 });
    await eventually(async () => {
      assert.equal(await page.getByTestId('fault-failure-rate').inputValue(), '0.4');
      assert.equal(await page.getByTestId('fault-drop-rate').inputValue(), '0.2');
    });

    await page.getByTestId('fault-delay-ms').fill('9'); // typing, not applied yet
    await server.api.setFaults({ delay_ms: 300, failure_rate: 0.1 });
    await eventually(async () => assert.equal(await page.getByTestId('fault-failure-rate').inputValue(), '0.1'));
    assert.equal(await page.getByTestId('fault-delay-ms').inputValue(), '9', 'what the user is typing stays');
  } finally {
    await server.stop();
  }
});

test('the chart draws the client-measured window beside the server metrics', async () => {
  const server = await startServer(['--delay-ms', '400']);
  try {
    const { page } = await openApp(browser, server.url);
    const id = await createViaUi(page, 'measured');
    await waitSettled(page, id);

    const chart = page.getByTestId('window-chart');
    await chart.locator('[data-series="client-p50"]').waitFor({ state: 'attached' });
    assert.match(await chart.locator('[data-series="client-p99"]').getAttribute('d'), /^M\d/);
    const clientText = await page.getByTestId('client-window').textContent();
    const clientP50 = Number(/p50 (\d+) ms/.exec(clientText)[1]);
    assert.ok(clientP50 >= 400, `click -> settled (${clientP50} ms) is at least the server delay`);

    await eventually(async () => {
      assert.match(await page.getByTestId('server-window').textContent(), /^p50 \d+ ms, p99 \d+ ms, max \d+ ms over 1$/);
      await chart.locator('[data-series="server-p50"]').waitFor({ state: 'attached', timeout: 100 });
    });
  } finally {
    await server.stop();
  }
});

test("the command counts follow the server's metrics, with its dead letters among the failed", async () => {
  const server = await startServer(['--delay-ms', '100']);
  try {
    const { page } = await openApp(browser, server.url);
    const counts = page.getByTestId('server-counts');
    await eventually(async () => assert.equal(await counts.textContent(), 'accepted 0, settled 0, failed 0, deduplicated 0, pending 0'));

    await server.api.createSettled('applied');
    // Every apply attempt of the next command hits a transient fault: after five it is
    // dead-lettered. And one injected failure, to tell the two apart.
    await server.api.setFaults({ transient_rate: 1 });
    await server.api.command('POST', '/api/tasks', { title: 'dead letter' });
    await eventually(async () => assert.equal((await (await fetch(`${server.url}/api/metrics`)).json()).dead_lettered, 1));
    await server.api.setFaults({ transient_rate: 0, failure_rate: 1 });
    const key = 'injected-once';
    await server.api.command('POST', '/api/tasks', { title: 'injected' }, key);
    await server.api.command('POST', '/api/tasks', { title: 'injected' }, key);
    await eventually(async () => {
      assert.equal(await counts.textContent(), 'accepted 3, settled 1, failed 2 (1 dead-lettered), deduplicated 1, pending 0');
    });
  } finally {
    await server.stop();
  }
});
