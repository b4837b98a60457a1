// Events: identity events as they happen (WebSocket), filled first from the server's recent-events ring.
// The list is bounded (MAX_EVENTS) so a busy camera cannot grow the page without end.
import { api } from "./api.js";
import { h, when, flash } from "./dom.js";

const MAX_EVENTS = 300;
const RETRY_MS = 2000;
const ALL = "";
const UNKNOWN = "\u0000unknown";  // filter values no gallery name can be
const KNOWN = "\u0000known";

export function mount(view) {
  const message = h("div", { class: "messages" });
  const state = h("span", { class: "badge", testid: "events-connection", "data-status": "connecting" }, "connecting…");
  const camera = h("select", { testid: "filter-camera" }, h("option", { value: ALL }, "All cameras"));
  const person = h("select", { testid: "filter-person" }, h("option", { value: ALL }, "Everyone"),
    h("option", { value: KNOWN }, "Known people only"), h("option", { value: UNKNOWN }, "Unknown faces"));
  const list = h("ol", { class: "events", testid: "events" });
  const empty = h("p", { class: "empty" }, "No identity event yet.");
  view.append(
    h("h1", {}, "Events ", state),
    message,
    h("div", { class: "filters" }, h("label", {}, "Camera", camera), h("label", {}, "Person", person)),
    empty,
    list,
  );

  const events = new Map();  // seq -> event, at most MAX_EVENTS (the newest)
  let filled = false;
  let stopped = false;
  let socket = null;
  let retry = null;
  let reconnecting = false;

  function addOption(select, value, label = value) {
    if ([...select.options].some((o) => o.value === value)) return;
    select.append(h("option", { value }, label));
  }

  function matches(event) {
    if (camera.value !== ALL && event.stream !== camera.value) return false;
    if (person.value === UNKNOWN) return event.name === null;
    if (person.value === KNOWN) return event.name !== null;
    return person.value === ALL || event.name === person.value;
  }

  function row(event) {
    const name = event.name === null ? "unknown" : event.name;
    // An unknown face keeps its stranger label (u-3) across tracks: worth showing to tell strangers apart.
    const label = event.name === null && event.stranger ? `unknown · ${event.stranger}` : name;
    return h("li", { class: event.name === null ? "event unknown" : "event", testid: "event-row",
      "data-seq": event.seq, "data-stream": event.stream, "data-name": name },
      h("span", { class: "who" }, label),
      h("span", { class: "where" }, event.stream),
      h("time", { datetime: new Date(event.ts * 1000).toISOString() }, when(event.ts)),
      h("span", { class: "score", title: "confidence of the decision" }, `score ${Number(event.score).toFixed(2)}`),
      h("span", { class: "track" }, `track ${event.track}`));
  }

  function renderAll() {
    const shown = [...events.values()].sort((a, b) => b.seq - a.seq).filter(matches);
    list.replaceChildren(...shown.map(row));
    empty.hidden = shown.length > 0;
  }

  function trim() {
    if (events.size <= MAX_EVENTS) return;
    const old = [...events.keys()].sort((a, b) => a - b).slice(0, events.size - MAX_EVENTS);
    for (const seq of old) events.delete(seq);
    for (const li of [...list.children]) if (!events.has(Number(li.dataset.seq))) li.remove();
  }

  // Returns true when the event is new.
  function remember(event) {
    if (!event || event.kind !== "identity" || events.has(event.seq)) return false;
    events.set(event.seq, event);
    addOption(camera, event.stream);
    if (event.name !== null) addOption(person, event.name);
    return true;
  }

  function onLive(event) {
    if (!remember(event)) return;
    trim();
    if (!filled || !matches(event) || !events.has(event.seq)) return;
    // Newest first; an event older than the top (rare: reordering) just triggers a full render.
    const top = list.firstElementChild;
    if (top && Number(top.dataset.seq) > event.seq) renderAll();
    else list.prepend(row(event));
    empty.hidden = true;
  }

  async function fill() {
    const newest = Math.max(0, ...events.keys());
    const query = newest && filled ? `&after_seq=${newest}` : "";
    try {
      const body = await api(`/api/v1/events?kind=identity&limit=${MAX_EVENTS}${query}`);
      for (const event of body.events || []) remember(event);
      trim();
    } catch (error) {
      if (!stopped) flash(message, error.message);
    } finally {
      filled = true;  // live events render from now on, even when the ring could not be read
      if (!stopped) renderAll();
    }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/api/v1/events/ws?kind=identity`);
    socket.addEventListener("open", () => {
      state.textContent = "live";
      state.dataset.status = "connected";
      if (reconnecting) fill();  // what happened while the socket was down
    });
    socket.addEventListener("message", (msg) => {
      try {
        onLive(JSON.parse(msg.data));
      } catch {
        // not an event: ignore rather than break the list
      }
    });
    socket.addEventListener("close", () => {
      if (stopped) return;
      state.textContent = "reconnecting…";
      state.dataset.status = "lost";
      reconnecting = true;
      retry = setTimeout(connect, RETRY_MS);
    });
  }

  camera.addEventListener("change", renderAll);
  person.addEventListener("change", renderAll);
  // People with no event yet can still be chosen.
  api("/api/v1/people").then((body) => {
    for (const p of (body && body.people) || []) addOption(person, p.name);
  }).catch(() => {});
  fill();
  connect();

  return () => {
    stopped = true;
    clearTimeout(retry);
    if (socket) socket.close();
  };
}
