// carousel playground: a client of the public v1 API, in plain JavaScript (no build step,
// nothing loaded from elsewhere; the page's Content-Security-Policy allows no inline code).
//
// The page holds a list of sessions it made (a fork adds one) and, for each, the text it
// sent and the text generated, so switching sessions shows that session's story. The
// server holds the state: Step sends new text to POST /v1/sessions/{id}/step (asking for
// the likeliest next bytes, drawn as the bar chart); Generate steps any new text, then
// streams POST /v1/sessions/{id}/generate as server-sent events. EventSource can only GET,
// so the stream is read from fetch's ReadableStream and parsed here.
"use strict";

const TOP_K = 10; // bars in the next-byte chart

const $ = (id) => document.getElementById(id);
const ui = {
  apiKey: $("api-key"),
  model: $("model"),
  version: $("version"),
  maxTokens: $("max-tokens"),
  temperature: $("temperature"),
  topP: $("top-p"),
  seed: $("seed"),
  session: $("session"),
  sessionId: $("session-id"),
  position: $("position"),
  fork: $("fork"),
  reset: $("reset"),
  transcript: $("transcript"),
  input: $("input"),
  step: $("step"),
  generate: $("generate"),
  stop: $("stop"),
  status: $("status"),
  chartCaption: $("chart-caption"),
  bars: $("bars"),
};

const state = {
  models: [], // GET /v1/models entries
  sessions: [], // {id, label, model, version, position, parts: [{kind, text}], chart}
  current: null, // the session in use; null: the next Step or Generate makes one
  made: 0, // sessions made so far, for their labels (s1, s2, ...)
  controller: null, // aborts the generation being streamed
};

// ------------------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function call(method, path, body, signal) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = ui.apiKey.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`; // ignored by a server without auth
  const resp = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

async function errorOf(resp) {
  let code = "http_error";
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = body.error.message || message;
    }
  } catch (e) {
    // not JSON: keep the status line
  }
  if (resp.status === 401 || resp.status === 403) {
    message += " (this server needs an API key: enter it above)";
  }
  return new ApiError(resp.status, code, message);
}

async function json(method, path, body) {
  return (await call(method, path, body)).json();
}

// Server-sent events from a fetch body: yields {event, data} with data parsed as JSON.
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event) yield event;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // blank, or a comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: JSON.parse(data.join("\n")) } : null;
}

// ------------------------------------------------------------------------- sessions

async function ensureSession() {
  if (state.current) return state.current;
  const body = { model: ui.model.value };
  if (ui.version.value) body.version = Number(ui.version.value);
  const made = await json("POST", "/v1/sessions", body);
  return adopt({ ...fromServer(made), parts: [], chart: null });
}

function fromServer(record) {
  state.made += 1;
  return {
    id: record.session_id,
    label: `s${state.made}`,
    model: record.model,
    version: record.version,
    position: record.position,
  };
}

function adopt(session) {
  state.sessions.push(session);
  state.current = session;
  render();
  return session;
}

async function step(session, text) {
  const answer = await json("POST", `/v1/sessions/${session.id}/step`, { text, top_k: TOP_K });
  session.parts.push({ kind: "fed", text });
  session.position = answer.position;
  session.chart = { position: answer.position, topK: answer.top_k };
  render();
}

function samplingOptions() {
  const options = {
    max_tokens: Number(ui.maxTokens.value),
    temperature: Number(ui.temperature.value),
    top_p: Number(ui.topP.value),
    stream: true,
  };
  if (ui.seed.value.trim() !== "") options.seed = Number(ui.seed.value);
  return options;
}

async function generate(session) {
  state.controller = new AbortController();
  const resp = await call("POST", `/v1/sessions/${session.id}/generate`, samplingOptions(),
    state.controller.signal);
  const part = { kind: "generated", text: "" };
  session.parts.push(part);
  const span = appendPart(part);
  let end = null;
  for await (const { event, data } of serverSentEvents(resp.body)) {
    if (event === "end") {
      end = data;
    } else {
      part.text += data.text;
      span.append(data.text); // a text node per token: the text grows as it arrives
      ui.transcript.scrollTop = ui.transcript.scrollHeight;
    }
    session.position = data.position;
    ui.position.textContent = String(session.position);
  }
  return end;
}

// ------------------------------------------------------------------------- actions

// One action at a time; the buttons say so by being disabled meanwhile.
async function run(what, action) {
  setBusy(true, what === "generate");
  showStatus(`${what}…`);
  try {
    showStatus(await action());
  } catch (e) {
    if (e.name === "AbortError") {
      showStatus("Stopped: the session keeps what was generated.");
      await refreshPosition();
    } else {
      showStatus(e instanceof ApiError ? `${e.code}: ${e.message}` : String(e), true);
      if (e.status === 401 || e.status === 403) ui.apiKey.focus();
    }
  } finally {
    state.controller = null;
    setBusy(false, false);
  }
}

async function onStep() {
  const text = ui.input.value;
  if (!text) return "Type some text to send first.";
  const session = await ensureSession();
  await step(session, text);
  ui.input.value = "";
  return `Stepped ${new TextEncoder().encode(text).length} bytes; position ${session.position}.`;
}

async function onGenerate() {
  const session = await ensureSession();
  const text = ui.input.value;
  if (text) {
    await step(session, text);
    ui.input.value = "";
  }
  const end = await generate(session);
  if (!end) return "The stream ended early.";
  return `Finished (${end.finish_reason}); seed ${end.seed}; position ${end.position}.`;
}

