// The ControlNet panel of the livediff page: one row per ControlNet the server loaded
// (GET /controlnets: [{name, preprocessors, default}], engine/control_plan.py), each with
// "use", a scale 0–2, its preprocessor and, for canny, the thresholds and blur
// (models/control_uses.py CannyParams). The panel holds no session state: app.js sends what
// uses() returns as the live "controlnets" parameter, and show(uses) puts the server's value back.
// A row whose preprocessor is "client" takes the net's control image from the user (a drop
// zone and a file picker): app.js sends it (b"LDCN" + name length + name + the file, on the data
// channel) and tells the row the server's answer (acknowledged, refused) and whether the
// session still waits for it (awaiting); the image is kept and sent again to the next session.
// With "show what the ControlNets see" checked, app.js asks the server for previews
// (control_preview) and preview(net, url) shows the latest beside its row.
'use strict';

const CANNY_DEFAULTS = {low: 100, high: 200, sigma: 1};  // CannyParams' defaults
const CANNY_FIELDS = [  // [key, label, max, step]: each in [0, max]
  ['low', 'canny low threshold', 255, 1],
  ['high', 'canny high threshold', 255, 1],
  ['sigma', 'canny blur (sigma)', 3, 0.1],
];
const PREPROCESSOR_LABELS = {
  canny: 'canny edges',
  depth: 'depth map',
  soft_edge: 'soft edges (HED)',
  passthrough: 'the camera picture (tile)',
  previous_output: 'the previous output (TemporalNet)',
  client: 'an image you send',
};
const LDCN = [0x4c, 0x44, 0x43, 0x4e];  // livediff.wire.CONTROL_IMAGE_MAGIC

function controlImageMessage(net, bytes) {  // b"LDCN" | n | the net's name (n bytes) | the file
  const name = new TextEncoder().encode(net);
  const message = new Uint8Array(LDCN.length + 1 + name.length + bytes.length);
  message.set(LDCN);
  message[LDCN.length] = name.length;
  message.set(name, LDCN.length + 1);
  message.set(bytes, LDCN.length + 1 + name.length);
  return message;
}
const SETTLE_MS = 150;  // a burst of changes (arrow keys on a slider) becomes one message

function useFromText(text) {
  // NAME, NAME:SCALE or NAME:SCALE:PREPROCESSOR (models/control_uses.py use_from_text)
  const parts = text.split(':');
  const isNumber = (s) => s !== undefined && s.trim() !== '' && Number.isFinite(Number(s));
  if (parts.length >= 3 && isNumber(parts.at(-2)) && !isNumber(parts.at(-1))) {
    return {controlnet: parts.slice(0, -2).join(':'), scale: Number(parts.at(-2)), preprocessor: parts.at(-1)};
  }
  if (parts.length >= 2 && isNumber(parts.at(-1))) {
    return {controlnet: parts.slice(0, -1).join(':'), scale: Number(parts.at(-1))};
  }
  return {controlnet: text};
}

function usesFrom(value) {
  // The "controlnets" parameter in any form the server takes: a list, one object, or text.
  if (typeof value === 'string') return value.split(',').map((s) => s.trim()).filter(Boolean).map(useFromText);
  if (!value) return [];
  return (Array.isArray(value) ? value : [value]).map((u) => (typeof u === 'string' ? useFromText(u) : u));
}

function element(tag, attributes = {}, children = []) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === 'text') el.textContent = value;
    else el.setAttribute(key, value);
  }
  el.append(...children);
  return el;
}

function slider(label, {min = 0, max, step, value, role}) {
  const input = element('input', {type: 'range', min, max, step, value, 'data-role': role, 'aria-label': label});
  const shown = element('output', {text: String(value)});
  input.addEventListener('input', () => { shown.textContent = input.value; });
  const row = element('label', {}, [`${label} `, shown, input]);
  return {row, input, set(v) { input.value = v; shown.textContent = input.value; }};
}

