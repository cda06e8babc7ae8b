// The LoRA panel of the livediff page: one row per LoRA of the server's per-session library
// (GET /loras: {loras: [{name, rank, …}], capacity: {slots_per_row, …} | null}, streams/lora_routes.py),
// each with "use" and a scale. A session combines at most capacity.slots_per_row of them
// (models/lora_uses.py: scale in [-10, 10]; the slider covers -2 … 2). The panel holds no session
// state: app.js sends what uses() returns as the live "loras" parameter, and show(uses) puts the
// server's value back.
'use strict';

const LORA_SETTLE_MS = 150;  // a burst of changes (arrow keys on a slider) becomes one message
const NO_LIBRARY_NOTE = 'no LoRA library loaded (start the server with --lora-library FOLDER to use LoRAs per session)';
const EMPTY_LIBRARY_NOTE = "the server's LoRA library is empty (load LoRAs into it with POST /loras)";

function loraUseFromText(text) {
  // NAME or NAME:SCALE (models/lora_uses.py use_from_text)
  const at = text.lastIndexOf(':');
  const scale = at > 0 ? text.slice(at + 1).trim() : '';
  if (scale !== '' && Number.isFinite(Number(scale))) return {name: text.slice(0, at), scale: Number(scale)};
  return {name: text, scale: 1};
}

function loraUsesFrom(value) {
  // The "loras" parameter in any form the server takes: a list, one object, or text.
  if (typeof value === 'string') return value.split(',').map((s) => s.trim()).filter(Boolean).map(loraUseFromText);
  if (!value) return [];
  return (Array.isArray(value) ? value : [value])
    .map((u) => (typeof u === 'string' ? loraUseFromText(u) : {scale: 1, ...u}));
}

function loraElement(tag, attributes = {}, children = []) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === 'text') el.textContent = value;
    else el.setAttribute(key, value);
  }
  el.append(...children);
  return el;
}

function loraRow(lora) {
  const enabled = loraElement('input', {type: 'checkbox', 'data-role': 'enabled'});
  const scale = loraElement('input', {
    type: 'range', min: -2, max: 2, step: 0.05, value: 1, 'data-role': 'scale', 'aria-label': `${lora.name} scale`,
  });
  const shown = loraElement('output', {text: '1'});
  scale.addEventListener('input', () => { shown.textContent = scale.value; });
  const settings = loraElement('fieldset', {class: 'lora-settings'}, [loraElement('label', {}, ['scale ', shown, scale])]);
  const about = lora.rank === undefined ? '' : ` (rank ${lora.rank})`;
  const root = loraElement('div', {class: 'lora', 'data-lora': lora.name}, [
    loraElement('label', {class: 'use'}, [enabled, ' use ', loraElement('b', {text: lora.name}), about]),
    settings,
  ]);
  const row = {lora, root, enabled, scale};
  row.setScale = (value) => { scale.value = value; shown.textContent = scale.value; };
  row.refresh = () => { settings.disabled = settings.hidden = !enabled.checked; };
  row.refresh();
  return row;
}

// createLoraPanel(root, onChange): root holds #lora-note and #lora-list; onChange() is called
// once the user's changes settle.
function createLoraPanel(root, onChange) {
  const note = root.querySelector('#lora-note'), list = root.querySelector('#lora-list');
  let rows = [], timer = null, most = 0;
  const limit = () => {  // a session combines at most `most` LoRAs: the others wait
    const full = rows.filter((row) => row.enabled.checked).length >= most;
    for (const row of rows) row.enabled.disabled = full && !row.enabled.checked;
  };
  const changed = (row) => {
    row.refresh();
    limit();
    clearTimeout(timer);
    timer = setTimeout(onChange, LORA_SETTLE_MS);
  };
  const say = (text) => { note.textContent = text; note.hidden = !text; };
  return {
    // answer: GET /loras' body
    build(answer) {
      const capacity = answer.capacity || null, loras = capacity ? answer.loras || [] : [];
      most = capacity ? capacity.slots_per_row : 0;
      rows = loras.map(loraRow);
      list.replaceChildren(...rows.map((row) => row.root));
      for (const row of rows) row.root.addEventListener('change', () => changed(row));
      if (!capacity) say(NO_LIBRARY_NOTE);
      else if (!loras.length) say(EMPTY_LIBRARY_NOTE);
      else say(`up to ${most} per session`);
      limit();
    },
    unavailable(text) { say(`The server's LoRAs could not be listed: ${text}`); },
    uses() {
      return rows.filter((row) => row.enabled.checked)
        .map((row) => ({name: row.lora.name, scale: Number(row.scale.value)}));
    },
    show(value) {
      const uses = loraUsesFrom(value);
      for (const row of rows) {
        const use = uses.find((u) => u.name === row.lora.name);
        row.enabled.checked = Boolean(use);
        if (use) row.setScale(use.scale);
        row.refresh();
      }
      limit();
    },
    editing() { return root.contains(document.activeElement); },
    usesFrom: loraUsesFrom,
  };
}
