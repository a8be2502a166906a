/* Tessera console: live updates (server-sent events) and actions as JSON calls to the fleet API.
   No markup is ever built from data: every value goes in with textContent. */
"use strict";

(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function t(ts) {  // '2027-01-31T05:06:07.1+00:00' -> '2027-01-31 05:06:07Z' (as the server renders it)
    if (!ts) return "—";
    const s = String(ts);
    return s.length >= 19 && s[10] === "T" ? s.slice(0, 10) + " " + s.slice(11, 19) + "Z" : s;
  }

  function flash(text, kind) {
    const f = $("#flash");
    f.textContent = text;
    f.className = kind || "ok";
    f.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { f.hidden = true; }, 8000);
  }

  // --- the fleet API --------------------------------------------------------------------------------------
  async function api(method, path, body) {
    const opts = { method: method, headers: { "Accept": "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const resp = await fetch(path, opts);
    let data = null;
    try { data = await resp.json(); } catch (e) { data = null; }
    if (!resp.ok) {
      const detail = data && (data.detail || data.title) ? (data.detail || data.title) : resp.statusText;
      throw new Error(resp.status + ": " + detail);
    }
    return { status: resp.status, data: data };
  }

  // --- the confirmation dialog ----------------------------------------------------------------------------
  function confirmDialog(text, withReason, okLabel) {
    const dlg = $("#confirm");
    $("#confirm-text").textContent = text;
    $("#confirm-reason-row").hidden = !withReason;
    $("#confirm-reason").value = "";
    $("#confirm-ok").textContent = okLabel || "Confirm";
    return new Promise((resolve) => {
      dlg.addEventListener("close", function onClose() {
        dlg.removeEventListener("close", onClose);
        resolve(dlg.returnValue === "ok" ? { reason: $("#confirm-reason").value } : null);
      });
      dlg.returnValue = "";
      dlg.showModal();
      (withReason ? $("#confirm-reason") : $("#confirm-ok")).focus();
    });
  }

  const VERB = { suspend: "Suspend", resume: "Resume", revoke: "Revoke", renew: "Renew" };

  // one device: POST /api/v1/devices/{id}/status
  async function statusAction(button) {
    const id = button.closest("[data-device]").dataset.device;
    const op = button.dataset.op;
    const final = op === "revoke" ? " Revocation is final: its certificates are revoked and it cannot connect again." : "";
    const ok = await confirmDialog(VERB[op] + " device " + id + "?" + final, op !== "resume", VERB[op]);
    if (!ok) return;
    try {
      const r = await api("POST", "/api/v1/devices/" + encodeURIComponent(id) + "/status",
                          { action: op, reason: ok.reason || "" });
      setStatus(id, r.data.device.status);
      flash(id + " is " + r.data.device.status + (r.data.sessions_cut ? "; sessions cut: " + r.data.sessions_cut : ""));
      for (const serial of r.data.revoked_serials || []) {
        const row = $('tr[data-serial="' + CSS.escape(serial) + '"]');
        if (row) { $(".cert-status", row).textContent = "revoked"; $(".cert-revoked", row).textContent = "now"; }
      }
      if (r.data.device.status === "revoked") {  // final: no action is left; presence follows live
        for (const b of $$("#device-actions button")) b.remove();
        if ($("#command-panel")) $("#command-panel").remove();
      } else {
        setTimeout(() => location.reload(), 1500);  // the action buttons follow the new status
      }
    } catch (e) { flash(e.message, "error"); }
  }

  // renew one device: a job from POST /api/v1/devices/actions/renew (dry run, then confirm_count)
  async function renewAction(button) {
    const id = button.closest("[data-device]").dataset.device;
    const sel = { ids: [id] };
    try {
      const dry = await api("POST", "/api/v1/devices/actions/renew", { selector: sel });
      const ok = await confirmDialog("Renew the certificate of " + id + " (" + dry.data.matched + " device)?", false, "Renew");
      if (!ok) return;
      const r = await api("POST", "/api/v1/devices/actions/renew", { selector: sel, confirm_count: dry.data.matched });
      location.href = "/console/jobs/" + r.data.id;
    } catch (e) { flash(e.message, "error"); }
  }

  // a fresh one-time enrollment token: POST /api/v1/devices/{id}/token, shown once on this page
  async function tokenAction(button) {
    const id = button.closest("[data-device]").dataset.device;
    const ok = await confirmDialog("Issue a new enrollment token for " + id + "? Its unused older tokens stop working.",
                                   false, "Issue token");
    if (!ok) return;
    try {
      const r = await api("POST", "/api/v1/devices/" + encodeURIComponent(id) + "/token");
      const out = $("#token-once");
      out.textContent = "token for " + r.data.id + " (shown only now; expires " + t(r.data.token_expires) + "):\n" + r.data.token;
      out.hidden = false;
    } catch (e) { flash(e.message, "error"); }
  }

  // --- bulk selection on the device list ------------------------------------------------------------------
  function bulkSelector() {
    const bulk = $("#bulk");
    if ($("#bulk-all-matching").checked) return JSON.parse(bulk.dataset.selector || "{}");
    const ids = $$("input.sel:checked").map((c) => c.value);
    return ids.length ? { ids: ids } : null;
  }

  function bulkCount() {
    const n = $$("input.sel:checked").length;
    $("#bulk-count").textContent = $("#bulk-all-matching").checked ? "every matching device"
      : (n ? n + " selected" : "none selected");
  }

  async function bulkAction(button) {
    const op = button.dataset.op;
    const sel = bulkSelector();
    if (!sel || !Object.keys(sel).length) { flash("Select devices first (or a filter and 'every device matching')", "error"); return; }
    const path = "/api/v1/devices/actions/" + op;
    try {
      const dry = await api("POST", path, { selector: sel });
      const n = dry.data.matched;
      const ok = await confirmDialog(VERB[op] + " " + n + " device" + (n === 1 ? "" : "s") + "?" +
                                     (op === "revoke" ? " Revocation is final." : ""), op !== "resume" && op !== "renew",
                                     VERB[op] + " " + n);
      if (!ok) return;
      const body = { selector: sel, confirm_count: n };
      if (op !== "renew") body.reason = ok.reason || "";
      const r = await api("POST", path, body);
      if (op === "renew") { location.href = "/console/jobs/" + r.data.id; return; }
      flash(r.data.changed + " changed, " + r.data.skipped + " skipped");
      setTimeout(() => location.reload(), 1500);
    } catch (e) { flash(e.message, "error"); }
  }

  // --- jobs -----------------------------------------------------------------------------------------------
  async function jobAction(button) {
    const id = button.closest("[data-job]").dataset.job;
    const op = button.dataset.op;
    if (op === "cancel") {
      const ok = await confirmDialog("Abort job " + id + "? Devices not yet sent the command are left out.", false, "Abort");
      if (!ok) return;
    }
    try {
      const r = await api("POST", "/api/v1/jobs/" + encodeURIComponent(id) + "/" + op);
      flash("job " + id + " is " + r.data.state);
      setTimeout(() => location.reload(), 800);
    } catch (e) { flash(e.message, "error"); }
  }

  function formSelector(form) {
    const sel = {};
    for (const k of ["group", "status", "label", "id_prefix", "online"]) {
      const v = form.elements[k] && form.elements[k].value.trim();
      if (v) sel[k] = k === "online" ? v === "true" : v;
    }
    return sel;
  }

  function parseArgs(text) {
    const args = JSON.parse(text || "{}");
    if (args === null || typeof args !== "object" || Array.isArray(args)) throw new Error("args must be a JSON object");
    return args;
  }

  async function startJob(form) {
    let body;
    try {
      body = { name: form.elements.name.value.trim(), command: form.elements.command.value.trim(),
               args: parseArgs(form.elements.args.value), selector: formSelector(form),
               rate_per_minute: Number(form.elements.rate_per_minute.value),
               timeout_s: Number(form.elements.timeout_s.value),
               abort_percent: Number(form.elements.abort_percent.value), offline: form.elements.offline.value };
      if (!Object.keys(body.selector).length) throw new Error("give at least one device filter");
    } catch (e) { flash(e.message, "error"); return; }
    try {
      const dry = await api("POST", "/api/v1/jobs", { selector: body.selector, command: body.command });
      const n = dry.data.matched;
      const ok = await confirmDialog("Send '" + body.command + "' to " + n + " device" + (n === 1 ? "" : "s") + "?", false, "Start job");
      if (!ok) return;
      const r = await api("POST", "/api/v1/jobs", Object.assign(body, { confirm_count: n }));
      location.href = "/console/jobs/" + r.data.id;
    } catch (e) { flash(e.message, "error"); }
  }

  async function sendCommand(form) {
    const id = form.dataset.device;
    const out = $("#command-result");
    let args;
    try { args = parseArgs(form.elements.args.value); } catch (e) { flash(e.message, "error"); return; }
    out.hidden = false;
    out.textContent = "sent, waiting for the acknowledgement…";
    try {
      const r = await api("POST", "/api/v1/devices/" + encodeURIComponent(id) + "/commands",
                          { command: form.elements.command.value.trim(), args: args, wait_s: 10 });
      out.textContent = r.data.ack ? "acknowledged: " + JSON.stringify(r.data.ack, null, 2)
                                   : "no acknowledgement within 10 s (command " + r.data.id + ")";
    } catch (e) { out.textContent = e.message; }
  }

  // --- tokens ---------------------------------------------------------------------------------------------
  function csvCell(v) {
    const s = String(v === undefined || v === null ? "" : v);
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }

  async function createTokens(form) {
    const prefix = form.elements.prefix.value.trim();
    const start = Number(form.elements.start.value || 0);
    const count = Number(form.elements.count.value || 0);
    const group = form.elements.group.value.trim();
    const label = form.elements.label.value.trim();
    const devices = [];
    for (let i = 0; i < count; i++) {
      const d = { id: prefix + String(start + i).padStart(String(start + count - 1).length, "0") };
      if (group) d.groups = [group];
      if (label) { const at = label.indexOf("="); d.labels = {}; d.labels[label.slice(0, at)] = label.slice(at + 1); }
      devices.push(d);
    }
    try {
      const r = await api("POST", "/api/v1/devices", { devices: devices });
      const rows = [["device_id", "token", "token_expires"]].concat(
        r.data.devices.map((d) => [d.id, d.token, r.data.token_expires]));
      const blob = new Blob([rows.map((row) => row.map(csvCell).join(",")).join("\r\n") + "\r\n"], { type: "text/csv" });
      const a = $("#token-download");
      a.href = URL.createObjectURL(blob);
      a.download = prefix.replace(/-$/, "") + "-tokens.csv";
      a.hidden = false;
      a.addEventListener("click", function once() {  // one download, then the tokens leave the page
        a.removeEventListener("click", once);
        setTimeout(() => { URL.revokeObjectURL(a.href); a.removeAttribute("href"); a.hidden = true;
                           $("#token-summary").textContent += " The CSV was downloaded; the tokens are gone from this page."; }, 500);
      });
      $("#token-summary").textContent = r.data.created + " devices registered; tokens expire " + t(r.data.token_expires) + ".";
      $("#token-result").hidden = false;
    } catch (e) { flash(e.message, "error"); }
  }

  // --- live updates ---------------------------------------------------------------------------------------
  function setStatus(id, status) {
    for (const cell of $$('[data-status="' + CSS.escape(id) + '"]')) {
      cell.textContent = "";
      cell.appendChild(el("span", status, "badge st-" + status));
    }
  }

  function onPresence(p) {
    for (const e of $$('[data-presence="' + CSS.escape(p.device_id) + '"]')) {
      e.textContent = p.online ? "online" : "offline";
      e.className = "pres " + (p.online ? "on" : "off");
    }
    for (const e of $$('[data-seen="' + CSS.escape(p.device_id) + '"]')) e.textContent = t(p.at);
    if (p.status) setStatus(p.device_id, p.status);
    const tl = $("#timeline");
    if (tl) {
      const empty = $(".empty", tl);
      if (empty) empty.remove();
      const li = el("li", null, p.online ? "on" : "off");
      li.appendChild(el("span", p.online ? "online" : "offline"));
      li.appendChild(document.createTextNode(" "));
      li.appendChild(el("time", t(p.at)));
      tl.prepend(li);
    }
  }

  function onAudit(a) {
    const body = $("#audit-live");
    if (!body) return;
    const newest = Math.max(0, ...$$("tr[data-audit-id]", body).map((r) => Number(r.dataset.auditId)));
    if (a.id <= newest) return;  // already on the page (rendered, or streamed before)
    const tr = el("tr", null, "out-" + a.outcome + " fresh");
    tr.dataset.auditId = String(a.id);
    tr.appendChild(el("td", t(a.at), "nowrap"));
    tr.appendChild(el("td", a.actor));
    tr.appendChild(el("td", a.action));
    if (!body.dataset.noDevice) {
      const td = el("td");
      if (a.device_id) {
        const link = el("a", a.device_id);
        link.href = "/console/devices/" + encodeURIComponent(a.device_id);
        td.appendChild(link);
      }
      tr.appendChild(td);
    }
    tr.appendChild(el("td", a.outcome));
    tr.appendChild(el("td", a.detail, "detail"));
    body.prepend(tr);
    const limit = Number(body.dataset.limit || 100);
    while (body.rows.length > limit) body.deleteRow(body.rows.length - 1);
  }

  function onJob(j) {
    const id = String(j.id);
    const done = j.total - j.counts.queued - j.counts.sent;
    for (const e of $$('[data-job-state="' + id + '"]')) { e.textContent = j.state; if (e.id === "job-state") e.className = "badge job-" + j.state; }
    for (const e of $$('[data-job-progress="' + id + '"]')) { e.max = j.total || 1; e.value = done; }
    for (const e of $$('[data-job-done="' + id + '"]')) e.textContent = String(done);
    if ($("#job-state") && $("#job-state").dataset.jobState === id) {  // this job's own page
      for (const [state, n] of Object.entries(j.counts)) { const c = $('[data-job-count="' + state + '"]'); if (c) c.textContent = String(n); }
      if ($("#job-reason")) $("#job-reason").textContent = j.reason || "";
      if ($("#job-finished")) $("#job-finished").textContent = t(j.finished);
      if (!["running", "paused"].includes(j.state)) for (const b of $$("#job-actions button")) b.remove();
      refreshJobDevices(id);
    }
  }

  async function refreshJobDevices(id) {  // the job's first 100 devices, from the API, as text
    const body = $("#job-devices");
    if (!body) return;
    try {
      const r = await api("GET", "/api/v1/jobs/" + encodeURIComponent(id) + "/devices?limit=100");
      body.textContent = "";
      for (const d of r.data.items) {
        const tr = el("tr");
        const td = el("td");
        const link = el("a", d.device_id);
        link.href = "/console/devices/" + encodeURIComponent(d.device_id);
        td.appendChild(link);
        tr.appendChild(td);
        tr.appendChild(el("td", d.state));
        tr.appendChild(el("td", t(d.sent_at), "nowrap"));
        tr.appendChild(el("td", t(d.finished_at), "nowrap"));
        tr.appendChild(el("td", d.detail || "", "detail"));
        body.appendChild(tr);
      }
    } catch (e) { /* the next event tries again */ }
  }

  function onCounts(c) {  // the overview's cards
    for (const [key, n] of Object.entries(c)) { const e = $("#count-" + key); if (e) e.textContent = String(n); }
  }

  function live() {
    const url = document.body.dataset.events;
    const dot = $("#live-state");
    if (!url || !window.EventSource) { dot.hidden = true; return; }
    const es = new EventSource(url);
    const handle = (fn) => (ev) => { try { fn(JSON.parse(ev.data)); } catch (e) { /* a bad event is dropped */ } };
    es.addEventListener("open", () => { dot.className = "live on"; document.body.dataset.live = "open"; });
    es.addEventListener("error", () => { dot.className = "live off"; document.body.dataset.live = "closed"; });
    es.addEventListener("presence", handle(onPresence));
    es.addEventListener("audit", handle(onAudit));
    es.addEventListener("job", handle(onJob));
    es.addEventListener("counts", handle(onCounts));
    es.addEventListener("bye", () => es.close());
  }

  // --- wiring ---------------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    live();
    if (document.body.dataset.canAct !== "yes") return;
    document.addEventListener("click", (ev) => {
      const b = ev.target.closest("button[data-action]");
      if (!b) return;
      ev.preventDefault();
      ({ status: statusAction, renew: renewAction, token: tokenAction, bulk: bulkAction, job: jobAction })[b.dataset.action](b);
    });
    document.addEventListener("submit", (ev) => {
      const f = ev.target.closest("form[data-form]");
      if (!f) return;
      ev.preventDefault();
      ({ job: startJob, command: sendCommand, tokens: createTokens })[f.dataset.form](f);
    });
    const page = $("#select-page");
    if (page) page.addEventListener("change", () => { for (const c of $$("input.sel")) c.checked = page.checked; bulkCount(); });
    for (const c of $$("input.sel")) c.addEventListener("change", bulkCount);
    const all = $("#bulk-all-matching");
    if (all) all.addEventListener("change", bulkCount);
  });
})();
