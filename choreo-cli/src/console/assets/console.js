// choreo console: live updates and filtering. Every page reads without
// this script; with it, a page that names a live stream (data-live) swaps
// in the parts each server-sent event carries, by element id.
"use strict";
(function () {
  function filterRows() {
    document.querySelectorAll("input[data-filters]").forEach(function (input) {
      var body = document.getElementById(input.dataset.filters);
      if (!body) return;
      var needle = input.value.trim().toLowerCase();
      body.querySelectorAll("tr").forEach(function (row) {
        row.hidden = needle !== "" && row.textContent.toLowerCase().indexOf(needle) < 0;
      });
    });
  }
  document.querySelectorAll("input[data-filters]").forEach(function (input) {
    input.addEventListener("input", filterRows);
  });
  var live = document.body.dataset.live;
  if (!live || !window.EventSource) return;
  var source = new EventSource(live);
  source.onmessage = function (e) {
    var parts = JSON.parse(e.data);
    Object.keys(parts).forEach(function (id) {
      var el = document.getElementById(id);
      if (el && el.innerHTML !== parts[id]) el.innerHTML = parts[id];
    });
    filterRows();
    document.body.dataset.updated = String(Date.now());
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
  };
})();
