// Trellis dashboard: copy buttons, live device lists, the connection test.
// Plain JavaScript, no libraries; every page works without it too.
"use strict";

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

// Copy buttons: <button data-copy="ID"> copies the text of #ID.
document.querySelectorAll("button[data-copy]").forEach((btn) => {
  btn.addEventListener("click", async () => {
    const src = document.getElementById(btn.dataset.copy);
    const status = btn.parentElement.querySelector(".copied");
    const text = src.textContent.trim();
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch (_) {
      const range = document.createRange();
      range.selectNodeContents(src);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    }
    if (status) status.textContent = ok ? "Copied." : "Select the text and copy it.";
  });
});

function deviceItem(d) {
  const li = el("li", { class: "device", "data-name": d.name, "data-ip": d.ip, "data-online": String(d.online) });
  li.append(el("span", { class: "dot", "aria-hidden": "true" }), el("strong", {}, d.name), " ", el("code", {}, d.ip), " ",
    el("span", { class: "state" }, d.online ? "online" : d.last_seen === "never" ? "not connected yet" : "offline, last seen " + d.last_seen));
  return li;
}

function deviceRow(d) {
  const tr = el("tr", { class: "device", "data-name": d.name, "data-ip": d.ip, "data-online": String(d.online) });
  const status = el("td");
  status.append(el("span", { class: "dot", "aria-hidden": "true" }), d.online ? " online" : " offline");
  tr.append(el("td", {}, d.name), (() => { const td = el("td"); td.append(el("code", {}, d.ip)); return td; })(),
    status, el("td", {}, d.last_seen), el("td", {}, d.os), el("td", {}, d.version), el("td", {}, d.tags.join(", ")));
  return tr;
}

// Live lists: #devices (wizard) and #device-table (overview) follow the
// Server-Sent Events of /dash/api/events; without them (or when the stream
// fails for good) they poll the JSON endpoint every second.
const list = document.getElementById("devices");
const table = document.getElementById("device-table");
const live = list || table;
if (live) {
  let last = "";
  const show = (data) => {
      const key = JSON.stringify(data.devices);
      if (key !== last) {
        last = key;
        if (list) list.replaceChildren(...data.devices.map(deviceItem));
        if (table) table.tBodies[0].replaceChildren(...data.devices.map(deviceRow));
      }
      const count = document.getElementById("device-count");
      if (count) count.textContent = "(" + data.online + " online)";
      const waiting = document.getElementById("waiting");
      if (waiting) waiting.textContent = data.total === 0 ? "Waiting for the first device…"
        : data.online < 2 ? data.online + " of " + data.total + " online: waiting until two devices are online…"
        : "Two devices are online: test the connection.";
      const online = document.getElementById("online-count");
      if (online) online.textContent = data.online;
      const total = document.getElementById("total-count");
      if (total) total.textContent = data.total;
      const next = document.getElementById("next");
      if (next && next.dataset.readyText) next.textContent = data.online >= 2 ? next.dataset.readyText : next.dataset.waitText;
  };
  const tick = async () => {
    try {
      const r = await fetch(live.dataset.live, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 401) { window.location = "/login"; return; }
      if (!r.ok) return;
      show(await r.json());
    } catch (_) { /* the server may be restarting: try again next second */ }
  };
  let timer = null;
  const poll = () => { if (timer === null) { timer = setInterval(tick, 1000); tick(); } };
  if (window.EventSource) {
    const es = new EventSource("/dash/api/events");
    es.addEventListener("nodes", (ev) => { try { show(JSON.parse(ev.data)); } catch (_) { /* ignore a bad event */ } });
    es.onerror = () => { if (es.readyState === EventSource.CLOSED) poll(); };
  } else {
    poll();
  }
}

// The connection test: post the form in the background and show the sentence.
const testForm = document.getElementById("test");
if (testForm) {
  testForm.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const button = document.getElementById("test-connection");
    const out = document.getElementById("test-result");
    button.disabled = true;
    out.className = "";
    out.removeAttribute("data-ok");
    out.textContent = "Testing…";
    try {
      const r = await fetch(testForm.action, {
        method: "POST", credentials: "same-origin",
        headers: { Accept: "application/json", "Content-Type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams(new FormData(testForm)),
      });
      if (r.headers.get("Content-Type")?.includes("application/json")) {
        const res = await r.json();
        out.textContent = res.message || res.error;
        out.className = res.ok ? "ok" : "error";
        out.dataset.ok = String(!!res.ok);
      } else {
        out.textContent = r.status === 403 ? "The page is out of date: reload it and try again." : "The test failed (HTTP " + r.status + ").";
        out.className = "error";
        out.dataset.ok = "false";
      }
    } catch (e) {
      out.textContent = "The server did not answer: " + e.message;
      out.className = "error";
      out.dataset.ok = "false";
    } finally {
      button.disabled = false;
    }
  });
}

