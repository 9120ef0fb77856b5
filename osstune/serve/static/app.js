// The web chat page: plain JavaScript, no build step, nothing fetched but this server's own API.
// It streams /v1/chat/completions (server-sent events), shows the reasoning folded in <details>,
// and keeps the conversation in the page (the server keeps none).
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), sendButton = $("send"), stopButton = $("stop");
let history = [];
let controller = null;

$("api-key").value = localStorage.getItem("osstune-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("osstune-api-key", $("api-key").value); loadModels(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text) { $("status").textContent = text; }

async function errorText(response) {
  try { const body = await response.json(); return body.error ? body.error.message : JSON.stringify(body); }
  catch (e) { return response.status + " " + response.statusText; }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) { status("models: " + await errorText(response)); return; }
  const select = $("model"), current = select.value;
  select.textContent = "";
  for (const m of (await response.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = m.id;
    select.appendChild(option);
  }
  if (current) select.value = current;
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  log.appendChild(div);
  return div;
}

function assistantBubble() {
  const div = bubble("assistant");
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "reasoning";
  const reasoning = document.createElement("div");
  details.append(summary, reasoning);
  details.hidden = true;
  const content = document.createElement("div");
  content.className = "content";
  div.append(details, content);
  return { div, details, reasoning, content, calls: {} };
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user").textContent = text;
  const view = assistantBubble();
  controller = new AbortController();
  sendButton.disabled = true; stopButton.disabled = false;
  status("generating...");
  let answer = "", finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value, messages: history, stream: true,
        reasoning_effort: $("effort").value, max_tokens: parseInt($("max-tokens").value, 10) || undefined,
        temperature: parseFloat($("temperature").value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        for (const choice of chunk.choices) {
          const d = choice.delta || {};
          if (d.reasoning) { view.details.hidden = false; view.reasoning.textContent += d.reasoning; }
          if (d.content) { answer += d.content; view.content.textContent = answer; }
          for (const call of d.tool_calls || []) {
            let el = view.calls[call.index];
            if (!el) { el = view.calls[call.index] = document.createElement("div"); el.className = "tool-call"; el.textContent = "call " + call.function.name + " "; view.div.appendChild(el); }
            el.textContent += call.function.arguments || "";
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        log.scrollTop = log.scrollHeight;
      }
    }
    status("finished: " + finish);
  } catch (e) {
    if (e.name === "AbortError") { finish = "stopped"; status("stopped"); }
    else { status("error: " + e.message); note(view, e.message); }
  } finally {
    controller = null;
    sendButton.disabled = false; stopButton.disabled = true;
  }
  if (finish === "harmony_parse_error") {
    // Raw text may spell out harmony's control tokens, which a message may not hold: the turn is
    // left out of the conversation sent next time, and the page says so.
    note(view, "the model's output is not valid harmony: shown as raw text, left out of the conversation");
    history.pop();
  } else if (answer) history.push({ role: "assistant", content: answer });
  else history.pop();  // nothing to keep: the next message starts from the previous turn
  view.div.dataset.finish = finish || "error";
}

function note(view, text) {
  const el = document.createElement("div");
  el.className = "note";
  el.textContent = text;
  view.div.appendChild(el);
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
stopButton.addEventListener("click", () => { if (controller) controller.abort(); });
$("new-chat").addEventListener("click", () => { if (controller) controller.abort(); history = []; log.textContent = ""; status(""); });

loadModels();
