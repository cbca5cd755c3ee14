// ticketlock's live page: reads what is new from the service every quarter second, draws one lane per worker
// and one bar per sale, keeps the tally a checker would give, and drives the demo (mode, reset, buyers).
//
// Every value from the service reaches the page through textContent or an attribute, never innerHTML: buyer
// names are whatever clients sent. The page is served with a Content-Security-Policy that runs only this
// script and this page's stylesheet, so positions are set through attributes and the CSSOM, never inline.
"use strict";

const POLL_MS = 250; // how often the page asks what is new: it stays within half a second of the store
const FEED_LIMIT = 1000; // orders per GET /orders?after=<cursor>
const FEED_PAGES_PER_POLL = 10; // a long backlog is drawn over a few polls instead of freezing the page
const MAX_BARS = 10000; // past this the tally keeps counting every order, but no more bars are drawn
const REQUEST_TIMEOUT_MS = 30000;
const MAX_BUYERS = 1000;
const TOKEN_KEY = "ticketlock-admin-token"; // sessionStorage: kept for this tab only, gone when it closes
const SVG = "http://www.w3.org/2000/svg";
const COLOURS = 8; // style.css defines .same-read-0 ... .same-read-7

// The timeline's geometry, in the SVG's own units (the drawing scales to the width of the page).
const WIDTH = 800;
const LEFT = 130; // the lane labels
const PLOT = WIDTH - LEFT - 16;
const TOP = 46; // room for the "3× read 7" marks
const LANE = 38;
const BAR = 28;
const FIRST_SPAN_MS = 250; // the time axis starts this long and doubles when sales go past its end

const page = {
  cursor: "", // where the next GET /orders?after= starts
  generation: 0, // bumped by this page's own reset: answers to requests sent before it are dropped
  modes: [], // GET /modes
  shownMode: null,
  shownWindow: null,
  total: null,
  remaining: null,
  run: null, // everything drawn since the store was last reset
  adminActionWaiting: null, // what to do again once the admin token is given
};

const $ = (id) => document.getElementById(id);

// --- Talking to the service ------------------------------------------------------------------------------------

// One request; resolves to {status, body} (body: the parsed JSON or null). Rejects only when no answer came.
async function callService(method, path, { body, admin = false, priority = "auto" } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const token = admin ? sessionStorage.getItem(TOKEN_KEY) : null;
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
    priority,
    signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
  });
  const text = await response.text();
  let parsed = null;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = null;
  }
  return { status: response.status, body: parsed };
}

// The service's own words for a failed request: every error it sends is {"error", "message"}.
function describeFailure(answer) {
  if (answer.body && typeof answer.body.message === "string") {
    return `${answer.status} ${answer.body.error}: ${answer.body.message}`;
  }
  return `the service answered ${answer.status}`;
}

// PUT /mode and POST /reset: they need the admin token when the service has one. A 401 asks for it, once, and
// ``again`` (the whole action) runs when it is given.
async function callAsAdmin(method, path, body, whatItDoes, again) {
  let answer;
  try {
    answer = await callService(method, path, { body, admin: true, priority: "high" });
  } catch (error) {
    showMessage(`Could not ${whatItDoes}: no answer from the service (${error.message}).`, "problem");
    return null;
  }
  if (answer.status === 401) {
    const hadToken = sessionStorage.getItem(TOKEN_KEY) !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    askForToken(
      hadToken
        ? `The admin token was refused (401), so the page could not ${whatItDoes}. Type it again.`
        : `This service needs its admin token to ${whatItDoes} (401). Type it once; this tab keeps it until it closes.`,
      again,
    );
    showMessage(`Not allowed: ${describeFailure(answer)}`, "problem");
    return null;
  }
  if (answer.status !== 200) {
    showMessage(`Could not ${whatItDoes}: ${describeFailure(answer)}`, "problem");
    return null;
  }
  return answer.body;
}

function askForToken(why, retry) {
  page.adminActionWaiting = retry;
  $("token-why").textContent = why;
  $("token-form").hidden = false;
  $("token-input").value = "";
  $("token-input").focus();
}

function useToken() {
  const token = $("token-input").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  $("token-form").hidden = true;
  const retry = page.adminActionWaiting;
  page.adminActionWaiting = null;
  if (retry) retry();
}

// --- Following the store ---------------------------------------------------------------------------------------

