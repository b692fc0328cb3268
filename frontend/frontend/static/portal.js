// MIaaS portal: small progressive enhancements. Every page works without this script.
// - upload with a progress bar (bytes sent of total) and the registry's refusals listed by file
// - live deployment states and logs over Server-Sent Events
// - parts of a page refreshed in place (agents' load charts, the bus)
// - Tab in the code editor, confirmation of deletes
"use strict";

(function () {
  function formatBytes(n) {
    var units = ["bytes", "KiB", "MiB", "GiB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return i === 0 ? n + " bytes" : n.toFixed(1) + " " + units[i];
  }

  function isWebUrl(value) {
    return typeof value === "string" && /^https?:\/\//i.test(value);
  }

  function clear(el) { while (el.firstChild) { el.removeChild(el.firstChild); } }

  // ------------------------------------------------------------------ upload with progress
  function showProblems(section, message, problems) {
    var list = section.querySelector("[data-problem-list]");
    clear(list);
    var head = document.createElement("li");
    head.textContent = message;
    list.appendChild(head);
    (problems || []).forEach(function (p) {
      var item = document.createElement("li");
      var strong = document.createElement("strong");
      if (p.file) {
        var code = document.createElement("code");
        code.textContent = p.file;
        strong.appendChild(code);
      } else {
        strong.textContent = "the package";
      }
      item.appendChild(strong);
      var inner = document.createElement("ul");
      (p.messages || []).forEach(function (m) {
        var li = document.createElement("li");
        li.textContent = m;
        inner.appendChild(li);
      });
      item.appendChild(inner);
      list.appendChild(item);
    });
    section.hidden = false;
  }

  function enhanceUpload(form) {
    var box = form.querySelector("[data-progress]");
    var bar = box.querySelector("progress");
    var text = box.querySelector("[data-progress-text]");
    var button = form.querySelector("button[type=submit]");
    var problems = document.querySelector("[data-problems]");
    form.addEventListener("submit", function (event) {
      if (!window.FormData || !window.XMLHttpRequest) { return; }
      event.preventDefault();
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("Accept", "application/json");
      box.hidden = false;
      bar.value = 0;
      bar.max = 1;
      text.textContent = "Starting the upload…";
      button.disabled = true;
      problems.hidden = true;
      xhr.upload.addEventListener("progress", function (e) {
        if (!e.lengthComputable) { return; }
        bar.max = e.total;
        bar.value = e.loaded;
        var pct = Math.floor(100 * e.loaded / e.total);
        text.textContent = formatBytes(e.loaded) + " of " + formatBytes(e.total) + " sent (" + pct + "%)";
      });
      xhr.upload.addEventListener("load", function () {
        text.textContent = "Sent. The registry is validating the package…";
      });
      xhr.addEventListener("load", function () {
        var body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
        if (xhr.status >= 200 && xhr.status < 300 && body && body.ok) {
          text.textContent = "Uploaded. Opening the model…";
          window.location.assign(body.location);
          return;
        }
        button.disabled = false;
        text.textContent = "The upload was refused (status " + xhr.status + ").";
        showProblems(problems, body && body.message ? body.message : "The portal refused the upload.",
                     body ? body.problems : []);
        problems.focus && problems.setAttribute("tabindex", "-1");
        problems.focus();
      });
      xhr.addEventListener("error", function () {
        button.disabled = false;
        text.textContent = "The connection to the portal failed; nothing was stored.";
      });
      xhr.send(new FormData(form));
    });
  }

  // ------------------------------------------------------------------ live deployment states
  function setStatus(row, state) {
    var badge = row.querySelector("[data-field=status]");
    if (badge) {
      badge.textContent = state.status;
      badge.className = "status status-" + state.status;
    }
    var reason = row.querySelector("[data-field=reason]");
    if (reason) { reason.textContent = state.reason || ""; }
    var agent = row.querySelector("[data-field=agent]");
    if (agent && state.agent_id) { agent.textContent = state.agent_id; }
    var url = row.querySelector("[data-field=url]");
    if (url) {
      clear(url);
      if (state.status === "running" && isWebUrl(state.url)) {
        var a = document.createElement("a");
        a.href = state.url;
        a.rel = "noopener noreferrer";
        a.textContent = state.url;
        url.appendChild(a);
      } else if (state.url_text) {
        var span = document.createElement("span");
        span.className = "muted";
        span.textContent = state.url_text;
        url.appendChild(span);
      } else {
        url.textContent = "—";
      }
    }
    var stop = document.querySelectorAll("[data-field=stop]");
    Array.prototype.forEach.call(stop, function (form) {
      if (form.action.indexOf("/deployments/" + state.deployment_id + "/stop") !== -1) {
        form.hidden = !state.stoppable;
      }
    });
  }

  function follow(container) {
    var url = container.getAttribute("data-events");
    var logs = document.querySelector("[data-logs]");
    var logsProblem = document.querySelector("[data-logs-problem]");
    var followBox = document.querySelector("[data-follow]");
    var toggle = document.querySelector("[data-follow-toggle]");
    if (toggle) { toggle.hidden = false; }
    var source = null;
    var reloading = false;
    function open() {
      source = new EventSource(url);
      source.addEventListener("deployment", function (e) {
        var state = JSON.parse(e.data);
        var rows = document.querySelectorAll("[data-deployment]");
        var matched = false;
        Array.prototype.forEach.call(rows, function (row) {
          if (row.getAttribute("data-deployment") === state.deployment_id) { setStatus(row, state); matched = true; }
        });
        if (!matched && container.hasAttribute("data-reload-unknown") && !reloading) {
          reloading = true;  // a deployment this list does not show yet: load the list again, once
          window.setTimeout(function () { window.location.reload(); }, 1500);
        }
      });
      source.addEventListener("logs", function (e) {
        if (!logs || (followBox && !followBox.checked)) { return; }
        var data = JSON.parse(e.data);
        if (logsProblem) {
          logsProblem.hidden = !data.problem;
          logsProblem.textContent = data.problem || "";
        }
        if (data.text !== null && data.text !== undefined) {
          logs.textContent = data.text;
          logs.scrollTop = logs.scrollHeight;
        }
      });
      source.addEventListener("resync", function () { window.location.reload(); });
      source.addEventListener("error", function () {
        if (source.readyState === EventSource.CLOSED) {  // refused (e.g. too many streams): try again later
          window.setTimeout(open, 10000);
        }
      });
    }
    open();
    container.setAttribute("data-live", "open");
  }

  // ------------------------------------------------------------------ parts refreshed in place
  function refresh(el) {
    var url = el.getAttribute("data-refresh");
    var every = parseInt(el.getAttribute("data-interval") || "5000", 10);
    function tick() {
      if (document.hidden) { window.setTimeout(tick, every); return; }
      window.fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (html !== null) {
            var parsed = new DOMParser().parseFromString(html, "text/html");
            clear(el);
            Array.prototype.forEach.call(parsed.body.childNodes, function (n) {
              el.appendChild(document.importNode(n, true));
            });
          }
        })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { window.setTimeout(tick, every); });
    }
    window.setTimeout(tick, every);
  }

  // ------------------------------------------------------------------ editor and confirmations
  function enhanceCode(area) {
    var leaving = false;  // Esc, then Tab, moves the focus on as usual: the keyboard is never trapped
    area.addEventListener("blur", function () { leaving = false; });
    area.addEventListener("keydown", function (e) {
      if (e.key === "Escape") { leaving = true; return; }
      if (e.key !== "Tab" || leaving || e.shiftKey || e.ctrlKey || e.altKey || e.metaKey) { return; }
      e.preventDefault();
      var start = area.selectionStart;
      area.setRangeText("    ", start, area.selectionEnd, "end");
    });
  }

  function confirmFirst(form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { e.preventDefault(); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("form[data-upload]"), enhanceUpload);
    if (window.EventSource) {
      Array.prototype.forEach.call(document.querySelectorAll("[data-events]"), follow);
    }
    if (window.fetch && window.DOMParser) {
      Array.prototype.forEach.call(document.querySelectorAll("[data-refresh]"), refresh);
    }
    Array.prototype.forEach.call(document.querySelectorAll("textarea[data-code]"), enhanceCode);
    Array.prototype.forEach.call(document.querySelectorAll("form[data-confirm]"), confirmFirst);
  });
})();
