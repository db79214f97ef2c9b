// The dashboard's only script (served from the package: the CSP allows no inline script).
// 1. Every <time datetime> shows the browser's local time on hover (its text stays UTC).
// 2. Live refresh: pages marked <main data-refresh="SECONDS"> reload their content in place every few
//    seconds, unless paused (the header's button; remembered in this browser), a form field has the
//    focus, or a row is selected (a refresh never throws away what the user is doing).
(function () {
  "use strict";

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) {
        el.title = when.toLocaleString() + " (your local time)";
      }
    });
  }

  var PAUSED = "outbox-dashboard-paused";
  function paused() {
    return window.localStorage && localStorage.getItem(PAUSED) === "1";
  }

  function busy(main) {
    var active = document.activeElement;
    if (active && active !== document.body && main.contains(active) && /INPUT|SELECT|TEXTAREA/.test(active.tagName)) {
      return true;
    }
    return document.querySelector("input[type=checkbox][form]:checked") !== null;
  }

  function refresh(main, status) {
    if (paused() || busy(main) || document.hidden) {
      return;
    }
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Outbox-Refresh": "1" } })
      .then(function (answer) {
        if (!answer.ok) {
          throw new Error(answer.status);
        }
        return answer.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("main");
        if (fresh && !busy(main) && !paused()) {
          main.innerHTML = fresh.innerHTML;
          localTimes(main);
          status.textContent = "updated " + new Date().toLocaleTimeString();
        }
      })
      .catch(function (error) {
        status.textContent = "not updated (" + error.message + ")";
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    var main = document.querySelector("main[data-refresh]");
    var button = document.getElementById("live");
    var status = document.getElementById("live-status");
    if (!main || !button || !status) {
      return;
    }
    button.hidden = false;
    function show() {
      button.textContent = paused() ? "Resume live updates" : "Pause live updates";
      button.setAttribute("aria-pressed", paused() ? "true" : "false");
      status.textContent = paused() ? "paused" : "live";
    }
    button.addEventListener("click", function () {
      localStorage.setItem(PAUSED, paused() ? "0" : "1");
      show();
    });
    show();
    var seconds = Math.max(1, parseFloat(main.getAttribute("data-refresh")) || 5);
    window.setInterval(function () {
      refresh(main, status);
    }, seconds * 1000);
  });
})();