function netRow(option) {
  const enabled = element('input', {type: 'checkbox', 'data-role': 'enabled'});
  const scale = slider('scale', {max: 2, step: 0.05, value: 1, role: 'scale'});
  const preprocessor = element('select', {'data-role': 'preprocessor', 'aria-label': `${option.name} preprocessor`});
  for (const name of option.preprocessors) {
    const text = (PREPROCESSOR_LABELS[name] || name) + (name === option.default ? ' (default)' : '');
    preprocessor.add(new Option(text, name, name === option.default, name === option.default));
  }
  const canny = Object.fromEntries(CANNY_FIELDS.map(([key, label, max, step]) => [
    key, slider(label, {max, step, value: CANNY_DEFAULTS[key], role: key}),
  ]));
  const cannyBox = element('div', {class: 'canny', 'data-role': 'canny'}, Object.values(canny).map((s) => s.row));
  const drop = element('div', {
    class: 'drop-zone', role: 'button', tabindex: '0', 'data-role': 'client-drop',
    'aria-label': `choose a control image for ${option.name}`,
    text: 'drop a control image here, or click to choose a file',
  });
  const picker = element('input', {type: 'file', accept: 'image/*', hidden: '', 'data-role': 'client-file'});
  const clientNote = element('p', {class: 'panel-note', role: 'status', 'data-role': 'client-note'});
  const clientError = element('small', {class: 'field-error', 'aria-live': 'polite', 'data-role': 'client-error'});
  const clientBox = element('div', {class: 'client', 'data-role': 'client'}, [drop, picker, clientNote, clientError]);
  const preview = element('img', {class: 'thumb', 'data-role': 'preview', alt: `what ${option.name} sees`, hidden: ''});
  const settings = element('fieldset', {class: 'controlnet-settings'}, [
    scale.row, element('label', {}, ['preprocessor ', preprocessor]), cannyBox, clientBox, preview,
  ]);
  const root = element('div', {class: 'controlnet', 'data-net': option.name}, [
    element('label', {class: 'use'}, [enabled, ' use ', element('b', {text: option.name})]),
    settings,
  ]);
  const row = {option, root, enabled, scale, preprocessor, canny, drop, picker, clientNote, clientError, preview};
  row.image = null;     // the control image last picked ({bytes, name}), kept for later sessions
  row.running = null;   // the last one the server took (a refused pick goes back to it)
  row.waiting = false;  // the server said the session waits for this net's image
  row.refresh = () => {  // what depends on other controls: off hides the net's settings
    settings.disabled = settings.hidden = !enabled.checked;
    cannyBox.hidden = preprocessor.value !== 'canny';
    clientBox.hidden = preprocessor.value !== 'client';
  };
  row.refresh();
  return row;
}

function useOf(row) {
  const use = {controlnet: row.option.name, scale: Number(row.scale.input.value), preprocessor: row.preprocessor.value};
  if (use.preprocessor === 'canny') {
    use.params = Object.fromEntries(CANNY_FIELDS.map(([key]) => [key, Number(row.canny[key].input.value)]));
  }
  return use;
}

function showUse(row, use) {
  row.enabled.checked = Boolean(use);
  if (use) {
    row.scale.set(use.scale === undefined ? 1 : use.scale);
    row.preprocessor.value = use.preprocessor || row.option.default;
    const params = {...CANNY_DEFAULTS, ...(use.params || {})};
    for (const [key] of CANNY_FIELDS) row.canny[key].set(params[key]);
  }
  row.refresh();
}

// createControlNetPanel(root, onChange): root holds #controlnet-note and #controlnet-list;
// onChange() is called once the user's changes settle.
function say(row, text) { row.clientNote.textContent = text || ''; row.clientNote.hidden = !text; }

function wire(row, changed, onImage) {  // the row's control-image drop zone and picker
  const pick = async (file) => {
    if (!file) return;
    row.image = {bytes: new Uint8Array(await file.arrayBuffer()), name: file.name || 'image'};
    row.clientError.textContent = '';
    onImage(row.option.name, row.image);
  };
  wireDropZone(row.drop, row.picker, pick, true);  // the panel's change handler skips the file
  row.root.addEventListener('change', () => changed(row));
}

