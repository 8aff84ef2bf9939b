// Browser test of the playground: Debian's chromium, headless, driven by playwright-core,
// against the real server on the default model. Asks a question with adaptation on, waits for
// the answer, and checks that the tree, the vote chart and the step metrics show the values
// the API returned, and that server errors are shown. Then a real 16-leaf adaptation for the
// desktop and phone screenshots. Prints "N passed, M failed".
//
//   TTRL_BIN=.../ttrl-serve NODE_PATH=.../node_modules node tests/browser/playground.mjs
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const { chromium } = require("playwright-core");
const artifacts = process.env.TTRL_ARTIFACTS || "test-artifacts";
mkdirSync(artifacts, { recursive: true });

const port = await new Promise((resolve) => {
  const s = createServer().listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => resolve(p)); });
});
const work = mkdtempSync(join(tmpdir(), "ttrl-browser-"));
// A budget above SmolLM2's usual answer length: a leaf cut off by it abstains from the vote.
writeFileSync(join(work, "config.toml"), "[adaptation]\nmax_tokens = 64\n");
const server = spawn(process.env.TTRL_BIN, ["serve", "--port", String(port), "--config", join(work, "config.toml"), "--data-dir", join(work, "adapters")], { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, RUST_LOG: "warn,tower_http=off" } });
const base = `http://127.0.0.1:${port}`;

let passed = 0, failed = 0;
function check(name, ok, detail = "") {
  if (ok) { passed++; console.log(`ok - ${name}`); } else { failed++; console.log(`FAILED - ${name} ${detail}`); }
}

// Sends what the prompt box holds and waits until the page has shown the answer; returns the
// adaptation report the response's stream carried.
async function send(page) {
  const before = await page.evaluate(() => document.body.dataset.answered);
  const response = page.waitForResponse((r) => r.url().endsWith("/v1/chat/completions"), { timeout: 600000 });
  await page.press("#prompt", "Enter");
  const sse = await (await response).text();
  await page.waitForFunction((b) => document.body.dataset.answered !== b, before, { timeout: 600000 });
  const chunks = sse.split("\n").filter((l) => l.startsWith("data: {")).map((l) => JSON.parse(l.slice(6)));
  return chunks.find((c) => c.adaptation)?.adaptation;
}

