// The demo behind `make run` (examples/demo) in headless Chromium, against a real
// `bin/longpoll serve --static examples/demo --port 0`: the page loads our client from /js/,
// publishes, shows events from itself and from plain HTTP, switches categories, fetches nothing
// from elsewhere, and looks like something (a screenshot checked for size and visible text).
// Run: scripts/test-demo (or node --test tests/browser/demo.test.mjs once playwright-core is in).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, statSync } from "node:fs";
import { createRequire } from "node:module";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const require = createRequire(join(root, "package.json"));
// Kept for a person to look at after a run (build/ is not committed).
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

// `lua5.4 bin/longpoll serve --static examples/demo --port 0`, as `make run` does but on a free
// port; or, given args, another program that prints "listening on http://127.0.0.1:PORT/".
function serve(args = ["bin/longpoll", "serve", "--host", "127.0.0.1", "--port", "0", "--static", "examples/demo"]) {
  return new Promise((resolve, reject) => {
    const proc = spawn("lua5.4", args, { cwd: root, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, PORT: "0" } });
    let out = "", err = "";
    const exited = new Promise((res) => proc.on("exit", (code, signal) => res({ code, signal })));
    const timer = setTimeout(() => reject(new Error("server did not start within 10 s: " + err)), 10000);
    proc.stderr.on("data", (d) => { err += d; });
    proc.stdout.on("data", (d) => {
      out += d;
      const m = out.match(/listening on http:\/\/127\.0\.0\.1:(\d+)\//);
      if (m) {
        clearTimeout(timer);
        resolve({ port: Number(m[1]), proc, exited, stderr: () => err });
      }
    });
    exited.then(({ code }) => { clearTimeout(timer); reject(new Error(`server exited with ${code}: ${err}`)); });
  });
}

async function http(path, init = {}) {
  const controller = new AbortController();
  const t = setTimeout(() => controller.abort(), 5000);
  try {
    const r = await fetch(base + path, { ...init, signal: controller.signal });
    return { status: r.status, body: await r.json() };
  } finally {
    clearTimeout(t);
  }
}

async function publish(category, data) {
  const r = await http("/publish", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ category, data }) });
  assert.deepEqual(r, { status: 200, body: { success: true } });
}

// The texts of the event list, as a person sees them.
async function shownTexts() {
  return page.$$eval("#events li.event .text", (els) => els.map((e) => e.textContent));
}

async function waitForText(text, ms = 5000) {
  await page.waitForFunction((t) => [...document.querySelectorAll("#events li.event .text")]
    .some((e) => e.textContent === t), text, { timeout: ms });
}

// Width and height from a PNG's IHDR chunk.
function pngSize(buf) {
  assert.equal(buf.subarray(1, 4).toString("latin1"), "PNG", "a PNG file");
  return { width: buf.readUInt32BE(16), height: buf.readUInt32BE(20) };
}

let server, browser, page, base;
const requests = [];
const problems = [];

before(async () => {
  if (skip) return;
  server = await serve();
  base = `http://127.0.0.1:${server.port}`;
  browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
  page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  page.on("request", (r) => requests.push(r.url()));
  page.on("console", (m) => { if (m.type() === "error") problems.push("console: " + m.text()); });
  page.on("pageerror", (e) => problems.push("pageerror: " + e.message));
});

async function stop(s) {
  if (s && s.proc.exitCode === null && s.proc.signalCode === null) {
    s.proc.kill("SIGTERM");
    const { code } = await Promise.race([s.exited, new Promise((r) => setTimeout(() => r({ code: "hung" }), 5000))]);
    if (code === "hung") s.proc.kill("SIGKILL");
  }
}

after(async () => {
  if (browser) await browser.close();
  await stop(server);
});

