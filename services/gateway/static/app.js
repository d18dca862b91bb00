// Baton's web UI: the task board at "/" and a task's page at "/tasks/<id>". No build step.
// Everything live comes from the event stream over WebSocket; user text is only ever set as text.

import { CONVERSATION_TYPES, conversation } from "./conversation.js";

// events/flow.py FLOW_CONTRACT, in the same order (the capability test checks they agree).
const FLOW = ["TaskSubmitted", "WorkspaceRequested", "WorkspaceReady", "AgentSessionStarted",
  "PromptDelivered", "AgentOutput", "AgentFinished", "BranchPushed", "TaskCompleted"];
const LABEL = {
  TaskSubmitted: "Submitted", WorkspaceRequested: "Workspace requested", WorkspaceReady: "Workspace ready",
  AgentSessionStarted: "Agent started", PromptDelivered: "Prompt delivered", AgentOutput: "Agent output",
  AgentFinished: "Agent finished", BranchPushed: "Branch pushed", TaskCompleted: "Completed",
  TaskFailed: "Task failed", TaskCancelRequested: "Cancel asked", TaskCancelled: "Task cancelled",
  TaskQueued: "Queued for a place", WorkspaceFailed: "Workspace failed", SessionFailed: "Session failed",
  StepOverdue: "Step overdue", StepRecovered: "Step recovered", AgentStalled: "Agent stalled",
  PermissionAnswerGiven: "You answered", FollowUpSubmitted: "You followed up",
  TurnRequested: "Turn started", WorkspaceReleased: "Workspace released", AttemptStarted: "New attempt",
  PullRequestOpened: "Pull request opened", PullRequestUpdated: "Pull request updated", PullRequestFailed: "Pull request failed",
};
const STATES = ["queued", "provisioning", "running", "completed", "failed", "cancelled"];
// As projections/task_board.py: a task only moves forward in rank.
const STATE_OF = {
  TaskSubmitted: "queued", TaskQueued: "queued", WorkspaceRequested: "provisioning", WorkspaceReady: "provisioning",
  WorkspaceFailed: "provisioning", AgentSessionStarted: "running", PromptDelivered: "running",
  AgentFinished: "running", SessionFailed: "running", BranchPushed: "running",
  TaskCompleted: "completed", TaskFailed: "failed", TaskCancelled: "cancelled",
};
// As projections/task_board.py STATE_RANK: a task that completed a turn may fail or be cancelled in a later one.
const RANK = { queued: 0, provisioning: 1, running: 2, completed: 3, failed: 4, cancelled: 4 };
const ended = (state) => RANK[state] >= 3;
const GAPS = new Set(["StepOverdue", "AgentStalled"]); // named gaps: shown red, as markers
const RED = new Set(["TaskFailed", "WorkspaceFailed", "SessionFailed", "PullRequestFailed", ...GAPS]);
const TERMINAL = new Set(["TaskCompleted", "TaskFailed", "TaskCancelled"]);

// ---- small helpers -------------------------------------------------------------------------

function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  el.append(...kids.flat().filter((k) => k != null && k !== false));
  return el;
}

const $ = (selector, root = document) => root.querySelector(selector);
const short = (sha) => (sha || "").slice(0, 10);
const firstLine = (text) => (text || "").trim().split("\n")[0];
// Who sent a follow-up: you, or GitHub feedback on the task's pull request (actor "github:<login>").
const byWhom = (event) => (event && event.actor && event.actor !== "user" ? event.actor : "you");

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 10) return "just now";
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

