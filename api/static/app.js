// The inpaint page: paint a mask over an image, submit, follow the job over SSE, compare the result.
// Plain browser JavaScript, no build step. Talks only to this API, with the key kept in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, imageB64: null, imageUrl: null, undo: [], drawing: false, last: null, models: [], lora: null };
const KEY = "inpaint.apiKey";

function headers(json = true) {
  const h = json ? { "content-type": "application/json" } : {};
  const key = localStorage.getItem(KEY);
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body) {
  return request(path, { method, headers: headers(body !== undefined), body: body && JSON.stringify(body) });
}
async function request(path, init) {
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = data.error || { code: `http_${resp.status}`, message: resp.statusText };
    throw new Error(`${err.code}: ${err.message}`);
  }
  return data;
}

function say(text) { $("status").textContent = text; }

// --- the API key ---
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  showKeyState();
  loadJobs();
  loadModels();
});
function showKeyState() { $("key-state").textContent = localStorage.getItem(KEY) ? "key saved" : "no key"; }

// --- the image ---
const imageCanvas = $("image-canvas");
const maskCanvas = $("mask-canvas");
const mctx = maskCanvas.getContext("2d");

function loadFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const dataUrl = reader.result;
    state.file = file;
    state.imageB64 = dataUrl.slice(dataUrl.indexOf(",") + 1);
    state.imageUrl = dataUrl;
    const img = new Image();
    img.onload = () => {
      for (const c of [imageCanvas, maskCanvas]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
      imageCanvas.getContext("2d").drawImage(img, 0, 0);
      mctx.clearRect(0, 0, maskCanvas.width, maskCanvas.height);
      state.undo = [];
      $("stage").hidden = false;
      for (const id of ["invert", "clear", "submit"]) $(id).disabled = false;
      $("undo").disabled = true;
      say(`Image ${img.naturalWidth}×${img.naturalHeight}: paint the area to change.`);
    };
    img.src = dataUrl;
  };
  reader.readAsDataURL(file);
}
$("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); loadFile(e.dataTransfer.files[0]); });
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });

// --- painting the mask ---
$("brush").addEventListener("input", () => { $("brush-out").textContent = $("brush").value; });
function tool() { return document.querySelector("input[name=tool]:checked").value; }
function toCanvas(e) {
  const r = maskCanvas.getBoundingClientRect();
  return { x: (e.clientX - r.left) * (maskCanvas.width / r.width), y: (e.clientY - r.top) * (maskCanvas.height / r.height) };
}
function snapshot() {
  state.undo.push(mctx.getImageData(0, 0, maskCanvas.width, maskCanvas.height));
  if (state.undo.length > 30) state.undo.shift();
  $("undo").disabled = false;
}
function stroke(from, to) {
  const scale = maskCanvas.width / maskCanvas.getBoundingClientRect().width;
  mctx.globalCompositeOperation = tool() === "erase" ? "destination-out" : "source-over";
  mctx.strokeStyle = mctx.fillStyle = "#ff2d2d";
  mctx.lineWidth = Number($("brush").value) * scale;
  mctx.lineCap = mctx.lineJoin = "round";
  mctx.beginPath();
  mctx.moveTo(from.x, from.y);
  mctx.lineTo(to.x, to.y);
  mctx.stroke();
}
maskCanvas.addEventListener("pointerdown", (e) => {
  snapshot();
  state.drawing = true;
  state.last = toCanvas(e);
  stroke(state.last, state.last);
  maskCanvas.setPointerCapture(e.pointerId);
});
maskCanvas.addEventListener("pointermove", (e) => {
  if (!state.drawing) return;
  const p = toCanvas(e);
  stroke(state.last, p);
  state.last = p;
});
for (const ev of ["pointerup", "pointercancel"]) maskCanvas.addEventListener(ev, () => { state.drawing = false; });
$("undo").addEventListener("click", () => {
  const prev = state.undo.pop();
  if (prev) mctx.putImageData(prev, 0, 0);
  $("undo").disabled = state.undo.length === 0;
});
$("clear").addEventListener("click", () => { snapshot(); mctx.clearRect(0, 0, maskCanvas.width, maskCanvas.height); });
$("invert").addEventListener("click", () => {
  snapshot();
  const d = mctx.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
  for (let i = 0; i < d.data.length; i += 4) {
    const on = d.data[i + 3] > 0;
    d.data[i] = 255; d.data[i + 1] = 45; d.data[i + 2] = 45; d.data[i + 3] = on ? 0 : 255;
  }
  mctx.putImageData(d, 0, 0);
});

