// lbtwist live dashboard: polls /api/pools every second and updates the page
// in place (rows are kept, so a button is never swapped out under a click).
"use strict";
(function () {
  const REFRESH_MS = 1000;
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const pools = new Map();   // pool name -> {el, rows: Map(address -> row parts)}
  const listenerRows = new Map();
  let token = sessionStorage.getItem("lbtwist-token") || "";
  let inflight = false;

  const m = /[#&]token=([^&]+)/.exec(location.hash);
  if (m) { token = decodeURIComponent(m[1]); sessionStorage.setItem("lbtwist-token", token); history.replaceState(null, "", location.pathname + location.search); }

  function headers(extra) {
    const h = Object.assign({ "Accept": "application/json" }, extra || {});
    if (token) h["Authorization"] = "Bearer " + token;
    return h;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const fmt = {
    rate: (x) => x == null ? "–" : (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2)),
    pct: (x) => x == null ? "–" : (x * 100).toFixed(x >= 0.1 ? 0 : 1) + "%",
    ms: (x) => x == null ? "–" : (x >= 1000 ? (x / 1000).toFixed(2) + " s" : x >= 10 ? x.toFixed(0) + " ms" : x.toFixed(1) + " ms"),
    bytes: (n) => { const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0; while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; } return (i ? n.toFixed(1) : n) + " " + u[i]; },
  };

  // -- sparklines --------------------------------------------------------------
  function spark(w, h) {
    const s = document.createElementNS(SVG, "svg");
    s.setAttribute("class", "spark"); s.setAttribute("width", w); s.setAttribute("height", h);
    s.setAttribute("viewBox", `0 0 ${w} ${h}`);
    const base = document.createElementNS(SVG, "line");
    base.setAttribute("class", "base"); base.setAttribute("x1", 0); base.setAttribute("x2", w);
    base.setAttribute("y1", h - 0.5); base.setAttribute("y2", h - 0.5);
    const errs = document.createElementNS(SVG, "g"); errs.setAttribute("class", "err");
    const line = document.createElementNS(SVG, "path"); line.setAttribute("class", "line");
    const dots = document.createElementNS(SVG, "g"); dots.setAttribute("class", "dots");
    s.append(base, errs, line, dots);
    s._line = line; s._errs = errs; s._dots = dots; s._w = w; s._h = h;
    return s;
  }

  function drawSpark(s, values, errors, cls) {
    const w = s._w, h = s._h, n = values.length;
    if (cls) { s._line.setAttribute("class", "line " + cls); s._dots.setAttribute("class", "dots dots-" + cls); }
    const max = Math.max(1e-9, ...values.filter((v) => v != null));
    let d = "";
    s._dots.replaceChildren();
    values.forEach((v, i) => {
      if (v == null) return;
      const x = n > 1 ? (i * (w - 1)) / (n - 1) : 0;
      const y = h - 1 - (v / max) * (h - 3);
      const joined = i > 0 && values[i - 1] != null;
      d += (joined ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
      if (!joined && (i === n - 1 || values[i + 1] == null)) {  // a lone point: a line needs two
        const c = document.createElementNS(SVG, "circle");
        c.setAttribute("cx", x.toFixed(1)); c.setAttribute("cy", y.toFixed(1)); c.setAttribute("r", 1.6);
        c.setAttribute("class", "dot"); s._dots.append(c);
      }
    });
    s._line.setAttribute("d", d || "M0 " + (h - 1));
    s._errs.replaceChildren();
    if (errors) {
      const emax = Math.max(1, ...errors);
      errors.forEach((e, i) => {
        if (!e) return;
        const r = document.createElementNS(SVG, "rect");
        const bh = Math.max(2, (e / emax) * (h / 2));
        r.setAttribute("x", (i * (w - 1)) / Math.max(1, n - 1) - 1); r.setAttribute("y", h - bh);
        r.setAttribute("width", 2); r.setAttribute("height", bh);
        s._errs.append(r);
      });
    }
    s.setAttribute("data-points", values.filter((v) => v != null).length);
  }

  function badge(word, extra) {
    const b = el("span", "badge b-" + String(word).replace(/[^a-z_-]/gi, ""), word);
    if (extra) b.title = extra;
    return b;
  }

  // -- actions -----------------------------------------------------------------
  async function act(pool, address, action, body) {
    const url = `api/pools/${encodeURIComponent(pool)}/backends/${encodeURIComponent(address)}/${action}`;
    const opts = { method: action === "weight" ? "PUT" : "POST", headers: headers({ "Content-Type": "application/json" }),
                   body: JSON.stringify(body || {}) };
    try {
      const r = await fetch(url, opts);
      const j = await r.json().catch(() => ({}));
      if (!r.ok) { show(`${action} ${address}: ${j.error || r.status}`, false); return; }
      show(`${pool} / ${address}: ${action} done`, true);
      refresh();
    } catch (e) { show(`${action} ${address}: ${e}`, false); }
  }

  function show(text, ok) {
    const box = $("message");
    box.textContent = text; box.hidden = false; box.className = "message" + (ok ? " ok" : "");
    clearTimeout(show._t); show._t = setTimeout(() => { box.hidden = true; }, ok ? 3000 : 8000);
  }

  // -- pools -------------------------------------------------------------------
  const COLS = ["Backend", "State", "Weight", "Active", "Req/s", "", "Errors", "p50", "p99", "", "Ejections", "Slow start", "Breaker", ""];

  function poolCard(name) {
    const card = el("div", "pool"); card.dataset.pool = name;
    const head = el("div", "pool-head");
    const title = el("h2", null, name);
    const facts = el("span", "facts");
    const sp = spark(140, 28);
    head.append(title, facts, sp);
    const table = el("table", "grid");
    const tr = el("tr");
    COLS.forEach((c) => tr.append(el("th", null, c)));
    const thead = el("thead"); thead.append(tr);
    const tbody = el("tbody");
    table.append(thead, tbody);
    card.append(head, table);
    $("pools").append(card);
    return { el: card, facts, spark: sp, tbody, rows: new Map() };
  }

  function kv(label, value, cls) {
    const s = el("span", "kv"); s.append(label + " ");
    const b = el("b", cls, value); s.append(b); return s;
  }

  function backendRow(p, poolName, address) {
    const tr = el("tr"); tr.dataset.backend = address; tr.dataset.pool = poolName;
    const c = {};
    ["addr", "state", "weight", "active", "rps", "rpsSpark", "err", "p50", "p99", "p99Spark", "ej", "slow", "breaker", "actions"].forEach((k) => {
      c[k] = el("td", ["weight", "active", "rps", "err", "p50", "p99", "ej"].includes(k) ? "num" : null);
      tr.append(c[k]);
    });
    c.rpsS = spark(90, 22); c.rpsSpark.append(c.rpsS);
    c.p99S = spark(90, 22); c.p99Spark.append(c.p99S);
    const drain = el("button", null, "Drain"); drain.dataset.action = "drain";
    const enable = el("button", "danger", "Disable"); enable.dataset.action = "disable";
    const weight = el("button", null, "Weight…"); weight.dataset.action = "weight";
    drain.addEventListener("click", () => act(poolName, address, drain.dataset.action));
    enable.addEventListener("click", () => {
      const a = enable.dataset.action;
      if (a === "disable" && !confirm(`Disable ${address}? Work in flight is not interrupted; no new work is sent.`)) return;
      act(poolName, address, a);
    });
    weight.addEventListener("click", () => {
      const v = prompt(`New weight for ${address} (0 = no new work):`, tr.dataset.weight);
      if (v === null || v.trim() === "") return;
      const n = Number(v);
      if (!Number.isFinite(n)) { show(`weight must be a number, got "${v}"`, false); return; }
      act(poolName, address, "weight", { weight: n });
    });
    c.actions.append(drain, " ", enable, " ", weight);
    c.drain = drain; c.enable = enable;
    p.tbody.append(tr);
    return { tr, c };
  }

  function updateBackend(row, b) {
    const { tr, c } = row;
    tr.dataset.state = b.state; tr.dataset.weight = b.weight;
    tr.className = "state-" + b.state;
    c.addr.textContent = b.name !== b.address ? `${b.name} (${b.address})` : b.address;
    c.addr.title = b.last_change ? `last change: ${b.last_change}` : "";
    const stateExtra = [b.health, b.in_rotation ? "in rotation" : "out of rotation"];
    if (b.ejected_remaining_s != null) stateExtra.push(`ejected for ${b.ejected_remaining_s.toFixed(0)} s more`);
    c.state.replaceChildren(badge(b.state, stateExtra.join(", ")));
    c.weight.textContent = b.effective_weight !== b.weight ? `${b.effective_weight} / ${b.weight}` : String(b.weight);
    c.active.textContent = b.active;
    c.rps.textContent = fmt.rate(b.stats.rps);
    c.err.textContent = fmt.pct(b.stats.error_rate);
    c.err.className = "num" + (b.stats.error_rate >= 0.01 ? " err-hi" : "");
    c.p50.textContent = fmt.ms(b.stats.p50_ms);
    c.p99.textContent = fmt.ms(b.stats.p99_ms);
    c.ej.textContent = b.ejections;
    if (b.history) {
      drawSpark(c.rpsS, b.history.requests, b.history.errors);
      drawSpark(c.p99S, b.history.p99_ms, null, "p99");
    }
    if (b.slow_start.active) {
      const bar = el("span", "bar"); const fill = el("span"); fill.style.width = (b.slow_start.progress * 100).toFixed(0) + "%";
      bar.append(fill); bar.title = `${b.slow_start.remaining_s} s left`;
      c.slow.replaceChildren(bar, " " + (b.slow_start.progress * 100).toFixed(0) + "%");
    } else c.slow.textContent = "–";
    const br = b.breaker || b.circuit_breaker;
    c.breaker.replaceChildren(br && br.state ? badge(br.state) : document.createTextNode("–"));
    c.drain.textContent = b.draining ? "Undrain" : "Drain";
    c.drain.dataset.action = b.draining ? "undrain" : "drain";
    c.enable.textContent = b.enabled ? "Disable" : "Enable";
    c.enable.dataset.action = b.enabled ? "disable" : "enable";
    c.enable.className = b.enabled ? "danger" : "";
  }

  function updatePool(p, pool) {
    const s = pool.stats;
    const facts = [
      kv("algorithm", pool.algorithm || "?"),
      kv("healthy", `${pool.backends_healthy}/${pool.backends_total}`, pool.backends_healthy < pool.backends_total ? "err-hi" : null),
      kv("in rotation", String(pool.backends_in_rotation)),
      kv("req/s", fmt.rate(s.rps)),
      kv("errors", fmt.pct(s.error_rate), s.error_rate >= 0.01 ? "err-hi" : null),
      kv("p50", fmt.ms(s.p50_ms)), kv("p99", fmt.ms(s.p99_ms)),
      kv("spread", pool.load_spread == null ? "–" : pool.load_spread.toFixed(2)),
      kv("retries", String(pool.retries)),
    ];
    if (pool.panic) facts.unshift(badge("panic", "too few healthy backends: routing across all"));
    p.facts.replaceChildren(...facts);
    p.el.dataset.panic = pool.panic;
    if (pool.history) drawSpark(p.spark, pool.history.requests, pool.history.errors);
    const seen = new Set();
    for (const b of pool.backends) {
      seen.add(b.address);
      let row = p.rows.get(b.address);
      if (!row) { row = backendRow(p, pool.name, b.address); p.rows.set(b.address, row); }
      updateBackend(row, b);
    }
    for (const [addr, row] of p.rows) if (!seen.has(addr)) { row.tr.remove(); p.rows.delete(addr); }
  }

  function updateListeners(list) {
    const tbody = $("listeners").tBodies[0];
    const seen = new Set();
    for (const l of list) {
      seen.add(l.name);
      let tr = listenerRows.get(l.name);
      if (!tr) { tr = el("tr"); tr.dataset.listener = l.name; for (let i = 0; i < 11; i++) tr.append(el("td", i >= 4 ? "num" : null)); tbody.append(tr); listenerRows.set(l.name, tr); }
      const v = [l.name, l.mode || "?", l.bind || "", l.pool || "–", fmt.rate(l.stats.rps), fmt.pct(l.stats.error_rate),
                 fmt.ms(l.stats.p50_ms), fmt.ms(l.stats.p99_ms), fmt.bytes(l.bytes_in), fmt.bytes(l.bytes_out), String(l.rejected)];
      v.forEach((x, i) => { tr.cells[i].textContent = x; });
    }
    for (const [name, tr] of listenerRows) if (!seen.has(name)) { tr.remove(); listenerRows.delete(name); }
  }

  // -- workers (GET /api/workers; absent or empty with one process) -------------
  const workerRows = new Map();   // pid -> {tr, requests, at}
  let workersGone = false;        // 404: a single-process lbtwist, stop asking

  function uptime(started) {
    if (typeof started !== "number") return started == null ? "–" : String(started);
    const s = Math.max(0, Date.now() / 1000 - started);
    return s >= 3600 ? (s / 3600).toFixed(1) + " h" : s >= 60 ? (s / 60).toFixed(1) + " min" : s.toFixed(0) + " s";
  }

  function updateWorkers(list) {
    const section = $("workers-section");
    section.hidden = !list.length;
    const tbody = $("workers").tBodies[0];
    const now = Date.now() / 1000;
    const seen = new Set();
    let rateSum = 0, rssSum = 0, connSum = 0;
    const rates = new Map();
    for (const w of list) {
      const key = String(w.pid);
      let row = workerRows.get(key);
      let rate = null;
      if (row && row.at < now && w.requests >= row.requests) rate = (w.requests - row.requests) / (now - row.at);
      if (!row) { row = { tr: el("tr") }; row.tr.dataset.pid = key; for (let i = 0; i < 8; i++) row.tr.append(el("td", i >= 3 ? "num" : null)); tbody.append(row.tr); workerRows.set(key, row); }
      row.requests = w.requests; row.at = now;
      seen.add(key); rates.set(key, rate);
      if (rate != null) rateSum += rate;
      rssSum += w.rss_bytes || 0; connSum += w.connections || 0;
    }
    list.forEach((w, i) => {
      const key = String(w.pid), row = workerRows.get(key), rate = rates.get(key);
      const share = rate != null && rateSum > 0 ? rate / rateSum : null;
      const v = [String(i + 1), key, uptime(w.started), String(w.requests), fmt.rate(rate), fmt.pct(share),
                 String(w.connections), w.rss_bytes == null ? "–" : fmt.bytes(w.rss_bytes)];
      v.forEach((x, j) => { row.tr.cells[j].textContent = x; });
      tbody.append(row.tr);  // keep the API's order
    });
    for (const [key, row] of workerRows) if (!seen.has(key)) { row.tr.remove(); workerRows.delete(key); }
    $("workers-summary").textContent = list.length ? `${list.length} processes · ${fmt.rate(rateSum)} req/s · ${connSum} connections · ${fmt.bytes(rssSum)} RSS` : "";
  }

  async function refreshWorkers() {
    if (workersGone) return;
    try {
      const r = await fetch("api/workers", { headers: headers(), cache: "no-store" });
      if (r.status === 404) { workersGone = true; updateWorkers([]); return; }
      if (!r.ok) return;
      const data = await r.json();
      updateWorkers(Array.isArray(data.workers) ? data.workers : []);
    } catch (e) { /* the pools poll reports an unreachable API */ }
  }

  function setStatus(kind, text) {
    const s = $("status"); s.className = "status status-" + kind; s.textContent = text; s.dataset.status = kind;
  }

  async function refresh() {
    if (inflight) return;
    inflight = true;
    try {
      const r = await fetch("api/pools", { headers: headers(), cache: "no-store" });
      if (r.status === 401) { $("auth").hidden = false; setStatus("error", "token needed"); return; }
      const data = await r.json();
      if (!r.ok) { setStatus("error", data.error || ("HTTP " + r.status)); return; }
      $("auth").hidden = true;
      $("window").textContent = data.window_s;
      const seen = new Set();
      for (const pool of data.pools) {
        seen.add(pool.name);
        let p = pools.get(pool.name);
        if (!p) { p = poolCard(pool.name); pools.set(pool.name, p); }
        updatePool(p, pool);
      }
      for (const [name, p] of pools) if (!seen.has(name)) { p.el.remove(); pools.delete(name); }
      updateListeners(data.listeners);
      await refreshWorkers();
      setStatus("live", "live");
      $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " · up " + Math.round(data.uptime_s) + " s";
      document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
    } catch (e) {
      setStatus("error", "admin API unreachable");
    } finally { inflight = false; }
  }

  $("auth").addEventListener("submit", (ev) => {
    ev.preventDefault(); token = $("token").value.trim();
    sessionStorage.setItem("lbtwist-token", token); refresh();
  });
  setInterval(() => { if (!$("paused").checked) refresh(); }, REFRESH_MS);
  refresh();
})();
