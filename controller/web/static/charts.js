// Small SVG line charts, hand-written: a few series over one time axis, y scaled to the data.
"use strict";
window.gsChart = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const el = (name, attrs, parent) => {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  };
  const PAD = { l: 64, r: 10, t: 8, b: 20 };
  // Times are shown in the site's time zone, not the browser's: the page sets this from /api/session.
  const site = { offsetS: 0 };
  const clock = (t) => new Date((t + site.offsetS) * 1000).toISOString().slice(11, 16);
  const day = (t) => new Date((t + site.offsetS) * 1000).toISOString().slice(5, 10);

  // xs: epoch seconds; series: [{label, values, color, step}]; opts: {unit, min, max, days}
  function draw(svg, xs, series, opts = {}) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const [, , w, h] = svg.getAttribute("viewBox").split(" ").map(Number);
    const values = series.flatMap((s) => s.values.filter((v) => v !== null && Number.isFinite(v)));
    let lo = opts.min !== undefined ? opts.min : Math.min(0, ...values);
    let hi = opts.max !== undefined ? opts.max : Math.max(1, ...values);
    if (hi - lo < 1e-9) hi = lo + 1;
    const x0 = xs.length ? xs[0] : 0, x1 = xs.length > 1 ? xs[xs.length - 1] : x0 + 1;
    const X = (x) => PAD.l + ((x - x0) / (x1 - x0)) * (w - PAD.l - PAD.r);
    const Y = (y) => PAD.t + (1 - (y - lo) / (hi - lo)) * (h - PAD.t - PAD.b);
    for (const v of [lo, (lo + hi) / 2, hi]) {
      el("line", { x1: PAD.l, x2: w - PAD.r, y1: Y(v), y2: Y(v), class: "axis" }, svg);
      el("text", { x: PAD.l - 4, y: Y(v) + 4, "text-anchor": "end" }, svg).textContent =
        `${Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(1)}${opts.unit ? " " + opts.unit : ""}`;
    }
    if (lo < 0 && hi > 0) el("line", { x1: PAD.l, x2: w - PAD.r, y1: Y(0), y2: Y(0), class: "zero" }, svg);
    const ticks = 6;
    for (let i = 0; i <= ticks && xs.length > 1; i++) {
      const x = x0 + ((x1 - x0) * i) / ticks;
      const label = (opts.days ? day : clock)(x);
      el("text", { x: X(x), y: h - 4, "text-anchor": i === 0 ? "start" : i === ticks ? "end" : "middle" }, svg)
        .textContent = label;
    }
    for (const s of series) {
      let points = [];
      const flush = () => {
        if (points.length) el("polyline", { points: points.join(" "), stroke: s.color }, svg);
        points = [];
      };
      s.values.forEach((v, i) => {
        if (v === null || !Number.isFinite(v) || i >= xs.length) { flush(); return; }
        if (s.step && points.length) points.push(`${X(xs[i]).toFixed(1)},${points[points.length - 1].split(",")[1]}`);
        points.push(`${X(xs[i]).toFixed(1)},${Y(v).toFixed(1)}`);
      });
      flush();
    }
  }

  function legend(div, series) {
    div.textContent = "";
    for (const s of series) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = s.color;
      item.append(swatch, s.label);
      div.appendChild(item);
    }
  }
  return { draw, legend, site };
})();
