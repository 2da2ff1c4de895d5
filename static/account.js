/* API Management: a Copy button for the one-time API key. Without JavaScript
   the key stays selectable text and the button stays hidden. */
(function () {
  "use strict";
  document.querySelectorAll("[data-copy-text]").forEach(function (btn) {
    var source = document.getElementById(btn.getAttribute("data-copy-text"));
    var label = btn.querySelector("span");
    var idle = label.textContent;
    btn.hidden = false;

    function copied() {
      btn.classList.add("copied");
      label.textContent = btn.getAttribute("data-copied");
      setTimeout(function () { btn.classList.remove("copied"); label.textContent = idle; }, 1800);
    }

    // The key sits in a <code> element: select its text for the fallback copy.
    function legacyCopy() {
      var range = document.createRange();
      range.selectNodeContents(source);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      try { document.execCommand("copy"); } catch (e) { /* the selection stays for Ctrl+C */ }
    }

    btn.addEventListener("click", function () {
      var text = source.textContent.trim();
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(copied, function () { legacyCopy(); copied(); });
      } else {
        legacyCopy();
        copied();
      }
    });
  });
}());
