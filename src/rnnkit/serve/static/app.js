// The rnnkit serve page: one session, a WebSocket, and the model's output as you type.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#4a7bd0", "#d0584a", "#4aa05a", "#c49a2a", "#8a5ac0", "#3aa0a8", "#777"];
const page = { info: null, ws: null, sent: "", acked: "", pending: [], history: [] };

function token() { return $("token").value.trim(); }

async function api(method, path) {
  const headers = token() ? { Authorization: "Bearer " + token() } : {};
  const response = await fetch(path, { method, headers });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function status(message) { $("status").textContent = message || ""; }

// What one keystroke sends: characters for text models; whole tokens/numbers otherwise.
function pieces(text) {
  if (page.info.input === "text") return null;
  const parts = text.split(/[\s,]+/);
  const complete = /[\s,]$/.test(text) ? parts : parts.slice(0, -1);
  return complete.filter((p) => p.length > 0);
}

function messageFor(newText) {
  if (typeof newText === "string") return { input: newText };
  if (page.info.task === "forecast") return { input: newText.map(Number) };
  return { input: newText.join(" ") };
}

function onType() {
  const text = $("text").value;
  const split = pieces(text);
  if (split === null) {
    if (!text.startsWith(page.sent)) restart();
    const fresh = text.slice(page.sent.length);
    if (fresh) send(fresh, messageFor(fresh));
    return;
  }
  const sentParts = pieces(page.sent + " ") || [];
  const same = sentParts.every((p, i) => split[i] === p);
  if (!same) restart();
  const already = same ? sentParts.length : 0;
  const fresh = split.slice(already);
  if (fresh.length) send(fresh.join(" ") + " ", messageFor(fresh));
}

function restart() {
  page.ws.send(JSON.stringify({ reset: true }));
  page.pending.push({ reset: true });
  page.sent = "";
  page.acked = "";
  page.history = [];
}

function send(part, message) {
  page.sent += part;
  page.pending.push({ part });
  page.ws.send(JSON.stringify(message));
}

function onAnswer(event) {
  const answer = JSON.parse(event.data);
  const request = page.pending.shift() || {};
  if (answer.error) {
    status(answer.error);
    page.sent = page.acked;
    return;
  }
  if (answer.reset) { show(null); return; }
  status("");
  page.acked += request.part || "";
  for (const entry of answer.outputs) page.history.push(entry);
  show(answer.outputs[answer.outputs.length - 1]);
}

function visible(name) {
  return name === "\n" ? "\u23ce" : name === " " ? "\u2423" : name === "\t" ? "\u21e5" : name;
}

function show(entry) {
  const box = $("predictions");
  box.replaceChildren();
  if (entry && entry.top) {
    for (const [name, p] of entry.top) {
      const item = document.createElement("span");
      item.className = "suggestion";
      item.textContent = `${visible(name)} ${(100 * p).toFixed(1)}%`;
      item.title = "click to type it";
      item.onclick = () => { $("text").value += name; onType(); };
      box.appendChild(item);
    }
  } else if (entry && entry.probs) {
    Object.entries(entry.probs).forEach(([label, p], i) => {
      const row = document.createElement("div");
      row.className = "bar-row";
      const name = document.createElement("span");
      name.className = "bar-label";
      name.textContent = label;
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(300 * p)}px`;
      bar.style.background = COLORS[i % COLORS.length];
      const value = document.createElement("span");
      value.textContent = `${(100 * p).toFixed(1)}%`;
      row.append(name, bar, value);
      box.appendChild(row);
    });
  } else if (entry && "next" in entry) {
    box.textContent = entry.next === null
      ? `next value: after ${page.info.needs} values`
      : `next value: ${JSON.stringify(entry.next)}`;
  } else if (entry && entry.tag) {
    box.textContent = page.history.map((e) => `${e.token}/${e.tag}`).join(" ");
  }
  plot();
}

// The output over time: the likeliest next character's probability (lm), each class's
// probability (classify), or the forecast of the next value (forecast).
function plot() {
  const svg = $("plot");
  svg.replaceChildren();
  const series = {};
  for (const entry of page.history) {
    if (entry.top) (series.top ||= []).push(entry.top[0][1]);
    if (entry.probs) for (const [k, p] of Object.entries(entry.probs)) (series[k] ||= []).push(p);
    if ("next" in entry) (series.next ||= []).push(entry.next === null ? NaN : [].concat(entry.next)[0]);
  }
  const all = Object.values(series).flat().filter(Number.isFinite);
  if (!all.length) return;
  const low = page.info.task === "forecast" ? Math.min(...all) : 0;
  const high = page.info.task === "forecast" ? Math.max(...all) : 1;
  const span = high - low || 1;
  Object.entries(series).forEach(([name, values], i) => {
    const n = Math.max(values.length - 1, 1);
    const points = values.map((v, t) => Number.isFinite(v)
      ? `${(600 * t / n).toFixed(1)},${(135 - 130 * (v - low) / span).toFixed(1)}` : null)
      .filter(Boolean).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points);
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", COLORS[i % COLORS.length]);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("data-series", name);
    svg.appendChild(line);
  });
  $("plot-label").textContent = {
    lm: "probability of the likeliest next character, step by step",
    music: "probability of the likeliest next token, step by step",
    classify: "class probabilities, step by step",
    forecast: "forecast of the next value, step by step",
  }[page.info.task] || "";
}

async function connect() {
  try {
    page.info = await api("GET", "/v1/model");
  } catch (error) {
    status(`${error.message}: enter the token above`);
    return;
  }
  $("model").textContent = `${page.info.model} (${page.info.task}) from ${page.info.run}: `
    + `type ${page.info.input}; ${page.info.state.bytes_per_session} bytes of state per session`;
  const session = await api("POST", "/v1/sessions");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = `${scheme}//${location.host}/v1/sessions/${session.id}/stream`;
  page.ws = token() ? new WebSocket(url, ["bearer." + token()]) : new WebSocket(url);
  page.ws.onmessage = onAnswer;
  page.ws.onclose = () => status("disconnected: reload the page to start a new session");
  page.ws.onopen = () => {
    $("text").disabled = false;
    $("text").focus();
    if ($("text").value) onType();
  };
}

$("text").addEventListener("input", onType);
$("token").addEventListener("change", () => { if (!page.ws) connect(); });
connect();
