// LatentSync-Realtime control page: WHEP player, uploads, text to speech, microphone, tasks, health (live via /events).
// Plain browser APIs only (no build step, nothing from a CDN). Docs: docs/webrtc.md.
"use strict";

const $ = (id) => document.getElementById(id);
const tokenInput = $("token");
tokenInput.value = localStorage.getItem("latentsync.token") || "";
tokenInput.addEventListener("change", () => {
  localStorage.setItem("latentsync.token", tokenInput.value.trim());
  connectEvents();
  watch();
});

function authHeaders(extra = {}) {
  const token = tokenInput.value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function say(text) { $("message").textContent = text; }

async function errorText(response) {
  try { const body = await response.json(); return `${body.error.code}: ${body.error.message}`; }
  catch (_) { return `HTTP ${response.status}`; }
}

// ------------------------------------------------------------------ WHEP player
const live = { pc: null, location: null, stream: null, analyser: null, armedAt: null, heardAt: null };
window.latentsync = live;  // for tests and benchmarks (read-only use)

function waitIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { clearTimeout(timer); resolve(); } };
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

async function stopWatching() {
  if (live.location) {
    fetch(live.location, { method: "DELETE", headers: authHeaders() }).catch(() => {});
    live.location = null;
  }
  if (live.pc) { live.pc.close(); live.pc = null; }
}

async function watch() {
  await stopWatching();
  const pc = new RTCPeerConnection({ iceServers: [] });
  live.pc = pc;
  pc.addTransceiver("video", { direction: "recvonly" });
  pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  live.stream = stream;
  pc.ontrack = (event) => {
    stream.addTrack(event.track);
    const video = $("video");
    if (video.srcObject !== stream) video.srcObject = stream;
    if (event.track.kind === "audio") listen(stream);
  };
  pc.onconnectionstatechange = () => { $("whep-status").textContent = `WebRTC ${pc.connectionState}`; };
  await pc.setLocalDescription(await pc.createOffer());
  await waitIceGathering(pc, 2000);  // the server takes no trickled candidates: send them all at once
  const response = await fetch("/whep", {
    method: "POST", body: pc.localDescription.sdp, headers: authHeaders({ "Content-Type": "application/sdp" }),
  });
  if (response.status !== 201) {
    $("whep-status").textContent = `WHEP refused: ${await errorText(response)}`;
    return;
  }
  live.location = response.headers.get("Location");
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  const video = $("video");
  video.muted = false;
  video.play().catch(() => { video.muted = true; video.play().catch(() => {}); });
}

// An AnalyserNode on the received audio: when speech is first heard after arm() (benchmarks).
function listen(stream) {
  if (live.analyser) return;
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 512;
  context.createMediaStreamSource(stream).connect(analyser);
  live.analyser = analyser;
  const samples = new Float32Array(analyser.fftSize);
  setInterval(() => {
    if (live.armedAt === null || live.heardAt !== null) return;
    analyser.getFloatTimeDomainData(samples);
    let sum = 0;
    for (const s of samples) sum += s * s;
    if (Math.sqrt(sum / samples.length) > 0.01) live.heardAt = performance.now();
  }, 5);
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
window.addEventListener("pagehide", () => { stopWatching(); });

// ------------------------------------------------------------------ uploads
async function submitAudio(blob, filename) {
  const form = new FormData();
  form.append("audio_file", blob, filename);
  const response = await fetch("/generate_video", { method: "POST", body: form, headers: authHeaders() });
  if (response.status !== 202) { say(`upload refused: ${await errorText(response)}`); return null; }
  const body = await response.json();
  say(`task ${body.task_id} queued (position ${body.position})`);
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
  const response = await fetch("/speak", {
    method: "POST", body: JSON.stringify({ text }), headers: authHeaders({ "Content-Type": "application/json" }),
  });
  if (response.status !== 202) { say(`text refused: ${await errorText(response)}`); return; }
  const body = await response.json();
  say(`task ${body.task_id} queued (text to speech)`);
});

// ------------------------------------------------------------------ microphone live over /ws/speech (f32le PCM)
// The avatar starts speaking after the first 16 frames (+ the engine's look-ahead) have arrived,
// while you are still talking. A browser WebSocket cannot send headers: the token goes as ?token=.
let talk = null;
$("live-start").addEventListener("click", async () => {
  let mic;
  try { mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true } }); }
  catch (err) { say(`microphone unavailable: ${err.name}`); return; }
  const token = tokenInput.value.trim();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${scheme}//${location.host}/ws/speech${token ? `?token=${encodeURIComponent(token)}` : ""}`);
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
    if (msg.type === "accepted") { if (talk) talk.open = true; say(`task ${msg.task_id} live (microphone)`); }
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
    row.querySelector("button").addEventListener("click", async () => {
      const r = await fetch(`/tasks/${task.task_id}`, { method: "DELETE", headers: authHeaders() });
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
  const rows = {
    state: h.state, ticks: h.ticks, "frames emitted": h.frames_emitted, "late ticks": h.late_ticks,
    "dropped ticks": h.dropped_ticks, "underrun ticks": h.underrun_ticks, "FFmpeg up": h.ffmpeg_up,
    "FFmpeg restarts": h.ffmpeg_restarts, "engine ready": h.engine_ready,
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
}

function setState(state) {
  const badge = $("state");
  badge.textContent = state;
  badge.className = `badge state-${state}`;
  live.stateHistory = (live.stateHistory || []).concat([state]).slice(-50);
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
  while (!abort.signal.aborted) {
    try {
      const response = await fetch("/events", { headers: authHeaders(), signal: abort.signal });
      if (!response.ok) {
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
            let name = "message"; let data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) name = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (data && handlers[name]) handlers[name](JSON.parse(data));
          }
        }
      }
    } catch (err) {
      if (abort.signal.aborted) return;
    }
    $("link").textContent = "offline";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

connectEvents();
watch();