async function onFork() {
  const parent = state.current;
  if (!parent) return "Nothing to fork yet: step or generate first.";
  const made = await json("POST", `/v1/sessions/${parent.id}/fork`);
  const child = adopt({
    ...fromServer(made),
    parts: parent.parts.map((p) => ({ ...p })),
    chart: parent.chart,
  });
  return `Forked ${parent.label} into ${child.label}: both continue from position ${child.position}.`;
}

async function onReset() {
  const session = state.current;
  if (!session) return "Nothing to reset.";
  state.sessions = state.sessions.filter((s) => s !== session);
  state.current = null;
  render();
  try {
    await call("DELETE", `/v1/sessions/${session.id}`);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) throw e; // already expired: fine
  }
  return `Reset: ${session.label} is deleted; the next Step or Generate starts a new session.`;
}

async function refreshPosition() {
  const session = state.current;
  if (!session) return;
  try {
    session.position = (await json("GET", `/v1/sessions/${session.id}`)).position;
    ui.position.textContent = String(session.position);
  } catch (e) {
    // the status line already tells what happened
  }
}

// ------------------------------------------------------------------------- rendering

function render() {
  renderSessionList();
  const session = state.current;
  ui.sessionId.textContent = session ? `${session.label} · ${session.id}` : "none yet";
  ui.position.textContent = String(session ? session.position : 0);
  ui.transcript.replaceChildren();
  for (const part of session ? session.parts : []) appendPart(part);
  renderChart(session ? session.chart : null);
}

function renderSessionList() {
  const options = state.sessions.map((s) => {
    const option = new Option(`${s.label} · ${s.model} v${s.version}`, s.id);
    option.selected = s === state.current;
    return option;
  });
  const fresh = new Option("new session", "");
  fresh.selected = state.current === null;
  ui.session.replaceChildren(fresh, ...options);
}

function appendPart(part) {
  const span = document.createElement("span");
  span.className = part.kind;
  span.textContent = part.text;
  ui.transcript.append(span);
  return span;
}

function renderChart(chart) {
  ui.bars.replaceChildren();
  if (!chart) {
    ui.chartCaption.textContent = "Step or generate to see the distribution of the next byte.";
    return;
  }
  ui.chartCaption.textContent =
    `The ${chart.topK.length} likeliest next bytes after position ${chart.position}.`;
  for (const entry of chart.topK) {
    const p = Math.exp(entry.logprob);
    const item = document.createElement("li");
    item.dataset.token = String(entry.token);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = byteLabel(entry);
    label.title = `byte ${entry.token} (0x${entry.token.toString(16).padStart(2, "0")})`;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = `${(100 * p).toFixed(2)}%`; // CSSOM, not a style attribute: CSP-safe
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(p);
    item.append(label, track, pct);
    ui.bars.append(item);
  }
}

// Bytes that print as nothing get a visible stand-in (plain ASCII: any font has it).
const NAMED_BYTES = { 9: "\\t", 10: "\\n", 13: "\\r", 32: "space" };

function byteLabel(entry) {
  if (entry.token in NAMED_BYTES) return NAMED_BYTES[entry.token];
  if (entry.token < 32 || entry.token === 127) {
    return `\\x${entry.token.toString(16).padStart(2, "0")}`;
  }
  return entry.text; // a character, or the server's \xNN for part of one
}

function percent(p) {
  const pct = 100 * p;
  return `${pct >= 0.1 ? pct.toFixed(1) : pct.toPrecision(2)}%`; // small ones stay visible
}

function showStatus(message, isError = false) {
  ui.status.textContent = message;
  ui.status.classList.toggle("error", isError);
}

function setBusy(busy, generating) {
  for (const control of [ui.step, ui.generate, ui.fork, ui.reset, ui.session, ui.model,
    ui.version]) {
    control.disabled = busy;
  }
  ui.stop.disabled = !generating;
}

// ------------------------------------------------------------------------- models

async function loadModels() {
  state.models = (await json("GET", "/v1/models")).models;
  const names = [...new Set(state.models.map((m) => m.name))];
  ui.model.replaceChildren(...names.map((name) => new Option(name, name)));
  renderVersions();
}

function renderVersions() {
  const versions = state.models.filter((m) => m.name === ui.model.value);
  const latest = versions.find((m) => m.latest);
  const options = [new Option(`latest${latest ? ` (${latest.version})` : ""}`, "")];
  for (const m of versions) options.push(new Option(String(m.version), String(m.version)));
  ui.version.replaceChildren(...options);
}

// ------------------------------------------------------------------------- wiring

function wire() {
  ui.step.addEventListener("click", () => run("step", onStep));
  ui.generate.addEventListener("click", () => run("generate", onGenerate));
  ui.fork.addEventListener("click", () => run("fork", onFork));
  ui.reset.addEventListener("click", () => run("reset", onReset));
  ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !ui.generate.disabled) {
      event.preventDefault();
      run("generate", onGenerate);
    }
  });
  ui.model.addEventListener("change", () => {
    renderVersions();
    state.current = null; // the next Step or Generate makes a session of this model
    render();
  });
  ui.version.addEventListener("change", () => {
    state.current = null;
    render();
  });
  ui.session.addEventListener("change", () => {
    state.current = state.sessions.find((s) => s.id === ui.session.value) || null;
    if (state.current) {
      ui.model.value = state.current.model;
      renderVersions();
      ui.version.value = String(state.current.version);
    }
    render();
  });
  ui.apiKey.addEventListener("change", () => run("load models", startUp));
}

async function startUp() {
  await loadModels();
  return "Ready: type some text and press Generate.";
}

wire();
render();
run("load models", startUp);
