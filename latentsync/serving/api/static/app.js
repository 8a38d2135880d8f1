// LatentSync-Realtime control page: channel choice, WHEP player, uploads, text to speech, microphone,
// tasks, health (live via /events), avatars. Plain browser APIs only (no build step, nothing from a
// CDN). Docs: docs/webrtc.md (the page), docs/channels.md (channels and avatars).
"use strict";

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const tokenInput = $("token");
tokenInput.value = localStorage.getItem("latentsync.token") || "";
tokenInput.addEventListener("change", () => {
  localStorage.setItem("latentsync.token", tokenInput.value.trim());
  connectEvents();
  watch();
  refreshChannels();
  refreshAvatars();
});

function authHeaders(extra = {}) {
  const token = tokenInput.value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function say(text) { $("message").textContent = text; }

async function errorBody(response) {
  try { const body = await response.json(); return body.error || { code: `http_${response.status}`, message: "" }; }
  catch (_) { return { code: `http_${response.status}`, message: "" }; }
}
async function errorText(response) {
  const e = await errorBody(response);
  return e.message ? `${e.code}: ${e.message}` : `HTTP ${response.status}`;
}

// ------------------------------------------------------------------ channel choice (GET /channels, #channel=<name>)
// Every route the page uses is the channel's: main keeps today's paths (/whep, /events, ...), any other
// channel <name> uses /channels/<name>/... (docs/channels.md). The choice lives in the URL hash.
const MAIN = "main";
const CHANNEL_NAME_RE = /^[a-z0-9][a-z0-9_-]{0,31}$/;  // latentsync/config/channels.py's channel name pattern
let channel = MAIN;

function base(name = channel) { return name === MAIN ? "" : `/channels/${encodeURIComponent(name)}`; }

function channelFromHash() {
  const m = /(?:^#|&)channel=([^&]*)/.exec(location.hash);
  try { return m ? decodeURIComponent(m[1]) : MAIN; } catch (_) { return m[1]; }  // bad %-escape: refused below
}

function ensureOption(name, label = name) {
  const select = $("channel");
  let option = Array.from(select.options).find((o) => o.value === name);
  if (!option) { option = new Option(label, name); select.add(option); }
  option.textContent = label;
  return option;
}

// What the channel list shows of each channel: its phase unless ready, and what it has on air. The
// shown channel's state comes from its event feed (as the badge's); the others' from GET /channels.
const channelInfo = new Map();  // name -> { status, streaming, state }
function labelChannel(name) {
  const c = channelInfo.get(name);
  if (!c) { ensureOption(name); return; }
  const flags = [c.status && c.status !== "ready" ? c.status : null, c.streaming ? c.state : "not streaming"];
  ensureOption(name, `${name} (${flags.filter(Boolean).join(", ")})`);
}

// Switch everything (player, events, uploads, tasks, health, avatar buttons) to channel `name`.
function selectChannel(name, force = false) {
  if (!CHANNEL_NAME_RE.test(name)) { fallBackToMain(`no channel ${JSON.stringify(name)}`); return; }
  if (name === channel && !force) return;
  channel = name;
  live.channel = name;
  say("");
  ensureOption(name);
  $("channel").value = name;
  document.title = name === MAIN ? "LatentSync-Realtime" : `${name} · LatentSync-Realtime`;
  tasks.clear();
  $("tasks").replaceChildren();
  $("health").replaceChildren();
  $("outputs").replaceChildren();
  setState("…");
  $("avatar-switch").textContent = "";
  stopLive(true);  // a live talk belongs to the channel it was started on
  connectEvents();
  watch();
  refreshChannels();
  renderAvatarButtons();
}

function fallBackToMain(reason) {
  if (location.hash !== "#channel=main") history.replaceState(null, "", "#channel=main");
  selectChannel(MAIN, true);
  say(`${reason}: showing channel main`);
}

// A 404 no_channel from any of the channel's routes: it was deleted (or never existed).
async function channelGone(response, name) {
  if (response.status !== 404 || name === MAIN) return false;
  const e = await errorBody(response.clone());
  if (e.code !== "no_channel") return false;
  if (name === channel) fallBackToMain(`channel ${name} is gone`);
  refreshChannels();
  return true;
}

let channelsListed = 0;
async function refreshChannels() {
  const asked = channel;
  let response;
  try { response = await fetch("/channels", { headers: authHeaders() }); } catch (_) { return; }
  if (!response.ok) return;  // 401 before the token is typed: the events line says so
  const list = (await response.json()).channels || [];
  const select = $("channel");
  const names = new Set(list.map((c) => c.name));
  for (const c of list) {
    const known = channelInfo.get(c.name);
    // the shown channel's state is the event feed's (newer than this answer); the rest is the list's
    const state = c.name === channel && known && known.fromEvents ? known.state : c.state;
    channelInfo.set(c.name, { status: c.status, streaming: c.streaming, state, fromEvents: known && known.fromEvents });
    labelChannel(c.name);
  }
  for (const name of Array.from(channelInfo.keys())) if (!names.has(name)) channelInfo.delete(name);
  for (const option of Array.from(select.options)) if (!names.has(option.value) && option.value !== channel) option.remove();
  select.value = channel;
  channelsListed += 1;
  live.channelsListed = channelsListed;
  // (a list asked for before a switch may predate the channel now shown: only a current one decides)
  if (channel === asked && !names.has(channel)) fallBackToMain(`channel ${channel} is gone`);
}

$("channel").addEventListener("focus", () => refreshChannels());
const CHANNEL_LIST_POLL_MS = 2000;  // the other channels' states in the list (the shown one's follow its events)
setInterval(() => { if (!document.hidden) refreshChannels(); }, CHANNEL_LIST_POLL_MS);
$("channel").addEventListener("mousedown", () => refreshChannels());
$("channel").addEventListener("change", () => {
  location.hash = `channel=${encodeURIComponent($("channel").value)}`;  // hashchange switches
});
window.addEventListener("hashchange", () => selectChannel(channelFromHash()));

// ------------------------------------------------------------------ WHEP player
const live = { pc: null, location: null, stream: null, analyser: null, armedAt: null, heardAt: null, channel: MAIN, whepGen: 0 };
window.latentsync = live;  // for tests and benchmarks (read-only use)

function waitIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); } };
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