test("the demo page loads with our client from /js/ and nothing from elsewhere", { skip, timeout: 30000 }, async () => {
  await page.goto(base + "/", { timeout: 10000 });
  assert.equal(await page.title(), "longpoll demo");
  assert.equal(await page.evaluate(() => typeof window.longpoll.newClient), "function");
  await page.waitForFunction(() => document.getElementById("status").dataset.state === "live", null, { timeout: 5000 });
  assert.match(await page.textContent("#status"), /watching chat/);
  assert.ok(requests.some((u) => u === base + "/js/longpoll.js"), "the page asked for /js/longpoll.js");
  const foreign = requests.filter((u) => !u.startsWith(base + "/"));
  assert.deepEqual(foreign, [], "no request leaves the server");
  // the shell hint names this very server
  assert.match(await page.textContent("#curl"), new RegExp(`curl -d '.*"category":"chat".*' ${base}/publish`));
});

test("publishing from the page shows the event, in the list and as raw JSON", { skip, timeout: 30000 }, async () => {
  await page.fill("#name", "ada");
  await page.fill("#message", "hello from the page");
  await page.click("#publish");
  await waitForText("hello from the page");
  assert.equal(await page.inputValue("#message"), "", "the message box is cleared");
  const li = page.locator("#events li.event").last();
  assert.equal(await li.locator(".from").textContent(), "ada");
  assert.equal(await li.locator(".category").textContent(), "chat");
  const raw = JSON.parse((await page.textContent("#raw")).split("\n")[0]);
  assert.equal(raw.category, "chat");
  assert.deepEqual(raw.data, { from: "ada", text: "hello from the page" });
  assert.match(raw.id, /^[0-9a-f-]{36}$/);
  // it went through the server: a plain subscriber sees the same event
  const got = await http("/events?category=chat&timeout=1&since_time=0");
  assert.equal(got.body.events.at(-1).id, raw.id);
  // Enter in the message box publishes too
  await page.fill("#message", "sent with Enter");
  await page.press("#message", "Enter");
  await waitForText("sent with Enter");
  assert.equal(await page.textContent("#count"), "2");
});

test("an event published over HTTP from outside arrives in the page", { skip, timeout: 30000 }, async () => {
  await publish("chat", { from: "curl", text: "hello from outside" });
  await waitForText("hello from outside");
  await publish("chat", 12345678901234567890n.toString()); // any JSON value: shown as text
  await waitForText("12345678901234567890");
  assert.deepEqual(await shownTexts(), ["hello from the page", "sent with Enter", "hello from outside",
    "12345678901234567890"]);
});

test("watching other categories: one subscription for several, history first", { skip, timeout: 30000 }, async () => {
  await publish("news", { text: "published before watching" });
  await page.fill("#categories", "news, alerts");
  await page.click("#watch");
  await waitForText("published before watching");
  assert.match(await page.textContent("#status"), /watching news, alerts/);
  assert.equal(await page.inputValue("#publish-category"), "news");
  await publish("alerts", "disk almost full");
  await publish("chat", "not watched any more");
  await publish("news", { from: "desk", text: "last one" });
  await waitForText("last one");
  assert.deepEqual(await shownTexts(), ["published before watching", "disk almost full", "last one"]);
  const categories = await page.$$eval("#events li.event .category", (els) => els.map((e) => e.textContent));
  assert.deepEqual(categories, ["news", "alerts", "news"]);
  // markup in a message is shown as text, never run
  await publish("alerts", "<img src=x onerror=\"window.pwned=1\">");
  await waitForText("<img src=x onerror=\"window.pwned=1\">");
  assert.equal(await page.evaluate(() => window.pwned), undefined);
  assert.equal(await page.locator("#events img").count(), 0);
});

