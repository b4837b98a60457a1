// Posts the token once to /api/v1/login, which answers with an HttpOnly session cookie: the token is
// never stored by the page (no localStorage, no URL), so scripts cannot read it back.
const form = document.getElementById("login");
const input = document.getElementById("token");
const error = document.getElementById("error");
const button = form.querySelector("button");

function show(text) {
  error.textContent = text;
  error.hidden = false;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  button.disabled = true;
  try {
    const response = await fetch("/api/v1/login", {
      method: "POST",
      credentials: "same-origin",
      cache: "no-store",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: input.value.trim() }),
    });
    if (response.ok) {
      input.value = "";
      location.replace("/");
      return;
    }
    let message = response.status === 429 ? "Too many attempts: wait a minute and try again." : "That token is not valid.";
    try {
      const body = await response.json();
      if (body && typeof body.error === "string") message = body.error;
    } catch {
      // keep the default sentence
    }
    show(message);
  } catch {
    show("The server cannot be reached: is streamer serve running?");
  } finally {
    button.disabled = false;
  }
});