let browser;
try {
  for (let i = 0; ; i++) {
    try { if ((await fetch(`${base}/ready`)).ok) break; } catch (_) { /* not up yet */ }
    if (i > 600) throw new Error("server not ready");
    await new Promise((r) => setTimeout(r, 250));
  }
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(e.message));
  await page.goto(base + "/");
  await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0);
  check("the model picker is fed by /v1/models", (await page.locator("#model option").first().textContent()) === "SmolLM2-135M-Instruct");

  await page.check("#adapt");
  await page.fill("#samples", "4");
  await page.fill("#adapter", "browser");
  // Not the defaults: the tree view's fork marks need a tree.
  await page.selectOption("#method", "spine");
  await page.selectOption("#rollout", "tree");
  // Text answers: every finished leaf votes, so the chart is not empty.
  await page.selectOption("#answer_format", "text");
  await page.fill("#prompt", "What is 3 plus 4? Answer with just the number.");
  const report = await send(page);
  check("the API returned an adaptation report", !!report && report.tree.length > 0);

  const leaves = await page.locator("#ep-tree li").count();
  check("the tree shows every leaf", leaves === report.tree.length, `${leaves} vs ${report.tree.length}`);
  const forks = await page.locator("#ep-tree .fork").count();
  check("fork points are marked", forks === report.tree.filter((l) => l.fork_at !== null && l.fork_at < l.tokens.length).length, `${forks}`);
  const cut = await page.locator("#ep-tree li.truncated").count();
  check("leaves cut off by the budget are marked", cut === report.tree.filter((l) => l.truncated).length, `${cut}`);
  const firstTokens = await page.locator("#ep-tree li").first().locator(".tok").allTextContents();
  check("tree tokens are the report's tokens", firstTokens.join("") === report.tree[0].tokens.join(""));

  const bars = await page.locator("#ep-votes rect.vote-bar").evaluateAll((rs) => rs.map((r) => [r.dataset.answer, Number(r.dataset.votes), r.getAttribute("fill")]));
  const votes = report.votes.slice(0, 12);
  check("the vote chart has bars", bars.length > 0);
  check("the vote chart has one bar per answer with its count", JSON.stringify(bars.map((b) => [b[0], b[1]])) === JSON.stringify(votes), JSON.stringify(bars));
  check("the majority answer is highlighted", bars.filter((b) => b[2] === "#1a7f37").every((b) => b[0] === report.majority_answer));

  const steps = await page.locator("#ep-steps tbody tr").evaluateAll((rows) => rows.map((r) => [...r.cells].map((c) => c.textContent)));
  check("one step row per step", steps.length === report.step_metrics.length);
  check("step loss and KL are the API's", steps.every((row, i) => row[1] === report.step_metrics[i].loss.toFixed(4) && row[2] === report.step_metrics[i].kl.toFixed(4)), JSON.stringify(steps));
  const summary = await page.locator("#ep-summary").textContent();
  check("adapter versions before and after are shown", summary.includes(`v${report.adapter_version_before} → v${report.adapter_version}`), summary);
  const answer = await page.locator("#messages li.assistant").last().textContent();
  check("the streamed answer is shown", answer.length > 0, answer);
  await page.waitForFunction(() => document.getElementById("st-episodes").textContent === "1", null, { timeout: 10000 }).catch(() => {});
  check("the status strip counts the episode", (await page.locator("#st-episodes").textContent()) === "1");

  // Errors from the server are shown, not swallowed.
  await page.uncheck("#adapt");
  await page.fill("#temperature", "5");
  await page.fill("#prompt", "hello");
  await page.press("#prompt", "Enter");
  await page.waitForSelector("#error:not([hidden])");
  check("a server error is shown", (await page.locator("#error").textContent()).includes("temperature"));
  check("the refused question is not left in the chat", (await page.locator("#messages li").count()) === 2);

  // A multiple-choice question: the leaves that saw its options reversed say so.
  await page.fill("#temperature", "0.8");
  await page.check("#adapt");
  await page.selectOption("#method", "ttrl");
  await page.selectOption("#rollout", "flat");
  await page.selectOption("#answer_format", "auto");
  await page.fill("#prompt", "Which part of a plant takes in water from the soil?\nA. root\nB. stem\nC. flower\nD. leaf\nAnswer with the letter of the correct option.");
  const choice = await send(page);
  const marked = await page.locator("#ep-tree li.reversed .meta").first().textContent();
  check("leaves that saw the options reversed are marked", (await page.locator("#ep-tree li.reversed").count()) === choice.tree.filter((l) => l.options_reversed).length && choice.tree.filter((l) => l.options_reversed).length === 2 && marked.includes("options reversed"), marked);

  // The pictures in the README: a fresh page and a real adaptation on a question with a
  // checkable answer, 16 leaves, numbers voted on.
  await page.goto(base + "/");
  await page.waitForFunction(() => document.querySelectorAll("#model option").length > 0);
  await page.check("#adapt");
  await page.fill("#samples", "16");
  await page.fill("#adapter", "showcase");
  await page.selectOption("#answer_format", "number");
  await page.fill("#prompt", "What is 7 plus 5? Answer with just the number.");
  const showcase = await send(page);
  check("the showcase tree shows its 16 leaves", (await page.locator("#ep-tree li").count()) === 16 && showcase.tree.length === 16);
  console.log(`showcase: majority ${showcase.majority_answer}, votes ${JSON.stringify(showcase.votes)}, applied ${showcase.applied}`);
  check("no script errors", pageErrors.length === 0, pageErrors.join("; "));
  await page.screenshot({ path: join(artifacts, "playground-desktop.png"), fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: join(artifacts, "playground-phone.png"), fullPage: true });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
  const wide = await page.evaluate(() => [...document.querySelectorAll("body *")]
    .filter((el) => el.getBoundingClientRect().right > window.innerWidth + 1)
    .slice(0, 5).map((el) => `${el.tagName}#${el.id}.${el.className}`));
  check("no horizontal scrolling at phone width", !overflow, wide.join(", "));
} catch (e) {
  check("the browser run completed", false, e.stack || String(e));
} finally {
  if (browser) await browser.close();
  server.kill("SIGTERM");
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
