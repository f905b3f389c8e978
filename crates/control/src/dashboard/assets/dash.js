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

// Live lists: #devices (wizard) and #device-table (overview) poll the JSON endpoint every second.
const list = document.getElementById("devices");
const table = document.getElementById("device-table");
const live = list || table;
if (live) {
  let last = "";
  const tick = async () => {
    try {
      const r = await fetch(live.dataset.live, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (r.status === 401) { window.location = "/login"; return; }
      if (!r.ok) return;
      const data = await r.json();
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
    } catch (_) { /* the server may be restarting: try again next second */ }
  };
  setInterval(tick, 1000);
  tick();
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
