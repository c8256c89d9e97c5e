// The per-venue table of the selected asset: from GET /api/v1/quality/{asset} (ages now, freshness, the
// collector's connection state), and from each live price_update in between (ages at decision). The newest
// consensus (by seq) wins, so a quality answer older than the live event never replaces it.
import { el, fill, formatAge, formatPct } from "./dom.js";

const REASONS = {
  not_usd: "not a USD quote",
  invalid: "invalid quote",
  crossed: "crossed bid/ask",
  stale: "stale",
  jump: "absurd jump",
  outlier: "outlier (deviation)",
  outlier_mad: "outlier (MAD test)",
};

export class SourcesTable {
  constructor({ body, caption, formatUsd }) {
    this.body = body;
    this.caption = caption;
    this.formatUsd = formatUsd;
    this.asset = null;
    this.seq = -1;
    this.request = 0;
  }

  /** Show `asset`; its quality view is fetched at once. */
  select(asset) {
    this.asset = asset;
    this.seq = -1;
    fill(this.body, el("tr", {}, el("td", { colspan: "9", class: "muted" }, "loading…")));
    this.caption.textContent = `Venue quotes behind the ${asset} consensus`;
    return this.refresh();
  }

  async refresh() {
    if (this.asset === null) return;
    const asset = this.asset;
    const ticket = ++this.request;
    let response;
    try {
      response = await fetch(`/api/v1/quality/${encodeURIComponent(asset)}`, { headers: { Accept: "application/json" } });
    } catch (err) {
      console.warn("quality request failed", err);
      return;
    }
    if (ticket !== this.request || asset !== this.asset) return; // another asset was chosen meanwhile
    if (!response.ok) {
      if (this.seq < 0) {
        const body = await response.json().catch(() => null);
        const why = body && typeof body.message === "string" ? body.message : `HTTP ${response.status}`;
        fill(this.body, el("tr", {}, el("td", { colspan: "9", class: "muted" }, `no quality view: ${why}`)));
      }
      return;
    }
    const view = await response.json();
    this.show(view.seq, view.sources, view.as_of);
  }

  /** A live consensus of the selected asset. */
  onPrice(data) {
    if (data.symbol !== this.asset) return;
    const rows = data.sources.map((s) => ({ ...s, admitted: s.reason === null, fresh: null, connection: null }));
    this.show(data.seq, rows, data.timestamp);
  }

  show(seq, sources, asOf) {
    if (seq < this.seq) return;
    this.seq = seq;
    this.body.dataset.seq = String(seq);
    this.caption.textContent =
      `Venue quotes behind the ${this.asset} consensus #${seq}, as of ${new Date(asOf).toLocaleTimeString()}`;
    if (sources.length === 0) {
      fill(this.body, el("tr", {}, el("td", { colspan: "9", class: "muted" }, "no venue quotes")));
      return;
    }
    fill(this.body, ...sources.map((s) => this.row(s)));
  }

  row(s) {
    const verdict = s.admitted ? "admitted" : `excluded: ${REASONS[s.reason] || s.reason}`;
    const age = formatAge(s.age_ms) + (s.fresh === false ? " (old)" : "");
    return el("tr", { dataset: { source: s.source, admitted: String(s.admitted), reason: s.reason || "" } },
      el("th", { scope: "row" }, s.source),
      el("td", {}, s.symbol),
      el("td", {}, s.kind),
      el("td", { class: "num" }, this.formatUsd(s.price)),
      el("td", { class: "num" }, formatPct(s.deviation_pct)),
      el("td", { class: s.admitted ? "verdict ok" : "verdict out" }, verdict),
      el("td", { class: "num" }, age),
      el("td", { class: "num" }, s.weight.toFixed(4)),
      el("td", {}, s.connection || "–"));
  }
}
