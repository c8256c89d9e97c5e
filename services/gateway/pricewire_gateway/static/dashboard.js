// The dashboard's views over the live feed of app.js (window.pricewire): a candle chart per card and a large one
// for the selected asset, the selected asset's venue table, and the signed-in user's alerts and portfolio.
import { Account } from "./account.js";
import { CandleSeries, draw } from "./chart.js";
import { SourcesTable } from "./sources.js";

const feed = window.pricewire;
const QUALITY_REFRESH_MS = 5000; // ages and connection states move between consensus events
const cards = Array.from(document.querySelectorAll(".card"));
const assets = cards.map((card) => card.dataset.asset);
const series = new Map(assets.map((asset) => [asset, new CandleSeries(asset)]));
const bigChart = document.getElementById("chart");
const sources = new SourcesTable({
  body: document.getElementById("sources-body"),
  caption: document.getElementById("sources-caption"),
  formatUsd: feed.formatUsd,
});
let selected = null;
let everConnected = false;
const unloaded = new Set(assets); // assets whose history has not been read yet

function redraw(asset) {
  const candles = series.get(asset);
  const card = document.querySelector(`.card[data-asset="${CSS.escape(asset)}"]`);
  draw(card.querySelector("canvas.candles"), candles, { max: 30, formatUsd: feed.formatUsd });
  if (asset === selected) draw(bigChart, candles, { max: 90, axis: true, formatUsd: feed.formatUsd });
}

const loading = new Set(); // assets whose history request is in flight

async function loadHistory(asset) {
  if (loading.has(asset)) return;
  loading.add(asset);
  const candles = series.get(asset);
  candles.loaded = false; // live prices wait for the answer, then go on top of it
  try {
    const response = await fetch(`/api/v1/history/${encodeURIComponent(asset)}?interval=1m&limit=240`,
      { headers: { Accept: "application/json" } });
    if (response.ok) {
      candles.setHistory(await response.json());
      unloaded.delete(asset);
    } else {
      console.warn("history unavailable", asset, response.status);
      candles.goLive();
    }
  } catch (err) {
    console.warn("history request failed", asset, err);
    candles.goLive();
  } finally {
    loading.delete(asset);
  }
  redraw(asset);
}

function select(asset) {
  selected = asset;
  for (const card of cards) {
    const on = card.dataset.asset === asset;
    card.classList.toggle("selected", on);
    card.querySelector("button.select").setAttribute("aria-pressed", String(on));
  }
  document.getElementById("detail-title").textContent = `${asset}: candles and venues`;
  document.getElementById("detail").dataset.asset = asset;
  redraw(asset);
  sources.select(asset);
}

for (const card of cards) {
  card.querySelector("button.select").addEventListener("click", () => {
    select(card.dataset.asset);
    document.getElementById("detail").focus({ preventScroll: false });
  });
}

feed.on("price", (data) => {
  const candles = series.get(data.symbol);
  if (candles !== undefined && candles.apply(data)) redraw(data.symbol);
  sources.onPrice(data);
});

feed.on("connection", (state) => {
  if (state !== "connected") return;
  // After an outage the candles missed while away come from the history again, as do those never read.
  for (const asset of assets) if (everConnected || unloaded.has(asset)) loadHistory(asset);
  everConnected = true;
});

new ResizeObserver(() => { for (const asset of assets) redraw(asset); }).observe(document.body);
setInterval(() => { if (selected !== null && document.visibilityState === "visible") sources.refresh(); },
  QUALITY_REFRESH_MS);

for (const data of feed.latest.values()) series.get(data.symbol)?.apply(data);
assets.forEach(loadHistory);
if (assets.length > 0) select(assets[0]);
new Account(feed);