// --- the model (GET /v1/models: the default first) and an optional LoRA adapter ---
async function loadModels() {
  try {
    state.models = (await api("GET", "/v1/models")).results || [];
  } catch (err) {
    $("model-state").textContent = err.message;
    return;
  }
  const pick = $("model-pick");
  const was = pick.value;
  pick.replaceChildren(...state.models.map((m, i) => Object.assign(document.createElement("option"), {
    value: m.id, textContent: i === 0 ? `${m.short_name} (default)` : m.short_name,
  })));
  if (state.models.some((m) => m.id === was)) pick.value = was;
  showModel();
}
function pickedModel() { return state.models.find((m) => m.id === $("model-pick").value); }
function showModel() {
  const m = pickedModel();
  if (!m) return;
  const ready = m.ready_workers ?? 0;
  $("model-state").textContent = ready > 0
    ? `${ready} worker${ready === 1 ? "" : "s"} ready, ${m.queue_depth ?? 0} waiting`
    : "no worker ready: queued until one starts";
  const limits = m.input_limits || {};
  if (limits.max_steps) $("steps").max = limits.max_steps;
  $("negative").disabled = (limits.ignored_fields || []).includes("negative_prompt");  // FLUX takes none
}
$("model-pick").addEventListener("change", () => {
  showModel();
  const limits = pickedModel()?.input_limits || {};  // the model's own defaults (FLUX: guidance 30)
  if (limits.default_steps) $("steps").value = limits.default_steps;
  if (limits.default_guidance != null) $("guidance").value = limits.default_guidance;
});

$("lora-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  state.lora = null;
  $("lora-state").textContent = `Uploading ${file.name}…`;
  try {
    const lora = await request(`/v1/loras?name=${encodeURIComponent(file.name)}`, {
      method: "POST", headers: { ...headers(false), "content-type": "application/octet-stream" }, body: file,
    });
    state.lora = lora.id;
    $("lora-state").textContent = `${lora.name || file.name} (${lora.id}) is applied to the next jobs.`;
    $("lora-clear").hidden = false;
  } catch (err) {
    e.target.value = "";
    $("lora-state").textContent = `Not uploaded: ${err.message}`;
  }
});
$("lora-clear").addEventListener("click", () => {
  state.lora = null;
  $("lora-file").value = "";
  $("lora-state").textContent = "";
  $("lora-clear").hidden = true;
});

// The mask the API wants: white where painted, black elsewhere, at the image's own size.
function maskPngB64() {
  const out = document.createElement("canvas");
  out.width = maskCanvas.width; out.height = maskCanvas.height;
  const octx = out.getContext("2d");
  const src = mctx.getImageData(0, 0, maskCanvas.width, maskCanvas.height);
  const dst = octx.createImageData(out.width, out.height);
  let painted = 0;
  for (let i = 0; i < src.data.length; i += 4) {
    const v = src.data[i + 3] > 0 ? 255 : 0;
    painted += v ? 1 : 0;
    dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = v; dst.data[i + 3] = 255;
  }
  octx.putImageData(dst, 0, 0);
  const url = out.toDataURL("image/png");
  return { b64: url.slice(url.indexOf(",") + 1), painted };
}