test("screenshot: a non-trivial page with the expected parts visible", { skip, timeout: 30000 }, async () => {
  mkdirSync(SHOTS, { recursive: true });
  const shot = join(SHOTS, "demo.png");
  await page.screenshot({ path: shot });
  const blank = await browser.newPage({ viewport: { width: 1280, height: 800 } });
  const blankShot = join(SHOTS, "blank.png");
  await blank.setContent("<html><body></body></html>");
  await blank.screenshot({ path: blankShot });
  await blank.close();

  const size = statSync(shot).size;
  assert.deepEqual(pngSize(readFileSync(shot)), { width: 1280, height: 800 });
  assert.ok(size > 30 * 1024, `screenshot is ${size} bytes, expected more than 30 KB`);
  assert.ok(size > 10 * statSync(blankShot).size, "screenshot carries far more than a blank page");
  // the parts a newcomer needs are on screen, with the expected text
  for (const [selector, text] of [["h1", /^longpoll demo$/], ["#status", /watching news, alerts/],
    ["#publish", /^Publish$/], ["#watch", /^Watch$/], ["#events", /disk almost full/],
    ["#raw", /"category":"alerts"/], ["#curl", /\/publish/], ["#count", /^4$/]]) {
    const el = page.locator(selector);
    assert.ok(await el.isVisible(), `${selector} is visible`);
    assert.match(await el.textContent(), text, selector);
    const box = await el.boundingBox();
    assert.ok(box && box.width > 10 && box.height > 10 && box.y < 800, `${selector} is on screen: ${JSON.stringify(box)}`);
  }
  assert.deepEqual(problems, [], "no console errors or page errors");
});

test("examples/chatbot.lua: the page talks with the Lua-client bot", { skip, timeout: 30000 }, async () => {
  const bot = await serve(["examples/chatbot.lua"]);
  const chat = await browser.newPage();
  try {
    const errors = [];
    chat.on("pageerror", (e) => errors.push(e.message));
    await chat.goto(`http://127.0.0.1:${bot.port}/`, { timeout: 10000 });
    await chat.fill("#send-input", "I would like a taco");
    await chat.press("#send-input", "Enter");
    await chat.waitForSelector("p.msg.bot", { timeout: 5000 });
    const texts = await chat.$$eval("p.msg", (ps) => ps.map((p) => [p.className, p.textContent]));
    assert.deepEqual(texts, [["msg me", "I would like a taco"], ["msg bot", "I. LOVE. TACOS!!!"]]);
    assert.deepEqual(errors, []);
  } finally {
    await chat.close();
    await stop(bot);
  }
});

test("examples/microchat.lua: two people in a room, history on arrival, other rooms apart", { skip, timeout: 30000 },
  async () => {
    const chat = await serve(["examples/microchat.lua"]);
    const url = `http://127.0.0.1:${chat.port}/`;
    const ada = await browser.newPage();
    const bob = await browser.newPage();
    try {
      await ada.goto(url + "?room=humor", { timeout: 10000 });
      assert.equal(await ada.textContent("#room"), "humor");
      await ada.fill("#display-name", "ada");
      await ada.fill("#chat-input", "knock knock");
      await ada.click("#chat-send");
      await ada.waitForFunction(() => document.querySelectorAll("#chats li").length === 1, null, { timeout: 5000 });
      await bob.goto(url + "?room=humor", { timeout: 10000 }); // arrives later: sees the history
      await bob.waitForFunction(() => document.querySelectorAll("#chats li").length === 1, null, { timeout: 5000 });
      await bob.fill("#display-name", "bob");
      await bob.fill("#chat-input", "who's there?");
      await bob.press("#chat-input", "Enter");
      for (const p of [ada, bob]) {
        await p.waitForFunction(() => document.querySelectorAll("#chats li").length === 2, null, { timeout: 5000 });
        const lines = await p.$$eval("#chats li", (lis) => lis.map((li) => li.querySelector(".name").textContent +
          " " + li.lastChild.textContent));
        assert.deepEqual(lines, ["ada: knock knock", "bob: who's there?"]);
      }
      await bob.goto(url + "?room=news", { timeout: 10000 });
      await bob.waitForTimeout(300);
      assert.equal(await bob.locator("#chats li").count(), 0);
      // past the page's maxlength, the server's wrapper refuses it, and the page says so
      await bob.evaluate(() => { document.getElementById("chat-input").removeAttribute("maxlength"); });
      await bob.fill("#chat-input", "x".repeat(600));
      await bob.click("#chat-send");
      await bob.waitForSelector("#error:not([hidden])", { timeout: 5000 });
      assert.match(await bob.textContent("#error"), /^HTTP response code: 400/);
    } finally {
      await ada.close();
      await bob.close();
      await stop(chat);
    }
  });
