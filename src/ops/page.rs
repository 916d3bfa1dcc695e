//! The status page: one self-contained HTML document (no external asset, no
//! CDN) that fetches `status` every 1.5 s and renders whatever it returns.
//!
//! # The `/status` JSON it expects
//!
//! Proposed for the relay (the renderer is generic, see below, so the agent
//! can serve the same page with its own fields):
//!
//! ```json
//! {
//!   "version": "0.1.0",
//!   "uptime_secs": 3600,
//!   "totals": {"apps": 2, "waiting": 0, "pipes": 3,
//!              "bytes_in": 1234567, "bytes_out": 89012345},
//!   "apps": [
//!     {"addr": "203.0.113.7:50312", "relayed_port": 8081,
//!      "extensions": ["ready 8", "proxy v2"], "waiting": 0, "pipes": 3,
//!      "bytes_in": 1234, "bytes_out": 5678,
//!      "connected_since": "2024-05-01T12:34:56Z"}
//!   ]
//! }
//! ```
//!
//! `bytes_in` counts bytes from clients toward apps, `bytes_out` bytes from
//! apps back to clients; `connected_since` is RFC 3339 UTC
//! ([`super::json::rfc3339_utc`]). Integers are exact up to 2^53 in a
//! browser, which a byte counter reaches after 9 PB.
//!
//! # How it renders (generic)
//!
//! * `title` (optional string) is the heading, `version` is shown beside it.
//! * The totals grid shows the top-level `uptime_secs`, then every entry of
//!   `totals`, as label and value.
//! * Every top-level array of objects becomes a table named by its key,
//!   one row per element, with a column per key (first seen first).
//! * Values: keys ending in `_secs` as durations (`1d 2h 3m 4s`), ports
//!   (`port`, `*_port`) as they are, other numbers with thousands
//!   separators (`1,234,567`; keys with `bytes` also get `1.2 MiB` as a
//!   tooltip), string arrays joined with commas, `null` as `—`. Labels come from a small table of known keys, else the key with
//!   spaces for underscores.
//! * Everything is set as text (`textContent`), never parsed as HTML, so a
//!   value cannot inject markup; a `<meta>` Content-Security-Policy forbids
//!   every load but `fetch` to the page's own origin.
//!
//! # What a headless-browser test can query
//!
//! | selector | what |
//! |---|---|
//! | `body[data-state]` | `loading` until the first answer, then `ok`, or `error` while fetches fail |
//! | `#error` | hidden while fetches succeed; otherwise the reason, e.g. `cannot fetch status: HTTP 500` |
//! | `#version`, `#updated` | the `version` field; the local time of the last good answer |
//! | `#totals dd#<key>-total` | a total's cell: `_` in the key becomes `-`: `#apps-total`, `#bytes-in-total`, `#uptime-secs-total` |
//! | `table#<array key>` | a table, e.g. `table#apps`; its `caption` holds the label and row count |
//! | `#apps tbody tr[data-port="8081"]` | an app's row: `data-port` is the row's `relayed_port` (or `port`) |
//! | `td[data-key="pipes"]` | a row's cell for a key |
//!
//! Every value cell (`dd` and `td`) has `data-value` with the raw JSON value
//! (arrays joined with `,`), so a test compares exact numbers without
//! parsing separators; the shown text is the formatted one.
//!
//! The page fetches `status` relative to its own URL, so it also works
//! behind a reverse proxy under a sub-path (`/relay/` fetches
//! `/relay/status`), and served at `/` it fetches `/status`.

/// The `Content-Type` to serve [`PAGE`] with.
pub const CONTENT_TYPE: &str = "text/html; charset=utf-8";