// Ends the WHEP session (DELETE on its Location) and closes the peer connection.
async function stopWatching(keepalive = false) {
  const location = live.location;
  live.location = null;
  if (live.pc) { live.pc.close(); live.pc = null; }
  if (location) {
    await fetch(location, { method: "DELETE", headers: authHeaders(), keepalive }).catch(() => {});
  }
}

async function watch() {
  const gen = ++live.whepGen;  // a newer watch() (channel switch, Reconnect) supersedes this one
  $("whep-status").textContent = `connecting to ${channel}…`;
  await stopWatching();
  if (gen !== live.whepGen) return;
  const name = channel;
  const pc = new RTCPeerConnection({ iceServers: [] });
  live.pc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  live.stream = stream;
  pc.ontrack = (event) => {
    if (live.pc !== pc) return;
    stream.addTrack(event.track);
    const video = $("video");
    if (video.srcObject !== stream) video.srcObject = stream;
    if (event.track.kind === "audio") listen(stream);
  };
  pc.onconnectionstatechange = () => {
    if (live.pc === pc) $("whep-status").textContent = `WebRTC ${pc.connectionState}`;
  };
  await pc.setLocalDescription(await pc.createOffer());
  await waitIceGathering(pc, 2000);  // the server takes no trickled candidates: send them all at once
  if (gen !== live.whepGen) { pc.close(); return; }
  let response;
  try {
    response = await fetch(`${base(name)}/whep`, {
      method: "POST", body: pc.localDescription.sdp, headers: authHeaders({ "Content-Type": "application/sdp" }),
    });
  } catch (err) { if (gen === live.whepGen) $("whep-status").textContent = `WHEP failed: ${err}`; pc.close(); return; }
  if (response.status !== 201) {
    pc.close();
    if (gen !== live.whepGen || await channelGone(response, name)) return;
    $("whep-status").textContent = `WHEP refused: ${await errorText(response)}`;
    return;
  }
  const location = response.headers.get("Location");
  if (gen !== live.whepGen) {  // switched meanwhile: this session is nobody's
    pc.close();
    fetch(location, { method: "DELETE", headers: authHeaders() }).catch(() => {});
    return;
  }
  live.location = location;
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  const video = $("video");
  video.muted = false;
  video.play().catch(() => { video.muted = true; video.play().catch(() => {}); });
}

