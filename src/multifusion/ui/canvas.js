() => {
  // Drag on a region canvas (an image inside `.mf-canvas`, id `canvas-METHOD`): press on a box
  // and drag to move it, on a corner to resize it, on empty canvas (or with Shift) to draw one.
  // The page only shows a box following the pointer; on release it sends {from, to, draw} (in
  // the preview image's pixels) to the server, which finds the box, snaps and clamps it
  // (forms.drag_edit) and redraws. A press that barely moves stays a click (two clicks draw).
  const DRAG_PX = 4; // screen pixels a press travels before it is a drag
  let drag = null;
  let swallowClick = false;
  const ghost = document.createElement("div");
  ghost.style.cssText = "position:fixed;pointer-events:none;border:2px dashed #111;background:rgba(255,255,255,0.25);display:none;z-index:1000";
  document.body.appendChild(ghost);

  const canvasImage = (el) => (el && el.tagName === "IMG" && el.closest(".mf-canvas") ? el : null);
  const methodOf = (img) => img.closest(".mf-canvas").id.replace(/^canvas-/, "");
  function state(method) {
    const box = document.querySelector(`#canvas-state-${method} textarea`);
    try { return JSON.parse(box.value); } catch (err) { return null; }
  }
  function contentRect(img) { // where the picture sits inside the <img> (object-fit keeps its aspect)
    const r = img.getBoundingClientRect();
    let k = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
    if (getComputedStyle(img).objectFit === "scale-down") k = Math.min(k, 1);
    return { left: r.left + (r.width - img.naturalWidth * k) / 2, top: r.top + (r.height - img.naturalHeight * k) / 2, k };
  }
  function toImage(img, e) {
    const c = contentRect(img);
    return [(e.clientX - c.left) / c.k, (e.clientY - c.top) / c.k];
  }
  function hitTest(boxes, row, col, grip) { // the same rule as forms.hit_test
    for (let i = boxes.length - 1; i >= 0; i--) {
      const [r0, r1, c0, c1] = boxes[i];
      if (row < r0 || row > r1 || col < c0 || col > c1) continue;
      const g = Math.min(grip, Math.min(r1 - r0, c1 - c0) / 4);
      const top = Math.abs(row - r0) <= g, bottom = Math.abs(row - r1) <= g;
      const left = Math.abs(col - c0) <= g, right = Math.abs(col - c1) <= g;
      if ((top || bottom) && (left || right)) return [i, (top ? "top" : "bottom") + "-" + (left ? "left" : "right")];
      return [i, "move"];
    }
    return null;
  }
  function target(d, to) { // the box being dragged, in canvas pixels [r0, r1, c0, c1]
    const s = d.st.scale;
    const row = d.from[1] / s, col = d.from[0] / s, dr = (to[1] - d.from[1]) / s, dc = (to[0] - d.from[0]) / s;
    if (!d.hit) return [Math.min(row, row + dr), Math.max(row, row + dr), Math.min(col, col + dc), Math.max(col, col + dc)];
    let [r0, r1, c0, c1] = d.st.boxes[d.hit[0]];
    if (d.hit[1] === "move") return [r0 + dr, r1 + dr, c0 + dc, c1 + dc];
    if (d.hit[1].startsWith("top")) r0 += dr; else r1 += dr;
    if (d.hit[1].endsWith("left")) c0 += dc; else c1 += dc;
    return [Math.min(r0, r1), Math.max(r0, r1), Math.min(c0, c1), Math.max(c0, c1)];
  }

  document.addEventListener("pointerdown", (e) => {
    const img = canvasImage(e.target);
    if (!img || e.button !== 0) return;
    e.preventDefault(); // no native image drag
    const method = methodOf(img), st = state(method), from = toImage(img, e);
    const hit = st && !e.shiftKey ? hitTest(st.boxes, from[1] / st.scale, from[0] / st.scale, st.grip) : null;
    drag = { img, method, st, from, hit, x: e.clientX, y: e.clientY, draw: e.shiftKey, moved: false };
  }, true);

  document.addEventListener("pointermove", (e) => {
    if (!drag) {
      const img = canvasImage(e.target), st = img && state(methodOf(img));
      if (st) {
        const p = toImage(img, e), hit = hitTest(st.boxes, p[1] / st.scale, p[0] / st.scale, st.grip);
        img.style.cursor = !hit ? "crosshair" : hit[1] === "move" ? "move" : /top-left|bottom-right/.test(hit[1]) ? "nwse-resize" : "nesw-resize";
      }
      return;
    }
    if (!drag.moved && Math.hypot(e.clientX - drag.x, e.clientY - drag.y) < DRAG_PX) return;
    drag.moved = true;
    if (!drag.st) return;
    const c = contentRect(drag.img), s = drag.st.scale * c.k, b = target(drag, toImage(drag.img, e));
    Object.assign(ghost.style, { display: "block", left: `${c.left + b[2] * s}px`, top: `${c.top + b[0] * s}px`,
                                 width: `${(b[3] - b[2]) * s}px`, height: `${(b[1] - b[0]) * s}px` });
  }, true);

  document.addEventListener("pointerup", (e) => {
    if (!drag) return;
    const d = drag;
    drag = null;
    ghost.style.display = "none";
    if (!d.moved) return; // a click: the canvas' select event takes it
    swallowClick = true;
    setTimeout(() => { swallowClick = false; }, 300);
    window.multifusionDrag = JSON.stringify({ from: d.from, to: toImage(d.img, e), draw: d.draw });
    document.querySelector(`#canvas-dragged-${d.method}`).click();
  }, true);

  document.addEventListener("click", (e) => { // the click ending a drag is not a corner
    if (swallowClick && canvasImage(e.target)) {
      e.stopPropagation();
      e.preventDefault();
      swallowClick = false;
    }
  }, true);
}
