// Code-sample tabs and copy buttons of the API docs. Without JavaScript every
// sample stays visible under its own label, so nothing here is required.
(function () {
  "use strict";
  var STORE = "tempmail.docs.sample";

  function remembered() {
    try { return localStorage.getItem(STORE); } catch (e) { return null; }
  }

  function remember(id) {
    try { localStorage.setItem(STORE, id); } catch (e) { /* private mode: the choice just is not kept */ }
  }

  function select(block, id) {
    var tabs = block.querySelectorAll("[data-tab]");
    var found = false;
    tabs.forEach(function (tab) {
      var on = tab.getAttribute("data-tab") === id;
      found = found || on;
      tab.setAttribute("aria-selected", on ? "true" : "false");
      tab.tabIndex = on ? 0 : -1;
    });
    if (!found) { return select(block, tabs[0].getAttribute("data-tab")); }
    block.querySelectorAll("[data-panel]").forEach(function (panel) {
      panel.hidden = panel.getAttribute("data-panel") !== id;
    });
  }

  // One choice applies to every block: a Python reader wants Python everywhere.
  function selectEverywhere(id) {
    document.querySelectorAll("[data-samples]").forEach(function (block) { select(block, id); });
    remember(id);
  }

  function onKey(event) {
    var tabs = Array.prototype.slice.call(event.currentTarget.querySelectorAll("[data-tab]"));
    var i = tabs.indexOf(document.activeElement);
    if (i < 0 || (event.key !== "ArrowRight" && event.key !== "ArrowLeft")) { return; }
    var next = tabs[(i + (event.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
    selectEverywhere(next.getAttribute("data-tab"));
    next.focus();
    event.preventDefault();
  }

  function copy(button) {
    var code = button.closest("[data-panel]").querySelector("code").textContent;
    navigator.clipboard.writeText(code).then(function () {
      var label = button.textContent;
      button.textContent = button.getAttribute("data-copied");
      setTimeout(function () { button.textContent = label; }, 1500);
    });
  }

  document.querySelectorAll("[data-samples]").forEach(function (block) {
    var list = block.querySelector("[role=tablist]");
    block.classList.add("js");
    list.hidden = false;
    list.addEventListener("keydown", onKey);
    block.querySelectorAll("[data-tab]").forEach(function (tab) {
      tab.addEventListener("click", function () { selectEverywhere(tab.getAttribute("data-tab")); });
    });
    block.querySelectorAll("[data-panel]").forEach(function (panel) { panel.setAttribute("role", "tabpanel"); });
    select(block, remembered() || "curl");
  });
  if (navigator.clipboard) {
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      button.hidden = false;
      button.addEventListener("click", function () { copy(button); });
    });
  }
}());