/// The page.
pub const PAGE: &str = r##"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'">
<title>tcp-relay status</title>
<style>
  :root { color-scheme: light dark; --dim: #888; --bad: #c0392b; }
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; }
  h1 { font-size: 1.3em; margin: 0 0 .8em; }
  h1 small { color: var(--dim); font-weight: normal; margin-left: .5em; }
  #error { color: #fff; background: var(--bad); padding: .5em .8em; border-radius: 4px; }
  body[data-state="error"] main { opacity: .5; }
  #totals { display: grid; grid-template-columns: max-content max-content; gap: .2em 1.5em; }
  #totals dt { color: var(--dim); }
  #totals dd { margin: 0; }
  table { border-collapse: collapse; margin-top: 1.5em; }
  caption { text-align: left; font-weight: bold; padding-bottom: .4em; }
  th, td { padding: .25em .8em; border-bottom: 1px solid rgba(128, 128, 128, .3); text-align: left; }
  th { color: var(--dim); font-weight: normal; }
  .num { text-align: right; font-variant-numeric: tabular-nums; }
  footer { color: var(--dim); margin-top: 1.5em; }
</style>
</head>
<body data-state="loading">
<h1><span id="title">tcp-relay</span><small id="version"></small></h1>
<p id="error" role="alert" hidden></p>
<main>
  <dl id="totals"></dl>
  <div id="tables"></div>
</main>
<footer>Updated <span id="updated">never</span>; refreshes every 1.5 s.</footer>
<script>
'use strict';
const REFRESH_MS = 1500;
const TIMEOUT_MS = 5000;
const NUMBER = new Intl.NumberFormat('en-US');
const LABELS = {
  addr: 'address', relayed_port: 'relayed port', extensions: 'extensions',
  waiting: 'clients waiting', pipes: 'pipes', bytes_in: 'bytes in',
  bytes_out: 'bytes out', connected_since: 'connected since',
  uptime_secs: 'uptime', apps: 'apps',
};

function label(key) {
  return LABELS[key] || key.replace(/_secs$/, '').replace(/_/g, ' ');
}

function duration(secs) {
  let s = Math.floor(secs);
  const parts = [];
  for (const [unit, size] of [['d', 86400], ['h', 3600], ['m', 60]]) {
    if (s >= size || parts.length) { parts.push(Math.floor(s / size) + unit); s %= size; }
  }
  parts.push(s + 's');
  return parts.join(' ');
}

function binary(bytes) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return (i ? bytes.toFixed(1) : String(bytes)) + ' ' + units[i];
}

// The text, tooltip and raw value of one value cell.
function format(key, value) {
  if (value === null || value === undefined) return { text: '\u2014', raw: '' };
  if (Array.isArray(value)) {
    return { text: value.length ? value.join(', ') : '\u2014', raw: value.join(',') };
  }
  if (typeof value === 'number') {
    if (/_secs$/.test(key)) return { text: duration(value), raw: String(value) };
    if (/(^|_)port$/.test(key)) return { text: String(value), raw: String(value), numeric: true };
    const cell = { text: NUMBER.format(value), raw: String(value), numeric: true };
    if (/bytes/.test(key)) cell.title = binary(value);
    return cell;
  }
  if (typeof value === 'boolean') return { text: value ? 'yes' : 'no', raw: String(value) };
  if (typeof value === 'object') return { text: JSON.stringify(value), raw: JSON.stringify(value) };
  return { text: String(value), raw: String(value) };
}

function valueCell(tag, key, value) {
  const cell = format(key, value);
  const el = document.createElement(tag);
  el.textContent = cell.text;
  el.dataset.key = key;
  el.dataset.value = cell.raw;
  if (cell.title) el.title = cell.title;
  if (cell.numeric) el.className = 'num';
  return el;
}

function renderTotals(status) {
  const entries = [];
  if ('uptime_secs' in status) entries.push(['uptime_secs', status.uptime_secs]);
  const totals = status.totals && typeof status.totals === 'object' ? status.totals : {};
  entries.push(...Object.entries(totals));
  const dl = document.getElementById('totals');
  dl.replaceChildren();
  for (const [key, value] of entries) {
    const dt = document.createElement('dt');
    dt.textContent = label(key);
    const dd = valueCell('dd', key, value);
    dd.id = key.replace(/_/g, '-') + '-total';
    dl.append(dt, dd);
  }
}