// createControlNetPanel(root, onChange, onImage): root holds #controlnet-note and
// #controlnet-list; onChange() is called once the user's changes settle, onImage(net, image)
// when the user picks a control image ({bytes, name}) for a net fed "client".
function createControlNetPanel(root, onChange, onImage = () => {}) {
  const note = root.querySelector('#controlnet-note'), list = root.querySelector('#controlnet-list');
  let rows = [], timer = null;
  const changed = (row) => {
    row.refresh();
    clearTimeout(timer);
    timer = setTimeout(() => { timer = null; onChange(); }, SETTLE_MS);
  };
  const rowOf = (net) => rows.find((row) => row.option.name === net);
  return {
    build(options) {
      rows = options.map(netRow);
      list.replaceChildren(...rows.map((row) => row.root));
      for (const row of rows) wire(row, changed, onImage);
      note.textContent = options.length ? ''
        : 'This server has no ControlNets loaded (start it with --controlnet SOURCE to use one).';
      note.hidden = Boolean(options.length);
    },
    unavailable(text) {
      note.textContent = `The server's ControlNets could not be listed: ${text}`;
      note.hidden = false;
    },
    uses() { return rows.filter((row) => row.enabled.checked).map(useOf); },
    show(value) {
      const uses = usesFrom(value);
      for (const row of rows) showUse(row, uses.find((u) => u.controlnet === row.option.name));
    },
    editing() { return root.contains(document.activeElement); },
    flush() {  // send settling changes now (a control image must follow its net's "client" use)
      if (timer === null) return;
      clearTimeout(timer);
      timer = null;
      onChange();
    },
    images() {  // [net, image] for each enabled "client" net with a picked image: for a new session
      return rows.filter((row) => row.image && row.enabled.checked && row.preprocessor.value === 'client')
        .map((row) => [row.option.name, row.image]);
    },
    sending(net, image, connected) {
      const row = rowOf(net);
      if (row && image === row.image) say(row, connected ? `sending ${image.name}…` : `${image.name} is sent when the session starts`);
    },
    acknowledged(net, image) {  // the server took image for net: it runs from the next frame
      const row = rowOf(net);
      if (!row) return;
      row.waiting = false;
      row.running = image;
      if (image !== row.image) return;  // a newer pick is on its way
      row.clientError.textContent = '';
      say(row, `in use: ${image.name}`);
    },
    refused(net, image, text) {  // the session keeps the image it had (or waits still)
      const row = rowOf(net);
      if (!row) return;
      if (image === row.image) row.image = row.running;  // the next session gets the kept one
      row.clientError.textContent = text;
      say(row, row.waiting ? 'waiting for a control image (the net runs at scale 0 until one comes)'
        : (row.running ? `in use: ${row.running.name}` : ''));
    },
    awaiting(nets) {  // the server's awaiting_control_images: the nets at scale 0 until their image
      for (const row of rows) {
        const waiting = nets.includes(row.option.name);
        if (waiting) say(row, 'waiting for a control image (the net runs at scale 0 until one comes)');
        else if (row.waiting) say(row, row.running ? `in use: ${row.running.name}` : '');
        row.waiting = waiting;
      }
    },
    stopped() {  // no session: the picked images wait for the next one
      for (const row of rows) {
        row.waiting = false;
        row.running = null;
        say(row, row.image ? `${row.image.name} is sent when the session starts` : '');
        row.preview.hidden = true;
      }
    },
    preview(net, url) {  // the latest control image the server's net used (null: none)
      const row = rowOf(net);
      if (!row) return false;
      const before = row.preview.getAttribute('src');
      if (url) row.preview.src = url; else row.preview.removeAttribute('src');
      row.preview.hidden = !url;
      if (before && before.startsWith('blob:')) URL.revokeObjectURL(before);
      return true;
    },
    message: controlImageMessage,
    usesFrom,
  };
}
