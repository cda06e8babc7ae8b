// livediff browser client: camera → WebRTC → server session → processed video back.
// Plain JS, no build step. The protocol is documented in streams/signaling.py (POST /offer)
// and streams/peer.py (data channel). A server with an access token is opened as
// /?token=… : the page sends it to /offer as "Authorization: Bearer …" (streams/auth.py).
// State for automation and tests lives in window.livediff:
//   state ('idle'|'starting'|'connecting'|'connected'|'retrying'|'stopped'|'error'), session, codec,
//   errors[] (each error once), fieldErrors {key: message}, params (what the server runs),
//   controlnets (GET /controlnets' list: [{name, preprocessors, default}], [] for none, null before),
//   loras (GET /loras' list: [{name, rank, …}], [] for none, null before), loraCapacity (its
//   capacity: {slots_per_row, …}, null without a library or before),
//   featureBankFrames (GET /controlnets' "feature_bank_frames": the server's bank capacity,
//   0 for none, null before or when unknown),
//   serverStats (last data-channel stats, null once stopped), notice (the degrade notice or null),
//   retry ({attempt, delay_s, at, error} while waiting to retry /offer, else null),
//   framesSent, framesDecoded, latencies[] (ms, ?src=marker only),
//   closing (the server's reason when it ended the session), replies[] (data-channel replies,
//   the style images' answers {ok, ip_image} / {error, field: 'ip_image'} and the control images'
//   {ok, control_image} / {error, field: 'control_image'} among them), awaiting (the server's
//   awaiting_control_images: the session's "client" ControlNets without an image yet),
//   previews ({net: count} of control previews shown, b"LDCP" messages),
//   update(params) → Promise(reply),
//   snapshot('input'|'output') → {width, height, data: RGBA array}, start(), stop().
'use strict';

const query = new URLSearchParams(location.search);
const TOKEN = query.get('token');
const consistency = createConsistencyPanel(  // consistency_panel.js
  document.getElementById('consistency'), document.getElementById('params'));
const style = createStylePanel(document.getElementById('style'), (image) => onStyleImage(image));  // style_panel.js
const SETTLED = [...consistency.keys, ...style.keys];  // sliders whose bursts become one message
const PARAM_KEYS = ['prompt', 'negative_prompt', 'strength', 'seed', 'guidance_scale', ...SETTLED];
const NUMERIC = new Set(['strength', 'seed', 'guidance_scale', ...SETTLED]);
const STYLE = 'ip_image';  // the style image's parameter: set by uploads (style_panel.js)
const RETRY_STATUSES = new Set([502, 503, 504]);  // busy, overloaded, shutting down: try again later
const MAX_BACKOFF_S = 30;
const MARKER_BITS = 10, MARKER_ROWS = 8, MARKER_MOD = 1 << MARKER_BITS;  // streams/frame_marker.py

const $ = (id) => document.getElementById(id);
const form = $('params');
const panels = {  // the panels' parameters: lists of uses, each panel its own (see show/uses)
  controlnets: createControlNetPanel(  // controlnet_panel.js
    $('controlnets'), () => applyPanel('controlnets'), (net, image) => onControlImage(net, image)),
  loras: createLoraPanel($('loras'), () => applyPanel('loras')),  // lora_panel.js
};
const PANEL_KEYS = Object.keys(panels);
const FIELD_KEYS = [...PARAM_KEYS, ...PANEL_KEYS, STYLE];  // what an error can be shown beside
const server = {};  // the values the server runs (before a session: the form's defaults)
const L = window.livediff = {
  state: 'idle', session: null, codec: null, errors: [], fieldErrors: {}, params: server,
  serverStats: null, notice: null, retry: null, closing: null,
  framesSent: 0, framesDecoded: 0, latencies: [], replies: [], awaiting: [], previews: {},
};
let pc = null, channel = null, media = null, statsTimer = null, markerTimer = null;
let retryTimer = null, countdownTimer = null, attempts = 0;
let run = 0;  // bumped by stop(): a start() still awaiting something sees it and gives up
let requestId = 0;
const pending = new Map();  // request id → {resolve, params}
const uploads = [];         // style images sent, oldest first: their replies carry no id
const controlUploads = [];  // control images sent ({net, image}), oldest first: likewise
const touched = new Set();  // only parameters set in the URL or by the user override the server's defaults
const unsent = new Set();   // changed while the session was being set up: sent once the channel opens
const shown = {};           // each field's text when last applied or filled: Enter then blur applies once
let lastError = null;
// ?controlnets=…, ?loras=…: sent as given until the panel is used
const queryUses = Object.fromEntries(PANEL_KEYS.map((key) => [key, query.get(key)]));

