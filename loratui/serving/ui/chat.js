// loratui's chat page: talks to this server's OpenAI API only (same origin), no libraries, nothing from elsewhere.
"use strict";

const KEY_STORE = "loratui.apiKey";
const $ = (id) => document.getElementById(id);

const page = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  models: [], // from /ui/models: {id, role, backend, format, status}
  compare: false,
  pair: ["", ""], // the server's base-vs-tuned pair: alone, the tuned one; compared, base left and tuned right
  picked: false, // the user chose models: leave the choice alone
  columns: [], // {el, log, select, info, title, messages: [{role, content, model}], controller, epoch}
  keyWaiters: [],
  refused: false, // the key dialog was cancelled: no more asking on its own until the user asks
  health: "",
};

// ---- the API ------------------------------------------------------------------------------------------------

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (page.key) h["Authorization"] = "Bearer " + page.key;
  return h;
}

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// OpenAI's error shape {"error": {"message", ...}} as a readable message; anything else as its status line.
async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`;
  let code = null;
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) {
      message = body.error.message;
      code = body.error.code || null;
    }
  } catch (e) {
    /* not JSON: keep the status line */
  }
  return new ApiError(res.status, message, code);
}

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: headers(Boolean(options.body)) });
  if (!res.ok) throw await errorOf(res);
  return res;
}

// ---- the API key --------------------------------------------------------------------------------------------

// Opens the key dialog (once: a second caller waits for the same answer); resolves true when a key was given.
function askKey(message) {
  const dialog = $("key-dialog");
  if (!dialog.open) {
    $("key-message").textContent = message || "This server needs an API key.";
    $("key-input").value = "";
    dialog.showModal();
    $("key-input").focus();
  } else if (message) {
    $("key-message").textContent = message;
  }
  return new Promise((resolve) => page.keyWaiters.push(resolve));
}

function keyAnswered(key) {
  if (key) page.refused = false;
  if (key !== null) {
    page.key = key;
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
  }
  if ($("key-dialog").open) $("key-dialog").close();
  page.keyWaiters.splice(0).forEach((resolve) => resolve(Boolean(key)));
}

// Calls fn(); on 401 asks for the key (showing the server's message) and tries again with the new one.
async function withKey(fn, signal) {
  for (;;) {
    try {
      return await fn();
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401 || (signal && signal.aborted)) throw e;
      const hint = page.key ? e.message : "This server needs an API key.";
      if (!(await askKey(hint))) {
        page.refused = true;
        throw e;
      }
      if (signal && signal.aborted) throw e;
    }
  }
}

// ---- health and models --------------------------------------------------------------------------------------

async function pollHealth() {
  let state = "down";
  let text = "server unreachable";
  let title = "";
  try {
    const body = await (await fetch("/health")).json();
    state = body.status || "unknown";
    text = [`server ${body.status}`, body.backend, body.reason].filter(Boolean).join(" · ");
    title = body.serving || "";
  } catch (e) {
    /* unreachable: said as it is */
  }
  if (text !== page.health) {
    // written only when it changes: a status region re-announces every write
    page.health = text;
    const el = $("health");
    el.dataset.state = state;
    el.textContent = text;
    el.title = title;
  }
  const waiting = state === "loading" || page.models.length === 0;
  if (waiting && state !== "down" && !page.refused && !$("key-dialog").open) {
    loadModels(); // the model list arrives once the server is up
  }
}

function describe(id) {
  const m = page.models.find((x) => x.id === id);
  if (!m) return "";
  const parts = [m.role];
  if (m.backend) parts.push(m.backend);
  if (m.format) parts.push(m.format);
  if (m.status && m.status !== "ok") parts.push(m.status);
  return parts.join(" · ");
}

function fill(select, ids, wanted) {
  const now = Array.from(select.options, (o) => o.value);
  if (now.length === ids.length && now.every((id, i) => id === ids[i])) return; // unchanged: leave an open list be
  const keep = select.value;
  select.replaceChildren(
    ...ids.map((id) => {
      const option = document.createElement("option");
      option.value = option.textContent = id;
      return option;
    }),
  );
  select.value = ids.includes(keep) ? keep : ids.includes(wanted) ? wanted : ids[0] || "";
}

let loading = null;
function loadModels() {
  if (!loading) loading = fetchModels().finally(() => (loading = null)); // one at a time
  return loading;
}

async function fetchModels() {
  let body;
  try {
    body = await withKey(async () => (await api("/ui/models")).json());
  } catch (e) {
    notice(e.status === 401 ? `${e.message} Use “API key” above to try another.` : e.message);
    return;
  }
  const first = page.models.length === 0;
  page.models = body.models;
  const ids = body.models.map((m) => m.id);
  page.pair = body.compare || [ids[0], ids[1] || ids[0]];
  const [base, tuned] = page.pair;
  fill(page.columns[0].select, ids, page.compare ? base : tuned);
  fill(page.columns[1].select, ids, tuned);
  if (first) notice("");
  refreshTitles();
}

function refreshTitles() {
  page.columns.forEach((col) => {
    col.title.textContent = col.select.value || "no model";
    col.info.textContent = describe(col.select.value);
  });
}

// ---- the conversation ---------------------------------------------------------------------------------------

function active() {
  return page.compare ? page.columns : [page.columns[0]];
}

function busy() {
  return page.columns.some((c) => c.controller !== null);
}

function addMessage(col, message) {
  const li = document.createElement("li");
  li.className = `msg ${message.role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = message.role === "user" ? "you" : message.model;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = message.content;
  li.append(who, body);
  col.log.append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function setMeta(li, text) {
  let meta = li.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta";
    li.append(meta);
  }
  meta.textContent = text;
}

