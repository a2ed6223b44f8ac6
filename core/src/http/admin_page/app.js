// kiln's admin page: the plugins with their live state, their actions, a config form made
// from each plugin's configSchema, build history and logs. It only calls the admin API (with
// the admin token, if the server has one) and needs no build step.
'use strict';

const $ = (selector) => document.querySelector(selector);
const enc = encodeURIComponent;
const TICK_MS = 2000;

// In memory only: plugin routes share this page's origin, so nothing is left in storage.
let token = '';
let selected = null;
let lastList = '';
let refreshing = false;
let logsLoading = false;
// Policy violations seen (the browser test reads it: the page must need none).
window.cspViolations = 0;
document.addEventListener('securitypolicyviolation', () => {
  window.cspViolations += 1;
});

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function say(message, kind) {
  const status = $('#status');
  status.textContent = message;
  status.className = kind || '';
}

function problem(r) {
  const d = r.data || {};
  return (d.error ? d.error + ': ' : '') + (d.message || 'HTTP ' + r.status);
}

async function api(method, path, body) {
  const headers = {};
  if (token) headers.Authorization = 'Bearer ' + token;
  let payload = body;
  if (body !== undefined && !(body instanceof FormData)) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: payload });
  } catch (e) {
    return { ok: false, status: 0, data: { message: 'the server cannot be reached (' + e.message + ')' } };
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { message: text };
  }
  if (resp.status === 401) {
    say('This server needs its admin token (KILN_ADMIN_TOKEN): enter it above.', 'bad');
  }
  return { ok: resp.ok, status: resp.status, data };
}

// The plugins table: rows are kept and updated in place, so focus and clicks survive a refresh.

async function refresh() {
  // One at a time: an older answer never lands after a newer one.
  if (refreshing) return;
  refreshing = true;
  try {
    await refreshNow();
  } finally {
    refreshing = false;
  }
}

async function refreshNow() {
  const r = await api('GET', '/plugins');
  if (!r.ok) {
    if (r.status !== 401) say('Could not list the plugins: ' + problem(r), 'bad');
    return;
  }
  const text = JSON.stringify(r.data);
  if (text === lastList) return;
  lastList = text;
  renderPlugins(r.data);
  if (selected) {
    if (r.data.some((p) => p.name === selected)) loadBuilds(selected);
    else closeDetail();
  }
}

function renderPlugins(plugins) {
  const tbody = $('#plugins tbody');
  const seen = new Set();
  for (const p of plugins) {
    seen.add(p.name);
    let row = [...tbody.rows].find((r) => r.dataset.name === p.name);
    if (!row) {
      row = newRow(p.name);
      tbody.append(row);
    }
    updateRow(row, p);
  }
  for (const row of [...tbody.rows]) {
    if (!seen.has(row.dataset.name)) row.remove();
  }
  $('#no-plugins').hidden = plugins.length > 0;
}

function newRow(name) {
  const action = (what, label) =>
    h('button', { type: 'button', dataset: { action: what }, 'aria-label': label + ' ' + name, onclick: (e) => act(name, what, e.currentTarget) }, label);
  return h(
    'tr',
    { dataset: { name } },
    h('th', { scope: 'row' }, h('button', { type: 'button', class: 'link', dataset: { action: 'open' }, onclick: () => select(name) }, name)),
    h('td', { dataset: { field: 'version' } }),
    h('td', { dataset: { field: 'status' } }),
    h('td', { dataset: { field: 'state' } }),
    h('td', { class: 'error', dataset: { field: 'error' } }),
    h('td', { class: 'actions' }, action('toggle', 'Turn off'), action('reload', 'Reload'), action('uninstall', 'Uninstall')),
  );
}

function updateRow(row, p) {
  const cell = (field) => row.querySelector(`[data-field="${field}"]`);
  cell('version').textContent = p.version;
  cell('status').textContent = p.status;
  cell('state').textContent = p.state + (p.rollout && p.rollout !== 'converged' && p.replicas.length > 1 ? ` (${p.rollout})` : '');
  cell('state').className = 'state-' + p.state;
  cell('error').textContent = p.error || '';
  const toggle = row.querySelector('[data-action="toggle"]');
  const label = p.status === 'active' ? 'Turn off' : 'Turn on';
  toggle.textContent = label;
  toggle.setAttribute('aria-label', label + ' ' + p.name);
}