// One poll: the orders recorded since the cursor, then the count. In that order on purpose: a sale writes the
// count before it records its order, so a count read after the orders already includes every one of them, and a
// locked run never shows a lost update that is not there.
async function pollOnce() {
  const generation = page.generation;
  for (let pages = 0; pages < FEED_PAGES_PER_POLL; pages += 1) {
    const path = `/orders?after=${encodeURIComponent(page.cursor)}&limit=${FEED_LIMIT}`;
    const answer = await callService("GET", path, { priority: "high" });
    if (answer.status !== 200) throw new Error(describeFailure(answer));
    if (generation !== page.generation) return;
    if (answer.body.reset) startNewRun();
    page.cursor = answer.body.cursor;
    drawOrders(answer.body.orders);
    if (answer.body.orders.length < FEED_LIMIT) break;
  }
  const answer = await callService("GET", "/tickets", { priority: "high" });
  if (answer.status !== 200) throw new Error(describeFailure(answer));
  if (generation !== page.generation) return;
  showTickets(answer.body);
  if (fences(answer.body.mode)) await pollRefusals(generation);
  showTally();
}

// A mode whose store refuses stale lease holders (fenced-lease): the writes it refused since the reset, each
// drawn once, as a grey bar from its read to its refusal.
async function pollRefusals(generation) {
  const answer = await callService("GET", "/refusals", { priority: "high" });
  if (answer.status !== 200) throw new Error(describeFailure(answer));
  if (generation !== page.generation) return;
  const fresh = answer.body.refusals.slice(page.run.refusalsDrawn).map(refusalToBar).filter(Boolean);
  page.run.refusalsDrawn = answer.body.refusals.length;
  drawBars(fresh);
}

function fences(name) {
  const mode = page.modes.find((candidate) => candidate.name === name);
  return Boolean(mode && mode.lapse && mode.lapse.holds);
}

// Short requests one after another, never one held open: a gunicorn sync worker serves one request at a time,
// and a page must not keep one of them busy.
async function followTheStore() {
  for (;;) {
    const started = performance.now();
    try {
      if (page.modes.length === 0) await loadModes();
      await pollOnce();
      showConnection(null);
    } catch (error) {
      showConnection(`Lost contact with the service (${error.message}); trying again.`);
    }
    await sleep(Math.max(50, POLL_MS - (performance.now() - started)));
  }
}

async function loadModes() {
  const answer = await callService("GET", "/modes", { priority: "high" });
  if (answer.status !== 200) throw new Error(describeFailure(answer));
  page.modes = answer.body.modes.filter((mode) => mode.available);
  const select = $("mode-select");
  select.replaceChildren(
    ...page.modes.map((mode) => {
      const option = document.createElement("option");
      option.value = mode.name;
      option.textContent = `${mode.name} (protects ${mode.protects})`;
      return option;
    }),
  );
  page.shownMode = null; // show the current one again
}

function sleep(milliseconds) {
  return new Promise((resolve) => setTimeout(resolve, milliseconds));
}

// --- The header and the controls -------------------------------------------------------------------------------

function showTickets(tickets) {
  $("event").textContent = tickets.event;
  $("remaining").textContent = formatted(tickets.remaining);
  $("total").textContent = formatted(tickets.total);
  $("store").textContent = tickets.store;
  page.total = tickets.total;
  page.remaining = tickets.remaining;
  if (tickets.mode !== page.shownMode) showMode(tickets.mode);
  $("mode").className = isSafe(tickets.mode) ? "safe" : "unsafe"; // a second host can make a safe mode unsafe
  if (tickets.race_window_ms !== page.shownWindow) {
    page.shownWindow = tickets.race_window_ms;
    $("race-window").textContent = tickets.race_window_ms;
    if (document.activeElement !== $("window-input")) $("window-input").value = tickets.race_window_ms;
  }
}

function showMode(name) {
  page.shownMode = name;
  $("mode").textContent = name;
  $("mode").className = isSafe(name) ? "safe" : "unsafe";
  const mode = page.modes.find((candidate) => candidate.name === name);
  $("lesson").textContent = mode ? `${name}: ${mode.lesson}.` : "";
  const select = $("mode-select");
  if (mode && document.activeElement !== select) select.value = name;
  if (!mode && page.modes.length > 0) page.modes = []; // a mode this page has not heard of: ask again
}

// A mode is safe here when what it protects covers what sells: the workers of one host, or every host once sales
// come from several (the reasoning of Mode.holds_for in service/modes.py).
const REACH = ["nothing", "one process", "one host", "every host"];

