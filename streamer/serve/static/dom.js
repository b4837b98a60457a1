// h("button", {class: "x", onclick: f}, "text", child...) -> element. Text is always set as text,
// never parsed as HTML, so names and stream ids from the server cannot inject markup.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "testid") el.dataset.testid = value;
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// "12:03:04" today, "2 Dec 12:03:04" on another day (unix seconds in).
export function when(ts) {
  const date = new Date(ts * 1000);
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  if (date.toDateString() === new Date().toDateString()) return time;
  return `${date.toLocaleDateString([], { day: "numeric", month: "short" })} ${time}`;
}

// A transient message at the top of the view: kind "error" or "ok".
export function flash(box, text, kind = "error") {
  box.replaceChildren(h("p", { class: `flash ${kind}`, role: kind === "error" ? "alert" : "status" }, text));
}

// A confirmation dialog (<dialog>), resolving true when the user confirms.
export function confirmDialog(question, confirmLabel = "Delete") {
  return new Promise((resolve) => {
    const yes = h("button", { class: "danger", value: "yes", testid: "confirm-yes" }, confirmLabel);
    const no = h("button", { value: "no", testid: "confirm-no", autofocus: true }, "Cancel");
    const dialog = h("dialog", { testid: "confirm" },
      h("form", { method: "dialog" }, h("p", {}, question), h("div", { class: "actions" }, no, yes)));
    dialog.addEventListener("close", () => {
      resolve(dialog.returnValue === "yes");
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}