// --- submit and follow ---
$("job-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const mask = maskPngB64();
  if (!mask.painted) { say("Paint the area to change first."); return; }
  const body = {
    prompt: $("prompt").value, image: state.imageB64, mask: mask.b64,
    num_inference_steps: Number($("steps").value), guidance_scale: Number($("guidance").value),
  };
  if ($("negative").value.trim() && !$("negative").disabled) body.negative_prompt = $("negative").value.trim();
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  if ($("model-pick").value) body.model = $("model-pick").value;
  if (state.lora) body.loras = [{ id: state.lora, scale: Number($("lora-scale").value) }];
  $("submit").disabled = true;
  $("result").hidden = true;
  try {
    const job = await api("POST", "/v1/jobs", body);
    show(job);
    await follow(job.id);
  } catch (err) {
    say(`Error: ${err.message}`);
  } finally {
    $("submit").disabled = false;
    loadJobs();
    loadModels();
  }
});

function show(job) {
  const bar = $("progress");
  if (job.status === "queued") {
    bar.hidden = false; bar.removeAttribute("value");
    say(`Queued: position ${job.queue_position ?? "?"}${job.eta_s != null ? `, about ${Math.ceil(job.eta_s)} s` : ""}.`);
  } else if (job.status === "running") {
    bar.hidden = false;
    const p = job.progress || {};
    progress(p.step || 0, p.total || 1);
  } else if (job.status === "succeeded") {
    bar.max = 1; bar.value = 1;
    say(`Done in ${job.metrics?.total_s?.toFixed?.(1) ?? "?"} s.`);
    const url = job.outputs[0].url;
    $("before").src = state.imageUrl;
    $("after").src = url;
    $("download").href = job.outputs[0].download_url || url;  // saved, not opened: the page stays
    $("result").hidden = false;
  } else {
    bar.hidden = true;
    say(`Job ${job.status}${job.error ? `: ${job.error.code}: ${job.error.message}` : ""}.`);
  }
}
function progress(step, total) {
  const bar = $("progress");
  bar.max = total; bar.value = step;
  say(`Running: step ${step} of ${total}.`);
}

// SSE over fetch (EventSource cannot send the Authorization header).
async function follow(jobId) {
  const resp = await fetch(`/v1/jobs/${jobId}/events`, { headers: headers(false) });
  if (!resp.ok || !resp.body) return poll(jobId);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      const payload = JSON.parse(data);
      if (event === "progress") progress(payload.step, payload.total);
      else if (event === "status") show(payload);
      else if (["succeeded", "failed", "canceled"].includes(event)) { show(payload); reader.cancel(); return; }
    }
  }
  return poll(jobId);
}
async function poll(jobId) {
  for (;;) {
    const job = await api("GET", `/v1/jobs/${jobId}`);
    show(job);
    if (["succeeded", "failed", "canceled"].includes(job.status)) return;
    await new Promise((r) => setTimeout(r, 1000));
  }
}

$("split").addEventListener("input", () => {
  $("after-wrap").style.clipPath = `inset(0 0 0 ${$("split").value}%)`;
});

// --- recent jobs ---
async function loadJobs() {
  const list = $("jobs");
  try {
    const page = await api("GET", "/v1/jobs?limit=10");
    list.replaceChildren(...page.data.map((j) => {
      const li = document.createElement("li");
      li.textContent = `${j.created_at.slice(0, 19).replace("T", " ")}  ${j.status.padEnd(9)}  ${j.input.prompt.slice(0, 60)}`;
      if (j.outputs && j.outputs[0]) {
        const a = document.createElement("a");
        a.href = j.outputs[0].url; a.textContent = " result"; a.target = "_blank"; a.rel = "noopener";
        li.append(a);
      }
      return li;
    }));
  } catch (err) {
    list.replaceChildren(Object.assign(document.createElement("li"), { textContent: err.message }));
  }
}
$("refresh").addEventListener("click", () => { loadJobs(); loadModels(); });

// Say so when the API runs open (INPAINT_AUTH=none), and which model serves (loudly if the classical
// fallback, which ignores prompts).
fetch("/readyz").then((r) => r.json()).then((r) => {
  $("open-mode").hidden = r.auth !== "none";
  $("model").textContent = r.models && r.models.length ? `Model: ${r.models.join(", ")}`
    : r.status === "ready" ? "" : "No worker is ready yet.";
  $("fallback").hidden = !r.fallback;
}).catch(() => {});

showKeyState();
loadJobs();
loadModels();
