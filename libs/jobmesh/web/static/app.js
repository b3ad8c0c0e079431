// jobmesh dashboard: plain JavaScript, no build step. Routes are URL fragments (#/jobs/ID);
// each view fetches from /api/v1 and re-renders when the event stream (/api/v1/events)
// says that something it shows changed. Every text from the cluster goes in through
// textContent (the h() helper), never as HTML.
"use strict";

const API = "/api/v1";
const main = document.getElementById("main");
const liveBadge = document.getElementById("live");
const logoutButton = document.getElementById("logout");
const JOB_STATES = ["queued", "waiting", "ready", "bound", "running", "succeeded", "failed", "expired", "lost",
  "retrying", "cancelled"];

const JSON_BODY = { "Content-Type": "application/json" };  // the API takes no other body
const cache = { nodes: null, queues: null };
let events = null;       // the one EventSource
let current = null;      // the view on screen: {render, onJob(update), onNodes, onQueues}

// --- small helpers ---------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;  // through the CSSOM: the CSP forbids style attributes
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function when(t) {
  if (!t) return "";
  const d = new Date(t * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + (Date.now() - d > 86400e3 ? " " + d.toLocaleDateString() : "");
}

function secs(s) {
  if (s === null || s === undefined) return "";
  return s < 1 ? `${Math.round(s * 1000)} ms` : s < 120 ? `${s.toFixed(1)} s` : `${Math.round(s / 60)} min`;
}

function state(s, final) {
  return h("span", { class: `state state-${s}`, "data-state": s, "data-final": final ? "true" : "false" }, s);
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty || "none");
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", { class: x.endsWith("#") ? "num" : "" },
    x.replace(/#$/, ""))))), h("tbody", {}, rows));
}

function bar(used, total) {
  const pct = total ? Math.min(100, Math.round((100 * used) / total)) : 0;
  return h("div", { class: "bar", title: `${used} of ${total} (${pct}%)` }, h("span", { style: `width:${pct}%` }));
}

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

// At most one call per `ms`, the last request never lost: a busy run's stream of updates
// redraws its page once a second rather than after every quiet gap.
function throttle(fn, ms) {
  let last = 0, timer = null;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, wait);
  };
}

class Unauthorized extends Error {}

async function api(path, options) {
  const response = await fetch(API + path, { credentials: "same-origin", ...options });
  if (response.status === 401) throw new Unauthorized((await response.json()).message);
  const body = await response.json();
  if (!response.ok) {
    const err = new Error(body.message + (body.field ? ` (field ${body.field})` : ""));
    err.problem = body;
    throw err;
  }
  return body;
}

function show(...nodes) { main.replaceChildren(...nodes); }

function failed(err) {
  if (err instanceof Unauthorized) return login(err.message);
  show(h("section", { class: "panel" }, h("p", { class: "error", role: "alert" }, String(err.message || err))));
}

// A panel's data, or {error, message} that its table draws in its place; a refused token
// still goes to the login.
async function orError(promise) {
  try { return await promise; } catch (err) {
    if (err instanceof Unauthorized) throw err;
    return { error: true, message: String(err.message || err) };
  }
}

// --- auth ------------------------------------------------------------------------------
function login(message) {
  if (events) { events.close(); events = null; setLive(false); }
  // Several requests of one page may be refused: the form already shown stays, with what
  // is typed in it and what it said.
  if (document.getElementById("login-form")) return;
  const node = document.getElementById("login-template").content.cloneNode(true);
  show(node);
  const form = document.getElementById("login-form");
  const error = document.getElementById("login-error");
  if (message && !/required/.test(message)) error.textContent = message;
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = document.getElementById("token").value.trim();
    try {
      // The server answers with an HttpOnly cookie holding the token: fetch and EventSource
      // both send it from now on (EventSource cannot send an Authorization header).
      await api("/session", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
      logoutButton.hidden = false;
      route();
    } catch (err) {
      error.textContent = err.message;
    }
  });
  document.getElementById("token").focus();
}

logoutButton.addEventListener("click", async () => {
  await fetch(API + "/session", { method: "DELETE" });
  logoutButton.hidden = true;
  login();
});

// --- the live stream -------------------------------------------------------------------
function setLive(on) {
  liveBadge.textContent = on ? "live" : "offline";
  liveBadge.className = `live ${on ? "on" : "off"}`;
}

