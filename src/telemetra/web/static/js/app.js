// The shell: sign-in, role, navigation, theme, and a hash router (#/…) so the server serves one page.

import { api, ApiError, describe, onTrouble, session, Unreachable } from "./api.js";
import { h, clear, tick } from "./ui.js";
import { route } from "./nav.js";

// Each page's module is evaluated when the page is first shown (index.html preloads them all, so none is
// fetched then): the fleet's first screen does not wait for the chart library and six other pages to run.
// ``preload`` starts that while the shell still waits for /api/v1/me.
const lazy = (load, name) => Object.assign(async (...args) => (await load())[name](...args), { preload: () => load().catch(() => {}) });
const renderFleet = lazy(() => import("./fleet.js"), "renderFleet");
const renderDevice = lazy(() => import("./device.js"), "renderDevice");
const renderProvision = lazy(() => import("./provision.js"), "renderProvision");
const renderAlerts = lazy(() => import("./alerts.js"), "renderAlerts");
const renderRules = lazy(() => import("./rules.js"), "renderRules");
const renderWebhooks = lazy(() => import("./webhooks.js"), "renderWebhooks");
const renderOta = lazy(() => import("./ota.js"), "renderOta");
const renderTest = lazy(() => import("./testconsole.js"), "renderTest");

const main = document.getElementById("main");
const banner = document.getElementById("banner");
const THEME = "telemetra.theme";

const PAGES = [
  { name: "fleet", path: /^\/$/, render: renderFleet, nav: "/", label: "Fleet" },
  { name: "device", path: /^\/devices\/(.+)$/, render: renderDevice, nav: "/" },
  { name: "provision", path: /^\/provision$/, render: renderProvision, nav: "/provision", label: "Provision", admin: true },
  { name: "alerts", path: /^\/alerts$/, render: renderAlerts, nav: "/alerts", label: "Alerts" },
  { name: "rules", path: /^\/rules$/, render: renderRules, nav: "/rules", label: "Rules" },
  { name: "webhooks", path: /^\/webhooks$/, render: renderWebhooks, nav: "/webhooks", label: "Webhooks", operator: true },
  { name: "ota", path: /^\/ota$/, render: renderOta, nav: "/ota", label: "OTA", admin: true },
  { name: "test", path: /^\/test$/, render: renderTest, nav: "/test", label: "Test telemetry" },
];

let leave = null; // the current page's cleanup (sockets, timers)
let shown = 0; // which render is current: a slow page that answers after the user moved on is stopped

function applyTheme(theme) {
  if (theme) document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
  const dark = theme ? theme === "dark" : matchMedia("(prefers-color-scheme: dark)").matches;
  const button = document.getElementById("theme");
  button.textContent = dark ? "Light" : "Dark";
  button.setAttribute("aria-pressed", String(dark));
  window.dispatchEvent(new Event("themechange"));
}

// Only what to show: the server checks every request.
function allowed(page) {
  return (!page.admin || session.admin) && (!page.operator || session.operates);
}

function renderNav(current) {
  const items = PAGES.filter((p) => p.label && allowed(p)).map((p) =>
    h("li", {}, h("a", { href: `#${p.nav}`, "aria-current": p.nav === current ? "page" : null }, p.label)),
  );
  items.push(h("li", {}, h("a", { href: "/docs" }, "API docs")));
  clear(document.getElementById("nav"), items);
}

