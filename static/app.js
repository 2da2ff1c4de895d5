/* TempMail inbox page: live list, in-page reader, copy button, countdown.
   Everything here is an enhancement: without it the page still works with
   plain links and forms. Mail content is only ever inserted as text
   (textContent) or as server-rendered, escaped reader HTML. */
(function () {
  "use strict";

  var POLL_MS = 2000;          // new mail shows within 3 s of arrival
  var FRAME_MAX = 30000;       // px: past this a mail scrolls inside its frame
  document.documentElement.classList.add("js");

  /* ---- the reader's frame, as tall as the mail in it ----
     The frame is sandboxed with allow-same-origin but without allow-scripts:
     the mail runs nothing, and this page may read its document's height. */
  function fitFrame(frame) {
    function fit() {
      if (!frame.isConnected) { window.removeEventListener("resize", fit); return; }
      var doc = null;
      try { doc = frame.contentDocument; } catch (e) { return; }
      if (!doc || !doc.body) { return; }
      var html = doc.documentElement, body = doc.body;
      var outer = html.getBoundingClientRect(), inner = body.getBoundingClientRect();
      // The root box holds the body with its margins; body.scrollHeight also
      // counts floats that stick out of it.
      var margin = inner.top - outer.top;
      var height = Math.max(outer.height, body.scrollHeight + 2 * margin);
      if (html.scrollWidth > html.clientWidth) { height += 18; }   // a horizontal scroll bar
      var border = frame.offsetHeight - frame.clientHeight;
      frame.style.height = Math.min(FRAME_MAX, Math.ceil(height + border)) + "px";
      frame.classList.add("fitted");
    }
    function loaded() {
      fit();
      var doc = frame.contentDocument;
      // Later changes of the mail's size (a narrower window) refit it too.
      if (window.ResizeObserver && doc && doc.body) { new ResizeObserver(fit).observe(doc.body); }
    }
    frame.addEventListener("load", loaded);
    window.addEventListener("resize", fit);
    var doc = frame.contentDocument;   // it may have loaded before this script ran
    if (doc && doc.readyState === "complete" && doc.URL !== "about:blank") { loaded(); }
  }
  document.querySelectorAll("iframe.mail-frame").forEach(fitFrame);

  var hero = document.querySelector("[data-inbox-url]");
  if (!hero) { return; }

  var T = document.getElementById("ui-text").dataset;
  var inboxUrl = hero.getAttribute("data-inbox-url");
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
  var search = document.getElementById("search");
  var noMatch = document.getElementById("no-match");
  var pager = document.getElementById("pager");
  var params = new URLSearchParams(window.location.search);
  var query = params.get("q") || "";
  var pageNo = Number(params.get("page")) || 1;
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
    label.textContent = T.copied;
    setTimeout(function () { btn.classList.remove("copied"); label.textContent = T.copyLabel; }, 1800);
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

  /* ---- live list: conditional polling, 304 while nothing changed ---- */
  function setLive(state, text) {
    live.classList.remove("on", "off");
    live.classList.add(state);
    live.querySelector(".live-text").textContent = text;
  }

  function listUrl() {
    var q = new URLSearchParams();
    if (query) { q.set("q", query); }
    if (pageNo > 1) { q.set("page", pageNo); }
    var rest = q.toString();
    return inboxUrl + (rest ? "?" + rest : "");
  }

  function poll() {
    if (document.hidden) { return schedule(); }
    var headers = { "Accept": "application/json" };
    if (etag) { headers["If-None-Match"] = etag; }
    var asked = listUrl();
    fetch(asked, { headers: headers, cache: "no-store", credentials: "same-origin" })
      .then(function (resp) {
        if (resp.status === 304) { setLive("on", T.live); return null; }
        if (resp.status === 404) { window.location.reload(); return null; }
        if (!resp.ok) { throw new Error("HTTP " + resp.status); }
        etag = resp.headers.get("ETag");
        return resp.json();
      })
      .then(function (data) {
        if (data && asked === listUrl()) { render(data); setLive("on", T.live); }
      })
      .catch(function () { setLive("off", T.reconnecting); })
      .then(schedule);
  }

  // One pending timer at most, however many fetches finish.
  function schedule() { clearTimeout(timer); timer = setTimeout(poll, POLL_MS); }
  function pollNow() { clearTimeout(timer); poll(); }
  document.addEventListener("visibilitychange", function () { if (!document.hidden) { pollNow(); } });

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
    count.textContent = data.total;
    empty.hidden = data.messages.length > 0 || !!data.q;
    noMatch.hidden = data.messages.length > 0 || !data.q;
    pageNo = data.page;
    renderPager(data);
    document.title = (unreadCount(data.messages) ? "(" + unreadCount(data.messages) + ") " : "") +
      data.address + " · " + document.title.split(" · ").pop();
  }

  function renderPager(data) {
    pager.hidden = data.pages <= 1;
    document.getElementById("pager-range").textContent = T.range
      .replace("{first}", data.first).replace("{last}", data.last).replace("{total}", data.total);
    var newer = document.getElementById("pager-newer"), older = document.getElementById("pager-older");
    newer.hidden = data.page <= 1;
    older.hidden = data.page >= data.pages;
    newer.href = data.newer_url;
    older.href = data.older_url;
  }

  // Searching and paging reload only the list; the address bar follows, so a
  // reload (or the page without JavaScript) shows the same list.
  function showList(q, n) {
    query = q;
    pageNo = n;
    etag = null;
    var here = new URLSearchParams(window.location.search);
    here.delete("q"); here.delete("page");
    if (q) { here.set("q", q); }
    if (n > 1) { here.set("page", n); }
    var rest = here.toString();
    window.history.replaceState(null, "", window.location.pathname + (rest ? "?" + rest : ""));
    pollNow();
  }

  var typing = null;
  search.addEventListener("input", function () {
    clearTimeout(typing);
    typing = setTimeout(function () { showList(search.value.trim(), 1); }, 300);
  });
  search.form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    clearTimeout(typing);
    showList(search.value.trim(), 1);
  });
  pager.addEventListener("click", function (ev) {
    var link = ev.target.closest("a");
    if (!link || ev.ctrlKey || ev.metaKey || ev.shiftKey) { return; }
    ev.preventDefault();
    showList(query, pageNo + (link.id === "pager-older" ? 1 : -1));
    list.scrollTop = 0;
  });

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
    if (!m.is_read) { subject.appendChild(el("span", "visually-hidden", T.unread)); }
    subject.appendChild(document.createTextNode(m.subject || T.noSubject));
    a.append(dot, el("span", "from", m.from_name || m.from_email || T.unknownSender), when, subject);
    if (m.attachments) {
      var clip = el("span", "clip");
      clip.title = T.hasAttachments;
      clip.innerHTML = CLIP_SVG;  // a constant, never mail data
      clip.appendChild(el("span", "visually-hidden", T.hasAttachments));
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
        reader.querySelectorAll("iframe.mail-frame").forEach(fitFrame);
        if (focus) { reader.focus(); }
        if (window.matchMedia("(max-width: 760px)").matches) { reader.scrollIntoView({ behavior: "smooth" }); }
        markActive(reader.querySelector("[data-message-id]").getAttribute("data-message-id"));
        etag = null;           // the read mark changed the list
        pollNow();
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
      var gone = el("div", "reader-empty");
      gone.appendChild(el("p", null, T.deleted));
      reader.textContent = "";
      reader.appendChild(gone);
      etag = null;
      pollNow();
    }).catch(function () { form.submit(); });
  });

  // Destructive forms ask first; without JavaScript they simply submit.
  document.addEventListener("submit", function (ev) {
    var question = ev.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { ev.preventDefault(); }
  });

  poll();
}());