// A "ready" after the first one, or after the stream failed while a view was on screen, is
// a reconnection: the updates sent meanwhile were missed, so the view is drawn again.
let everReady = false;
let gap = false;
const RETRY_MS = 3000;

function connectEvents() {
  if (events) return;
  const source = new EventSource(API + "/events");
  events = source;
  source.addEventListener("ready", () => {
    setLive(true);
    if ((everReady || gap) && current && current.render) current.render();
    everReady = true;
    gap = false;
  });
  source.addEventListener("error", () => {
    setLive(false);
    gap = true;
    if (source.readyState !== EventSource.CLOSED) return;  // it reconnects by itself
    // Closed for good: the server refused the stream (an expired or cleared cookie answers
    // 401), or answered something else. Ask the API which: the login, or a retry.
    if (events === source) events = null;
    liveBadge.textContent = "disconnected";
    setTimeout(async () => {
      if (events) return;
      try { await api("/jobs?limit=1"); connectEvents(); } catch (err) {
        if (err instanceof Unauthorized) return login(err.message);
        setTimeout(connectEvents, RETRY_MS);
      }
    }, RETRY_MS);
  });
  events.addEventListener("job", (ev) => { if (current && current.onJob) current.onJob(JSON.parse(ev.data)); });
  events.addEventListener("nodes", (ev) => {
    cache.nodes = JSON.parse(ev.data);
    if (current && current.onNodes) current.onNodes(cache.nodes);
  });
  events.addEventListener("queues", (ev) => {
    cache.queues = JSON.parse(ev.data);
    if (current && current.onQueues) current.onQueues(cache.queues);
  });
  events.addEventListener("resync", () => { if (current) current.render(); });
}

// --- views -----------------------------------------------------------------------------
function queuesTable(view) {
  if (!view) return h("p", { class: "muted" }, "loading…");
  if (view.error) return h("p", { class: "error" }, view.message);
  const rows = view.queues.map((q) => h("tr", { "data-queue": q.queue },
    h("td", {}, h("a", { href: `#/jobs?queue=${encodeURIComponent(q.queue)}` }, q.queue)),
    h("td", { class: "num" }, q.pending), h("td", { class: "num" }, q.in_flight),
    h("td", {}, Object.entries(q.tenants).map(([t, n]) => h("span", { class: "tag", "data-tenant": t }, `${t}: ${n}`)),
      Object.keys(q.tenants).length ? null : h("span", { class: "muted" }, "—")),
    h("td", { class: "muted" }, Object.entries(q.reasons || {}).map(([r, n]) => `${r} (${n})`).join("; ")),
    h("td", { class: "num" }, q.partition)));
  const missing = view.partitions - view.answered.length;
  return h("div", {}, table(["queue", "pending#", "in flight#", "pending per tenant", "waiting for", "partition#"], rows,
    "no queue holds jobs"), missing > 0 ? h("p", { class: "error" }, `${missing} partition(s) have no scheduler`) : null);
}

function nodesTable(reply) {
  if (!reply) return h("p", { class: "muted" }, "loading…");
  if (reply.error) return h("p", { class: "error" }, reply.message);
  const rows = reply.nodes.map((n) => {
    const info = n.node;
    const running = info.attempts || [];
    return h("tr", { "data-node": info.node_id },
      h("td", {}, info.node_id, info.draining ? h("span", { class: "tag" }, "draining") : null),
      h("td", {}, n.alive ? h("span", { class: "state state-succeeded" }, "alive") : h("span", { class: "state state-lost" }, "gone")),
      h("td", {}, h("span", { class: "tag", "data-isolation": info.isolation }, info.isolation),
        info.network ? "" : h("span", { class: "tag" }, "no network")),
      h("td", {}, `${n.allocated.cpu_milli || 0} / ${info.cpu_milli} m`, bar(n.allocated.cpu_milli || 0, info.cpu_milli)),
      h("td", {}, `${n.allocated.memory_mb || 0} / ${info.memory_mb} MB`, bar(n.allocated.memory_mb || 0, info.memory_mb)),
      h("td", { class: "num" }, info.gpu ? `${n.allocated.gpu || 0} / ${info.gpu} ${info.gpu_kind}` : "—"),
      h("td", {}, [info.arch, info.zone].filter(Boolean).join(" · ")),
      h("td", {}, running.length ? running.map((a) => h("div", {},
        h("a", { href: `#/jobs/${a.job_id}` }, a.job_id.slice(0, 8)), ` #${a.attempt}`,
        a.progress !== undefined && a.progress !== null ? ` ${Math.round(a.progress * 100)}%` : "")) : h("span", { class: "muted" }, "idle")));
  });
  return table(["node", "", "isolation", "cpu", "memory", "gpu#", "arch · zone", "running"], rows, "no executor node is registered");
}

