// Pricewire live feed: load /api/v1/prices, then follow room "prices" on /ws, reconnecting (and signing in and
// joining again) whenever the socket drops. Fills the cards; hands every frame to the dashboard modules through
// window.pricewire. No build step, no CDN; every server value reaches the page as text, never as markup.
"use strict";

(() => {
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 5000;
  const TOKEN_KEY = "pricewire.token";
  const latestSeq = new Map(); // asset -> seq shown, so a late snapshot never replaces a newer update
  const latest = new Map(); // asset -> the newest price data shown
  const listeners = new Map(); // frame type (or "connection") -> [fn]
  const connection = document.getElementById("connection");
  let backoffMs = BACKOFF_MIN_MS;
  let socket = null;
  let retryTimer = null;

  function emit(type, payload) {
    for (const fn of listeners.get(type) || []) {
      try {
        fn(payload);
      } catch (err) {
        console.error("pricewire listener failed", type, err); // one broken view must not stop the feed
      }
    }
  }

  function setConnection(state, text) {
    connection.dataset.state = state;
    connection.textContent = text;
    emit("connection", state);
  }

  // Every digit the consensus carries is shown (at least two): the page never rounds a price away.
  function formatUsd(value) {
    return value.toLocaleString("en-US", {
      style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 12,
    });
  }

  // Decimals after the point in a number's shortest text (1e-7 style included), to undo float noise in sums.
  function decimalsOf(value) {
    const [mantissa, exponent] = String(value).split("e");
    const fraction = (mantissa.split(".")[1] || "").length;
    return Math.max(0, fraction - Number(exponent || 0));
  }

  // price ± confidence, rounded to the digits the two carry: 67528.18 + 32.885 is 67561.065, not 67561.06499999999.
  function bandEdge(price, confidence, sign) {
    const digits = Math.min(20, Math.max(decimalsOf(price), decimalsOf(confidence)));
    return Number((price + sign * confidence).toFixed(digits));
  }

  function formatSigned(value, suffix) {
    const sign = value > 0 ? "+" : "";
    const digits = Math.abs(value) >= 1 || value === 0 ? 2 : 6;
    return sign + value.toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: 2 }) + suffix;
  }

  function render(data) {
    const card = document.querySelector(`.card[data-asset="${CSS.escape(data.symbol)}"]`);
    if (!card) return;
    const shown = latestSeq.get(data.symbol);
    if (shown !== undefined && data.seq < shown) return;
    latestSeq.set(data.symbol, data.seq);
    latest.set(data.symbol, data);

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
    status.textContent = data.stale ? `${data.status} (stored)` : data.status;
    status.dataset.status = data.status;
    card.querySelector(".anomaly").hidden = !data.anomaly;
    card.querySelector(".confidence").textContent = "± " + formatUsd(data.confidence);
    card.querySelector(".band").textContent =
      `${formatUsd(bandEdge(data.price, data.confidence, -1))} – ${formatUsd(bandEdge(data.price, data.confidence, 1))}`;
    card.querySelector(".sources").textContent = `${data.n_used}/${data.n_sources}`;
    const updated = card.querySelector(".updated");
    updated.dateTime = data.timestamp;
    updated.textContent = new Date(data.timestamp).toLocaleTimeString();
    card.dataset.seq = String(data.seq);
    card.dataset.price = String(data.price);
    card.classList.add("flash");
    setTimeout(() => card.classList.remove("flash"), 300);
    emit("price", data);
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

  function send(frame) {
    if (socket === null || socket.readyState !== WebSocket.OPEN) return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  function connect() {
    retryTimer = null;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/ws`);
    socket = ws;
    ws.addEventListener("open", () => {
      backoffMs = BACKOFF_MIN_MS;
      // Sign in by the first message (a token in the URL could end up in a proxy's log), then join again.
      const token = sessionStorage.getItem(TOKEN_KEY);
      if (token) ws.send(JSON.stringify({ type: "auth", token }));
      ws.send(JSON.stringify({ type: "join_room", room: "prices" }));
    });
    ws.addEventListener("message", (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "price_update") render(frame.data);
      // Connected means following: the room is joined (and, frames being answered in order, signed in).
      else if (frame.type === "room_joined") setConnection("connected", "connected");
      else if (frame.type === "error") console.warn("gateway error", frame.code, frame.message);
      emit(frame.type, frame);
    });
    ws.addEventListener("close", () => {
      if (socket !== ws) return; // replaced on purpose by reconnect()
      socket = null;
      const delay = Math.round(backoffMs * (0.75 + Math.random() * 0.5));
      setConnection("reconnecting", `reconnecting in ${(delay / 1000).toFixed(1)} s`);
      backoffMs = Math.min(backoffMs * 2, BACKOFF_MAX_MS);
      retryTimer = setTimeout(connect, delay);
    });
  }

  // A fresh socket now (after sign-out a socket stays signed in until it closes).
  function reconnect() {
    const old = socket;
    socket = null;
    if (retryTimer !== null) clearTimeout(retryTimer);
    if (old !== null) old.close(1000, "reconnect");
    setConnection("connecting", "connecting…");
    connect();
  }

  window.pricewire = {
    on(type, fn) {
      if (!listeners.has(type)) listeners.set(type, []);
      listeners.get(type).push(fn);
    },
    send,
    reconnect,
    latest,
    formatUsd,
    formatSigned,
    tokenKey: TOKEN_KEY,
    get state() { return connection.dataset.state; },
  };

  loadSnapshot().finally(connect);
})();