function showSignIn(note) {
  if (leave) leave();
  leave = null;
  document.getElementById("top").hidden = true;
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "current-password", required: true, autofocus: true });
  const status = h("div", { "aria-live": "polite" }, note ? h("div", { class: "message error", role: "alert" }, note) : null);
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    {
      onsubmit: async (e) => {
        e.preventDefault();
        button.disabled = true;
        clear(status, h("div", { class: "message", role: "status" }, "Checking the key…"));
        try {
          const me = await api("/api/v1/me", { key: input.value.trim() });
          if (!me.can.read_fleet) throw new Error(`This is a ${me.role} key: the dashboard needs an admin, operator or viewer key.`);
          session.save(input.value.trim(), me);
          start();
        } catch (error) {
          const text =
            error instanceof ApiError && error.status === 401
              ? "The server refused this key. Check it and try again."
              : describe(error);
          clear(status, h("div", { class: "message error", role: "alert" }, text));
          button.disabled = false;
          input.focus();
        }
      },
    },
    h("label", { for: "api-key" }, "API key", input),
    h("p", { class: "muted small" }, "An admin, operator or viewer key. It is kept for this browser tab only."),
    button,
    status,
  );
  clear(main, h("section", { class: "panel signin", "aria-labelledby": "signin-title" }, h("h1", { id: "signin-title" }, "Sign in to Telemetra"), form));
  input.focus();
}

async function render() {
  if (!session.key) return showSignIn();
  const { path, query } = route();
  const page = PAGES.find((p) => p.path.test(path)) ?? PAGES[0];
  if (!session.me) {
    page.render.preload();
    try {
      session.me = await api("/api/v1/me");
    } catch (error) {
      if (error instanceof Unreachable) return showOutage(error);
      return showSignIn(error instanceof ApiError && error.status === 401 ? "Your key was refused; sign in again." : describe(error));
    }
  }
  document.getElementById("top").hidden = false;
  const role = document.getElementById("role");
  role.textContent = session.me.role;
  role.dataset.role = session.me.role;
  renderNav(page.nav);
  if (leave) leave();
  leave = null;
  const params = path.match(page.path).slice(1).map(decodeURIComponent);
  const root = h("div", { class: "page" });
  delete main.dataset.ready;
  main.dataset.page = page.name;
  clear(main, root);
  if (!allowed(page)) {
    root.append(h("h1", {}, page.label), h("p", { class: "message" }, page.admin ? "This page needs an admin key." : "This page needs an admin or operator key."));
    main.dataset.ready = "true";
    return;
  }
  const mine = ++shown;
  try {
    const cleanup = (await page.render(root, { params, query })) ?? null;
    if (mine !== shown) {
      cleanup?.();
      return;
    }
    leave = cleanup;
  } catch (error) {
    root.append(h("div", { class: "message error", role: "alert" }, describe(error)));
  }
  // First screen drawn: what tests and bench/dashboard.py wait for.
  if (main.dataset.page === page.name) main.dataset.ready = "true";
  document.title = `${root.querySelector("h1")?.textContent ?? "Telemetra"} · Telemetra`;
}

function showOutage(error) {
  clear(
    main,
    h("section", { class: "panel signin" }, h("h1", {}, "Server unreachable"), h("p", { role: "alert" }, error.message, " It may be restarting."),
      h("button", { type: "button", class: "primary", onclick: () => render() }, "Try again")),
  );
}

function start() {
  render();
}

onTrouble((error) => {
  if (error instanceof Unreachable) {
    banner.textContent = `${error.message} Showing what was loaded; retrying on the next refresh.`;
    banner.hidden = false;
  } else if (error instanceof ApiError && error.status === 401) {
    session.clear();
    showSignIn("The server no longer accepts your key; sign in again.");
  } else if (error === null && !banner.hidden) {
    banner.hidden = true;
  }
});

document.getElementById("signout").addEventListener("click", () => {
  session.clear();
  location.hash = "#/";
  showSignIn();
});
document.getElementById("theme").addEventListener("click", () => {
  const dark = document.getElementById("theme").getAttribute("aria-pressed") === "true";
  const next = dark ? "light" : "dark";
  localStorage.setItem(THEME, next);
  applyTheme(next);
});
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => applyTheme(localStorage.getItem(THEME)));
window.addEventListener("hashchange", render);
setInterval(() => tick(main), 15_000);
applyTheme(localStorage.getItem(THEME));
start();
