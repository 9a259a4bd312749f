/* RxVision fleet dashboard (served by rxfleet at /).
 *
 * Plain ES2020, no framework and no build step. A tiny hash router picks a
 * page; a page builds its skeleton once (headings, controls, empty panels)
 * and returns a loader: an async function that fetches everything the page
 * shows and resolves to a "fill" function which writes it into the skeleton.
 * The 30 s auto-refresh and the range pickers run the loader again, so
 * inputs, sort order, filters and the scroll position survive a refresh, and
 * a response that arrives after a newer one started is dropped.
 *
 * API data (device ids, sites, versions, event details) is untrusted: it is
 * only ever put into the page as text nodes / textContent, never as HTML.
 */
(() => {
  'use strict';

  const TOKEN_KEY = 'rxfleet.token';
  const API = '/api/v1';
  const REFRESH_MS = 30000;
  const HOUR = 3600000;
  const RANGES = { '1h': ['Last hour', HOUR], '24h': ['Last 24 h', 24 * HOUR], '7d': ['Last 7 days', 7 * 24 * HOUR] };
  const SITE_PAGE = 200; // site rows rendered per "show more"
  const DEVICE_PAGE = 100; // devices per server page
  const EVENT_PAGE = 50;
  const CHART_HEIGHT = 190;
  const VERDICTS = ['MATCH', 'MISMATCH', 'UNCERTAIN', 'IDENTIFIED', 'NO_PILL', 'BAD_IMAGE'];
  const COLORS = {
    MATCH: '#2e7d32', MISMATCH: '#c62828', UNCERTAIN: '#e69500',
    IDENTIFIED: '#1f6fb2', NO_PILL: '#8a8f98', BAD_IMAGE: '#8e44ad',
  };
  const REASONS = { offline: 'offline', backlog: 'backlog', fallbacks: 'engine fallbacks', chain_rewritten: 'audit chain rewritten' };
  const REASON_TONE = { offline: 'red', chain_rewritten: 'red', backlog: 'amber', fallbacks: 'amber' };
  const STATE_TONE = { online: 'green', offline: 'red', retired: 'grey', never_seen: 'amber' };

  // UI state that outlives a page (kept across refreshes and navigation).
  const state = {
    me: null, // whoami
    view: null, // the current page: { page, root, load, seq, charts, dead, ... }
    range: '24h', // overview and site pages
    deviceRange: '7d', // device page
    sites: { sort: 'site', order: 'asc', filter: '', attentionOnly: false, shown: SITE_PAGE },
  };
  const $app = document.getElementById('app');
  const $status = document.getElementById('status');

  // ---------------------------------------------------------------- DOM helpers

  /** Creates an element. props: class, testid, on<event> (listener), anything else
   * becomes an attribute (true → empty attribute; null/false → omitted).
   * Children: nodes or strings (strings become text nodes), nested arrays ok. */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'testid') node.dataset.testid = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c != null && c !== false) node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }
  const muted = (text) => el('span', { class: 'muted' }, text);
  const loading = () => el('p', { class: 'muted loading' }, 'Loading…');
  const panel = (title, props, ...children) =>
    el('section', { class: 'panel', ...props }, title && el('h2', {}, title), ...children);
  const pageHead = (title, ...controls) =>
    el('div', { class: 'page-head' }, el('h1', {}, title), el('div', { class: 'controls' }, controls));
  const badge = (text, tone, props) => el('span', { class: 'badge ' + (tone || ''), ...props }, text);
  const stateBadge = (s, props) =>
    badge(s ? s.replace(/_/g, ' ') : 'unknown', STATE_TONE[s] || 'grey', { 'data-state': s, ...props });
  const emptyRow = (cols, text) => el('tr', { class: 'empty' }, el('td', { colspan: cols }, text));

  const enc = encodeURIComponent;
  const deviceHref = (id) => '#/device/' + enc(id);
  const siteHref = (site) => '#/site/' + enc(site);
  const deviceLink = (id) => el('a', { href: deviceHref(id), class: 'mono' }, id);
  const siteLink = (site) => el('a', { href: siteHref(site) }, site);

  // ----------------------------------------------------------------- formatters

  const NUM = new Intl.NumberFormat('en-US');
  const fmtInt = (n) => (n == null ? '—' : NUM.format(n));
  const fmtPct = (x) => (x == null ? '—' : (x * 100).toFixed(1) + '%');
  const fmtMs = (x) => (x == null ? '—' : (x < 10 && !Number.isInteger(x) ? x.toFixed(1) : NUM.format(Math.round(x))) + ' ms');
  const fmtDate = (ms) => (ms == null ? '—' : new Date(ms).toLocaleString());
  const orUnknown = (v) => (v == null || v === '' ? muted('unknown') : String(v));

  function fmtSpan(sec) {
    if (sec < 60) return Math.round(sec) + ' s';
    if (sec < 3600) return Math.round(sec / 60) + ' min';
    if (sec < 48 * 3600) return (sec < 36000 ? (sec / 3600).toFixed(1) : Math.round(sec / 3600)) + ' h';
    return Math.round(sec / 86400) + ' d';
  }
  /** "5 min ago"; a time in the future (device clock ahead) reads "in 5 min". */
  function fmtAgo(ms) {
    if (ms == null) return '—';
    const sec = (Date.now() - ms) / 1000;
    if (Math.abs(sec) < 10) return 'just now';
    return sec > 0 ? fmtSpan(sec) + ' ago' : 'in ' + fmtSpan(-sec);
  }
  /** A time as the local date plus how long ago, full ISO time on hover. */
  function when(ms) {
    if (ms == null) return muted('—');
    const iso = new Date(ms).toISOString();
    return el('time', { datetime: iso, title: iso }, fmtDate(ms), ' ', muted('(' + fmtAgo(ms) + ')'));
  }

  /** One attention reason spelled out for the device's own page. */
  function reasonText(reason, d) {
    switch (reason) {
      case 'offline':
        return d.last_seen_ms == null ? 'offline' : `offline (last seen ${fmtAgo(d.last_seen_ms)})`;
      case 'backlog':
        return `backlog: ${fmtInt(d.outbox_depth || 0)} messages waiting` +
          (d.outbox_oldest_unacked_ms == null ? '' : `, oldest ${fmtAgo(d.outbox_oldest_unacked_ms)}`);
      case 'fallbacks':
        return 'engine fallbacks (the appliance fell back from its preferred inference engine)';
      case 'chain_rewritten':
        return `audit chain rewritten at ${fmtDate(d.audit_chain && d.audit_chain.rewritten_ms)}`;
      default:
        return reason; // a reason newer than this dashboard
    }
  }
  const reasonChips = (d) =>
    (d.attention || []).map((r) => badge(REASONS[r] || r, REASON_TONE[r] || 'amber', { title: reasonText(r, d) }));

  // ------------------------------------------------------------------------ API

  class ApiError extends Error {
    constructor(message, status, code) {
      super(message);
      Object.assign(this, { status, code });
    }
  }

  /** Calls the API with the stored bearer token. Resolves to the JSON body;
   * rejects with an ApiError carrying the server's error message. */
  async function api(path, params, method = 'GET') {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) throw new ApiError('Not signed in.', 401, 'unauthenticated');
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) if (v != null && v !== '') query.set(k, v);
    const qs = query.toString();
    const init = { method, cache: 'no-store', headers: { Authorization: 'Bearer ' + token, Accept: 'application/json' } };
    if (method !== 'GET') {
      init.headers['Content-Type'] = 'application/json';
      init.body = '{}';
    }
    let res;
    try {
      res = await fetch(API + path + (qs ? '?' + qs : ''), init);
    } catch (e) {
      throw new ApiError('The server could not be reached (' + e.message + ').', 0, 'network');
    }
    const body = await res.json().catch(() => null); // null: empty or non-JSON body
    if (!res.ok) {
      const err = (body && body.error) || {};
      throw new ApiError(err.message || `HTTP ${res.status} ${res.statusText}`, res.status, err.code);
    }
    return body;
  }

  function rangeMs(key) {
    const to_ms = Date.now();
    return { from_ms: to_ms - RANGES[key][1], to_ms };
  }

  // --------------------------------------------------------------------- charts

  const CHARTS = [
    {
      key: 'scans', title: 'Scans per hour by verdict', fmt: fmtInt,
      series: VERDICTS.map((v) => ({ label: v, stroke: COLORS[v], get: (b) => (b ? b.verdicts[v] || 0 : 0) })),
    },
    {
      key: 'latency', title: 'Latency', fmt: fmtMs,
      series: [
        { label: 'p50', stroke: '#1f6fb2', get: (b) => (b ? b.latency_p50_ms : null) },
        { label: 'p95', stroke: '#c62828', get: (b) => (b ? b.latency_p95_ms : null) },
      ],
    },
    {
      key: 'quality', title: 'Accuracy, MATCH and UNCERTAIN share', fmt: fmtPct, range: [0, 1],
      series: [
        { label: 'accuracy', stroke: '#2e7d32', get: (b) => (b ? b.accuracy : null) },
        { label: 'match', stroke: '#1f6fb2', get: (b) => (b ? b.match_rate : null) },
        { label: 'uncertain', stroke: '#e69500', get: (b) => (b ? b.uncertain_rate : null) },
      ],
    },
  ];

  /** The telemetry's hourly buckets on a full hourly grid over [from, to):
   * the API only sends hours with data; a missing hour is 0 scans and a gap
   * in the rates. x values are Unix seconds (uPlot's time unit). */
  function hourly(tel) {
    const first = Math.floor(tel.from_ms / HOUR);
    const last = Math.max(first, Math.floor((tel.to_ms - 1) / HOUR));
    const byHour = new Map(tel.series.map((b) => [Math.floor(b.start_ms / HOUR), b]));
    const xs = [];
    const rows = [];
    for (let h = first; h <= last; h++) {
      xs.push((h * HOUR) / 1000);
      rows.push(byHour.get(h) || null);
    }
    return { xs, rows };
  }

  const chartWidth = (box) => Math.max(260, box.clientWidth || 400);

  function makeChart(spec, box, data) {
    const axis = { stroke: '#5b6270', grid: { stroke: '#eceef1' }, ticks: { stroke: '#d7dbe0' } };
    // y from 0 (or the spec's fixed range) so that small changes do not look dramatic
    const y = spec.range ? { range: spec.range } : { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] };
    return new uPlot({
      width: chartWidth(box),
      height: CHART_HEIGHT,
      cursor: { drag: { x: false, y: false } }, // no zoom: the range picker chooses the window
      scales: { x: { time: true }, y },
      series: [
        { value: (u, v) => (v == null ? '—' : fmtDate(v * 1000)) },
        // counts are 0 in an hour without data; rates and latencies are joined across such hours
        ...spec.series.map((s) => ({ label: s.label, stroke: s.stroke, width: 1.5, spanGaps: spec.key !== 'scans', value: (u, v) => spec.fmt(v) })),
      ],
      axes: [axis, { ...axis, size: 62, values: (u, ticks) => ticks.map(spec.fmt) }],
    }, data, box);
  }

  /** A panel of the three telemetry charts; update() draws or redraws them. */
  function chartsPanel(testid) {
    const note = el('p', { class: 'muted note' });
    const grid = el('div', { class: 'charts', testid });
    const boxes = {};
    for (const spec of CHARTS) {
      boxes[spec.key] = el('div', { class: 'chart-box', 'data-chart': spec.key });
      grid.append(el('figure', { class: 'chart' }, el('figcaption', {}, spec.title), boxes[spec.key]));
    }
    function update(view, tel) {
      note.textContent = tel.series.length ? '' : 'No telemetry in this time range.';
      if (typeof uPlot === 'undefined') {
        note.textContent = 'Charts are unavailable (uPlot did not load).';
        return;
      }
      const { xs, rows } = hourly(tel);
      for (const spec of CHARTS) {
        const data = [xs, ...spec.series.map((s) => rows.map(s.get))];
        const chart = view.charts.get(spec.key);
        if (chart) chart.setData(data);
        else view.charts.set(spec.key, makeChart(spec, boxes[spec.key], data));
      }
    }
    return { el: panel('Telemetry (hourly)', {}, note, grid), update };
  }

  // ---------------------------------------------------------------------- tiles

  function tile(label, testid, value, text, opts = {}) {
    return el('div', { class: 'tile ' + (opts.tone || '') },
      el('div', { class: 'tile-label' }, label),
      el('div', { class: 'tile-value', testid, 'data-value': value == null ? '' : String(value) }, text),
      opts.sub && el('div', { class: 'tile-sub' }, opts.sub));
  }

  /** Tiles of an Aggregate; testids are `<prefix>-scans`, `<prefix>-match-rate`, … */
  function telemetryTiles(t, prefix) {
    const fb = t.feedback_confirmed + t.feedback_corrected;
    return [
      tile('Scans', prefix + '-scans', t.scans, fmtInt(t.scans), { sub: `${fmtInt(t.refusals)} refused` }),
      tile('MATCH share', prefix + '-match-rate', t.match_rate, fmtPct(t.match_rate),
        { sub: `${fmtInt(t.verdicts.MISMATCH)} mismatches` }),
      tile('UNCERTAIN share', prefix + '-uncertain-rate', t.uncertain_rate, fmtPct(t.uncertain_rate),
        { sub: `bad image ${fmtPct(t.bad_image_rate)}` }),
      tile('Feedback accuracy', prefix + '-accuracy', t.accuracy, fmtPct(t.accuracy),
        { sub: `n = ${fmtInt(fb)} (${fmtInt(t.feedback_corrected)} corrected)` }),
      tile('Latency p95', prefix + '-latency-p95', t.latency_p95_ms, fmtMs(t.latency_p95_ms),
        { sub: `p50 ${fmtMs(t.latency_p50_ms)}` }),
      tile('Engine fallbacks', prefix + '-fallbacks', t.engine_fallbacks, fmtInt(t.engine_fallbacks),
        { tone: t.engine_fallbacks ? 'amber' : '' }),
    ];
  }

  // ----------------------------------------------------------- fleet overview

  function pageFleet(view) {
    const tiles = el('div', { class: 'tiles' }, loading());
    const attention = el('div', {}, loading());
    const versions = el('div', { class: 'scroll' }, loading());
    const charts = chartsPanel('fleet-chart');
    const sites = siteTable();
    view.root.append(
      pageHead('Fleet overview', rangePicker(view, 'range')),
      tiles,
      el('div', { class: 'cols' },
        panel('Needs attention', { class: 'panel attention' }, attention),
        panel('Versions and engines', {}, versions)),
      charts.el,
      sites.el);

    return async () => {
      const range = rangeMs(state.range);
      const [fleet, tel, siteList, att] = await Promise.all([
        api('/fleet', range),
        api('/fleet/telemetry', range),
        api('/sites', range),
        api('/devices', { state: 'attention', limit: 50 }),
      ]);
      return () => {
        const d = fleet.devices;
        tiles.replaceChildren(
          tile('Devices', 'fleet-devices-total', d.total, fmtInt(d.total)),
          tile('Online', 'fleet-devices-online', d.online, fmtInt(d.online), { tone: 'green' }),
          tile('Offline', 'fleet-devices-offline', d.offline, fmtInt(d.offline), { tone: d.offline ? 'red' : '' }),
          tile('Never seen', 'fleet-devices-never-seen', d.never_seen, fmtInt(d.never_seen)),
          tile('Retired', 'fleet-devices-retired', d.retired, fmtInt(d.retired)),
          ...telemetryTiles(fleet.telemetry, 'fleet'));
        attention.replaceChildren(...attentionPanel(fleet.attention, att));
        versions.replaceChildren(versionsTable(fleet.versions));
        charts.update(view, tel);
        sites.setData(siteList.items);
      };
    };
  }

  function attentionPanel(counts, att) {
    const chips = el('div', { class: 'reason-counts' }, Object.entries(REASONS).map(([k, label]) =>
      el('div', { class: 'count ' + (counts[k] ? REASON_TONE[k] : 'zero'), testid: 'attention-' + k.replace(/_/g, '-') },
        el('strong', {}, fmtInt(counts[k] || 0)), ' ' + label)));
    const list = el('ul', { class: 'attention-list', testid: 'attention-list' }, att.items.map((d) =>
      el('li', { 'data-device': d.device_id }, deviceLink(d.device_id), ' ', el('span', { class: 'muted' }, '· '),
        siteLink(d.site), ' ', el('span', { class: 'chips' }, reasonChips(d)))));
    if (!att.items.length) list.append(el('li', { class: 'muted' }, 'Nothing needs attention.'));
    const more = att.total > att.items.length &&
      el('p', {}, el('a', { href: '#/devices?state=attention' }, `All ${fmtInt(att.total)} devices needing attention →`));
    return [chips, list, more].filter(Boolean);
  }

  function versionsTable(list) {
    const total = list.reduce((s, v) => s + v.devices, 0) || 1;
    const rows = [...list].sort((a, b) => b.devices - a.devices).map((v) => {
      const fill = el('span');
      fill.style.width = ((100 * v.devices) / total).toFixed(1) + '%';
      return el('tr', {},
        el('td', {}, orUnknown(v.model_version)), el('td', {}, orUnknown(v.daemon_version)),
        el('td', {}, orUnknown(v.engine)), el('td', { class: 'num' }, fmtInt(v.devices)),
        el('td', { class: 'share' }, el('div', { class: 'bar' }, fill), fmtPct(v.devices / total)));
    });
    return el('table', { class: 'grid', testid: 'versions-table' },
      el('thead', {}, el('tr', {}, ['Model', 'Daemon', 'Engine', 'Devices', 'Share'].map((h, i) =>
        el('th', { class: i === 3 ? 'num' : null }, h)))),
      el('tbody', {}, rows.length ? rows : emptyRow(5, 'No device has reported its versions yet.')));
  }

  // ------------------------------------------------------------------ site table

  const SITE_COLS = [
    { key: 'site', label: 'Site' },
    { key: 'devices', label: 'Devices' },
    { key: 'online', label: 'Online' },
    { key: 'offline', label: 'Offline', tone: (v) => (v ? 'red' : '') },
    { key: 'retired', label: 'Retired' },
    { key: 'attention', label: 'Attention', tone: (v) => (v ? 'amber' : '') },
    { key: 'scans', label: 'Scans' },
    { key: 'match_rate', label: 'MATCH', fmt: fmtPct },
    { key: 'uncertain_rate', label: 'UNCERTAIN', fmt: fmtPct },
    { key: 'accuracy', label: 'Accuracy', fmt: fmtPct },
    { key: 'latency_p95_ms', label: 'p95', fmt: fmtMs },
  ];

  /** All sites at once, sorted and filtered here; renders the first
   * state.sites.shown matching rows (more on request) and re-renders only on
   * sort, filter or new data. Clicking a header sorts by it ascending,
   * clicking it again toggles the order; empty values always sort last. */
  function siteTable() {
    const st = state.sites;
    const collator = new Intl.Collator('en', { numeric: true, sensitivity: 'base' });
    let items = [];
    let timer = null;

    const ths = SITE_COLS.map((c) => el('th', {
      testid: 'sort-' + c.key.replace(/_/g, '-'), class: 'sortable' + (c.key === 'site' ? '' : ' num'),
      scope: 'col', tabindex: 0, title: 'Sort by ' + c.label,
      onclick: () => sortBy(c.key),
      onkeydown: (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); sortBy(c.key); } },
    }, c.label, el('span', { class: 'arrow' })));
    const tbody = el('tbody');
    const table = el('table', { class: 'grid sites', testid: 'site-table' }, el('thead', {}, el('tr', {}, ths)), tbody);
    // A click anywhere on a row opens the site (the name itself is a real link).
    tbody.addEventListener('click', (e) => {
      const tr = e.target.closest('tr[data-site]');
      if (tr && !e.target.closest('a')) navigate(siteHref(tr.dataset.site));
    });

    const filter = el('input', { type: 'search', placeholder: 'Filter sites…', value: st.filter, testid: 'site-filter', 'aria-label': 'Filter sites by name' });
    filter.addEventListener('input', () => {
      clearTimeout(timer);
      timer = setTimeout(() => { st.filter = filter.value; st.shown = SITE_PAGE; render('filter'); }, 150);
    });
    const only = el('input', { type: 'checkbox', checked: st.attentionOnly, testid: 'site-attention-only' });
    only.addEventListener('change', () => { st.attentionOnly = only.checked; st.shown = SITE_PAGE; render('filter'); });
    const count = el('span', { class: 'muted', testid: 'site-count' });
    const more = el('button', { type: 'button', testid: 'site-show-more', hidden: true, onclick: () => { st.shown += SITE_PAGE; render('more'); } }, 'Show more');

    function sortBy(key) {
      if (st.sort === key) st.order = st.order === 'asc' ? 'desc' : 'asc';
      else { st.sort = key; st.order = 'asc'; }
      st.shown = SITE_PAGE;
      render('sort');
    }

    function compare(a, b) {
      const x = a[st.sort];
      const y = b[st.sort];
      if (x == null || y == null) return x == null && y == null ? collator.compare(a.site, b.site) : x == null ? 1 : -1;
      const c = typeof x === 'string' ? collator.compare(x, y) : x - y;
      return c ? (st.order === 'desc' ? -c : c) : collator.compare(a.site, b.site);
    }

    function row(s) {
      const tr = el('tr', { testid: 'site-row', 'data-site': s.site, class: s.attention > 0 ? 'attn' : null });
      for (const c of SITE_COLS) {
        const v = s[c.key];
        tr.append(c.key === 'site' ? el('td', {}, siteLink(s.site))
          : el('td', { class: 'num ' + (c.tone ? c.tone(v) : '') }, (c.fmt || fmtInt)(v)));
      }
      return tr;
    }

    function render(why) {
      const t0 = performance.now();
      const needle = st.filter.trim().toLowerCase();
      let rows = items.filter((s) => (!needle || s.lc.includes(needle)) && (!st.attentionOnly || s.attention > 0));
      rows.sort(compare);
      const t1 = performance.now();
      const frag = document.createDocumentFragment();
      const shown = rows.slice(0, st.shown);
      for (const s of shown) frag.append(row(s));
      if (!rows.length) frag.append(emptyRow(SITE_COLS.length, items.length ? 'No site matches the filter.' : 'No sites yet.'));
      tbody.replaceChildren(frag);
      ths.forEach((th, i) => {
        const on = SITE_COLS[i].key === st.sort;
        th.setAttribute('aria-sort', on ? (st.order === 'asc' ? 'ascending' : 'descending') : 'none');
        th.lastChild.textContent = on ? (st.order === 'asc' ? ' ▲' : ' ▼') : '';
      });
      count.textContent = `Showing ${fmtInt(shown.length)} of ${fmtInt(rows.length)} sites` +
        (rows.length !== items.length ? ` (${fmtInt(items.length)} in total)` : '');
      more.hidden = rows.length <= st.shown;
      more.textContent = `Show ${fmtInt(Math.min(SITE_PAGE, rows.length - st.shown))} more`;
      void table.offsetHeight; // force layout so the timing below includes it
      const ms = performance.now() - t0;
      table.dataset.renderMs = ms.toFixed(1);
      console.log(`site table ${why}: ${rows.length}/${items.length} sites, ${shown.length} rows in ${ms.toFixed(1)} ms (filter+sort ${(t1 - t0).toFixed(1)} ms)`);
    }

    function setData(list) {
      items = list.map((s) => ({ ...s, lc: String(s.site).toLowerCase() }));
      render('data');
    }

    return {
      el: panel('Sites', {},
        el('div', { class: 'toolbar' }, filter,
          el('label', { class: 'check' }, only, ' only sites needing attention'), el('span', { class: 'spacer' }), count),
        el('div', { class: 'scroll' }, table),
        el('div', { class: 'table-foot' }, more)),
      setData,
    };
  }

  // ---------------------------------------------------------------- device list

  const DEVICE_COLS = [
    ['device_id', 'Device', true], ['site', 'Site', true], ['state', 'State'], ['last_seen', 'Last seen', true],
    ['daemon', 'Daemon'], ['model', 'Model'], ['engine', 'Engine'], ['backlog', 'Backlog', true], ['attention', 'Attention'],
  ];

  /** A server-paged device table. `fixed`: the filters this list always sends
   * (site, q, state). Sorting is done by the server; paging follows cursors. */
  function deviceTable(view, fixed) {
    const st = { sort: 'device_id', order: 'asc', cursors: [null], page: 0, seq: 0 };
    const cols = DEVICE_COLS.filter(([k]) => !(k === 'site' && fixed.site));
    const ths = cols.map(([key, label, sortable]) => el('th', {
      class: sortable ? 'sortable' : null, testid: sortable ? 'dsort-' + key.replace(/_/g, '-') : null,
      tabindex: sortable ? 0 : null, onclick: sortable ? () => sortBy(key) : null,
    }, label, sortable ? el('span', { class: 'arrow' }) : null));
    const tbody = el('tbody', {}, emptyRow(cols.length, 'Loading…'));
    const info = el('span', { class: 'muted', testid: 'devices-info' });
    const error = el('span', { class: 'error' });
    const prev = el('button', { type: 'button', testid: 'devices-prev', disabled: true, onclick: () => { st.page--; go(); } }, '← Previous');
    const next = el('button', { type: 'button', testid: 'devices-next', disabled: true, onclick: () => { st.page++; go(); } }, 'Next →');

    function sortBy(key) {
      if (st.sort === key) st.order = st.order === 'asc' ? 'desc' : 'asc';
      else { st.sort = key; st.order = key === 'last_seen' || key === 'backlog' ? 'desc' : 'asc'; }
      st.cursors = [null];
      st.page = 0;
      go();
    }

    /** Fetches the current page; resolves to a function that renders it. */
    async function load() {
      const my = ++st.seq;
      const res = await api('/devices', { ...fixed, sort: st.sort, order: st.order, limit: DEVICE_PAGE, cursor: st.cursors[st.page] });
      return () => {
        if (my !== st.seq || view.dead) return;
        st.cursors[st.page + 1] = res.next_cursor;
        const frag = document.createDocumentFragment();
        for (const d of res.items) frag.append(row(d));
        if (!res.items.length) frag.append(emptyRow(cols.length, 'No devices.'));
        tbody.replaceChildren(frag);
        info.textContent = `${fmtInt(res.total)} devices · page ${st.page + 1} of ${Math.max(1, Math.ceil(res.total / DEVICE_PAGE))}`;
        prev.disabled = st.page === 0;
        next.disabled = !res.next_cursor;
        error.textContent = '';
        ths.forEach((th, i) => {
          if (th.lastChild.className !== 'arrow') return;
          th.lastChild.textContent = cols[i][0] === st.sort ? (st.order === 'asc' ? ' ▲' : ' ▼') : '';
        });
      };
    }

    async function go() {
      delete document.body.dataset.loaded;
      try {
        (await load())();
      } catch (e) {
        if (e.status === 401) return authLost();
        error.textContent = e.message;
      }
      if (!view.dead) document.body.dataset.loaded = 'true';
    }

    function row(d) {
      const cells = {
        device_id: deviceLink(d.device_id), site: siteLink(d.site), state: stateBadge(d.state),
        last_seen: d.last_seen_ms == null ? muted('never') : fmtAgo(d.last_seen_ms),
        daemon: orUnknown(d.daemon_version), model: orUnknown(d.model_version), engine: orUnknown(d.engine),
        backlog: d.outbox_depth == null ? '—' : fmtInt(d.outbox_depth), attention: reasonChips(d),
      };
      return el('tr', { testid: 'device-row', 'data-device': d.device_id },
        cols.map(([k]) => el('td', { class: k === 'backlog' ? 'num' : null, title: k === 'last_seen' ? fmtDate(d.last_seen_ms) : null }, cells[k])));
    }

    return {
      el: el('div', {},
        el('div', { class: 'scroll' }, el('table', { class: 'grid devices', testid: 'device-table' }, el('thead', {}, el('tr', {}, ths)), tbody)),
        el('div', { class: 'table-foot' }, prev, next, info, error)),
      load,
    };
  }

  // ------------------------------------------------------------------ pages

  function rangePicker(view, key) {
    const box = el('div', { class: 'seg', role: 'group', 'aria-label': 'Time range' });
    for (const [name, [label]] of Object.entries(RANGES)) {
      box.append(el('button', {
        type: 'button', testid: 'range-' + name, 'data-range': name, 'aria-pressed': String(state[key] === name),
        onclick: () => {
          state[key] = name;
          for (const b of box.children) b.setAttribute('aria-pressed', String(b.dataset.range === name));
          load(view, true);
        },
      }, label));
    }
    return box;
  }

  function pageSite(view, { site }) {
    const tiles = el('div', { class: 'tiles' }, loading());
    const charts = chartsPanel('site-chart');
    const devices = deviceTable(view, { site });
    view.root.append(
      el('p', { class: 'crumbs' }, el('a', { href: '#/' }, 'Fleet'), ' / site'),
      pageHead(['Site ', el('span', { class: 'mono', testid: 'site-name' }, site)], rangePicker(view, 'range')),
      tiles, charts.el, panel('Devices', {}, devices.el));
    return async () => {
      const [tel, fillDevices] = await Promise.all([
        api(`/sites/${enc(site)}/telemetry`, rangeMs(state.range)), devices.load()]);
      return () => {
        tiles.replaceChildren(...telemetryTiles(tel.total, 'site'));
        charts.update(view, tel);
        fillDevices();
      };
    };
  }

  function pageDevices(view, params) {
    const fixed = { q: params.q || null, state: params.state || null, site: params.site || null };
    const q = el('input', { type: 'search', value: params.q || '', placeholder: 'Device id contains…', testid: 'devices-q', 'aria-label': 'Device id contains' });
    const sel = el('select', { testid: 'devices-state', 'aria-label': 'State' },
      ['', 'online', 'offline', 'retired', 'never_seen', 'attention'].map((s) =>
        el('option', { value: s, selected: s === (params.state || '') }, s ? s.replace(/_/g, ' ') : 'any state')));
    const go = () => {
      const p = new URLSearchParams();
      if (q.value.trim()) p.set('q', q.value.trim());
      if (sel.value) p.set('state', sel.value);
      if (params.site) p.set('site', params.site);
      navigate('#/devices' + (p.toString() ? '?' + p : ''));
    };
    sel.addEventListener('change', go);
    const table = deviceTable(view, fixed);
    view.root.append(
      pageHead('Devices', el('form', { class: 'toolbar', onsubmit: (e) => { e.preventDefault(); go(); } },
        q, sel, params.site && badge('site: ' + params.site, 'grey'), el('button', { type: 'submit' }, 'Search'))),
      panel(null, {}, table.el));
    return () => table.load();
  }

  function pageDevice(view, { id }) {
    const path = '/devices/' + enc(id);
    const headInfo = el('span', { class: 'head-info' });
    const attention = el('div');
    const fields = el('div', { class: 'fields' }, loading());
    const tiles = el('div', { class: 'tiles' });
    const charts = chartsPanel('device-chart');
    const events = eventList(view, id);
    view.root.append(
      el('p', { class: 'crumbs' }, el('a', { href: '#/' }, 'Fleet'), ' / device'),
      pageHead([el('span', { class: 'mono', testid: 'device-id' }, id), ' ', headInfo], rangePicker(view, 'deviceRange')),
      attention, panel('Details', {}, fields), tiles, charts.el, events.el);
    return async () => {
      const [d, tel, fillEvents] = await Promise.all([
        api(path), api(path + '/telemetry', rangeMs(state.deviceRange)), events.load()]);
      return () => {
        headInfo.replaceChildren(stateBadge(d.state, { testid: 'device-state' }), ' at ', siteLink(d.site));
        attention.replaceChildren(d.attention && d.attention.length
          ? el('div', { class: 'alert', testid: 'device-attention' }, el('strong', {}, 'Needs attention'),
            el('ul', {}, d.attention.map((r) => el('li', { 'data-reason': r }, reasonText(r, d)))))
          : '');
        fields.replaceChildren(...deviceFields(view, d));
        tiles.replaceChildren(...telemetryTiles(tel.total, 'device'));
        charts.update(view, tel);
        fillEvents();
      };
    };
  }

  function fieldGroup(title, pairs, ...extra) {
    return el('div', { class: 'field-group' }, el('h3', {}, title),
      el('dl', {}, pairs.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])), extra);
  }

  function deviceFields(view, d) {
    const c = d.audit_chain || {};
    const head = c.head == null ? muted('—') : el('code', { class: 'hash', title: c.head }, c.head);
    return [
      fieldGroup('Identity', [
        ['Device', el('span', { class: 'mono' }, d.device_id)], ['Site', siteLink(d.site)],
        ['State', stateBadge(d.state)], ['Retired', when(d.retired_ms)]]),
      fieldGroup('Contact', [
        ['First seen', when(d.first_seen_ms)], ['Last seen', when(d.last_seen_ms)],
        ['Acked seq', fmtInt(d.acked_seq)]]),
      fieldGroup('Software', [
        ['Daemon', orUnknown(d.daemon_version)], ['Model', orUnknown(d.model_version)], ['Engine', orUnknown(d.engine)]]),
      fieldGroup('Outbox', [
        ['Waiting', d.outbox_depth == null ? muted('unknown') : fmtInt(d.outbox_depth) + ' messages'],
        ['Oldest unacked', when(d.outbox_oldest_unacked_ms)]]),
      fieldGroup('Audit chain', [
        ['Next seq', fmtInt(c.next_seq)], ['Head', head],
        ['Rewritten', c.rewritten_ms == null ? muted('never') : when(c.rewritten_ms)],
        ['Reviewed', c.rewritten_ms == null ? muted('—') : c.reviewed ? badge('reviewed', 'green') : badge('not reviewed', 'red')]],
      chainReview(view, d)),
    ];
  }

  /** The "mark reviewed" action: only for a rewrite not yet reviewed, and only
   * for operators and admins (the server checks the role as well). */
  function chainReview(view, d) {
    const c = d.audit_chain || {};
    const role = state.me && state.me.role;
    if (c.rewritten_ms == null || c.reviewed || !(role === 'operator' || role === 'admin')) return null;
    const msg = el('span', { class: 'error', testid: 'chain-review-error' });
    const btn = el('button', {
      type: 'button', class: 'primary', testid: 'chain-review',
      onclick: async () => {
        btn.disabled = true;
        msg.textContent = '';
        try {
          await api(`/devices/${enc(d.device_id)}/chain-review`, null, 'POST');
          await load(view, true);
        } catch (e) {
          if (e.status === 401) return authLost();
          btn.disabled = false;
          msg.textContent = e.message;
        }
      },
    }, 'Mark chain rewrite reviewed');
    return el('div', { class: 'actions' }, btn, ' ', msg);
  }

  /** The device's events, newest first. A refresh prepends events newer than
   * the newest shown, so events already paged in with "older" are kept. */
  function eventList(view, deviceId) {
    let items = [];
    let cursor = null;
    let seq = 0;
    const tbody = el('tbody');
    const error = el('span', { class: 'error' });
    const older = el('button', { type: 'button', testid: 'events-older', hidden: true, onclick: loadOlder }, 'Older events');
    const table = el('table', { class: 'grid events', testid: 'device-events' },
      el('thead', {}, el('tr', {}, el('th', {}, 'Time'), el('th', {}, 'Kind'), el('th', {}, 'Details'))), tbody);

    function render() {
      const frag = document.createDocumentFragment();
      for (const e of items) {
        const json = JSON.stringify(e.details);
        const details = !e.details || json === '{}' ? muted('—')
          : el('details', {}, el('summary', {}, json.length > 120 ? json.slice(0, 120) + '…' : json),
            el('pre', {}, JSON.stringify(e.details, null, 2)));
        frag.append(el('tr', { testid: 'device-event', 'data-kind': e.kind },
          el('td', { class: 'nowrap' }, when(e.time_ms)), el('td', {}, badge(e.kind, 'grey')), el('td', {}, details)));
      }
      if (!items.length) frag.append(emptyRow(3, 'No events.'));
      tbody.replaceChildren(frag);
      older.hidden = !cursor;
    }

    async function load() {
      const my = ++seq;
      const res = await api('/events', { device_id: deviceId, limit: EVENT_PAGE });
      return () => {
        if (my !== seq || view.dead) return;
        const newest = items.length ? items[0].id : null;
        const fresh = newest == null ? res.items : res.items.filter((e) => e.id > newest);
        if (fresh.length === res.items.length) {
          items = res.items; // no overlap with what is shown: start over
          cursor = res.next_cursor;
        } else {
          items = fresh.concat(items);
        }
        render();
      };
    }

    async function loadOlder() {
      const my = ++seq;
      older.disabled = true;
      delete document.body.dataset.loaded;
      try {
        const res = await api('/events', { device_id: deviceId, limit: EVENT_PAGE, cursor });
        if (my !== seq || view.dead) return;
        items = items.concat(res.items);
        cursor = res.next_cursor;
        error.textContent = '';
        render();
      } catch (e) {
        if (e.status === 401) return authLost();
        error.textContent = e.message;
      } finally {
        older.disabled = false;
        if (!view.dead) document.body.dataset.loaded = 'true';
      }
    }

    return { el: panel('Events', {}, el('div', { class: 'scroll' }, table), el('div', { class: 'table-foot' }, older, error)), load };
  }

  // ------------------------------------------------------- models and rollouts

  const ROLLOUT_TONE = { running: 'green', paused: 'amber', awaiting_approval: 'amber', completed: 'grey', halted: 'red', aborted: 'red' };
  const MODEL_TONE = { production: 'green', validated: 'green', rolling_out: 'amber', candidate: 'grey', rejected: 'red', halted: 'red', retired: 'grey' };
  const RELEASE_TONE = { production: 'green', deploying: 'amber', available: 'grey', halted: 'red', retired: 'grey' };
  const OUTCOME_TONE = { pass: 'green', continue: 'grey', fail: 'red', inconclusive: 'amber', outage: 'amber' };
  const rolloutHref = (id) => '#/rollout/' + enc(id);
  const fmtRatio = (x) => (x == null ? '—' : x.toFixed(2) + '×');

  function gatesSummary(report) {
    if (!report) return muted('not validated');
    const failed = report.gates.filter((g) => !g.passed).map((g) => g.name);
    const m = report.measures;
    return el('span', {},
      badge(report.passed ? 'gates passed' : 'gates failed', report.passed ? 'green' : 'red', { title: failed.join(', ') }), ' ',
      muted(`automation ${fmtPct(m.automation.rate)}, false MATCH ${fmtPct(m.false_match_lookalike.rate)} / ${fmtPct(m.false_match_unknown.rate)}, p95 ${fmtMs(m.p95_ms)}`));
  }

  function pageRollouts(view) {
    const models = el('div', { class: 'scroll' }, loading());
    const rollouts = el('div', { class: 'scroll' }, loading());
    const releases = el('div', { class: 'scroll' }, loading());
    view.root.append(pageHead('Models and rollouts'), panel('Rollouts', {}, rollouts), panel('Model registry', {}, models),
      panel('Daemon releases', {}, releases));
    return async () => {
      const [modelList, rolloutList, releaseList] = await Promise.all([api('/models'), api('/rollouts'), api('/releases')]);
      return () => {
        releases.replaceChildren(el('table', { testid: 'releases' },
          el('thead', {}, el('tr', {}, ['Version', 'Architecture', 'State', 'Fleet share', 'Why', 'Pushed'].map((h) => el('th', {}, h)))),
          el('tbody', {}, releaseList.length ? releaseList.map((r) => el('tr', { 'data-release': r.version + '-' + r.arch },
            el('td', { class: 'mono' }, 'rxvisiond ' + r.version), el('td', { class: 'mono' }, r.arch),
            el('td', {}, badge(r.state, RELEASE_TONE[r.state], { 'data-state': r.state })),
            el('td', { class: 'num' }, ['deploying', 'halted'].includes(r.state) ? r.percent + ' %' : r.state === 'production' ? '100 %' : '—'),
            el('td', { class: 'small' }, r.state_reason), el('td', {}, when(r.pushed_ms)))) :
            emptyRow(6, 'No daemon release pushed yet (rxfleet releases push).'))));
        rollouts.replaceChildren(el('table', { testid: 'rollouts' },
          el('thead', {}, el('tr', {}, ['#', 'Version', 'Replacing', 'State', 'Fleet share', 'Started'].map((h) => el('th', {}, h)))),
          el('tbody', {}, rolloutList.length ? rolloutList.map((r) => el('tr', { 'data-rollout': r.id },
            el('td', {}, el('a', { href: rolloutHref(r.id) }, '#' + r.id)),
            el('td', { class: 'mono' }, r.model_version), el('td', { class: 'mono' }, r.previous_version),
            el('td', {}, badge(r.state.state.replace(/_/g, ' '), ROLLOUT_TONE[r.state.state], { 'data-state': r.state.state })),
            el('td', { class: 'num' }, r.percent + ' %'), el('td', {}, when(r.created_ms)))) : emptyRow(6, 'No rollout yet.'))));
        models.replaceChildren(el('table', { testid: 'models' },
          el('thead', {}, el('tr', {}, ['Version', 'State', 'Aliases', 'Gates', 'Pushed'].map((h) => el('th', {}, h)))),
          el('tbody', {}, modelList.length ? modelList.map((m) => el('tr', { 'data-version': m.version },
            el('td', { class: 'mono' }, m.name + ' ' + m.version),
            el('td', {}, badge(m.state.replace(/_/g, ' '), MODEL_TONE[m.state], { title: m.state_reason, 'data-state': m.state })),
            el('td', {}, m.aliases.join(', ')), el('td', {}, gatesSummary(m.gate_report)), el('td', {}, when(m.pushed_ms)))) :
            emptyRow(5, 'No model pushed yet (rxfleet models push).'))));
      };
    };
  }

  function rolloutActions(view, r) {
    const role = state.me && state.me.role;
    const s = r.state.state;
    const allowed = [];
    if (s === 'running' && (role === 'operator' || role === 'admin')) allowed.push('pause');
    if (role === 'admin') {
      if (s === 'paused') allowed.push('resume');
      if (s === 'awaiting_approval') allowed.push('approve');
      if (!['completed', 'halted', 'aborted'].includes(s)) allowed.push('abort');
    }
    if (!allowed.length) return null;
    const msg = el('span', { class: 'error', testid: 'rollout-action-error' });
    const buttons = allowed.map((action) => el('button', {
      type: 'button', class: action === 'abort' ? 'danger' : 'primary', testid: 'rollout-' + action,
      onclick: async () => {
        if (action === 'abort' && !window.confirm('Abort this rollout and order its devices back?')) return;
        buttons.forEach((b) => { b.disabled = true; });
        msg.textContent = '';
        try {
          await api(`/rollouts/${r.id}/${action}`, null, 'POST');
          await load(view, true);
        } catch (e) {
          if (e.status === 401) return authLost();
          buttons.forEach((b) => { b.disabled = false; });
          msg.textContent = e.message;
        }
      },
    }, action[0].toUpperCase() + action.slice(1)));
    return el('div', { class: 'actions' }, buttons, ' ', msg);
  }

  function decisionRow(d, plan) {
    const outcome = d.outcome.outcome;
    const why = d.outcome.reason || '';
    const vetoes = d.vetoes[0] + d.vetoes[1];
    return el('tr', { 'data-outcome': outcome },
      el('td', {}, when(d.at_ms), el('div', { class: 'muted small' }, `${fmtInt(d.minutes)} min into the stage`)),
      el('td', { class: 'num' }, (plan.stages[d.stage] ?? '?') + ' %'),
      el('td', {}, badge(outcome, OUTCOME_TONE[outcome], { title: why }), why ? el('div', { class: 'muted small' }, why) : '',
        vetoes ? el('div', { class: 'error small' }, `${d.vetoes[0]} install failures, ${d.vetoes[1]} crash loops`) : ''),
      el('td', { class: 'num' }, `${fmtInt(d.stage_devices[1])} of ${fmtInt(d.stage_devices[0])}`),
      el('td', { class: 'num' }, fmtInt(d.stage_scans)),
      el('td', {}, el('table', { class: 'metrics' }, d.metrics.map((m) => el('tr', { 'data-metric': m.metric },
        el('td', {}, m.metric.replace(/_/g, ' ')),
        el('td', { class: 'num' }, `${fmtInt(m.totals.stage_events)} / ${fmtInt(m.totals.stage_exposure)}`),
        el('td', { class: 'num' }, `${fmtInt(m.totals.control_events)} / ${fmtInt(m.totals.control_exposure)}`),
        el('td', { class: 'num', title: 'stage rate over control rate' }, fmtRatio(m.ratio)),
        el('td', { class: 'num', title: 'confidence sequence' },
          `[${m.interval[0].toFixed(2)}, ${m.interval[1] == null ? '∞' : m.interval[1].toFixed(2)}]`))))));
  }

  function pageRollout(view, { id }) {
    const head = el('span', { class: 'head-info' });
    const fields = el('div', { class: 'fields' }, loading());
    const actions = el('div');
    const decisions = el('div', { class: 'scroll' }, loading());
    view.root.append(
      el('p', { class: 'crumbs' }, el('a', { href: '#/rollouts' }, 'Rollouts'), ' / rollout'),
      pageHead(['Rollout #' + id, ' ', head]), actions, panel('Details', {}, fields),
      panel('Decisions (newest first; counts are stage / control, events / scans)', {}, decisions));
    return async () => {
      const v = await api('/rollouts/' + enc(id));
      return () => {
        const r = v.rollout;
        head.replaceChildren(badge(r.state.state.replace(/_/g, ' '), ROLLOUT_TONE[r.state.state], { testid: 'rollout-state', 'data-state': r.state.state }));
        actions.replaceChildren(rolloutActions(view, r) || '');
        fields.replaceChildren(fieldGroup('Rollout', [
          ['Version', el('span', { class: 'mono', testid: 'rollout-version' }, r.model_version)],
          ['Replacing (control cohort)', el('span', { class: 'mono' }, r.previous_version)],
          ['Fleet share now', el('span', { testid: 'rollout-percent' }, r.percent + ' %')],
          ['Stages', r.plan.stages.map((p) => p + ' %').join(' → ')],
          ['Why', r.state.reason || r.state.by || '—'],
          ['Started', [when(r.created_ms), ' by ', r.created_by]],
        ]));
        decisions.replaceChildren(el('table', { testid: 'decisions' },
          el('thead', {}, el('tr', {}, ['When', 'Stage', 'Outcome', 'Reporting devices', 'Scans', 'Metrics: stage, control, ratio, interval'].map((h) => el('th', {}, h)))),
          el('tbody', {}, v.decisions.length ? v.decisions.map((d) => decisionRow(d, r.plan)) : emptyRow(6, 'Not judged yet.'))));
      };
    };
  }

  function pageNotFound(view) {
    view.root.append(pageHead('Page not found'), el('p', {}, el('a', { href: '#/' }, '← Fleet overview')));
    return async () => () => {};
  }

  // --------------------------------------------------------- router and shell

  /** "#/device/<id>", "#/site/<site>", "#/devices?q=…", "#/" → page + params. */
  function parseRoute() {
    const raw = location.hash.replace(/^#\/?/, '');
    const qi = raw.indexOf('?');
    const path = qi < 0 ? raw : raw.slice(0, qi);
    const query = Object.fromEntries(new URLSearchParams(qi < 0 ? '' : raw.slice(qi + 1)));
    let segs; // split before decoding: an id may hold an encoded "/"
    try { segs = path.split('/').filter(Boolean).map(decodeURIComponent); } catch (e) { segs = ['?']; }
    if (segs.length === 0) return { page: pageFleet, params: query };
    if (segs[0] === 'device' && segs.length === 2) return { page: pageDevice, params: { id: segs[1] } };
    if (segs[0] === 'site' && segs.length === 2) return { page: pageSite, params: { site: segs[1] } };
    if (segs[0] === 'devices' && segs.length === 1) return { page: pageDevices, params: query };
    if (segs[0] === 'rollouts' && segs.length === 1) return { page: pageRollouts, params: {} };
    if (segs[0] === 'rollout' && segs.length === 2) return { page: pageRollout, params: { id: segs[1] } };
    return { page: pageNotFound, params: {} };
  }

  function disposeView() {
    const view = state.view;
    if (!view) return;
    view.dead = true;
    for (const chart of view.charts.values()) chart.destroy();
    view.charts.clear();
    state.view = null;
  }

  /** Follows an in-app link. The "loaded" flag is cleared at once (hashchange
   * fires later); following a link to the page shown reloads it. */
  function navigate(hash) {
    if (hash === location.hash) return route();
    delete document.body.dataset.loaded;
    location.hash = hash;
  }

  function setStatus(text, isError) {
    $status.textContent = text;
    $status.classList.toggle('error', !!isError);
  }

  async function route() {
    if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
    disposeView();
    delete document.body.dataset.loaded;
    document.body.classList.remove('signed-out');
    const { page, params } = parseRoute();
    const view = (state.view = { page, seq: 0, charts: new Map(), root: el('div', { class: 'page' }) });
    $app.replaceChildren(view.root);
    window.scrollTo(0, 0);
    try {
      if (!state.me) {
        setStatus('Signing in…');
        state.me = await api('/whoami');
        renderWho();
      }
      if (view.dead) return;
      view.load = page(view, params);
    } catch (e) {
      if (view.dead) return;
      if (e.status === 401) return authLost('The token was rejected. Sign in again.');
      showPageError(view, e);
      document.body.dataset.loaded = 'true';
      return;
    }
    await load(view);
  }

  /** Runs the page's loader and fills the page with the result, unless the
   * page was left or a newer load started meanwhile. The first failure shows
   * the error in place of the page; a failed refresh keeps the data shown. */
  async function load(view, userAction) {
    const my = ++view.seq;
    if (userAction) delete document.body.dataset.loaded; // an auto-refresh keeps the flag
    view.inflight = true;
    setStatus('Loading…');
    try {
      const fill = await view.load();
      if (view.dead || my !== view.seq) return;
      fill();
      view.shown = true;
      view.failed = false;
      setStatus('Updated ' + new Date().toLocaleTimeString());
    } catch (e) {
      if (view.dead || my !== view.seq) return;
      if (e.status === 401) return authLost();
      if (e.status === 403 && view.page === pageFleet && scopeRedirect()) return;
      if (view.shown) setStatus('Refresh failed: ' + e.message, true);
      else showPageError(view, e);
      if (!(e instanceof ApiError)) console.error(e);
    } finally {
      if (!view.dead && my === view.seq) {
        view.inflight = false;
        document.body.dataset.loaded = 'true';
      }
    }
  }

  /** A user scoped to one site or device who may not see the fleet lands on
   * the page of their scope instead. */
  function scopeRedirect() {
    const m = /^(site|device):(.+)$/.exec((state.me && state.me.scope) || '');
    if (!m) return false;
    history.replaceState(null, '', m[1] === 'site' ? siteHref(m[2]) : deviceHref(m[2]));
    route();
    return true;
  }

  function showPageError(view, e) {
    for (const chart of view.charts.values()) chart.destroy();
    view.charts.clear();
    view.failed = true;
    setStatus('');
    view.root.replaceChildren(
      el('div', { class: 'error-box', role: 'alert' }, el('strong', {}, 'Could not load this page: '),
        el('span', { testid: 'page-error' }, e.message), e.code ? muted(` (${e.code})`) : null),
      el('p', {}, el('a', { href: '#/' }, '← Fleet overview')));
  }

  function refresh() {
    const view = state.view;
    if (!view || view.dead || view.inflight) return;
    if (view.failed) route();
    else load(view);
  }

  function renderWho() {
    const me = state.me;
    document.getElementById('who').textContent =
      `${me.name} · ${me.role}` + (me.scope && me.scope !== 'fleet' ? ` · ${me.scope}` : '');
  }

  function authLost(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin(message || 'Your session has ended or the token is no longer accepted. Sign in again.');
  }

  /** The sign-in form. The token only ever goes to sessionStorage (the input
   * has no name, so even a non-JS submit could not put it into a URL). */
  function showLogin(message) {
    disposeView();
    state.me = null;
    delete document.body.dataset.loaded;
    document.body.classList.add('signed-out');
    setStatus('');
    const input = el('input', { id: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true });
    const form = el('form', { class: 'login', testid: 'login-form', method: 'post', action: '#' },
      el('h1', {}, 'Sign in to the fleet'),
      el('label', { for: 'token' }, 'API token'), input,
      el('button', { id: 'login', type: 'submit', class: 'primary' }, 'Sign in'),
      message && el('p', { class: 'error', testid: 'login-error', role: 'alert' }, message));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      route();
    });
    $app.replaceChildren(form);
    input.focus();
  }

  // ------------------------------------------------------------------ startup

  document.getElementById('logout').addEventListener('click', (e) => {
    e.preventDefault();
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin();
  });
  document.getElementById('refresh').addEventListener('click', refresh);
  document.getElementById('search-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const q = document.getElementById('search').value.trim();
    navigate('#/devices' + (q ? '?q=' + enc(q) : ''));
  });
  document.addEventListener('click', (e) => {
    const a = e.target.closest('a[href^="#/"]');
    if (!a || e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
    e.preventDefault();
    navigate(a.getAttribute('href'));
  });
  window.addEventListener('hashchange', route);
  let resizeTimer = null;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      if (!state.view) return;
      for (const chart of state.view.charts.values()) {
        chart.setSize({ width: chartWidth(chart.root.parentElement), height: CHART_HEIGHT });
      }
    }, 150);
  });
  // Auto-refresh; skipped while the tab is hidden, caught up when it shows again.
  let lastRefresh = Date.now();
  setInterval(() => {
    if (document.hidden) return;
    lastRefresh = Date.now();
    refresh();
  }, REFRESH_MS);
  document.addEventListener('visibilitychange', () => {
    if (!document.hidden && Date.now() - lastRefresh > REFRESH_MS) {
      lastRefresh = Date.now();
      refresh();
    }
  });
  route();
})();