// An AnalyserNode on the received audio: when speech is first heard after arm() (benchmarks). One
// per WHEP stream: a new stream (Reconnect, another channel) replaces the previous one's.
function listen(stream) {
  if (live.analyserStream === stream) return;
  if (live.analyserStop) live.analyserStop();
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 512;
  context.createMediaStreamSource(stream).connect(analyser);
  live.analyser = analyser;
  const samples = new Float32Array(analyser.fftSize);
  const timer = setInterval(() => {
    if (live.armedAt === null || live.heardAt !== null) return;
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    if (Math.sqrt(sum / samples.length) > 0.01) live.heardAt = performance.now();
  }, 5);
  live.analyserStream = stream;
  live.analyserStop = () => { clearInterval(timer); context.close().catch(() => {}); };
}
live.arm = () => { live.armedAt = performance.now(); live.heardAt = null; };
live.inboundStats = async () => {
  const out = {};
  if (!live.pc) return out;
  (await live.pc.getStats()).forEach((r) => { if (r.type === "inbound-rtp") out[r.kind] = r; });
  return out;
};

$("watch").addEventListener("click", () => watch());
$("unmute").addEventListener("click", () => { const v = $("video"); v.muted = false; v.play(); });
window.addEventListener("pagehide", () => { live.whepGen += 1; stopWatching(true); });

// ------------------------------------------------------------------ uploads
async function submitAudio(blob, filename) {
  const form = new FormData();
  form.append("audio_file", blob, filename);
  const name = channel;
  const response = await fetch(`${base(name)}/generate_video`, { method: "POST", body: form, headers: authHeaders() });
  if (response.status !== 202) {
    if (!(await channelGone(response, name))) say(`upload refused: ${await errorText(response)}`);
    return null;
  }
  const body = await response.json();
  say(`task ${body.task_id} queued (position ${body.position}) on ${name}`);
  return body;
}

$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("audio-file").files[0];
  if (!file) { say("choose an audio file first"); return; }
  await submitAudio(file, file.name);
});

// ------------------------------------------------------------------ text to speech (POST /speak, espeak-ng)
$("speak-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("speak-text").value.trim();
  if (!text) { say("type something to say first"); return; }
  const name = channel;
  const response = await fetch(`${base(name)}/speak`, {
    method: "POST", body: JSON.stringify({ text }), headers: authHeaders({ "Content-Type": "application/json" }),
  });
  if (response.status !== 202) {
    if (!(await channelGone(response, name))) say(`text refused: ${await errorText(response)}`);
    return;
  }
  const body = await response.json();
  say(`task ${body.task_id} queued (text to speech) on ${name}`);
});

