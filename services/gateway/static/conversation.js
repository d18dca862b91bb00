// A task's agent turn as a conversation: the shell agent's lines in terminal blocks (as they always
// were), an ACP agent's messages as text blocks, its thinking collapsed, each tool call as a card
// with its status, permission and diffs, its plan, and the tokens/cost it used (events/catalog.py).
// User and agent text is only ever set as text.

export const CONVERSATION_TYPES = new Set(["ToolCallStarted", "ToolCallUpdated", "PlanUpdated", "UsageRecorded",
  "PermissionRequested", "PermissionAnswered"]);
const TERMINAL_STREAMS = new Set(["stdout", "stderr", "tool"]);
const CONTEXT = 3; // unchanged lines shown around a change
const MAX_LCS_CELLS = 400_000; // bigger changes are shown as all removed, then all added

/** Renders into `root` (the scrolled conversation), `plan` (the plan box) and `usage` (tokens/cost);
 *  `h` is the page's element helper; `answers` ({enabled(), send(requestId, optionId)}), if given,
 *  puts a button per option next to an open permission request. Returns {output(data), event(event)}. */
export function conversation(root, plan, usage, h, answers = null) {
  let block = null; // the block consecutive lines of one kind go into: {group, body}
  const calls = new Map(); // tool_call_id -> its card's parts
  const asked = new Map(); // permission request_id -> {call: tool_call_id, options}
  const spent = { input: null, output: null, cost: null, currency: "", used: null, size: null };

  const blockFor = (group) => {
    if (block?.group === group) return block.body;
    let el, body;
    if (group === "terminal") el = body = h("pre", { class: "terminal block" });
    else if (group === "thought") {
      body = h("div", { class: "thought-body" });
      el = h("details", { class: "thought block" }, h("summary", {}, "Thinking"), body);
    } else el = body = h("div", { class: "message block" });
    root.append(el);
    block = { group, body };
    return body;
  };

  const output = (data) => {
    const group = TERMINAL_STREAMS.has(data.stream) ? "terminal" : data.stream === "thought" ? "thought" : "message";
    blockFor(group).append(h("span", { class: `out-${data.stream}`, "data-seq": data.seq }, data.text));
  };

  const card = (id) => {
    if (calls.has(id)) return calls.get(id);
    const parts = {
      kind: h("span", { class: "tool-kind" }), title: h("span", { class: "tool-title" }, id),
      status: h("span", { class: "tool-status" }), locations: h("div", { class: "tool-locations" }),
      permission: h("div", { class: "tool-permission", hidden: true }), diffs: h("div", { class: "tool-diffs" }),
      output: h("pre", { class: "tool-output-text" }),
    };
    parts.outputBox = h("details", { class: "tool-output", hidden: true }, h("summary", {}, "Output"), parts.output);
    parts.el = h("div", { class: "tool-call block", "data-tool-call-id": id },
      h("div", { class: "tool-head" }, parts.kind, parts.title, parts.status),
      parts.locations, parts.permission, parts.diffs, parts.outputBox);
    root.append(parts.el);
    block = null; // what follows starts a new block
    calls.set(id, parts);
    return parts;
  };

  const updateCall = (d) => {
    const parts = card(d.tool_call_id);
    if (d.title) parts.title.textContent = d.title;
    if (d.kind) parts.kind.textContent = d.kind;
    if (d.status) {
      parts.status.textContent = d.status.replace("_", " ");
      parts.el.dataset.status = d.status;
    }
    if (d.locations) parts.locations.textContent = d.locations.map((l) => (l.line != null ? `${l.path}:${l.line}` : l.path)).join(", ");
    if (d.diffs?.length) parts.diffs.replaceChildren(...d.diffs.map((diff) => renderDiff(diff, h)));
    if (d.output != null) {
      parts.output.textContent = d.output;
      parts.outputBox.hidden = !d.output;
    }
    if (d.truncated) parts.el.dataset.truncated = "true";
  };

  const permission = (event) => {
    const d = event.data;
    if (event.type === "PermissionRequested") {
      const call = d.tool_call_id || `permission ${d.request_id}`;
      asked.set(d.request_id, { call, options: d.options || [] });
      const parts = card(call);
      parts.permission.hidden = false;
      parts.permission.textContent = `Permission asked: ${d.title}`;
      if (answers?.enabled()) parts.permission.append(answerButtons(d, answers, h));
      return;
    }
    const request = asked.get(d.request_id);
    const parts = request && calls.get(request.call);
    if (!parts) return;
    const chosen = request.options.find((o) => o.option_id === d.option_id);
    const answer = d.outcome === "selected" ? (chosen ? chosen.name : d.option_id) : "cancelled";
    parts.permission.textContent = `Permission: ${answer} (${d.by})`;
    parts.permission.dataset.outcome = d.outcome;
  };

  const showPlan = (entries) => {
    plan.hidden = !entries.length;
    plan.replaceChildren(h("h3", {}, "Plan"), h("ol", {}, ...entries.map((e) =>
      h("li", { "data-status": e.status, "data-priority": e.priority }, e.content))));
  };

  const showUsage = (d) => {
    if (d.input_tokens != null) spent.input = (spent.input || 0) + d.input_tokens;
    if (d.output_tokens != null) spent.output = (spent.output || 0) + d.output_tokens;
    if (d.cost_amount != null) [spent.cost, spent.currency] = [d.cost_amount, d.cost_currency || ""];
    if (d.context_used != null) [spent.used, spent.size] = [d.context_used, d.context_size];
    const n = (x) => x.toLocaleString("en-US");
    const parts = [];
    if (spent.input != null || spent.output != null) parts.push(`${n(spent.input || 0)} in · ${n(spent.output || 0)} out tokens`);
    if (spent.cost != null) parts.push(`${spent.cost.toFixed(4)} ${spent.currency}`.trim());
    if (spent.used != null) parts.push(`context ${n(spent.used)} / ${n(spent.size || 0)}`);
    usage.hidden = !parts.length;
    usage.textContent = parts.join(" · ");
  };

  const event = (ev) => {
    const d = ev.data || {};
    if (ev.type === "ToolCallStarted" || ev.type === "ToolCallUpdated") updateCall(d);
    else if (ev.type === "PlanUpdated") showPlan(d.entries || []);
    else if (ev.type === "UsageRecorded") showUsage(d);
    else permission(ev);
  };
  return { output, event };
}