function duration(ms) {
  const s = Math.max(0, ms) / 1000;
  if (s < 60) return `${s.toFixed(1)}s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}

function badge(state) {
  return h("span", { class: `badge state-${state || "unknown"}`, "data-state": state || "" }, state || "…");
}

// Keep every "N min ago" fresh.
setInterval(() => document.querySelectorAll("[data-since]").forEach((el) => { el.textContent = ago(el.dataset.since); }), 15000);

// ---- login: every /api call needs the session cookie that the login URL (printed by `baton up`) sets.

class LoginNeeded extends Error {}

function showLogin() {
  if ($("#login-needed")) return;
  $("#app").replaceChildren(h("section", { class: "panel notice", id: "login-needed" },
    h("h1", {}, "Log in to Baton"),
    h("p", {}, "This browser is not logged in. Open the login URL that ", h("code", {}, "baton up"),
      " printed, ", h("code", {}, `${location.origin}/?token=…`), ", in this browser."),
    h("p", {}, "The token is also in the data dir's ", h("code", {}, "api-token"), " file (",
      h("code", {}, "~/.baton/api-token"), " by default).")));
}

/** fetch() for the API: a 401 shows how to log in and throws LoginNeeded. */
async function api(path, options) {
  const response = await fetch(path, options);
  if (response.status === 401) {
    showLogin();
    throw new LoginNeeded(`${path}: not logged in`);
  }
  return response;
}

/** Follow a WebSocket event stream from stream_seq 1 (with `newest`: from the task's `newest`-th
 *  newest event); on a drop, resume from last + 1. Events are deduplicated by stream_seq, so a
 *  replayed event is never applied twice. */
function follow(path, onEvent, onStatus = () => {}, newest = null) {
  let last = 0, delay = 500;
  const open = () => {
    const url = new URL(path, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (newest && !last) url.searchParams.set("last", String(newest));
    else url.searchParams.set("from_seq", String(last + 1));
    url.searchParams.set("batch", "1");  // each message: an array of events, in stream order
    const ws = new WebSocket(url);
    ws.onopen = () => { delay = 500; onStatus("live"); };
    ws.onmessage = (message) => {
      const data = JSON.parse(message.data);
      for (const event of Array.isArray(data) ? data : [data]) {
        if (!(event.stream_seq > last)) continue;
        last = event.stream_seq;
        try { onEvent(event); } catch (error) { console.error("event not shown", event, error); }
      }
    };
    ws.onclose = async () => {
      onStatus("reconnecting");
      // A refused handshake looks like any drop: ask the API whether the session is still valid.
      try { await api("/api/backends", { cache: "no-store" }); } catch (error) { if (error instanceof LoginNeeded) return; }
      setTimeout(open, delay);
      delay = Math.min(delay * 2, 8000);
    };
  };
  open();
}

function connection(el) {
  return (status) => {
    el.className = `conn conn-${status}`;
    el.textContent = status === "live" ? "live" : "reconnecting…";
  };
}

// ---- health: the fault banner and the status pill, on every page ------------------------------

async function pollHealth() {
  const pill = $("#health");
  const banner = $("#fault-banner");
  try {
    const health = await (await fetch("/api/health", { cache: "no-store" })).json();
    const down = Object.entries(health.services || {}).filter(([, up]) => !up).map(([name]) => name);
    const ok = health.status === "ok";
    pill.className = `health ${ok ? "health-ok" : "health-bad"}`;
    pill.textContent = !("services" in health) ? "Not logged in" : ok ? "All services up"
      : !health.nats ? "NATS unreachable" : `Degraded: ${down.join(", ") || "see /api/health"}`;
    const faults = health.faults || [];
    banner.hidden = !faults.length;
    banner.textContent = faults.length
      ? `Fault injection on: ${faults.join(", ")}. These steps will silently not happen; do not trust results from this install.`
      : "";
  } catch {
    pill.className = "health health-bad";
    pill.textContent = "Gateway unreachable";
  }
}

// ---- the board --------------------------------------------------------------------------------

async function boardPage(app) {
  document.title = "Board · Baton";
  const tasks = new Map();
  const columns = Object.fromEntries(STATES.map((state) => [state, h("div", { class: "cards" })]));
  const counts = Object.fromEntries(STATES.map((state) => [state, h("span", { class: "count" }, "0")]));
  const conn = h("span", { class: "conn" }, "connecting…");
  app.replaceChildren(
    submitForm(),
    h("section", { class: "board-head" }, h("h2", {}, "Tasks"), conn),
    h("section", { class: "board" }, STATES.map((state) => h("div", { class: `column column-${state}`, "data-column": state },
      h("h3", {}, h("span", { class: `dot state-${state}` }), state, counts[state]), columns[state]))),
  );

  let scheduled = false;
  const render = () => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      const sorted = [...tasks.values()].sort((a, b) => (b.created_at || "").localeCompare(a.created_at || ""));
      placeInLine(sorted);
      for (const state of STATES) {
        const mine = sorted.filter((task) => task.state === state);
        counts[state].textContent = String(mine.length);
        const shown = mine.slice(0, 60).map(card);
        if (mine.length > 60) shown.push(h("p", { class: "more" }, `and ${mine.length - 60} more`));
        columns[state].replaceChildren(...(shown.length ? shown : [h("p", { class: "empty" }, "none")]));
      }
    });
  };

  try {
    for (const task of (await (await api("/api/tasks")).json()).tasks) tasks.set(task.task_id, task);
  } catch (error) {
    if (error instanceof LoginNeeded) return;
    console.error("GET /api/tasks failed", error);
  }
  render();
  // The board has no stream position to resume from, so replay the stream (forward-only states).
  // Permission requests stay in: a task whose agent waits for a person says so.
  const quiet = ["AgentOutput", ...CONVERSATION_TYPES].filter((type) => !type.startsWith("Permission"));
  follow(`/api/stream?exclude=${quiet.join(",")}`, (event) => {
    if (!tasks.has(event.task_id)) tasks.set(event.task_id, { task_id: event.task_id });
    fold(tasks.get(event.task_id), event);
    render();
  }, connection(conn));
}

// The line of tasks waiting for a place, as the task runner serves it: by their TaskQueued's
// stream position (until the replay reaches it, the position GET /api/tasks gave).
function placeInLine(tasks) {
  const line = tasks.filter((task) => task.state === "queued" && task.queued_seq != null)
    .sort((a, b) => a.queued_seq - b.queued_seq);
  line.forEach((task, index) => { task.queue_position = index + 1; });
  for (const task of tasks) if (task.state !== "queued") task.queue_position = null;
}

function fold(task, event) {
  const data = event.data || {};
  if (event.type === "TaskQueued") task.queued_seq = event.stream_seq;
  if (event.type === "TaskSubmitted") {
    for (const key of ["repo", "prompt", "agent", "base_branch", "permission_policy"]) task[key] = data[key];
    task.created_at = task.created_at || event.occurred_at;
  }
  if (event.type === "BranchPushed" || event.type === "TaskCompleted") Object.assign(task, { branch: data.branch, commit: data.commit });
  if (event.type === "TaskFailed") task.reason = data.reason;
  if (event.type === "TaskCancelled") task.reason = `cancelled by ${data.by}${data.reason ? `: ${data.reason}` : ""}`;
  if (event.type === "PermissionRequested") (task.asked ||= new Set()).add(data.request_id);
  if (event.type === "PermissionAnswered") task.asked?.delete(data.request_id);
  if (task.asked) task.waiting_for = task.asked.size ? "person" : null;
  if (GAPS.has(event.type)) (task.open_gaps ||= new Set()).add(data.expected || "AgentOutput");
  if (event.type === "StepRecovered") task.open_gaps?.delete(data.expected);
  const state = STATE_OF[event.type];
  if (state && (!task.state || RANK[state] > RANK[task.state])) task.state = state;
  // A follow-up's turn: the completed task runs again until that turn completes.
  if (event.type === "PromptDelivered" && (data.turn || 1) > 1 && task.state === "completed") task.state = "running";
  task.created_at = task.created_at || event.occurred_at;
  if (!task.updated_at || event.occurred_at > task.updated_at) task.updated_at = event.occurred_at;
}

function card(task) {
  const repo = String(task.repo ?? "").replace(/\/+$/, "").split("/").pop().replace(/\.git$/, "") || task.repo;
  return h("a", { class: `card card-${task.state}`, href: `/tasks/${encodeURIComponent(task.task_id)}`, "data-task": task.task_id },
    h("div", { class: "card-top" }, h("code", {}, task.task_id), task.agent && h("span", { class: "chip" }, task.agent)),
    h("p", { class: "card-prompt" }, firstLine(task.prompt) || "(no prompt)"),
    task.state === "queued" && task.queue_position && h("p", { class: "card-queue", "data-queue-position": task.queue_position },
      `waiting for a place: #${task.queue_position} in line`),
    task.state === "failed" && task.reason && h("p", { class: "card-reason", title: task.reason }, task.reason),
    !ended(task.state) && task.waiting_for === "person" && h("p", { class: "card-waiting" }, "✋ waiting for you: a permission request"),
    !ended(task.state) && task.open_gaps?.size > 0 && h("p", { class: "card-gap" }, `⚠ overdue: ${[...task.open_gaps].join(", ")}`),
    task.state === "completed" && task.branch && h("p", { class: "card-branch" }, "⎇ ", h("code", {}, task.branch)),
    h("div", { class: "card-meta" }, h("span", { title: task.repo || "" }, repo || ""),
      task.updated_at && h("time", { "data-since": task.updated_at, title: task.updated_at }, ago(task.updated_at))));
}