// ------------------------------------------------------------------ microphone live over the channel's /ws/speech (f32le PCM)
// The avatar starts speaking after the first chunk's audio (+ the engine's look-ahead) has arrived,
// while you are still talking. A browser WebSocket cannot send headers, and the token never goes in a
// URL: with a token the page first asks POST /ws/tickets for a single-use ticket and connects with ?ticket=.
let talk = null;
$("live-start").addEventListener("click", async () => {
  const name = channel;
  let mic;
  try { mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true } }); }
  catch (err) { say(`microphone unavailable: ${err.name}`); return; }
  const token = tokenInput.value.trim();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  let query = "";
  if (token) {
    let ticket;
    try {
      const response = await fetch("/ws/tickets", { method: "POST", headers: authHeaders() });
      if (!response.ok) throw new Error(`${response.status}`);
      ticket = (await response.json()).ticket;
    } catch (err) { mic.getTracks().forEach((t) => t.stop()); say(`live speech: no ticket (${err.message})`); return; }
    query = `?ticket=${encodeURIComponent(ticket)}`;
  }
  const ws = new WebSocket(`${scheme}//${location.host}${base(name)}/ws/speech${query}`);
  ws.binaryType = "arraybuffer";
  const ctx = new AudioContext();
  const source = ctx.createMediaStreamSource(mic);
  const tap = ctx.createScriptProcessor(1024, 1, 1);  // 21 ms at 48 kHz; mono float32
  const mute = ctx.createGain();
  mute.gain.value = 0;  // the tap must reach the destination to run; nothing is heard
  talk = { ws, ctx, mic, open: false };
  ws.onopen = () => ws.send(JSON.stringify({ type: "start", sample_rate: ctx.sampleRate, channels: 1, encoding: "f32le" }));
  ws.onmessage = (event) => {
    const msg = JSON.parse(event.data);
    if (msg.type === "accepted") { if (talk) talk.open = true; say(`task ${msg.task_id} live (microphone) on ${name}`); }
    else if (msg.type === "on_air") $("live-status").textContent = `on air after ${Math.round(msg.first_byte_to_air_s * 1000)} ms`;
    else if (msg.type === "error") say(`live speech: ${msg.code}: ${msg.message}`);
    else if (msg.type === "done") { $("live-status").textContent = `done (${msg.status})`; ws.close(); }
  };
  ws.onclose = () => stopLive(false);
  tap.onaudioprocess = (event) => {
    if (talk && talk.open && ws.readyState === WebSocket.OPEN) ws.send(event.inputBuffer.getChannelData(0).slice().buffer);
  };
  source.connect(tap);
  tap.connect(mute);
  mute.connect(ctx.destination);
  $("live-start").disabled = true;
  $("live-stop").disabled = false;
  $("live-status").textContent = "talking…";
});
function stopLive(sendEnd) {
  if (!talk) return;
  const { ws, ctx, mic } = talk;
  talk = null;
  mic.getTracks().forEach((t) => t.stop());
  ctx.close();
  if (sendEnd && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "end" }));
  $("live-start").disabled = false;
  $("live-stop").disabled = true;
}
$("live-stop").addEventListener("click", () => stopLive(true));

// ------------------------------------------------------------------ microphone (MediaRecorder → WebM/Opus)
let recorder = null;
$("rec-start").addEventListener("click", async () => {
  let mic;
  try { mic = await navigator.mediaDevices.getUserMedia({ audio: true }); }
  catch (err) { say(`microphone unavailable: ${err.name}`); return; }
  const chunks = [];
  recorder = new MediaRecorder(mic, { mimeType: "audio/webm;codecs=opus" });
  recorder.ondataavailable = (event) => { if (event.data.size) chunks.push(event.data); };
  recorder.onstop = async () => {
    mic.getTracks().forEach((t) => t.stop());
    $("rec-status").textContent = "";
    await submitAudio(new Blob(chunks, { type: "audio/webm" }), "microphone.webm");
  };
  recorder.start(250);
  $("rec-start").disabled = true;
  $("rec-stop").disabled = false;
  $("rec-status").textContent = "recording…";
});
$("rec-stop").addEventListener("click", () => {
  if (recorder && recorder.state !== "inactive") recorder.stop();
  $("rec-start").disabled = false;
  $("rec-stop").disabled = true;
});

