// stepdiff studio page: the job's input picture, its painted mask, and the mode (text, image, inpaint, control).
"use strict";

const Inputs = (() => {
  const el = (id) => document.getElementById(id);
  const picture = el("picture");
  const mask = el("mask");
  let hasPicture = false;
  let painting = false;
  let last = null;

  function mode() { return document.querySelector('input[name="mode"]:checked').value; }

  function size() { return el("size").value.split("x").map(Number); }

  function resize() {
    // The canvases hold the job's pixels (its size); CSS shows them larger, smoothly.
    const [w, h] = size();
    if (!w || !h || (picture.width === w && picture.height === h)) return;  // no sizes yet: the page is loading
    const old = document.createElement("canvas");
    old.width = picture.width; old.height = picture.height;
    old.getContext("2d").drawImage(picture, 0, 0);
    picture.width = mask.width = w;
    picture.height = mask.height = h;
    if (hasPicture) picture.getContext("2d").drawImage(old, 0, 0, w, h);
    else blank();
  }

  function blank() {
    const ctx = picture.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, picture.width, picture.height);
  }

  function setMode(m) {
    const input = m !== "text";
    el("input-panel").hidden = !input;
    el("brush").hidden = !(m === "inpaint" || m === "control");
    el("mask").hidden = m !== "inpaint";
    el("strength-label").hidden = !(m === "image" || m === "inpaint");
    el("control-scale-label").hidden = el("control-end-label").hidden = m !== "control";
    el("input-hint").textContent = m === "control"
      ? "Drop or pick a control picture (white silhouette on black), or draw one with the brush."
      : m === "inpaint" ? "Drop or pick a picture, then paint where it is re-drawn."
      : "Drop or pick a picture, or send a gallery image here.";
    const radio = document.querySelector(`input[name="mode"][value="${m}"]`);
    if (radio && !radio.checked) radio.checked = true;
    resize();
  }

  function draw(image) {
    // Cover-fit the picture to the job's size (the model's sizes are multiples of 8).
    resize();
    const ctx = picture.getContext("2d");
    const s = Math.max(picture.width / image.width, picture.height / image.height);
    const w = image.width * s, h = image.height * s;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(image, (picture.width - w) / 2, (picture.height - h) / 2, w, h);
    hasPicture = true;
  }

  function load(url) {
    return new Promise((resolve, reject) => {
      const image = new Image();
      image.onload = () => { draw(image); resolve(); };
      image.onerror = () => reject(new Error("that picture cannot be read here"));
      image.src = url;
    });
  }

  function loadFile(file) {
    const url = URL.createObjectURL(file);
    return load(url).finally(() => URL.revokeObjectURL(url));
  }

  function point(e) {
    const r = picture.getBoundingClientRect();
    return [(e.clientX - r.left) * picture.width / r.width, (e.clientY - r.top) * picture.height / r.height];
  }

  function stroke(from, to) {
    // Inpaint: paint the mask (shown red over the picture); control: paint the silhouette itself, white on black.
    const target = mode() === "inpaint" ? mask : picture;
    const ctx = target.getContext("2d");
    const erase = el("erase").checked;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.lineWidth = Number(el("brush-size").value) * target.width / 256;
    if (target === mask) {
      ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
      ctx.strokeStyle = "rgba(255, 40, 40, 1)";
    } else {
      ctx.globalCompositeOperation = "source-over";
      ctx.strokeStyle = erase ? "#000" : "#fff";
      hasPicture = true;
    }
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0] + 0.01, to[1]);
    ctx.stroke();
    ctx.globalCompositeOperation = "source-over";
  }

  function onDown(e) {
    if (el("brush").hidden) return;
    painting = true;
    last = point(e);
    stroke(last, last);
    e.preventDefault();
  }
  function onMove(e) {
    if (!painting) return;
    const p = point(e);
    stroke(last, p);
    last = p;
  }
  function onUp() { painting = false; }

  function clear() {
    if (mode() === "inpaint") mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    else { blank(); hasPicture = mode() === "control" ? false : hasPicture; }
  }

  function maskPainted() {
    const data = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
    return false;
  }

  function blob(canvas) {
    return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  }

  function maskBlob() {
    // What the server reads: white where painted (re-drawn), black elsewhere.
    const out = document.createElement("canvas");
    out.width = mask.width; out.height = mask.height;
    const ctx = out.getContext("2d");
    const src = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height);
    const img = ctx.createImageData(mask.width, mask.height);
    for (let i = 0; i < src.data.length; i += 4) {
      const v = src.data[i + 3] > 0 ? 255 : 0;
      img.data[i] = img.data[i + 1] = img.data[i + 2] = v;
      img.data[i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return blob(out);
  }

  async function fields(upload) {
    // The job fields of the mode, its pictures uploaded first.
    const m = mode();
    if (m === "text") return {};
    if (!hasPicture) throw new Error(m === "control" ? "draw or give a control picture first" : "give a picture first");
    const id = (await upload(await blob(picture))).id;
    if (m === "image") {
      const out = { init_image: id };
      if (el("strength").value.trim() !== "") out.strength = Number(el("strength").value);
      return out;
    }
    if (m === "inpaint") {
      if (!maskPainted()) throw new Error("paint the part to re-draw first");
      const out = { init_image: id, mask: (await upload(await maskBlob())).id };
      if (el("strength").value.trim() !== "") out.strength = Number(el("strength").value);
      return out;
    }
    return { control: id, control_scale: Number(el("control-scale").value), control_end: Number(el("control-end").value) };
  }

  document.querySelectorAll('input[name="mode"]').forEach((r) => r.addEventListener("change", () => setMode(mode())));
  el("size").addEventListener("change", resize);
  el("file").addEventListener("change", () => { if (el("file").files[0]) loadFile(el("file").files[0]).catch((err) => showError(err.message)); });
  el("drop").addEventListener("dragover", (e) => { e.preventDefault(); el("drop").classList.add("over"); });
  el("drop").addEventListener("dragleave", () => el("drop").classList.remove("over"));
  el("drop").addEventListener("drop", (e) => {
    e.preventDefault();
    el("drop").classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) loadFile(file).catch((err) => showError(err.message));
  });
  el("drop").addEventListener("pointerdown", onDown);
  el("drop").addEventListener("pointermove", onMove);
  window.addEventListener("pointerup", onUp);
  el("clear-mask").addEventListener("click", clear);
  blank();
  setMode("text");
  return { mode, setMode, load, fields, resize };
})();