function isSafe(name) {
  const mode = page.modes.find((candidate) => candidate.name === name);
  const needed = page.run.hosts.size > 1 ? "every host" : "one host";
  return Boolean(mode) && REACH.indexOf(mode.protects) >= REACH.indexOf(needed);
}

async function switchMode(name) {
  const settings = await callAsAdmin("PUT", "/mode", { mode: name }, `switch to ${name}`, () => switchMode(name));
  if (settings) {
    showMode(settings.mode);
    showMessage(`Mode is now ${settings.mode}.`);
  } else {
    $("mode-select").value = page.shownMode;
  }
}

async function setRaceWindow(milliseconds) {
  const settings = await callAsAdmin(
    "PUT",
    "/mode",
    { race_window_ms: milliseconds },
    `set the race window to ${milliseconds} ms`,
    () => setRaceWindow(milliseconds),
  );
  if (settings) {
    page.shownWindow = settings.race_window_ms;
    $("race-window").textContent = settings.race_window_ms;
    showMessage(`Race window is now ${settings.race_window_ms} ms.`);
  }
}

async function resetTheStore(tickets) {
  const fresh = await callAsAdmin("POST", "/reset", { tickets }, `reset to ${tickets} tickets`, () =>
    resetTheStore(tickets),
  );
  if (fresh) {
    page.generation += 1;
    page.cursor = "";
    startNewRun();
    showTickets(fresh);
    showTally();
    showMessage(`Reset: ${formatted(fresh.total)} tickets for sale, every order cleared.`);
  }
}

// 1,000,000,000 rather than 1000000000: readable from the back of the room.
function formatted(number) {
  return Number(number).toLocaleString("en-US");
}

function showMessage(text, kind = "info") {
  $("message").textContent = text;
  $("message").className = kind;
}

function showConnection(problem) {
  $("connection").hidden = problem === null;
  $("connection").textContent = problem || "";
}

// --- Releasing buyers from the page ----------------------------------------------------------------------------

// N purchases at once. The browser sends at most six at a time to one site and queues the rest, so afterwards
// the page measures how many really were at the server together (Resource Timing: from sending the request to
// the end of its answer).
async function releaseBuyers(buyers) {
  if (!(buyers >= 1 && buyers <= MAX_BUYERS)) {
    showMessage(`Release 1 to ${MAX_BUYERS} buyers.`, "problem");
    return;
  }
  $("release-button").disabled = true;
  $("release-result").textContent = `${buyers} buyers released…`;
  performance.clearResourceTimings();
  performance.setResourceTimingBufferSize(buyers + 1000);
  const releasedAt = performance.now();
  const answers = await Promise.all(Array.from({ length: buyers }, (_, index) => buyOne(`page buyer ${index + 1}`)));
  const told = {
    yes: answers.filter((answer) => answer === 201).length,
    soldOut: answers.filter((answer) => answer === 409).length,
  };
  told.other = buyers - told.yes - told.soldOut;
  showRelease(buyers, told, mostAtTheServerTogether(releasedAt));
  $("release-button").disabled = false;
}

// One buyer: the HTTP status it was told, or 0 when no answer came.
async function buyOne(buyer) {
  try {
    const answer = await callService("POST", "/orders", { body: { buyer }, priority: "low" });
    return answer.status;
  } catch {
    return 0;
  }
}

function mostAtTheServerTogether(since) {
  const purchases = performance
    .getEntriesByType("resource")
    .filter((entry) => entry.startTime >= since && new URL(entry.name).pathname === "/orders")
    .filter((entry) => new URL(entry.name).search === ""); // the feed's GETs carry ?after=
  const changes = [];
  for (const entry of purchases) {
    changes.push([entry.requestStart || entry.startTime, 1], [entry.responseEnd, -1]);
  }
  changes.sort((first, second) => first[0] - second[0] || first[1] - second[1]);
  let now = 0;
  let most = 0;
  for (const [, change] of changes) {
    now += change;
    most = Math.max(most, now);
  }
  return most;
}

