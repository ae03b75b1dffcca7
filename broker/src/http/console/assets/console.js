// ketenbus console: plain JavaScript, no framework, nothing loaded from elsewhere.
// Every URL is relative (the console works behind a path prefix). Data is put into the page
// with textContent only. State-changing calls are POSTs carrying the session's CSRF token.
"use strict";

let csrf = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function $(id) { return document.getElementById(id); }

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = csrf || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch("api/" + path, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401 && document.body.dataset.page === "app") {
    window.location.replace("login");
    throw new Error("session ended");
  }
  const text = await resp.text();
  const data = text ? JSON.parse(text) : null;
  if (!resp.ok) throw new Error((data && data.message) || resp.statusText);
  return data;
}

function when(ms) {
  if (ms === undefined || ms === null) return "";
  return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function age(seconds) {
  if (!seconds) return "0s";
  if (seconds < 120) return Math.round(seconds) + "s";
  if (seconds < 7200) return Math.round(seconds / 60) + "m";
  return Math.round(seconds / 3600) + "h";
}

function flash(text, bad) {
  const f = $("flash");
  f.textContent = text;
  f.style.color = bad ? "var(--bad)" : "var(--ok)";
}

// ---- login page ----

function loginPage() {
  const login = async (body) => {
    $("login-error").textContent = "";
    try {
      await api("POST", "login", body);
      window.location.replace("./");
    } catch (e) {
      $("login-error").textContent = e.message;
    }
  };
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    login({ token: $("token").value });
  });
  // No token: the server takes the client certificate this connection presented (mTLS).
  $("cert-button").addEventListener("click", () => login({}));
}

// ---- charts (inline SVG) ----

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function bars(container, rows) {
  container.replaceChildren();
  const width = 560, row = 22, labelW = 160;
  const max = Math.max(1, ...rows.map((r) => r[1]));
  const s = svg("svg", { class: "chart", width: "100%", viewBox: `0 0 ${width} ${row * rows.length + 4}`, role: "img" });
  rows.forEach(([label, value], i) => {
    const y = i * row + 2;
    const t = svg("text", { x: 0, y: y + 14 }); t.textContent = label; s.append(t);
    const w = Math.max(1, ((width - labelW - 60) * value) / max);
    s.append(svg("rect", { class: "bar", x: labelW, y: y + 3, width: value ? w : 1, height: row - 8, rx: 2 }));
    const n = svg("text", { x: labelW + w + 6, y: y + 14 }); n.textContent = String(value); s.append(n);
  });
  container.append(s);
}

