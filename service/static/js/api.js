// The HTTP API of camp-search (routes under /v1, problem+json errors). Paths are relative so
// the UI works wherever it is mounted: at / by the API itself, or behind nginx.

const API_KEY_STORAGE = "camp-search.api-key";

/** An error answered by the API, carrying the problem+json fields a person can act on. */
export class ApiError extends Error {
  constructor(status, title, detail, fieldErrors = [], retryAfter = null) {
    super(detail || title || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.title = title || `HTTP ${status}`;
    this.detail = detail || "";
    this.fieldErrors = fieldErrors;
    this.retryAfter = retryAfter;
  }

  /** One line for the error banner: title, detail and the fields that were wrong. */
  describe() {
    const parts = [this.title];
    if (this.detail && this.detail !== this.title) parts.push(this.detail);
    for (const { field, reason } of this.fieldErrors) {
      // Skip a field reason that only repeats the detail (after its "error_code: " prefix).
      const plain = reason.replace(/^[a-z_]+:\s*/, "");
      if (!this.detail.includes(plain)) parts.push(`${field}: ${reason}`);
    }
    if (this.status === 429 && this.retryAfter) parts.push(`retry in ${this.retryAfter} s`);
    return parts.join(" — ");
  }
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON (a proxy error page, for instance): fall back to the status line.
  }
  const fieldErrors = Array.isArray(body?.errors)
    ? body.errors.map((e) => ({ field: String(e.field ?? ""), reason: String(e.reason ?? "") }))
    : [];
  const title = typeof body?.title === "string" ? body.title : response.statusText;
  const detail = typeof body?.detail === "string" ? body.detail : "";
  return new ApiError(response.status, title, detail, fieldErrors, response.headers.get("Retry-After"));
}

async function request(path, { method = "GET", json, form, headers = {}, signal } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers }, signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (cause) {
    if (cause?.name === "AbortError") throw cause;
    throw new ApiError(0, "The service cannot be reached", "Check that camp-search is running.");
  }
  if (!response.ok) throw await errorFrom(response);
  return { status: response.status, body: response.status === 204 ? null : await response.json() };
}

/** POST /v1/search/images: text -> ranked images. */
export async function searchImages(options, signal) {
  return (await request("v1/search/images", { method: "POST", json: options, signal })).body;
}

/** POST /v1/search/captions (multipart): photo -> ranked captions. */
export async function searchCaptions(file, options, signal) {
  const form = new FormData();
  form.append("file", file, file.name || "photo");
  for (const [name, value] of Object.entries(options)) {
    if (value !== null && value !== undefined) form.append(name, String(value));
  }
  return (await request("v1/search/captions", { method: "POST", form, signal })).body;
}

/** POST /v1/images: add one photo with its captions; `created` is false for a duplicate. */
export async function addImage(file, captions, apiKey) {
  const form = new FormData();
  form.append("file", file, file.name || "photo");
  for (const caption of captions) form.append("captions", caption);
  const headers = apiKey ? { "X-API-Key": apiKey } : {};
  const { status, body } = await request("v1/images", { method: "POST", form, headers });
  return { created: status === 201, image: body };
}

/** GET /readyz, which answers 503 with a body while the service is loading. */
export async function readiness() {
  let response;
  try {
    response = await fetch("readyz", { headers: { Accept: "application/json" } });
  } catch {
    return { state: "offline", body: null };
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // keep null
  }
  if (!response.ok) return { state: "down", body };
  const status = typeof body?.status === "string" ? body.status : "ready";
  return { state: status === "ready" || status === "ok" ? "ready" : "degraded", body };
}

/** GET /v1/info (model, device, corpus sizes); null when it is not available. */
export async function info() {
  try {
    return (await request("v1/info")).body;
  } catch {
    return null;
  }
}

/** The URL of an image's stored bytes: the hit's `url` when given, else the documented route. */
export function imageUrl(hit) {
  if (typeof hit.url === "string" && hit.url) return hit.url.replace(/^\//, "");
  return `v1/images/${encodeURIComponent(hit.id ?? hit.image_id)}/file`;
}

export function loadApiKey() {
  return sessionStorage.getItem(API_KEY_STORAGE) ?? "";
}

export function saveApiKey(key) {
  if (key) sessionStorage.setItem(API_KEY_STORAGE, key);
  else sessionStorage.removeItem(API_KEY_STORAGE);
}
