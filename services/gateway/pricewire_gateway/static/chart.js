// Candles of one asset: history from GET /api/v1/history/{asset}?interval=1m, extended by live consensus prices,
// drawn on a canvas by hand (no library). The canvas carries its state in data-* for tests and assistive text.

export const INTERVAL_MS = 60_000;
const KEEP = 240; // candles kept per asset: four hours of minutes

/** The candles of one asset, oldest first, each {time (ms), open, high, low, close, count}. */
export class CandleSeries {
  constructor(asset) {
    this.asset = asset;
    this.candles = [];
    this.loaded = false;
    this.pending = []; // live prices that arrived before the history
    this.lastSeq = -1;
  }

  /** Take the history answer; live prices newer than its `timestamp` are applied again on top. */
  setHistory(body) {
    this.candles = body.candles.map((c) => ({
      time: Date.parse(c.time), open: c.open, high: c.high, low: c.low, close: c.close, count: c.count,
    }));
    this.loaded = true;
    const asOf = Date.parse(body.timestamp);
    const pending = this.pending;
    this.pending = [];
    for (const price of pending) {
      if (Date.parse(price.timestamp) >= asOf) this.apply(price, true);
    }
  }

  /** No history to be had (the store is down, say): keep the candles shown and go on live. */
  goLive() {
    this.loaded = true;
    const pending = this.pending;
    this.pending = [];
    for (const price of pending) this.apply(price, true);
  }

  /** Fold one live price in; true when the candles changed. Stale repeats are left out, as the history does. */
  apply(price, replayed = false) {
    if (price.status === "stale" || price.stale) return false;
    if (!replayed) {
      if (price.seq <= this.lastSeq) return false;
      this.lastSeq = price.seq;
    }
    if (!this.loaded) {
      this.pending.push(price);
      return false;
    }
    const ts = Date.parse(price.timestamp);
    const bucket = Math.floor(ts / INTERVAL_MS) * INTERVAL_MS;
    const last = this.candles[this.candles.length - 1];
    if (last !== undefined && bucket < last.time) return false; // older than the candle shown: history has it
    if (last !== undefined && bucket === last.time) {
      last.high = Math.max(last.high, price.price);
      last.low = Math.min(last.low, price.price);
      last.close = price.price;
      last.count += 1;
    } else {
      this.candles.push({ time: bucket, open: price.price, high: price.price, low: price.price, close: price.price, count: 1 });
      if (this.candles.length > KEEP) this.candles.splice(0, this.candles.length - KEEP);
    }
    return true;
  }
}

function css(name, fallback) {
  const value = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return value || fallback;
}

/**
 * Draw the last `max` candles of `series` on `canvas`, sized to its CSS box. `axis` adds price labels.
 * data-candles = candles drawn, data-last-close / data-last-time = the newest candle's close and start.
 */
export function draw(canvas, series, { max = 60, axis = false, formatUsd = String } = {}) {
  const shown = series.candles.slice(-max);
  canvas.dataset.candles = String(shown.length);
  const last = shown[shown.length - 1];
  if (last !== undefined) {
    canvas.dataset.lastClose = String(last.close);
    canvas.dataset.lastHigh = String(last.high);
    canvas.dataset.lastTime = new Date(last.time).toISOString();
    canvas.setAttribute("aria-label",
      `${series.asset} 1-minute candles: ${shown.length}, last close ${formatUsd(last.close)} ` +
      `(high ${formatUsd(last.high)}, low ${formatUsd(last.low)})`);
  } else {
    canvas.setAttribute("aria-label", `${series.asset} 1-minute candles: none yet`);
  }

  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0 || height === 0) return; // hidden: drawn again when shown
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  if (shown.length === 0) {
    ctx.fillStyle = css("--muted", "#8a96a3");
    ctx.font = "12px system-ui, sans-serif";
    ctx.fillText("no candles yet", 8, height / 2);
    return;
  }

  const labelWidth = axis ? 90 : 0;
  const pad = axis ? 14 : 4;
  const plotWidth = width - labelWidth - 2;
  let low = Math.min(...shown.map((c) => c.low));
  let high = Math.max(...shown.map((c) => c.high));
  if (high === low) {
    // A flat market: open a band of 0.01 % so the candles sit mid-height instead of on an edge.
    const half = Math.max(Math.abs(high) * 0.0001, 1e-9);
    high += half;
    low -= half;
  }
  const y = (price) => pad + (high - price) / (high - low) * (height - 2 * pad);
  const step = plotWidth / Math.max(shown.length, max / 2);
  const body = Math.max(1, Math.min(12, step * 0.7));
  const up = css("--up", "#2ecc71");
  const down = css("--down", "#e74c3c");

  // Axis labels carry as many decimals as a quarter of the range needs, and no more.
  const decimals = Math.min(8, Math.max(0, 1 - Math.floor(Math.log10((high - low) / 4))));
  if (axis) {
    ctx.strokeStyle = "rgba(138, 150, 163, 0.25)";
    ctx.fillStyle = css("--muted", "#8a96a3");
    ctx.font = "11px system-ui, sans-serif";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i += 1) {
      const price = low + (high - low) * (i / 4);
      const py = Math.round(y(price)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(0, py);
      ctx.lineTo(plotWidth, py);
      ctx.stroke();
      ctx.fillText(price.toLocaleString("en-US", { style: "currency", currency: "USD",
        minimumFractionDigits: decimals, maximumFractionDigits: decimals }), plotWidth + 6, py + 4);
    }
  }

  shown.forEach((candle, index) => {
    const x = plotWidth - (shown.length - index - 0.5) * step; // newest at the right edge, as trading screens do
    const color = candle.close >= candle.open ? up : down;
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(Math.round(x) + 0.5, y(candle.high));
    ctx.lineTo(Math.round(x) + 0.5, y(candle.low));
    ctx.stroke();
    const top = y(Math.max(candle.open, candle.close));
    const bottom = y(Math.min(candle.open, candle.close));
    ctx.fillRect(Math.round(x - body / 2), top, body, Math.max(1, bottom - top));
  });
}