function showRelease(buyers, told, together) {
  $("told-yes").textContent = `${told.yes} of ${buyers}`;
  $("told-sold-out").textContent = told.soldOut;
  $("told-other").textContent = told.other;
  $("in-flight").textContent = together || "–";
  const oversold = page.total === null ? 0 : Math.max(0, told.yes - page.total);
  $("release-result").textContent =
    `${buyers} buyers released: ${told.yes} told yes, ${told.soldOut} told sold out, ${told.other} other; ` +
    `at most ${together} were at the server together.` +
    (oversold > 0 ? ` ${oversold} more buyers were told yes than there were tickets.` : "");
}

// --- The timeline: one SVG, drawn incrementally ----------------------------------------------------------------

function newRun() {
  return {
    origin: null, // epoch seconds at the left edge
    spanMs: FIRST_SPAN_MS,
    lanes: new Map(), // "host worker_pid" -> {host, pid, y, label, bars}
    hosts: new Set(),
    bars: [],
    sameRead: new Map(), // count read -> {count, bars, colour, line, label}
    sharedCounts: 0, // counts read by more than one sale
    overlapSeen: false, // whether two workers' bars ever overlapped
    orders: 0,
    ticketsInOrders: 0,
    latest: [],
    notDrawn: 0,
    outlived: 0, // sales that wrote after their lease ran out
    refused: 0, // stale writes the store refused
    refusalsDrawn: 0, // of GET /refusals, since the reset
  };
}

// The store was reset (by this page, by the load tester, by anyone): clear the lanes and start over.
function startNewRun() {
  page.run = newRun();
  const timeline = $("timeline");
  const lanes = document.createElementNS(SVG, "g");
  lanes.id = "lanes";
  const marks = document.createElementNS(SVG, "g");
  marks.id = "marks";
  const axis = document.createElementNS(SVG, "g");
  axis.id = "axis";
  timeline.replaceChildren(lanes, marks, axis);
  resizeTimeline();
  showLegend();
  showLatest();
}

function svgElement(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (parent) parent.appendChild(element);
  return element;
}

function orderToBar(order) {
  const timing = order.timing || {};
  // A sale that wrote after its lease ran out, while another worker may have held the lease.
  const outlived = timing.lease_until != null && Number(timing.wrote_at) > Number(timing.lease_until);
  return saleBar(order, timing, timing.wrote_at, { outlived });
}

// A stale write the store refused: a newer lease token had claimed the count since its read.
function refusalToBar(refusal) {
  return saleBar(refusal, refusal, refusal.refused_at, { refused: true, newest: Number(refusal.newest) });
}

// A bar from what the store recorded of a sale: who, which worker, the count it read, and when; null if unusable.
function saleBar(record, timing, wroteAt, marks) {
  const quantity = Number(record.quantity ?? 1);
  const bar = {
    buyer: String(record.buyer),
    pid: Number(record.worker_pid),
    host: String(record.host ?? ""),
    quantity,
    countRead: Number(record.remaining) + quantity,
    startedAt: Number(timing.started_at),
    readAt: Number(timing.read_at),
    wroteAt: Number(wroteAt),
    outlived: false,
    refused: false,
    ...marks,
  };
  const usable = [bar.pid, bar.countRead, bar.startedAt, bar.readAt, bar.wroteAt].every(Number.isFinite);
  return usable ? bar : null;
}

// New orders from the feed: counted in the tally, each drawn as a bar in its worker's lane.
function drawOrders(orders) {
  if (orders.length === 0) return;
  const run = page.run;
  const fresh = [];
  for (const order of orders) {
    run.orders += 1;
    run.ticketsInOrders += Number(order.quantity ?? 1);
    const bar = orderToBar(order);
    if (bar === null) continue;
    run.latest.push(bar);
    fresh.push(bar);
  }
  if (run.latest.length > 6) run.latest.splice(0, run.latest.length - 6);
  showLatest();
  drawBars(fresh);
}

// Bars in their workers' lanes (at most MAX_BARS in a run), and what they show in the legend.
function drawBars(bars) {
  const run = page.run;
  const fresh = bars.slice(0, Math.max(0, MAX_BARS - run.bars.length));
  run.notDrawn += bars.length - fresh.length;
  if (fresh.length === 0) return;
  if (fitTimeAxis(fresh)) placeEveryBar();
  const pieces = new Map(); // lane -> DocumentFragment: one append per lane per poll
  for (const bar of fresh) {
    const lane = laneFor(bar);
    if (!pieces.has(lane)) pieces.set(lane, document.createDocumentFragment());
    drawBar(bar, lane, pieces.get(lane));
    bar.lane = lane;
    run.bars.push(bar);
  }
  for (const [lane, piece] of pieces) lane.bars.appendChild(piece);
  for (const bar of fresh) if (!bar.refused) markSameRead(bar);
  tidyMarkLabels();
  if (!run.overlapSeen) run.overlapSeen = barsOverlap(run.bars);
  showLegend();
}

