// The engineer's dashboard: live values over one stream, the plan, history, bills and the tuning form.
"use strict";
(() => {
  const SILENT_MS = 10000; // no update for this long (wall time): the banner, whatever the last update said
  const $ = (id) => document.getElementById(id);
  const C = { grid: "#5a67d8", pv: "#d69e2e", battery: "#2f855a", load: "#4a5568", ev: "#0987a0", soc: "#2f855a",
    price: "#9b2c2c" };
  let csrf = "";
  let lastMessage = Date.now();
  let lastAsOf = null;
  let plansSeen = -1;
  let tuningVersion = null;
  let span = "day";

  const num = (v, d = 1) => (v === null || v === undefined ? "—" : Number(v).toFixed(d));
  const kw = (v) => (v === null || v === undefined ? "—" : `${v >= 0 ? "+" : ""}${Number(v).toFixed(1)} kW`);
  const cell = (tr, text, cls) => { const td = document.createElement("td"); td.textContent = text;
    if (cls) td.className = cls; tr.appendChild(td); return td; };
  const rows = (tbody, list) => { tbody.textContent = "";
    for (const r of list) { const tr = document.createElement("tr"); r.forEach((c, i) => cell(tr, c, i ? "n" : ""));
      tbody.appendChild(tr); } };

  async function api(path, options = {}) {
    const r = await fetch(path, { credentials: "same-origin", ...options });
    if (r.status === 401) { window.location.assign("/login"); throw new Error("logged out"); }
    const body = await r.json().catch(() => ({ errors: [`HTTP ${r.status}`] }));
    return { ok: r.ok, status: r.status, body };
  }

  function showStale(stale) {
    const when = lastAsOf ? lastAsOf.slice(11, 19) : "—";
    $("stale").textContent = `Data stopped updating · as of ${when}`;
    $("stale").hidden = !stale;
  }

  function renderLive(d) {
    lastMessage = Date.now();
    if (d.as_of) lastAsOf = d.as_of;
    const s = d.state, h = d.health;
    $("as-of").textContent = d.as_of ? d.as_of.replace("T", " ").slice(0, 19) : "—";
    $("mode").textContent = s.controller_state.replace("_", " ");
    $("mode").className = `badge ${s.controller_state}`;
    const pvLimit = s.setpoint_pv_limit_kw;
    const now = [
      ["grid (+ import)", kw(s.grid_power_kw), `import ≤ ${num(s.import_limit_kw, 0)} kW, export ≤ ${num(s.export_limit_kw, 0)} kW`],
      ["PV", kw(s.pv_power_kw), pvLimit === null || pvLimit === undefined ? "unrestricted" : `limit ${num(pvLimit)} kW`],
      ["site load", kw(s.load_power_kw), ""],
      ["battery (+ charge)", kw(s.battery_power_kw), s.setpoint_battery_kw === undefined ? "—" : kw(s.setpoint_battery_kw)],
      ["battery SoC", s.battery_soc_pct === null || s.battery_soc_pct === undefined ? "—" : `${num(s.battery_soc_pct)} %`, ""],
    ];
    for (const [name, v] of Object.entries(s.ev_power_by_charger_kw || {})) {
      const amps = (s.setpoint_ev_current_a || {})[name];
      now.push([`${name} (${(s.ev_connected || {})[name] ? "car" : "no car"})`, kw(v), amps === undefined ? "—" : `${num(amps)} A`]);
    }
    now.push(["month peak (15 min)", `${num(s.month_peak_import_kw)} kW`, ""]);
    rows($("now").tBodies[0], now);
    const actions = $("actions");
    actions.textContent = "";
    for (const a of (s.safety_actions && s.safety_actions.length ? s.safety_actions : ["plan followed"])) {
      const li = document.createElement("li"); li.textContent = a; actions.appendChild(li);
    }
    $("timing").textContent = `ticks ${d.ticks}; tick processing p99 ${num(d.tick_processing_p99_ms, 3)} ms,` +
      ` lateness p99 ${num(d.tick_lateness_p99_ms, 1)} ms`;
    const dev = $("devices").tBodies[0];
    dev.textContent = "";
    for (const [name, info] of Object.entries(h.devices)) {
      const tr = document.createElement("tr");
      cell(tr, name); cell(tr, info.bus); cell(tr, info.state, `state-${info.state}`);
      cell(tr, String(info.consecutive_failures), "n"); cell(tr, info.last_error || "");
      dev.appendChild(tr);
    }
    $("buses").textContent = Object.entries(h.buses).map(([name, b]) =>
      `${name}: ${b.transactions} transactions, ${b.timeouts} timeouts, ${b.bad_frames} bad frames, port ${b.port.is_open ? "open" : "closed"}`
    ).join(" · ");
    rows($("counters").tBodies[0], [
      ["PV", `${num(s.pv_kwh)} kWh`], ["grid import", `${num(s.grid_import_kwh)} kWh`],
      ["grid export", `${num(s.grid_export_kwh)} kWh`], ["cars", `${num(s.ev_kwh)} kWh (${num(s.ev_pv_kwh)} from PV)`],
      ["energy cost", `${num(s.energy_cost_cny, 2)} CNY`], ["CO₂ avoided", `${num(s.carbon_avoided_kg)} kg`],
    ]);
    showStale(Boolean(d.stale));
    if (d.plans !== plansSeen) { plansSeen = d.plans; loadPlan(); }
    if (tuningVersion !== null && d.tuning_version !== tuningVersion) loadTuning();
  }

  async function loadPlan() {
    const { body } = await api("/api/plan");
    const p = body.plan;
    if (!p) { $("plan-info").textContent = "no plan yet"; return; }
    const step = p.step_minutes * 60, start = Date.parse(p.start) / 1000;
    const xs = p.battery_kw.map((_, i) => start + i * step);
    const ev = p.battery_kw.map((_, i) => Object.values(p.ev_kw).reduce((a, kws) => a + kws[i], 0));
    const power = [
      { label: "PV forecast", values: p.pv_kw || [], color: C.pv },
      { label: "load forecast", values: p.load_kw || [], color: C.load },
      { label: "battery (+ charge)", values: p.battery_kw, color: C.battery, step: true },
      { label: "cars", values: ev, color: C.ev, step: true },
      { label: "grid import", values: p.grid_import_kw, color: C.grid, step: true },
    ];
    gsChart.draw($("plan-power"), xs, power, { unit: "kW" });
    const soc = p.soc.slice(0, xs.length).map((v) => v * 100);
    const price = p.price_import_cny_per_kwh || [];
    const maxPrice = Math.max(1, ...price);
    gsChart.draw($("plan-aux"), xs, [
      { label: "SoC %", values: soc, color: C.soc },
      { label: "price (scaled, CNY/kWh × 100 / max)", values: price.map((v) => (100 * v) / maxPrice), color: C.price, step: true },
    ], { min: 0, max: 100, unit: "%" });
    gsChart.legend($("plan-legend"), [...power, { label: "SoC", color: C.soc },
      { label: `import price (top = ${maxPrice.toFixed(2)} CNY/kWh)`, color: C.price }]);
    $("plan-info").textContent = `from ${p.start.replace("T", " ")}, ${num(p.cost_cny, 0)} CNY over the horizon,` +
      ` peak ${num(p.peak_import_kw, 0)} kW`;
  }

  async function loadHistory() {
    const { ok, body } = await api(`/api/history?span=${span}`);
    if (!ok) return;
    const s = body.series;
    const days = span !== "day";
    const power = [
      { label: "grid", values: s.grid_kw, color: C.grid }, { label: "PV", values: s.pv_kw, color: C.pv },
      { label: "load", values: s.load_kw, color: C.load }, { label: "battery (+ charge)", values: s.battery_kw, color: C.battery },
      { label: "cars", values: s.ev_kw, color: C.ev },
    ];
    gsChart.draw($("hist-power"), body.t_s, power, { unit: "kW", days });
    gsChart.draw($("hist-soc"), body.t_s, [{ label: "SoC", values: s.soc_pct, color: C.soc }],
      { min: 0, max: 100, unit: "%", days });
    gsChart.legend($("hist-legend"), [...power, { label: "SoC %", color: C.soc }]);
  }

  async function loadBills() {
    const { ok, body } = await api("/api/bills");
    if (!ok) return;
    const t = body.today, m = body.month;
    rows($("bills").tBodies[0], [
      ["today, energy", `${num(t.actual.energy_cny, 2)} CNY`, `${num(t.baseline.energy_cny, 2)} CNY`, `${num(t.saved_cny, 2)} CNY`],
      ["today, 15-min peak", `${num(t.actual.peak_kw)} kW`, `${num(t.baseline.peak_kw)} kW`, ""],
      ["month, energy", `${num(m.actual.energy_cny, 2)} CNY`, `${num(m.baseline.energy_cny, 2)} CNY`, ""],
      ["month, demand", `${num(m.actual.demand_cny, 2)} CNY`, `${num(m.baseline.demand_cny, 2)} CNY`, ""],
      ["month, total", `${num(m.actual.total_cny, 2)} CNY`, `${num(m.baseline.total_cny, 2)} CNY`, `${num(m.saved_cny, 2)} CNY`],
    ]);
    $("bill-note").textContent = `Baseline: ${body.baseline}. Month from ${body.from.month.replace("T", " ")};` +
      ` demand charge ${body.demand_charge_cny_per_kw_month} CNY/kW·month on the largest 15-minute import.`;
  }

  // The tuning form: each [tuning] field, its value in force; a changed field goes into the patch, an
  // emptied one is sent as null (back to the site file's value).
  const FIELDS = [["battery", "soc_min"], ["battery", "soc_max"], ["battery", "reserve_soc"], ["battery", "max_charge_kw"],
    ["battery", "max_discharge_kw"], ["battery", "wear_cost_cny_per_kwh"], ["grid", "import_limit_kw"],
    ["grid", "export_limit_kw"], [null, "replan_period_s"]];
  let loaded = {};
  async function loadTuning() {
    const { ok, body } = await api("/api/tuning");
    if (!ok) return;
    tuningVersion = body.version;
    $("tuning-version").textContent = String(body.version);
    const form = $("tuning");
    form.textContent = "";
    loaded = {};
    for (const [section, field] of FIELDS) {
      const value = section ? body.tuning[section][field] : body.tuning[field];
      const key = section ? `${section}.${field}` : field;
      loaded[key] = value;
      const label = document.createElement("label"); label.textContent = key; label.htmlFor = `t-${key}`;
      const input = document.createElement("input");
      input.id = `t-${key}`; input.name = key; input.type = "number"; input.step = "any";
      input.value = value === null || value === undefined ? "" : String(value);
      const hint = document.createElement("span"); hint.className = "bounds";
      hint.textContent = value === null ? "(rating)" : "";
      form.append(label, input, hint);
    }
    const submit = document.createElement("button"); submit.type = "submit"; submit.textContent = "Apply";
    submit.id = "tuning-apply";
    form.append(document.createElement("span"), submit);
  }

  $("tuning").addEventListener("submit", async (event) => {
    event.preventDefault();
    const patch = {};
    for (const [section, field] of FIELDS) {
      const key = section ? `${section}.${field}` : field;
      const text = $(`t-${key}`).value.trim();
      const value = text === "" ? null : Number(text);
      if (value === loaded[key] || (value === null && loaded[key] === undefined)) continue;
      if (text !== "" && !Number.isFinite(value)) { showResult(false, [`tuning.${key}: not a number`]); return; }
      if (section) { patch[section] = patch[section] || {}; patch[section][field] = value; } else patch[field] = value;
    }
    if (!Object.keys(patch).length) { showResult(false, ["nothing changed"]); return; }
    const { ok, body } = await api("/api/tuning", { method: "POST", headers: { "Content-Type": "application/json",
      "X-CSRF-Token": csrf }, body: JSON.stringify({ patch, base_version: tuningVersion }) });
    showResult(ok, ok ? Object.entries(body.changes).map(([k, [a, b]]) => `${k}: ${a} → ${b}`) : body.errors || []);
    if (ok || body.version !== tuningVersion) loadTuning();
  });

  function showResult(ok, lines) {
    const out = $("tuning-result");
    out.textContent = "";
    out.className = ok ? "accepted" : "error";
    const head = document.createElement("p"); head.textContent = ok ? "Applied:" : "Refused:"; out.appendChild(head);
    const list = document.createElement("ul");
    for (const l of lines) { const li = document.createElement("li"); li.textContent = l; list.appendChild(li); }
    out.appendChild(list);
  }

  for (const b of $("spans").querySelectorAll("button")) {
    b.addEventListener("click", () => {
      span = b.dataset.span;
      for (const o of $("spans").querySelectorAll("button")) o.classList.toggle("on", o === b);
      loadHistory();
    });
  }
  $("logout").addEventListener("click", async () => {
    await api("/api/logout", { method: "POST", headers: { "X-CSRF-Token": csrf } }).catch(() => {});
    window.location.assign("/login");
  });

  async function start() {
    const { body } = await api("/api/session");
    csrf = body.csrf; $("user").textContent = body.user; $("site").textContent = body.site;
    gsChart.site.offsetS = body.utc_offset_s;
    document.title = `${body.site} · greensite`;
    const source = new EventSource("/api/stream");
    source.addEventListener("state", (e) => renderLive(JSON.parse(e.data)));
    setInterval(() => { if (Date.now() - lastMessage > SILENT_MS) showStale(true); }, 1000);
    loadTuning(); loadHistory(); loadBills();
    setInterval(() => { loadHistory(); loadBills(); }, 30000);
  }
  start();
})();
