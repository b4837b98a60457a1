// The console shell: hash routes (#/live, #/events, #/library), the signed-in token's name, logout.
// Each view module exports mount(element) and returns a function that stops its timers and sockets,
// so nothing (a live stream above all: the server encodes frames only while someone watches) runs unseen.
import { api } from "./api.js";
import * as live from "./live.js";
import * as events from "./events.js";
import * as library from "./library.js";

const VIEWS = { live, events, library };
const TITLES = { live: "Live", events: "Events", library: "Face library" };
let unmount = null;

function route() {
  const name = location.hash.replace(/^#\/?/, "").split("?")[0];
  if (!(name in VIEWS)) {
    location.replace("#/live");
    return;
  }
  if (unmount) unmount();
  const view = document.getElementById("view");
  view.replaceChildren();
  view.dataset.view = name;
  document.title = `${TITLES[name]} · streamer`;
  for (const link of document.querySelectorAll("nav a")) {
    link.toggleAttribute("aria-current", link.dataset.route === name);
  }
  unmount = VIEWS[name].mount(view);
}

async function logout() {
  try {
    await api("/api/v1/logout", { method: "POST" });
  } finally {
    location.assign("/login");
  }
}

async function whoAmI() {
  try {
    const me = await api("/api/v1/me");
    document.getElementById("who").textContent = me && me.token ? `token: ${me.token}` : "";
  } catch {
    // shown as nothing: a 401 already went to the login page
  }
}

document.getElementById("logout").addEventListener("click", logout);
window.addEventListener("hashchange", route);
route();
whoAmI();
