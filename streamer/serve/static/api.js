// The console's one way to talk to the server: same-origin fetch with the HttpOnly session cookie.
// The token never passes through this code after login (no localStorage, no URLs).

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function toLogin() {
  location.assign("/login");
}

// api("/api/v1/people") -> parsed JSON (null for 204); throws ApiError with the server's one-sentence error.
// json: a body sent as JSON; form: a FormData sent as multipart.
export async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, credentials: "same-origin", cache: "no-store", signal, headers: {} };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;  // the browser sets the multipart boundary
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    toLogin();
    throw new ApiError(401, "Your session has ended: log in again.");
  }
  const text = await response.text();
  let body = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!response.ok) {
    const message = body && typeof body.error === "string" ? body.error : `The server answered ${response.status}.`;
    throw new ApiError(response.status, message);
  }
  return body;
}

// A face image fetched without the browser's disk cache, as a blob: URL (revoke it when the image goes).
export async function privateImage(path, signal) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store", signal });
  if (response.status === 401) toLogin();
  if (!response.ok) throw new ApiError(response.status, `image unavailable (${response.status})`);
  return URL.createObjectURL(await response.blob());
}

export function enc(part) {
  return encodeURIComponent(part);
}