// ------------------------------------------------------------------ tasks, state, health (SSE over fetch)
const tasks = new Map();
const FINAL = new Set(["done", "failed", "cancelled"]);

function renderTask(task) {
  let row = document.getElementById(`task-${task.task_id}`);
  if (!row) {
    row = document.createElement("li");
    row.id = `task-${task.task_id}`;
    row.innerHTML = '<code></code><span class="status"></span><progress max="1" value="0"></progress>' +
      '<button type="button">Cancel</button>';
    row.querySelector("code").textContent = task.task_id.slice(0, 8);
    const url = `${base()}/tasks/${encodeURIComponent(task.task_id)}`;  // a task lives on its own channel
    row.querySelector("button").addEventListener("click", async () => {
      const r = await fetch(url, { method: "DELETE", headers: authHeaders() });
      if (!r.ok) say(`cancel refused: ${await errorText(r)}`);
    });
    $("tasks").prepend(row);
    while ($("tasks").children.length > 20) $("tasks").lastElementChild.remove();
  }
  row.dataset.status = task.status;
  row.querySelector(".status").textContent = task.status;
  const bar = row.querySelector("progress");
  bar.max = Math.max(1, task.frames_total || 1);
  bar.value = task.frames_streamed || 0;
  bar.title = `${task.chunks_generated}/${task.chunks_total} chunks generated, ` +
    `${task.frames_streamed}/${task.frames_total} frames on air`;
  row.querySelector("button").disabled = FINAL.has(task.status);
}

function renderHealth(h) {
  const format = h.stream ? `${h.stream.width}x${h.stream.height} @ ${h.stream.fps} fps` : "?";
  const rows = {
    channel: h.channel || MAIN, format, state: h.state, ticks: h.ticks, "frames emitted": h.frames_emitted, "late ticks": h.late_ticks,
    "dropped ticks": h.dropped_ticks, "underrun ticks": h.underrun_ticks, "encoders up": h.ffmpeg_up,
    "encoder restarts": h.ffmpeg_restarts, "engine ready": h.engine_ready,
    viewers: h.webrtc ? h.webrtc.viewers : "off", "uptime s": Math.round(h.uptime_s || 0),
  };
  const dl = $("health");
  dl.replaceChildren();
  for (const [k, v] of Object.entries(rows)) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = String(v);
    dd.dataset.key = k;
    dl.append(dt, dd);
  }
  renderOutputs(h.outputs || []);
}

// One row per output: name, kind, URL (without its key), state, and why it is not live.
function renderOutputs(outputs) {
  const list = $("outputs");
  list.replaceChildren();
  for (const o of outputs) {
    const li = document.createElement("li");
    li.dataset.output = o.name;
    li.dataset.state = o.state;
    const badge = document.createElement("span");
    badge.className = `badge output-${o.state}`;
    badge.textContent = o.state;
    const name = document.createElement("strong");
    name.textContent = `${o.name}${o.required ? "" : " (best effort)"}`;
    const url = document.createElement("code");
    url.textContent = o.url;
    const counts = document.createElement("span");
    counts.textContent = `${o.frames_out} frames, ${o.restarts} restarts, ${o.stalls} stalls`;
    li.append(badge, " ", name, url, counts);
    if (o.state !== "live" && o.last_error) {
      const why = document.createElement("div");
      why.className = "error";
      why.textContent = o.last_error;
      li.append(why);
    }
    list.append(li);
  }
}

function setState(state) {
  const badge = $("state");
  badge.textContent = state;
  badge.className = `badge state-${state}`;
  live.stateHistory = (live.stateHistory || []).concat([state]).slice(-50);
  const info = channelInfo.get(channel);
  if (info && state !== "…") {  // the list says what the badge says
    info.state = state;
    info.fromEvents = true;
    labelChannel(channel);
  }
}