async function act(name, what, button) {
  let r;
  if (button.getAttribute('aria-disabled') === 'true') return;
  // aria-disabled, not disabled: the button keeps the keyboard focus.
  button.setAttribute('aria-disabled', 'true');
  try {
    if (what === 'toggle') {
      say(`Switching ${name}…`);
      r = await api('POST', `/plugins/${enc(name)}/toggle`);
      if (r.ok) say(`${name} is ${r.data.status}.`, 'good');
    } else if (what === 'reload') {
      say(`Reloading ${name}…`);
      r = await api('POST', `/plugins/${enc(name)}/reload`);
      if (r.ok) say(`${name} reloaded.`, 'good');
    } else if (what === 'uninstall') {
      if (!confirm(`Uninstall ${name}? Its rows and libraries are deleted, and its source if it was uploaded.`)) return;
      r = await api('DELETE', `/plugins/${enc(name)}`);
      if (r.ok) say(`${name} is uninstalled.`, 'good');
    }
    if (r && !r.ok && r.status !== 401) say(`${name}: ${problem(r)}`, 'bad');
  } finally {
    button.removeAttribute('aria-disabled');
    await refresh();
  }
}

// The detail panel of one plugin.

async function select(name, focus = true) {
  selected = name;
  $('#detail').hidden = false;
  const heading = $('#detail-heading');
  heading.textContent = name;
  heading.tabIndex = -1;
  const from = document.activeElement;
  await Promise.all([loadConfig(name), loadBuilds(name), loadLogs(name)]);
  // Only if the user has not moved on meanwhile.
  if (focus && selected === name && document.activeElement === from) heading.focus();
}

function closeDetail() {
  selected = null;
  $('#detail').hidden = true;
}

function fieldKind(prop) {
  const type = Array.isArray(prop.type) ? prop.type.find((t) => t !== 'null') : prop.type;
  if (Array.isArray(prop.enum)) return 'enum';
  if (type === 'boolean') return 'boolean';
  if (type === 'integer' || type === 'number') return type;
  if (type === 'string') return prop.sensitive || prop.writeOnly || prop.format === 'password' ? 'secret' : 'string';
  return 'json';
}

function hintOf(prop) {
  const parts = [];
  if (prop.description) parts.push(prop.description);
  if (prop.minimum !== undefined) parts.push('at least ' + prop.minimum);
  if (prop.maximum !== undefined) parts.push('at most ' + prop.maximum);
  if (prop.minLength) parts.push('at least ' + prop.minLength + (prop.minLength === 1 ? ' character' : ' characters'));
  if (prop.default !== undefined) parts.push('default ' + JSON.stringify(prop.default));
  return parts.join('; ');
}

function configField(index, key, prop, value, required) {
  // Ids from the position: a key may hold any character.
  const id = 'cfg-' + index;
  const kind = fieldKind(prop);
  const described = [];
  const hint = hintOf(prop);
  if (hint) described.push(id + '-hint');
  described.push(id + '-error');
  const initial = value === undefined ? undefined : JSON.stringify(value);
  const common = {
    id,
    name: key,
    dataset: { kind, initial, default: prop.default === undefined ? undefined : JSON.stringify(prop.default) },
    'aria-describedby': described.join(' '),
    required: required || undefined,
  };
  let input;
  if (kind === 'enum') {
    const unset = value === undefined && !required ? [h('option', { value: '', selected: true }, '(not set)')] : [];
    input = h('select', common, ...unset, ...prop.enum.map((v) => h('option', { value: JSON.stringify(v), selected: v === value || undefined }, String(v))));
  } else if (kind === 'boolean') {
    input = h('input', { ...common, type: 'checkbox', checked: value === true || undefined });
  } else if (kind === 'integer' || kind === 'number') {
    input = h('input', { ...common, type: 'number', step: kind === 'integer' ? '1' : 'any', value: value ?? '' });
  } else if (kind === 'string' || kind === 'secret') {
    input = h('input', { ...common, type: kind === 'secret' ? 'password' : 'text', autocomplete: 'off', value: value ?? '' });
  } else {
    input = h('textarea', { ...common, rows: '3' });
    input.value = value === undefined ? '' : JSON.stringify(value, null, 2);
  }
  return [
    h('label', { for: id, text: key + (required ? ' (required)' : '') }),
    h(
      'div',
      {},
      input,
      hint ? h('p', { class: 'hint', id: id + '-hint', text: hint }) : null,
      h('p', { class: 'field-error', id: id + '-error', hidden: true }),
    ),
  ];
}