function sparkline(values) {
  const w = 140, h = 28;
  const s = svg("svg", { class: "chart", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img" });
  if (values.length < 2) return s;
  const max = Math.max(1, ...values), min = Math.min(...values);
  const span = Math.max(1, max - min);
  const pts = values.map((v, i) => [(i * w) / (values.length - 1), h - 2 - ((v - min) * (h - 4)) / span]);
  const d = pts.map((p, i) => (i ? "L" : "M") + p[0].toFixed(1) + " " + p[1].toFixed(1)).join(" ");
  s.append(svg("path", { class: "area", d: `${d} L${w} ${h} L0 ${h} Z` }));
  s.append(svg("path", { class: "line", d }));
  return s;
}

// ---- overview ----

const history = {}; // subscription -> delivered totals over time
let overviewTimer = null;

function series(m, name) { return (m.metrics[name] || []); }
function sumBy(list, label) {
  const out = {};
  for (const s of list) {
    const k = s.labels[label];
    out[k] = (out[k] || 0) + s.value;
  }
  return out;
}

async function overview() {
  const m = await api("GET", "overview");
  $("overview-at").textContent = "as of " + when(m.at_ms) + ", every 3 s";
  const received = sumBy(series(m, "ketenbus_ingest_received_messages_total"), "connector");
  const kinds = sumBy(series(m, "ketenbus_router_normalised_events_total"), "kind");
  const outcomes = series(m, "ketenbus_dispatch_delivery_outcomes_total");
  const retries = sumBy(series(m, "ketenbus_dispatch_delivery_retries_total"), "subscription");
  const dead = sumBy(series(m, "ketenbus_dispatch_dead_letters_total"), "subscription");
  const routerDead = series(m, "ketenbus_router_dead_letters_total").reduce((a, s) => a + s.value, 0);
  const lag = sumBy(series(m, "ketenbus_dispatch_consumer_lag_records"), "subscription");
  const oldest = {};
  for (const s of series(m, "ketenbus_dispatch_oldest_undelivered_age_seconds")) {
    const k = s.labels.subscription;
    oldest[k] = Math.max(oldest[k] || 0, s.value);
  }
  const per = {};
  for (const s of outcomes) {
    const k = s.labels.subscription;
    per[k] = per[k] || { delivered: 0, dead_lettered: 0, filtered: 0 };
    per[k][s.labels.outcome] = s.value;
  }
  const total = (o) => Object.values(o).reduce((a, b) => a + b, 0);
  const sources = series(m, "ketenbus_ingest_source_up");
  const delivered = Object.values(per).reduce((a, p) => a + p.delivered, 0);
  const deadTotal = total(dead) + routerDead;
  const cards = [
    ["messages in", total(received)], ["events made", total(kinds)], ["delivered", delivered],
    ["dead letters", deadTotal, deadTotal > 0], ["lag (records)", total(lag), total(lag) > 0],
    ["sources up", `${sources.filter((s) => s.value === 1).length}/${sources.length}`,
      sources.some((s) => s.value !== 1)],
  ];
  $("cards").replaceChildren(...cards.map(([l, n, bad]) =>
    el("div", { class: "card" + (bad ? " bad" : "") }, el("div", { class: "n", text: n }), el("div", { class: "l", text: l }))));
  bars($("chart-connectors"), Object.entries(received).sort());
  bars($("chart-kinds"), Object.entries(kinds).filter(([k]) => k !== "other").sort());
  const body = $("overview-subs").tBodies[0];
  body.replaceChildren();
  for (const [name, p] of Object.entries(per).sort()) {
    const h = (history[name] = history[name] || []);
    h.push(p.delivered);
    if (h.length > 60) h.shift();
    body.append(el("tr", {},
      el("td", {}, el("a", { href: "#dead-letters/" + encodeURIComponent(name), text: name })),
      el("td", { class: "num", text: p.delivered }),
      el("td", { class: "num", text: p.dead_lettered }),
      el("td", { class: "num", text: p.filtered }),
      el("td", { class: "num", text: retries[name] || 0 }),
      el("td", { class: "num", text: lag[name] || 0 }),
      el("td", { class: "num", text: age(oldest[name]) }),
      el("td", {}, sparkline(h))));
  }
  $("sources").replaceChildren(...(sources.length ? sources.map((s) =>
    el("li", {}, el("span", { class: "pill " + (s.value === 1 ? "ok" : "bad"), text: s.value === 1 ? "up" : "down" }), " " + s.labels.source))
    : [el("li", { class: "hint", text: "no mail sources configured" })]));
  $("dead-summary").replaceChildren(
    el("li", {}, `router: ${routerDead}`),
    ...Object.entries(dead).sort().map(([k, v]) =>
      el("li", {}, el("a", { href: "#dead-letters/" + encodeURIComponent(k), text: k }), `: ${v}`)));
}

// ---- search ----

let lastQuery = null;

function localToRfc3339(v) { return v ? new Date(v).toISOString() : null; }

async function search(ev, after) {
  if (ev) ev.preventDefault();
  $("search-error").textContent = "";
  if (!after) {
    const q = {};
    for (const input of $("search-form").elements) {
      if (!input.name || !input.value.trim()) continue;
      q[input.name] = input.type === "datetime-local" ? localToRfc3339(input.value) : input.value.trim();
    }
    lastQuery = q;
    $("results").tBodies[0].replaceChildren();
  }
  const q = Object.assign({}, lastQuery);
  if (after) q.after = after;
  try {
    const page = await api("POST", "search", q);
    const body = $("results").tBodies[0];
    for (const m of page.items) {
      body.append(el("tr", {},
        el("td", { text: when(m.received_at_ms) }),
        el("td", {}, el("a", { href: "#message/" + encodeURIComponent(m.id), text: m.id })),
        el("td", { text: m.connector }), el("td", { text: m.format }),
        el("td", { text: m.sender || "" }), el("td", { text: m.receiver || "" }),
        el("td", { class: "num", text: m.size })));
    }
    if (!body.rows.length) body.append(el("tr", {}, el("td", { colspan: 7, class: "hint", text: "no messages match" })));
    const more = $("more");
    more.hidden = !page.next;
    more.onclick = () => search(null, page.next);
  } catch (e) {
    $("search-error").textContent = e.message;
  }
}

// ---- message ----

const GOOD = ["accepted", "normalised", "delivered", "contrl", "acknowledgement"];
const BAD = ["rejected", "failed", "dead_lettered"];
const WARN = ["retrying", "delayed", "filtered"];

async function message(id) {
  $("message-id").textContent = id;
  $("message-error").textContent = "";
  for (const p of ["raw", "events"]) {
    $(p).hidden = true;
    $(p).textContent = "";
  }
  let l;
  try {
    l = await api("GET", "messages/" + encodeURIComponent(id));
  } catch (e) {
    $("message-error").textContent = e.message;
    return;
  }
  const dl = $("message-received");
  dl.replaceChildren();
  for (const [k, v] of [["received", when(l.received_at_ms)], ["connector", l.connector], ["format", l.format],
    ["content type", l.content_type], ["size", l.size + " bytes"], ["sender", l.sender || "—"],
    ["receiver", l.receiver || "—"], ["raw position", l.raw_offset == null ? "not routed yet" : `${l.raw_partition}/${l.raw_offset}`]]) {
    dl.append(el("dt", { text: k }), el("dd", { text: v }));
  }
  $("message-events").replaceChildren(...(l.events.length ? l.events.map((e) =>
    el("li", {}, el("span", { class: "pill", text: e.kind }), " " + e.id)) : [el("li", { class: "hint", text: "none" })]));
  $("message-deliveries").replaceChildren(...(l.deliveries.length ? l.deliveries.map((d) =>
    el("li", {}, el("span", { class: "pill " + cls(d.outcome), text: d.outcome }),
      ` ${d.subscription} · ${d.record_id} · ${d.attempts} attempt(s)` + (d.reason ? ` · ${d.reason}` : "")))
    : [el("li", { class: "hint", text: "none yet" })]));
  const acks = l.steps.filter((s) => s.stage === "acknowledge" || s.stage === "delivery_report");
  $("message-acks").replaceChildren(...(acks.length ? acks.map(stepLine) : [el("li", { class: "hint", text: "none known" })]));
  $("timeline").replaceChildren(...l.steps.map((s) => {
    const li = stepLine(s);
    li.className = cls(s.outcome);
    return li;
  }));
}

function cls(outcome) {
  return GOOD.includes(outcome) ? "ok" : BAD.includes(outcome) ? "bad" : WARN.includes(outcome) ? "warn" : "";
}

function stepLine(s) {
  const parts = [s.stage.replace("_", " "), s.outcome.replace("_", " ")];
  if (s.subscription) parts.push(s.subscription);
  if (s.kind) parts.push(s.kind);
  if (s.attempt) parts.push("attempt " + s.attempt);
  if (s.reason) parts.push(s.reason);
  const li = el("li", {}, el("span", { class: "when", text: when(s.at_ms) }), parts.join(" · "));
  if (s.detail) li.append(el("div", { class: "hint", text: s.detail }));
  if (s.record_id) li.append(el("div", { class: "hint", text: s.record_id }));
  return li;
}

async function showRaw() {
  const id = $("message-id").textContent;
  try {
    const r = await api("POST", "messages/" + encodeURIComponent(id) + "/raw", {});
    $("raw").textContent = r.text + (r.truncated ? "\n… (truncated)" : "");
    $("raw").hidden = false;
    $("events").textContent = r.events.length
      ? JSON.stringify(r.events, null, 2)
      : "(no events: the message does not normalise into any)";
    $("events").hidden = false;
  } catch (e) {
    $("message-error").textContent = e.message;
  }
}

// ---- subscriptions ----

async function subscriptions() {
  const [subs, m] = await Promise.all([api("GET", "subscriptions"), api("GET", "overview")]);
  const lag = sumBy(series(m, "ketenbus_dispatch_consumer_lag_records"), "subscription");
  const oldest = {};
  for (const s of series(m, "ketenbus_dispatch_oldest_undelivered_age_seconds")) {
    oldest[s.labels.subscription] = Math.max(oldest[s.labels.subscription] || 0, s.value);
  }
  const body = $("subs").tBodies[0];
  body.replaceChildren(...subs.map((s) => el("tr", { "data-name": s.name },
    el("td", {}, s.name,
      s.fhir_subscription ? el("span", { class: "pill", text: "FHIR Subscription" }) : "",
      el("div", { class: "hint", text: s.topics.join(", ") }),
      s.fhir_subscription ? el("div", { class: "hint", text:
        `Subscription/${s.fhir_subscription.id} for ${s.fhir_subscription.receiver}, ${s.fhir_subscription.status}` }) : ""),
    el("td", {}, el("span", { class: "pill " + (s.paused ? "warn" : "ok"), text: s.paused ? "paused" : "running" })),
    el("td", { class: "num", text: lag[s.name] || 0 }),
    el("td", { class: "num", text: age(oldest[s.name]) }),
    el("td", { text: `${s.retry.initial} → ${s.retry.max}, gives up after ${s.retry.give_up_after}` }),
    el("td", { class: "num", text: s.concurrency }),
    el("td", {}, el("a", { href: "#dead-letters/" + encodeURIComponent(s.name), text: String(s.dead_letters ?? "?") })),
    el("td", {}, el("button", {
      class: s.paused ? "" : "secondary", id: (s.paused ? "resume-" : "pause-") + s.name,
      text: s.paused ? "Resume" : "Pause",
      onclick: async () => {
        try {
          await api("POST", `subscriptions/${encodeURIComponent(s.name)}/${s.paused ? "resume" : "pause"}`, {});
          flash(`${s.name} ${s.paused ? "resumed" : "paused"}`);
        } catch (e) { flash(e.message, true); }
        subscriptions();
      },
    })))));
}

// ---- dead letters ----

async function deadLetters(name) {
  $("dl-sub").textContent = name;
  $("dl-all").checked = false;
  const letters = await api("GET", `subscriptions/${encodeURIComponent(name)}/dead-letters`);
  const body = $("dead-letters").tBodies[0];
  body.replaceChildren(...letters.map((d) => el("tr", {},
    el("td", {}, el("input", { type: "checkbox", class: "dl-pick", value: d.id, "aria-label": "select" })),
    el("td", { text: when(d.at_ms) }),
    el("td", {}, el("a", { href: "#message/" + encodeURIComponent(d.envelope_id), text: d.envelope_id })),
    el("td", { text: d.record_id }),
    el("td", {}, el("span", { class: "pill bad", text: d.reason })),
    el("td", { class: "hint", text: d.detail }))));
  if (!letters.length) body.append(el("tr", {}, el("td", { colspan: 6, class: "hint", text: "no dead letters" })));
}

async function dlAction(action, which, confirmText) {
  const name = $("dl-sub").textContent;
  if (confirmText && !window.confirm(confirmText)) return;
  try {
    const r = await api("POST", `subscriptions/${encodeURIComponent(name)}/dead-letters/${action}`, which);
    flash(action === "replay" ? `${r.replayed} dead letter(s) replayed` : `${r.removed} dead letter(s) purged`);
  } catch (e) { flash(e.message, true); }
  deadLetters(name);
}

function picked() { return [...document.querySelectorAll(".dl-pick:checked")].map((c) => c.value); }

// ---- routing ----

const TITLES = { overview: "Overview", search: "Search", message: "Message", subscriptions: "Subscriptions", "dead-letters": "Dead letters" };

function route() {
  const [view, ...rest] = (window.location.hash.slice(1) || "overview").split("/");
  const arg = decodeURIComponent(rest.join("/"));
  const name = TITLES[view] ? view : "overview";
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("shown", s.id === "view-" + name);
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.id === "nav-" + name);
  // No ids or patient data in the title: only the page's name.
  document.title = "ketenbus console: " + TITLES[name];
  flash("");
  clearInterval(overviewTimer);
  if (name === "overview") { overview(); overviewTimer = setInterval(overview, 3000); }
  if (name === "message") message(arg);
  if (name === "subscriptions") subscriptions();
  if (name === "dead-letters") deadLetters(arg);
}

async function appPage() {
  const s = await api("GET", "session");
  csrf = s.csrf;
  $("operator").textContent = s.operator;
  $("logout").addEventListener("click", async () => {
    try { await api("POST", "logout", {}); } finally { window.location.replace("login"); }
  });
  $("search-form").addEventListener("submit", (ev) => search(ev));
  $("show-raw").addEventListener("click", showRaw);
  $("dl-all").addEventListener("change", (ev) => {
    for (const c of document.querySelectorAll(".dl-pick")) c.checked = ev.target.checked;
  });
  $("dl-replay-selected").addEventListener("click", () => {
    const ids = picked();
    if (ids.length) dlAction("replay", { ids }); else flash("select dead letters first", true);
  });
  $("dl-purge-selected").addEventListener("click", () => {
    const ids = picked();
    if (ids.length) dlAction("purge", { ids }, `Purge ${ids.length} dead letter(s) for good?`);
    else flash("select dead letters first", true);
  });
  $("dl-replay-since").addEventListener("click", () => {
    const since = localToRfc3339($("dl-since").value);
    if (since) dlAction("replay", { since }); else flash("choose a time first", true);
  });
  $("dl-replay-all").addEventListener("click", () => dlAction("replay", { all: true }, "Replay every dead letter?"));
  $("dl-purge-all").addEventListener("click", () => dlAction("purge", { all: true }, "Purge every dead letter for good?"));
  window.addEventListener("hashchange", route);
  route();
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "login") loginPage(); else appPage();
});