function submitForm() {
  const field = (label, control, hint, cls = "") => h("label", { class: `field ${cls}` },
    h("span", { class: "label" }, label, hint && h("span", { class: "hint" }, hint)), control);
  const repo = h("input", { name: "repo", required: true, placeholder: "https://github.com/you/repo.git or file:///path/repo.git", autocomplete: "off", spellcheck: "false" });
  const prompt = h("textarea", { name: "prompt", required: true, rows: "3", placeholder: "What should the agent do? For the shell agent: a bash script." });
  const agent = h("select", { name: "agent", required: true }, h("option", { value: "" }, "loading…"));
  const base = h("input", { name: "base_branch", placeholder: "default branch", autocomplete: "off", spellcheck: "false" });
  const policy = h("select", { name: "permission_policy" },
    h("option", { value: "auto" }, "Allow once (auto)"), h("option", { value: "ask" }, "Ask me"));
  const errors = h("div", { class: "form-errors", role: "alert", hidden: true });
  const button = h("button", { type: "submit", class: "primary" }, "Run task");
  const form = h("form", { class: "panel submit", novalidate: true },
    h("h2", {}, "New task"),
    h("div", { class: "form-grid" }, field("Repository", repo), field("Agent", agent), field("Base branch", base, "optional"),
      field("Permissions", policy, "when the agent asks"),
      field("Prompt", prompt, null, "field-prompt")),
    h("div", { class: "form-foot" }, errors, button));

  api("/api/backends").then((r) => r.json()).then(({ backends }) => {
    agent.replaceChildren(...backends.map((b) => h("option", { value: b.name, disabled: !b.available },
      b.available ? b.title || b.name : `${b.title || b.name} (not installed)`)));
    const first = backends.find((b) => b.available);
    if (first) agent.value = first.name;
  }).catch(() => agent.replaceChildren(h("option", { value: "shell" }, "shell")));

  const showErrors = (messages) => {
    errors.hidden = !messages.length;
    errors.replaceChildren(...messages.map((m) => h("p", {}, m)));
  };
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    for (const control of [repo, prompt, agent]) control.removeAttribute("aria-invalid");
    const body = { repo: repo.value.trim(), prompt: prompt.value, agent: agent.value, base_branch: base.value.trim() || null,
      permission_policy: policy.value };
    const missing = [["repository", repo], ["prompt", prompt], ["agent", agent]].filter(([, c]) => !c.value.trim());
    if (missing.length) {
      missing.forEach(([, c]) => c.setAttribute("aria-invalid", "true"));
      return showErrors(missing.map(([name]) => `Please fill in the ${name}.`));
    }
    button.disabled = true;
    button.textContent = "Submitting…";
    try {
      const response = await api("/api/tasks", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
      const result = await response.json().catch(() => ({}));
      if (response.ok) return location.assign(`/tasks/${encodeURIComponent(result.task_id)}`);
      showErrors(describeError(response.status, result.detail, form));
    } catch (error) {
      if (error instanceof LoginNeeded) return;
      showErrors([`Could not reach the gateway: ${error.message}`]);
    }
    button.disabled = false;
    button.textContent = "Run task";
  });
  return form;
}

