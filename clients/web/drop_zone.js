// wireDropZone(drop, picker, pick, keepChange): a click, Enter/Space or a dropped file on
// `drop` (or a file chosen in the hidden input `picker`) calls pick(file). keepChange: the
// picker's change event stops here (a file is no setting of the panel around it).
function wireDropZone(drop, picker, pick, keepChange = false) {
  drop.addEventListener('click', () => picker.click());
  drop.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' || event.key === ' ') { event.preventDefault(); picker.click(); }
  });
  drop.addEventListener('dragover', (event) => { event.preventDefault(); drop.classList.add('dragging'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('dragging'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    drop.classList.remove('dragging');
    pick(event.dataTransfer && event.dataTransfer.files[0]);
  });
  picker.addEventListener('change', (event) => {
    if (keepChange) event.stopPropagation();
    pick(picker.files[0]);
    picker.value = '';
  });
}
