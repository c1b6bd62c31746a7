// The eventstore console: a read-only page over the registry's own JSON API.
// Every value from the registry is put in the page as text (text nodes,
// textContent), never as markup. The credentials live in this tab's
// sessionStorage and go only into the Authorization header of requests to this
// server; never into a URL.
"use strict";

const STORED = "eventstore-console";
const API = new URL(".", location.href);   // the console is served at <mount>/console
const TAIL_LIMIT = 500;                    // events kept in the live tail
let credentials = null;                    // {userId, apiKey}
let running = null;                        // an AbortController for the signed-in session's requests

// --- Building the page from data: text only ------------------------------------------

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function replaceChildren(node, children) {
  node.replaceChildren(...children);
}

function $(id) {
  return document.getElementById(id);
}

// --- Talking to the API ---------------------------------------------------------------

function basic(userId, apiKey) {
  const bytes = new TextEncoder().encode(`${userId}:${apiKey}`);
  return "Basic " + btoa(String.fromCharCode(...bytes));
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
  }
}

// ``path``: a path of the API ("programs"), or a URL the server gave (a page's Next).
async function api(path, signal) {
  const headers = {Accept: "application/json"};
  if (credentials) headers.Authorization = basic(credentials.userId, credentials.apiKey);
  const response = await fetch(path instanceof URL ? path : new URL(path, API), {
    headers, signal, cache: "no-store", credentials: "omit", redirect: "error",
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    if (response.status === 401 && credentials) signOut("The server refused these credentials.");
    throw new ApiError(response.status, body && body.detail);
  }
  return body;
}

// Runs ``task`` now and every ``seconds`` while signed in.
function every(seconds, task) {
  const controller = running;
  const run = () => {
    if (controller !== running) return;
    task(controller.signal).catch(report).finally(() => {
      if (controller === running) setTimeout(run, seconds * 1000);
    });
  };
  run();
}

function report(error) {
  if (error.name !== "AbortError") console.warn(error);
}

// --- Signing in and out -----------------------------------------------------------------

async function signIn(userId, apiKey) {
  credentials = {userId, apiKey};
  try {
    await api("programs");
  } catch (error) {
    credentials = null;
    sessionStorage.removeItem(STORED);
    $("sign-in-error").textContent = error.status === 401 ? "Wrong user id or key." : `Could not sign in: ${error.message}`;
    return;
  }
  sessionStorage.setItem(STORED, JSON.stringify(credentials));
  $("sign-in-error").textContent = "";
  $("api-key").value = "";
  $("who-name").textContent = `Signed in as ${userId}`;
  $("who").hidden = false;
  $("sign-in").hidden = true;
  $("console").hidden = false;
  start();
}

function signOut(message) {
  if (running) running.abort();
  running = null;
  credentials = null;
  sessionStorage.removeItem(STORED);
  for (const id of ["health", "type-chart", "tail"]) replaceChildren($(id), []);
  for (const id of ["programs", "subscriptions"]) replaceChildren($(id).tBodies[0], []);
  $("who").hidden = true;
  $("console").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-error").textContent = message || "";
}

function start() {
  running = new AbortController();
  every(10, showHealth);
  every(60, showPrograms);
  every(30, showTypes);
  every(15, showSubscriptions);
  follow();
}

// --- Health, programs, event types, subscriptions ---------------------------------------

async function showHealth(signal) {
  let health;
  try {
    health = await api("health", signal);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    health = {status: `unavailable (${error.status || "no answer"})`, detail: error.message};
  }
  replaceChildren($("health"), Object.entries(health).flatMap(([name, value]) => [
    el("dt", {}, name), el("dd", {"data-field": name, class: name === "status" && value === "ok" ? "ok" : ""},
                           typeof value === "object" ? JSON.stringify(value) : value)]));
}

async function showPrograms(signal) {
  const {Programs} = await api("programs", signal);
  replaceChildren($("programs").tBodies[0], Programs.map(program => el("tr", {"data-program": program.ProgramId},
    el("td", {}, program.ProgramId), el("td", {}, program.Name ?? ""), el("td", {}, program.Access ?? ""),
    el("td", {}, program.RegisteredEventTypesOnly ? "registered only" : "any"))));
}

async function showTypes(signal) {
  const {EventTypes} = await api("event-types", signal);
  const most = Math.max(1, ...EventTypes.flatMap(type => type.Programs.map(p => p.Events)));
  const rows = EventTypes.map(type => el("div", {class: "type", "data-type": type.EventType},
    el("div", {class: "type-name"}, type.EventType, type.Registered ? null : el("span", {class: "hint"}, " unregistered")),
    type.Description ? el("div", {class: "type-description"}, type.Description) : null,
    ...type.Programs.map(program => {
      const bar = el("span", {class: "bar"});
      bar.style.width = `${(100 * program.Events / most).toFixed(2)}%`;   // CSSOM: no inline style attribute
      return el("div", {class: "bar-row", "data-program": program.ProgramId, "data-events": program.Events},
        el("span", {class: "bar-label"}, program.ProgramId), el("span", {class: "bar-track"}, bar),
        el("span", {class: "bar-count"}, program.Events));
    })));
  replaceChildren($("type-chart"), rows.length ? rows : [el("p", {class: "note"}, "No event types yet.")]);
}

async function showSubscriptions(signal) {
  let listing;
  try {
    listing = await api("subscriptions", signal);
  } catch (error) {
    if (error.status === 404) {
      $("subscriptions-note").textContent = "This server keeps no subscriptions.";
      return;
    }
    throw error;
  }
  const rows = listing.Subscriptions.map(s => el("tr", {"data-subscription": s.Name},
    el("td", {}, s.Name), el("td", {}, s.Owner), el("td", {}, s.Position),
    el("td", {class: "behind"}, `${s.Behind}${s.BehindIsExact === false ? "+" : ""}`),
    el("td", {}, s.PendingSinceUTC ?? "-"),
    el("td", {}, s.Webhook ? s.Webhook.State : "read by its consumer"),
    el("td", {class: "error"}, (s.Webhook && s.Webhook.LastError) || "")));
  replaceChildren($("subscriptions").tBodies[0], rows);
  $("subscriptions-note").textContent = rows.length ? "" : "No subscriptions.";
}

// --- The live tail: the feed, long-polled ---------------------------------------------

let tailController = null;

function tailQuery() {
  const query = new URLSearchParams();
  const list = text => text.split(",").map(part => part.trim()).filter(Boolean);
  for (const program of list($("filter-program").value)) query.append("ProgramId", program);
  for (const type of list($("filter-type").value)) query.append("EventType", type);
  if ($("filter-member").value) query.append("ProgramMemberId", $("filter-member").value);
  query.append("limit", "100");
  query.append("after", $("filter-from").value);
  return query;
}

async function follow() {
  if (tailController) tailController.abort();
  const controller = tailController = new AbortController();
  const session = running;
  // Removed with this tail (its own signal): a new filter's tail does not pile up listeners.
  session.signal.addEventListener("abort", () => controller.abort(), { signal: controller.signal });
  replaceChildren($("tail"), []);
  let next = new URL(`events?${tailQuery()}`, API);
  let failures = 0;
  while (!controller.signal.aborted) {
    try {
      const page = await api(next, controller.signal);
      failures = 0;
      showEvents(page.Events);
      next = new URL(page.Next, location.origin);
      setTailStatus("live", `Following, after Sequence ${next.searchParams.get("after")}.`);
      if (!page.HasMore) next.searchParams.set("wait", "25");
    } catch (error) {
      if (controller.signal.aborted) return;
      failures += 1;
      setTailStatus("error", `The feed did not answer (${error.message}); trying again.`);
      if (error.status && error.status < 500 && error.status !== 429) return;
      await new Promise(resolve => setTimeout(resolve, Math.min(30, 2 ** failures) * 1000));
    }
  }
}

function setTailStatus(state, text) {
  $("tail-status").dataset.state = state;
  $("tail-status").textContent = text;
}

let typesSoon = null;

function showEvents(events) {
  const tail = $("tail");
  for (const event of events) {
    const summary = el("summary", {},
      el("span", {class: "seq"}, event.Sequence),
      el("span", {class: "time"}, event.UpdatedUTC),
      el("span", {class: "program"}, event.ProgramId),
      el("span", {class: "type-label"}, event.EventType),
      el("span", {class: "event-id"}, event.EventId),
      event.Deleted ? el("span", {class: "deleted"}, "deleted") : el("span", {class: "member"}, event.ProgramMemberId));
    tail.prepend(el("li", {"data-event-id": event.EventId, "data-sequence": event.Sequence},
      el("details", {}, summary, el("pre", {class: "json"}, JSON.stringify(event, null, 2)))));
  }
  while (tail.children.length > TAIL_LIMIT) tail.lastElementChild.remove();
  if (events.length && !typesSoon) {  // the chart and the lags follow the tail, at most once a second
    typesSoon = setTimeout(() => {
      typesSoon = null;
      if (running) {
        showTypes(running.signal).catch(report);
        showSubscriptions(running.signal).catch(report);
      }
    }, 1000);
  }
}

// --- Wiring ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("sign-in-form").addEventListener("submit", event => {
    event.preventDefault();
    signIn($("user-id").value.trim(), $("api-key").value.trim());
  });
  $("sign-out").addEventListener("click", () => signOut());
  $("tail-filters").addEventListener("submit", event => {
    event.preventDefault();
    if (running) follow();
  });
  const stored = sessionStorage.getItem(STORED);
  if (stored) {
    const {userId, apiKey} = JSON.parse(stored);
    signIn(userId, apiKey);
  }
});