// FastAPI's 422 detail is either a string or a list of {loc, msg}: make it a sentence per problem.
function describeError(status, detail, form) {
  if (typeof detail === "string") return [detail];
  if (Array.isArray(detail)) {
    return detail.map((item) => {
      const name = (item.loc || []).filter((part) => part !== "body").join(".");
      const control = name && form.elements.namedItem(name);
      if (control) control.setAttribute("aria-invalid", "true");
      const message = String(item.msg || "is invalid").replace(/^Value error, /, "");
      return name ? `${name.replace("_", " ")}: ${message}` : message;
    });
  }
  return [`The gateway answered ${status}.`];
}

/** How an agent session started: a task's first, or one restored for a later turn or attempt. */
function sessionDetail(d) {
  if (!d.session_id) return "";
  const session = `session ${d.session_id.slice(0, 8)}`;
  if (d.restored === "loaded") return `${session}, the earlier conversation restored (session/load)`;
  if (d.restored === "new") return `${session}, new: ${d.restore_note || "the earlier session could not be restored"}`;
  return session;
}

// ---- a task's page ----------------------------------------------------------------------------

/** Answers to the task's permission requests, when its policy is `ask`: send() resolves to null
 *  once recorded, else to what the gateway said (e.g. it timed out meanwhile). */
function answersFor(task) {
  return {
    enabled: () => task.permission_policy === "ask",
    send: async (requestId, optionId) => {
      const path = `/api/tasks/${encodeURIComponent(task.task_id)}/permissions/${encodeURIComponent(requestId)}`;
      try {
        const response = await api(path, { method: "POST", headers: { "content-type": "application/json" },
          body: JSON.stringify({ option_id: optionId }) });
        if (response.ok) return null;
        const body = await response.json().catch(() => ({}));
        return typeof body.detail === "string" ? body.detail : `the gateway answered ${response.status}`;
      } catch (error) {
        return error instanceof LoginNeeded ? "not logged in" : `could not reach the gateway: ${error.message}`;
      }
    },
  };
}

// ---- browser notifications: the watched task ended or waits for a person ----------------------

const NOTIFY = { TaskCompleted: "completed", TaskFailed: "failed", TaskCancelled: "was cancelled",
  PermissionRequested: "waits for your permission" };