async function loadConfig(name) {
  const form = $('#config-form');
  const r = await api('GET', `/plugins/${enc(name)}/config`);
  // Another plugin was chosen meanwhile: its own form is (being) shown.
  if (name !== selected) return;
  form.replaceChildren();
  delete form.dataset.whole;
  form.dataset.plugin = name;
  if (!r.ok) {
    form.append(h('p', { class: 'form-error', text: problem(r) }));
    return;
  }
  const { config, schema } = r.data;
  const props = schema && schema.properties;
  const required = new Set((schema && schema.required) || []);
  form.append(h('p', { class: 'form-error', id: 'config-error', role: 'alert', hidden: true }));
  if (props) {
    Object.entries(props).forEach(([key, prop], i) => form.append(...configField(i, key, prop, config[key], required.has(key))));
  } else {
    form.append(...configField(0, 'config', { description: 'This plugin declares no configSchema: its whole config, as JSON.' }, config, false));
    form.dataset.whole = 'true';
  }
  form.append(h('div', { class: 'actions' }, h('button', { type: 'submit' }, 'Save configuration')));
}

function showFieldError(form, key, message) {
  const input = form.querySelector(`[name="${CSS.escape(key)}"]`);
  const error = input && form.querySelector('#' + CSS.escape(input.id + '-error'));
  if (!input || !error) return false;
  input.setAttribute('aria-invalid', 'true');
  error.hidden = false;
  error.textContent = error.textContent ? error.textContent + '; ' + message : message;
  return true;
}

function clearErrors(form) {
  for (const input of form.querySelectorAll('[aria-invalid]')) input.removeAttribute('aria-invalid');
  for (const error of form.querySelectorAll('.field-error, .form-error')) {
    error.hidden = true;
    error.textContent = '';
  }
}

// What a field holds now, as a JSON value (undefined: not set); bad JSON throws.
function valueOf(input) {
  const kind = input.dataset.kind;
  if (kind === 'boolean') return input.checked;
  if (kind === 'enum') return input.value === '' ? undefined : JSON.parse(input.value);
  if (input.value === '') return undefined;
  if (kind === 'integer' || kind === 'number') return Number(input.value);
  if (kind === 'json') return JSON.parse(input.value);
  return input.value;
}

// The config to send: each field the user changed, and each one that holds something other
// than its default (so that saving does not pin defaults into the row).
function readConfig(form) {
  const config = {};
  const bad = [];
  for (const input of form.querySelectorAll('[data-kind]')) {
    let value;
    try {
      value = valueOf(input);
    } catch (e) {
      bad.push([input.name, 'not valid JSON: ' + e.message]);
      continue;
    }
    const now = value === undefined ? undefined : JSON.stringify(value);
    const changed = now !== input.dataset.initial;
    const isDefault = now === input.dataset.default || (now === undefined && input.dataset.initial === undefined);
    if (value !== undefined && (changed || !isDefault)) config[input.name] = value;
  }
  if (form.dataset.whole === 'true') return { config: config.config ?? {}, bad };
  return { config, bad };
}

async function saveConfig(event) {
  event.preventDefault();
  const form = event.currentTarget;
  // The plugin whose form this is (not whichever is chosen by the time it answers).
  const name = form.dataset.plugin;
  clearErrors(form);
  const { config, bad } = readConfig(form);
  for (const [key, message] of bad) showFieldError(form, key, message);
  if (bad.length) {
    form.querySelector('[aria-invalid="true"]').focus();
    return;
  }
  say(`Saving the configuration of ${name}…`);
  const r = await api('PUT', `/plugins/${enc(name)}/config`, config);
  if (r.ok) {
    say(`The configuration of ${name} is saved and applied.`, 'good');
    if (selected === name) {
      await loadConfig(name);
      const submit = form.querySelector('button[type=submit]');
      if (submit) submit.focus();
    }
    return;
  }
  const violations = (r.data && r.data.details && r.data.details.violations) || [];
  const general = [];
  for (const v of violations) {
    const key = (v.path || '').split('/')[1];
    const decoded = key === undefined ? undefined : key.replace(/~1/g, '/').replace(/~0/g, '~');
    if (decoded === undefined || form.dataset.whole === 'true' || !showFieldError(form, decoded, v.message)) general.push(v.message);
  }
  if (!violations.length) general.push(problem(r));
  if (general.length) {
    const error = form.querySelector('#config-error');
    error.hidden = false;
    error.textContent = general.join('; ');
  }
  say(`The configuration of ${name} was not saved: ${problem(r)}`, 'bad');
  const first = form.querySelector('[aria-invalid="true"]');
  if (first) first.focus();
}

