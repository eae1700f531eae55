/* Charts: the project's own inline SVG (no library; the page's Content-Security-Policy allows
 * no inline script or eval, and browser code is not committed from elsewhere). */
import { fill, fmtNum, h, isNum, PALETTE, s } from './util.js';

/**
 * Exponential moving average of points [[x, y]] with weight w in [0, 1): y'_i = w y'_{i-1} +
 * (1 - w) y_i, divided by 1 - w^(i+1) so the start is not pulled towards 0 (TensorBoard's
 * smoothing with its debiasing). w = 0 returns the points unchanged.
 */
export function ema(points, w) {
  if (!(w > 0)) return points;
  let acc = 0;
  return points.map(([x, y], i) => {
    acc = w * acc + (1 - w) * y;
    return [x, acc / (1 - Math.pow(w, i + 1))];
  });
}

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  return (norm >= 5 ? 10 : norm >= 2 ? 5 : norm >= 1 ? 2 : 1) * mag;
}
function linearTicks(min, max, count) {
  if (!(max > min)) return [min];
  const step = niceStep(max - min, count);
  const out = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}
function logTicks(min, max) {
  for (const mult of [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 5], [1, 3], [1]]) {
    const out = [];
    for (let e = Math.floor(Math.log10(min)); e <= Math.ceil(Math.log10(max)); e++) {
      for (const m of mult) {
        const v = Number((m * Math.pow(10, e)).toPrecision(12));
        if (v >= min * (1 - 1e-9) && v <= max * (1 + 1e-9)) out.push(v);
      }
    }
    if (out.length <= 8) return out.length >= 2 ? out : linearTicks(min, max, 4).filter((v) => v > 0);
  }
  return [];
}

/**
 * A line chart. series: [{label, color, points: [[x, y], ...], dots?, width?, faint?}] sorted by
 * x (faint: drawn at a quarter opacity behind the others, e.g. the raw curve under a smoothed one).
 * opts: {height, logY, yFormat, xLabel, yMin0, stacked?}. Returns a .chart element with
 * hover readout of every series at the nearest x.
 */
