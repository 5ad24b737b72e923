// Alliance Stream trajectory page. No external resources: the charts are SVG drawn here.
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
    for (const id of ["signin", "caseload", "detail"]) $(id).hidden = id !== section;
    const signedIn = Boolean(key());
    $("signout").hidden = !signedIn;
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
    li.appendChild(el("div", { class: "facts" },
      `latest ${num(entry.latest_total)} (session ${entry.latest_session_number}) · ${entry.session_count} sessions` +
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
  }

  async function route() {
    if (!key()) { show("signin"); return; }
    const q = new URLSearchParams(location.search);
    try {
      if (q.get("client")) {
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
        const target = q.get("client") ? $("detail-status") : $("caseload-status");
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
    window.addEventListener("popstate", route);
  }

  document.addEventListener("DOMContentLoaded", () => { wire(); route(); });
})();
