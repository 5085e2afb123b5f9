// Server-Sent Events in a real browser: headless Chromium's EventSource against
// `bin/longpoll serve`. Checks what only a browser can: that it parses our stream, reconnects
// by itself after the stream ends and resumes with Last-Event-ID exactly, hears `event: missed`,
// and may read a stream cross-origin only when --cors allows it.
// Run: node --test tests/browser/ (scripts/test-sse-browser installs what is missing first).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const require = createRequire(join(root, "package.json"));

function findChromium() {
  for (const p of [process.env.CHROMIUM, process.env.CHROMIUM_PATH, "/usr/lib/chromium/chromium", "/usr/bin/chromium",
    "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]) {
    if (p && existsSync(p)) return p;
  }
  return null;
}

let chromium = null;
try {
  ({ chromium } = require("playwright-core"));
} catch {
  chromium = null;
}
const executablePath = findChromium();
const skip = !chromium || !executablePath ? "needs playwright-core and Chromium" : false;

// Starts `lua5.4 bin/longpoll serve --port <port> ...`; resolves { port, proc, exited }.
function serve(args, port = 0) {
  return new Promise((resolve, reject) => {
    const proc = spawn("lua5.4", [join(root, "bin", "longpoll"), "serve", "--port", String(port), ...args],
      { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    let out = "", err = "";
    const exited = new Promise((res) => proc.on("exit", (code, signal) => res({ code, signal })));
    const timer = setTimeout(() => reject(new Error("server did not start: " + err)), 10000);
    proc.stderr.on("data", (d) => { err += d; });
    proc.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/longpoll listening on http:\/\/127\.0\.0\.1:(\d+)\//);
      if (m) {
        clearTimeout(timer);
        resolve({ port: Number(m[1]), proc, exited });
      }
    });
    exited.then(({ code }) => reject(new Error(`server exited with ${code}: ${err}`)));
  });
}

async function stop(server) {
  if (server.proc.exitCode === null && server.proc.signalCode === null) server.proc.kill("SIGTERM");
  return server.exited;
}

async function publish(port, category, data) {
  const r = await fetch(`http://127.0.0.1:${port}/publish`, {
    method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ category, data }),
  });
  assert.equal(r.status, 200);
}

const servers = [];
let browser, page, dir;

before(async () => {
  if (skip) return;
  dir = mkdtempSync(join(tmpdir(), "longpoll-sse-"));
  browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
  page = await browser.newPage();
});