function jobRows(jobs) {
  return jobs.map((j) => h("tr", { "data-job-id": j.job_id },
    h("td", {}, h("a", { href: `#/jobs/${j.job_id}` }, h("code", {}, j.job_id.slice(0, 12)))),
    h("td", {}, j.name || h("span", { class: "muted" }, "—"), j.step ? h("span", { class: "tag" }, j.step) : null),
    h("td", {}, state(j.state, j.final)), h("td", {}, j.queue), h("td", {}, j.tenant),
    h("td", { class: "num" }, j.attempt), h("td", {}, j.node_id),
    h("td", { class: "muted" }, j.reason), h("td", { class: "num" }, when(j.submitted_at))));
}

function jobsTable(jobs) {
  return table(["job", "name", "state", "queue", "tenant", "attempt#", "node", "reason", "submitted#"], jobRows(jobs),
    "no jobs match");
}

function submitForm(after) {
  const error = h("p", { class: "error", role: "alert" });
  const form = h("form", { class: "submit", id: "submit-form" },
    h("label", {}, "command", h("input", { name: "command", placeholder: 'echo hello   or   ["sh", "-c", "echo hi; sleep 5"]', required: true, size: 40 })),
    h("label", {}, "name", h("input", { name: "name", placeholder: "(optional)" })),
    h("label", {}, "queue", h("input", { name: "queue", value: "default", size: 10 })),
    h("label", {}, "tenant", h("input", { name: "tenant", value: "default", size: 10 })),
    h("button", { type: "submit" }, "Submit job"), error);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const data = new FormData(form);
    // Words separated by spaces, or a JSON array for arguments with spaces in them.
    const command = String(data.get("command")).trim();
    let argv;
    try { argv = command.startsWith("[") ? JSON.parse(command) : command.split(/\s+/); } catch (err) {
      error.textContent = `the command is not a JSON array: ${err.message}`;
      return;
    }
    const spec = { runtime: { kind: "process", argv }, queue: data.get("queue") || "default",
      tenant: data.get("tenant") || "default" };
    if (data.get("name")) spec.name = data.get("name");
    try {
      error.textContent = "";
      const reply = await api("/jobs", { method: "POST", headers: JSON_BODY,
        body: JSON.stringify({ jobs: [{ spec }] }) });
      after(reply.job_ids[0]);
    } catch (err) {
      if (err instanceof Unauthorized) return login(err.message);
      error.textContent = err.message;
    }
  });
  return form;
}

async function overview() {
  const queues = h("section", { class: "panel", id: "queues" }, h("h2", {}, "Queues"), queuesTable(cache.queues));
  const nodes = h("section", { class: "panel", id: "nodes" }, h("h2", {}, "Nodes"), nodesTable(cache.nodes));
  const jobs = h("section", { class: "panel", id: "recent-jobs" }, h("h2", {}, "Recent jobs"), h("p", { class: "muted" }, "loading…"));
  const submitted = h("p", { class: "muted", id: "submitted" });
  show(h("h1", {}, "Overview"),
    h("section", { class: "panel" }, h("h2", {}, "Submit a job"), submitForm((id) => {
      submitted.replaceChildren("submitted ", h("a", { href: `#/jobs/${id}`, "data-submitted": id }, id));
      refreshJobs();
    }), submitted),
    h("div", { class: "grid" }, queues, nodes), jobs);
  const refreshJobs = debounce(async () => {
    try {
      const reply = await api("/jobs?limit=20");
      jobs.replaceChildren(h("h2", {}, "Recent jobs ", h("a", { href: "#/jobs", class: "muted" }, "(all)")), jobsTable(reply.jobs));
    } catch (err) { failed(err); }
  }, 150);
  const panels = async (fresh) => {
    const [q, n] = await Promise.all([orError(api("/queues")), orError(api("/nodes"))]);
    if (fresh || !cache.queues || cache.queues.error) cache.queues = q;
    if (fresh || !cache.nodes || cache.nodes.error) cache.nodes = n;
    queues.replaceChildren(h("h2", {}, "Queues"), queuesTable(cache.queues));
    nodes.replaceChildren(h("h2", {}, "Nodes"), nodesTable(cache.nodes));
  };
  refreshJobs();
  await panels(false);
  return {
    // After a reconnection: every panel afresh, the form (and what is typed in it) kept.
    render: async () => { refreshJobs(); try { await panels(true); } catch (err) { failed(err); } },
    onJob: refreshJobs,
    onQueues: (v) => queues.replaceChildren(h("h2", {}, "Queues"), queuesTable(v)),
    onNodes: (v) => nodes.replaceChildren(h("h2", {}, "Nodes"), nodesTable(v)),
  };
}