// ---- Policy, Logs, Audit pages and the live overview (observe_*) ----

// Live flow tail: #flows[data-stream] gets new records from Server-Sent Events.
const flows = document.querySelector("table#flows[data-stream]");
if (flows && window.EventSource) {
  const status = document.getElementById("live-status");
  const fmtTime = (ms) => new Date(ms).toISOString().replace(/\.\d+Z$/, "Z");
  const end = (ip, port, node, proto) => {
    const addr = port === 0 || proto === "icmp" ? ip : ip + ":" + port;
    return node ? node + " " + addr : addr;
  };
  const es = new EventSource(flows.dataset.stream);
  es.onopen = () => { if (status) status.textContent = "Live: new records appear at the top."; };
  es.onerror = () => { if (status) status.textContent = "Live updates paused; retrying…"; };
  es.addEventListener("lagged", () => { if (status) status.textContent = "Some records were too many to show live; reload to see them all."; });
  es.onmessage = (ev) => {
    let r;
    try { r = JSON.parse(ev.data); } catch (_) { return; }
    if (flows.tBodies[0].querySelector('tr[data-id="' + r.id + '"]')) return;
    const tr = el("tr", { class: "flow new", "data-id": String(r.id), "data-decision": r.decision });
    tr.append(el("td", {}, fmtTime(r.end_ms)), el("td", {}, r.node),
      el("td", {}, end(r.src_ip, r.src_port, r.src_node, r.proto) + " → " + end(r.dst_ip, r.dst_port, r.dst_node, r.proto)),
      el("td", {}, r.proto), el("td", {}, r.via ? r.path + " via " + r.via : r.path),
      el("td", {}, r.decision + (r.rule ? " (" + r.rule + ")" : "")),
      el("td", {}, r.bytes_out + " / " + r.bytes_in), el("td", {}, r.end_reason));
    flows.tBodies[0].prepend(tr);
    const none = document.getElementById("no-flows");
    if (none) none.remove();
    while (flows.tBodies[0].rows.length > 500) flows.tBodies[0].lastElementChild.remove();
  };
}


// Pages: devices (dashboard/manage.rs). The devices table keeps its action
// forms; status, last seen, OS, version and tags are updated in place every
// second, and a note asks for a reload when devices were added or removed.
const manageTable = document.getElementById("manage-devices");
if (manageTable) {
  const rows = new Map();
  manageTable.querySelectorAll("tbody tr[data-name]").forEach((tr) => rows.set(tr.dataset.name, tr));
  const changed = document.getElementById("manage-devices-changed");
  const onlineCount = document.getElementById("manage-online");
  const set = (tr, cls, text) => { const td = tr.querySelector("." + cls); if (td && td.textContent !== text) td.textContent = text; };
  const tick = async () => {
    try {
      const r = await fetch(manageTable.dataset.live, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 401) { window.location = "/login"; return; }
      if (!r.ok) return;
      const data = await r.json();
      const seen = new Set();
      for (const d of data.devices) {
        seen.add(d.name);
        const tr = rows.get(d.name);
        if (!tr) continue;
        tr.dataset.online = String(d.online);
        const state = tr.querySelector(".m-state");
        if (state) state.textContent = d.online ? "online" : "offline";
        const time = tr.querySelector(".m-seen time");
        if (time) { time.textContent = d.last_seen; time.setAttribute("datetime", d.last_seen_at); }
        set(tr, "m-os", d.os);
        set(tr, "m-version", d.version);
        set(tr, "m-tags", d.tags.join(", "));
      }
      if (onlineCount) onlineCount.textContent = data.online;
      const differs = seen.size !== rows.size || [...rows.keys()].some((n) => !seen.has(n));
      if (changed) changed.hidden = !differs;
    } catch (_) { /* the server may be restarting: try again next second */ }
  };
  setInterval(tick, 1000);
}
