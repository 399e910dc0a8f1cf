// ltr-search pages: the only script. Pages work without it; it adds the click beacon and
// keyboard shortcuts. Served from the package (no CDN).
(function () {
  "use strict";

  // Search page: a click on a result goes to POST /events (the same contract as any client),
  // with the request id and the absolute position the page was served with.
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest("a[data-request-id]");
    if (!link || !navigator.sendBeacon) return;
    var position = parseInt(link.dataset.position, 10);
    var body = JSON.stringify({events: [{
      request_id: link.dataset.requestId, type: "click", doc_id: link.dataset.docId, position: position,
      event_id: link.dataset.requestId + ":click:" + position
    }]});
    navigator.sendBeacon("/events", new Blob([body], {type: "application/json"}));
  });

  // Judging: 0-3 grade, s skips, the buttons carry data-key.
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    var tag = (event.target && event.target.tagName) || "";
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
    var button = document.querySelector('[data-key="' + event.key.toLowerCase() + '"]');
    if (!button) return;
    event.preventDefault();
    button.click();
  });
})();
