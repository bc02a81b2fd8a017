// Shared harness of the browser tests: the real `settle` binary on port 0 with a fresh
// data dir, headless Chromium through playwright-core, and polling assertions.

import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomUUID } from 'node:crypto';
import { chromium } from 'playwright-core';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const settleBin = path.resolve(repoRoot, process.env.SETTLE_BIN || 'target/debug/settle');

/** How long any "eventually" assertion waits: generous, the machine may be slow. */
export const EVENTUALLY_MS = 10_000;

const ANSI = /\x1b\[[0-9;]*[A-Za-z]/g;

/**
 * Start the server with extra flags (e.g. ['--failure-rate', '1']).
 * @returns {Promise<{url: string, api: ReturnType<typeof apiClient>, stop: () => Promise<void>}>}
 */
export async function startServer(flags = []) {
  const dataDir = await mkdtemp(path.join(tmpdir(), 'settle-e2e-'));
  let child;
  let url;
  ({ child, url } = await spawnSettle(['--addr', '127.0.0.1:0', '--data-dir', dataDir, ...flags]));
  return {
    url,
    api: apiClient(url),
    /** kill -9: the server is gone until `restart`. */
    async crash() {
      const exited = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await exited;
    },
    /** SIGSTOP: the server answers nothing, its sockets open (the kernel still takes connections). */
    freeze() {
      child.kill('SIGSTOP');
    },
    /** SIGCONT: it goes on where it stopped. */
    thaw() {
      child.kill('SIGCONT');
    },
    /** Start again on the same address and data dir. */
    async restart() {
      ({ child } = await spawnSettle(['--addr', new URL(url).host, '--data-dir', dataDir, ...flags]));
    },
    /** kill -9, then start again on the same address and data dir. */
    async crashAndRestart() {
      await this.crash();
      await this.restart();
    },
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGCONT'); // a frozen one would not stop
        const exited = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGTERM');
        const killTimer = setTimeout(() => child.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(killTimer);
      }
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * The environment a test server starts with: this one without the server's own
 * `SETTLE_*` settings, so a stray `SETTLE_FAILURE_RATE` cannot change what a test sees.
 */
function serverEnv() {
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('SETTLE_')));
  return { ...env, RUST_LOG: process.env.RUST_LOG || 'settle=info', NO_COLOR: '1' };
}

/** Spawn the binary and wait for its `listening on http://ADDR` line. */
async function spawnSettle(args) {
  const child = spawn(settleBin, args, {
    env: serverEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`settle did not report its address in 15 s:\n${output}`)), 15_000);
    const onData = (chunk) => {
      output += chunk.toString().replace(ANSI, '');
      const match = /listening on (http:\/\/[^\s]+)/.exec(output);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    };
    child.stdout.on('data', onData);
    child.stderr.on('data', onData);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`settle exited with ${code} before listening:\n${output}`));
    });
    child.once('error', reject);
  });
  // Keep draining the pipes so a chatty server never blocks on a full buffer.
  child.stdout.resume();
  child.stderr.resume();
  return { child, url };
}

/** Direct HTTP access to the server, for the "second writer" and for checking effects. */
export function apiClient(url) {
  async function json(response) {
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }
  async function command(method, pathname, body, key = randomUUID()) {
    const response = await fetch(url + pathname, {
      method,
      headers: { 'Content-Type': 'application/json', 'Idempotency-Key': key },
      body: body ? JSON.stringify(body) : undefined,
    });
    if (response.status !== 202) throw new Error(`${method} ${pathname}: ${response.status} ${await response.text()}`);
    return json(response);
  }
  return {
    tasks: async () => json(await fetch(`${url}/api/tasks`)),
    task: async (id) => {
      const response = await fetch(`${url}/api/tasks/${id}`);
      return response.status === 404 ? null : json(response);
    },
    command,
    setFaults: async (faults) => {
      const response = await fetch(`${url}/api/faults`, {
        method: 'PUT',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(faults),
      });
      if (!response.ok) throw new Error(`PUT /api/faults: ${response.status} ${await response.text()}`);
      return json(response);
    },
    /** Create a task through the API and wait until it is readable. */
    async createSettled(title) {
      const id = randomUUID();
      await command('POST', '/api/tasks', { id, title });
      await eventually(async () => {
        if (!(await this.task(id))) throw new Error(`task ${id} not settled yet`);
      });
      return this.task(id);
    },
  };
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-quic',
    ],
  });
}

/**
 * A page on the app in a fresh browser context, recording uncaught page errors, console
 * errors (a failed request among them) and dialogs (an `alert` from an injected title
 * would land in `dialogs`).
 */
export async function openApp(browser, url, query = '') {
  const context = await browser.newContext();
  const tab = await openTab(context, url, query);
  return { context, ...tab };
}