after(async () => {
  for (const s of servers) await stop(s);
  if (browser) await browser.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

// Opens an EventSource in the page that records everything into window.logs[name].
async function openSource(name, url) {
  await page.evaluate(([name, url]) => {
    window.logs = window.logs || {};
    window.sources = window.sources || {};
    const log = { messages: [], missed: 0, opens: 0, errors: 0, states: [] };
    window.logs[name] = log;
    const es = new EventSource(url);
    window.sources[name] = es;
    es.onopen = () => { log.opens++; };
    es.onerror = () => { log.errors++; log.states.push(es.readyState); };
    es.onmessage = (e) => { log.messages.push({ id: e.lastEventId, data: e.data }); };
    es.addEventListener("missed", (e) => { log.missed++; log.missedData = e.data; });
  }, [name, url]);
}

async function waitFor(name, cond, what, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const log = await page.evaluate((n) => window.logs[n], name);
    if (cond(log)) return log;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(log)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test("EventSource receives events, reconnects after the stream ends and resumes exactly",
  { skip, timeout: 60000 }, async () => {
    const persist = join(dir, "events.jsonl");
    let server = await serve(["--persist", persist, "--flush-ms", "50"]);
    servers.push(server);
    const port = server.port;
    await page.goto(`http://127.0.0.1:${port}/stats?format=json`);
    await openSource("live", "/sse?category=a&category=b");
    await openSource("quiet", "/sse?category=q"); // sees no event before the restart
    await waitFor("live", (l) => l.opens === 1, "open");
    await waitFor("quiet", (l) => l.opens === 1, "open");
    await publish(port, "a", { n: 1, big: 12345678901234567890 });
    await publish(port, "c", "not subscribed");
    await publish(port, "b", "two");
    let log = await waitFor("live", (l) => l.messages.length === 2, "two events");
    const first = JSON.parse(log.messages[0].data);
    assert.equal(first.category, "a");
    assert.equal(first.data.n, 1);
    assert.match(log.messages[0].id, /^\d+_[0-9a-f-]{36}$/);
    assert.equal(log.messages[0].id, `${first.timestamp}_${first.id}`);
    assert.equal(JSON.parse(log.messages[1].data).data, "two");

    // The stream ends cleanly on shutdown; the browser reconnects on its own after `retry:`
    // (3 s), by then to a new server on the same port with the same events (--persist).
    server.proc.kill("SIGTERM");
    assert.deepEqual(await server.exited, { code: 0, signal: null });
    await waitFor("live", (l) => l.errors >= 1, "the end of the stream");
    server = await serve(["--persist", persist, "--flush-ms", "50"], port);
    servers.push(server);
    await publish(port, "b", "three");
    await publish(port, "a", "four");
    await publish(port, "q", "for the quiet one");
    log = await waitFor("live", (l) => l.messages.length >= 4, "events after the reconnect");
    assert.deepEqual(log.messages.map((m) => JSON.parse(m.data).data),
      [{ n: 1, big: 12345678901234567000 }, "two", "three", "four"]);
    assert.equal(log.opens, 2);
    // an id-only message at the start gave the quiet stream a Last-Event-ID too
    const quiet = await waitFor("quiet", (l) => l.messages.length >= 1, "the quiet stream's event");
    assert.deepEqual(quiet.messages.map((m) => JSON.parse(m.data).data), ["for the quiet one"]);
    await new Promise((r) => setTimeout(r, 300));
    log = await page.evaluate(() => window.logs.live);
    assert.equal(log.messages.length, 4, "no repeats");
    await page.evaluate(() => { for (const es of Object.values(window.sources)) es.close(); });
  });

test("EventSource hears event: missed before what is still buffered",
  { skip, timeout: 30000 }, async () => {
    const server = await serve(["--buffer-size", "2"]);
    servers.push(server);
    for (let i = 1; i <= 4; i++) await publish(server.port, "m", i);
    await page.goto(`http://127.0.0.1:${server.port}/stats?format=json`);
    await openSource("missed", "/sse?category=m&since_time=0");
    const log = await waitFor("missed", (l) => l.messages.length === 2, "the buffered events");
    assert.equal(log.missed, 1);
    assert.deepEqual(JSON.parse(log.missedData), { missed: true });
    assert.deepEqual(log.messages.map((m) => JSON.parse(m.data).data), [3, 4]);
    await page.evaluate(() => window.sources.missed.close());
  });

test("a cross-origin stream and publish work only where --cors allows the page's origin",
  { skip, timeout: 30000 }, async () => {
    const home = await serve([]);
    servers.push(home);
    const origin = `http://127.0.0.1:${home.port}`;
    const open = await serve(["--cors", origin]);
    const closed = await serve([]);
    servers.push(open, closed);
    await page.goto(`${origin}/stats?format=json`); // a same-origin page without a CSP (the dashboard has one)
    await openSource("cors", `http://127.0.0.1:${open.port}/sse?category=x`);
    await openSource("nocors", `http://127.0.0.1:${closed.port}/sse?category=x`);
    await waitFor("cors", (l) => l.opens === 1, "the allowed stream to open");
    // a JSON POST needs a preflight
    const status = await page.evaluate(async (url) => {
      const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ category: "x", data: "cross" }) });
      return r.status;
    }, `http://127.0.0.1:${open.port}/publish`);
    assert.equal(status, 200);
    const log = await waitFor("cors", (l) => l.messages.length === 1, "the cross-origin event");
    assert.equal(JSON.parse(log.messages[0].data).data, "cross");
    const refused = await waitFor("nocors", (l) => l.errors >= 1, "the refused stream");
    assert.equal(refused.opens, 0);
    assert.equal(await page.evaluate(() => window.sources.nocors.readyState), 2); // CLOSED
    const blocked = await page.evaluate(async (url) => {
      try {
        await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" });
        return false;
      } catch {
        return true;
      }
    }, `http://127.0.0.1:${closed.port}/publish`);
    assert.equal(blocked, true);
    await page.evaluate(() => { for (const es of Object.values(window.sources)) es.close(); });
  });