const handlers = {
  state: (d) => setState(d.state),
  task: (d) => { tasks.set(d.task_id, d); renderTask(d); },
  viewers: (d) => { live.viewers = d.viewers; },
  health: (d) => renderHealth(d),
};

let eventsAbort = null;
async function connectEvents() {
  if (eventsAbort) eventsAbort.abort();
  const abort = new AbortController();
  eventsAbort = abort;
  const name = channel;
  while (!abort.signal.aborted) {
    try {
      const response = await fetch(`${base(name)}/events`, { headers: authHeaders(), signal: abort.signal });
      if (!response.ok) {
        if (await channelGone(response, name)) return;
        $("link").textContent = `events: ${await errorText(response)}`;
      } else {
        $("link").textContent = "live";
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let event = "message"; let data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) event = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (abort.signal.aborted) return;  // switched channel: not this page's channel any more
            if (data && handlers[event]) handlers[event](JSON.parse(data));
          }
        }
      }
    } catch (err) {
      if (abort.signal.aborted) return;
    }
    if (abort.signal.aborted) return;
    $("link").textContent = "offline";
    await sleep(2000);
  }
}

// ------------------------------------------------------------------ avatars (POST/GET/DELETE /avatars, PUT /channels/<name>)
// Hidden while the server has no avatar API (GET /avatars answers 404).
const avatars = new Map();  // id -> record
const polling = new Set();  // ids whose record is being polled while preparing
const AVATAR_POLL_MS = 500;
const SWITCH_TIMEOUT_MS = 10 * 60 * 1000;

function avatarSay(text) { $("avatar-message").textContent = text; }

async function refreshAvatars() {
  let response;
  try { response = await fetch("/avatars", { headers: authHeaders() }); } catch (_) { return; }
  if (response.status === 404) { $("avatars").hidden = true; return; }
  $("avatars").hidden = false;
  if (!response.ok) { avatarSay(`avatars: ${await errorText(response)}`); return; }
  const list = (await response.json()).avatars || [];
  const ids = new Set(list.map((a) => a.id));
  for (const id of Array.from(avatars.keys())) if (!ids.has(id)) removeAvatar(id);
  for (const record of list) {
    renderAvatar(record);
    if (record.status === "preparing") pollAvatar(record.id);
  }
}

function removeAvatar(id) {
  avatars.delete(id);
  const row = document.getElementById(`avatar-${id}`);
  if (row) row.remove();
}

function renderAvatar(a) {
  avatars.set(a.id, a);
  let row = document.getElementById(`avatar-${a.id}`);
  if (!row) {
    row = document.createElement("li");
    row.id = `avatar-${a.id}`;
    row.innerHTML = '<img class="still" alt="" hidden><span class="name"></span><span class="status"></span><progress max="1" value="0"></progress>' +
      '<button type="button" class="use">Use on this channel</button><button type="button" class="delete">Delete</button>' +
      '<small class="info"></small>';
    row.querySelector(".use").addEventListener("click", () => useAvatar(a.id));
    row.querySelector(".delete").addEventListener("click", () => deleteAvatar(a.id));
    $("avatar-list").prepend(row);
  }
  row.dataset.status = a.status;
  row.querySelector(".name").textContent = a.name || a.id;
  row.querySelector(".name").title = a.id;
  row.querySelector(".status").textContent = a.status === "preparing" ? `preparing ${Math.round((a.progress || 0) * 100)} %` : a.status;
  const bar = row.querySelector("progress");
  bar.value = a.status === "ready" ? 1 : a.progress || 0;
  bar.hidden = a.status !== "preparing";
  const info = [];
  if (a.status === "failed" && a.error) info.push(`failed: ${a.error.message || a.error.code}`);
  if (a.size) info.push(`${a.size[0]}x${a.size[1]}`);
  if (a.fps) info.push(`${a.fps} fps`);
  if (a.duration_s) info.push(`${Number(a.duration_s).toFixed(1)} s`);
  if (a.used_by && a.used_by.length) info.push(`on ${a.used_by.join(", ")}`);
  for (const w of a.warnings || []) info.push(`⚠ ${w.code}: ${w.message}`);
  row.querySelector(".info").textContent = info.join(" · ");
  row.classList.toggle("warned", (a.warnings || []).length > 0);
  renderAvatarButtons(row, a);
}