function renderTable(key, rows) {
  const columns = [];
  for (const row of rows) {
    for (const column of Object.keys(row)) if (!columns.includes(column)) columns.push(column);
  }
  const table = document.createElement('table');
  table.id = key;
  const caption = table.createCaption();
  caption.textContent = label(key) + ': ' + (rows.length ? NUMBER.format(rows.length) : 'none');
  const headRow = table.createTHead().insertRow();
  for (const column of columns) {
    const th = document.createElement('th');
    th.textContent = label(column);
    headRow.append(th);
  }
  const body = table.createTBody();
  for (const row of rows) {
    const tr = body.insertRow();
    const port = row.relayed_port !== undefined ? row.relayed_port : row.port;
    if (port !== undefined) tr.dataset.port = String(port);
    for (const column of columns) tr.append(valueCell('td', column, row[column]));
  }
  return table;
}

function render(status) {
  if (!status || typeof status !== 'object') throw new Error('not a JSON object');
  document.getElementById('title').textContent = status.title || 'tcp-relay';
  document.getElementById('version').textContent = status.version ? 'v' + status.version : '';
  renderTotals(status);
  const tables = Object.entries(status).filter(([, value]) =>
    Array.isArray(value) && value.every((row) => row && typeof row === 'object' && !Array.isArray(row)));
  document.getElementById('tables').replaceChildren(
    ...tables.map(([key, rows]) => renderTable(key, rows)));
  document.getElementById('updated').textContent = new Date().toLocaleTimeString();
  document.getElementById('error').hidden = true;
  document.body.dataset.state = 'ok';
}

function showError(reason) {
  const error = document.getElementById('error');
  error.textContent = 'cannot fetch status: ' + reason + ' (retrying; the figures below are stale)';
  error.hidden = false;
  document.body.dataset.state = 'error';
}

async function refresh() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const response = await fetch('status', {
      cache: 'no-store', signal: abort.signal, headers: { Accept: 'application/json' },
    });
    if (!response.ok) throw new Error('HTTP ' + response.status);
    render(await response.json());
  } catch (e) {
    showError(e.name === 'AbortError' ? 'no answer in ' + TIMEOUT_MS / 1000 + ' s' : e.message);
  } finally {
    clearTimeout(timer);
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::PAGE;

    fn script() -> &'static str {
        let start = PAGE.find("<script>").expect("a script") + "<script>".len();
        let end = PAGE.find("</script>").expect("the script's end");
        &PAGE[start..end]
    }

    #[test]
    fn nothing_is_loaded_from_elsewhere() {
        for outside in [
            "http:", "https:", "src=", "href=", "<link", "@import", "url(",
        ] {
            assert!(!PAGE.contains(outside), "the page mentions {outside:?}");
        }
        assert_eq!(PAGE.matches("<script").count(), 1, "one inline script");
        assert!(PAGE.contains("default-src 'none'") && PAGE.contains("connect-src 'self'"));
    }

    #[test]
    fn values_are_set_as_text_never_as_markup() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!script().contains(sink), "the script uses {sink}");
        }
        assert!(script().contains("textContent"));
    }

    #[test]
    fn it_polls_status_without_caching_every_one_to_two_seconds() {
        assert!(script().contains("fetch('status'"));
        assert!(script().contains("cache: 'no-store'"));
        let refresh: u32 = script()
            .split("const REFRESH_MS = ")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .and_then(|n| n.parse().ok())
            .expect("REFRESH_MS is a number");
        assert!((1000..=2000).contains(&refresh), "{refresh} ms");
    }

    #[test]
    fn the_documented_hooks_exist() {
        for hook in [
            "<body data-state=\"loading\">",
            "id=\"error\"",
            "id=\"totals\"",
            "id=\"tables\"",
            "id=\"version\"",
            "id=\"updated\"",
            "'-total'",
            "tr.dataset.port",
            "el.dataset.key",
            "el.dataset.value",
            "dataset.state = 'error'",
            "dataset.state = 'ok'",
            "Intl.NumberFormat('en-US')",
        ] {
            assert!(PAGE.contains(hook), "the page lacks {hook:?}");
        }
    }
}
