// The review page: one product at a time from a page of 100 (the server pages and filters).
// Every text reaches the page through textContent, never as HTML.
"use strict";

const view = { page: 1, pages: 1, items: [], index: 0, asking: null, renders: 0, counts: {}, reasons: [] };
const $ = (id) => document.getElementById(id);

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function say(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function current() { return view.items[view.index]; }

async function load(page, index) {
  const query = new URLSearchParams({ page: String(page), state: $("state-filter").value, reason: $("reason-filter").value });
  const data = await api(`/api/products?${query}`);
  view.page = data.page; view.pages = data.pages; view.items = data.items;
  view.index = Math.max(0, Math.min(index, data.items.length - 1));
  $("page-info").textContent = `${data.total} products, page ${data.page} of ${data.pages}`;
  tally(data);
  render();
}

function tally(data) {
  view.counts = data.counts;
  view.reasons = data.reasons;
  showTally();
}

function showTally() {
  $("counts").textContent = Object.entries(view.counts).filter(([, n]) => n).map(([s, n]) => `${s} ${n}`).join(" · ");
  reasons(view.reasons);
}

function reasons(found) {
  const filter = $("reason-filter"), chosen = filter.value, list = $("reasons");
  filter.replaceChildren(element("option", "every reason"));
  filter.firstChild.value = "";
  list.replaceChildren();
  for (const [reason, count] of found) {
    const option = element("option", `${reason} (${count})`);
    option.value = reason;
    filter.appendChild(option);
    const pick = element("option");
    pick.value = reason;
    list.appendChild(pick);
  }
  if (chosen && !found.some(([reason]) => reason === chosen)) {
    const option = element("option", chosen);
    option.value = chosen;
    filter.appendChild(option);
  }
  filter.value = chosen;
}

function render() {
  const list = $("list");
  list.replaceChildren();
  view.items.forEach((item, i) => {
    const li = element("li", null, i === view.index ? "current" : "");
    li.dataset.id = item.id;
    li.dataset.state = item.state;
    li.appendChild(element("span", item.id, "id"));
    li.appendChild(element("span", item.state, `state ${item.state}`));
    li.addEventListener("click", () => { view.index = i; render(); });
    list.appendChild(li);
  });
  const current = list.children[view.index];
  if (current) current.scrollIntoView({ block: "nearest" });
  detail(view.items[view.index]);
  document.body.dataset.rendered = String(++view.renders);
}

function figure(candidate, large) {
  const box = element("figure");
  box.dataset.variant = String(candidate.variant);
  const button = element("button");
  button.type = "button";
  button.title = `ship variant ${candidate.variant} (key ${candidate.variant + 1})`;
  if (candidate.image) {
    const img = element("img");
    img.src = candidate.image.split("/").map(encodeURIComponent).join("/");
    img.alt = `variant ${candidate.variant}`;
    button.appendChild(img);
  } else {
    button.appendChild(element("span", candidate.error || candidate.status));
  }
  button.addEventListener("click", () => act(String(candidate.variant + 1)));
  box.appendChild(button);
  const caption = element("figcaption");
  caption.appendChild(element("kbd", candidate.variant + 1));
  caption.appendChild(document.createTextNode(` variant ${candidate.variant}`));
  if (candidate.rank !== null) caption.appendChild(document.createTextNode(` · rank ${candidate.rank}`));
  caption.appendChild(element("span", candidate.state, `state ${candidate.state}`));
  for (const [name, value] of Object.entries(candidate.scores)) {
    caption.appendChild(element("div", `${name} ${Number(value).toFixed(2)}`, "score"));
  }
  if (candidate.reason && !large) caption.appendChild(element("div", candidate.reason, "reason"));
  box.appendChild(caption);
  return box;
}

function detail(item) {
  const section = $("detail");
  section.dataset.id = item ? item.id : "";
  section.dataset.state = item ? item.state : "";
  $("product-id").textContent = item ? item.id : "no products match these filters";
  $("product-state").textContent = item ? item.state : "";
  $("product-state").className = item ? `state ${item.state}` : "state";
  $("product-reason").textContent = item && item.reason ? item.reason : "";
  $("product-by").textContent = item && item.by ? `by ${item.by}${item.at ? " at " + item.at : ""}` : "";
  $("main").replaceChildren();
  $("alternates").replaceChildren();
  for (const id of ["prompt-before", "prompt-after", "caption"]) $(id).textContent = "";
  $("photo").hidden = true;
  if (!item) return;
  const main = item.candidates.find((c) => c.variant === item.main) || item.candidates[0];
  $("main").appendChild(figure(main, true));
  $("main").dataset.variant = String(main.variant);
  for (const candidate of item.candidates) {
    if (candidate !== main) $("alternates").appendChild(figure(candidate, false));
  }
  $("prompt-before").textContent = main.before || "";
  $("prompt-after").textContent = main.after && main.after !== main.before ? main.after : "(unchanged)";
  $("caption").textContent = main.caption || "";
  if (item.photo) {
    $("photo-img").src = item.photo;
    $("photo").hidden = false;
  }
}

// A decision's answer is the product alone: the counts and reasons follow it here (a page load
// counts them again, other reviewers' decisions included).
function replace(product) {
  const i = view.items.findIndex((item) => item.id === product.id);
  if (i < 0) return;
  const old = view.items[i];
  view.items[i] = product;
  view.counts[old.state] = (view.counts[old.state] || 1) - 1;
  view.counts[product.state] = (view.counts[product.state] || 0) + 1;
  const counted = (reason) => view.reasons.find(([r]) => r === reason);
  if (old.reason && counted(old.reason)) counted(old.reason)[1] -= 1;
  if (product.reason) {
    if (counted(product.reason)) counted(product.reason)[1] += 1;
    else view.reasons.push([product.reason, 1]);
  }
  view.reasons = view.reasons.filter(([, n]) => n > 0);
  showTally();
}

async function decide(kind, variant, extra) {
  const item = current();
  if (!item) return;
  const candidate = item.candidates.find((c) => c.variant === variant);
  if (!candidate) { say(`${item.id} has no variant ${variant}`, true); return; }
  try {
    const data = await api("/api/decide", { id: item.id, decision: kind, variant, key: candidate.key, ...extra });
    replace(data.product);
    say(`${kind} ${item.id} variant ${variant}: saved by ${data.decision.reviewer}`);
  } catch (error) {
    say(`${kind} ${item.id}: ${error.message}`, true);
  }
  render();
}

async function undo() {
  try {
    const data = await api("/api/undo", {});
    replace(data.product);
    const i = view.items.findIndex((item) => item.id === data.product.id);
    if (i >= 0) view.index = i;
    say(`undid ${data.decision.undoes} (${data.product.id}): ${data.product.state}`);
  } catch (error) {
    say(`undo: ${error.message}`, true);
  }
  render();
}

function ask(label, then) {
  view.asking = then;
  $("ask-label").textContent = label;
  $("ask-input").value = "";
  $("ask").hidden = false;
  $("ask-input").focus();
}

function closeAsk() {
  view.asking = null;
  $("ask").hidden = true;
}

async function move(step) {
  const next = view.index + step;
  if (next >= 0 && next < view.items.length) { view.index = next; render(); return; }
  if (step > 0 && view.page < view.pages) await load(view.page + 1, 0);
  else if (step < 0 && view.page > 1) await load(view.page - 1, Number.MAX_SAFE_INTEGER);
}

async function act(key) {
  const item = current();
  if (key === "j") return move(1);
  if (key === "k") return move(-1);
  if (key === "u") return undo();
  if (!item) return;
  if (key === "a") return decide("approve", item.main, {});
  if (key === "r") return ask(`Reject ${item.id}: reason`, (text) => decide("reject", item.main, { reason: text }));
  if (key === "g") return ask(`Regenerate ${item.id}: note for the prompt (optional)`, (text) => decide("regenerate", item.main, { note: text }));
  if (/^[1-9]$/.test(key)) return decide("choose", Number(key) - 1, {});
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (view.asking) {
    if (event.key === "Escape") { event.preventDefault(); closeAsk(); }
    return;
  }
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  const key = event.key.toLowerCase();
  if (/^[argujk1-9]$/.test(key)) {
    event.preventDefault();
    act(key);
  }
});

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const then = view.asking, text = $("ask-input").value.trim();
  closeAsk();
  if (then) then(text);
});
$("ask-cancel").addEventListener("click", closeAsk);
for (const button of document.querySelectorAll("#actions button")) {
  button.addEventListener("click", () => act(button.dataset.key));
}
for (const id of ["state-filter", "reason-filter"]) {
  $(id).addEventListener("change", () => { $(id).blur(); load(1, 0); });
}
$("prev-page").addEventListener("click", () => view.page > 1 && load(view.page - 1, 0));
$("next-page").addEventListener("click", () => view.page < view.pages && load(view.page + 1, 0));
load(1, 0).catch((error) => say(`cannot load the products: ${error.message}`, true));