// ---------------------------------------------------------------- state, errors, notices
function setState(state) {
  L.state = state;
  const el = $('state');
  el.textContent = state;
  el.className = 'state ' + state;
}

function showMessage(text) {
  $('message').textContent = text || '';
}

function recordError(text) {
  // Each error once: a retry that meets the same refusal again adds nothing.
  if (text !== lastError) L.errors.push(text);
  lastError = text;
}

function showBanner(text, {error = true, retrying = false} = {}) {
  if (error) recordError(text);
  $('banner-text').textContent = text;
  $('banner').className = error ? 'banner' : 'banner info';
  $('banner').hidden = false;
  $('banner-cancel').hidden = !retrying;
  if (!retrying) $('banner-retry').textContent = '';
}

function hideBanner() {
  $('banner').hidden = true;
  $('banner-retry').textContent = '';
  lastError = null;
}

function fieldError(key, text) {
  $(`error-${key}`).textContent = text || '';
  form.elements[key].closest('label, fieldset').classList.toggle('invalid', Boolean(text));
  if (text) { L.fieldErrors[key] = text; recordError(text); } else delete L.fieldErrors[key];
}

function showNotice(text) {
  L.notice = text || null;
  $('notice').textContent = text || '';
  $('notice').hidden = !text;
}

// ---------------------------------------------------------------- form fields
function toField(key, value) {
  if (value === null || value === undefined) return '';
  if (key === 'prompt' && Array.isArray(value)) return JSON.stringify(value);  // [[text, weight], …]
  return String(value);
}

function fromField(key, text) {
  if (NUMERIC.has(key)) return Number(text);
  if (key === 'prompt' && text.trim().startsWith('[')) {
    try { const list = JSON.parse(text); if (Array.isArray(list)) return list; } catch { /* plain text */ }
  }
  return text;
}

function setField(key, value) {
  const el = form.elements[key];
  el.value = toField(key, value);
  shown[key] = el.value;
  showValue(key);
}

function showValue(key) {  // a slider's number beside its label
  const output = $(`${key}-value`);
  if (output) output.textContent = form.elements[key].value;
}

function defaultOf(el) {  // what the page shows before it knows the server's value
  if (el.tagName !== 'SELECT') return el.defaultValue;
  return ([...el.options].find((option) => option.defaultSelected) || el.options[0]).value;
}

function valueOf(key) {
  if (!(key in panels)) return fromField(key, form.elements[key].value);
  return queryUses[key] === null ? panels[key].uses() : queryUses[key];
}

function revert(key) {
  // A field, or a panel, shows what the server runs again (the style image: style.refused).
  if (key in panels) panels[key].show(server[key]);
  else if (key !== STYLE) setField(key, server[key]);
}

function formParams() {
  const params = {};
  for (const key of touched) {
    if (key in panels || form.elements[key].value !== '' || !NUMERIC.has(key)) params[key] = valueOf(key);
  }
  return params;
}

function fillForm(params) {
  // What the server runs: untouched fields show it, and a refused value goes back to it.
  Object.assign(server, params);
  for (const key of PARAM_KEYS) {
    if (key in params && !touched.has(key)) setField(key, params[key]);
  }
  for (const key of PANEL_KEYS) {
    if (key in params && !touched.has(key)) panels[key].show(params[key]);
  }
}

const connected = () => Boolean(channel && channel.readyState === 'open');

async function apply(key) {
  const el = form.elements[key];
  if (el.value === shown[key]) return;  // unchanged: Enter, then the change on blur, apply once
  const empty = el.value === '' && NUMERIC.has(key);
  if (empty || (!connected() && !el.checkValidity())) {
    // Not sent: the field goes back to what the server runs, so the next Start sends a valid value
    // (while connected the server checks the value itself, and its refusal reverts the field).
    const message = `${key}: ${empty ? 'a number is needed' : el.validationMessage}`;
    setField(key, server[key]);
    fieldError(key, message);
    return;
  }
  shown[key] = el.value;
  touched.add(key);
  if (!connected()) {
    fieldError(key, '');
    if (pc) unsent.add(key);  // a session on its way: sent once its channel opens (or in its offer)
    return;
  }
  await update({[key]: fromField(key, el.value)});
}

