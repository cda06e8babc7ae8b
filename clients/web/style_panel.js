// The Style image group of the livediff page: a drop zone and a file picker for the IP-Adapter's
// style image, its thumbnail, and the ip_scale slider (a plain live parameter of app.js's form).
// app.js uploads the image (b"LDIM" + the file on the data channel, streams/style_uploads.py) and
// tells this module the server's answer: acknowledged() keeps the image, refused() goes back to
// the one the session runs (or none). The image is kept for the next session (sent again when
// its channel opens).
'use strict';

const STYLE_KEYS = ['ip_scale'];
const STYLE_SETTLE_MS = 150;  // a burst of changes (arrow keys on the slider) becomes one message
const LDIM = new Uint8Array([0x4c, 0x44, 0x49, 0x4d]);  // livediff.wire.STYLE_IMAGE_MAGIC
const SHRINK_SIDES = [1024, 768, 512, 384, 256];  // CLIP sees 224²: a smaller copy loses little

function styleMessage(bytes) {  // the upload as one binary message
  const message = new Uint8Array(LDIM.length + bytes.length);
  message.set(LDIM);
  message.set(bytes, LDIM.length);
  return message;
}

async function shrinkImage(blob, maxBytes) {
  // An image over the data channel's message size, re-encoded as a smaller JPEG; null when the
  // browser cannot decode it (then the server could not either, or it is too large to send).
  let bitmap;
  try { bitmap = await createImageBitmap(blob); } catch { return null; }
  const canvas = document.createElement('canvas');
  for (const side of SHRINK_SIDES) {
    const ratio = Math.min(1, side / Math.max(bitmap.width, bitmap.height));
    canvas.width = Math.max(1, Math.round(bitmap.width * ratio));
    canvas.height = Math.max(1, Math.round(bitmap.height * ratio));
    canvas.getContext('2d').drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const jpeg = await new Promise((resolve) => canvas.toBlob(resolve, 'image/jpeg', 0.9));
    if (jpeg && jpeg.size <= maxBytes) return new Uint8Array(await jpeg.arrayBuffer());
  }
  return null;
}

// createStylePanel(root, onImage): root holds #style-drop, #style-file, #style-thumb,
// #style-clear and #style-note; onImage(image) is called with {bytes, name, url} when the user
// picks an image, and with null when they remove it.
function createStylePanel(root, onImage) {
  const drop = root.querySelector('#style-drop'), picker = root.querySelector('#style-file');
  const thumb = root.querySelector('#style-thumb'), clear = root.querySelector('#style-clear');
  const note = root.querySelector('#style-note');
  const timers = {};
  let running = null;  // the image the session runs (acknowledged), or null
  let chosen = null;   // the image last picked: running, or on its way to the server
  const say = (text) => { note.textContent = text || ''; note.hidden = !text; };
  const showImage = (image) => {
    thumb.hidden = clear.hidden = !image;
    if (image) { thumb.src = image.url; thumb.alt = `style image: ${image.name}`; } else thumb.removeAttribute('src');
  };
  const forget = (image) => { if (image && image !== running && image !== chosen) URL.revokeObjectURL(image.url); };
  const pick = async (file) => {
    if (!file) return;
    const image = {bytes: new Uint8Array(await file.arrayBuffer()), name: file.name || 'image', url: URL.createObjectURL(file)};
    const before = chosen;
    chosen = image;
    forget(before);
    showImage(image);
    onImage(image);
  };
  wireDropZone(drop, picker, pick);
  clear.addEventListener('click', () => {
    const before = chosen;
    chosen = null;
    forget(before);
    showImage(null);
    say('');
    onImage(null);
  });
  return {
    keys: STYLE_KEYS,
    image() { return chosen; },  // sent again when a new session's channel opens
    sending(image, connected) {
      if (image === chosen) say(connected ? `sending ${image.name}…` : `${image.name} is sent when the session starts`);
    },
    acknowledged(image, key) {  // the session runs image (null: none) from the next frame
      const before = running;
      running = image;
      forget(before);
      if (image === chosen) say(image ? `in use: ${image.name} (${key.slice(0, 12)}…)` : '');
    },
    refused(image) {  // image was refused: back to what the session runs
      if (image !== chosen) return;
      chosen = running;
      forget(image);
      showImage(running);
      say(running ? `in use: ${running.name}` : '');
    },
    stopped() {  // the session ended: nothing runs, the chosen image waits for the next one
      const before = running;
      running = null;
      forget(before);
      if (chosen) say(`${chosen.name} is sent when the session starts`);
    },
    settle(key, apply) {
      clearTimeout(timers[key]);
      timers[key] = setTimeout(apply, STYLE_SETTLE_MS);
    },
    message: styleMessage,
    shrink: shrinkImage,
  };
}