/** Another tab in the same context (same localStorage, its own sessionStorage). */
export async function openTab(context, url, query = '') {
  const page = await context.newPage();
  const pageErrors = [];
  const consoleErrors = [];
  const dialogs = [];
  page.on('pageerror', (error) => pageErrors.push(error.message));
  page.on('console', (message) => {
    if (message.type() === 'error') consoleErrors.push(message.text());
  });
  page.on('dialog', async (dialog) => {
    dialogs.push(dialog.message());
    await dialog.dismiss();
  });
  await page.goto(`${url}/${query}`);
  await waitForLive(page);
  return { page, pageErrors, consoleErrors, dialogs };
}

export async function waitForLive(page) {
  await page.locator('[data-testid="connection"][data-state="live"]').waitFor({ timeout: EVENTUALLY_MS });
}

/** Retry an assertion until it passes or `timeout` runs out; rethrows the last failure. */
export async function eventually(assertion, { timeout = EVENTUALLY_MS, interval = 50 } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    try {
      return await assertion();
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, interval));
    }
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A small seeded PRNG (mulberry32), so that a run of random clicks can be replayed:
 * `next()` in [0, 1), `next.below(n)` an integer in [0, n).
 */
export function seededRandom(seed) {
  let state = seed >>> 0;
  const next = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let mixed = state;
    mixed = Math.imul(mixed ^ (mixed >>> 15), mixed | 1);
    mixed ^= mixed + Math.imul(mixed ^ (mixed >>> 7), mixed | 61);
    return ((mixed ^ (mixed >>> 14)) >>> 0) / 4294967296;
  };
  next.below = (count) => Math.floor(next() * count);
  return next;
}

/** The list item of a task (by id) and of the first item with a title. */
export const taskItem = (page, id) => page.locator(`[data-testid="task"][data-id="${id}"]`);
export const taskByTitle = (page, title) =>
  page.locator('[data-testid="task"]').filter({ has: page.locator('[data-testid="title"]', { hasText: title }) });

/** Create a task through the UI's form and return its id once it is in the list. */
export async function createViaUi(page, title) {
  await page.getByTestId('new-title').fill(title);
  await page.getByTestId('new-title').press('Enter');
  const item = taskByTitle(page, title).first();
  await item.waitFor({ timeout: EVENTUALLY_MS });
  return item.getAttribute('data-id');
}

/** Wait until an item shows as settled (no pending op). */
export async function waitSettled(page, id) {
  await page.locator(`[data-testid="task"][data-id="${id}"][data-pending="false"]`).waitFor({ timeout: EVENTUALLY_MS });
}

/** Rename through the item's inline editor (Rename, type, Enter). */
export async function renameViaUi(page, id, title) {
  const item = taskItem(page, id);
  await item.getByTestId('rename').click();
  await item.getByTestId('rename-input').fill(title);
  await item.getByTestId('rename-input').press('Enter');
}

/** What the page shows for a task right now (no waiting): null when it is not in the list. */
export async function shown(page, id) {
  return page.evaluate((taskId) => {
    const li = document.querySelector(`[data-testid="task"][data-id="${taskId}"]`);
    if (!li) return null;
    return {
      title: li.querySelector('[data-testid="title"]').textContent,
      likes: Number(li.querySelector('[data-testid="likes"]').textContent),
      done: li.querySelector('[data-testid="done"]').checked,
      pending: li.dataset.pending === 'true',
      state: li.dataset.state,
    };
  }, id);
}

/**
 * How a row shows a delete of it: being deleted, its marker's text ('' when hidden),
 * pending, and its controls disabled; null when the row is gone.
 */
export async function deleting(page, id) {
  return page.evaluate((taskId) => {
    const li = document.querySelector(`[data-testid="task"][data-id="${taskId}"]`);
    if (!li) return null;
    const marker = li.querySelector('[data-testid="pending-marker"]');
    return {
      deleting: li.dataset.deleting === 'true',
      marker: marker.hidden ? '' : marker.textContent,
      pending: li.dataset.pending === 'true',
      disabled: li.querySelector('[data-testid="delete"]').disabled,
    };
  }, id);
}

/** The titles of the list, in display order. */
export async function listedTitles(page) {
  return page.locator('[data-testid="task"] [data-testid="title"]').allTextContents();
}

/** Record the commands the page sends: when, method, path, Idempotency-Key and parsed body. */
export function recordCommands(page) {
  const commands = [];
  page.on('request', (request) => {
    const key = request.headers()['idempotency-key'];
    if (!key) return;
    const body = request.postData();
    commands.push({ at: Date.now(), method: request.method(), path: new URL(request.url()).pathname, key, body: body ? JSON.parse(body) : null });
  });
  return commands;
}