function settings() {
  const temperature = Number.parseFloat($("temperature").value);
  const maxTokens = Number.parseInt($("max-tokens").value, 10);
  const out = {};
  if (Number.isFinite(temperature)) out.temperature = temperature;
  if (Number.isFinite(maxTokens) && maxTokens > 0) out.max_tokens = maxTokens;
  return out;
}

// Server-sent events from a fetch body: calls onData(data) for each event's data (lines joined), to the end.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const flush = (final) => {
    buffer = buffer.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0 || (final && buffer)) {
      const event = cut >= 0 ? buffer.slice(0, cut) : buffer;
      buffer = cut >= 0 ? buffer.slice(cut + 2) : "";
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) onData(data);
    }
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    flush(false);
  }
  buffer += decoder.decode();
  flush(true);
}

// One reply streamed into its column: text appended as it comes, stoppable. Returns the reply (may be partial).
async function streamReply(col) {
  const model = col.select.value;
  const epoch = col.epoch;
  const system = $("system").value.trim();
  const history = col.messages.map(({ role, content }) => ({ role, content }));
  const messages = (system ? [{ role: "system", content: system }] : []).concat(history);
  const li = addMessage(col, { role: "assistant", content: "", model });
  const text = li.querySelector(".text");
  li.classList.add("streaming");
  li.dataset.chunks = "0";
  col.log.setAttribute("aria-busy", "true"); // read out once finished, not token by token
  const controller = (col.controller = new AbortController());
  updateButtons();
  const started = performance.now();
  let reply = "";
  let usage = null;
  let finish = null;
  let ended = false;
  try {
    const res = await withKey(
      () =>
        api("/v1/chat/completions", {
          method: "POST",
          body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...settings() }),
          signal: controller.signal,
        }),
      controller.signal,
    );
    await readEvents(res.body, (data) => {
      if (data === "[DONE]") {
        ended = true;
        return;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.message || "generation failed", chunk.error.code);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece) {
        reply += piece;
        text.textContent = reply;
        li.dataset.chunks = String(Number(li.dataset.chunks) + 1);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    if (!ended && !finish) throw new Error("the connection closed before the reply finished");
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? usage.completion_tokens : null;
    const rate = tokens && seconds > 0 ? ` · ${(tokens / seconds).toFixed(1)} tok/s` : "";
    setMeta(li, `${tokens ?? "?"} tokens in ${seconds.toFixed(1)} s${rate}${finish === "length" ? " · cut at max tokens" : ""}`);
    li.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") {
      setMeta(li, "stopped");
      li.dataset.state = "stopped";
    } else {
      li.classList.add("error");
      li.dataset.state = "error";
      setMeta(li, e instanceof ApiError && e.status ? `Error ${e.status}: ${e.message}` : `Error: ${e.message}`);
    }
  } finally {
    li.classList.remove("streaming");
    col.log.removeAttribute("aria-busy");
    col.controller = null;
    updateButtons();
  }
  if (col.epoch !== epoch) return; // cleared meanwhile: this reply belongs to no conversation
  if (reply) {
    col.messages.push({ role: "assistant", content: reply, model }); // a stopped reply stays in the conversation
  } else {
    // no reply at all (an error, or stopped at once): the question leaves the conversation too, so the next
    // request does not carry two user turns in a row (templates that need them to alternate would refuse it)
    col.messages.pop();
    const asked = li.previousElementSibling;
    if (asked) {
      asked.classList.add("dropped");
      setMeta(asked, "not kept: no reply");
    }
  }
}

