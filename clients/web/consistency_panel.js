// The Consistency group of the livediff page: the feature bank (feature_bank, 0–4 frames, every
// bank_interval-th frame kept), its fusion strength and threshold, latent feedback, and the scene
// cut that starts both over (engine/config.py GenerationParams; the
// README's "Temporal consistency"). Its fields are plain live parameters of app.js (sent,
// acknowledged, refused and reverted like strength); this module adds what is its own:
// the server's bank capacity (GET /controlnets' "feature_bank_frames") and the settling of
// slider bursts into one message.
'use strict';

const BANK_KEYS = ['feature_bank', 'bank_interval', 'feature_fusion', 'fusion_threshold'];  // useless without a bank
const CONSISTENCY_KEYS = [...BANK_KEYS, 'latent_feedback', 'scene_cut'];
const CONSISTENCY_SETTLE_MS = 150;  // a burst of changes (arrow keys on a slider) becomes one message
const NO_BANK_NOTE = 'this server runs no feature bank (start it with --feature-bank-frames N)';

// createConsistencyPanel(root, form): root holds #consistency-note; the fields are form's.
function createConsistencyPanel(root, form) {
  const note = root.querySelector('#consistency-note');
  const timers = {};
  return {
    keys: CONSISTENCY_KEYS,
    // frames: the most a session's bank may keep here; 0: none (the bank controls are disabled,
    // latent feedback still works); null: unknown (the server is asked and may refuse).
    capacity(frames) {
      const none = frames === 0;
      for (const key of BANK_KEYS) form.elements[key].disabled = none;
      for (const option of form.elements.feature_bank.options) {
        option.disabled = frames !== null && Number(option.value) > frames;
      }
      note.textContent = none ? NO_BANK_NOTE : '';
      note.hidden = !none;
    },
    // apply() once the key's changes settle
    settle(key, apply) {
      clearTimeout(timers[key]);
      timers[key] = setTimeout(apply, CONSISTENCY_SETTLE_MS);
    },
  };
}