export function lineChart(series, opts = {}) {
  const wrap = h('div', { class: 'chart' });
  const draw = () => {
    const width = Math.max(240, wrap.clientWidth || 600);
    const height = opts.height || 220;
    const m = { l: 54, r: 12, t: 8, b: opts.xLabel ? 34 : 22 };
    const W = width - m.l - m.r;
    const H = height - m.t - m.b;
    const logY = !!opts.logY;
    const usable = series.map((sr) => sr.points.filter(([x, y]) => isNum(x) && isNum(y) && (!logY || y > 0)));
    const all = usable.flat();
    const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': opts.title || 'chart' });
    fill(wrap, svg);
    if (!all.length) {
      svg.append(s('rect', { class: 'frame', x: m.l, y: m.t, width: W, height: H }),
        s('text', { class: 'no-data', x: m.l + W / 2, y: m.t + H / 2, 'text-anchor': 'middle', text: opts.empty || 'no data yet' }));
      return;
    }
    let x0 = Math.min(...all.map((p) => p[0])); let x1 = Math.max(...all.map((p) => p[0]));
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    let y0 = Math.min(...all.map((p) => p[1])); let y1 = Math.max(...all.map((p) => p[1]));
    if (opts.yMin0 && !logY) y0 = Math.min(0, y0);
    if (opts.yMax1) y1 = Math.max(y1, 1);
    if (y1 === y0) { const d = logY ? y0 * 0.1 : Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    if (logY) { y0 = Math.max(y0, Number.MIN_VALUE); } else if (!opts.yMin0) { const pad = (y1 - y0) * 0.04; y0 -= pad; y1 += pad; }
    const ly0 = logY ? Math.log10(y0) : y0; const ly1 = logY ? Math.log10(y1) : y1;
    const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * W;
    const sy = (y) => m.t + H - (((logY ? Math.log10(y) : y) - ly0) / (ly1 - ly0)) * H;
    const yFmt = opts.yFormat || fmtNum;
    const grid = s('g', { class: 'axis' });
    for (const v of (logY ? logTicks(y0, y1) : linearTicks(y0, y1, Math.max(2, Math.round(H / 45))))) {
      const y = sy(v);
      if (y < m.t - 0.5 || y > m.t + H + 0.5) continue;
      grid.append(s('line', { class: 'gridline', x1: m.l, x2: m.l + W, y1: y, y2: y }),
        s('text', { x: m.l - 6, y: y + 3.5, 'text-anchor': 'end', text: yFmt(v) }));
    }
    const xTicks = linearTicks(x0, x1, Math.max(2, Math.round(W / 90))).filter((v) => !opts.integerX || Number.isInteger(v));
    for (const v of xTicks) {
      const x = sx(v);
      grid.append(s('line', { class: 'gridline', x1: x, x2: x, y1: m.t, y2: m.t + H }),
        s('text', { x, y: m.t + H + 14, 'text-anchor': 'middle', text: fmtNum(v) }));
    }
    svg.append(grid, s('rect', { class: 'frame', x: m.l, y: m.t, width: W, height: H }));
    if (opts.xLabel) svg.append(s('text', { class: 'axis-label', x: m.l + W / 2, y: height - 4, 'text-anchor': 'middle', text: opts.xLabel }));
    const clipId = 'clip' + Math.random().toString(36).slice(2);
    svg.append(s('defs', {}, s('clipPath', { id: clipId }, s('rect', { x: m.l, y: m.t - 2, width: W, height: H + 4 }))));
    const plot = s('g', { 'clip-path': `url(#${clipId})` });
    series.forEach((sr, i) => {
      const pts = usable[i];
      if (!pts.length) return;
      if (pts.length > 1 && !sr.dotsOnly) {
        plot.append(s('polyline', {
          class: sr.faint ? 'series raw' : 'series', stroke: sr.color, 'stroke-width': sr.width || 1.6,
          'stroke-opacity': sr.faint ? 0.25 : undefined,
          points: decimate(pts, W).map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(' '),
        }));
      }
      if (sr.dots || pts.length === 1 || sr.dotsOnly) {
        for (const [x, y] of pts.length > 400 ? [] : pts) plot.append(s('circle', { cx: sx(x), cy: sy(y), r: 2.8, fill: sr.color }));
      }
    });
    svg.append(plot);
    // hover readout
    const hover = s('line', { class: 'hover-line', y1: m.t, y2: m.t + H, visibility: 'hidden' });
    svg.append(hover);
    const tip = h('div', { class: 'chart-tip', hidden: true });
    wrap.append(tip);
    svg.addEventListener('mousemove', (ev) => {
      const rect = svg.getBoundingClientRect();
      const px = ev.clientX - rect.left;
      if (px < m.l || px > m.l + W) { hover.setAttribute('visibility', 'hidden'); tip.hidden = true; return; }
      const xv = x0 + ((px - m.l) / W) * (x1 - x0);
      const lines = [];
      let snapX = null;
      series.forEach((sr, i) => {
        const p = nearest(usable[i], xv);
        if (!p) return;
        if (snapX === null) snapX = p[0];
        lines.push(h('div', {}, h('span', { class: 'sw', style: { background: sr.color } }), `${sr.label}: ${yFmt(p[1])}`,
          p[0] !== snapX ? h('span', { class: 'muted' }, ` @${fmtNum(p[0])}`) : null));
      });
      if (snapX === null) return;
      hover.setAttribute('x1', sx(snapX)); hover.setAttribute('x2', sx(snapX)); hover.setAttribute('visibility', 'visible');
      fill(tip, h('div', { class: 'muted' }, `${opts.xName || 'step'} ${fmtNum(snapX)}`), ...lines);
      tip.hidden = false;
      const left = sx(snapX) + 12;
      tip.style.left = (left + tip.offsetWidth > width ? sx(snapX) - tip.offsetWidth - 12 : left) + 'px';
      tip.style.top = (m.t + 4) + 'px';
    });
    svg.addEventListener('mouseleave', () => { hover.setAttribute('visibility', 'hidden'); tip.hidden = true; });
  };
  wrap.redraw = draw;
  charts.add(wrap);
  requestAnimationFrame(draw);
  return wrap;
}

/** At most ~2 points per pixel column: keep each bucket's min and max (shape preserved). */
function decimate(pts, width) {
  const buckets = Math.max(50, Math.floor(width));
  if (pts.length <= buckets * 2) return pts;
  const out = [];
  const per = pts.length / buckets;
  for (let b = 0; b < buckets; b++) {
    const chunk = pts.slice(Math.floor(b * per), Math.floor((b + 1) * per));
    if (!chunk.length) continue;
    let lo = chunk[0]; let hi = chunk[0];
    for (const p of chunk) { if (p[1] < lo[1]) lo = p; if (p[1] > hi[1]) hi = p; }
    if (lo[0] <= hi[0]) out.push(lo, hi); else out.push(hi, lo);
  }
  return out;
}
function nearest(pts, x) {
  if (!pts || !pts.length) return null;
  let lo = 0; let hi = pts.length - 1;
  while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (pts[mid][0] < x) lo = mid; else hi = mid; }
  return Math.abs(pts[lo][0] - x) <= Math.abs(pts[hi][0] - x) ? pts[lo] : pts[hi];
}