/** A "Notify me" button, shown while the browser has not been asked: asking needs a user gesture. */
function notifyButton() {
  const button = h("button", { type: "button", class: "cancel", id: "notify", title: "A browser notification when this task ends or needs you" }, "Notify me");
  button.hidden = !("Notification" in window) || Notification.permission !== "default";
  button.addEventListener("click", async () => {
    await Notification.requestPermission();
    button.hidden = Notification.permission !== "default";
  });
  return button;
}

/** A browser notification of `event` if it is news (it happened after `since`) and one is wanted. */
function notifyOf(event, id, since) {
  const what = NOTIFY[event.type];
  if (!what || !("Notification" in window) || Notification.permission !== "granted") return;
  if (!(Date.parse(event.occurred_at) >= since)) return;  // the history replayed on opening the page
  const d = event.data || {};
  new Notification(`Baton task ${id} ${what}`, { body: d.reason || d.title || d.branch || "", tag: `${id}:${event.type}:${d.request_id || ""}` });
}

async function taskPage(app, id) {
  const openedAt = Date.now();  // what happened before is history, not news (one machine's clock: NTP-close)
  const notify = notifyButton();
  document.title = `Task ${id} · Baton`;
  const state = h("span", { id: "state" }, badge(""));
  const conn = h("span", { class: "conn" }, "connecting…");
  const cancel = h("button", { type: "button", class: "cancel", id: "cancel", hidden: true, title: "Stop the agent; nothing more is pushed" }, "Cancel");
  const facts = h("dl", { class: "facts" });
  const prompt = h("pre", { class: "prompt" });
  const followUpText = h("textarea", { id: "follow-up-prompt", rows: 2, placeholder: "Follow-up: the agent's next turn, in the same session" });
  const followUpNote = h("span", { class: "note", id: "follow-up-note" });
  const followUp = h("form", { class: "follow-up", id: "follow-up", hidden: true },
    followUpText, h("button", { type: "submit", id: "follow-up-send" }, "Send"), followUpNote);
  const result = h("div", { id: "result" });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const output = h("div", { class: "conversation", id: "output", "aria-live": "off" });
  const earlier = h("button", { type: "button", class: "earlier", id: "earlier", hidden: true,
    title: "The page opened on the newest output; this loads what came before it" }, "Show earlier output");
  const outputCount = h("span", { class: "count" }, "0 lines");
  const plan = h("section", { class: "plan", id: "plan", hidden: true });
  const usage = h("span", { class: "usage", id: "usage", title: "Tokens and cost the agent reported", hidden: true });
  const task = { task_id: id };
  const talk = conversation(output, plan, usage, h, answersFor(task));
  const rows = {};
  for (const type of FLOW) {
    rows[type] = h("li", { class: "step pending", "data-step": type },
      h("span", { class: "mark", "aria-hidden": "true" }), h("span", { class: "name" }, LABEL[type]),
      h("time", { class: "at" }, "pending"), h("div", { class: "detail" }, h("code", {}, type), h("span", { class: "info" })));
    timeline.append(rows[type]);
  }
  app.replaceChildren(
    h("section", { class: "task-head" },
      h("div", { class: "title-row" }, h("h1", {}, h("a", { class: "back", href: "/", title: "Back to the board" }, "Board ›"), " Task ", h("code", {}, id)), state, cancel, notify, conn),
      facts, usage, prompt, followUp),
    result,
    h("div", { class: "task-body" },
      h("section", { class: "panel" }, h("h2", {}, "Flow"), timeline),
      h("section", { class: "panel output-panel" }, h("h2", {}, "Agent output", outputCount), plan, earlier, output)));

  let response;
  try {
    response = await api(`/api/tasks/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error instanceof LoginNeeded) return;
    throw error;
  }
  if (response.status === 404) {
    app.replaceChildren(h("section", { class: "panel notice" }, h("h1", {}, "No such task"),
      h("p", {}, "Nobody submitted a task with id ", h("code", {}, id), ". ", h("a", { href: "/" }, "Back to the board"))));
    return;
  }
  if (response.ok) Object.assign(task, await response.json());

  let t0 = task.created_at ? Date.parse(task.created_at) : null;
  let lines = 0;
  const seenOutput = new Set();  // "<attempt>:<seq>": each attempt's output counts from 1
  let attempt = 1;
  let turn = 1;  // the turn shown: a follow-up's handoffs are rows of their own, marked with it
  const outputRowOf = new Set();  // the later turns whose output has its row
  const followUps = [];  // the follow-ups (their events) in the order sent, shown when their turn starts
  const showHeader = () => {
    state.replaceChildren(badge(task.state));
    const fact = (label, value) => value && h("div", {}, h("dt", {}, label), h("dd", {}, value));
    const submitted = task.created_at && new Date(task.created_at).toLocaleString([], { dateStyle: "medium", timeStyle: "medium" });
    const inLine = task.state === "queued" && task.queue_position && `#${task.queue_position} (waiting for a place)`;
    facts.replaceChildren(...[fact("In line", inLine), fact("Repository", task.repo), fact("Agent", task.agent), fact("Base branch", task.base_branch),
      fact("Submitted", submitted), fact("Took", task.took)].filter(Boolean));
    prompt.textContent = task.prompt || "";
    prompt.hidden = !task.prompt;
    result.replaceChildren();
    if (task.branch) {
      result.append(h("div", { class: "result result-ok", id: "branch" },
        h("div", {}, h("strong", {}, task.state === "completed" ? "✓ Work pushed" : "Branch pushed"), " to branch ",
          h("code", { class: "branch" }, task.branch), " at ", h("code", { class: "commit", title: task.commit }, short(task.commit))),
        task.repo && h("code", { class: "cmd" }, `$ git fetch ${task.repo} ${task.branch}`)));
    }
    if (task.state === "failed") {
      result.append(h("div", { class: "result result-failed", id: "failure" },
        h("div", {}, h("strong", {}, "✕ Task failed: "), h("span", { class: "reason" }, task.reason || "no reason given"))));
    }
    if (task.state === "cancelled") {
      result.append(h("div", { class: "result result-cancelled", id: "cancelled" },
        h("div", {}, h("strong", {}, "■ Task cancelled: "), h("span", { class: "reason" }, task.reason || ""))));
    }
    cancel.hidden = ended(task.state);
    followUp.hidden = task.state === "failed" || task.state === "cancelled";
  };
  followUp.addEventListener("submit", async (submitted) => {
    submitted.preventDefault();
    if (!followUpText.value.trim()) return;
    const response = await api(`/api/tasks/${encodeURIComponent(id)}/messages`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ prompt: followUpText.value }) });
    if (response.ok) followUpText.value = "";
    followUpNote.textContent = response.ok ? "Sent: it runs as the agent's next turn."
      : (await response.json().catch(() => ({}))).detail || `The gateway answered ${response.status}.`;
  });
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    cancel.textContent = "Cancelling…";
    const response = await api(`/api/tasks/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    if (!response.ok) {
      cancel.textContent = "Cancel";
      cancel.disabled = false;
      cancel.title = (await response.json().catch(() => ({}))).detail || `The gateway answered ${response.status}.`;
    }
  });
  showHeader();

  const at = (event) => (t0 == null ? "" : `+${duration(Date.parse(event.occurred_at) - t0)}`);
  const open = (row) => row && !row.classList.contains("reached");
  // Extra events go after the last row shown so far; a gap goes right before the step it awaits.
  const extraRow = (event) => {
    const data = event.data || {};
    const gap = GAPS.has(event.type);
    const secs = (s) => (s != null ? `${Math.round(s)}s ` : "");
    let detail = data.reason || "";
    if (event.type === "StepOverdue") detail = `No ${data.expected} ${secs(data.waited_s)}after ${data.after}`;
    else if (event.type === "AgentStalled") detail = `No output for ${secs(data.silent_s)}`;
    else if (event.type === "StepRecovered") detail = `${data.expected} came ${secs(data.waited_s)}after ${data.after}`;
    else if (event.type === "PermissionAnswerGiven") detail = `permission ${data.request_id}: ${data.option_id}`;
    else if (event.type === "AttemptStarted") detail = `attempt ${data.attempt}: ${data.reason}`;
    else if (event.type === "ServerDeleted") detail = `server ${data.server_id} ran ${secs(data.seconds)}, cost ${
      data.cost_eur != null ? `€${data.cost_eur.toFixed(6)}` : "unknown"}: ${data.reason}`;
    else if (event.type === "FollowUpSubmitted") detail = `${byWhom(event)}: ${firstLine(data.prompt)}`;
    else if (event.type === "PullRequestUpdated") detail = `#${data.number} told turn ${data.turn}`;
    else if (event.type === "TurnRequested") detail = data.reprovision
      ? `turn ${data.turn}: the workspace was released, so a new one is made from the branch (attempt ${data.attempt})`
      : `turn ${data.turn}: on the agent's lingering session`;
    else if (FLOW.includes(event.type)) detail = detailOf(event);
    else if (!LABEL[event.type]) detail = JSON.stringify(data).slice(0, 160);
    const kind = gap ? " red gap" : RED.has(event.type) ? " red" : event.type === "StepRecovered" ? " recovered" : "";
    const name = `${LABEL[event.type] || event.type}${turn > 1 && FLOW.includes(event.type) ? ` · turn ${turn}` : ""}`;
    const row = h("li", { class: `step extra${kind}${turn > 1 ? " later-turn" : ""}`, "data-event": event.type,
      "data-turn": turn > 1 ? turn : null, "data-gap": gap ? data.expected || "AgentOutput" : null },
      h("span", { class: "mark", "aria-hidden": "true" }), h("span", { class: "name" }, name),
      h("time", { class: "at" }, at(event)), h("div", { class: "detail", title: detail }, h("code", {}, event.type), h("span", { class: "info" }, detail)));
    if (event.type.startsWith("PullRequest") && /^https?:\/\//.test(data.url || "")) row.querySelector(".info").append(
      " ", h("a", { href: data.url, target: "_blank", rel: "noopener", class: "pr-link" }, `pull request #${data.number}`));
    if (event.type === "StepRecovered") timeline.querySelector(`[data-gap="${CSS.escape(data.expected || "")}"]:not(.closed)`)?.classList.add("closed");
    const placed = [...timeline.children].filter((r) => !(r.dataset.step && open(r))).pop();
    if (gap && open(rows[data.expected])) rows[data.expected].before(row);
    else if (placed) placed.after(row);
    else timeline.prepend(row);
  };
  const detailOf = (event) => {
    const d = event.data || {};
    return {
      WorkspaceReady: d.workspace_id, AgentSessionStarted: sessionDetail(d),
      PromptDelivered: d.prompt_sha256 && `sha256 ${d.prompt_sha256.slice(0, 8)}`,
      AgentFinished: `${d.stop_reason || ""}${d.exit_code != null ? `, exit ${d.exit_code}` : ""}`, BranchPushed: d.commit && `at ${short(d.commit)}`,
    }[event.type] || "";
  };

  // Follow-ups run in the order they were sent, each once: turn n is the (n-1)th.
  const turnPrompt = (n) => h("div", { class: "turn-prompt", "data-turn": n },
    h("span", { class: "turn-label" }, `Turn ${n} · ${byWhom(followUps[n - 2])}:`), " ", followUps[n - 2]?.data?.prompt || "");
  // Whether the output was scrolled to its end is read once a frame (before that frame's first
  // line), and it is scrolled back there once, after: no layout is forced per line.
  let atEnd = null;
  const keepAtBottom = (draw) => {
    if (atEnd === null) {
      atEnd = output.scrollTop + output.clientHeight >= output.scrollHeight - 24;
      requestAnimationFrame(() => {
        if (atEnd) output.scrollTop = output.scrollHeight;
        atEnd = null;
      });
    }
    draw();
  };

  // `transcript` false: an event from before the newest screenful, for the flow, the header,
  // the plan and the usage only; its place in the output is drawn if the viewer scrolls back to it.
  let pieces = 0;
  // The lines shown (the newest of them until earlier output is loaded).
  const countLines = (text) => {
    lines += (text.match(/\n/g) || []).length;
    outputCount.textContent = `${lines} line${lines === 1 ? "" : "s"}${earlier.hidden ? "" : " shown"}`;
  };
  const apply = (event, transcript = true) => {
    const data = event.data || {};
    notifyOf(event, id, openedAt);
    if (event.type === "TaskSubmitted" && event.occurred_at) t0 = Date.parse(event.occurred_at);
    if (event.type === "AttemptStarted") attempt = data.attempt;
    if (event.type === "FollowUpSubmitted") followUps.push(event);
    if (event.type === "TurnRequested" && data.reprovision) attempt = data.attempt;  // a new vm_agent: output counts from 1
    // A later turn starts with its TurnRequested, or its PromptDelivered when that is on the stream first.
    if ((event.type === "TurnRequested" || event.type === "PromptDelivered") && (data.turn || 1) > turn) {
      turn = data.turn;
      if (transcript) keepAtBottom(() => output.append(turnPrompt(turn)));
    }
    fold(task, event);
    if (CONVERSATION_TYPES.has(event.type)) {
      keepAtBottom(() => talk.event(event));
      return;  // the conversation shows it; the flow's timeline stays the handoffs
    }
    if (event.type === "AgentOutput") {
      if (seenOutput.has(`${attempt}:${data.seq}`)) return;
      seenOutput.add(`${attempt}:${data.seq}`);
      keepAtBottom(() => talk.output(data));
      countLines(data.text);
    }
    const row = turn > 1 ? null : rows[event.type];
    if (row && !row.classList.contains("reached")) {
      row.classList.remove("pending", "skipped");
      row.classList.add("reached");
      $(".at", row).textContent = at(event);
      $(".info", row).textContent = detailOf(event);
    } else if (!row && (turn > 1 || !rows[event.type])) {
      // A later turn's output: one row, at its first piece.
      if (event.type !== "AgentOutput" || !outputRowOf.has(turn)) extraRow(event);
      if (event.type === "AgentOutput") outputRowOf.add(turn);
    }
    if (event.type === "AgentOutput" && turn === 1) {
      pieces = Math.max(pieces + 1, data.seq || 0);  // seq counts from 1: what came before the newest screenful too
      $(".info", rows.AgentOutput).textContent = `${pieces} piece${pieces === 1 ? "" : "s"}`;
    }
    if (TERMINAL.has(event.type)) {
      conn.hidden = true;
      output.dataset.ended = "true";
      task.took = t0 == null ? null : duration(Date.parse(event.occurred_at) - t0);
      if (event.type === "TaskFailed" || event.type === "TaskCancelled") {
        for (const type of FLOW) if (rows[type].classList.contains("pending")) {
          rows[type].classList.replace("pending", "skipped");
          $(".at", rows[type]).textContent = "not reached";
        }
      }
    }
    if (event.type !== "AgentOutput") showHeader();
  };
  // A late viewer sees the newest screenful first: the stream starts at the task's last events
  // (the gateway finds where they start); everything but the output before them is read for the
  // flow and the header before they are shown, and earlier output comes on demand.
  const history = (query) => api(`/api/tasks/${encodeURIComponent(id)}/events?${query}`)
    .then((r) => (r.ok ? r.json() : { events: [] })).then((body) => body.events);
  let oldest = null, waiting = null;  // the first event streamed; what arrived while the rest was read
  const take = (event) => {
    if (oldest === null) {
      oldest = event.stream_seq;
      if (event.type !== "TaskSubmitted") {  // not the task's first event: there is more before it
        earlier.hidden = false;
        waiting = [];
        history(`before_seq=${oldest}&exclude=${TRANSCRIPT_ONLY.join(",")}`).catch(() => []).then((before) => {
          before.forEach((e) => apply(e, false));
          const arrived = waiting;
          waiting = null;
          arrived.forEach((e) => apply(e));
        });
      }
    }
    if (waiting) waiting.push(event);
    else apply(event);
  };
  const showEarlier = async () => {
    if (earlier.disabled || earlier.hidden) return;
    earlier.disabled = true;
    const page = await history(`before_seq=${oldest}&last=${SCREENFULS}`).catch(() => null);
    earlier.disabled = false;
    if (!page) return;
    if (page.length) {
      oldest = page[0].stream_seq;
      const height = output.scrollHeight;
      output.prepend(earlierOutput(page, turnPrompt, answersFor(task)));
      output.scrollTop += output.scrollHeight - height;  // what was on screen stays put
    }
    earlier.hidden = page.length < SCREENFULS;
    countLines(page.filter((e) => e.type === "AgentOutput").map((e) => e.data.text).join(""));
  };
  earlier.addEventListener("click", showEarlier);
  output.addEventListener("scroll", () => { if (output.scrollTop < 40) showEarlier(); });
  follow(`/api/tasks/${encodeURIComponent(id)}/stream`, take, connection(conn), SCREENFULS);
}