// Whether two sales of different workers were between their read and their write at the same moment (the same
// test as loadtest/timeline.py's overlapping_pairs). Sorted by read, a bar can only overlap the ones that read
// before it wrote, so the scan stops early; once an overlap is seen it is not looked for again until a reset.
function barsOverlap(bars) {
  const sorted = bars.slice().sort((first, second) => first.readAt - second.readAt);
  for (let index = 0; index < sorted.length; index += 1) {
    const first = sorted[index];
    for (let later = index + 1; later < sorted.length && sorted[later].readAt <= first.wroteAt; later += 1) {
      if (sorted[later].lane !== first.lane) return true;
    }
  }
  return false;
}

// Widen the time axis (doubling it) or move its start so that every bar fits; true when it changed.
function fitTimeAxis(bars) {
  const run = page.run;
  const earliest = Math.min(...bars.map((bar) => bar.startedAt));
  const latest = Math.max(...bars.map((bar) => bar.wroteAt));
  let changed = false;
  if (run.origin === null || earliest < run.origin) {
    run.origin = earliest;
    changed = true;
  }
  while ((latest - run.origin) * 1000 > run.spanMs) {
    run.spanMs *= 2;
    changed = true;
  }
  if (changed) drawAxis();
  return changed;
}

function x(moment) {
  const run = page.run;
  return LEFT + (((moment - run.origin) * 1000) / run.spanMs) * PLOT;
}

function laneFor(bar) {
  const run = page.run;
  const key = `${bar.host} ${bar.pid}`;
  let lane = run.lanes.get(key);
  if (lane) return lane;
  lane = drawLane(bar.host, bar.pid, run.lanes.size);
  run.lanes.set(key, lane);
  if (!run.hosts.has(bar.host)) {
    run.hosts.add(bar.host);
    if (run.hosts.size > 1) for (const each of run.lanes.values()) nameLane(each);
  }
  resizeTimeline();
  return lane;
}

// A worker's lane: its name on the left, a faint line, and a group its bars go into.
function drawLane(host, pid, index) {
  const y = TOP + index * LANE;
  const group = svgElement("g", { class: "lane", "data-host": host, "data-worker-pid": pid }, $("lanes"));
  svgElement("line", { class: "lane-line", x1: LEFT, x2: LEFT + PLOT, y1: y + LANE / 2, y2: y + LANE / 2 }, group);
  const label = svgElement("text", { class: "lane-label", x: 8, y: y + LANE / 2 + 6 }, group);
  const bars = svgElement("g", { class: "bars" }, group);
  const lane = { host, pid, y, label, bars };
  nameLane(lane);
  return lane;
}

// "worker 1234", or "host-b · 1234" once sales come from several hosts (a long host name is cut to fit).
function nameLane(lane) {
  const host = lane.host.length > 9 ? `${lane.host.slice(0, 8)}…` : lane.host;
  lane.label.textContent = page.run.hosts.size > 1 ? `${host} · ${lane.pid}` : `worker ${lane.pid}`;
}

// One sale: a dotted wait from its start to its read, then a bar from its read to its write, labelled with the
// count it read, and the buyer's name as its tooltip.
function drawBar(bar, lane, parent) {
  const middle = lane.y + LANE / 2;
  bar.wait = svgElement("line", { class: "wait", y1: middle, y2: middle }, parent);
  const kind = bar.refused ? "bar refused" : bar.outlived ? "bar outlived" : "bar";
  bar.rect = svgElement(
    "rect",
    { class: kind, y: middle - BAR / 2, height: BAR, rx: 3, "data-read": bar.countRead },
    parent,
  );
  const tooltip = svgElement("title", {}, bar.rect);
  const what = bar.refused
    ? `its write was refused: token ${bar.newest} had claimed the count since`
    : `wrote ${bar.countRead - bar.quantity}` + (bar.outlived ? ", after its lease ran out" : "");
  tooltip.textContent =
    `${bar.buyer}: read ${bar.countRead}, ${what} ` +
    `(worker ${bar.pid}, ${((bar.wroteAt - bar.readAt) * 1000).toFixed(1)} ms)`;
  if (bar.outlived) page.run.outlived += 1;
  if (bar.refused) page.run.refused += 1;
  placeBar(bar);
}

