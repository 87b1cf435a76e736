// The gallery of report.html: filters over the per-row codes in report-data/index.js, then draws one
// page of rows from the chunk files it needs (loaded with <script>, which works under file://).
(function () {
  "use strict";

  const report = window.catalogenReport;
  const rowsBox = document.getElementById("rows");
  const $ = function (id) { return document.getElementById(id); };

  if (!report) {
    rowsBox.innerHTML = '<p id="load-error">report-data/index.js could not be loaded: keep it beside report.html.</p>';
    return;
  }

  const codeOf = {};
  Object.keys(report.codes).forEach(function (code) { codeOf[report.codes[code]] = code; });
  const chunkLoads = {};
  const reviewCodeOf = {};
  Object.keys(report.reviewCodes).forEach(function (code) { reviewCodeOf[report.reviewCodes[code]] = code; });
  const view = { status: "", stage: "", reason: "", review: "", page: 0, pageRows: report.pageRows, matches: null };

  // --- filtering ------------------------------------------------------------------------------

  function rowMatches(i, wanted) {
    if (view.reason !== "" && report.reasonOf[i] !== Number(view.reason)) {
      return false;
    }
    if (view.review !== "" && report.review[i] !== reviewCodeOf[view.review]) {
      return false;
    }
    if (!wanted) {
      return true;
    }
    if (view.stage) {
      return report.stageStatus[view.stage][i] === wanted;
    }
    if (report.status[i] === wanted) {
      return true;
    }
    // fallback and degenerate are per-stage statuses: a row has them when any stage does
    return report.stages.some(function (s) { return report.stageStatus[s][i] === wanted; });
  }

  function filterRows() {
    const wanted = view.status ? codeOf[view.status] : "";
    const matches = new Int32Array(report.rows);
    let n = 0;
    for (let i = 0; i < report.rows; i++) {
      if (rowMatches(i, wanted)) {
        matches[n++] = i;
      }
    }
    view.matches = matches.subarray(0, n);
  }

  // --- loading chunks -------------------------------------------------------------------------

  function chunkPath(k) {
    return "report-data/rows-" + String(k).padStart(5, "0") + ".js";
  }

  function loadChunk(k) {
    const loaded = window.catalogenChunks && window.catalogenChunks[k];
    if (loaded) {
      return Promise.resolve(loaded);
    }
    if (!chunkLoads[k]) {
      chunkLoads[k] = new Promise(function (resolve, reject) {
        const script = document.createElement("script");
        script.src = chunkPath(k);
        script.onload = function () { resolve(window.catalogenChunks[k]); };
        script.onerror = function () {
          delete chunkLoads[k];
          reject(new Error(chunkPath(k) + " could not be loaded"));
        };
        document.head.appendChild(script);
      });
    }
    return chunkLoads[k];
  }

  function rowsOf(indices) {
    const needed = new Set();
    indices.forEach(function (i) { needed.add(Math.floor(i / report.chunkRows)); });
    return Promise.all(Array.from(needed, loadChunk)).then(function () {
      return Array.from(indices, function (i) {
        return window.catalogenChunks[Math.floor(i / report.chunkRows)][i % report.chunkRows];
      });
    });
  }

  // --- drawing --------------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined && text !== null) {
      node.textContent = String(text);
    }
    return node;
  }

  function figure(image, stage, status) {
    const fig = el("figure");
    if (image && image.thumb) {
      const link = el("a");
      link.href = image.src;
      const img = el("img", "thumb");
      img.loading = "lazy";
      img.decoding = "async";
      img.width = 192;
      img.height = 192;
      img.alt = stage + " image";
      img.src = image.thumb;
      link.appendChild(img);
      fig.appendChild(link);
    } else {
      fig.appendChild(el("div", "placeholder", image ? "image missing" : "no image"));
    }
    const label = stage + " · " + (status || "no result");
    fig.appendChild(el("figcaption", null, image && image.w ? label + " · " + image.w + "×" + image.h : label));
    return fig;
  }

  function copyText(text, button) {
    function done() {
      button.textContent = "copied";
      button.classList.add("done");
      setTimeout(function () { button.textContent = "copy"; button.classList.remove("done"); }, 1500);
    }
    function fallback() {
      // execCommand works where the clipboard API is not offered (older browsers, some file:// setups)
      const area = el("textarea");
      area.value = text;
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.appendChild(area);
      area.select();
      const ok = document.execCommand("copy");
      document.body.removeChild(area);
      if (ok) {
        done();
      } else {
        button.textContent = "select and copy by hand";
      }
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, fallback);
    } else {
      fallback();
    }
  }

  function field(list, name, value, className) {
    if (value === null || value === undefined || value === "") {
      return;
    }
    list.appendChild(el("dt", null, name));
    list.appendChild(el("dd", className, value));
  }

  function rowCard(row) {
    const card = el("article", "row st-" + row.s);
    card.dataset.id = row.id;
    card.dataset.status = row.s;
    card.dataset.review = row.rv || "";
    const head = el("header");
    head.appendChild(el("span", "badge " + row.s, row.s));
    head.appendChild(el("span", "id", row.id));
    head.appendChild(el("span", "muted", "variant " + row.v));
    if (row.seed) {
      head.appendChild(el("span", "muted seed", "seed " + row.seed));
    }
    if (row.at) {
      head.appendChild(el("span", "muted", "last stage " + row.at));
    }
    card.appendChild(head);

    const images = el("div", "images");
    report.imageStages.forEach(function (name, k) {
      // "remove_bg.canvas": another image of a stage, labelled with that stage's status
      images.appendChild(figure(row.img[k], name, row.ss[report.stages.indexOf(name.split(".")[0])]));
    });
    if (report.imageStages.length) {
      card.appendChild(images);
    }

    const fields = el("dl", "fields");
    field(fields, "prompt before", row.before, "before");
    field(fields, row.before ? "prompt after" : "prompt", row.after, "after");
    field(fields, "negative", row.neg);
    field(fields, "caption", row.cap, "caption");
    field(fields, "near-duplicate of", row.dup, "duplicate");
    field(fields, "review", row.rv ? [row.rv, row.rr, row.rb ? "by " + row.rb : ""].filter(Boolean).join(" · ") : "", "review");
    field(fields, "error", row.e, "error");
    if (row.se) {
      Object.keys(row.se).forEach(function (stage) {
        if (!row.e || row.e.indexOf(stage + ": ") !== 0) {
          field(fields, stage + " note", row.se[stage], "error");
        }
      });
    }
    card.appendChild(fields);

    if (row.par) {
      const params = el("div", "params");
      params.appendChild(el("pre", "parameters", row.par));
      const button = el("button", "copy", "copy");
      button.type = "button";
      button.title = "Copy the parameters (A1111 format)";
      button.addEventListener("click", function () { copyText(row.par, button); });
      params.appendChild(button);
      card.appendChild(params);
    }
    return card;
  }

  function pageCount() {
    return Math.max(1, Math.ceil(view.matches.length / view.pageRows));
  }

  function updatePager() {
    const pages = pageCount();
    const first = view.page * view.pageRows;
    const last = Math.min(first + view.pageRows, view.matches.length);
    $("page-count").textContent = pages.toLocaleString("en");
    $("page-number").value = view.page + 1;
    $("page-number").max = pages;
    $("page-first").disabled = $("page-prev").disabled = view.page === 0;
    $("page-next").disabled = $("page-last").disabled = view.page >= pages - 1;
    $("shown").textContent = view.matches.length
      ? "rows " + (first + 1).toLocaleString("en") + "–" + last.toLocaleString("en") + " of " +
        view.matches.length.toLocaleString("en") + (view.matches.length < report.rows ? " (filtered from " + report.rows.toLocaleString("en") + ")" : "")
      : "no row matches";
  }

  let drawing = 0;
  function draw() {
    const ticket = ++drawing;
    view.page = Math.min(Math.max(0, view.page), pageCount() - 1);
    updatePager();
    saveHash();
    const first = view.page * view.pageRows;
    const indices = view.matches.subarray(first, first + view.pageRows);
    return rowsOf(indices).then(function (rows) {
      if (ticket !== drawing) {
        return;  // a newer page was asked for meanwhile
      }
      const fragment = document.createDocumentFragment();
      rows.forEach(function (row) { fragment.appendChild(rowCard(row)); });
      rowsBox.replaceChildren(fragment);
      document.body.dataset.rendered = String(ticket);
    }, function (error) {
      rowsBox.replaceChildren(el("p", null, error.message));
      rowsBox.firstChild.id = "load-error";
    });
  }

  // --- controls and the address's #fragment ----------------------------------------------------

  function saveHash() {
    const params = new URLSearchParams();
    ["status", "stage", "reason", "review"].forEach(function (key) { if (view[key] !== "") { params.set(key, view[key]); } });
    if (view.page) {
      params.set("page", String(view.page + 1));
    }
    if (view.pageRows !== report.pageRows) {
      params.set("per", String(view.pageRows));
    }
    const hash = params.toString();
    if (hash !== location.hash.slice(1)) {
      history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
    }
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    view.status = params.get("status") || "";
    view.stage = report.stages.indexOf(params.get("stage")) >= 0 ? params.get("stage") : "";
    view.reason = params.get("reason") || "";
    view.review = reviewCodeOf[params.get("review")] ? params.get("review") : "";
    view.page = Math.max(0, (parseInt(params.get("page"), 10) || 1) - 1);
    view.pageRows = parseInt(params.get("per"), 10) || report.pageRows;
    $("filter-status").value = view.status;
    $("filter-stage").value = view.stage;
    $("filter-reason").value = view.reason;
    $("filter-review").value = view.review;
    $("page-size").value = String(view.pageRows);
  }

  function refilter() {
    view.status = $("filter-status").value;
    view.stage = $("filter-stage").value;
    view.reason = $("filter-reason").value;
    view.review = $("filter-review").value;
    view.page = 0;
    filterRows();
    return draw();
  }

  function goTo(page) {
    view.page = page;
    draw();
    $("gallery").scrollIntoView();
  }

  function setUp() {
    const reasonSelect = $("filter-reason");
    report.reasons.forEach(function (item, k) {
      const option = el("option", null, "(" + item.rows + ") " + item.reason.slice(0, 90));
      option.value = String(k);
      reasonSelect.appendChild(option);
    });
    ["filter-status", "filter-stage", "filter-reason", "filter-review"].forEach(function (id) { $(id).addEventListener("change", refilter); });
    $("page-size").addEventListener("change", function () {
      view.pageRows = Number($("page-size").value);
      goTo(0);
    });
    $("page-first").addEventListener("click", function () { goTo(0); });
    $("page-prev").addEventListener("click", function () { goTo(view.page - 1); });
    $("page-next").addEventListener("click", function () { goTo(view.page + 1); });
    $("page-last").addEventListener("click", function () { goTo(pageCount() - 1); });
    $("page-number").addEventListener("change", function () { goTo(Number($("page-number").value) - 1); });
    document.querySelectorAll("button.reason").forEach(function (button) {
      button.addEventListener("click", function () {
        $("filter-status").value = "";
        $("filter-stage").value = "";
        $("filter-reason").value = button.dataset.reason;
        refilter();
        $("gallery").scrollIntoView();
      });
    });
    readHash();
    filterRows();
    draw();
  }

  setUp();
})();