async function send() {
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || busy()) return;
  if (!page.columns[0].select.value) {
    notice("No model to talk to yet: the server is still loading, or it needs the API key.");
    loadModels();
    return;
  }
  notice("");
  prompt.value = "";
  const cols = active();
  cols.forEach((col) => {
    const message = { role: "user", content: text, model: null };
    col.messages.push(message);
    addMessage(col, message);
  });
  await Promise.all(cols.map(streamReply));
  loadModels(); // a model loaded on first use now says what serves it
  prompt.focus();
}

function stop() {
  page.columns.forEach((col) => col.controller && col.controller.abort());
}

function render(col) {
  col.log.replaceChildren();
  col.messages.forEach((m) => addMessage(col, m));
}

function clearAll() {
  stop();
  page.columns.forEach((col) => {
    col.epoch += 1;
    col.messages = [];
    render(col);
  });
  notice("");
  $("prompt").focus();
}

function transcript() {
  return active()
    .map((col) => {
      const lines = col.messages.map((m) => `${m.role === "user" ? "User" : `Assistant (${m.model})`}: ${m.content}`);
      return `## ${col.select.value}\n\n${lines.join("\n\n")}`;
    })
    .join("\n\n");
}

async function copyAll() {
  const text = transcript();
  let copied = true;
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    // no clipboard API (a plain-http page on another host): copy through a selected text area
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    copied = document.execCommand("copy");
    area.remove();
  }
  notice(copied ? "Conversation copied." : "The browser did not allow copying.", copied ? "info" : "error");
}

function notice(message, kind = "error") {
  const el = $("notice");
  el.setAttribute("role", kind === "error" ? "alert" : "status");
  el.textContent = message;
  el.className = `notice ${kind}`;
  el.hidden = !message;
}

function updateButtons() {
  const running = busy();
  $("send").disabled = running;
  $("stop").disabled = !running;
  $("compare").disabled = running; // the two columns change only between replies
}

function setCompare(on) {
  page.compare = on;
  const [a, b] = page.columns;
  b.el.hidden = !on;
  b.select.disabled = !on;
  $("columns").classList.toggle("compare", on);
  if (!page.picked && page.pair[0]) {
    a.select.value = on ? page.pair[0] : page.pair[1];
    b.select.value = page.pair[1];
    refreshTitles();
  }
  if (on) {
    // the second model takes up the first one's conversation as it is now
    b.epoch += 1;
    b.messages = a.messages.map((m) => ({ ...m }));
    render(b);
  }
}

// ---- wiring -------------------------------------------------------------------------------------------------

function init() {
  page.columns = ["a", "b"].map((side) => ({
    el: $(`col-${side}`),
    log: $(`col-${side}`).querySelector(".log"),
    select: $(`model-${side}`),
    info: $(`info-${side}`),
    title: $(`title-${side}`),
    messages: [],
    controller: null,
    epoch: 0,
  }));
  page.columns.forEach((col) =>
    col.select.addEventListener("change", () => {
      page.picked = true;
      refreshTitles();
    }),
  );
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && busy() && !$("key-dialog").open) {
      e.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearAll);
  $("copy").addEventListener("click", copyAll);
  $("compare").addEventListener("change", (e) => setCompare(e.target.checked));
  $("settings-toggle").addEventListener("click", (e) => {
    const open = e.currentTarget.getAttribute("aria-expanded") !== "true";
    e.currentTarget.setAttribute("aria-expanded", String(open));
    $("settings").hidden = !open;
  });
  $("key-button").addEventListener("click", async () => {
    if (await askKey("The API key to use from now on (empty: none).")) notice("");
    loadModels();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    keyAnswered($("key-input").value.trim());
  });
  $("key-cancel").addEventListener("click", () => keyAnswered(null));
  $("key-dialog").addEventListener("cancel", () => page.keyWaiters.splice(0).forEach((resolve) => resolve(false)));
  if (window.matchMedia("(max-width: 720px)").matches) {
    // a phone: the conversation gets the screen, the settings one tap away
    $("settings-toggle").setAttribute("aria-expanded", "false");
    $("settings").hidden = true;
  }
  setCompare(false);
  updateButtons();
  pollHealth();
  setInterval(pollHealth, 5000);
  setInterval(() => !busy() && page.models.length && !$("key-dialog").open && loadModels(), 15000); // new models
  loadModels();
  $("prompt").focus();
}

document.addEventListener("DOMContentLoaded", init);