// "Use on this channel" only for a ready avatar the chosen channel does not show already.
function renderAvatarButtons(row = null, record = null) {
  const rows = row ? [[row, record]] : Array.from(avatars.values()).map((a) => [document.getElementById(`avatar-${a.id}`), a]);
  for (const [r, a] of rows) {
    if (!r) continue;
    const onHere = (a.used_by || []).includes(channel);
    const use = r.querySelector(".use");
    use.disabled = a.status !== "ready" || onHere;
    use.textContent = onHere ? `On ${channel}` : "Use on this channel";
    r.querySelector(".delete").disabled = (a.used_by || []).length > 0;  // the server refuses those (409)
    if (a.status === "ready") loadStill(r, a.id);
  }
}

// The avatar framed as the chosen channel would show it (GET /avatars/<id>/still?channel=...), before
// it is switched on air. Fetched with the token (an <img src> could not send it) into a blob URL.
// A still refused for now (429 rate_limited: api.stills_per_min counts the stills a client has made;
// the channel starting; the network) is asked again later, so every ready row gets its thumbnail:
// before, a refused still was never asked again and only some rows showed one.
const STILL_RETRY_MS = 5000;  // doubled at each refusal, at most STILL_RETRY_MAX_MS
const STILL_RETRY_MAX_MS = 60000;
async function loadStill(row, id, retryMs = STILL_RETRY_MS) {
  const img = row.querySelector(".still");
  if (img.dataset.channel === channel) return;
  const name = channel;
  img.dataset.channel = name;
  let response = null;
  try {
    response = await fetch(`/avatars/${encodeURIComponent(id)}/still?channel=${encodeURIComponent(name)}`, { headers: authHeaders() });
  } catch (_) { /* the network: asked again below */ }
  if (channel !== name) { if (img.dataset.channel === name) img.dataset.channel = ""; return; }
  if (!response || !response.ok) {
    img.dataset.channel = "";
    if (response && (response.status === 404 || response.status === 400)) return;  // gone, or no such channel
    setTimeout(() => {
      const record = avatars.get(id);
      if (record && record.status === "ready" && row.isConnected && channel === name) {
        loadStill(row, id, Math.min(2 * retryMs, STILL_RETRY_MAX_MS));
      }
    }, retryMs);
    return;
  }
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await response.blob());
  img.title = `as ${name} would show it`;
  img.hidden = false;
}

async function pollAvatar(id) {
  if (polling.has(id)) return;
  polling.add(id);
  try {
    for (;;) {
      await sleep(AVATAR_POLL_MS);
      let response;
      try { response = await fetch(`/avatars/${encodeURIComponent(id)}`, { headers: authHeaders() }); } catch (_) { continue; }
      if (response.status === 404) { removeAvatar(id); return; }
      if (!response.ok) { avatarSay(`avatar ${id}: ${await errorText(response)}`); return; }
      const record = await response.json();
      renderAvatar(record);
      if (record.status !== "preparing") {
        avatarSay(record.status === "ready" ? `avatar ${record.name || id} is ready` :
          `avatar ${record.name || id} failed: ${record.error ? record.error.message || record.error.code : "?"}`);
        return;
      }
    }
  } finally { polling.delete(id); }
}

// XMLHttpRequest rather than fetch: it reports the upload's progress.
function postAvatar(form, onProgress) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/avatars");
    const token = tokenInput.value.trim();
    if (token) xhr.setRequestHeader("Authorization", `Bearer ${token}`);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      resolve({ status: xhr.status, body });
    };
    xhr.onerror = () => resolve({ status: 0, body: null });
    xhr.send(form);
  });
}

