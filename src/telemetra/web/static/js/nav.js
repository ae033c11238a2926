// The hash route (#/path?query): the server serves one page, the browser keeps the place.

export function route() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, search = ""] = raw.split("?");
  return { path: path || "/", query: new URLSearchParams(search) };
}

function encode(query) {
  return new URLSearchParams(Object.entries(query ?? {}).filter(([, v]) => v !== "" && v != null)).toString();
}

export function navigate(path, query) {
  const q = encode(query);
  location.hash = q ? `${path}?${q}` : path;
}

// Change the current page's query without a new history entry or a re-render.
export function replaceQuery(query) {
  const q = encode(query);
  const { path } = route();
  history.replaceState(null, "", `#${q ? `${path}?${q}` : path}`);
}
