// Live parts of the dashboard: statuses from the event stream, the log tail from the log
// stream (polling when the stream cannot be had).
// No framework, no CDN; every page works without it (plain forms and links).
(function () {
  "use strict";
  const STATUSES = ["provisioning", "online", "degraded", "offline", "stopping", "stopped",
    "failed", "removing", "removed"];
  // Which buttons make sense in which status (the API answers 409 otherwise).
  const ENABLED = {
    start: ["offline", "stopping", "stopped", "failed"],
    stop: ["provisioning", "online", "degraded", "offline", "failed"],
    restart: ["provisioning", "online", "degraded", "offline", "stopping", "stopped", "failed"],
  };

  // "2026-01-02T03:04:05.678Z" -> "2026-01-02 03:04:05" (UTC, as the server renders it).
  function stamp(iso) {
    return iso ? iso.replace("T", " ").slice(0, 19) : null;
  }

  function setField(root, name, value) {
    root.querySelectorAll('[data-field="' + name + '"]').forEach(function (el) {
      el.textContent = value == null || value === "" ? (name === "last_error" ? "" : "–") : value;
    });
  }

  function applyButtons(root, status) {
    root.querySelectorAll("button[data-verb]").forEach(function (button) {
      const allowed = ENABLED[button.dataset.verb];
      button.disabled = allowed ? allowed.indexOf(status) < 0 : false;
    });
    root.querySelectorAll('[data-verb="remove"]').forEach(function (link) {
      link.classList.toggle("hidden", status === "removed" || status === "removing");
    });
  }

  function applyOpen(root, ws) {
    const actions = root.querySelector(".actions");
    if (!actions) return;
    let open = actions.querySelector('[data-role="open"]');
    // `url` may be absent (older servers) or null (nothing to open yet).
    if (ws.url && ["online", "degraded"].indexOf(ws.status) >= 0) {
      if (!open) {
        open = document.createElement("a");
        open.className = "btn btn-open";
        open.dataset.role = "open";
        open.target = "_blank";
        open.rel = "noopener";
        open.textContent = "Open";
        actions.insertBefore(open, actions.firstChild);
      }
      open.href = ws.url;
    } else if (open && !ws.url) {
      open.remove();
    }
  }

  function apply(root, ws) {
    root.dataset.status = ws.status;
    root.querySelectorAll('[data-field="status"]').forEach(function (badge) {
      STATUSES.forEach(function (s) { badge.classList.remove("status-" + s); });
      badge.classList.add("status-" + ws.status);
      badge.textContent = ws.status;
    });
    setField(root, "last_error", ws.last_error);
    setField(root, "generation", ws.generation);
    setField(root, "last_started_at", stamp(ws.last_started_at));
    applyButtons(root, ws.status);
    applyOpen(root, ws);
  }

  function refresh(id) {
    return fetch("/api/workspaces/" + id + "/", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (ws) {
        if (!ws) return;
        document.querySelectorAll('[data-workspace="' + id + '"]').forEach(function (root) {
          apply(root, ws);
        });
      });
  }

  function refreshAll(root) {
    const shown = root.querySelectorAll("[data-workspace]");
    if (!shown.length) return;
    fetch("/api/workspaces/?page_size=500", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (page) {
        ((page && page.results) || []).forEach(function (ws) {
          root.querySelectorAll('[data-workspace="' + ws.id + '"]').forEach(function (row) {
            apply(row, ws);
          });
        });
      });
  }

  function addEvent(ev) {
    const body = document.getElementById("events");
    if (!body) return;
    const row = document.createElement("tr");
    const time = document.createElement("td");
    time.className = "muted";
    time.textContent = stamp(ev.created_at).slice(11);
    const what = document.createElement("td");
    const strong = document.createElement("strong");
    strong.textContent = ev.type.replace("WORKSPACE_", "");
    const small = document.createElement("small");
    small.className = "muted";
    small.textContent = " " + ev.source + " · gen " + ev.generation;
    what.append(strong, small);
    const detail = ev.payload && (ev.payload.error || ev.payload.message);
    if (detail) {
      const error = document.createElement("div");
      error.className = "error";
      error.textContent = detail;
      what.append(error);
    }
    const who = document.createElement("td");
    who.className = "muted";
    who.textContent = ev.actor || "";
    row.append(time, what, who);
    body.append(row);
  }

  function listen(root) {
    if (!window.EventSource) return;
    const single = root.id === "workspace" ? root.dataset.workspace : null;
    // A workspace's page asks for that workspace's events (and its members'): resuming after
    // the last one it showed then misses none.
    const scope = single ? "&workspace=" + encodeURIComponent(single) : "";
    const source = new EventSource("/api/events/stream?after=" + (root.dataset.after || 0) + scope);
    // The list's stream resumes after the newest id of all workspaces, which can pass an older
    // id still being committed: each time the stream (re)opens, subscribed, the badges are read
    // once from the API, so an event missed in between leaves no badge behind.
    if (!single) source.onopen = function () { refreshAll(root); };
    source.onmessage = function (message) {
      const ev = JSON.parse(message.data);
      if (single && ev.workspace_id !== single) return;
      if (single) addEvent(ev);
      if (document.querySelector('[data-workspace="' + ev.workspace_id + '"]')) refresh(ev.workspace_id);
    };
    window.addEventListener("beforeunload", function () { source.close(); });
  }

  const KEEP_LINES = 2000; // what the page keeps of a long-running stream

  function logView(pre) {
    const state = document.getElementById("log-state");
    let lines = null;
    return {
      status: function (text) { if (state) state.textContent = text; },
      set: function (list) { lines = list.slice(-KEEP_LINES); this.render(); },
      add: function (line) {
        if (lines === null) lines = [];
        lines.push(line);
        if (lines.length > KEEP_LINES) lines.splice(0, lines.length - KEEP_LINES);
        this.render();
      },
      render: function () {
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
        pre.textContent = lines && lines.length ? lines.join("\n") : "(no output yet)";
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      },
    };
  }

  // The fallback: ask for the tail every two seconds.
  function pollLogs(pre, view) {
    pre.dataset.mode = "poll";
    let last = null;
    function poll() {
      fetch(pre.dataset.url, { credentials: "same-origin" })
        .then(function (r) { return r.json().then(function (body) { return { ok: r.ok, body: body }; }); })
        .then(function (res) {
          const text = res.ok ? res.body.lines.join("\n") : res.body.detail;
          if (text !== last) {
            if (res.ok) view.set(res.body.lines); else pre.textContent = text;
            last = text;
          }
          view.status("polling · updated " + new Date().toTimeString().slice(0, 8));
        })
        .catch(function () { view.status("reconnecting…"); })
        .finally(function () { setTimeout(poll, 2000); });
    }
    poll();
  }

  // The log stream: the tail, then each line as the instance writes it. A stream ends after
  // LOGS_STREAM_MAX_SECONDS with an `end` frame; the next one asks for no tail (tail=0).
  function followLogs(pre) {
    const view = logView(pre);
    if (!window.EventSource || !pre.dataset.stream) { pollLogs(pre, view); return; }
    let first = true;
    function open() {
      const url = pre.dataset.stream + (first ? "?tail=200" : "?tail=0");
      const source = new EventSource(url);
      if (first) view.set([]);
      first = false;
      pre.dataset.mode = "stream";
      source.onopen = function () { view.status("live"); };
      source.onmessage = function (message) { view.add(JSON.parse(message.data).line); };
      source.addEventListener("instance", function (message) {
        const change = JSON.parse(message.data);
        view.add("── " + change.change + (change.detail ? ": " + change.detail : "") + " ──");
      });
      source.addEventListener("end", function (message) {
        source.close();
        if (JSON.parse(message.data).reason === "error") pollLogs(pre, view); else open();
      });
      // Refused (429, 503) or cut: carry on by polling rather than reconnecting blindly.
      source.onerror = function () { source.close(); pollLogs(pre, view); };
      window.addEventListener("beforeunload", function () { source.close(); });
    }
    open();
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-workspace][data-status]").forEach(function (root) {
      applyButtons(root, root.dataset.status);
    });
    const live = document.querySelector("[data-live]");
    if (live) listen(live);
    const log = document.getElementById("log");
    if (log) followLogs(log);
  });
})();
