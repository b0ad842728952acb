// The triageseg page: uploads each dropped file to /api/segment, one after another, and
// shows what comes back. Plain browser JavaScript, no libraries, nothing loaded from outside.
"use strict";

const TABLE_ROWS_SHOWN = 2000; // a longer table is in the CSV download
let info = null;

function $(selector, root = document) {
  return root.querySelector(selector);
}

function fmt(value, digits) {
  return value === null || value === undefined ? "\u2013" : Number(value).toFixed(digits);
}

async function loadInfo() {
  try {
    const response = await fetch("/api/info");
    info = await response.json();
  } catch (err) {
    $("#bundle-info").textContent = "cannot reach the server: " + err;
    return;
  }
  $("#bundle-info").textContent =
    `bundle ${info.bundle} \u00b7 models: ${info.models.join(", ")} \u00b7 device ${info.device}` +
    (info.has_router ? "" : " \u00b7 no router: choose a modality");
  $("#limits").textContent =
    `PNG, JPEG, TIFF (8/16-bit), gray or RGB, up to ${info.max_upload_mb} MB and ` +
    `${info.max_pixels / 1e6} megapixels each`;
  const select = $("#modality");
  for (const name of info.models) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name === "_generalist" ? "generalist (all modalities)" : name;
    select.appendChild(option);
  }
}

function overlayStyle() {
  return $('input[name="style"]:checked').value;
}

function applyDisplay() {
  const style = overlayStyle();
  const opacity = $("#opacity").value / 100;
  for (const img of document.querySelectorAll("img.overlay")) {
    if (img.dataset[style]) img.src = img.dataset[style];
    img.style.opacity = opacity;
  }
}

function newCard(name) {
  const card = $("#result-template").content.firstElementChild.cloneNode(true);
  $(".filename", card).textContent = name;
  card.dataset.file = name;
  $("#results").append(card);
  return card;
}

function setStatus(card, text, isError) {
  const status = $(".status", card);
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

function fillRouting(card, routing) {
  $(".modality", card).textContent = routing.modality + (routing.forced ? " (forced)" : "");
  $(".confidence", card).textContent = fmt(routing.confidence, 3);
  const unknown = routing.decision.startsWith("unknown modality");
  $(".ood-score", card).textContent = fmt(routing.ood_score, 3) + (unknown ? " (unknown modality)" : "");
  $(".used-model", card).textContent = routing.used_model;
  $(".decision", card).textContent = routing.decision;
  $(".diameter", card).textContent = routing.diameter == null
    ? (routing.size_source || "") + (routing.scale != null ? ` (scale ${routing.scale})` : "")
    : `${fmt(routing.diameter, 1)} px, ${routing.size_source} (scale ${routing.scale})`;
  const body = $(".probabilities tbody", card);
  const classes = Object.entries(routing.probabilities).sort((a, b) => b[1] - a[1]);
  if (!classes.length) {
    body.innerHTML = '<tr><td colspan="2">no router in this bundle</td></tr>';
  }
  for (const [name, p] of classes) {
    const row = body.insertRow();
    row.insertCell().textContent = name;
    const cell = row.insertCell();
    cell.className = "bar-cell";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = (100 * p).toFixed(1) + "%";
    const text = document.createElement("span");
    text.className = "bar-text";
    text.textContent = p.toFixed(3);
    cell.append(bar, text);
  }
}

function fillNuclei(card, result) {
  $(".count-value", card).textContent = result.count;
  $(".count-unit", card).textContent = result.count === 1 ? "nucleus" : "nuclei";
  const body = $(".nuclei tbody", card);
  for (const n of result.nuclei.slice(0, TABLE_ROWS_SHOWN)) {
    const row = body.insertRow();
    row.insertCell().textContent = n.id;
    row.insertCell().textContent = n.area_px;
    row.insertCell().textContent = fmt(n.area_um2, 2);
    row.insertCell().textContent = fmt(n.mean_intensity, 2);
    row.insertCell().textContent = `${fmt(n.centroid_y, 1)}, ${fmt(n.centroid_x, 1)}`;
  }
  const note = $(".table-note", card);
  if (result.count > TABLE_ROWS_SHOWN) {
    note.textContent = `first ${TABLE_ROWS_SHOWN} of ${result.count} nuclei shown; the CSV has all`;
  } else if (result.pixel_size_um === null) {
    note.textContent = "pixel size unknown (no resolution in the file): areas in pixels only";
  } else {
    const [y, x] = result.pixel_size_um;
    note.textContent = `pixel size ${y.toPrecision(4)} \u00d7 ${x.toPrecision(4)} \u00b5m`;
  }
}

function showResult(card, result) {
  const files = result.files;
  $("img.base", card).src = files["image.png"];
  const overlay = $("img.overlay", card);
  overlay.dataset.outlines = files["outlines.png"];
  overlay.dataset.filled = files["filled.png"];
  overlay.src = files[overlayStyle() + ".png"];
  overlay.style.opacity = $("#opacity").value / 100;
  $(".dl-labels", card).href = files["labels.tif"];
  $(".dl-rois", card).href = files["rois.zip"];
  $(".dl-table", card).href = files["nuclei.csv"];
  $(".dl-overlay", card).href = files["overlay.png"];
  fillRouting(card, result.routing);
  fillNuclei(card, result);
  setStatus(card, `${result.width} \u00d7 ${result.height} px, ${result.seconds.toFixed(2)} s`);
  card.dataset.state = "done";
  $(".body", card).hidden = false;
}

async function analyse(file, card) {
  if (info && file.size > info.max_upload_bytes) {
    const mb = (file.size / 1048576).toFixed(1);
    throw new Error(`${file.name}: the file is larger than the upload limit of ${info.max_upload_mb} MB ` +
      `(${mb} MB); start the server with a larger --max-upload-mb`);
  }
  setStatus(card, "uploading and analysing\u2026");
  const params = new URLSearchParams({ filename: file.name });
  const modality = $("#modality").value;
  if (modality) params.set("modality", modality);
  const diameter = $("#diameter").value.trim();
  if (diameter) params.set("diameter", diameter);
  const response = await fetch("/api/segment?" + params, {
    method: "POST",
    body: file,
    headers: { "Content-Type": "application/octet-stream" },
  });
  let payload;
  try {
    payload = await response.json();
  } catch (err) {
    throw new Error(`${file.name}: the server answered ${response.status} without a result`);
  }
  if (!response.ok) throw new Error(payload.error || `${file.name}: error ${response.status}`);
  return payload;
}

let chain = Promise.resolve(); // files are analysed one after another, in the order dropped

function addFiles(fileList) {
  for (const file of Array.from(fileList)) {
    const card = newCard(file.name);
    card.dataset.state = "queued";
    setStatus(card, "queued");
    chain = chain.then(async () => {
      try {
        showResult(card, await analyse(file, card));
      } catch (err) {
        card.dataset.state = "error";
        setStatus(card, err.message, true);
      }
    });
  }
}

function setUp() {
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  $("#files").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  });
  for (const input of document.querySelectorAll('input[name="style"]')) {
    input.addEventListener("change", applyDisplay);
  }
  $("#opacity").addEventListener("input", applyDisplay);
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
