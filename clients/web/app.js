// livediff browser client: camera → WebRTC → server session → processed video back.
// Plain JS, no build step. The protocol is documented in streams/signaling.py (POST /offer)
// and streams/peer.py (data channel). A server with an access token is opened as
// /?token=… : the page sends it to /offer as "Authorization: Bearer …" (streams/auth.py).
// State for automation and tests lives in window.livediff:
//   state ('idle'|'starting'|'connecting'|'connected'|'stopped'|'error'), session, codec,
//   errors[], serverStats (last data-channel stats), framesSent, framesDecoded,
//   latencies[] (ms, ?src=marker only), closing (the server's reason when it ended the session),
//   update(params) → Promise(reply),
//   snapshot('input'|'output') → {width, height, data: RGBA array}, start(), stop().
'use strict';

const query = new URLSearchParams(location.search);
const TOKEN = query.get('token');
const PARAM_KEYS = ['prompt', 'negative_prompt', 'strength', 'seed', 'guidance_scale'];
const NUMERIC = new Set(['strength', 'seed', 'guidance_scale']);
const MARKER_BITS = 10, MARKER_ROWS = 8, MARKER_MOD = 1 << MARKER_BITS;  // streams/frame_marker.py

const $ = (id) => document.getElementById(id);
const form = $('params');
const L = window.livediff = {
  state: 'idle', session: null, codec: null, errors: [], serverStats: null, closing: null,
  framesSent: 0, framesDecoded: 0, latencies: [], replies: [],
};
let pc = null, channel = null, media = null, statsTimer = null, markerTimer = null;
let requestId = 0;
const pending = new Map();
const touched = new Set();  // only parameters set in the URL or by the user override the server's defaults

function setState(state, message, isError) {
  L.state = state;
  const el = $('state');
  el.textContent = state;
  el.className = 'state ' + state;
  if (message !== undefined) showMessage(message, isError);
}

function showMessage(text, isError) {
  const el = $('message');
  el.textContent = text || '';
  el.className = 'message' + (isError ? ' error' : '');
  if (isError) L.errors.push(text);
}

function formParams() {
  const params = {};
  for (const key of touched) {
    const value = form.elements[key].value;
    if (value === '') continue;
    params[key] = NUMERIC.has(key) ? Number(value) : value;
  }
  return params;
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
  channel = connection.createDataChannel('control');
  channel.onmessage = (event) => {
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    if (message.stats) { L.serverStats = message.stats; renderServerStats(message.stats); return; }
    if (message.closing) { L.closing = message.closing; showMessage(`server: ${message.closing}`, false); return; }
    L.replies.push(message);
    const waiter = pending.get(message.id);
    if (waiter) { pending.delete(message.id); waiter(message); }
    if (message.error) showMessage(message.error, true);
  };
}

async function start() {
  if (pc) return;
  $('start').disabled = true;
  setState('starting', '');
  try {
    media = query.get('src') === 'marker' ? markerSource() : await cameraSource();
    $('input').srcObject = media;
    pc = new RTCPeerConnection({iceServers: []});
    openChannel(pc);
    const track = media.getVideoTracks()[0];
    const transceiver = pc.addTransceiver(track, {direction: 'sendrecv', streams: [media]});
    preferCodec(transceiver, form.elements.codec.value);
    pc.ontrack = (event) => {
      const output = $('output');
      output.srcObject = event.streams[0] || new MediaStream([event.track]);
      if (query.get('src') === 'marker') watchMarkers(output);
    };
    pc.onconnectionstatechange = () => {
      const state = pc && pc.connectionState;
      if (state === 'connected') setState('connected', '');
      else if (state === 'failed') setState('error', 'connection failed', true);
      else if (state === 'closed' || (state === 'disconnected' && L.closing)) {
        stop(); setState('stopped', L.closing ? `server: ${L.closing}` : 'connection closed');
      }
    };
    await pc.setLocalDescription(await pc.createOffer());
    await waitForIceGathering(pc);
    setState('connecting');
    const headers = {'Content-Type': 'application/json'};
    if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
    const response = await fetch('offer', {
      method: 'POST', headers,
      body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type, params: formParams()}),
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `server answered ${response.status}`);
    L.session = answer.session;
    $('stat-session').textContent = answer.session;
    await pc.setRemoteDescription({sdp: answer.sdp, type: answer.type});
    statsTimer = setInterval(collectStats, 1000);
    $('stop').disabled = false;
  } catch (error) {
    stop();
    setState('error', String(error.message || error), true);
  }
}

function stop() {
  clearInterval(statsTimer); clearInterval(markerTimer);
  if (pc) pc.close();
  if (media) media.getTracks().forEach((t) => t.stop());
  pc = channel = media = null;
  for (const waiter of pending.values()) waiter({error: 'stopped'});
  pending.clear();
  $('start').disabled = false; $('stop').disabled = true;
  if (L.state !== 'error') setState('stopped');
}

function update(params) {
  if (!channel || channel.readyState !== 'open') return Promise.resolve({error: 'not connected'});
  const id = ++requestId;
  return new Promise((resolve) => {
    pending.set(id, resolve);
    channel.send(JSON.stringify({...params, id}));
  });
}

// ---------------------------------------------------------------- stats
let last = null;
async function collectStats() {
  if (!pc) return;
  const report = await pc.getStats();
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

function renderServerStats(s) {
  // s: the server's per-session stats (streams/peer.py); s.engine is the engine's session.stats()
  const ms = (v) => (typeof v === 'number' ? `${v.toFixed(0)}` : '–');
  $('stat-server-fps').textContent = `${s.fps_in} / ${s.fps_out}`;
  $('stat-latency').textContent = `${ms(s.server_latency_ms_p50)} / ${ms(s.server_latency_ms_p99)} ms`;
  const engine = s.engine || {};
  const total = (engine.latency_ms || {}).total || {};
  $('stat-engine-latency').textContent = `${ms(total.p50)} / ${ms(total.p99)} ms`;
  $('stat-drops').textContent = engine.dropped === undefined ? '–' : `${engine.dropped} / ${engine.skipped}`;
  $('stat-engine').textContent = engine.steps === undefined ? '–'
    : `${engine.steps} step(s), ${(engine.render_size || []).join('×')}`;
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

// ---------------------------------------------------------------- wiring
function init() {
  for (const key of PARAM_KEYS) {
    if (query.has(key)) { form.elements[key].value = query.get(key); touched.add(key); }
  }
  form.elements.codec.value = (query.get('codec') || '').toLowerCase();
  const strengthValue = () => { $('strength-value').textContent = form.elements.strength.value; };
  strengthValue();
  form.elements.strength.addEventListener('input', strengthValue);
  for (const key of PARAM_KEYS) {
    form.elements[key].addEventListener('change', async () => {
      touched.add(key);
      if (!pc) return;
      const value = form.elements[key].value;
      const reply = await update({[key]: NUMERIC.has(key) ? Number(value) : value});
      showMessage(reply.error || `${key} updated`, Boolean(reply.error));
    });
  }
  $('start').addEventListener('click', start);
  $('stop').addEventListener('click', stop);
  if (query.get('controls') === '0') document.body.classList.add('output-only');
  Object.assign(L, {start, stop, update, snapshot});
  if (query.get('autostart') === '1') start();
}

init();