async function jobsView(params) {
  const form = h("form", { class: "filters" },
    h("label", {}, "state", h("select", { name: "state" }, h("option", { value: "" }, "any"),
      JOB_STATES.map((s) => h("option", { value: s, selected: params.get("state") === s }, s)))),
    h("label", {}, "queue", h("input", { name: "queue", value: params.get("queue") || "", size: 12 })),
    h("label", {}, "tenant", h("input", { name: "tenant", value: params.get("tenant") || "", size: 12 })),
    h("label", {}, "workflow run", h("input", { name: "workflow", value: params.get("workflow") || "", size: 16 })),
    h("label", {}, "limit", h("input", { name: "limit", type: "number", min: 1, max: 1000, value: params.get("limit") || 100 })),
    h("button", { type: "submit" }, "Filter"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = `#/jobs?${q}`;
  });
  const list = h("section", { class: "panel", id: "jobs" }, h("p", { class: "muted" }, "loading…"));
  show(h("h1", {}, "Jobs"), h("section", { class: "panel" }, form), list);
  const q = new URLSearchParams();
  for (const k of ["state", "queue", "tenant", "workflow", "limit"]) if (params.get(k)) q.set(k, params.get(k));
  if (!q.has("limit")) q.set("limit", "100");
  const refresh = debounce(async () => {
    try { list.replaceChildren(jobsTable((await api(`/jobs?${q}`)).jobs)); } catch (err) { failed(err); }
  }, 150);
  refresh();
  return { onJob: refresh };
}

function attemptRows(t) {
  return t.attempts.map((a) => h("tr", { "data-attempt": a.attempt },
    h("td", { class: "num" }, a.attempt), h("td", {}, state(a.state, false)), h("td", {}, a.node_id),
    h("td", {}, when(a.started_at)), h("td", {}, when(a.finished_at)),
    h("td", { class: "num" }, a.started_at && a.finished_at ? secs(a.finished_at - a.started_at) : ""),
    h("td", { class: "num" }, a.exit_code === null ? "" : a.exit_code),
    h("td", {}, [a.error, a.reason, a.result && `result ${a.result}`, a.retry && `then ${a.retry}`,
      a.waited !== null ? `waited ${secs(a.waited)}` : null, ...a.notes].filter(Boolean).join("; "))));
}

function resultNote(t) {
  // No text here: none was written, or it is too large for a page (the attempt says where).
  const stored = t.attempts.filter((a) => a.state === "succeeded" && a.result).map((a) => a.result);
  if (stored.length) return h("p", { class: "muted" }, `${stored[stored.length - 1]}: too large to show here; `,
    h("code", {}, `jobmesh result ${t.job.job_id}`), " reads it");
  return h("p", { class: "muted" }, t.job.state === "succeeded" ? "no result written" : "none yet");
}