/** A person's answer to an open permission request: one button per option the agent offered. */
function answerButtons(request, answers, h) {
  const note = h("span", { class: "permission-note" }, " waiting for you: ");
  const buttons = (request.options || []).map((option) => {
    const button = h("button", { type: "button", class: `permission-option option-${option.kind}`,
      "data-option-id": option.option_id }, option.name || option.option_id);
    button.addEventListener("click", async () => {
      buttons.forEach((b) => { b.disabled = true; });
      const problem = await answers.send(request.request_id, option.option_id);
      note.textContent = problem ? ` ${problem} ` : ` answered “${option.name || option.option_id}”, the agent goes on… `;
      if (problem) buttons.forEach((b) => { b.disabled = false; });
    });
    return button;
  });
  return h("div", { class: "permission-answer", "data-request-id": request.request_id }, note, ...buttons);
}

/** A file's change as a unified diff: hunks of changed lines with CONTEXT lines around them. */
export function renderDiff(diff, h) {
  const lines = unifiedDiff(diff.old_text, diff.new_text);
  const what = diff.old_text == null ? "new file" : diff.truncated ? "cut to fit" : "";
  return h("div", { class: "diff", "data-path": diff.path },
    h("div", { class: "diff-head" }, h("code", {}, diff.path), what && h("span", { class: "diff-note" }, what)),
    h("pre", { class: "diff-body" }, ...lines.map(([kind, text]) =>
      h("span", { class: { "+": "diff-add", "-": "diff-del", " ": "diff-ctx", "@": "diff-hunk" }[kind] },
        kind === "@" ? `${text}\n` : `${kind}${text}\n`))));
}

/** [[kind, text]] for the change from `oldText` (null: a new file) to `newText`: kind "+", "-", " "
 *  or "@" (a hunk header "@@ -a,b +c,d @@"). */
export function unifiedDiff(oldText, newText) {
  const a = oldText == null || oldText === "" ? [] : oldText.replace(/\n$/, "").split("\n");
  const b = newText === "" ? [] : newText.replace(/\n$/, "").split("\n");
  const ops = lineOps(a, b);
  const hunks = []; // [first, last] changed op of each hunk; changes closer than 2 * CONTEXT share one
  ops.forEach(([kind], k) => {
    if (kind === " ") return;
    if (hunks.length && k - hunks.at(-1)[1] <= 2 * CONTEXT + 1) hunks.at(-1)[1] = k;
    else hunks.push([k, k]);
  });
  const out = [];
  for (const [first, last] of hunks) {
    const hunk = ops.slice(Math.max(0, first - CONTEXT), Math.min(ops.length, last + CONTEXT + 1));
    const [, , oldAt, newAt] = hunk[0];
    const oldCount = hunk.filter((o) => o[0] !== "+").length, newCount = hunk.filter((o) => o[0] !== "-").length;
    out.push(["@", `@@ -${oldCount ? oldAt : oldAt - 1},${oldCount} +${newCount ? newAt : newAt - 1},${newCount} @@`]);
    for (const [kind, text] of hunk) out.push([kind, text]);
  }
  return out;
}

/** [[kind, text, oldLineNo, newLineNo]] turning `a` into `b` (common ends kept, the middle by LCS). */
function lineOps(a, b) {
  let pre = 0;
  while (pre < a.length && pre < b.length && a[pre] === b[pre]) pre++;
  let suf = 0;
  while (suf < a.length - pre && suf < b.length - pre && a[a.length - 1 - suf] === b[b.length - 1 - suf]) suf++;
  const A = a.slice(pre, a.length - suf), B = b.slice(pre, b.length - suf);
  const middle = A.length * B.length <= MAX_LCS_CELLS ? lcs(A, B) : [...A.map((t) => ["-", t]), ...B.map((t) => ["+", t])];
  const ops = [...a.slice(0, pre).map((t) => [" ", t]), ...middle, ...a.slice(a.length - suf).map((t) => [" ", t])];
  let [oldNo, newNo] = [1, 1];
  return ops.map(([kind, text]) => {
    const op = [kind, text, oldNo, newNo];
    if (kind !== "+") oldNo++;
    if (kind !== "-") newNo++;
    return op;
  });
}

function lcs(A, B) {
  const m = B.length + 1;
  const table = new Uint32Array((A.length + 1) * m);
  for (let i = A.length - 1; i >= 0; i--)
    for (let j = B.length - 1; j >= 0; j--)
      table[i * m + j] = A[i] === B[j] ? table[(i + 1) * m + j + 1] + 1 : Math.max(table[(i + 1) * m + j], table[i * m + j + 1]);
  const ops = [];
  let [i, j] = [0, 0];
  while (i < A.length && j < B.length) {
    if (A[i] === B[j]) { ops.push([" ", A[i]]); i++; j++; }
    else if (table[(i + 1) * m + j] >= table[i * m + j + 1]) ops.push(["-", A[i++]]);
    else ops.push(["+", B[j++]]);
  }
  while (i < A.length) ops.push(["-", A[i++]]);
  while (j < B.length) ops.push(["+", B[j++]]);
  return ops;
}
