// The visitors' display: one live stream, numbers into the page, a banner when the data stops.
"use strict";
(() => {
  // No message for this long (wall time) means the stream or the controller stopped, whatever it last said.
  const SILENT_MS = 10000;
  const body = document.body;
  const $ = (id) => document.getElementById(id);
  let lastMessage = Date.now();
  let lastAsOf = null;

  const fmt = (v, digits) => (v === null || v === undefined ? "—" : Number(v).toLocaleString(undefined,
    { minimumFractionDigits: digits, maximumFractionDigits: digits }));
  const kw = (v) => (v === null || v === undefined ? "—" : `${fmt(Math.abs(v), 1)} kW`);
  // Large figures change unit (kWh -> MWh, kg -> t) so that they stay a few digits wide.
  const scaled = (v, small, large) => (v >= 10000 ? [fmt(v / 1000, 1), large] : [fmt(v, v >= 100 ? 0 : 1), small]);

  function line(id, kwValue, forward) {
    const g = $(id);
    const idle = kwValue === null || kwValue === undefined || Math.abs(kwValue) < 0.05;
    g.classList.toggle("idle", idle);
    g.classList.toggle("rev", !idle && !forward);
  }

  function showStale(stale) {
    const banner = $("stale");
    const asOf = lastAsOf ? new Date(lastAsOf).toLocaleTimeString(undefined, { hour12: false }) : "—";
    banner.textContent = `${body.dataset.staleText} · ${body.dataset.asOfText} ${asOf}`;
    banner.hidden = !stale;
    body.classList.toggle("stale", stale);
  }

  function render(d) {
    lastMessage = Date.now();
    if (d.as_of) lastAsOf = d.as_of;
    $("as-of").textContent = d.as_of ? d.as_of.slice(11, 19) : "—";
    $("v-pv").textContent = kw(d.pv_kw);
    $("v-load").textContent = kw(d.load_kw);
    $("v-grid").textContent = kw(d.grid_kw);
    $("v-battery").textContent = d.has_battery ? `${kw(d.battery_kw)} · ${fmt(d.battery_soc_pct, 0)}%` : "—";
    $("v-ev").textContent = d.chargers ? kw(d.ev_kw) : "—";
    $("n-battery").classList.toggle("off", !d.has_battery);
    $("n-cars").classList.toggle("off", !d.chargers);
    $("soc-bar").setAttribute("width", String(84 * Math.max(0, Math.min(100, d.battery_soc_pct || 0)) / 100));
    line("l-pv", d.pv_kw, true);
    line("l-grid", d.grid_kw, (d.grid_kw || 0) >= 0); // import flows grid -> building
    line("l-battery", d.battery_kw, (d.battery_kw || 0) >= 0); // charging flows building -> battery
    line("l-ev", d.ev_kw, true);
    $("f-today").textContent = fmt(d.today_pv_kwh, 1);
    const [life, lifeUnit] = scaled(d.lifetime_pv_kwh, "kWh", "MWh");
    $("f-lifetime").textContent = life; $("u-lifetime").textContent = lifeUnit;
    const [co2, co2Unit] = scaled(d.co2_avoided_kg, "kg", "t");
    $("f-co2").textContent = co2; $("u-co2").textContent = co2Unit;
    const [coal, coalUnit] = scaled(d.coal_saved_kg, "kg", "t");
    $("f-coal").textContent = coal; $("u-coal").textContent = coalUnit;
    $("f-trees").textContent = fmt(d.trees, 0);
    $("f-evpv").textContent = fmt(d.ev_pv_kwh, 1);
    showStale(Boolean(d.stale));
  }

  function connect() {
    const source = new EventSource("/api/display/stream");
    source.addEventListener("state", (e) => render(JSON.parse(e.data)));
    source.onerror = () => {}; // EventSource reconnects by itself; the silence timer shows the banner
  }
  setInterval(() => { if (Date.now() - lastMessage > SILENT_MS) showStale(true); }, 1000);
  fetch("/api/display").then((r) => r.json()).then(render).catch(() => showStale(true));
  connect();
})();
