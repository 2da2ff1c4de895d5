/* TempMail inbox page: live list, in-page reader, copy button, countdown.
   Everything here is an enhancement: without it the page still works with
   plain links and forms. Mail content is only ever inserted as text
   (textContent) or as server-rendered, escaped reader HTML. */
(function () {
  "use strict";

  var POLL_MS = 2000;          // polling (only where the stream breaks): new mail within 3 s
  var STALE_MS = 45000;        // three pings missed: the stream is stuck (a buffering proxy, say)
  var MAX_ROWS = 200;          // as many as the server lists
  var hero = document.querySelector("[data-inbox-url]");
  if (!hero) { return; }
  document.documentElement.classList.add("js");

  var inboxUrl = hero.getAttribute("data-inbox-url");
  var streamUrl = inboxUrl.replace(/\/inbox\.json$/, "/stream");
  var list = document.getElementById("message-list");
  var empty = document.getElementById("empty");
  var count = document.getElementById("count");
  var reader = document.getElementById("reader");
  var live = document.getElementById("live-status");
  var expires = document.getElementById("expires");
  var etag = null;
  var timer = null;
  var CLIP_SVG = '<svg aria-hidden="true" viewBox="0 0 24 24" width="16" height="16"><path d="M20 11l-8 8a5 5 0 0 1-7-7l8-8a3.5 3.5 0 0 1 5 5l-8 8a2 2 0 0 1-3-3l7-7" fill="none" stroke="currentColor" stroke-width="2"/></svg>';
  var known = {};
  var deadline = Date.now() + 1000 * Number(hero.getAttribute("data-seconds-left") || 0);

  Array.prototype.forEach.call(list.children, function (li) { known[li.getAttribute("data-id")] = true; });

  /* ---- copy button ---- */
  var copyBtn = document.querySelector("[data-copy]");
  if (copyBtn) {
    copyBtn.hidden = false;
    copyBtn.addEventListener("click", function () {
      var field = document.getElementById(copyBtn.getAttribute("data-copy"));
      var done = function () { flashCopied(copyBtn); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done, function () { legacyCopy(field); done(); });
      } else {
        legacyCopy(field);
        done();
      }
    });
  }

  function legacyCopy(field) {
    field.focus();
    field.select();
    try { document.execCommand("copy"); } catch (e) { /* selection stays for Ctrl+C */ }
  }

  function flashCopied(btn) {
    var label = btn.querySelector("span");
    btn.classList.add("copied");
    label.textContent = "Copied!";
    setTimeout(function () { btn.classList.remove("copied"); label.textContent = "Copy"; }, 1800);
  }

  /* ---- countdown ---- */
  function two(n) { return (n < 10 ? "0" : "") + n; }

  function tick() {
    var left = Math.max(0, Math.round((deadline - Date.now()) / 1000));
    var h = Math.floor(left / 3600), m = Math.floor(left % 3600 / 60), s = left % 60;
    expires.textContent = (h ? h + ":" + two(m) : m) + ":" + two(s);
    expires.parentNode.classList.toggle("soon", left < 300);
    if (left === 0) {
      // The address is gone; the page hands out a new one on reload.
      setTimeout(function () { window.location.reload(); }, 1500);
      return;
    }
    setTimeout(tick, 1000);
  }
  if (expires) { tick(); }

  /* ---- live list: a Server-Sent Events stream; polling where it breaks ---- */
  function setLive(state, text) {
    live.classList.remove("on", "off");
    live.classList.add(state);
    live.querySelector(".live-text").textContent = text;
  }

  var source = null, watchdog = null, failures = 0, polling = false;

  function startStream() {
    if (!window.EventSource) { return startPolling(); }
    // The page already shows everything up to its newest row: start after it.
    source = new EventSource(streamUrl + "?after=" + newestId());
    source.addEventListener("open", function () { failures = 0; setLive("on", "Live"); alive(); });
    source.addEventListener("message", function (ev) { alive(); addMessage(JSON.parse(ev.data)); });
    source.addEventListener("ping", function (ev) {
      alive();
      deadline = Date.now() + 1000 * JSON.parse(ev.data).expires_in;
    });
    source.addEventListener("gone", function () { stopStream(); window.location.reload(); });
    source.addEventListener("error", function () {
      // The browser reconnects by itself (resuming after the last event id);
      // refused outright, or failing again and again, the page polls instead.
      setLive("off", "Reconnecting…");
      failures += 1;
      if (source.readyState === EventSource.CLOSED || failures >= 3) { fallBack(); }
    });
    alive();
  }

  function alive() { clearTimeout(watchdog); watchdog = setTimeout(fallBack, STALE_MS); }
  function stopStream() { clearTimeout(watchdog); if (source) { source.close(); source = null; } }
  function fallBack() { stopStream(); startPolling(); }
  function startPolling() { if (!polling) { polling = true; poll(); } }

  function newestId() {
    var top = 0;
    Object.keys(known).forEach(function (id) { top = Math.max(top, Number(id) || 0); });
    return top;
  }

  function addMessage(m) {
    if (known[m.id]) { return; }
    known[m.id] = true;
    var li = row(m);
    li.classList.add("new");
    list.insertBefore(li, list.firstChild);
    while (list.children.length > MAX_ROWS) { list.removeChild(list.lastChild); }
    count.textContent = list.children.length;
    empty.hidden = true;
    var unread = list.querySelectorAll(".msg.unread").length;
    document.title = (unread ? "(" + unread + ") " : "") + document.title.replace(/^\(\d+\) /, "");
  }

  /* conditional polling, 304 while nothing changed */
  function fetchList() {
    var headers = { "Accept": "application/json" };
    if (etag) { headers["If-None-Match"] = etag; }
    return fetch(inboxUrl, { headers: headers, cache: "no-store", credentials: "same-origin" })
      .then(function (resp) {
        if (resp.status === 304) { return null; }
        if (resp.status === 404) { window.location.reload(); return null; }
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        etag = resp.headers.get("ETag");
        return resp.json();
      })
      .then(function (data) {
        if (data) { render(data); }
        if (polling) { setLive("on", "Live"); }
      });
  }

  function poll() {
    if (document.hidden) { return schedule(); }
    fetchList().catch(function () { setLive("off", "Reconnecting…"); }).then(schedule);
  }

  // One pending timer at most, however many fetches finish.
  function schedule() { clearTimeout(timer); timer = setTimeout(poll, POLL_MS); }
  function pollNow() { clearTimeout(timer); poll(); }
  document.addEventListener("visibilitychange", function () { if (polling && !document.hidden) { pollNow(); } });

  // After a change made here (read mark, delete): the list once, or the next poll now.
  function refresh() {
    etag = null;
    if (polling) { pollNow(); } else { fetchList().catch(function () { /* the stream goes on */ }); }
  }

  function render(data) {
    deadline = Date.now() + 1000 * data.expires_in;
    var active = reader.querySelector("[data-message-id]");
    var activeId = active && active.getAttribute("data-message-id");
    var fresh = {};
    list.textContent = "";
    data.messages.forEach(function (m) {
      var li = row(m);
      if (!known[m.id]) { li.classList.add("new"); }
      if (String(m.id) === activeId) { li.classList.add("active"); }
      fresh[m.id] = true;
      list.appendChild(li);
    });
    known = fresh;
    count.textContent = data.messages.length;
    empty.hidden = data.messages.length > 0;
    document.title = (unreadCount(data.messages) ? "(" + unreadCount(data.messages) + ") " : "") +
      data.address + " · " + document.title.split(" · ").pop();
  }

  function unreadCount(messages) {
    return messages.filter(function (m) { return !m.is_read; }).length;
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function row(m) {
    var li = el("li", "msg" + (m.is_read ? "" : " unread"));
    li.setAttribute("data-id", m.id);
    var a = el("a", "msg-link");
    a.href = m.url;
    var dot = el("span", "dot");
    dot.setAttribute("aria-hidden", "true");
    var when = el("time", "when", m.received);
    when.setAttribute("datetime", m.received_at);
    when.title = m.received_full;
    var subject = el("span", "subject");
    if (!m.is_read) { subject.appendChild(el("span", "visually-hidden", "Unread: ")); }
    subject.appendChild(document.createTextNode(m.subject || "(no subject)"));
    a.append(dot, el("span", "from", m.from_name || m.from_email || "Unknown sender"), when, subject);
    if (m.attachments) {
      var clip = el("span", "clip");
      clip.title = "Has attachments";
      clip.innerHTML = CLIP_SVG;  // a constant, never mail data
      clip.appendChild(el("span", "visually-hidden", "Has attachments"));
      a.appendChild(clip);
    }
    li.appendChild(a);
    return li;
  }

  /* ---- reader pane ---- */
  function partial(url) {
    return url + (url.indexOf("?") < 0 ? "?" : "&") + "partial=1";
  }

  function openMessage(url, focus) {
    reader.classList.add("loading");
    return fetch(partial(url), { credentials: "same-origin", cache: "no-store" })
      .then(function (resp) {
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        return resp.text();
      })
      .then(function (html) {
        // Server-rendered and escaped by Jinja; mail HTML itself only ever
        // lives inside the sandboxed iframe this fragment points to.
        reader.innerHTML = html;
        reader.classList.remove("loading");
        if (focus) { reader.focus(); }
        if (window.matchMedia("(max-width: 760px)").matches) { reader.scrollIntoView({ behavior: "smooth" }); }
        markActive(reader.querySelector("[data-message-id]").getAttribute("data-message-id"));
        refresh();             // the read mark changed the list
      })
      .catch(function () { window.location.href = url; });
  }

  function markActive(id) {
    Array.prototype.forEach.call(list.children, function (li) {
      var on = li.getAttribute("data-id") === id;
      li.classList.toggle("active", on);
      if (on) {
        li.classList.remove("unread");
        var hidden = li.querySelector(".subject .visually-hidden");
        if (hidden) { hidden.remove(); }
      }
    });
  }

  list.addEventListener("click", function (ev) {
    var link = ev.target.closest("a.msg-link");
    if (!link || ev.ctrlKey || ev.metaKey || ev.shiftKey) { return; }
    ev.preventDefault();
    openMessage(link.getAttribute("href"), true);
  });

  reader.addEventListener("click", function (ev) {
    var link = ev.target.closest("a[data-reader]");
    if (!link) { return; }
    ev.preventDefault();
    openMessage(link.getAttribute("href"), false);
  });

  // Delete without leaving the page; the form still works as a plain POST.
  reader.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.getAttribute("data-inplace") !== "delete") { return; }
    ev.preventDefault();
    fetch(form.action, {
      method: "POST", credentials: "same-origin",
      headers: { "Accept": "application/json", "X-CSRFToken": form.elements.csrf_token.value }
    }).then(function (resp) {
      if (!resp.ok) { throw new Error("HTTP " + resp.status); }
      reader.innerHTML = '<div class="reader-empty"><p>Message deleted.</p></div>';
      refresh();
    }).catch(function () { form.submit(); });
  });

  // Destructive forms ask first; without JavaScript they simply submit.
  document.addEventListener("submit", function (ev) {
    var question = ev.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { ev.preventDefault(); }
  });

  startStream();
}());
