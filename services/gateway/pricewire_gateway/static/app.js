// Pricewire live page: load /api/v1/prices, then follow room "prices" on /ws. No build step, no CDN.
"use strict";

(() => {
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const latestSeq = new Map(); // asset -> seq shown, so a late snapshot never replaces a newer update
  const connection = document.getElementById("connection");
  let backoffMs = BACKOFF_MIN_MS;

  function setConnection(state, text) {
    connection.dataset.state = state;
    connection.textContent = text;
  }

  // Every digit the consensus carries is shown (at least two): the page never rounds a price away.
  function formatUsd(value) {
    return value.toLocaleString(undefined, {
      style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 12,
    });
  }

  function formatSigned(value, suffix) {
    const sign = value > 0 ? "+" : "";
    const digits = Math.abs(value) >= 1 || value === 0 ? 2 : 6;
    return sign + value.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 2 }) + suffix;
  }

  function render(data) {
    const card = document.querySelector(`.card[data-asset="${CSS.escape(data.symbol)}"]`);
    if (!card) return;
    const shown = latestSeq.get(data.symbol);
    if (shown !== undefined && data.seq < shown) return;
    latestSeq.set(data.symbol, data.seq);

    card.querySelector(".price").textContent = formatUsd(data.price);
    const change = card.querySelector(".change");
    if (data.change_24h === null || data.change_percent_24h === null) {
      change.textContent = "24h: n/a";
      change.dataset.direction = "flat";
    } else {
      change.textContent = `24h: ${formatSigned(data.change_24h, "")} (${formatSigned(data.change_percent_24h, "%")})`;
      change.dataset.direction = data.change_24h > 0 ? "up" : data.change_24h < 0 ? "down" : "flat";
    }
    const status = card.querySelector(".status");
    status.textContent = data.status;
    status.dataset.status = data.status;
    card.querySelector(".confidence").textContent = "± " + formatUsd(data.confidence);
    card.querySelector(".sources").textContent = `${data.n_used}/${data.n_sources}`;
    const updated = card.querySelector(".updated");
    updated.dateTime = data.timestamp;
    updated.textContent = new Date(data.timestamp).toLocaleTimeString();
    card.dataset.seq = String(data.seq);
    card.classList.add("flash");
    setTimeout(() => card.classList.remove("flash"), 300);
  }

  async function loadSnapshot() {
    try {
      const response = await fetch("/api/v1/prices", { headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const body = await response.json();
      body.prices.forEach(render);
    } catch (err) {
      console.warn("snapshot failed", err);
    }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws`);
    ws.addEventListener("open", () => {
      backoffMs = BACKOFF_MIN_MS;
      setConnection("live", "live");
      ws.send(JSON.stringify({ type: "join_room", room: "prices" }));
    });
    ws.addEventListener("message", (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "price_update") render(frame.data);
      else if (frame.type === "error") console.warn("gateway error", frame.code, frame.message);
    });
    ws.addEventListener("close", () => {
      const delay = Math.round(backoffMs * (0.75 + Math.random() * 0.5));
      setConnection("reconnecting", `disconnected, reconnecting in ${(delay / 1000).toFixed(1)} s`);
      backoffMs = Math.min(backoffMs * 2, BACKOFF_MAX_MS);
      setTimeout(connect, delay);
    });
  }

  loadSnapshot().finally(connect);
})();
