// Live: one tile per stream with its annotated MJPEG, a status badge and fps; add and remove streams.
// The <img> holds /live.mjpeg open only while the page is visible: the server encodes frames for a stream
// only while someone watches, so a hidden tab or another view costs the pipeline nothing.
import { api, enc } from "./api.js";
import { h, flash, confirmDialog } from "./dom.js";

const POLL_MS = 2000;
const RETRY_MS = 2000;
const LABELS = {
  connecting: "connecting…",
  connected: "connected",
  lost: "lost · reconnecting…",
  reconnected: "reconnected",
  ended: "ended",
};

export function mount(view) {
  const message = h("div", { class: "messages" });
  const grid = h("div", { class: "tiles", testid: "tiles" });
  const empty = h("p", { class: "empty", hidden: true }, "No stream yet: add a camera or a file below.");
  const url = h("input", { name: "url", required: true, placeholder: "rtsp://camera/stream1 or /path/clip.mp4",
    autocomplete: "off", testid: "stream-url" });
  const id = h("input", { name: "id", placeholder: "id (optional), e.g. entrance",
    autocomplete: "off", testid: "stream-id" });
  const form = h("form", { class: "inline-form", testid: "add-stream" },
    h("label", {}, "Source", url), h("label", {}, "Id", id), h("button", { type: "submit" }, "Add stream"));
  view.append(h("h1", {}, "Live"), message, empty, grid, h("h2", {}, "Add a stream"), form);

  const tiles = new Map();  // stream id -> {el, img, badge, fps, stats, status, retry}
  let stopped = false;
  let timer = null;

  function src(id) {
    return `/api/v1/streams/${enc(id)}/live.mjpeg`;
  }

  function watch(tile) {
    clearTimeout(tile.retry);
    if (stopped || document.hidden) return;
    // A fresh query string makes the browser open a new connection even for the same stream.
    tile.img.src = `${src(tile.id)}?v=${Date.now()}`;
  }

  function unwatch(tile) {
    clearTimeout(tile.retry);
    tile.img.removeAttribute("src");
  }

  function makeTile(stream) {
    const img = h("img", { alt: `live view of ${stream.id}`, testid: `live-${stream.id}`, decoding: "async" });
    const badge = h("span", { class: "badge", testid: `status-${stream.id}` });
    const fps = h("span", { class: "fps", testid: `fps-${stream.id}` });
    const stats = h("span", { class: "stats" });
    const remove = h("button", { type: "button", class: "danger small", testid: `remove-${stream.id}`,
      onclick: () => removeStream(stream.id) }, "Remove");
    const el = h("figure", { class: "tile", testid: `tile-${stream.id}` },
      h("div", { class: "frame" }, img),
      h("figcaption", {}, h("strong", { class: "id" }, stream.id), badge, fps, stats, remove));
    const tile = { id: stream.id, el, img, badge, fps, stats, status: null, retry: null };
    img.addEventListener("error", () => {
      if (!img.getAttribute("src")) return;
      tile.retry = setTimeout(() => watch(tile), RETRY_MS);
    });
    return tile;
  }

  function update(tile, stream) {
    const was = tile.status;
    tile.status = stream.status;
    tile.badge.textContent = LABELS[stream.status] || stream.status;
    tile.badge.dataset.status = stream.status;
    tile.fps.textContent = `${Number(stream.fps || 0).toFixed(1)} fps`;
    tile.stats.textContent = `${stream.frames} frames · ${stream.dropped} dropped · ${stream.reconnects} reconnects`;
    tile.el.title = stream.url;
    // Back from a loss: the old MJPEG connection may have ended with the source, open it again.
    const up = stream.status === "connected" || stream.status === "reconnected";
    if (up && (was === "lost" || was === "ended" || was === "connecting" || !tile.img.getAttribute("src"))) {
      watch(tile);
    }
  }

  function render(streams) {
    const seen = new Set();
    for (const stream of streams) {
      seen.add(stream.id);
      let tile = tiles.get(stream.id);
      if (!tile) {
        tile = makeTile(stream);
        tiles.set(stream.id, tile);
        grid.append(tile.el);
      }
      update(tile, stream);
    }
    for (const [key, tile] of tiles) {
      if (!seen.has(key)) {
        unwatch(tile);
        tile.el.remove();
        tiles.delete(key);
      }
    }
    empty.hidden = tiles.size > 0;
  }

  async function poll() {
    clearTimeout(timer);
    try {
      const body = await api("/api/v1/streams");
      if (!stopped) render(body.streams || []);
    } catch (error) {
      if (!stopped) flash(message, error.message);
    }
    if (!stopped) timer = setTimeout(poll, POLL_MS);
  }

  async function removeStream(streamId) {
    if (!(await confirmDialog(`Remove stream ${streamId}? Its tracks end; the camera itself is not touched.`,
      "Remove"))) return;
    message.replaceChildren();
    try {
      await api(`/api/v1/streams/${enc(streamId)}`, { method: "DELETE" });
      flash(message, `Removed ${streamId}.`, "ok");
      poll();
    } catch (error) {
      flash(message, error.message);
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();  // a sentence left from the last action must not read as this one's answer
    const body = { url: url.value.trim() };
    if (id.value.trim()) body.id = id.value.trim();
    try {
      const added = await api("/api/v1/streams", { method: "POST", json: body });
      flash(message, `Added ${added.id}.`, "ok");
      form.reset();
      poll();
    } catch (error) {
      flash(message, error.message);
    }
  });

  function onVisibility() {
    for (const tile of tiles.values()) {
      if (document.hidden) unwatch(tile);
      else watch(tile);
    }
  }
  document.addEventListener("visibilitychange", onVisibility);
  poll();

  return () => {
    stopped = true;
    clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisibility);
    for (const tile of tiles.values()) unwatch(tile);
  };
}
