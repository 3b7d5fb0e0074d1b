// The console page in a real browser: Debian's Chromium, headless, driven by playwright-core.
// It opens the page, connects with a token, sends purchases through the form and sees each ack,
// sees one error code for a bad amount, and sees the user's total become the exact sum; it
// checks labels, keyboard use and phone width, and saves a screenshot.
//
//   node console.test.mjs    (scripts/browser-test.sh sets the environment below)
//
//   CONSOLE_URL   the page, e.g. http://127.0.0.1:18180/
//   TOKEN         a bearer token for USER_ID
//   USER_ID       a user of this run only
//   SCREENSHOT    where to save the screenshot (PNG)
//   CHROMIUM      the browser binary (default /usr/bin/chromium)
import { chromium } from "playwright-core";
import assert from "node:assert/strict";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`${name} is not set`);
  return value;
};
const url = env("CONSOLE_URL");
const token = env("TOKEN");
const user = env("USER_ID");
const screenshot = env("SCREENSHOT");
const WAIT = { timeout: 30_000 };

const browser = await chromium.launch({
  executablePath: env("CHROMIUM", "/usr/bin/chromium"),
  headless: true,
  // Running as root (CI machines) needs the sandbox off.
  args: process.getuid?.() === 0 ? ["--no-sandbox"] : [],
});
let failed = false;
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
  const problems = [];
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console error: ${message.text()}`);
  });
  await page.goto(url);

  // Every field has a label.
  const unlabeled = await page.$$eval("input", (inputs) =>
    inputs.filter((input) => input.labels.length === 0).map((input) => input.id));
  assert.deepEqual(unlabeled, [], "inputs without a label");

  // Connect with the token, by keyboard: type it and press Enter.
  await page.getByLabel("Token").fill(token);
  await page.getByLabel("Token").press("Enter");
  await page.getByText(/^Connected to ws:/).waitFor(WAIT);

  const amounts = ["12.34", "0.01", "7.65"];
  for (const [i, amount] of amounts.entries()) {
    await page.getByLabel("User id").fill(user);
    await page.getByLabel(/^Amount/).fill(amount);
    await page.getByRole("button", { name: "Send" }).click();
    await page.locator("#replies li.ack").nth(i).waitFor(WAIT);
    const text = await page.locator("#replies li.ack").first().textContent();
    assert.ok(text.includes(`${amount} for ${user}`), `ack for ${amount}: ${text}`);
  }
  // A bad amount gets its error code, shown as an error.
  await page.getByLabel(/^Amount/).fill("1.001");
  await page.getByLabel(/^Amount/).press("Enter");
  await page.locator("#replies li.error", { hasText: "invalid_amount" }).waitFor(WAIT);
  assert.equal(await page.locator("#replies li.ack").count(), amounts.length);

  // The total becomes the exact sum, as the server's string.
  await page.getByLabel(/^Users to watch/).fill(user);
  await page.getByRole("button", { name: "Watch" }).click();
  const row = page.locator("#totals tbody tr", { hasText: user });
  await page.waitForFunction(
    ([who]) => [...document.querySelectorAll("#totals tbody tr")].some((tr) =>
      tr.cells[0].textContent === who && tr.cells[1].textContent === "20.00"
      && tr.cells[2].textContent === "3"),
    [user],
    WAIT,
  );
  assert.equal(await row.locator("td").nth(1).textContent(), "20.00");
  await page.screenshot({ path: screenshot, fullPage: true });

  // Readable at phone width: nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(overflow <= 390, `page is ${overflow}px wide at 390px`);

  assert.deepEqual(problems, [], "errors in the page");
  console.log(`browser test passed: 3 acks, invalid_amount shown, total 20.00; screenshot ${screenshot}`);
} catch (error) {
  failed = true;
  console.error(`browser test failed: ${error.stack ?? error}`);
} finally {
  await browser.close();
}
process.exit(failed ? 1 : 0);