/** Stacked area of expert fractions vs step for one layer: steps [s], fractions [[f_e]]. */
export function stackedChart(steps, fractions, nExpert, opts = {}) {
  const wrap = h('div', { class: 'chart' });
  const draw = () => {
    const width = Math.max(200, wrap.clientWidth || 260);
    const height = opts.height || 110;
    const m = { l: 34, r: 6, t: 4, b: 18 };
    const W = width - m.l - m.r; const H = height - m.t - m.b;
    const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': opts.title || 'router' });
    fill(wrap, svg);
    let x0 = steps[0]; let x1 = steps[steps.length - 1];
    const single = x1 === x0;
    if (single) { x0 -= 0.5; x1 += 0.5; }
    const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * W;
    const sy = (f) => m.t + H - f * H;
    const axis = s('g', { class: 'axis' });
    for (const v of [0, 0.5, 1]) {
      axis.append(s('line', { class: 'gridline', x1: m.l, x2: m.l + W, y1: sy(v), y2: sy(v) }),
        s('text', { x: m.l - 4, y: sy(v) + 3.5, 'text-anchor': 'end', text: `${v * 100}%` }));
    }
    for (const v of linearTicks(x0, x1, Math.max(2, Math.round(W / 80))).filter(Number.isInteger)) {
      axis.append(s('text', { x: sx(v), y: m.t + H + 13, 'text-anchor': 'middle', text: fmtNum(v) }));
    }
    svg.append(axis);
    const idx = decimateIdx(steps.length, W);
    const xs = idx.map((i) => (single ? [x0, x1] : [steps[i]])).flat();
    const rows = idx.map((i) => (single ? [fractions[i], fractions[i]] : [fractions[i]])).flat();
    let lower = rows.map(() => 0);
    for (let e = 0; e < nExpert; e++) {
      const upper = rows.map((f, k) => lower[k] + (isNum(f[e]) ? f[e] : 0));
      const top = xs.map((x, k) => `${sx(x).toFixed(1)},${sy(Math.min(1, upper[k])).toFixed(1)}`);
      const bottom = xs.map((x, k) => `${sx(x).toFixed(1)},${sy(Math.min(1, lower[k])).toFixed(1)}`).reverse();
      svg.append(s('polygon', { points: top.concat(bottom).join(' '), fill: PALETTE[e % PALETTE.length], 'fill-opacity': 0.85 },
        s('title', { text: `expert ${e}` })));
      lower = upper;
    }
    svg.append(s('rect', { class: 'frame', x: m.l, y: m.t, width: W, height: H }));
  };
  wrap.redraw = draw;
  charts.add(wrap);
  requestAnimationFrame(draw);
  return wrap;
}
function decimateIdx(n, width) {
  const max = Math.max(40, Math.floor(width / 2));
  if (n <= max) return [...Array(n).keys()];
  const out = [];
  for (let k = 0; k < max; k++) out.push(Math.round((k * (n - 1)) / (max - 1)));
  return [...new Set(out)];
}

const charts = new Set();
let resizeTimer = null;
window.addEventListener('resize', () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { for (const c of charts) { if (c.isConnected) c.redraw(); else charts.delete(c); } }, 150);
});

// ---------------------------------------------------------------------------------------------
// Sweeps: parallel coordinates and metric-vs-parameter scatter plots.

/** Whether a sweep parameter's axis is logarithmic: its distribution is log_uniform, or its
 *  values are all positive numbers spanning more than two decades. */
export function wantsLog(values, distribution) {
  if (distribution === 'log_uniform') return true;
  const nums = values.filter(isNum);
  if (!nums.length || nums.length !== values.length || nums.some((v) => v <= 0)) return false;
  return Math.max(...nums) / Math.min(...nums) > 100;
}

/**
 * The scale of one axis from its values (null/undefined left out): 'category' when any value is
 * not a number (each distinct value one slot, in first-seen order, numbers sorted), 'log' when
 * log is asked and every value is positive, 'linear' otherwise. Returns {kind, pos(v) -> [0, 1]
 * or null, ticks: [{v, label, at}]}.
 */