function acknowledged(params) {
  for (const [key, value] of Object.entries(params)) {
    server[key] = key in panels ? panels[key].usesFrom(value) : value;
    if (!FIELD_KEYS.includes(key)) continue;
    fieldError(key, '');
    if (key in panels) { if (!panels[key].editing()) panels[key].show(value); continue; }  // e.g. from update()
    if (key === STYLE) { style.acknowledged(value === null ? null : style.image(), value); continue; }
    if (document.activeElement !== form.elements[key]) setField(key, value);
  }
  const keys = Object.keys(params);
  if (keys.length) showMessage(`applied: ${keys.join(', ')}`);
}

function refused(reply, params) {
  // Nothing changed on the server: every field of the request goes back to what it runs.
  const current = reply.current || {};
  for (const key of Object.keys(params)) {
    if (key in current) server[key] = current[key];
    if (FIELD_KEYS.includes(key) && key in server) revert(key);
  }
  if (FIELD_KEYS.includes(reply.field)) fieldError(reply.field, reply.error);
  else showBanner(reply.error);
}

// ---------------------------------------------------------------- sources
async function cameraSource() {
  const width = Number(query.get('width') || 640), height = Number(query.get('height') || 480);
  return navigator.mediaDevices.getUserMedia({video: {width, height}, audio: false});
}

function markerSource() {
  // A test pattern with a frame counter the server copies onto its output (--latency-marker).
  const canvas = document.createElement('canvas');
  canvas.width = 640; canvas.height = 480;
  const g = canvas.getContext('2d');
  const sent = L.markerSent = new Array(MARKER_MOD);
  let n = 0;
  const paint = () => {
    n = (n + 1) % MARKER_MOD;
    g.fillStyle = 'rgb(200,90,40)'; g.fillRect(0, 0, 640, 480);
    g.fillStyle = 'rgb(40,160,220)'; g.fillRect((n * 7) % 560, 200, 80, 200);
    stampMarker(g, 640, 480, n);
    sent[n] = performance.now();
  };
  paint();
  markerTimer = setInterval(paint, 1000 / 30);
  return canvas.captureStream(30);
}

function markerBlock(width, height, bit, row) {
  const x0 = Math.floor(bit * width / MARKER_BITS), x1 = Math.floor((bit + 1) * width / MARKER_BITS);
  const y0 = Math.floor(row * height / MARKER_ROWS), y1 = Math.floor((row + 1) * height / MARKER_ROWS);
  return [x0, y0, x1 - x0, y1 - y0];
}

function stampMarker(g, width, height, value) {
  for (let bit = 0; bit < MARKER_BITS; bit++) {
    const on = (value >> bit) & 1;
    g.fillStyle = on ? '#fff' : '#000'; g.fillRect(...markerBlock(width, height, bit, 0));
    g.fillStyle = on ? '#000' : '#fff'; g.fillRect(...markerBlock(width, height, bit, 1));
  }
}

function readMarker(image) {  // image: ImageData
  const mean = (bit, row) => {
    const [x, y, w, h] = markerBlock(image.width, image.height, bit, row);
    let sum = 0, count = 0;
    for (let yy = y + (h >> 2); yy < y + h - (h >> 2); yy++) {
      for (let xx = x + (w >> 2); xx < x + w - (w >> 2); xx++) {
        const i = (yy * image.width + xx) * 4;
        sum += image.data[i] + image.data[i + 1] + image.data[i + 2]; count += 3;
      }
    }
    return count ? sum / count : 0;
  };
  let value = 0;
  for (let bit = 0; bit < MARKER_BITS; bit++) {
    const top = mean(bit, 0), bottom = mean(bit, 1);
    if ((top >= 128) === (bottom >= 128) || Math.abs(top - bottom) < 96) return null;
    if (top >= 128) value |= 1 << bit;
  }
  return value;
}

