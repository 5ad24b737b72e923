// Alliance Stream caseload, trajectory and network pages. No external resources: the charts are SVG drawn here.
// The read key lives in sessionStorage (this tab only) and goes out only as a Bearer header to
// this server's JSON API. Every value from the API is inserted as text, never as HTML.
"use strict";

(function () {
  const KEY = "alliance.reporting.key";
  const CLINICIAN = "alliance.reporting.clinician";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const Y_MAX = 40;

  const $ = (id) => document.getElementById(id);
  let nextCursor = null;
  let currentClinician = null;

  function key() { return sessionStorage.getItem(KEY); }

  function show(section) {
    for (const id of ["signin", "caseload", "detail", "network"]) $(id).hidden = id !== section;
    const signedIn = Boolean(key());
    $("signout").hidden = !signedIn;
    $("nav").hidden = !signedIn;
    $("nav-network").classList.toggle("active", section === "network");
    $("nav-caseload").classList.toggle("active", section === "caseload" || section === "detail");
    $("who").textContent = signedIn ? "signed in with a read key" : "";
  }

  class AuthError extends Error {}

  async function api(path) {
    const res = await fetch(path, { headers: { Authorization: "Bearer " + key(), Accept: "application/json" } });
    if (res.status === 401) throw new AuthError("This key is not valid (any more). Sign in again.");
    if (res.status === 404) return null;
    if (!res.ok) {
      let msg = res.status + " " + res.statusText;
      try { const body = await res.json(); msg = body.errors.map((e) => e.message).join("; "); } catch (_) { /* keep */ }
      throw new Error(msg);
    }
    return res.json();
  }

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // points: [{session_number, total, below_cutoff}], alerts: [{session_number, acknowledged, status}].
  // Whether a point is below the cutoff is scoring's flag, never a comparison drawn here.
  function chart(points, cutoff, alerts, opts) {
    const w = opts.width, h = opts.height;
    const pad = opts.axes ? { l: 34, r: 14, t: 12, b: 36 } : { l: 6, r: 6, t: 6, b: 6 };
    const root = svg("svg", { class: "chart", viewBox: `0 0 ${w} ${h}`, role: "img",
      "aria-label": opts.label || "SRS trajectory" });
    const nums = points.map((p) => p.session_number);
    const lo = Math.min(...nums), hi = Math.max(...nums);
    const x = (n) => hi === lo ? (pad.l + (w - pad.l - pad.r) / 2)
      : pad.l + (n - lo) * (w - pad.l - pad.r) / (hi - lo);
    // The SRS lives near its ceiling: scale from a little under the lowest value (or the cutoff) to 40,
    // so that a one-point drop is visible.
    const floorOf = Math.min(...points.map((p) => p.total), typeof cutoff === "number" ? cutoff : Y_MAX);
    const yMin = Math.max(0, 5 * Math.floor((floorOf - 3) / 5));
    const y = (v) => pad.t + (Y_MAX - Math.max(yMin, Math.min(Y_MAX, v))) * (h - pad.t - pad.b) / (Y_MAX - yMin);

    if (typeof cutoff === "number") {
      root.appendChild(svg("rect", { class: "risk-zone", x: pad.l, y: y(cutoff), width: w - pad.l - pad.r,
        height: Math.max(0, y(yMin) - y(cutoff)) }));
    }
    if (opts.axes) {
      for (let v = yMin; v <= Y_MAX; v += 5) {
        root.appendChild(svg("line", { class: "grid", x1: pad.l, x2: w - pad.r, y1: y(v), y2: y(v) }));
        root.appendChild(svg("text", { class: "axis-label", x: pad.l - 6, y: y(v) + 4, "text-anchor": "end" }, v));
      }
      for (const n of nums) {
        root.appendChild(svg("text", { class: "axis-label", x: x(n), y: h - 20, "text-anchor": "middle" }, n));
      }
      root.appendChild(svg("text", { class: "axis-label", x: pad.l + (w - pad.l - pad.r) / 2, y: h - 3,
        "text-anchor": "middle" }, "session number"));
    }
    if (typeof cutoff === "number") {
      root.appendChild(svg("line", { class: "cutoff", x1: pad.l, x2: w - pad.r, y1: y(cutoff), y2: y(cutoff) }));
      if (opts.axes) {
        root.appendChild(svg("text", { class: "cutoff-label", x: w - pad.r, y: y(cutoff) - 4, "text-anchor": "end" },
          "cutoff " + num(cutoff)));
      }
    }
    if (points.length) {
      const d = points.map((p, i) => (i ? "L" : "M") + x(p.session_number).toFixed(1) + " " + y(p.total).toFixed(1)).join(" ");
      root.appendChild(svg("path", { class: "line", d }));
    }
    const r = opts.axes ? 4.5 : 3;
    for (const p of points) {
      const c = svg("circle", { class: "point" + (p.below_cutoff ? " below" : ""),
        cx: x(p.session_number), cy: y(p.total), r, "data-session": p.session_number });
      c.appendChild(svg("title", {}, `session ${p.session_number}: ${num(p.total)}`));
      root.appendChild(c);
    }
    const byNumber = new Map(points.map((p) => [p.session_number, p]));
    for (const a of alerts || []) {
      const p = byNumber.get(a.session_number);
      if (!p) continue;
      const status = a.status || (a.acknowledged ? "acknowledged" : "open");
      const ended = status === "withdrawn" || status === "superseded";
      const m = svg("circle", { class: "alert-marker" + (a.acknowledged ? " acknowledged" : "") + (ended ? " " + status : ""),
        cx: x(p.session_number), cy: y(p.total), r: r + 4, "data-session": p.session_number, "data-status": status });
      m.appendChild(svg("title", {}, `alert (${a.severity || "raised"}): ${status}`));
      root.appendChild(m);
    }
    return root;
  }

  function go(params) {
    const q = new URLSearchParams(params).toString();
    history.pushState(null, "", "/dashboard" + (q ? "?" + q : ""));
    route();
  }

  function card(entry) {
    const li = el("li", { class: "card" + (entry.at_risk ? " at-risk" : ""), tabindex: "0",
      "data-client": entry.client_id, "data-instrument": entry.instrument });
    const head = el("div", { class: "head" });
    const name = el("span", {});
    name.appendChild(el("span", { class: "client" }, entry.client_id));
    name.appendChild(el("span", { class: "inst" }, entry.instrument + (entry.episode_id ? " · " + entry.episode_id : "") +
      (entry.episode_count > 1 ? ` (${entry.episode_count} episodes)` : "")));
    head.appendChild(name);
    head.appendChild(el("span", { class: "badge" + (entry.at_risk ? " risk" : "") }, entry.at_risk ? "At risk" : "On track"));
    li.appendChild(head);
    const why = entry.below_cutoff ? "below cutoff" : entry.declining ? "declining" : "";
    // a client with outcome sessions only: no alliance values, its latest outcome session instead
    const o = entry.outcome;
    li.appendChild(el("div", { class: "facts" }, o
      ? `no ${entry.instrument} session · ${o.instrument} latest ${num(o.latest_total)} (session ${o.latest_session_number})` +
        (o.change ? " · " + o.change.replace(/_/g, " ") : "") +
        (o.alerts.length ? ` · ${o.alerts.length} outcome alert${o.alerts.length > 1 ? "s" : ""}` : "")
      : `latest ${num(entry.latest_total)} (session ${entry.latest_session_number}) · ${entry.session_count} sessions` +
        (entry.alerts.length ? ` · ${entry.alerts.length} alert${entry.alerts.length > 1 ? "s" : ""}` : "") +
        (why ? " · " + why : "")));
    li.appendChild(chart(entry.points, entry.cutoff, entry.alerts,
      { width: 300, height: 80, label: `SRS trajectory of ${entry.client_id}` }));
    // the client's current episode: the detail page opens on it and offers the others
    const open = () => go({ client: entry.client_id, instrument: entry.instrument });
    li.addEventListener("click", open);
    li.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); open(); } });
    return li;
  }

  async function loadCaseload(clinician, cursor) {
    const status = $("caseload-status");
    status.textContent = "Loading…";
    const path = `/v1/clinicians/${encodeURIComponent(clinician)}/caseload` + (cursor ? `?cursor=${encodeURIComponent(cursor)}` : "");
    const body = await api(path);
    if (!body) {
      status.textContent = "No clients for this clinician are visible to this key.";
      $("more").hidden = true;
      return;
    }
    const list = $("cards");
    for (const entry of body.clients) list.appendChild(card(entry));
    const shown = list.children.length;
    const risky = list.querySelectorAll(".card.at-risk").length;
    status.textContent = `${shown} trajectories shown, ${risky} at risk (at-risk first).`;
    nextCursor = body.next_cursor;
    $("more").hidden = !nextCursor;
  }

  async function showCaseload(clinician) {
    show("caseload");
    $("clinician-id").value = clinician || "";
    $("cards").replaceChildren();
    $("more").hidden = true;
    currentClinician = clinician;
    if (!clinician) {
      $("caseload-title").textContent = "";
      $("caseload-status").textContent = "Enter a clinician id to see the caseload.";
      return;
    }
    sessionStorage.setItem(CLINICIAN, clinician);
    $("caseload-title").textContent = "Caseload of " + clinician;
    await loadCaseload(clinician, null);
  }

  function fmtDate(iso) {
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toISOString().slice(0, 10);
  }

  function num(v) { return v === null || v === undefined ? "–" : Number(v).toFixed(1); }

  async function showDetail(client, instrument, episode) {
    show("detail");
    $("detail-title").textContent = `Client ${client} · ${instrument}` + (episode ? ` · episode ${episode}` : "");
    $("detail-meta").textContent = "";
    $("detail-status").textContent = "Loading…";
    $("detail-chart").replaceChildren();
    const tbody = $("detail-table").querySelector("tbody");
    tbody.replaceChildren();
    const picker = $("episode");
    picker.replaceChildren();
    $("episode-picker").hidden = true;
    $("outcome").hidden = true;
    $("outcome-chart").replaceChildren();
    $("outcome-table").querySelector("tbody").replaceChildren();
    let path = `/v1/clients/${encodeURIComponent(client)}/trajectory?instrument=${encodeURIComponent(instrument)}`;
    if (episode) path += `&episode_id=${encodeURIComponent(episode)}`;
    const t = await api(path);
    if (!t) {
      $("detail-status").textContent = episode ? "No such episode of this client is visible to this key."
        : "No trajectory for this client is visible to this key.";
      return;
    }
    $("detail-title").textContent = `Client ${client} · ${instrument}` + (t.episode_id ? ` · episode ${t.episode_id}` : "");
    t.episodes.forEach((e, i) => {
      const label = `${e.episode_id || "(no episode)"} · ${fmtDate(e.first_administered_at)} to ` +
        `${fmtDate(e.last_administered_at)} · ${e.session_count} session${e.session_count > 1 ? "s" : ""}` +
        (i === 0 ? " (current)" : "");
      const option = el("option", { value: e.episode_id || "" }, label);
      if (e.episode_id === t.episode_id) option.selected = true;
      picker.appendChild(option);
    });
    $("episode-picker").hidden = t.episodes.length < 2;
    const open = t.alerts.filter((a) => a.status === "open" || a.status === "acknowledged").length;
    $("detail-status").textContent = "";
    if (!t.sessions.length) {
      // Outcome sessions only (the ORS is given first; the SRS may never be): the outcome part shows them.
      $("detail-meta").textContent = `No ${instrument} session yet · outcome sessions only · clinician ` +
        `${t.clinician_id} · site ${t.site_id}`;
      $("detail-chart").appendChild(el("p", { class: "meta", id: "no-alliance" },
        `No ${instrument} session has been scored for this client yet.`));
      showOutcome(t);
      return;
    }
    $("detail-meta").textContent =
      `${t.at_risk ? "At risk" : "On track"} · latest total ${num(t.latest_total)} · cutoff ${t.operator === "<=" ? "≤" : "<"} ` +
      `${num(t.cutoff)} · ${t.sessions.length} sessions · clinician ${t.clinician_id} · site ${t.site_id} · ` +
      `age band ${t.age_band}` +
      (t.alerts.length ? ` · ${t.alerts.length} alert${t.alerts.length > 1 ? "s" : ""} raised, ${open} open` : "");
    $("detail-chart").appendChild(chart(t.sessions, t.cutoff, t.alerts,
      { width: 820, height: 300, axes: true, label: `Full SRS trajectory of ${client}` }));
    for (const s of t.sessions) {
      const tr = el("tr", { class: s.below_cutoff ? "below" : "" });
      const items = s.items || {};
      const low = new Set(s.low_items || []);
      tr.appendChild(el("td", {}, String(s.session_number)));
      tr.appendChild(el("td", {}, fmtDate(s.administered_at)));
      for (const k of ["relationship", "goals", "approach", "overall"]) {
        tr.appendChild(el("td", low.has(k) ? { class: "low-item" } : {}, num(items[k])));
      }
      tr.appendChild(el("td", { class: "total" }, num(s.total)));
      const ch = s.change_from_previous;
      tr.appendChild(el("td", {}, ch === null || ch === undefined ? "–" : (ch > 0 ? "+" : "") + num(ch)));
      tr.appendChild(el("td", { class: "severity" }, s.severity || ""));
      tr.appendChild(el("td", s.revision > 1 ? { class: "amended", title: "corrected" } : {}, String(s.revision)));
      tr.appendChild(el("td", { class: "flags" }, (s.flags || []).join(", ")));
      tbody.appendChild(tr);
    }
    showOutcome(t);
  }

  // ------------------------------------------------------------------ outcome (ORS) beside the alliance (SRS)

  const ORS_ITEMS = ["individually", "interpersonally", "socially", "overall"];
  const CHANGE_LABEL = { reliable_improvement: "reliable improvement", reliable_deterioration: "reliable deterioration",
    no_reliable_change: "no reliable change" };

  function markerClass(base, a) {
    const ended = a.status === "withdrawn" || a.status === "superseded";
    return base + (a.acknowledged ? " acknowledged" : "") + (ended ? " " + a.status : "");
  }

  // Both scales on one 0-40 scale, one x position per session number of the episode (t.aligned):
  // the ORS line with its clinical cutoff and the reliable change band (intake ± RCI, as scoring
  // published them), the SRS line with its cutoff, and each session's alerts of either kind.
  // Every value is the API's; whether a change is reliable is scoring's `change`, never a comparison here.
  function combinedChart(t) {
    const o = t.outcome, rows = t.aligned;
    const w = 820, h = 320, pad = { l: 34, r: 112, t: 12, b: 36 };
    const root = svg("svg", { class: "chart combined", viewBox: `0 0 ${w} ${h}`, role: "img",
      "aria-label": `Outcome and alliance of ${t.client_id}` });
    const nums = rows.map((r) => r.session_number);
    const lo = Math.min(...nums), hi = Math.max(...nums);
    const x = (n) => hi === lo ? (pad.l + (w - pad.l - pad.r) / 2) : pad.l + (n - lo) * (w - pad.l - pad.r) / (hi - lo);
    const y = (v) => pad.t + (Y_MAX - Math.max(0, Math.min(Y_MAX, v))) * (h - pad.t - pad.b) / Y_MAX;
    const band = o && o.reliable_change_band;
    if (band) {
      root.appendChild(svg("rect", { class: "rci-band", x: pad.l, y: y(band.high), width: w - pad.l - pad.r,
        height: Math.max(0, y(band.low) - y(band.high)), "data-low": band.low, "data-high": band.high }));
      root.appendChild(svg("line", { class: "intake", x1: pad.l, x2: w - pad.r, y1: y(o.intake_total), y2: y(o.intake_total) }));
      root.appendChild(svg("text", { class: "axis-label", x: w - pad.r + 4, y: y(o.intake_total) + 4 },
        `intake ${num(o.intake_total)} ±${num(o.reliable_change_index)}`));
    }
    for (let v = 0; v <= Y_MAX; v += 5) {
      root.appendChild(svg("line", { class: "grid", x1: pad.l, x2: w - pad.r, y1: y(v), y2: y(v) }));
      root.appendChild(svg("text", { class: "axis-label", x: pad.l - 6, y: y(v) + 4, "text-anchor": "end" }, v));
    }
    for (const n of nums) root.appendChild(svg("text", { class: "axis-label", x: x(n), y: h - 20, "text-anchor": "middle" }, n));
    root.appendChild(svg("text", { class: "axis-label", x: pad.l + (w - pad.l - pad.r) / 2, y: h - 3,
      "text-anchor": "middle" }, "session number"));
    const cutoffs = [["ors-cutoff", o && o.cutoff, "ORS cutoff"], ["srs-cutoff", t.cutoff, "SRS cutoff"]];
    for (const [cls, value, label] of cutoffs) {
      if (typeof value !== "number") continue;
      root.appendChild(svg("line", { class: cls, x1: pad.l, x2: w - pad.r, y1: y(value), y2: y(value), "data-value": value }));
      root.appendChild(svg("text", { class: "cutoff-label " + cls, x: w - pad.r + 4, y: y(value) + 4 }, `${label} ${num(value)}`));
    }
    for (const scale of ["ors", "srs"]) {
      const pts = rows.filter((r) => r[scale]);
      if (pts.length) {
        const d = pts.map((r, i) => (i ? "L" : "M") + x(r.session_number).toFixed(1) + " " + y(r[scale].total).toFixed(1)).join(" ");
        root.appendChild(svg("path", { class: scale + "-line", d }));
      }
      for (const r of pts) {
        const v = r[scale];
        const flag = scale === "ors" ? (v.in_clinical_range ? " in-range" : "") : (v.below_cutoff ? " below" : "");
        const c = svg("circle", { class: scale + "-point" + flag, cx: x(r.session_number), cy: y(v.total), r: 4.5,
          "data-session": r.session_number, "data-total": v.total });
        const what = scale === "ors" ? `ORS ${num(v.total)}` + (v.change ? ` (${CHANGE_LABEL[v.change] || v.change})` : "")
          : `SRS ${num(v.total)}`;
        c.appendChild(svg("title", {}, `session ${r.session_number}: ${what}`));
        root.appendChild(c);
        const a = v.alert;
        if (!a) continue;
        const cx = x(r.session_number), cy = y(v.total);
        const m = scale === "ors"
          ? svg("rect", { class: markerClass("outcome-marker", a), x: cx - 8, y: cy - 8, width: 16, height: 16,
            transform: `rotate(45 ${cx.toFixed(1)} ${cy.toFixed(1)})` })
          : svg("circle", { class: markerClass("alliance-marker", a), cx, cy, r: 8.5 });
        for (const [k, val] of [["data-session", r.session_number], ["data-status", a.status], ["data-severity", a.severity]]) {
          m.setAttribute(k, String(val));
        }
        m.appendChild(svg("title", {}, `${scale === "ors" ? "outcome" : "alliance"} alert (${a.severity}): ` +
          `${(a.triggers || []).join(", ")} · ${a.status}` + (a.outcome_at_risk ? " · outcome at risk" : "")));
        root.appendChild(m);
      }
    }
    return root;
  }

  function showOutcome(t) {
    const o = t.outcome;
    if (!o || !o.sessions.length) return;
    $("outcome").hidden = false;
    const open = o.alerts.filter((a) => a.status === "open" || a.status === "acknowledged").length;
    $("outcome-meta").textContent = `${o.instrument} · intake ${num(o.intake_total)} · latest ${num(o.latest_total)}` +
      ` · change from intake ${o.change_from_intake === null ? "–" : signed1(o.change_from_intake)}` +
      (o.change ? ` · ${CHANGE_LABEL[o.change] || o.change}` : "") +
      (o.clinically_significant_improvement ? " · clinically significant improvement" : "") +
      (o.in_clinical_range === null ? "" : o.in_clinical_range ? " · in the clinical range" : " · above the cutoff") +
      (o.alerts.length ? ` · ${o.alerts.length} outcome alert${o.alerts.length > 1 ? "s" : ""}, ${open} open` : "");
    $("outcome-chart").appendChild(combinedChart(t));
    const tbody = $("outcome-table").querySelector("tbody");
    for (const r of t.aligned) {
      const s = o.sessions.find((x) => x.session_number === r.session_number);
      const tr = el("tr", { "data-session": String(r.session_number), class: s && s.in_clinical_range ? "in-range" : "" });
      tr.appendChild(el("td", {}, String(r.session_number)));
      tr.appendChild(el("td", {}, s ? fmtDate(s.administered_at) : "–"));
      const items = (s && s.items) || {};
      for (const k of ORS_ITEMS) tr.appendChild(el("td", {}, num(items[k])));
      tr.appendChild(el("td", { class: "ors-total" }, s ? num(s.total) : "–"));
      tr.appendChild(el("td", {}, s && s.change_from_intake !== null ? signed1(s.change_from_intake) : "–"));
      tr.appendChild(el("td", { class: (s && s.change) || "" }, s && s.change ? CHANGE_LABEL[s.change] || s.change : "–"));
      tr.appendChild(el("td", {}, s && s.clinically_significant_improvement ? "yes" : ""));
      tr.appendChild(el("td", {}, s && s.in_clinical_range !== null ? (s.in_clinical_range ? "in range" : "above cutoff") : "–"));
      tr.appendChild(el("td", { class: "outcome-alert" }, s && s.alert ? `${s.alert.severity} · ${s.alert.status}` : ""));
      tr.appendChild(el("td", {}, r.srs ? num(r.srs.total) : "–"));
      tr.appendChild(el("td", { class: "alliance-alert" }, r.srs && r.srs.alert ? `${r.srs.alert.severity} · ${r.srs.alert.status}` +
        (r.srs.alert.outcome_at_risk ? " · outcome at risk" : "") : ""));
      tbody.appendChild(tr);
    }
  }

  function signed1(v) { return (v > 0 ? "+" : "") + Number(v).toFixed(1); }

  // ------------------------------------------------------------------ network and site trends

  const MONTH_NAMES = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  const MONTH_RE = /^\d{4}-(0[1-9]|1[0-2])$/;

  function monthLabel(m) { return MONTH_NAMES[Number(m.slice(5, 7)) - 1] + " " + m.slice(2, 4); }

  function shiftMonth(m, by) {
    const n = Number(m.slice(0, 4)) * 12 + Number(m.slice(5, 7)) - 1 + by;
    return String(Math.floor(n / 12)).padStart(4, "0") + "-" + String(n % 12 + 1).padStart(2, "0");
  }

  // The span asked for, else the twelve months up to this one (UTC, as the API counts months).
  function span(from, to) {
    const now = new Date().toISOString().slice(0, 7);
    const last = MONTH_RE.test(to || "") ? to : now;
    const first = MONTH_RE.test(from || "") ? from : shiftMonth(last, -11);
    return { from: first, to: last };
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 90 * 60) return Math.round(seconds / 60) + " min";
    if (seconds < 48 * 3600) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }

  function pct(v) { return v === null || v === undefined ? "–" : Number(v).toFixed(1) + " %"; }
  function signed(v) { return v === null || v === undefined ? "–" : (v > 0 ? "+" : "") + Number(v).toFixed(2); }
  function count(v) { return String(v); }

  // What the page shows of each month, in table order; `chart` groups the series drawn together.
  const FIELDS = [
    { key: "sessions", label: "sessions", fmt: count, chart: "volume", kind: "bar" },
    { key: "clients_seen", label: "clients seen", fmt: count, chart: "volume", kind: "line" },
    { key: "pct_sessions_below_cutoff", label: "sessions below cutoff", fmt: pct, chart: "below", kind: "line" },
    { key: "alerts_raised", label: "alerts raised", fmt: count, chart: "alerts", kind: "bar" },
    { key: "alerts_acknowledged", label: "acknowledged", fmt: count, chart: "alerts", kind: "bar" },
    { key: "median_seconds_to_acknowledge", label: "median time to acknowledge", fmt: duration, chart: "ack",
      kind: "line" },
    { key: "episodes_ending", label: "episodes ending", fmt: count },
    { key: "mean_change_first_to_latest", label: "mean change first → latest", fmt: signed, chart: "change",
      kind: "bar" },
  ];
  const CHARTS = [
    { id: "volume", title: "Sessions and clients seen", axis: (v) => String(+v.toFixed(1)) },
    { id: "below", title: "Share of sessions below cutoff", axis: (v) => v + " %", max: 100 },
    { id: "alerts", title: "Alerts raised and acknowledged", axis: (v) => String(+v.toFixed(1)) },
    { id: "ack", title: "Median time to acknowledge", axis: duration },
    { id: "change", title: "Mean change, first → latest session (episodes ending)", axis: (v) => signed(v) },
  ];

  // A monthly chart: bars side by side per month, lines through the months that have a value (a
  // month without one, e.g. no acknowledged alert, leaves a gap). Every mark carries the API's
  // value in data-value, and its month in data-month.
  function monthChart(months, fields, opts) {
    const w = 420, h = 200, pad = { l: 52, r: 10, t: 10, b: 30 };
    const root = svg("svg", { class: "chart trend", viewBox: `0 0 ${w} ${h}`, role: "img", "aria-label": opts.title });
    const values = fields.flatMap((f) => months.map((m) => m[f.key])).filter((v) => v !== null && v !== undefined);
    let hi = opts.max !== undefined ? opts.max : Math.max(0, ...values);
    let lo = Math.min(0, ...values);
    if (hi === lo) hi = lo + 1;
    const plotW = w - pad.l - pad.r, plotH = h - pad.t - pad.b, band = plotW / months.length;
    const x = (i) => pad.l + band * (i + 0.5);
    const y = (v) => pad.t + (hi - v) * plotH / (hi - lo);
    // gridlines at both ends and at zero when the values cross it (else half way)
    for (const v of [lo, lo < 0 && hi > 0 ? 0 : (lo + hi) / 2, hi]) {
      root.appendChild(svg("line", { class: "grid", x1: pad.l, x2: w - pad.r, y1: y(v), y2: y(v) }));
      root.appendChild(svg("text", { class: "axis-label", x: pad.l - 4, y: y(v) + 4, "text-anchor": "end" }, opts.axis(v)));
    }
    const every = Math.ceil(months.length / 12);
    months.forEach((m, i) => {
      if (i % every === 0) {
        root.appendChild(svg("text", { class: "axis-label", x: x(i), y: h - 12, "text-anchor": "middle" }, monthLabel(m.month)));
      }
    });
    const bars = fields.filter((f) => f.kind === "bar");
    const barW = band * 0.8 / Math.max(1, bars.length);
    bars.forEach((f, b) => {
      months.forEach((m, i) => {
        const v = m[f.key];
        if (v === null || v === undefined) return;
        const top = y(Math.max(0, v)), bottom = y(Math.min(0, v));
        const r = svg("rect", { class: "bar s-" + f.key, x: x(i) - band * 0.4 + b * barW, y: top, width: barW,
          height: Math.max(v === 0 ? 0 : 1, bottom - top), "data-series": f.key, "data-month": m.month, "data-value": v });
        r.appendChild(svg("title", {}, `${monthLabel(m.month)}: ${f.fmt(v)} ${f.label}`));
        root.appendChild(r);
      });
    });
    for (const f of fields.filter((f) => f.kind === "line")) {
      let d = "", open = false;
      months.forEach((m, i) => {
        const v = m[f.key];
        if (v === null || v === undefined) { open = false; return; }
        d += (open ? "L" : "M") + x(i).toFixed(1) + " " + y(v).toFixed(1) + " ";
        open = true;
      });
      if (d) root.appendChild(svg("path", { class: "trend-line s-" + f.key, d: d.trim() }));
      months.forEach((m, i) => {
        const v = m[f.key];
        if (v === null || v === undefined) return;
        const c = svg("circle", { class: "trend-point s-" + f.key, cx: x(i), cy: y(v), r: 3.5,
          "data-series": f.key, "data-month": m.month, "data-value": v });
        c.appendChild(svg("title", {}, `${monthLabel(m.month)}: ${f.fmt(v)} ${f.label}`));
        root.appendChild(c);
      });
    }
    return root;
  }

  function sum(months, k) { return months.reduce((n, m) => n + (m[k] || 0), 0); }

  async function showNetwork(site, from, to) {
    show("network");
    const range = span(from, to);
    $("from-month").value = range.from;
    $("to-month").value = range.to;
    $("network-title").textContent = "";
    $("network-totals").textContent = "";
    $("network-status").textContent = "Loading…";
    $("trend-charts").replaceChildren();
    $("trend-table").hidden = true;
    const tbody = $("trend-table").querySelector("tbody");
    tbody.replaceChildren();
    const listed = await api("/v1/sites");
    const picker = $("site");
    picker.replaceChildren();
    // A site-bound key reads its own site only: the picker offers nothing else.
    if (!listed.bound_to) picker.appendChild(el("option", { value: "" }, "Whole network"));
    for (const s of listed.sites) picker.appendChild(el("option", { value: s }, "Site " + s));
    const chosen = listed.bound_to || (site && listed.sites.includes(site) ? site : "");
    picker.value = chosen;
    const q = `from=${encodeURIComponent(range.from)}&to=${encodeURIComponent(range.to)}`;
    const t = await api(chosen ? `/v1/sites/${encodeURIComponent(chosen)}/trends?${q}` : `/v1/summary/trends?${q}`);
    const scope = chosen ? "Site " + chosen : "Whole network";
    $("network-title").textContent = `${scope} · ${monthLabel(range.from)} to ${monthLabel(range.to)}`;
    if (!t) {
      $("network-status").textContent = "No trends for this scope are visible to this key.";
      return;
    }
    const months = t.months;
    $("network-status").textContent = "";
    const raised = sum(months, "alerts_raised"), acked = sum(months, "alerts_acknowledged");
    $("network-totals").textContent = `${sum(months, "sessions")} sessions · ${raised} alert${raised === 1 ? "" : "s"} ` +
      `raised, ${acked} acknowledged` + (raised ? ` (${(100 * acked / raised).toFixed(0)} %)` : "") +
      ` · as of ${new Date(t.as_of).toISOString().slice(0, 16).replace("T", " ")} UTC`;
    for (const c of CHARTS) {
      const fields = FIELDS.filter((f) => f.chart === c.id);
      const fig = el("figure", { class: "trend-card", "data-chart": c.id });
      fig.appendChild(el("figcaption", {}, c.title));
      fig.appendChild(monthChart(months, fields, c));
      if (fields.length > 1) {
        const legend = el("div", { class: "legend" });
        for (const f of fields) {
          legend.appendChild(el("span", { class: `lg lg-${f.kind} s-${f.key}` }));
          legend.appendChild(document.createTextNode(" " + f.label + " "));
        }
        fig.appendChild(legend);
      }
      $("trend-charts").appendChild(fig);
    }
    for (const m of months) {
      const tr = el("tr", { "data-month": m.month });
      tr.appendChild(el("td", { class: "month" }, monthLabel(m.month)));
      for (const f of FIELDS) {
        const v = m[f.key];
        tr.appendChild(el("td", { "data-field": f.key, "data-value": v === null ? "" : String(v) }, f.fmt(v)));
      }
      tbody.appendChild(tr);
    }
    $("trend-table").hidden = false;
  }

  async function route() {
    if (!key()) { show("signin"); return; }
    const q = new URLSearchParams(location.search);
    try {
      if (q.get("view") === "network") {
        await showNetwork(q.get("site"), q.get("from"), q.get("to"));
      } else if (q.get("client")) {
        await showDetail(q.get("client"), q.get("instrument") || "SRS", q.get("episode"));
      } else {
        await showCaseload(q.get("clinician") || sessionStorage.getItem(CLINICIAN));
      }
    } catch (err) {
      if (err instanceof AuthError) {
        sessionStorage.removeItem(KEY);
        show("signin");
        $("signin-error").textContent = err.message;
      } else {
        const target = q.get("view") === "network" ? $("network-status")
          : q.get("client") ? $("detail-status") : $("caseload-status");
        target.textContent = "Could not load: " + err.message;
      }
    }
  }

  function wire() {
    $("signin-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const k = $("key").value.trim();
      if (!k) return;
      sessionStorage.setItem(KEY, k);
      $("key").value = "";
      $("signin-error").textContent = "";
      const c = $("clinician").value.trim();
      if (c) sessionStorage.setItem(CLINICIAN, c);
      const q = new URLSearchParams(location.search);
      if (c && !q.get("client")) q.set("clinician", c);
      history.replaceState(null, "", "/dashboard" + (q.toString() ? "?" + q : ""));
      route();
    });
    $("signout").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      sessionStorage.removeItem(CLINICIAN);
      history.pushState(null, "", "/dashboard");
      show("signin");
    });
    $("clinician-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const c = $("clinician-id").value.trim();
      if (c) go({ clinician: c });
    });
    $("more").addEventListener("click", () => {
      if (currentClinician && nextCursor) loadCaseload(currentClinician, nextCursor).catch((e) => {
        $("caseload-status").textContent = "Could not load: " + e.message;
      });
    });
    $("episode").addEventListener("change", () => {
      const q = new URLSearchParams(location.search);
      const p = { client: q.get("client"), instrument: q.get("instrument") || "SRS" };
      if ($("episode").value) p.episode = $("episode").value;
      go(p);
    });
    $("back").addEventListener("click", () => {
      const c = sessionStorage.getItem(CLINICIAN);
      go(c ? { clinician: c } : {});
    });
    $("nav-caseload").addEventListener("click", (ev) => {
      ev.preventDefault();
      const c = sessionStorage.getItem(CLINICIAN);
      go(c ? { clinician: c } : {});
    });
    $("nav-network").addEventListener("click", (ev) => { ev.preventDefault(); go({ view: "network" }); });
    const network = () => {
      const p = { view: "network", from: $("from-month").value, to: $("to-month").value };
      if ($("site").value) p.site = $("site").value;
      go(p);
    };
    $("network-form").addEventListener("submit", (ev) => { ev.preventDefault(); network(); });
    $("site").addEventListener("change", network);
    window.addEventListener("popstate", route);
  }

  document.addEventListener("DOMContentLoaded", () => { wire(); route(); });
})();