export function axisScale(values, log) {
  const present = values.filter((v) => v !== null && v !== undefined);
  const fmt = (v) => (typeof v === 'string' ? v : isNum(v) ? fmtNum(v) : JSON.stringify(v));
  if (present.some((v) => !isNum(v))) {
    const keys = [];
    const seen = new Map();
    for (const v of present) { const k = JSON.stringify(v); if (!seen.has(k)) { seen.set(k, keys.length); keys.push(v); } }
    const n = keys.length;
    const at = (i) => (n === 1 ? 0.5 : i / (n - 1));
    return {
      kind: 'category',
      pos: (v) => (seen.has(JSON.stringify(v)) ? at(seen.get(JSON.stringify(v))) : null),
      ticks: keys.map((v, i) => ({ v, label: fmt(v), at: at(i) })),
    };
  }
  let lo = Math.min(...present); let hi = Math.max(...present);
  if (!present.length) { lo = 0; hi = 1; }
  const useLog = !!log && lo > 0;
  if (useLog) {
    if (hi === lo) { lo /= 2; hi *= 2; }
    const l0 = Math.log10(lo); const l1 = Math.log10(hi);
    const pos = (v) => (isNum(v) && v > 0 ? (Math.log10(v) - l0) / (l1 - l0) : null);
    return { kind: 'log', pos, ticks: logTicks(lo, hi).map((v) => ({ v, label: fmtNum(v), at: pos(v) })) };
  }
  if (hi === lo) { const d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
  const pos = (v) => (isNum(v) ? (v - lo) / (hi - lo) : null);
  return { kind: 'linear', pos, ticks: linearTicks(lo, hi, 4).map((v) => ({ v, label: fmtNum(v), at: pos(v) })) };
}

/** At most max of the ticks, evenly picked, the first and last kept. */
function thin(ticks, max) {
  if (ticks.length <= max) return ticks;
  const step = Math.ceil((ticks.length - 1) / Math.max(1, max - 1));
  return ticks.filter((t, i) => i % step === 0 || i === ticks.length - 1 && (ticks.length - 1) % step >= step / 2);
}

/** Colour of a metric value on a green (best) to red (worst) ramp; t in [0, 1], 0 = best. */
export function rampColor(t) {
  const a = [23, 163, 152]; const b = [228, 87, 46];
  const c = a.map((x, i) => Math.round(x + (b[i] - x) * Math.min(1, Math.max(0, t))));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

/**
 * Parallel coordinates. axes: [{key, label, log?}] left to right (the metric last); rows:
 * [{values: {key: value}, color, label, best?, onclick?}], one polyline each (class "pc-line",
 * "best" for the highlighted one), through the axes where the row has a value. Each axis is
 * numeric (linear or log) or categorical (axisScale).
 */
export function parallelCoords(axes, rows, opts = {}) {
  const wrap = h('div', { class: 'chart pc' });
  const draw = () => {
    const width = Math.max(320, wrap.clientWidth || 700);
    const height = opts.height || 300;
    const m = { l: 56, r: 56, t: 34, b: 14 };
    const W = width - m.l - m.r; const H = height - m.t - m.b;
    const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': opts.title || 'parallel coordinates' });
    fill(wrap, svg);
    if (!rows.length || !axes.length) {
      svg.append(s('text', { class: 'no-data', x: width / 2, y: height / 2, 'text-anchor': 'middle', text: opts.empty || 'no trial with a value yet' }));
      return;
    }
    const ax = (i) => m.l + (axes.length === 1 ? W / 2 : (i / (axes.length - 1)) * W);
    const ay = (p) => m.t + (1 - p) * H;
    const scales = axes.map((a) => axisScale(rows.map((r) => r.values[a.key]), a.log));
    const lines = s('g', { class: 'pc-lines' });
    // the best row last, so it is drawn on top
    const ordered = rows.map((r, i) => [r, i]).sort((x, y) => Number(!!x[0].best) - Number(!!y[0].best));
    for (const [r] of ordered) {
      const pts = [];
      axes.forEach((a, i) => { const p = scales[i].pos(r.values[a.key]); if (p !== null) pts.push(`${ax(i).toFixed(1)},${ay(p).toFixed(1)}`); });
      const line = s('polyline', {
        class: r.best ? 'pc-line best' : 'pc-line', stroke: r.color, points: pts.join(' '),
        'data-label': r.label,
      }, s('title', { text: r.label }));
      if (r.onclick) line.addEventListener('click', r.onclick);
      lines.append(line);
    }
    svg.append(lines);
    axes.forEach((a, i) => {
      const x = ax(i);
      const g = s('g', { class: 'axis pc-axis', 'data-key': a.key, 'data-scale': scales[i].kind });
      g.append(s('line', { class: 'pc-axis-line', x1: x, x2: x, y1: m.t, y2: m.t + H }));
      for (const t of thin(scales[i].ticks, Math.max(2, Math.floor(H / 22)))) {
        if (t.at === null || t.at < -1e-9 || t.at > 1 + 1e-9) continue;
        g.append(s('line', { class: 'pc-tick', x1: x - 3, x2: x, y1: ay(t.at), y2: ay(t.at) }),
          s('text', { x: x - 5, y: ay(t.at) + 3.5, 'text-anchor': 'end', text: t.label.length > 12 ? t.label.slice(0, 11) + '…' : t.label }));
      }
      const short = a.label.length > 22 ? '…' + a.label.slice(-21) : a.label;
      g.append(s('text', { class: 'axis-label', x, y: m.t - 14, 'text-anchor': i === 0 ? 'start' : i === axes.length - 1 ? 'end' : 'middle', text: short },
        s('title', { text: a.label + (scales[i].kind === 'log' ? ' (log scale)' : '') })));
      if (scales[i].kind === 'log') g.append(s('text', { class: 'pc-scale', x, y: m.t - 3, 'text-anchor': 'middle', text: 'log' }));
      svg.append(g);
    });
  };
  wrap.redraw = draw;
  charts.add(wrap);
  requestAnimationFrame(draw);
  return wrap;
}

/**
 * A scatter plot of points [{x, y, color, label, best?}] (x numeric or categorical, y numeric):
 * one circle each (class "pt", "best" for the highlighted one). opts: {xLabel, yLabel, xLog,
 * height, title}.
 */
export function scatterChart(points, opts = {}) {
  const wrap = h('div', { class: 'chart scatter' });
  const draw = () => {
    const width = Math.max(220, wrap.clientWidth || 320);
    const height = opts.height || 200;
    const m = { l: 54, r: 12, t: 8, b: 34 };
    const W = width - m.l - m.r; const H = height - m.t - m.b;
    const svg = s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': opts.title || 'scatter' });
    fill(wrap, svg);
    const usable = points.filter((p) => p.x !== null && p.x !== undefined && isNum(p.y));
    svg.append(s('rect', { class: 'frame', x: m.l, y: m.t, width: W, height: H }));
    if (opts.xLabel) svg.append(s('text', { class: 'axis-label', x: m.l + W / 2, y: height - 4, 'text-anchor': 'middle', text: opts.xLabel }));
    if (!usable.length) {
      svg.append(s('text', { class: 'no-data', x: m.l + W / 2, y: m.t + H / 2, 'text-anchor': 'middle', text: opts.empty || 'no values yet' }));
      return;
    }
    const xs = axisScale(usable.map((p) => p.x), opts.xLog);
    const ys = axisScale(usable.map((p) => p.y), false);
    // a little room inside the frame so points on the extremes are not cut
    const px = (v) => m.l + 8 + xs.pos(v) * (W - 16);
    const py = (v) => m.t + 6 + (1 - ys.pos(v)) * (H - 12);
    const axis = s('g', { class: 'axis', 'data-scale': xs.kind });
    for (const t of ys.ticks) {
      if (t.at < -1e-9 || t.at > 1 + 1e-9) continue;
      const y = m.t + 6 + (1 - t.at) * (H - 12);
      axis.append(s('line', { class: 'gridline', x1: m.l, x2: m.l + W, y1: y, y2: y }),
        s('text', { x: m.l - 6, y: y + 3.5, 'text-anchor': 'end', text: t.label }));
    }
    for (const t of thin(xs.ticks, Math.max(2, Math.floor(W / 52)))) {
      if (t.at === null || t.at < -1e-9 || t.at > 1 + 1e-9) continue;
      const x = m.l + 8 + t.at * (W - 16);
      axis.append(s('text', { x, y: m.t + H + 14, 'text-anchor': 'middle', text: t.label.length > 10 ? t.label.slice(0, 9) + '…' : t.label }));
    }
    svg.append(axis);
    const dots = s('g', {});
    for (const p of [...usable].sort((a, b) => Number(!!a.best) - Number(!!b.best))) {
      const c = s('circle', { class: p.best ? 'pt best' : 'pt', cx: px(p.x).toFixed(1), cy: py(p.y).toFixed(1), r: p.best ? 5 : 3.8, fill: p.color },
        s('title', { text: p.label }));
      if (p.onclick) c.addEventListener('click', p.onclick);
      dots.append(c);
    }
    svg.append(dots);
  };
  wrap.redraw = draw;
  charts.add(wrap);
  requestAnimationFrame(draw);
  return wrap;
}