async function loadBuilds(name) {
  const list = $('#builds');
  const r = await api('GET', `/plugins/${enc(name)}/builds`);
  if (name !== selected) return;
  list.replaceChildren();
  if (!r.ok) {
    list.append(h('li', { class: 'failed', text: problem(r) }));
    return;
  }
  if (!r.data.length) list.append(h('li', { text: 'No builds recorded (a library built before, or a prebuilt one, was used).' }));
  for (const b of r.data) {
    const when = new Date(b.started_at).toLocaleString();
    const item = h('li', { class: b.success ? '' : 'failed', text: `${when}: ${b.success ? 'built' : 'failed'} in ${b.duration_ms} ms` });
    if (b.messages.length) {
      item.append(
        h('ul', {}, ...b.messages.map((m) => h('li', { text: `${m.level}${m.code ? ' ' + m.code : ''}: ${m.message}${m.file ? ` (${m.file}:${m.line}:${m.column})` : ''}` }))),
      );
    }
    if (b.diagnostics) item.append(h('pre', { text: b.diagnostics }));
    list.append(item);
  }
}

async function loadLogs(name) {
  const r = await api('GET', `/plugins/${enc(name)}/logs?limit=100`);
  if (name !== selected) return;
  const tbody = $('#logs tbody');
  if (!r.ok) {
    tbody.replaceChildren(h('tr', {}, h('td', { colspan: '3', class: 'failed', text: problem(r) })));
    return;
  }
  const rows = r.data.slice().reverse().map((l) => {
    const fields = l.fields && Object.keys(l.fields).length ? ' ' + JSON.stringify(l.fields) : '';
    return h(
      'tr',
      { dataset: { seq: String(l.seq) } },
      h('td', { text: new Date(l.at).toLocaleTimeString() }),
      h('td', { text: l.level + (l.kind !== 'log' ? ` (${l.kind})` : '') }),
      h('td', { text: (l.route ? l.route + ': ' : '') + l.message + fields }),
    );
  });
  if (!rows.length) rows.push(h('tr', {}, h('td', { colspan: '3', text: 'Nothing logged yet.' })));
  tbody.replaceChildren(...rows);
}

async function upload(event) {
  event.preventDefault();
  const uploadForm = event.currentTarget;
  const input = $('#archive');
  const file = input.files[0];
  if (!file) {
    say('Choose a .tar.gz archive of a plugin crate first.', 'bad');
    input.focus();
    return;
  }
  const form = new FormData();
  form.append('file', file, file.name);
  say(`Installing ${file.name} (its first build can take a while)…`);
  const r = await api('POST', '/plugins/install', form);
  if (r.ok) {
    say(`Installed ${r.data.name} ${r.data.version}.`, 'good');
    uploadForm.reset();
  } else if (r.status !== 401) {
    say(`${file.name} was not installed: ${problem(r)}`, 'bad');
  }
  await refresh();
}

function useToken(event) {
  event.preventDefault();
  token = $('#token').value;
  $('#token').value = '';
  $('#token').placeholder = token ? 'in use' : '';
  say(token ? 'Using the token.' : 'Not using a token.', 'good');
  lastList = '';
  refresh();
  if (selected) select(selected, false);
}

document.addEventListener('DOMContentLoaded', () => {
  $('#token-form').addEventListener('submit', useToken);
  $('#upload-form').addEventListener('submit', upload);
  $('#config-form').addEventListener('submit', saveConfig);
  refresh();
  setInterval(() => {
    refresh();
    if (selected && !logsLoading) {
      logsLoading = true;
      loadLogs(selected).finally(() => {
        logsLoading = false;
      });
    }
  }, TICK_MS);
});