async function jobView(jobId) {
  const page = h("div", { id: "job", "data-job-id": jobId }, h("p", { class: "muted" }, "loading…"));
  show(page);
  let running = false;
  const render = async () => {
    let t;
    try { t = await api(`/jobs/${encodeURIComponent(jobId)}/timeline`); } catch (err) { return failed(err); }
    const j = t.job;
    const runtime = j.spec.runtime || {};
    const what = runtime.argv ? runtime.argv.join(" ") : runtime.handler || runtime.image || runtime.kind;
    const cancel = h("button", { class: "secondary", type: "button", id: "cancel-job", onclick: async () => {
      try { await api(`/jobs/${encodeURIComponent(jobId)}/cancel`, { method: "POST", headers: JSON_BODY, body: "{}" }); } catch (err) { failed(err); }
    } }, "Cancel");
    const progress = t.progress ? h("div", { id: "progress" },
      h("span", {}, `attempt ${t.progress.attempt} on ${t.progress.node_id}: `,
        t.progress.fraction !== null ? `${Math.round(t.progress.fraction * 100)}%` : "", " ", t.progress.message),
      t.progress.fraction !== null ? bar(t.progress.fraction, 1) : null) : j.final ? null : h("div", { id: "progress" });
    running = ["bound", "running"].includes(j.state);
    page.replaceChildren(
      h("h1", {}, "Job ", h("code", {}, j.job_id), " ", state(j.state, j.final)),
      h("section", { class: "panel" }, h("dl", { class: "kv" },
        h("dt", {}, "name"), h("dd", {}, j.name || "—"),
        h("dt", {}, "runs"), h("dd", {}, h("code", {}, what)),
        h("dt", {}, "queue · tenant"), h("dd", {}, `${j.queue} · ${j.tenant}`),
        h("dt", {}, "attempt · node"), h("dd", {}, `${j.attempt} · ${j.node_id || "—"}`),
        h("dt", {}, "submitted"), h("dd", {}, when(j.submitted_at)),
        j.reason ? [h("dt", {}, "reason"), h("dd", {}, j.reason)] : null,
        j.origin ? [h("dt", {}, "started by"), h("dd", {}, `rule ${j.origin.rule || ""}`)] : null,
        j.fallback_job_id ? [h("dt", {}, "fallback"), h("dd", {}, h("a", { href: `#/jobs/${j.fallback_job_id}` }, j.fallback_job_id))] : null),
        progress, j.final ? null : cancel),
      h("section", { class: "panel", id: "attempts" }, h("h2", {}, "Attempts"),
        table(["attempt#", "state", "node", "started", "ended", "ran#", "exit#", "what happened"], attemptRows(t), "no attempt yet"),
        t.notes.length ? h("p", { class: "muted" }, t.notes.join("; ")) : null),
      h("section", { class: "panel", id: "transitions" }, h("h2", {}, "Transitions"),
        table(["at", "attempt#", "event", "detail"], [...j.events].sort((a, b) => a.at - b.at).map((e) => h("tr", { "data-event": e.kind },
          h("td", {}, when(e.at)), h("td", { class: "num" }, e.attempt), h("td", {}, e.kind), h("td", { class: "muted" }, e.detail))), "none yet")),
      h("section", { class: "panel", id: "logs" }, logsSection(t.logs)),
      h("section", { class: "panel", id: "result" }, h("h2", {}, "Result"),
        t.result_bytes ? h("pre", {}, t.result, t.result_bytes > t.result.length ? "\n…" : "") : resultNote(t)));
  };
  // A node's heartbeat carries the running attempt's progress, and its output grows: only
  // the logs section is read again (the timeline itself changes with job events).
  const refreshLogs = throttle(async () => {
    const section = document.getElementById("logs");
    if (!section || !page.isConnected) return;
    try { section.replaceChildren(...logsSection(await api(`/jobs/${encodeURIComponent(jobId)}/logs?lines=500`))); } catch (err) {
      if (err instanceof Unauthorized) failed(err);  // otherwise the page keeps what it shows
    }
  }, 1000);
  const showProgress = (reply) => {
    const el = document.getElementById("progress");
    if (!el || !reply || !reply.nodes) return;
    for (const n of reply.nodes) {
      for (const a of n.node.attempts || []) {
        if (a.job_id !== jobId) continue;
        const fraction = a.progress === null || a.progress === undefined ? null : a.progress;
        el.replaceChildren(h("span", {}, `attempt ${a.attempt} on ${n.node.node_id}: `,
          fraction !== null ? `${Math.round(fraction * 100)}%` : "", " ", a.message || ""), fraction !== null ? bar(fraction, 1) : null);
      }
    }
  };
  await render();
  const again = debounce(render, 150);
  return {
    render,
    onJob: (u) => { if (u.job_id === jobId) again(); },
    onNodes: (reply) => { if (running) { showProgress(reply); refreshLogs(); } },
  };
}