function placeBar(bar) {
  const begin = x(bar.readAt);
  const end = Math.max(x(bar.wroteAt), begin + 2);
  bar.wait.setAttribute("x1", x(bar.startedAt).toFixed(2));
  bar.wait.setAttribute("x2", begin.toFixed(2));
  bar.rect.setAttribute("x", begin.toFixed(2));
  bar.rect.setAttribute("width", (end - begin).toFixed(2));
  bar.rect.classList.toggle("narrow", end - begin < 8); // an outline would hide a thin bar's colour
  const label = String(bar.countRead);
  const fits = end - begin >= 12 + 10 * label.length;
  if (fits && !bar.label) {
    bar.label = svgElement("text", { class: "bar-label", y: Number(bar.rect.getAttribute("y")) + BAR / 2 + 6 });
    bar.label.textContent = label;
    bar.rect.after(bar.label);
  }
  if (bar.label && !fits) {
    bar.label.remove();
    bar.label = null;
  }
  if (bar.label) bar.label.setAttribute("x", ((begin + end) / 2).toFixed(2));
}

// The axis moved: every bar and mark to its new place (rare: the axis only doubles).
function placeEveryBar() {
  for (const bar of page.run.bars) placeBar(bar);
  for (const group of page.run.sameRead.values()) if (group.line) placeMark(group);
  tidyMarkLabels();
}

// Sales that read the same count share a colour and a dashed line: each of them wrote count - 1.
function markSameRead(bar) {
  const run = page.run;
  let group = run.sameRead.get(bar.countRead);
  if (!group) {
    group = { count: bar.countRead, bars: [], colour: null, line: null, label: null };
    run.sameRead.set(bar.countRead, group);
  }
  group.bars.push(bar);
  if (group.bars.length < 2) return;
  if (group.colour === null) {
    group.colour = run.sharedCounts % COLOURS;
    run.sharedCounts += 1;
    group.line = svgElement("line", { class: `same-read-mark same-read-${group.colour}` }, $("marks"));
    group.label = svgElement("text", { class: `same-read-label same-read-${group.colour}` }, $("marks"));
    for (const earlier of group.bars) colourBar(earlier, group);
  } else {
    colourBar(bar, group);
  }
  group.label.textContent = `${group.bars.length}× read ${group.count}`;
  placeMark(group);
}

function colourBar(bar, group) {
  bar.rect.classList.add("same-read", `same-read-${group.colour}`);
}

function placeMark(group) {
  group.x = x(Math.min(...group.bars.map((bar) => bar.readAt)));
  group.line.setAttribute("x1", group.x.toFixed(2));
  group.line.setAttribute("x2", group.x.toFixed(2));
  group.line.setAttribute("y1", TOP - 4);
  group.line.setAttribute("y2", TOP + page.run.lanes.size * LANE);
  group.label.setAttribute("x", (group.x + 3).toFixed(2));
}

// The marks' labels go in two rows above the lanes; one that would cover a label already there is left out (its
// colour and its dashed line still show the shared read).
function tidyMarkLabels() {
  const rowEnds = [-Infinity, -Infinity];
  const groups = [...page.run.sameRead.values()].filter((group) => group.label);
  groups.sort((first, second) => first.x - second.x);
  for (const group of groups) {
    const row = rowEnds.findIndex((end) => group.x >= end);
    if (row === -1) {
      group.label.setAttribute("display", "none");
      continue;
    }
    group.label.removeAttribute("display");
    group.label.setAttribute("y", TOP - 26 + row * 16);
    rowEnds[row] = group.x + 9 * group.label.textContent.length + 8; // 14-unit bold digits are about 9 wide
  }
}

function drawAxis() {
  const run = page.run;
  const axis = $("axis");
  axis.replaceChildren();
  const y = TOP + Math.max(run.lanes.size, 1) * LANE + 6;
  svgElement("line", { class: "axis-line", x1: LEFT, x2: LEFT + PLOT, y1: y, y2: y }, axis);
  for (let quarter = 0; quarter <= 4; quarter += 1) {
    const at = LEFT + (PLOT * quarter) / 4;
    svgElement("line", { class: "axis-line", x1: at, x2: at, y1: y, y2: y + 6 }, axis);
    const label = svgElement("text", { class: "axis-label", x: at, y: y + 26 }, axis);
    label.textContent = `${Math.round((run.spanMs * quarter) / 4)} ms`;
    if (quarter === 0) label.classList.add("first");
    if (quarter === 4) label.classList.add("last");
  }
}