// Events a task page opens with: enough for several screens of output, a small read however long the task.
const SCREENFULS = 400;
// What only the output shows: older ones are read when the viewer scrolls back to them.
const TRANSCRIPT_ONLY = ["AgentOutput", "ToolCallStarted", "ToolCallUpdated", "PermissionRequested", "PermissionAnswered"];

/** The output of `events` (a page from before what is shown), drawn off-screen in one fragment:
 *  lines, tool calls, permission requests and the later turns' prompts. */
function earlierOutput(events, turnPrompt, answers) {
  const fragment = document.createDocumentFragment();
  const talk = conversation(fragment, h("section"), h("span"), h, answers);
  for (const event of events) {
    const data = event.data || {};
    if (event.type === "AgentOutput") talk.output(data);
    else if (TRANSCRIPT_ONLY.includes(event.type)) talk.event(event);
    else if (event.type === "TurnRequested" && data.turn > 1) fragment.append(turnPrompt(data.turn));
  }
  return fragment;
}

// ---- routing ------------------------------------------------------------------------------------

const app = $("#app");
const match = location.pathname.match(/^\/tasks\/([^/]+)\/?$/);
pollHealth();
setInterval(pollHealth, 10000);
if (match) taskPage(app, decodeURIComponent(match[1]));
else if (location.pathname === "/") boardPage(app);
else app.replaceChildren(h("section", { class: "panel notice" }, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "/" }, "Back to the board"))));