$("avatar-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("avatar-file").files[0];
  if (!file) { avatarSay("choose a video first"); return; }
  const form = new FormData();
  form.append("video_file", file, file.name);
  const name = $("avatar-name").value.trim();
  if (name) form.append("name", name);
  const bar = $("avatar-upload-progress");
  bar.hidden = false;
  bar.value = 0;
  $("avatar-upload").disabled = true;
  avatarSay(`uploading ${file.name}…`);
  try {
    const { status, body } = await postAvatar(form, (f) => { bar.value = f; });
    if ((status !== 202 && status !== 200) || !body) {
      const e = body && body.error;
      avatarSay(`avatar refused: ${e ? `${e.code}: ${e.message}` : `HTTP ${status}`}`);
      return;
    }
    // 200: these bytes were uploaded before; that avatar is shown, nothing is prepared again
    avatarSay(status === 200 ? `already uploaded as avatar ${body.name || body.id} (${body.status})` :
      `avatar ${body.id} uploaded, preparing…`);
    renderAvatar(body);
    if (body.status === "preparing") pollAvatar(body.id);
  } finally {
    bar.hidden = true;
    $("avatar-upload").disabled = false;
  }
});

async function deleteAvatar(id) {
  const response = await fetch(`/avatars/${encodeURIComponent(id)}`, { method: "DELETE", headers: authHeaders() });
  if (!response.ok) { avatarSay(`delete refused: ${await errorText(response)}`); return; }
  removeAvatar(id);
  avatarSay(`avatar ${id} deleted`);
}

// PUT /channels/<name> {"avatar": id}; the switch (a crossfade at the channel's next idle moment) is
// followed with GET /channels/<name> until its state is done or failed.
async function useAvatar(id, force = false) {
  const name = channel;
  const show = (text) => { if (channel === name) $("avatar-switch").textContent = text; };
  const label = (avatars.get(id) || {}).name || id;
  const response = await fetch(`/channels/${encodeURIComponent(name)}`, {
    method: "PUT", body: JSON.stringify(force ? { avatar: id, force: true } : { avatar: id }),
    headers: authHeaders({ "Content-Type": "application/json" }),
  });
  if (response.status === 200) {  // nothing to change: the channel shows that avatar already
    show(`${name} already shows ${label}`);
    refreshAvatars();
    return;
  }
  if (response.status === 409 && !force) {  // face_too_small: ask, then force
    const body = await response.clone().json().catch(() => null);
    const e = body && body.error;
    if (e && e.code === "face_too_small") {
      if (window.confirm(`${e.message}\n\nPut it on air anyway?`)) return useAvatar(id, true);
      show(`not switched: ${e.message}`);
      return;
    }
  }
  if (response.status !== 202) {
    if (!(await channelGone(response, name))) show(`switch refused: ${await errorText(response)}`);
    return;
  }
  let described = await response.json();
  const deadline = performance.now() + SWITCH_TIMEOUT_MS;
  for (;;) {
    const sw = described.switch || {};
    const state = sw.state || "?";
    show(`${name} → ${label}: ${state}${sw.error ? ` (${sw.error.message || sw.error.code || sw.error})` : ""}`);
    if (state === "done" || state === "failed" || performance.now() > deadline) break;
    await sleep(AVATAR_POLL_MS);
    let r;
    try { r = await fetch(`/channels/${encodeURIComponent(name)}`, { headers: authHeaders() }); } catch (_) { continue; }
    if (!r.ok) { if (!(await channelGone(r, name))) show(`switch: ${await errorText(r)}`); return; }
    described = await r.json();
  }
  refreshChannels();
  refreshAvatars();
}

// ------------------------------------------------------------------ start
selectChannel(channelFromHash(), true);
refreshAvatars();
