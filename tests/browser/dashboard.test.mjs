// The live dashboard (issue 17, part 3) in headless Chromium, against a real
// `bin/longpoll serve --stats-categories --dashboard /dashboard --port 0`: the page is what
// browsers get at /stats, polls the JSON, shows events/s, deliveries/s, waiting subscribers and
// the busiest categories as they change, draws its charts, fetches nothing from elsewhere,
// fits a phone, and looks like something (screenshots checked for size and visible text).
// Run: scripts/test-dashboard (or node --test tests/browser/dashboard.test.mjs).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const require = createRequire(join(root, "package.json"));
const SHOTS = join(root, "build", "screenshots");

function findChromium() {
  for (const p of [process.env.CHROMIUM, process.env.CHROMIUM_PATH, "/usr/bin/chromium", "/usr/lib/chromium/chromium"]) {
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

function serve(extra) {
  const args = ["bin/longpoll", "serve", "--host", "127.0.0.1", "--port", "0", ...extra];
  return new Promise((resolve, reject) => {
    const proc = spawn("lua5.4", args, { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    let out = "", err = "";
    const exited = new Promise((res) => proc.on("exit", (code, signal) => res({ code, signal })));
    const timer = setTimeout(() => reject(new Error("server did not start within 10 s: " + err)), 10000);
    proc.stderr.on("data", (d) => { err += d; });
    proc.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/listening on http:\/\/127\.0\.0\.1:(\d+)\//);
      if (m) {
        clearTimeout(timer);
        resolve({ port: Number(m[1]), proc, exited, base: `http://127.0.0.1:${m[1]}` });
      }
    });
    exited.then(({ code }) => { clearTimeout(timer); reject(new Error(`server exited with ${code}: ${err}`)); });
  });
}

async function stop(s) {
  if (s && s.proc.exitCode === null && s.proc.signalCode === null) {
    s.proc.kill("SIGTERM");
    const { code } = await Promise.race([s.exited, new Promise((r) => setTimeout(() => r({ code: "hung" }), 5000))]);
    if (code === "hung") s.proc.kill("SIGKILL");
  }
}

async function publish(category, data) {
  const controller = new AbortController();
  const t = setTimeout(() => controller.abort(), 5000);
  try {
    const r = await fetch(server.base + "/publish", { method: "POST", headers: { "content-type": "application/json" },
      body: JSON.stringify({ category, data }), signal: controller.signal });
    assert.equal(r.status, 200);
    await r.text();
  } finally {
    clearTimeout(t);
  }
}

function pngSize(buf) {
  assert.equal(buf.subarray(1, 4).toString("latin1"), "PNG", "a PNG file");
  return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
}

let server, browser, page;
const requests = [];
const problems = [];
const polls = []; // long polls held open: waiting subscribers
const pollAbort = new AbortController();

before(async () => {
  if (skip) return;
  server = await serve(["--stats-categories", "--dashboard", "/dashboard"]);
  browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on("request", (r) => requests.push(r.url()));
  page.on("console", (m) => { if (m.type() === "error") problems.push("console: " + m.text()); });
  page.on("pageerror", (e) => problems.push("pageerror: " + e.message));
});

after(async () => {
  pollAbort.abort();
  await Promise.allSettled(polls);
  if (browser) await browser.close();
  await stop(server);
});

test("a browser at /stats gets the dashboard; JSON clients still get JSON", { skip, timeout: 30000 }, async () => {
  const r = await page.goto(server.base + "/stats", { timeout: 10000 });
  assert.match(r.headers()["content-type"], /^text\/html/);
  assert.match(r.headers()["content-security-policy"], /default-src 'none'/);
  assert.equal(await page.title(), "longpoll dashboard");
  await page.waitForFunction(() => document.getElementById("status").dataset.state === "live", null, { timeout: 5000 });
  const json = await (await fetch(server.base + "/stats")).json();
  assert.equal(typeof json.published, "number");
  const size = (await (await fetch(server.base + "/dashboard")).text()).length;
  assert.ok(size < 16 * 1024, `the page is ${size} bytes: a few KB`);
});

test("live figures: events/s, deliveries/s, waiting subscribers and the busiest categories", { skip, timeout: 30000 },
  async () => {
    // three long polls wait on "quiet" (they stay open until the end)
    for (let i = 0; i < 3; i++) {
      polls.push(fetch(server.base + "/events?category=quiet&timeout=60", { signal: pollAbort.signal })
        .then((r) => r.text()).catch(() => null));
    }
    await page.waitForFunction(() => Number(document.getElementById("waiting").textContent) >= 3, null,
      { timeout: 8000 });
    // a long poll on "hot" is woken by every publish there: deliveries
    let stopDeliveries = false;
    const deliveries = (async () => {
      for (let i = 0; i < 200 && !stopDeliveries; i++) {
        await fetch(server.base + "/events?category=hot&timeout=5", { signal: pollAbort.signal })
          .then((r) => r.text()).catch(() => null);
      }
    })();
    // publish for a while (bounded): "hot" the most, "warm" less
    for (let round = 0; round < 40; round++) {
      for (let i = 0; i < 4; i++) await publish("hot", { round, i, pad: "x".repeat(200) });
      await publish("warm", { round });
      await new Promise((r) => setTimeout(r, 50));
      if (round > 20 && await page.evaluate(() => Number(document.getElementById("events-rate").textContent) > 0 &&
        Number(document.getElementById("deliveries-rate").textContent) > 0)) break;
    }
    stopDeliveries = true;
    await page.waitForFunction(() => Number(document.getElementById("events-rate").textContent) > 0 &&
      Number(document.getElementById("deliveries-rate").textContent) > 0, null, { timeout: 8000 });
    await deliveries;
    const names = await page.$$eval("#busiest tbody tr td:first-child", (tds) => tds.map((t) => t.textContent));
    assert.deepEqual(names.slice(0, 2), ["hot", "warm"], "the busiest first");
    assert.ok(names.includes("quiet"), "categories with waiting subscribers are listed");
    assert.ok(Number(await page.textContent("#published")) >= 100);
    // every chart has been drawn with a line (non-transparent pixels beyond the axes)
    const inked = await page.$$eval("canvas", (cs) => cs.map((c) => {
      const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
      let n = 0;
      for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
      return n / (c.width * c.height);
    }));
    assert.equal(inked.length, 3);
    for (const share of inked) assert.ok(share > 0.02, `a chart is drawn (${share} of its pixels inked)`);
    assert.deepEqual(requests.filter((u) => !u.startsWith(server.base + "/")), [], "no request leaves the server");
  });

test("screenshots: desktop and phone, non-trivial, the parts visible, no horizontal scroll", { skip, timeout: 30000 },
  async () => {
    mkdirSync(SHOTS, { recursive: true });
    const blank = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    await blank.setContent("<html><body></body></html>");
    const blankShot = join(SHOTS, "dashboard-blank.png");
    await blank.screenshot({ path: blankShot });
    await blank.close();
    const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true });
    phone.on("pageerror", (e) => problems.push("phone pageerror: " + e.message));
    await phone.goto(server.base + "/dashboard", { timeout: 10000 });
    // rates need two samples: wait for the second
    await phone.waitForFunction(() => document.querySelectorAll("#busiest tbody tr").length >= 2 &&
      /\d/.test(document.getElementById("events-rate").textContent), null, { timeout: 8000 });
    for (const [p, name, width] of [[page, "dashboard.png", 1280], [phone, "dashboard-phone.png", 390]]) {
      const shot = join(SHOTS, name);
      await p.screenshot({ path: shot });
      const size = statSync(shot).size;
      const dims = pngSize(readFileSync(shot));
      assert.equal(dims.width, width * (p === phone ? 2 : 1));
      assert.ok(size > 20 * 1024, `${name} is ${size} bytes, expected more than 20 KB`);
      assert.ok(size > 5 * statSync(blankShot).size, `${name} carries far more than a blank page`);
      assert.ok(await p.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth),
        `${name}: no horizontal scroll`);
      for (const [selector, text] of [["h1", /^longpoll$/], ["#status", /^live/], ["#events-rate", /\d/],
        ["#waiting", /^\d+$/]]) {
        const el = p.locator(selector);
        assert.ok(await el.isVisible(), `${name}: ${selector} is visible`);
        assert.match(await el.textContent(), text, `${name}: ${selector}`);
        const box = await el.boundingBox();
        assert.ok(box && box.width > 10 && box.height > 10 && box.x >= 0 && box.x + box.width <= width,
          `${name}: ${selector} is on screen: ${JSON.stringify(box)}`);
      }
      // text stays readable: nothing below 11 CSS px
      const sizes = await p.$$eval("header *, main *", (els) => els.filter((e) => e.textContent.trim() &&
        e.children.length === 0 && e.getClientRects().length > 0).map((e) => parseFloat(getComputedStyle(e).fontSize)));
      assert.ok(sizes.length > 20 && sizes.every((v) => v >= 11), `${name}: text sizes ${JSON.stringify(sizes)}`);
    }
    await phone.close();
    assert.deepEqual(problems, [], "no console errors or page errors");
  });

test("without --stats-categories the page says how to list categories", { skip, timeout: 30000 }, async () => {
  const closed = await serve([]);
  const p = await browser.newPage({ viewport: { width: 800, height: 600 } });
  try {
    await p.goto(closed.base + "/stats", { timeout: 10000 });
    await p.waitForFunction(() => document.getElementById("status").dataset.state === "live", null, { timeout: 5000 });
    await p.waitForSelector("#note:not([hidden])", { timeout: 5000 });
    assert.match(await p.textContent("#note"), /--stats-categories/);
    assert.equal(await p.locator("#busiest tbody tr").count(), 0);
    // the server going away shows as offline, not as a frozen page
    await stop(closed);
    await p.waitForFunction(() => document.getElementById("status").dataset.state === "offline", null,
      { timeout: 10000 });
  } finally {
    await p.close();
    await stop(closed);
  }
});
