// The ControlNet panel of the livediff page: one row per ControlNet the server loaded
// (GET /controlnets: [{name, preprocessors, default}], engine/control_plan.py), each with
// "use", a scale 0–2, its preprocessor and, for canny, the thresholds and blur
// (models/control_uses.py CannyParams). The panel holds no session state: app.js sends what
// uses() returns as the live "controlnets" parameter, and show(uses) puts the server's value back.
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
};
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
  const settings = element('fieldset', {class: 'controlnet-settings'}, [
    scale.row, element('label', {}, ['preprocessor ', preprocessor]), cannyBox,
  ]);
  const root = element('div', {class: 'controlnet', 'data-net': option.name}, [
    element('label', {class: 'use'}, [enabled, ' use ', element('b', {text: option.name})]),
    settings,
  ]);
  const row = {option, root, enabled, scale, preprocessor, canny};
  row.refresh = () => {  // what depends on other controls: off hides the net's settings
    settings.disabled = settings.hidden = !enabled.checked;
    cannyBox.hidden = preprocessor.value !== 'canny';
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
function createControlNetPanel(root, onChange) {
  const note = root.querySelector('#controlnet-note'), list = root.querySelector('#controlnet-list');
  let rows = [], timer = null;
  const changed = (row) => {
    row.refresh();
    clearTimeout(timer);
    timer = setTimeout(onChange, SETTLE_MS);
  };
  return {
    build(options) {
      rows = options.map(netRow);
      list.replaceChildren(...rows.map((row) => row.root));
      for (const row of rows) row.root.addEventListener('change', () => changed(row));
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
    usesFrom,
  };
}