function watchMarkers(video) {
  const canvas = document.createElement('canvas');
  const g = canvas.getContext('2d', {willReadFrequently: true});
  const onFrame = () => {
    if (video.videoWidth) {
      canvas.width = video.videoWidth; canvas.height = video.videoHeight;
      g.drawImage(video, 0, 0);
      const n = readMarker(g.getImageData(0, 0, canvas.width, canvas.height));
      const sentAt = n === null ? undefined : L.markerSent[n];
      if (sentAt !== undefined) {
        const ms = performance.now() - sentAt;
        if (ms >= 0 && ms < 10000) L.latencies.push(ms);
      }
    }
    if (L.state !== 'stopped') video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

// ---------------------------------------------------------------- session
function showVideo(id, stream) {
  const video = $(id);
  video.srcObject = stream;
  if (!stream) video.parentElement.classList.remove('live');  // the caption shows again
}

function preferCodec(transceiver, codec) {
  if (!codec) return;
  const wanted = 'video/' + codec.toLowerCase();
  const codecs = RTCRtpReceiver.getCapabilities('video').codecs;
  const chosen = codecs.filter((c) => c.mimeType.toLowerCase() === wanted);
  if (!chosen.length) throw new Error(`this browser cannot receive ${codec}`);
  // Before createOffer: inside ontrack it would silently come too late.
  transceiver.setCodecPreferences(chosen.concat(codecs.filter((c) => c.mimeType.toLowerCase() === 'video/rtx')));
}

function waitForIceGathering(connection) {
  // The server takes no trickled candidates: the offer must carry all of them.
  if (connection.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    connection.addEventListener('icegatheringstatechange', () => {
      if (connection.iceGatheringState === 'complete') resolve();
    });
  });
}

function openChannel(connection) {
  const ch = channel = connection.createDataChannel('control');
  ch.binaryType = 'arraybuffer';  // control previews (b"LDCP" …)
  ch.onopen = () => {
    if (ch !== channel) return;
    if (style.image()) sendStyleImage(style.image());  // the chosen style image, for this session too
    for (const [net, image] of panels.controlnets.images()) sendControlImage(net, image);  // likewise
    if ($('controlnet-preview').checked) update({control_preview: true});
    if (!unsent.size) return;
    const params = {};
    for (const key of unsent) params[key] = valueOf(key);
    unsent.clear();
    update(params);
  };
  ch.onmessage = (event) => {
    if (ch !== channel) return;
    if (typeof event.data !== 'string') { showPreview(event.data); return; }
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    if (message.stats) { L.serverStats = message.stats; renderServerStats(message.stats); return; }
    if (message.closing) { L.closing = message.closing; return; }
    L.replies.push(message);
    if (isControlImageReply(message)) { controlImageAnswered(message); return; }
    if (isUploadReply(message)) { uploaded(message); return; }
    const request = pending.get(message.id);
    if (request) pending.delete(message.id);
    const params = request ? request.params : {};
    if (message.ok && 'controlnets' in params) setAwaiting(message.awaiting_control_images || []);
    if (message.ok) acknowledged(params);
    else if (message.error) refused(message, params);  // one place shows it: each error once
    if (request) request.resolve(message);
  };
}

function retryAfterSeconds(text) {
  // Retry-After: delay-seconds or an HTTP date; null when absent or unreadable.
  if (!text) return null;
  const seconds = Number(text);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(text);
  return Number.isNaN(date) ? null : Math.max(0, (date - Date.now()) / 1000);
}

async function postOffer(description) {
  const headers = {'Content-Type': 'application/json'};
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  const params = formParams();
  unsent.clear();
  let response;
  try {
    response = await fetch('offer', {
      method: 'POST', headers,
      body: JSON.stringify({sdp: description.sdp, type: description.type, params}),
    });
  } catch (error) {
    throw Object.assign(new Error(`cannot reach the server (${error.message || error})`), {retry: true, retryAfter: null});
  }
  const answer = await response.json().catch(() => ({}));
  if (response.ok) return answer;
  const error = new Error(answer.error || `the server answered ${response.status} ${response.statusText}`);
  if (RETRY_STATUSES.has(response.status)) {
    Object.assign(error, {retry: true, retryAfter: retryAfterSeconds(response.headers.get('Retry-After'))});
  } else if (response.status === 400) {
    const blamed = /^(\w+)=/.exec(error.message);  // "guidance_scale=99 is out of range: …"
    const named = answer.field;  // the server names the field; a panel's nested one (a ControlNet's
    // "preprocessor", "canny_low" …) is not a control of the page, so its words tell the panel
    if (named && (FIELD_KEYS.includes(named) || named in params)) error.field = named;
    else if (blamed && FIELD_KEYS.includes(blamed[1])) error.field = blamed[1];
    // A ControlNet's ("controlnet 'x' is not loaded …", "canny low=… must be below high=…")
    // or a LoRA's ("unknown LoRA 'x' …") error is told by its words.
    else if ('controlnets' in params && /controlnet|preprocessor|\bcanny\b/i.test(error.message)) error.field = 'controlnets';
    else if ('loras' in params && /\blora/i.test(error.message)) error.field = 'loras';
    else if ('feature_bank' in params && /feature bank/i.test(error.message)) error.field = 'feature_bank';
    else if ('latent_feedback' in params && /^latent_feedback\b/.test(error.message)) error.field = 'latent_feedback';
  }
  throw error;
}

async function start() {
  if (pc) return;
  if (L.retry) $('banner-retry').textContent = 'retrying now…';
  else hideBanner();  // a retry keeps its banner until it gets through
  cancelRetry();
  const mine = ++run, stale = () => mine !== run;
  $('start').disabled = true; $('stop').disabled = false;  // Stop also cancels a start and its retries
  setState('starting');
  showMessage('');
  Object.assign(L, {session: null, closing: null, serverStats: null, framesSent: 0, framesDecoded: 0});
  try {
    if (!media) {  // kept across retries: the preview stays on while the server is busy
      const stream = query.get('src') === 'marker' ? markerSource() : await cameraSource();
      if (stale()) { stream.getTracks().forEach((t) => t.stop()); return; }
      media = stream;
      showVideo('input', media);
    }
    const connection = pc = new RTCPeerConnection({iceServers: []});
    openChannel(connection);
    const track = media.getVideoTracks()[0];
    const transceiver = connection.addTransceiver(track, {direction: 'sendrecv', streams: [media]});
    preferCodec(transceiver, form.elements.codec.value);
    connection.ontrack = (event) => {
      if (connection !== pc) return;
      const output = $('output');
      showVideo('output', event.streams[0] || new MediaStream([event.track]));
      if (query.get('src') === 'marker') watchMarkers(output);
    };
    connection.onconnectionstatechange = () => onConnectionState(connection);
    await connection.setLocalDescription(await connection.createOffer());
    await waitForIceGathering(connection);
    if (stale()) return;
    setState('connecting');
    const answer = await postOffer(connection.localDescription);
    if (stale()) return;
    attempts = 0;
    hideBanner();
    L.session = answer.session;
    $('stat-session').textContent = answer.session;
    if (answer.params) fillForm(answer.params);
    setAwaiting(answer.awaiting_control_images || []);
    await connection.setRemoteDescription({sdp: answer.sdp, type: answer.type});
    statsTimer = setInterval(collectStats, 1000);
  } catch (error) {
    if (stale()) return;
    if (error.retry) retryLater(error);
    else fail(String(error.message || error), error.field);
  }
}

function onConnectionState(connection) {
  if (connection !== pc) return;
  const state = connection.connectionState;
  if (state === 'connected') setState('connected');
  else if (state === 'failed') fail('the connection failed: the browser and the server could not reach each other');
  else if (state === 'closed' || (state === 'disconnected' && L.closing)) {
    const reason = L.closing;
    stop();
    showBanner(reason ? `the server ended the session: ${reason}` : 'the connection closed', {error: false});
  }
}

function retryLater(error) {
  // At capacity, overloaded or shutting down (503), or unreachable: try again by itself, after
  // Retry-After when the server sends one, else after 1, 2, 4 … 30 s.
  closePeer();
  const delay = error.retryAfter === null ? Math.min(MAX_BACKOFF_S, 2 ** attempts) : Math.max(1, error.retryAfter);
  attempts += 1;
  const at = Date.now() + delay * 1000;
  L.retry = {attempt: attempts, delay_s: delay, at, error: error.message};
  setState('retrying');
  showBanner(error.message, {retrying: true});
  const countdown = () => {
    $('banner-retry').textContent = `retrying in ${Math.max(0, Math.ceil((at - Date.now()) / 1000))} s`;
  };
  countdown();
  countdownTimer = setInterval(countdown, 250);
  retryTimer = setTimeout(start, delay * 1000);
}

function cancelRetry() {
  clearTimeout(retryTimer); clearInterval(countdownTimer);
  retryTimer = countdownTimer = null;
  L.retry = null;
}

function fail(message, field) {
  run += 1;
  closePeer(); releaseMedia();
  $('start').disabled = false; $('stop').disabled = true;
  setState('error');
  if (field) {  // a value the server refused at Start: the field goes back to the server's default
    touched.delete(field);
    if (field in panels) queryUses[field] = null;
    revert(field);
    fieldError(field, message);
  } else {
    showBanner(message);
  }
}

function closePeer() {
  clearInterval(statsTimer); statsTimer = null;
  if (pc) pc.close();
  pc = channel = null;
  for (const request of pending.values()) request.resolve({error: 'stopped'});
  pending.clear();
  unsent.clear();
  uploads.length = 0;
  controlUploads.length = 0;
  style.stopped();
  L.awaiting = [];
  panels.controlnets.stopped();
  showVideo('output', null);
  clearStats();
}

function releaseMedia() {
  clearInterval(markerTimer); markerTimer = null;
  if (media) media.getTracks().forEach((t) => t.stop());
  media = null;
  showVideo('input', null);
}

function stop() {
  run += 1;
  cancelRetry();
  attempts = 0;
  closePeer(); releaseMedia();
  hideBanner();
  $('start').disabled = false; $('stop').disabled = true;
  setState('stopped');
}

function update(params) {
  if (!connected()) return Promise.resolve({error: 'not connected'});
  const id = ++requestId;
  return new Promise((resolve) => {
    pending.set(id, {resolve, params});
    channel.send(JSON.stringify({...params, id}));
  });
}

// ---------------------------------------------------------------- stats
let last = null;
async function collectStats() {
  const connection = pc;
  if (!connection) return;
  const report = await connection.getStats();
  if (connection !== pc) return;  // stopped meanwhile: the table stays cleared
  const now = performance.now();
  const current = {at: now, sent: 0, decoded: 0};
  const codecs = {};
  report.forEach((r) => { if (r.type === 'codec') codecs[r.id] = r.mimeType; });
  report.forEach((r) => {
    if (r.kind !== 'video') return;
    if (r.type === 'outbound-rtp') current.sent = r.framesEncoded || 0;
    if (r.type === 'inbound-rtp') { current.decoded = r.framesDecoded || 0; L.codec = codecs[r.codecId] || L.codec; }
  });
  L.framesSent = current.sent; L.framesDecoded = current.decoded;
  if (last) {
    const seconds = (now - last.at) / 1000;
    $('stat-fps').textContent = `${((current.sent - last.sent) / seconds).toFixed(1)} / ${((current.decoded - last.decoded) / seconds).toFixed(1)}`;
  }
  $('stat-codec').textContent = L.codec || '–';
  last = current;
}

function clearStats() {
  last = null;
  L.serverStats = null;
  for (const cell of $('stats').querySelectorAll('td')) cell.textContent = '–';
  showNotice(null);
}

function renderServerStats(s) {
  // s: the server's per-session stats (streams/peer.py); s.engine is the engine's session.stats()
  const ms = (v) => (typeof v === 'number' ? `${v.toFixed(0)}` : '–');
  $('stat-server-fps').textContent = `${s.fps_in} / ${s.fps_out}`;
  $('stat-latency').textContent = `${ms(s.server_latency_ms_p50)} / ${ms(s.server_latency_ms_p99)} ms`;
  const engine = s.engine || {};
  const total = (engine.latency_ms || {}).total || {};
  $('stat-engine-latency').textContent = `${ms(total.p50)} / ${ms(total.p99)} ms`;
  $('stat-drops').textContent = engine.dropped === undefined ? '–' : `${engine.dropped} / ${engine.skipped}`;
  const size = (engine.render_size || []).join('×'), full = (engine.size || []).join('×');
  $('stat-engine').textContent = engine.steps === undefined ? '–'
    : `${engine.steps} step(s), ${size}${full && full !== size ? ` (of ${full})` : ''}`;
  $('stat-device').textContent = engine.device || '–';  // which GPU of the server runs it
  showNotice(degradeNotice(s.engine));
}

function degradeNotice(engine) {
  // The degrade controller (engine/degrade.py) cut steps or resolution, or refuses new sessions.
  if (!engine) return null;
  const degrade = engine.degrade || {level: 'normal', reason: null};
  const [rw, rh] = engine.render_size || [], [w, h] = engine.size || [];
  const fewer = engine.steps < engine.requested_steps, smaller = rw !== w || rh !== h;
  if (degrade.level === 'normal' && !fewer && !smaller) return null;
  const steps = `${engine.steps} step${engine.steps === 1 ? '' : 's'}`;
  let text = `The server is overloaded: running ${steps}${fewer ? ` instead of ${engine.requested_steps}` : ''}`;
  if (rw !== undefined) text += smaller ? ` at ${rw}×${rh} instead of ${w}×${h}` : ` at ${w}×${h}`;
  if (degrade.level === 'refuse_sessions') text += '; new sessions are refused';
  if (degrade.reason) text += ` — ${degrade.reason}`;
  return text;
}

function snapshot(which) {
  const video = $(which === 'input' ? 'input' : 'output');
  if (!video.videoWidth) return null;
  const canvas = document.createElement('canvas');
  canvas.width = video.videoWidth; canvas.height = video.videoHeight;
  const g = canvas.getContext('2d', {willReadFrequently: true});
  g.drawImage(video, 0, 0);
  return {width: canvas.width, height: canvas.height, data: Array.from(g.getImageData(0, 0, canvas.width, canvas.height).data)};
}

// ---------------------------------------------------------------- panels: ControlNets, LoRAs
async function applyPanel(key) {
  // A panel's settled changes: sent live, or kept for the next offer (like apply(key)).
  queryUses[key] = null;
  touched.add(key);
  if (!connected()) {
    fieldError(key, '');
    if (pc) unsent.add(key);
    return;
  }
  await update({[key]: panels[key].uses()});
}

async function getJson(path) {
  const headers = TOKEN ? {Authorization: `Bearer ${TOKEN}`} : {};
  const response = await fetch(path, {headers});
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(answer.error || `the server answered ${response.status}`);
  return answer;
}

async function listControlNets() {
  const panel = panels.controlnets;
  try {
    const answer = await getJson('controlnets');
    L.controlnets = answer.controlnets;
    // Older servers leave the bank's capacity out: the page then learns it from a refusal.
    L.featureBankFrames = Number.isInteger(answer.feature_bank_frames) ? answer.feature_bank_frames : null;
    consistency.capacity(L.featureBankFrames);
    panel.build(answer.controlnets);
    $('controlnet-preview').closest('label').hidden = !answer.controlnets.length;  // nothing to preview
    panel.show(queryUses.controlnets === null ? server.controlnets : queryUses.controlnets);
  } catch (error) {
    panel.unavailable(String(error.message || error));
  }
}

async function listLoras() {
  // GET /loras (streams/lora_routes.py): the library's LoRAs and capacity (null: no library).
  const panel = panels.loras;
  try {
    const answer = await getJson('loras');
    L.loraCapacity = answer.capacity || null;
    L.loras = answer.loras || [];
    panel.build(answer);
    panel.show(queryUses.loras === null ? server.loras : queryUses.loras);
  } catch (error) {
    panel.unavailable(String(error.message || error));
  }
}

// ---------------------------------------------------------------- style image (IP-Adapter)
function onStyleImage(image) {
  // The user picked a style image (or removed it): sent now, or once the session's channel opens.
  fieldError(STYLE, '');
  if (image) {
    if (connected()) sendStyleImage(image);
    else style.sending(image, false);
  } else if (connected() && server[STYLE]) {
    update({[STYLE]: null});
  }
}

async function sendStyleImage(image) {
  // b"LDIM" + the file as one binary message; a file over the channel's message size goes as a
  // smaller JPEG the browser makes of it (the server's encoder sees 224×224 anyway).
  const ch = channel;
  const most = ((pc && pc.sctp && pc.sctp.maxMessageSize) || 65536) - 4;  // aiortc's: 256 KiB
  let bytes = image.bytes;
  style.sending(image, true);
  if (bytes.length > most) {
    bytes = await style.shrink(new Blob([image.bytes]), most);
    if (ch !== channel) return;
    if (!bytes) {
      style.refused(image);
      const kib = (n) => Math.ceil(n / 1024);
      fieldError(STYLE, `${image.name} (${kib(image.bytes.length)} KiB) is more than the connection takes `
        + `(${kib(most)} KiB) and the browser cannot read it as an image to send a smaller copy`);
      return;
    }
  }
  uploads.push(image);
  ch.send(style.message(bytes));
}

function isUploadReply(message) {
  // A style image's answer: {ok, ip_image: key} or {error, field: "ip_image"}, with no id.
  if (message.id !== undefined || !uploads.length) return false;
  return 'ip_image' in message || message.field === STYLE || /^rate limit/.test(message.error || '');
}

function uploaded(message) {
  const image = uploads.shift();
  if (message.ok) {
    server[STYLE] = message.ip_image;
    fieldError(STYLE, '');
    style.acknowledged(image, message.ip_image);
    showMessage(`applied: ${STYLE}`);
  } else {
    style.refused(image);  // the session keeps the style image it had
    fieldError(STYLE, message.error);
  }
}

// ---------------------------------------------------------------- control images (ControlNets fed "client")
function onControlImage(net, image) {
  // The user picked a control image for a net fed "client": sent now, or once the channel opens.
  if (connected()) sendControlImage(net, image);
  else panels.controlnets.sending(net, image, false);
}

async function sendControlImage(net, image) {
  // b"LDCN" + n + the net's name + the file as one binary message; a file over the channel's
  // message size goes as a smaller JPEG the browser makes of it (style_panel.js shrinkImage).
  const ch = channel, panel = panels.controlnets;
  panel.flush();  // the "client" use goes first: the server takes an image only for such a net
  const most = ((pc && pc.sctp && pc.sctp.maxMessageSize) || 65536) - 5 - new TextEncoder().encode(net).length - 4;
  let bytes = image.bytes;
  panel.sending(net, image, true);
  if (bytes.length > most) {
    bytes = await style.shrink(new Blob([image.bytes]), most);
    if (ch !== channel) return;
    if (!bytes) {
      const kib = (n) => Math.ceil(n / 1024);
      const text = `${image.name} (${kib(image.bytes.length)} KiB) is more than the connection takes `
        + `(${kib(most)} KiB) and the browser cannot read it as an image to send a smaller copy`;
      panel.refused(net, image, text);
      recordError(text);
      return;
    }
  }
  controlUploads.push({net, image});
  ch.send(panel.message(net, bytes));
}

function isControlImageReply(message) {
  // A control image's answer: {ok, control_image: net} or {error, field: "control_image"}, no id.
  if (message.id !== undefined || !controlUploads.length) return false;
  return 'control_image' in message || message.field === 'control_image';
}

function controlImageAnswered(message) {
  const {net, image} = controlUploads.shift();
  if (message.ok) {
    panels.controlnets.acknowledged(net, image);
    setAwaiting(message.awaiting_control_images || []);
    showMessage(`applied: control image for ${message.control_image}`);
  } else {
    panels.controlnets.refused(net, image, message.error);  // the session keeps the image it had
    recordError(message.error);
  }
}

function setAwaiting(nets) {
  L.awaiting = nets;
  panels.controlnets.awaiting(nets);
}

const LDCP = 'LDCP';  // livediff.wire.CONTROL_PREVIEW_MAGIC: b"LDCP" | n | the net's name | a JPEG
function showPreview(data) {
  const bytes = new Uint8Array(data);
  if (bytes.length < 6 || String.fromCharCode(...bytes.subarray(0, 4)) !== LDCP) return;
  const n = bytes[4];
  const net = new TextDecoder().decode(bytes.subarray(5, 5 + n));
  if (!$('controlnet-preview').checked) return;
  const url = URL.createObjectURL(new Blob([bytes.subarray(5 + n)], {type: 'image/jpeg'}));
  if (panels.controlnets.preview(net, url)) L.previews[net] = (L.previews[net] || 0) + 1;
  else URL.revokeObjectURL(url);
}

function onPreviewToggle() {
  const on = $('controlnet-preview').checked;
  if (!on) for (const net of Object.keys(L.previews)) panels.controlnets.preview(net, null);
  if (connected()) update({control_preview: on});
}

// ---------------------------------------------------------------- wiring
function init() {
  for (const key of PARAM_KEYS) {
    server[key] = fromField(key, defaultOf(form.elements[key]));
    if (query.has(key)) { form.elements[key].value = query.get(key); touched.add(key); }
    shown[key] = form.elements[key].value;
  }
  for (const key of PANEL_KEYS) {
    server[key] = [];
    if (queryUses[key] !== null) touched.add(key);
  }
  server[STYLE] = null;
  form.elements.codec.value = (query.get('codec') || '').toLowerCase();
  form.addEventListener('submit', (event) => event.preventDefault());
  for (const key of PARAM_KEYS) {
    const el = form.elements[key];
    showValue(key);
    el.addEventListener('input', () => showValue(key));
    if (consistency.keys.includes(key)) el.addEventListener('change', () => consistency.settle(key, () => apply(key)));
    else if (style.keys.includes(key)) el.addEventListener('change', () => style.settle(key, () => apply(key)));
    else el.addEventListener('change', () => apply(key));
    el.addEventListener('keydown', (event) => {
      // Enter applies the field; in the prompt, Shift+Enter is a new line.
      if (event.key !== 'Enter' || event.isComposing || (event.shiftKey && el.tagName === 'TEXTAREA')) return;
      event.preventDefault();
      apply(key);
    });
  }
  for (const id of ['input', 'output']) {  // the caption over an empty box goes once video plays
    $(id).addEventListener('playing', () => $(id).parentElement.classList.add('live'));
  }
  $('controlnet-preview').addEventListener('change', onPreviewToggle);
  $('start').addEventListener('click', start);
  $('stop').addEventListener('click', stop);
  $('banner-cancel').addEventListener('click', stop);
  if (query.get('controls') === '0') document.body.classList.add('output-only');
  Object.assign(L, {start, stop, update, snapshot, controlnets: null, featureBankFrames: null, loras: null, loraCapacity: null});
  listControlNets();
  listLoras();
  if (query.get('autostart') === '1') start();
}

init();
