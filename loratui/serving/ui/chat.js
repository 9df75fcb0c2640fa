// loratui's chat page: talks to this server's OpenAI API only (same origin), no libraries, nothing from elsewhere.
"use strict";

const KEY_STORE = "loratui.apiKey";
const $ = (id) => document.getElementById(id);

const page = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  models: [], // from /ui/models: {id, role, backend, format, status}
  compare: false,
  columns: [
    { el: null, select: null, info: null, title: null, messages: [], controller: null },
    { el: null, select: null, info: null, title: null, messages: [], controller: null },
  ],
  keyWaiters: [],
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

function askKey(message) {
  $("key-message").textContent = message || "This server needs an API key.";
  $("key-input").value = "";
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
  return new Promise((resolve) => page.keyWaiters.push(resolve));
}

function keyGiven(key) {
  page.key = key;
  if (key) sessionStorage.setItem(KEY_STORE, key);
  else sessionStorage.removeItem(KEY_STORE);
  $("key-dialog").close();
  const waiters = page.keyWaiters.splice(0);
  waiters.forEach((resolve) => resolve(Boolean(key)));
}

// Calls fn(); on 401 asks for the key (showing the server's message) and tries again with the new one.
async function withKey(fn) {
  for (;;) {
    try {
      return await fn();
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 401) throw e;
      const hint = page.key ? e.message : "This server needs an API key.";
      if (!(await askKey(hint))) throw e;
    }
  }
}

// ---- health and models --------------------------------------------------------------------------------------

async function pollHealth() {
  const el = $("health");
  try {
    const res = await fetch("/health");
    const body = await res.json();
    el.dataset.state = body.status || "unknown";
    const parts = [`server ${body.status}`];
    if (body.backend) parts.push(body.backend);
    if (body.reason) parts.push(body.reason);
    el.textContent = parts.join(" · ");
    el.title = body.serving || "";
    if (body.status === "loading") setTimeout(loadModels, 1500);
  } catch (e) {
    el.dataset.state = "down";
    el.textContent = "server unreachable";
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
  const keep = select.value || wanted;
  select.replaceChildren(
    ...ids.map((id) => {
      const option = document.createElement("option");
      option.value = option.textContent = id;
      return option;
    }),
  );
  select.value = ids.includes(keep) ? keep : ids.includes(wanted) ? wanted : ids[0] || "";
}

async function loadModels() {
  let body;
  try {
    body = await withKey(async () => (await api("/ui/models")).json());
  } catch (e) {
    notice(e.message);
    return;
  }
  const first = page.models.length === 0;
  page.models = body.models;
  const ids = body.models.map((m) => m.id);
  const [a, b] = body.compare || [ids[0], ids[1] || ids[0]];
  fill(page.columns[0].select, ids, a);
  fill(page.columns[1].select, ids, b);
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

function addMessage(col, role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : role === "assistant" ? col.select.value : "error";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  col.el.querySelector(".log").append(li);
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

// One reply streamed into its column: server-sent events, text appended as it comes, stoppable.
async function streamReply(col) {
  const model = col.select.value;
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(col.messages);
  const li = addMessage(col, "assistant", "");
  const text = li.querySelector(".text");
  li.classList.add("streaming");
  li.dataset.chunks = "0";
  col.controller = new AbortController();
  updateButtons();
  const started = performance.now();
  let reply = "";
  let usage = null;
  let finish = null;
  try {
    const res = await withKey(() =>
      api("/v1/chat/completions", {
        method: "POST",
        body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true }, ...settings() }),
        signal: col.controller.signal,
      }),
    );
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(500, chunk.error.message || "generation failed", chunk.error.code);
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            reply += piece;
            text.textContent = reply;
            li.dataset.chunks = String(Number(li.dataset.chunks) + 1);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
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
      setMeta(li, e instanceof ApiError ? `Error ${e.status}: ${e.message}` : `Error: ${e.message}`);
    }
  } finally {
    li.classList.remove("streaming");
    col.controller = null;
    updateButtons();
  }
  if (reply) col.messages.push({ role: "assistant", content: reply }); // a stopped reply stays in the conversation
}

async function send() {
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || busy()) return;
  if (!page.columns[0].select.value) {
    notice("No model to talk to yet: the server is still loading, or the API key is missing.");
    return;
  }
  notice("");
  prompt.value = "";
  const cols = active();
  cols.forEach((col) => {
    col.messages.push({ role: "user", content: text });
    addMessage(col, "user", text);
  });
  await Promise.all(cols.map(streamReply));
  loadModels(); // a model loaded on first use now says what serves it
  prompt.focus();
}

function stop() {
  page.columns.forEach((col) => col.controller && col.controller.abort());
}

function clearAll() {
  stop();
  page.columns.forEach((col) => {
    col.messages = [];
    col.el.querySelector(".log").replaceChildren();
  });
  notice("");
  $("prompt").focus();
}

function transcript() {
  return active()
    .map((col) => {
      const lines = col.messages.map((m) => `${m.role === "user" ? "User" : "Assistant"}: ${m.content}`);
      return `## ${col.select.value}\n\n${lines.join("\n\n")}`;
    })
    .join("\n\n");
}

async function copyAll() {
  const text = transcript();
  try {
    await navigator.clipboard.writeText(text);
  } catch (e) {
    // no clipboard API (a plain-http page on another host): copy through a selected text area
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  notice("Conversation copied.", "info");
}

function notice(message, kind = "error") {
  const el = $("notice");
  el.textContent = message;
  el.className = `notice ${kind}`;
  el.hidden = !message;
}

function updateButtons() {
  const running = busy();
  $("send").disabled = running;
  $("stop").disabled = !running;
}

function setCompare(on) {
  page.compare = on;
  const [a, b] = page.columns;
  b.el.hidden = !on;
  b.select.disabled = !on;
  $("columns").classList.toggle("compare", on);
  if (on && b.messages.length === 0 && a.messages.length > 0) {
    // the second model continues the same conversation
    b.messages = a.messages.map((m) => ({ ...m }));
    b.messages.forEach((m) => addMessage(b, m.role, m.content));
  }
}

// ---- wiring -------------------------------------------------------------------------------------------------

function init() {
  ["a", "b"].forEach((side, i) => {
    const col = page.columns[i];
    col.el = $(`col-${side}`);
    col.select = $(`model-${side}`);
    col.info = $(`info-${side}`);
    col.title = $(`title-${side}`);
    col.select.addEventListener("change", refreshTitles);
  });
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
    if (e.key === "Escape" && busy()) {
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
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    keyGiven($("key-input").value.trim());
  });
  $("key-cancel").addEventListener("click", () => {
    $("key-dialog").close();
    page.keyWaiters.splice(0).forEach((resolve) => resolve(false));
  });
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
  setInterval(() => !busy() && page.models.length && loadModels(), 15000); // new fine-tuned models appear
  loadModels();
  $("prompt").focus();
}

document.addEventListener("DOMContentLoaded", init);