function logsSection(logs) {
  return [h("h2", {}, `Output (${logs.total} line${logs.total === 1 ? "" : "s"})`),
    logs.truncated ? h("p", { class: "muted" }, "older output not read: only the newest lines are shown") : null,
    logs.lines.length ? h("pre", {}, logs.lines.map((l) => `[${l.attempt} ${l.stream}] ${l.line}\n`).join("")) : h("p", { class: "muted" }, "no output")]
    .filter(Boolean);
}

async function workflowsView(params) {
  const reply = await api(`/workflows?limit=100${params.get("name") ? `&name=${encodeURIComponent(params.get("name"))}` : ""}`);
  const rows = reply.runs.map((r) => h("tr", { "data-run": r.run_id },
    h("td", {}, h("a", { href: `#/workflows/${r.run_id}` }, h("code", {}, r.run_id.slice(0, 12)))), h("td", {}, r.name),
    h("td", {}, r.state), h("td", { class: "num" }, r.steps), h("td", { class: "num" }, r.generation), h("td", { class: "num" }, when(r.created_at))));
  show(h("h1", {}, "Workflow runs"), h("section", { class: "panel" }, table(["run", "workflow", "record", "steps#", "retries#", "started#"], rows, "no workflow runs")));
  return {};
}

function graph(view) {
  const W = 180, H = 54, GX = 60, GY = 22;
  const { layout, status } = view;
  const byName = Object.fromEntries(status.steps.map((s) => [s.name, s]));
  const pos = Object.fromEntries(layout.steps.map((p) => [p.step, { x: 10 + p.column * (W + GX), y: 10 + p.row * (H + GY) }]));
  const width = 20 + layout.columns * (W + GX) - GX, height = 20 + layout.rows * (H + GY) - GY;
  const edges = layout.edges.map((e) => {
    const a = pos[e.source], b = pos[e.target];
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    return svg("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" });
  });
  const nodes = layout.steps.map((p) => {
    const s = byName[p.step], at = pos[p.step];
    const it = s.items;
    const done = it ? it.succeeded + it.failed + it.cancelled + it.skipped : 0;
    const items = it ? ` · ${done}/${it.total} items${it.failed ? `, ${it.failed} failed` : ""}` : "";
    const g = svg("g", { class: `node state-${s.state}`, "data-step": s.name, transform: `translate(${at.x},${at.y})`,
      style: s.job_id ? "cursor:pointer" : "", onclick: () => { if (s.job_id) location.hash = `#/jobs/${s.job_id}`; } },
    svg("rect", { width: W, height: H }), svg("text", { x: 10, y: 20 }, s.name),
    svg("text", { x: 10, y: 40, class: `sub state-${s.state}` }, s.state + items));
    g.append(svg("title", {}, s.reason || s.state));
    return g;
  });
  return svg("svg", { class: "graph", viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": "workflow graph" },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" },
      svg("path", { d: "M0,0 L10,5 L0,10 z", style: "fill: var(--muted)" }))), edges, nodes);
}

async function workflowView(runId) {
  const page = h("div", { id: "workflow" });
  show(page);
  let jobs = new Set();
  let running = true;
  const render = async () => {
    let view;
    try { view = await api(`/workflows/${encodeURIComponent(runId)}`); } catch (err) { return failed(err); }
    const s = view.status;
    jobs = new Set(s.steps.map((x) => x.job_id));
    running = s.outcome === "running";
    const rows = s.steps.map((x) => h("tr", { "data-step": x.name }, h("td", {}, x.name), h("td", {}, state(x.state, x.final)),
      h("td", {}, x.job_id ? h("a", { href: `#/jobs/${x.job_id}` }, h("code", {}, x.job_id.slice(0, 12))) : ""),
      h("td", {}, x.needs.join(", ")), h("td", { class: "muted" }, x.reason)));
    page.replaceChildren(h("h1", {}, `Workflow ${s.name} `, h("code", {}, s.run_id), " ", state(s.outcome, s.outcome !== "running")),
      h("section", { class: "panel" }, graph(view)),
      h("section", { class: "panel" }, table(["step", "state", "job", "needs", "why"], rows),
        h("p", {}, h("a", { href: `#/jobs?workflow=${s.run_id}` }, "every job of this run"))));
  };
  await render();
  const again = throttle(render, 1000);
  // A mapped step's items and a handler's child jobs are not among the steps' jobs: while
  // the run goes on, any job's update may be one of its own.
  return { render, onJob: (u) => { if (jobs.has(u.job_id) || running) again(); } };
}

