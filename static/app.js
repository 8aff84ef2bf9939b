// The playground: chat with streaming, and for adapted answers the episode itself (tree,
// vote, step metrics) from the `adaptation` report the server streams before the tokens.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models");
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    $("model").replaceChildren(...body.data.map((m) => new Option(m.id, m.id)));
  } catch (e) {
    showError("Could not list models: " + e.message);
  }
}

function metricValue(text, name) {
  let total = null;
  for (const line of text.split("\n")) {
    if (line.startsWith(name + "{") || line.startsWith(name + " ")) {
      total = (total || 0) + parseFloat(line.slice(line.lastIndexOf(" ") + 1));
    }
  }
  return total;
}

let lastTokens = null, lastTime = null;
async function pollStatus() {
  try {
    const text = await (await fetch("/metrics")).text();
    const now = Date.now() / 1000;
    const tokens = metricValue(text, "ttrl_generation_tokens_total") || 0;
    const show = (id, v) => { $(id).textContent = v === null ? "0" : String(Math.round(v * 10) / 10); };
    show("st-running", metricValue(text, "ttrl_requests_running"));
    show("st-waiting", metricValue(text, "ttrl_requests_waiting"));
    show("st-episodes", metricValue(text, "ttrl_adaptation_batches_total"));
    show("st-rollbacks", metricValue(text, "ttrl_adaptation_rollbacks_total"));
    if (lastTime !== null) show("st-tps", (tokens - lastTokens) / Math.max(1e-3, now - lastTime));
    lastTokens = tokens; lastTime = now;
  } catch (_) { /* the next poll retries */ }
}

// A measure to `digits` places, or a dash where the server sent null (not a number).
function fixed(v, digits) {
  return v === null ? "–" : v.toFixed(digits);
}

function entropyColour(h, max) {
  const t = Math.min(1, h / Math.max(1e-6, max));
  return `hsl(${210 - 210 * t}, 85%, ${92 - 30 * t}%)`;
}

function drawEpisode(a) {
  $("episode").hidden = false;
  $("ep-summary").textContent =
    `${a.method} · ${a.rollout} · adapter ${a.adapter || "(ephemeral)"} v${a.adapter_version_before} → v${a.adapter_version}` +
    ` · ${a.rollouts} leaves · ${a.rollout_tokens} rollout tokens (flat: ${a.flat_equivalent_tokens})` +
    ` · majority ${a.majority_answer === null ? "none" : a.majority_answer} (${Math.round(a.vote_share * 100)}%)` +
    ` · ${(a.duration_ms / 1000).toFixed(1)} s` + (a.rolled_back ? " · rolled back" : "") +
    (a.no_signal && !(a.note || "").includes(a.no_signal) ? ` · no signal: ${a.no_signal}` : "") +
    (a.note ? ` · ${a.note}` : "");
  const rows = a.step_metrics.map((s, i) => {
    const tr = document.createElement("tr");
    for (const v of [i + 1, fixed(s.loss, 4), fixed(s.kl, 4), fixed(s.mean_forking_entropy, 3), fixed(s.vote_share, 3), s.applied ? "yes" : "no"]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    return tr;
  });
  $("ep-steps").tBodies[0].replaceChildren(...rows);

  const svg = $("ep-votes"), ns = "http://www.w3.org/2000/svg";
  const votes = a.votes.slice(0, 12), max = Math.max(1, ...votes.map((v) => v[1])), bar = 22;
  svg.setAttribute("viewBox", `0 0 400 ${Math.max(1, votes.length) * bar + 4}`);
  svg.setAttribute("height", Math.max(1, votes.length) * bar + 4);
  svg.replaceChildren(...votes.flatMap(([answer, n], i) => {
    const win = answer === a.majority_answer;
    const rect = document.createElementNS(ns, "rect");
    Object.entries({ x: 110, y: i * bar + 2, width: (280 * n) / max, height: bar - 6, fill: win ? "#1a7f37" : "#8c959f", class: "vote-bar" })
      .forEach(([k, v]) => rect.setAttribute(k, v));
    rect.dataset.answer = answer; rect.dataset.votes = n;
    const label = document.createElementNS(ns, "text");
    Object.entries({ x: 104, y: i * bar + 15, "text-anchor": "end", "font-size": 12 }).forEach(([k, v]) => label.setAttribute(k, v));
    label.textContent = `${answer.slice(0, 14)} (${n})`;
    return [rect, label];
  }));

  const maxH = Math.max(...a.tree.flatMap((l) => l.entropies), 1e-6);
  $("ep-tree").replaceChildren(...a.tree.map((leaf, i) => {
    const li = document.createElement("li");
    li.className = (leaf.parent === null ? "root" : "branch") + (leaf.reward > 0 ? " rewarded" : "") +
      (leaf.truncated ? " truncated" : "") + (leaf.options_reversed ? " reversed" : "");
    li.dataset.leaf = i;
    const meta = document.createElement("span");
    meta.className = "meta";
    const order = leaf.options_reversed ? " (options reversed)" : "";
    meta.textContent = leaf.parent === null ? `#${i} root${order}: ` : `#${i}${order} ↳ from #${leaf.parent} at ${leaf.fork_at}: `;
    li.append(meta);
    leaf.tokens.forEach((t, j) => {
      const span = document.createElement("span");
      span.className = "tok" + (leaf.fork_at === j ? " fork" : "");
      span.style.background = entropyColour(leaf.entropies[j], maxH);
      span.title = `entropy ${leaf.entropies[j].toFixed(3)} nats`;
      span.textContent = t;
      li.append(span);
    });
    const tail = document.createElement("span");
    tail.className = "meta";
    tail.textContent = leaf.truncated
      ? "  → cut off by the rollout budget: abstains"
      : `  → ${leaf.answer === null ? "no answer" : leaf.answer}${leaf.options_reversed && leaf.answer !== null ? " as listed" : ""} (reward ${leaf.reward})`;
    li.append(tail);
    return li;
  }));
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").append(li);
  return li;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  showError("");
  history.push({ role: "user", content: text });
  const asked = addMessage("user", text);
  $("prompt").value = "";
  const out = addMessage("assistant", "");
  const body = {
    model: $("model").value || undefined, messages: history, stream: true,
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
    max_tokens: parseInt($("max_tokens").value, 10), seed: parseInt($("seed").value, 10),
  };
  if ($("adapt").checked) {
    body.adaptation = { enabled: true, method: $("method").value, rollout: $("rollout").value,
      samples: parseInt($("samples").value, 10), steps: parseInt($("steps").value, 10), answer_format: $("answer_format").value };
    if ($("adapter").value) body.adaptation.adapter = $("adapter").value;
  }
  $("send").disabled = true;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? `${err.error.message}${err.error.param ? ` (${err.error.param})` : ""}` : r.statusText);
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of frame.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.adaptation) drawEpisode(chunk.adaptation);
          for (const c of chunk.choices || []) if (c.delta && c.delta.content) out.textContent += c.delta.content;
        }
      }
    }
    history.push({ role: "assistant", content: out.textContent });
    document.body.dataset.answered = String(history.length);
  } catch (e) {
    showError(e.message);
    out.remove();
    asked.remove();
    history.pop();
  } finally {
    $("send").disabled = false;
    $("prompt").focus();
  }
}

$("ask").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
loadModels();
pollStatus();
setInterval(pollStatus, 2000);
