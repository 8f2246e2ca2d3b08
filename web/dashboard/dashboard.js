/*
 * moonserve's web dashboard (docs/dashboard.md). Plain browser JavaScript: no build step, no
 * library, nothing fetched from anywhere but this admin listener.
 *
 * Every poll reads the status document, /metrics and /api/v1/history (404 until the engine has
 * it: "history not available"). Rates and latency quantiles come from the difference between
 * the counters of this poll and of one RATE_WINDOW_S earlier, as Prometheus' rate() and
 * histogram_quantile() would compute them; the plotted series live in this page's memory only.
 *
 * The admin token comes from the field in the header or from a #token=... fragment (taken out
 * of the address bar at once), is kept in sessionStorage (this tab only, gone when it closes)
 * and is sent as "Authorization: Bearer ..." — the admin API's only credential. Requests are
 * same-origin GETs, which the listener's Host and Origin rules accept.
 */
(function () {
  'use strict';

  var TOKEN_KEY = 'moonserve.admin.token';
  var KEEP_S = 600;         // plotted history, in seconds
  var RATE_WINDOW_S = 5;    // rates and quantiles over this span of polls
  var MAX_ROWS = 30;        // decision and lifecycle rows shown
  var SVG_NS = 'http://www.w3.org/2000/svg';
  var COLORS = ['#2f6fdf', '#d9482b', '#2a9d4b', '#9b59b6', '#e69f00', '#1aa3a3'];

  var pollMs = 1500;
  var plotWindowS = 300;

  // The fragment: interval=MS (500 to 10000) and token=... A token (from a link or a test) goes
  // to sessionStorage, and out of the address bar and the tab's history, so it is not left on
  // screen or in a bookmark. Read at load and whenever the fragment changes.
  function readFragment() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ''));
    if (params.has('interval')) {
      pollMs = Math.max(500, Math.min(10000, Number(params.get('interval')) || 1500));
    }
    if (!params.has('token')) return false;
    sessionStorage.setItem(TOKEN_KEY, params.get('token'));
    params.delete('token');
    var rest = params.toString();
    history.replaceState(null, '', location.pathname + location.search + (rest ? '#' + rest : ''));
    return true;
  }
  readFragment();

  var state = {
    polls: 0,
    samples: [],     // {t, apps: {app: {req, err, buckets}}, deps: {key: {req, err}}}
    series: {},      // name -> [{t, v}]
    status: null,
    history: null,   // the history document, or null
    historyAvailable: null,
    error: null,
    auth: null,      // null | 'missing' | 'invalid'
  };
  window.moonserveDashboard = state; // for the browser console and the tests

  // ---- small DOM helpers ----------------------------------------------------------------------

  function el(tag, attrs) {
    var e = document.createElement(tag);
    if (attrs) {
      for (var k in attrs) {
        if (attrs[k] === undefined || attrs[k] === null) continue;
        if (k === 'text') e.textContent = attrs[k];
        else if (k === 'cls') e.className = attrs[k];
        else if (k.indexOf('data-') === 0) e.setAttribute(k, attrs[k]);
        else e.setAttribute(k, attrs[k]);
      }
    }
    for (var i = 2; i < arguments.length; i++) append(e, arguments[i]);
    return e;
  }

  function append(parent, child) {
    if (child === undefined || child === null || child === false) return;
    if (Array.isArray(child)) { child.forEach(function (c) { append(parent, c); }); return; }
    parent.appendChild(typeof child === 'object' ? child : document.createTextNode(String(child)));
  }

  function svg(tag, attrs) {
    var e = document.createElementNS(SVG_NS, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    return e;
  }

  function replace(id, content) {
    var box = document.getElementById(id);
    box.textContent = '';
    append(box, content);
  }

  function badge(text, field, data) {
    var s = el('span', { cls: 'badge ' + String(text).toLowerCase(), text: text, 'data-field': field });
    for (var k in data || {}) s.setAttribute('data-' + k, data[k]);
    return s;
  }

  function fmtNum(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return '–';
    if (Math.abs(v) >= 100) return v.toFixed(0);
    if (Math.abs(v) >= 10) return v.toFixed(1);
    return v.toFixed(digits === undefined ? 2 : digits);
  }

  function fmtTime(t) {
    if (t === null || t === undefined) return '';
    var ms = typeof t === 'number' ? (t < 1e11 ? t * 1000 : t) : Date.parse(t);
    if (!isFinite(ms)) return String(t);
    return new Date(ms).toLocaleTimeString();
  }

  function timeMs(t) {
    if (typeof t === 'number') return t < 1e11 ? t * 1000 : t;
    var ms = Date.parse(t);
    return isFinite(ms) ? ms : 0;
  }

  function short(s, n) {
    s = s === null || s === undefined ? '' : String(s);
    return s.length > n ? s.slice(0, n) + '…' : s;
  }

  function depKey(app, dep) { return app + '\u0000' + dep; }

  // ---- fetching -------------------------------------------------------------------------------

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ''; }

  function get(path) {
    var headers = {};
    var t = token();
    if (t) headers.Authorization = 'Bearer ' + t;
    return fetch(path, { headers: headers, cache: 'no-store', credentials: 'omit',
                         redirect: 'error' }).then(function (r) {
      return r.text().then(function (body) { return { status: r.status, body: body }; });
    });
  }

  function errorText(r) {
    try { var j = JSON.parse(r.body); if (j && j.error) return j.error; } catch (e) { /* text */ }
    return 'HTTP ' + r.status;
  }

  // ---- Prometheus text ------------------------------------------------------------------------

  // Samples of the text exposition format: [{name, labels, value}]. Comments, HELP and TYPE lines
  // are skipped; label values keep their escapes undone (\\, \", \n).
  function parseMetrics(text) {
    var out = [];
    var lines = text.split('\n');
    for (var li = 0; li < lines.length; li++) {
      var line = lines[li];
      if (!line || line.charAt(0) === '#') continue;
      var m = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
      if (!m) continue;
      var name = m[0], i = name.length, labels = {};
      if (line.charAt(i) === '{') {
        i++;
        for (;;) {
          while (line.charAt(i) === ' ' || line.charAt(i) === ',') i++;
          if (line.charAt(i) === '}') { i++; break; }
          var km = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(line.slice(i));
          if (!km) { i = -1; break; }
          i += km[0].length;
          if (line.charAt(i) !== '=' || line.charAt(i + 1) !== '"') { i = -1; break; }
          i += 2;
          var v = '';
          while (i < line.length && line.charAt(i) !== '"') {
            var c = line.charAt(i);
            if (c === '\\') {
              var n = line.charAt(i + 1);
              v += n === 'n' ? '\n' : n;
              i += 2;
            } else { v += c; i++; }
          }
          if (i >= line.length) { i = -1; break; }
          i++;
          labels[km[0]] = v;
        }
        if (i < 0) continue;
      }
      var fields = line.slice(i).trim().split(/\s+/);
      var value = fields[0] === '+Inf' ? Infinity : fields[0] === '-Inf' ? -Infinity : Number(fields[0]);
      if (fields[0] === '' || isNaN(value) && fields[0] !== 'NaN') continue;
      out.push({ name: name, labels: labels, value: value });
    }
    return out;
  }

  // Sums what the dashboard needs out of the samples: per application (the HTTP proxy's
  // counters and latency buckets) and per deployment (its own request counters).
  function summarize(samples) {
    var apps = {}, deps = {};
    function app(a) { return apps[a] || (apps[a] = { req: 0, err: 0, buckets: {} }); }
    function dep(a, d) { var k = depKey(a, d); return deps[k] || (deps[k] = { req: 0, err: 0 }); }
    samples.forEach(function (s) {
      var l = s.labels;
      switch (s.name) {
        case 'moonserve_http_requests_total':
          if (l.application) app(l.application).req += s.value; break;
        case 'moonserve_http_error_requests_total':
          if (l.application) app(l.application).err += s.value; break;
        case 'moonserve_http_request_duration_seconds_bucket':
          if (l.application) {
            var b = app(l.application).buckets;
            b[l.le] = (b[l.le] || 0) + s.value;
          }
          break;
        case 'moonserve_deployment_requests_total':
          dep(l.application, l.deployment).req += s.value; break;
        case 'moonserve_deployment_error_requests_total':
          dep(l.application, l.deployment).err += s.value; break;
      }
    });
    return { apps: apps, deps: deps };
  }

  // A counter's increase; a drop means the engine restarted, so the new value is the increase.
  function increase(now, then) { return now >= then ? now - then : now; }

  // histogram_quantile over the increase of cumulative buckets {le: count}: linear within the
  // bucket holding the rank; a rank in +Inf answers the highest finite bound.
  function quantile(q, nowB, thenB) {
    var les = Object.keys(nowB).map(function (k) {
      return { le: k === '+Inf' ? Infinity : Number(k), key: k };
    }).sort(function (a, b) { return a.le - b.le; });
    if (!les.length || les[les.length - 1].le !== Infinity) return null;
    var counts = les.map(function (x) { return increase(nowB[x.key], (thenB || {})[x.key] || 0); });
    for (var i = 1; i < counts.length; i++) if (counts[i] < counts[i - 1]) counts[i] = counts[i - 1];
    var total = counts[counts.length - 1];
    if (!(total > 0)) return null;
    var rank = q * total;
    for (var j = 0; j < les.length; j++) {
      if (counts[j] >= rank) {
        if (les[j].le === Infinity) return j > 0 ? les[j - 1].le : null;
        var lower = j > 0 ? les[j - 1].le : 0, below = j > 0 ? counts[j - 1] : 0;
        var inBucket = counts[j] - below;
        return inBucket > 0 ? lower + (les[j].le - lower) * (rank - below) / inBucket : les[j].le;
      }
    }
    return null;
  }

  // ---- series kept in memory ------------------------------------------------------------------

  function record(name, t, v) {
    var s = state.series[name] || (state.series[name] = []);
    s.push({ t: t, v: v });
    while (s.length && s[0].t < t - KEEP_S) s.shift();
  }

  function points(name) { return state.series[name] || []; }

  // Rates of this poll against the oldest sample within RATE_WINDOW_S (at least the previous).
  function computeRates(now) {
    var older = null;
    for (var i = state.samples.length - 2; i >= 0; i--) {
      older = state.samples[i];
      if (now.t - older.t >= RATE_WINDOW_S) break;
    }
    var rates = { apps: {}, deps: {} };
    if (!older) return rates;
    var dt = now.t - older.t;
    if (!(dt > 0)) return rates;
    Object.keys(now.apps).forEach(function (a) {
      var n = now.apps[a], o = older.apps[a] || { req: 0, err: 0, buckets: {} };
      var req = increase(n.req, o.req) / dt, err = increase(n.err, o.err) / dt;
      var p50 = quantile(0.5, n.buckets, o.buckets), p99 = quantile(0.99, n.buckets, o.buckets);
      rates.apps[a] = { req: req, err: err, errShare: req > 0 ? err / req : 0,
                        p50: p50 === null ? null : p50 * 1000, p99: p99 === null ? null : p99 * 1000 };
    });
    Object.keys(now.deps).forEach(function (k) {
      var n = now.deps[k], o = older.deps[k] || { req: 0, err: 0 };
      rates.deps[k] = { req: increase(n.req, o.req) / dt, err: increase(n.err, o.err) / dt };
    });
    return rates;
  }

  // ---- plots ----------------------------------------------------------------------------------

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  // A line chart of series [{label, name, color}] over the last plotWindowS seconds.
  function chart(title, unit, list, opts) {
    opts = opts || {};
    var W = 380, H = 150, L = 44, R = 8, T = 22, B = 20;
    var now = performance.now() / 1000, t0 = now - plotWindowS;
    var max = opts.minMax || 0;
    list.forEach(function (s) {
      points(s.name).forEach(function (p) { if (p.t >= t0 && p.v !== null && p.v > max) max = p.v; });
    });
    // Counts get whole-number gridlines: a maximum that four steps divide.
    max = opts.integer ? 4 * Math.max(1, Math.ceil(max / 4)) : niceMax(max);
    var root = svg('svg', { viewBox: '0 0 ' + W + ' ' + H, 'class': 'chart', role: 'img',
                            'aria-label': title });
    var head = svg('text', { x: L, y: 13, 'class': 'chart-title' });
    head.textContent = title + (unit ? ' (' + unit + ')' : '');
    root.appendChild(head);
    function x(t) { return L + (W - L - R) * (t - t0) / plotWindowS; }
    function y(v) { return T + (H - T - B) * (1 - v / max); }
    for (var g = 0; g <= 4; g++) {
      var v = max * g / 4, gy = y(v);
      root.appendChild(svg('line', { x1: L, x2: W - R, y1: gy, y2: gy, 'class': 'grid' }));
      var lab = svg('text', { x: L - 4, y: gy + 3, 'class': 'axis', 'text-anchor': 'end' });
      lab.textContent = opts.integer ? String(Math.round(v)) : fmtNum(v);
      root.appendChild(lab);
    }
    [plotWindowS, plotWindowS / 2, 0].forEach(function (ago, i) {
      var tx = svg('text', { x: x(now - ago), y: H - 5, 'class': 'axis',
                             'text-anchor': i === 0 ? 'start' : i === 2 ? 'end' : 'middle' });
      tx.textContent = ago ? '-' + (ago >= 60 ? ago / 60 + ' min' : ago + ' s') : 'now';
      root.appendChild(tx);
    });
    // Later series on top (errors over requests), legends from the right edge.
    list.forEach(function (s) {
      var d = opts.step ? stepPath(s.name, t0, x, y, max) : linePath(s.name, t0, x, y, max);
      if (d) root.appendChild(svg('path', { d: d, stroke: s.color, 'class': 'line' }));
    });
    var lx = W - R;
    list.slice().reverse().forEach(function (s) {
      var legend = svg('text', { x: lx, y: 13, 'class': 'legend', fill: s.color, 'text-anchor': 'end' });
      legend.textContent = s.label;
      root.appendChild(legend);
      lx -= 8 + 6.5 * s.label.length;
    });
    return root;
  }

  // A gap (no value: no request in the window for a quantile) breaks the line.
  function linePath(name, t0, x, y, max) {
    var d = '', pen = 'M';
    points(name).forEach(function (p) {
      if (p.t < t0 || p.v === null || !isFinite(p.v)) { pen = 'M'; return; }
      d += pen + x(p.t).toFixed(1) + ' ' + y(Math.min(p.v, max)).toFixed(1) + ' ';
      pen = 'L';
    });
    return d;
  }

  // Replica counts change in steps: hold each value until the next poll.
  function stepPath(name, t0, x, y, max) {
    var d = '', last = null;
    points(name).forEach(function (p) {
      if (p.t < t0 || p.v === null) { last = null; return; }
      var py = y(Math.min(p.v, max)).toFixed(1);
      if (last === null) d += 'M' + x(p.t).toFixed(1) + ' ' + py + ' ';
      else d += 'H' + x(p.t).toFixed(1) + ' V' + py + ' ';
      last = p;
    });
    return d;
  }

  // ---- rendering ------------------------------------------------------------------------------

  function replicaCounts(d) {
    var c = { RUNNING: 0, STARTING: 0, STOPPING: 0, other: 0 };
    (d.replicas || []).forEach(function (r) {
      if (c[r.state] !== undefined) c[r.state]++; else c.other++;
    });
    return c;
  }

  function renderApps(doc, rates) {
    var apps = (doc && doc.applications) || {};
    var names = Object.keys(apps).sort();
    if (!names.length) return el('p', { cls: 'muted', text: 'no applications deployed' });
    return names.map(function (an) {
      var a = apps[an], r = rates.apps[an] || {};
      var card = el('div', { cls: 'app', 'data-app': an });
      card.appendChild(el('div', { cls: 'app-head' },
        el('h3', { text: an, 'data-field': 'app-name', 'data-app': an }),
        badge(a.status || '?', 'app-status', { app: an }),
        a.route_prefix ? el('code', { text: a.route_prefix }) : null,
        el('span', { cls: 'muted', text: a.source ? a.source : '' })));
      if (a.message) card.appendChild(el('p', { cls: 'message', text: a.message }));
      card.appendChild(el('div', { cls: 'stats' },
        stat('requests/s', fmtNum(r.req), 'req-rate', an),
        stat('errors/s', fmtNum(r.err) + (r.req > 0 ? ' (' + fmtNum(100 * r.errShare, 1) + '%)' : ''),
             'err-rate', an),
        stat('p50', r.p50 === null || r.p50 === undefined ? '–' : fmtNum(r.p50) + ' ms', 'p50', an),
        stat('p99', r.p99 === null || r.p99 === undefined ? '–' : fmtNum(r.p99) + ' ms', 'p99', an)));
      var deps = a.deployments || {};
      var depNames = Object.keys(deps).sort();
      var plots = el('div', { cls: 'plots' },
        chart('Requests', '/s', [{ label: 'requests', name: 'req:' + an, color: COLORS[0] },
                                 { label: 'errors', name: 'err:' + an, color: COLORS[1] }]),
        chart('Latency', 'ms', [{ label: 'p50', name: 'p50:' + an, color: COLORS[2] },
                                { label: 'p99', name: 'p99:' + an, color: COLORS[3] }]),
        chart('Replicas', '', depNames.map(function (dn, i) {
          return { label: dn, name: 'running:' + depKey(an, dn), color: COLORS[i % COLORS.length] };
        }), { step: true, integer: true, minMax: 1 }));
      card.appendChild(plots);
      var table = el('table', { cls: 'deployments' },
        el('thead', null, el('tr', null, ['deployment', 'status', 'running', 'target', 'starting',
          'stopping', 'queued', 'ongoing', 'req/s', 'replicas'].map(function (h) {
          return el('th', { text: h });
        }))));
      var body = el('tbody');
      depNames.forEach(function (dn) {
        var d = deps[dn], c = replicaCounts(d), dr = rates.deps[depKey(an, dn)] || {};
        var ongoing = (d.replicas || []).reduce(function (s, x) { return s + (x.ongoing_requests || 0); }, 0);
        var attrs = function (f) { return { 'data-app': an, 'data-deployment': dn, 'data-field': f }; };
        var row = el('tr', { 'data-app': an, 'data-deployment': dn },
          el('td', attrs('deployment-name'), dn),
          el('td', null, badge(d.status || '?', 'deployment-status', { app: an, deployment: dn }),
             d.message ? el('div', { cls: 'message', text: d.message }) : null),
          el('td', attrs('running'), String(c.RUNNING)),
          el('td', attrs('target'), String(d.target_num_replicas)),
          el('td', attrs('starting'), String(c.STARTING)),
          el('td', attrs('stopping'), String(c.STOPPING)),
          el('td', attrs('queued'), d.queued_requests === undefined ? '–' : String(d.queued_requests)),
          el('td', attrs('ongoing'), String(ongoing)),
          el('td', attrs('dep-req-rate'), fmtNum(dr.req)),
          el('td', attrs('replicas'), (d.replicas || []).map(function (x) {
            var b = badge(x.state, 'replica-state', { app: an, deployment: dn, replica: x.replica_id });
            b.title = (x.replica_tag || x.replica_id) + (x.pid ? ' pid ' + x.pid : '') +
                      ', ongoing ' + (x.ongoing_requests || 0);
            return b;
          })));
        body.appendChild(row);
      });
      table.appendChild(body);
      card.appendChild(table);
      return card;
    });
  }

  function stat(label, value, field, app) {
    return el('div', { cls: 'stat' }, el('div', { cls: 'stat-label', text: label }),
              el('div', { cls: 'stat-value', text: value, 'data-field': field, 'data-app': app }));
  }

  function table(headers, rows) {
    return el('table', null, el('thead', null, el('tr', null, headers.map(function (h) {
      return el('th', { text: h });
    }))), el('tbody', null, rows));
  }

  // The decisions: the history's when the engine has it, else the last few of each deployment
  // from the status document (recent_decisions).
  function renderDecisions(doc) {
    var rows = [], source;
    if (state.history && Array.isArray(state.history.autoscaling)) {
      source = 'from GET /api/v1/history';
      rows = state.history.autoscaling.map(function (d) {
        return { time: d.time, app: d.application, dep: d.deployment, current: d.previous_target,
                 raw: d.raw_target, target: d.applied_target, applied: d.applied_target !== d.previous_target,
                 reason: d.reason, extra: d.policy_version ? 'policy v' + d.policy_version : '' };
      });
    } else {
      source = 'history not available' + (state.historyAvailable === false ?
        ' (GET /api/v1/history answered 404): the last decisions of each deployment from the status document' : '');
      var apps = (doc && doc.applications) || {};
      Object.keys(apps).forEach(function (an) {
        var deps = apps[an].deployments || {};
        Object.keys(deps).forEach(function (dn) {
          var dec = ((deps[dn].autoscaling || {}).recent_decisions) || [];
          dec.forEach(function (d) {
            rows.push({ time: d.now, app: an, dep: dn, current: d.current_replicas, raw: d.raw_target,
                        target: d.target, applied: d.applied, reason: d.reason,
                        extra: 'requests ' + fmtNum(d.total_requests) });
          });
        });
      });
    }
    rows.sort(function (a, b) { return timeMs(b.time) - timeMs(a.time); });
    replace('decisions-source', source);
    if (!rows.length) return el('p', { cls: 'muted', text: 'no decisions yet' });
    return table(['time', 'deployment', 'from', 'raw', 'target', 'reason', ''],
      rows.slice(0, MAX_ROWS).map(function (d) {
        return el('tr', { cls: d.applied === false ? 'not-applied' : '' },
          el('td', { text: fmtTime(d.time) }),
          el('td', { text: d.app + '/' + d.dep }),
          el('td', { text: d.current === undefined ? '' : String(d.current) }),
          el('td', { text: typeof d.raw === 'number' ? fmtNum(d.raw) : String(d.raw === undefined ? '' : d.raw) }),
          el('td', { text: d.target === undefined ? '' : String(d.target) }),
          el('td', { cls: 'reason', text: d.reason || '', 'data-field': 'decision-reason' }),
          el('td', { cls: 'muted', text: d.extra || '' }));
      }));
  }

  // Every script object of the status document: anything with kind, version and sha256.
  function collectScripts(doc, out) {
    if (!doc || typeof doc !== 'object') return out;
    if (Array.isArray(doc)) { doc.forEach(function (x) { collectScripts(x, out); }); return out; }
    if (typeof doc.kind === 'string' && 'sha256' in doc && 'version' in doc) {
      var key = [doc.kind, doc.application, doc.deployment, doc.role, doc.path].join('\u0000');
      if (!out.seen[key]) { out.seen[key] = true; out.list.push({ s: doc }); }
      return out;
    }
    for (var k in doc) collectScripts(doc[k], out);
    return out;
  }

  function renderScripts(doc) {
    var found = collectScripts(doc && doc.applications, { seen: {}, list: [] }).list;
    found.sort(function (a, b) {
      return [a.s.application, a.s.deployment, a.s.kind].join('/').localeCompare(
        [b.s.application, b.s.deployment, b.s.kind].join('/'));
    });
    var last = lastReload(found);
    replace('reload', el('p', { cls: 'reload' }, 'last reload: ',
      badge(last.result, 'reload-result'), ' ', el('span', { text: last.text, 'data-field': 'reload-detail' })));
    if (!found.length) return el('p', { cls: 'muted', text: 'no scripts' });
    return table(['kind', 'application', 'deployment', 'script', 'version', 'sha256', 'failures',
                  'reload failures', 'last reload error'],
      found.map(function (f) {
        var s = f.s;
        var data = { 'data-kind': s.kind, 'data-app': s.application || '', 'data-deployment': s.deployment || '' };
        return el('tr', data,
          el('td', { text: s.kind + (s.role ? ' (' + s.role + ')' : '') }),
          el('td', { text: s.application || '' }),
          el('td', { text: s.deployment || '' }),
          el('td', { cls: 'path', title: s.path || '', text: s.builtin ? 'built-in ' + short(s['function'] || '', 30)
                                                                  : short(s.path, 60) }),
          el('td', Object.assign({ text: String(s.version) }, data, { 'data-field': 'script-version' })),
          el('td', { cls: 'mono', text: short(s.sha256, 12) }),
          el('td', { text: String(s.failures || 0), title: s.last_error || '' }),
          el('td', { text: String(s.reload_failures || 0) }),
          el('td', { cls: 'error', text: s.last_reload_error || '' }));
      }));
  }

  // The last reload: the history's latest when there is one; otherwise what the scripts say (a
  // failed reload leaves last_reload_error on the scripts it rejected until the next commit).
  function lastReload(found) {
    var reloads = state.history && state.history.reloads;
    if (Array.isArray(reloads) && reloads.length) {
      var r = reloads.slice().sort(function (a, b) { return timeMs(a.time) - timeMs(b.time); })[reloads.length - 1];
      return { result: r.result === 'ok' ? 'ok' : 'failed',
               text: fmtTime(r.time) + ' ' + (r.kind || '') + (r.application ? ' ' + r.application : '') +
                     (r.deployment ? '/' + r.deployment : '') + (r.requested_by ? ' by ' + r.requested_by : '') +
                     (r.version !== undefined && r.version !== null ? ', version ' + r.version : '') +
                     (r.error ? ': ' + r.error : '') };
    }
    var errors = found.filter(function (f) { return f.s.last_reload_error; });
    if (errors.length) {
      return { result: 'failed', text: errors.map(function (f) { return f.s.last_reload_error; }).join('; ') +
               ' (nothing changed)' };
    }
    var maxVersion = found.reduce(function (m, f) { return Math.max(m, f.s.version || 0); }, 0);
    if (maxVersion > 1) return { result: 'ok', text: 'scripts up to version ' + maxVersion };
    return { result: 'none', text: 'no reload since the engine started' };
  }

  function renderLifecycle() {
    if (!state.history) {
      return el('p', { cls: 'muted', text: 'history not available' +
        (state.historyAvailable === false ? ' (GET /api/v1/history answered 404)' : '') });
    }
    var ev = (state.history.lifecycle || []).slice().sort(function (a, b) {
      return timeMs(b.time) - timeMs(a.time);
    });
    if (!ev.length) return el('p', { cls: 'muted', text: 'no events yet' });
    return table(['time', 'deployment', 'replica', 'event', 'reason'], ev.slice(0, MAX_ROWS).map(function (e) {
      return el('tr', null, el('td', { text: fmtTime(e.time) }),
        el('td', { text: (e.application || '') + '/' + (e.deployment || '') }),
        el('td', { text: e.replica === undefined ? '' : String(e.replica) }),
        el('td', null, badge(e.event || '?', 'lifecycle-event')),
        el('td', { cls: 'reason', text: e.reason || '' }));
    }));
  }

  function renderHeader() {
    var conn = document.getElementById('conn');
    var notice = document.getElementById('notice');
    var text, cls;
    if (state.auth) {
      text = state.auth === 'missing' ? 'token needed' : 'token refused'; cls = 'unhealthy';
      notice.hidden = false;
      notice.textContent = state.auth === 'missing'
        ? 'This admin listener needs its token: type it above (it stays in this tab only).'
        : 'The admin listener refused the token: ' + state.error;
    } else if (state.error) {
      text = 'error'; cls = 'unhealthy';
      notice.hidden = false;
      notice.textContent = state.error;
    } else {
      text = 'live'; cls = 'healthy';
      notice.hidden = true;
    }
    conn.textContent = text;
    conn.className = 'badge ' + cls;
    document.getElementById('updated').textContent = state.lastOk
      ? 'updated ' + new Date(state.lastOk).toLocaleTimeString() + ', every ' + pollMs / 1000 + ' s' : '';
    document.body.setAttribute('data-polls', String(state.polls));
  }

  function render() {
    renderHeader();
    if (!state.status) return;
    replace('apps', renderApps(state.status, state.rates || { apps: {}, deps: {} }));
    replace('decisions', renderDecisions(state.status));
    replace('scripts', renderScripts(state.status));
    replace('lifecycle', renderLifecycle());
  }

  // ---- the poll loop --------------------------------------------------------------------------

  var pollTimer = null, polling = false, pollAgain = false;

  // One poll at a time: the next is scheduled when this one is done, so a slow engine is
  // never asked twice at once.
  function poll() {
    clearTimeout(pollTimer);
    pollTimer = null;
    if (polling) { pollAgain = true; return; } // the token changed meanwhile
    polling = true;
    Promise.all([get('/api/serve/applications/'), get('/metrics'),
                 get('/api/v1/history?limit=' + MAX_ROWS)]).then(function (rs) {
      var st = rs[0], met = rs[1], hist = rs[2];
      state.auth = null;
      state.error = null;
      if (st.status === 401 || met.status === 401) {
        state.auth = token() ? 'invalid' : 'missing';
        state.error = errorText(st.status === 401 ? st : met);
        return;
      }
      if (st.status !== 200) { state.error = 'status document: ' + errorText(st); return; }
      if (met.status !== 200) { state.error = '/metrics: ' + errorText(met); return; }
      var t = performance.now() / 1000;
      state.status = JSON.parse(st.body);
      if (hist.status === 200) {
        try { state.history = JSON.parse(hist.body); state.historyAvailable = true; } catch (e) {
          state.history = null; state.historyAvailable = false;
        }
      } else {
        state.history = null;
        state.historyAvailable = hist.status === 404 ? false : null;
      }
      var sample = summarize(parseMetrics(met.body));
      sample.t = t;
      state.samples.push(sample);
      while (state.samples.length > 2 && state.samples[1].t <= t - RATE_WINDOW_S * 2) state.samples.shift();
      var rates = computeRates(sample);
      state.rates = rates;
      Object.keys(rates.apps).forEach(function (a) {
        var r = rates.apps[a];
        record('req:' + a, t, r.req);
        record('err:' + a, t, r.err);
        record('p50:' + a, t, r.p50);
        record('p99:' + a, t, r.p99);
      });
      var apps = state.status.applications || {};
      Object.keys(apps).forEach(function (an) {
        var deps = apps[an].deployments || {};
        Object.keys(deps).forEach(function (dn) {
          record('running:' + depKey(an, dn), t, replicaCounts(deps[dn]).RUNNING);
          record('target:' + depKey(an, dn), t, deps[dn].target_num_replicas);
        });
      });
      state.lastOk = Date.now();
    }).catch(function (e) {
      state.error = 'cannot reach the admin listener: ' + (e && e.message ? e.message : e);
    }).then(function () {
      state.polls++;
      polling = false;
      try { render(); } catch (e) { state.error = 'render: ' + e.message; renderHeader(); }
      pollTimer = setTimeout(poll, pollAgain ? 0 : pollMs);
      pollAgain = false;
    });
  }

  // ---- controls -------------------------------------------------------------------------------

  document.getElementById('token-form').addEventListener('submit', function (ev) {
    ev.preventDefault();
    var input = document.getElementById('token');
    if (input.value) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = '';
    input.placeholder = token() ? 'token set for this tab' : 'Bearer token (if the listener has one)';
    poll();
  });
  window.addEventListener('hashchange', function () {
    if (readFragment()) {
      document.getElementById('token').placeholder = 'token set for this tab';
      poll();
    }
  });
  document.getElementById('token-forget').addEventListener('click', function () {
    sessionStorage.removeItem(TOKEN_KEY);
    document.getElementById('token').placeholder = 'Bearer token (if the listener has one)';
  });
  if (token()) document.getElementById('token').placeholder = 'token set for this tab';
  Array.prototype.forEach.call(document.querySelectorAll('[data-window]'), function (b) {
    b.addEventListener('click', function () {
      plotWindowS = Number(b.getAttribute('data-window'));
      Array.prototype.forEach.call(document.querySelectorAll('[data-window]'), function (o) {
        o.classList.toggle('on', o === b);
      });
      render();
    });
  });

  // The pure parts, for the console and the tests.
  state.lib = { parseMetrics: parseMetrics, summarize: summarize, quantile: quantile };

  poll();
})();