async function queuesView() {
  const panel = h("section", { class: "panel", id: "queues" }, queuesTable(cache.queues || await orError(api("/queues"))));
  show(h("h1", {}, "Queues"), panel);
  const render = async () => {
    try { cache.queues = await orError(api("/queues")); panel.replaceChildren(queuesTable(cache.queues)); } catch (err) { failed(err); }
  };
  return { render, onQueues: (v) => panel.replaceChildren(queuesTable(v)) };
}

async function nodesView() {
  const panel = h("section", { class: "panel", id: "nodes" }, nodesTable(cache.nodes || await orError(api("/nodes"))));
  show(h("h1", {}, "Nodes"), panel);
  const render = async () => {
    try { cache.nodes = await orError(api("/nodes")); panel.replaceChildren(nodesTable(cache.nodes)); } catch (err) { failed(err); }
  };
  return { render, onNodes: (v) => panel.replaceChildren(nodesTable(v)) };
}

async function deadLettersView(params) {
  const service = params.get("service") || "";
  const page = await api(`/dead-letters?limit=200${service ? `&service=${encodeURIComponent(service)}` : ""}`);
  const rows = [...page.entries].reverse().map((e) => h("tr", { "data-seq": e.seq }, h("td", { class: "num" }, e.seq),
    h("td", {}, when(e.letter.at)), h("td", {}, e.letter.service), h("td", {}, h("code", {}, e.letter.subject)),
    h("td", {}, h("code", {}, e.letter.code)), h("td", {}, e.letter.reason)));
  show(h("h1", {}, "Dead letters"), h("section", { class: "panel" },
    table(["seq#", "at", "service", "subject", "code", "reason"], rows, "no dead letters"),
    page.unreadable ? h("p", { class: "muted" }, `${page.unreadable} records that are not dead letters`) : null));
  return {};
}

async function triggersView() {
  const reply = await api("/triggers");
  const rows = reply.triggers.map((t) => h("tr", { "data-rule": t.name }, h("td", {}, t.name),
    h("td", {}, t.kind), h("td", {}, t.paused ? "paused" : "active"), h("td", { class: "num" }, t.version),
    h("td", { class: "muted" }, t.description), h("td", { class: "num" }, t.next_tick ? when(t.next_tick) : ""),
    h("td", { class: "num" }, t.pending),
    h("td", { class: "muted" }, Object.entries(t.stats).filter(([, v]) => typeof v === "number" && v).map(([k, v]) => `${k} ${v}`).join(", "))));
  show(h("h1", {}, "Trigger rules"), h("section", { class: "panel" },
    table(["rule", "kind", "", "version#", "description", "next tick#", "pending#", "figures"], rows, "no trigger rules")));
  return {};
}

// --- routing ---------------------------------------------------------------------------
async function route() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.getAttribute("href") === `#/${parts[0] || ""}`);
  }
  const views = {
    "": () => overview(), jobs: () => (parts[1] ? jobView(parts[1]) : jobsView(params)),
    workflows: () => (parts[1] ? workflowView(parts[1]) : workflowsView(params)),
    queues: queuesView, nodes: nodesView, "dead-letters": () => deadLettersView(params), triggers: triggersView,
  };
  const view = views[parts[0] || ""] || overview;
  try {
    const handlers = await view();
    current = { render: route, ...handlers };
    connectEvents();
  } catch (err) {
    // The view failed (the cluster unreachable, say): a later reconnection of the stream
    // draws it again, so the stream is opened all the same, unless the token was refused.
    current = { render: route };
    failed(err);
    if (!(err instanceof Unauthorized)) connectEvents();
  }
}

window.addEventListener("hashchange", route);
// Whether this server needs a token at all decides whether there is anything to log out of.
fetch("/healthz").then((r) => r.json()).then((health) => { logoutButton.hidden = !health.auth; }).catch(() => {});
route();