// The drawing grows a lane at a time; the marks reach down to the last lane.
function resizeTimeline() {
  const run = page.run;
  const height = TOP + Math.max(run.lanes.size, 1) * LANE + 40;
  $("timeline").setAttribute("viewBox", `0 0 ${WIDTH} ${height}`);
  drawAxis();
  for (const group of run.sameRead.values()) if (group.line) placeMark(group);
}

function showLegend() {
  const run = page.run;
  let text;
  if (run.bars.length === 0) {
    text = "No sales yet: release the buyers.";
  } else if (run.sharedCounts > 0) {
    text =
      `${run.sharedCounts} ${run.sharedCounts === 1 ? "count was" : "counts were"} read by several sales at once ` +
      "(same colour, dashed line): each wrote count − 1, so one ticket went to several buyers.";
  } else if (run.overlapSeen) {
    text = "Sales overlapped, yet each decremented a different count: the store checked every write.";
  } else {
    text = "No two sales overlapped: each one read the count the previous one wrote.";
  }
  if (run.outlived > 0) text += ` Red outline: ${run.outlived} sold after their lease ran out.`;
  if (run.refused > 0) text += ` Grey: ${run.refused} stale writes the store refused, for a newer token.`;
  if (run.notDrawn > 0) text += ` Only the first ${MAX_BARS} sales are drawn; the tally counts all of them.`;
  $("legend").textContent = text;
  $("legend").className = run.sharedCounts > 0 ? "unsafe" : "";
}

function showLatest() {
  const items = page.run.latest
    .slice()
    .reverse()
    .map((bar) => {
      const item = document.createElement("li");
      const buyer = document.createElement("span");
      buyer.className = "buyer";
      buyer.textContent = bar.buyer;
      item.append(buyer, ` read ${bar.countRead} → ${bar.countRead - bar.quantity}, worker ${bar.pid}`);
      return item;
    });
  $("latest").replaceChildren(...items);
}

// --- The tally, as the checker defines it, from the store's side -----------------------------------------------

function showTally() {
  const run = page.run;
  if (page.total === null) return;
  const soldByCount = page.total - page.remaining;
  const oversold = Math.max(0, run.ticketsInOrders - page.total);
  const lostUpdates = Math.max(0, run.ticketsInOrders - soldByCount);
  $("tally-tickets").textContent = formatted(page.total);
  $("tally-sold").textContent = formatted(soldByCount);
  $("tally-orders").textContent = formatted(run.orders);
  $("tally-recorded-tickets").textContent = formatted(run.ticketsInOrders);
  showFigure($("tally-oversold"), oversold);
  showFigure($("tally-lost"), lostUpdates);
  let verdict;
  if (oversold > 0) verdict = `OVERSOLD by ${oversold}: more tickets sold than exist.`;
  else if (lostUpdates > 0) verdict = `${lostUpdates} lost updates: sales the count does not show.`;
  else if (run.orders > 0) verdict = "Correct so far: every sale is in the count, nothing oversold.";
  else verdict = "";
  $("verdict").textContent = verdict;
  $("verdict").className = oversold > 0 || lostUpdates > 0 ? "unsafe" : "safe";
}

function showFigure(cell, value) {
  cell.textContent = formatted(value);
  cell.className = value > 0 ? "unsafe" : "safe";
}

// The forms never submit (the page's policy forbids it, form-action 'none'): their button or Enter runs an action.
function onSubmit(formId, action) {
  $(formId).addEventListener("submit", (event) => {
    event.preventDefault();
    action();
  });
}

function numberIn(inputId) {
  return Number.parseInt($(inputId).value, 10);
}

// --- Start -----------------------------------------------------------------------------------------------------

function start() {
  startNewRun();
  $("mode-select").addEventListener("change", () => switchMode($("mode-select").value));
  onSubmit("mode-form", () => {});
  onSubmit("window-form", () => setRaceWindow(numberIn("window-input")));
  onSubmit("reset-form", () => resetTheStore(numberIn("tickets-input")));
  onSubmit("release-form", () => releaseBuyers(numberIn("buyers-input")));
  onSubmit("token-form", useToken);
  followTheStore();
}

start();
