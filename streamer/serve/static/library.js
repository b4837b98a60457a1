// Face library: people with face counts, enrol by upload, rename, delete (after a confirmation), and the
// recent unknown faces the server keeps in memory: "this is ..." enrols one, "dismiss" forgets it; and the
// strangers (u-17: one id for one unknown person across tracks and cameras): "promote" enrols a stranger's
// best faces under a name, "forget" drops the stranger.
import { api, enc, privateImage } from "./api.js";
import { h, when, flash, confirmDialog } from "./dom.js";

const UNKNOWNS_POLL_MS = 3000;
const MAX_CARDS = 24;  // the newest unknowns; a looping camera makes hundreds, each a thumbnail to fetch

export function mount(view) {
  const message = h("div", { class: "messages" });
  const names = h("datalist", { id: "people-names" });
  const people = h("ul", { class: "people", testid: "people" });
  const noPeople = h("p", { class: "empty", hidden: true }, "Nobody enrolled yet.");
  const unknowns = h("div", { class: "cards", testid: "unknowns" });
  const noUnknowns = h("p", { class: "empty" }, "No unknown face seen recently.");
  const more = h("p", { class: "hint", testid: "unknowns-more" });
  const strangers = h("div", { class: "cards", testid: "strangers" });
  const noStrangers = h("p", { class: "empty" }, "No stranger seen lately.");
  const strangersSection = h("section", { hidden: true, testid: "strangers-section" }, h("h2", {}, "Strangers"),
    h("p", { class: "hint" }, "The same unknown person across tracks and cameras, under one id. Memory only."),
    noStrangers, strangers);

  const nameInput = h("input", { name: "name", required: true, list: "people-names", autocomplete: "off",
    placeholder: "Ada Lovelace", testid: "enrol-name" });
  const files = h("input", { type: "file", name: "img", required: true, multiple: true, accept: "image/*",
    testid: "enrol-files" });
  const face = h("select", { name: "face", testid: "enrol-face" },
    h("option", { value: "" }, "the only face (refuse group photos)"),
    h("option", { value: "largest" }, "the largest face"),
    [1, 2, 3, 4, 5, 6].map((n) => h("option", { value: n }, `face ${n} from the left`)));
  const enrolButton = h("button", { type: "submit", testid: "enrol-submit" }, "Enrol");
  const enrolForm = h("form", { class: "inline-form", testid: "enrol" },
    h("label", {}, "Name", nameInput), h("label", {}, "Photos", files), h("label", {}, "Use", face), enrolButton);

  view.append(
    h("h1", {}, "Face library"), message, names,
    h("section", {}, h("h2", {}, "Enrol from photos"), enrolForm),
    h("section", {}, h("h2", {}, "People"), noPeople, people),
    h("section", {}, h("h2", {}, "Recent unknowns"),
      h("p", { class: "hint" }, "Faces seen recently that matched nobody. Kept in memory only, for a few minutes."),
      noUnknowns, unknowns, more),
    strangersSection,
  );

  let known = [];  // [{name, faces}]
  let stopped = false;
  let timer = null;
  const cards = new Map();  // unknown id -> {el, url}
  const strangerCards = new Map();  // stranger id -> {el, url, seen}

  // -- people ---------------------------------------------------------------------------------------------

  function personRow(person) {
    const label = h("span", { class: "name" }, person.name);
    const count = h("span", { class: "count" }, `${person.faces} ${person.faces === 1 ? "face" : "faces"}`);
    const rename = h("button", { type: "button", class: "small", testid: `rename-${person.name}` }, "Rename");
    const remove = h("button", { type: "button", class: "danger small", testid: `delete-${person.name}` }, "Delete");
    const li = h("li", { class: "person", testid: `person-${person.name}` }, label, count,
      h("span", { class: "actions" }, rename, remove));
    rename.addEventListener("click", () => startRename(li, person));
    remove.addEventListener("click", () => deletePerson(person.name));
    return li;
  }

  function startRename(li, person) {
    const input = h("input", { value: person.name, required: true, "aria-label": `new name for ${person.name}`,
      testid: `rename-input-${person.name}` });
    const save = h("button", { type: "submit", testid: `rename-save-${person.name}` }, "Save");
    const cancel = h("button", { type: "button", onclick: () => loadPeople() }, "Cancel");
    const form = h("form", { class: "rename" }, input, save, cancel);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      message.replaceChildren();
      const name = input.value.trim();
      if (!name || name === person.name) return loadPeople();
      try {
        await api(`/api/v1/people/${enc(person.name)}`, { method: "PATCH", json: { name } });
        flash(message, `Renamed ${person.name} to ${name}.`, "ok");
      } catch (error) {
        flash(message, error.message);
      }
      loadPeople();
    });
    li.replaceChildren(form);
    input.focus();
    input.select();
  }

  async function deletePerson(name) {
    const question = `Delete ${name}? Every enrolled face of ${name} is erased from the gallery; this cannot be undone.`;
    if (!(await confirmDialog(question, "Delete"))) return;
    message.replaceChildren();
    try {
      await api(`/api/v1/people/${enc(name)}`, { method: "DELETE" });
      flash(message, `Deleted ${name} and all their faces.`, "ok");
    } catch (error) {
      flash(message, error.message);
    }
    loadPeople();
  }

  async function loadPeople() {
    try {
      const body = await api("/api/v1/people");
      if (stopped) return;
      known = (body.people || []).slice().sort((a, b) => a.name.localeCompare(b.name));
      people.replaceChildren(...known.map(personRow));
      names.replaceChildren(...known.map((p) => h("option", { value: p.name })));
      noPeople.hidden = known.length > 0;
    } catch (error) {
      if (!stopped) flash(message, error.message);
    }
  }

  enrolForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    message.replaceChildren();  // a sentence left from the last action must not read as this one's answer
    const name = nameInput.value.trim();
    const form = new FormData();
    for (const file of files.files) form.append("img", file, file.name);
    if (face.value) form.append("face", face.value);
    // An existing person gets more faces; a new name creates the person.
    const existing = known.some((p) => p.name === name);
    if (!existing) form.append("name", name);
    const path = existing ? `/api/v1/people/${enc(name)}/faces` : "/api/v1/people";
    enrolButton.disabled = true;
    try {
      const result = await api(path, { method: "POST", form });
      flash(message, `Enrolled ${result.name}: ${result.added} ${result.added === 1 ? "face" : "faces"} added.`, "ok");
      enrolForm.reset();
    } catch (error) {
      flash(message, error.message);  // the server's sentence: no face, several faces, too blurry, ...
    } finally {
      enrolButton.disabled = false;
    }
    loadPeople();
  });

  // -- recent unknowns ------------------------------------------------------------------------------------

  function unknownCard(unknown) {
    // No alt text until the picture is there: Chrome would draw it over the placeholder meanwhile.
    const img = h("img", { alt: "", class: "thumb", testid: `thumb-${unknown.id}` });
    const who = h("input", { list: "people-names", required: true, autocomplete: "off", placeholder: "name",
      "aria-label": "who this is", testid: `unknown-name-${unknown.id}` });
    const thisIs = h("button", { type: "submit", testid: `unknown-enrol-${unknown.id}` }, "This is…");
    const dismiss = h("button", { type: "button", class: "small", testid: `unknown-dismiss-${unknown.id}` }, "Dismiss");
    const seen = h("span", { class: "seen" });
    const form = h("form", { class: "this-is" }, who, thisIs);
    const el = h("article", { class: "card", testid: `unknown-${unknown.id}` }, img,
      h("div", { class: "meta" },
        h("strong", { testid: `unknown-stranger-${unknown.id}` }, unknown.stranger || "unknown"),
        h("span", {}, `${unknown.stream} · track ${unknown.track}`),
        seen),
      form, dismiss);
    const card = { el, url: null, seen };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = who.value.trim();
      if (!name) return;
      message.replaceChildren();
      thisIs.disabled = true;
      try {
        const result = await api(`/api/v1/unknowns/${enc(unknown.id)}/enrol`, { method: "POST", json: { name } });
        flash(message, `Enrolled this face as ${result.name}.`, "ok");
        dropCard(unknown.id);
        loadPeople();
      } catch (error) {
        flash(message, error.message);
        thisIs.disabled = false;
      }
    });
    dismiss.addEventListener("click", async () => {
      message.replaceChildren();
      try {
        await api(`/api/v1/unknowns/${enc(unknown.id)}`, { method: "DELETE" });
        dropCard(unknown.id);
      } catch (error) {
        flash(message, error.message);
      }
    });
    // Fetched with no-store into a blob: a face thumbnail never lands in the browser's disk cache.
    privateImage(`/api/v1/unknowns/${enc(unknown.id)}/thumbnail.jpg`).then((url) => {
      if (stopped || !cards.has(unknown.id)) return URL.revokeObjectURL(url);
      card.url = url;
      img.src = url;
      img.alt = `unknown face on ${unknown.stream}, track ${unknown.track}`;
    }).catch(() => img.classList.add("missing"));
    return card;
  }

  function dropCard(id) {
    const card = cards.get(id);
    if (!card) return;
    card.el.remove();
    if (card.url) URL.revokeObjectURL(card.url);
    cards.delete(id);
    noUnknowns.hidden = cards.size > 0;
  }

  async function loadUnknowns() {
    clearTimeout(timer);
    try {
      const body = await api("/api/v1/unknowns");
      if (stopped) return;
      // Newest first by first sighting: a stable order, so a card being typed into does not move.
      const all = (body.unknowns || []).slice().sort((a, b) => b.first_seen - a.first_seen);
      const list = all.slice(0, MAX_CARDS);
      more.textContent = all.length > list.length ? `and ${all.length - list.length} older ones` : "";
      const current = new Set(list.map((u) => u.id));
      for (const id of [...cards.keys()]) if (!current.has(id)) dropCard(id);
      list.forEach((unknown, index) => {
        let card = cards.get(unknown.id);
        if (!card) {
          card = unknownCard(unknown);
          cards.set(unknown.id, card);
        }
        card.seen.textContent = `last seen ${when(unknown.last_seen)}`;
        const there = unknowns.children[index];
        if (there !== card.el) unknowns.insertBefore(card.el, there || null);
      });
      noUnknowns.hidden = cards.size > 0;
    } catch (error) {
      if (!stopped) flash(message, error.message);
    }
    await loadStrangers();
    clearTimeout(timer);  // one poll chain, even when an action reloaded meanwhile
    if (!stopped) timer = setTimeout(loadUnknowns, UNKNOWNS_POLL_MS);
  }

  // -- strangers ------------------------------------------------------------------------------------------

  function strangerCard(stranger) {
    const img = h("img", { alt: "", class: "thumb", testid: `stranger-thumb-${stranger.id}` });
    const who = h("input", { list: "people-names", required: true, autocomplete: "off", placeholder: "name",
      "aria-label": `who ${stranger.id} is`, testid: `stranger-name-${stranger.id}` });
    const promote = h("button", { type: "submit", testid: `stranger-promote-${stranger.id}` }, "Promote");
    const forget = h("button", { type: "button", class: "small", testid: `stranger-forget-${stranger.id}` }, "Forget");
    const seen = h("span", { class: "seen" });
    const form = h("form", { class: "this-is" }, who, promote);
    const el = h("article", { class: "card", testid: `stranger-${stranger.id}` }, stranger.thumbnail ? img : null,
      h("div", { class: "meta" }, h("strong", {}, stranger.id), seen), form, forget);
    const card = { el, url: null, seen };
    async function act(call, done) {
      message.replaceChildren();
      promote.disabled = true;
      try {
        flash(message, done(await call()), "ok");
        dropStranger(stranger.id);
        loadPeople();
        loadUnknowns();  // a promoted stranger's recent unknowns are enrolled too
      } catch (error) {
        flash(message, error.message);
        promote.disabled = false;
      }
    }
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const name = who.value.trim();
      if (!name) return;
      act(() => api(`/api/v1/strangers/${enc(stranger.id)}/promote`, { method: "POST", json: { name } }),
        (r) => `Enrolled ${stranger.id} as ${r.name}: ${r.added} ${r.added === 1 ? "face" : "faces"} added.`);
    });
    forget.addEventListener("click", () => act(() => api(`/api/v1/strangers/${enc(stranger.id)}`,
      { method: "DELETE" }), () => `Forgot ${stranger.id}.`));
    if (stranger.thumbnail) {
      privateImage(`/api/v1/strangers/${enc(stranger.id)}/thumbnail.jpg`).then((url) => {
        if (stopped || !strangerCards.has(stranger.id)) return URL.revokeObjectURL(url);
        card.url = url;
        img.src = url;
        img.alt = `best face of ${stranger.id}`;
      }).catch(() => img.classList.add("missing"));
    }
    return card;
  }

  function dropStranger(id) {
    const card = strangerCards.get(id);
    if (!card) return;
    card.el.remove();
    if (card.url) URL.revokeObjectURL(card.url);
    strangerCards.delete(id);
    noStrangers.hidden = strangerCards.size > 0;
  }

  async function loadStrangers() {
    let body;
    try {
      body = await api("/api/v1/strangers");
    } catch (error) {
      // 503: no pipeline in this server, so no strangers: the section stays hidden.
      if (!stopped && error.status !== 503) flash(message, error.message);
      return;
    }
    if (stopped) return;
    strangersSection.hidden = false;
    // Newest first by first sighting, as the unknowns: a card being typed into does not move.
    const list = (body.strangers || []).slice().sort((a, b) => b.first_seen - a.first_seen).slice(0, MAX_CARDS);
    const current = new Set(list.map((s) => s.id));
    for (const id of [...strangerCards.keys()]) if (!current.has(id)) dropStranger(id);
    list.forEach((stranger, index) => {
      let card = strangerCards.get(stranger.id);
      if (!card) {
        card = strangerCard(stranger);
        strangerCards.set(stranger.id, card);
      }
      const tracks = `${stranger.tracks} ${stranger.tracks === 1 ? "track" : "tracks"}`;
      card.seen.textContent = `${tracks} on ${stranger.streams.join(", ")} · last seen ${when(stranger.last_seen)}`;
      const there = strangers.children[index];
      if (there !== card.el) strangers.insertBefore(card.el, there || null);
    });
    noStrangers.hidden = strangerCards.size > 0;
  }

  loadPeople();
  loadUnknowns();

  return () => {
    stopped = true;
    clearTimeout(timer);
    for (const id of [...cards.keys()]) dropCard(id);
    for (const id of [...strangerCards.keys()]) dropStranger(id);
  };
}
