// Talking to Telemetra's API with the key kept for this browser session only (sessionStorage).

const KEY = "telemetra.apiKey";
const ME = "telemetra.me"; // the key's role, kept beside it so a new tab does not ask again

export class ApiError extends Error {
  constructor(status, detail, field) {
    super(typeof detail === "string" ? detail : JSON.stringify(detail));
    this.status = status;
    this.field = field ?? null;
  }
}

// The server could not be reached at all (down, restarting, network gone).
export class Unreachable extends Error {
  constructor() {
    super(`Cannot reach the Telemetra server at ${location.origin}.`);
  }
}

export const session = {
  get key() {
    return sessionStorage.getItem(KEY);
  },
  save(key, me) {
    sessionStorage.setItem(KEY, key);
    session.me = me;
  },
  clear() {
    sessionStorage.removeItem(KEY);
    sessionStorage.removeItem(ME);
  },
  // GET /api/v1/me of the key in use. Only a hint for what to show: the server checks every request.
  get me() {
    try {
      return JSON.parse(sessionStorage.getItem(ME) ?? "null");
    } catch {
      return null;
    }
  },
  set me(value) {
    if (value) sessionStorage.setItem(ME, JSON.stringify(value));
    else sessionStorage.removeItem(ME);
  },
  get operates() {
    return Boolean(session.me?.can?.operate);
  },
  get admin() {
    return Boolean(session.me?.can?.admin);
  },
};

// Listeners told about every refused key (401) and every outage, so the shell can react once.
const listeners = new Set();
export function onTrouble(fn) {
  listeners.add(fn);
}
function trouble(error) {
  for (const fn of listeners) fn(error);
}

export function url(path, query = {}) {
  const u = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== null && v !== "") u.searchParams.set(k, String(v));
  }
  return u;
}

export async function api(path, { method = "GET", body, query, key, signal, sized = false } = {}) {
  const headers = { Accept: "application/json" };
  const useKey = key ?? session.key;
  if (useKey) headers["X-API-Key"] = useKey;
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url(path, query), { method, headers, body: payload, signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    const down = new Unreachable();
    trouble(down);
    throw down;
  }
  trouble(null);
  const text = await response.text();
  const data = await answer(response.status, text, key === undefined);
  // sized: also how many bytes the answer took (the chart shows it; bench/dashboard.py checks it).
  return sized ? { data, bytes: new TextEncoder().encode(text).length } : data;
}

async function answer(status, text, own) {
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (status >= 200 && status < 300) return data;
  const detail = data?.detail ?? (text || `HTTP ${status}`);
  const error = new ApiError(status, detail, data?.field);
  if (status === 401 && own) trouble(error);
  throw error;
}

// A multipart upload with progress (fetch cannot report upload progress).
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url(path));
    xhr.setRequestHeader("X-API-Key", session.key ?? "");
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onload = () => answer(xhr.status, xhr.responseText, true).then(resolve, reject);
    xhr.onerror = () => {
      const down = new Unreachable();
      trouble(down);
      reject(down);
    };
    xhr.send(form);
  });
}

export function describe(error) {
  if (error instanceof ApiError) {
    return error.field ? `${error.message} (${error.field})` : error.message;
  }
  return error?.message ?? String(error);
}
