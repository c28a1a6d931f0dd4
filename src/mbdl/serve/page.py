"""The search page served at ``/``: plain HTML and JavaScript, no external resources."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mbdl catalog search</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
#drop { border: 2px dashed #888; border-radius: 8px; padding: 1.2em; text-align: center; }
#drop.over { background: #eef5ff; border-color: #3a7bd5; }
#query img { max-width: 160px; max-height: 160px; margin-top: .5em; }
#results { display: flex; flex-wrap: wrap; gap: 12px; margin-top: 1em; }
.hit { width: 172px; border: 1px solid #ddd; border-radius: 6px; padding: 6px; }
.hit img { width: 160px; height: 160px; object-fit: contain; background: #f4f4f4; }
.hit .name { font-size: 12px; word-break: break-all; }
.hit .distance { font-family: monospace; }
.match { border-color: #2e9d4a; box-shadow: 0 0 0 2px #2e9d4a55; }
#status { margin-top: .5em; min-height: 1.2em; }
.error { color: #b00020; }
label { margin-right: 1em; }
</style>
</head>
<body>
<h1>Search the catalog</h1>
<p id="info">Loading the catalog's description...</p>
<div id="drop">
  Drop an image here, or <input type="file" id="file" accept="image/*">
  <div id="query"></div>
</div>
<p>
  <label>neighbours <input type="number" id="k" value="8" min="1" max="1000"></label>
  <label><input type="checkbox" id="use-threshold"> mark matches (model threshold)</label>
  <label id="token-label" hidden>token <input type="password" id="token"></label>
</p>
<div id="status"></div>
<div id="results"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let modelThreshold = null;
let lastFile = null;

function headers() {
  const token = $("token").value;
  return token ? { Authorization: "Bearer " + token } : {};
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadInfo() {
  const response = await fetch("info", { headers: headers() });
  if (response.status === 401) {
    $("token-label").hidden = false;
    $("info").textContent = "This service needs a token: enter it, then choose an image.";
    return;
  }
  const info = await response.json();
  modelThreshold = info.threshold;
  $("use-threshold").disabled = info.threshold === null;
  $("info").textContent = info.count + " items, " + info.distance + " distance, model " +
    info.model + (info.threshold === null ? "" : ", threshold " + info.threshold.toFixed(4));
}

async function thumbnail(id, img) {
  const response = await fetch("thumbnail/" + id, { headers: headers() });
  if (response.ok) {
    img.src = URL.createObjectURL(await response.blob());
  } else {
    img.alt = "(no thumbnail)";
  }
}

async function search(file) {
  lastFile = file;
  const preview = document.createElement("img");
  preview.src = URL.createObjectURL(file);
  $("query").replaceChildren(preview);
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value);
  if ($("use-threshold").checked && modelThreshold !== null) form.append("threshold", "model");
  setStatus("Searching...", false);
  $("results").replaceChildren();
  let response;
  try {
    response = await fetch("search", { method: "POST", body: form, headers: headers() });
  } catch (error) {
    setStatus("The service cannot be reached: " + error, true);
    return;
  }
  const body = await response.json();
  if (!response.ok) {
    setStatus(body.error || ("error " + response.status), true);
    if (response.status === 401) $("token-label").hidden = false;
    return;
  }
  const neighbours = body[0].neighbours;
  setStatus(neighbours.length + " nearest items", false);
  const loads = [];
  for (const n of neighbours) {
    const card = document.createElement("div");
    card.className = "hit" + (n.match ? " match" : "");
    card.dataset.id = n.id;
    card.dataset.path = n.path;
    const img = document.createElement("img");
    img.alt = n.path;
    loads.push(thumbnail(n.id, img));
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = "#" + n.rank + " " + n.path.split("/").pop() +
      (n.label === null ? "" : " (" + n.label + ")");
    name.title = n.path;
    const distance = document.createElement("div");
    distance.className = "distance";
    distance.textContent = "distance " + n.distance.toFixed(4) + (n.match ? "  match" : "");
    card.append(img, name, distance);
    $("results").append(card);
  }
  await Promise.all(loads);
  $("results").dataset.done = "1";
}

$("file").addEventListener("change", () => {
  if ($("file").files.length) search($("file").files[0]);
});
$("k").addEventListener("change", () => { if (lastFile) search(lastFile); });
$("use-threshold").addEventListener("change", () => { if (lastFile) search(lastFile); });
$("token").addEventListener("change", loadInfo);
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) search(event.dataTransfer.files[0]);
});
loadInfo();
</script>
</body>
</html>
"""
