// A signed-in user's alerts and portfolio. The token (pasted from `pricewire token --user NAME`) stays in this
// tab's sessionStorage; REST calls carry it as a bearer, and app.js signs the socket in with it on each connect,
// so alert_triggered and portfolio_update frames arrive live.
import { el, fill } from "./dom.js";

const TYPES = { above: "at or above", below: "at or below", change_pct: "changes by" };

export class Account {
  constructor(feed) {
    this.feed = feed;
    this.$ = (id) => document.getElementById(id);
    this.seenEvents = new Set();
    this.assetOptions = Array.from(this.$("alert-symbol").options).map((o) => o.value);
    this.$("signin-form").addEventListener("submit", (event) => { event.preventDefault(); this.signIn(); });
    this.$("signout").addEventListener("click", () => this.signOut("Signed out."));
    this.$("alert-type").addEventListener("change", () => this.showAlertFields());
    this.$("alert-form").addEventListener("submit", (event) => { event.preventDefault(); this.createAlert(); });
    this.$("pf-add").addEventListener("click", () => this.addHoldingRow("", ""));
    this.$("pf-form").addEventListener("submit", (event) => { event.preventDefault(); this.saveHoldings(); });
    feed.on("authenticated", (frame) => this.onAuthenticated(frame));
    feed.on("error", (frame) => {
      if (frame.code === "unauthorized") this.signOut(`Sign-in refused: ${frame.message}`);
    });
    feed.on("alert_triggered", (frame) => this.onTriggered(frame.data));
    feed.on("portfolio_update", (frame) => this.showValuation(frame.data));
    this.showAlertFields();
    if (this.token()) this.enter();
  }

  token() {
    return sessionStorage.getItem(this.feed.tokenKey);
  }

  signIn() {
    const token = this.$("token-input").value.trim();
    if (!token) return;
    sessionStorage.setItem(this.feed.tokenKey, token);
    this.$("token-input").value = "";
    this.$("signin-status").textContent = "Signing in…";
    this.feed.reconnect(); // the new socket signs in by its first message
    this.enter();
  }

  signOut(message) {
    sessionStorage.removeItem(this.feed.tokenKey);
    this.$("signed-in").hidden = true;
    this.$("signin-form").hidden = false;
    this.$("signin-status").textContent = message;
    this.$("user-name").textContent = "";
    this.seenEvents.clear();
    fill(this.$("alert-list"));
    fill(this.$("alert-events"));
    fill(this.$("pf-body"));
    fill(this.$("pf-rows"));
    // A socket stays signed in until it closes: open a fresh one without the token.
    if (this.feed.state === "connected") this.feed.reconnect();
  }

  async enter() {
    this.$("signin-form").hidden = true;
    this.$("signed-in").hidden = false;
    await Promise.all([this.loadAlerts(), this.loadHistory(), this.loadPortfolio()]);
  }

  onAuthenticated(frame) {
    this.$("user-name").textContent = frame.user + (frame.admin ? " (admin)" : "");
    this.$("signed-in").dataset.user = frame.user;
    this.$("signin-status").textContent = `Signed in as ${frame.user}.`;
  }

  /** A REST call with the bearer; a 401 signs out with the server's reason. Answers [ok, body]. */
  async call(method, path, body) {
    const token = this.token();
    if (!token) return [false, null];
    const headers = { Accept: "application/json", Authorization: `Bearer ${token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      return [false, { message: `the gateway did not answer (${err.message})` }];
    }
    const answer = response.status === 204 ? null : await response.json().catch(() => null);
    if (response.status === 401) {
      this.signOut(`Sign-in refused: ${answer && answer.message ? answer.message : "unauthorized"}`);
      return [false, answer];
    }
    return [response.ok, answer];
  }

  // --- alerts -------------------------------------------------------------------------------------

  showAlertFields() {
    const change = this.$("alert-type").value === "change_pct";
    for (const label of this.$("alert-form").querySelectorAll("label[data-for]")) {
      label.hidden = (label.dataset.for === "change") !== change;
    }
  }

  async createAlert() {
    const type = this.$("alert-type").value;
    const body = { symbol: this.$("alert-symbol").value, alert_type: type };
    // Decimals go as strings: the gateway keeps their exact digits.
    // A field left empty is left out, so the gateway's message names what is missing.
    if (type === "change_pct") {
      const pct = this.$("alert-pct").value.trim();
      const window = Number.parseInt(this.$("alert-window").value, 10);
      if (pct) body.pct = pct;
      if (Number.isFinite(window)) body.window_s = window;
    } else {
      const target = this.$("alert-target").value.trim();
      if (target) body.target_price = target;
    }
    const note = this.$("alert-note").value.trim();
    if (note) body.note = note;
    const [ok, answer] = await this.call("POST", "/api/v1/alerts", body);
    this.$("alert-error").textContent = ok ? "" : `Alert not created: ${answer && answer.message ? answer.message : "error"}`;
    if (ok) {
      this.$("alert-target").value = "";
      this.$("alert-pct").value = "";
      this.$("alert-note").value = "";
      await this.loadAlerts();
    }
  }

  async loadAlerts() {
    const [ok, answer] = await this.call("GET", "/api/v1/alerts");
    if (!ok) return;
    const list = this.$("alert-list");
    list.dataset.count = String(answer.alerts.length);
    if (answer.alerts.length === 0) {
      fill(list, el("li", { class: "muted" }, "No alerts yet."));
      return;
    }
    fill(list, ...answer.alerts.map((alert) => this.alertItem(alert)));
  }

  describe(alert) {
    if (alert.alert_type === "change_pct") {
      const sign = alert.pct > 0 ? "+" : "";
      return `${alert.symbol} ${TYPES.change_pct} ${sign}${alert.pct} % within ${alert.window_s} s`;
    }
    return `${alert.symbol} ${TYPES[alert.alert_type] || alert.alert_type} ${this.feed.formatUsd(alert.target_price)}`;
  }

  alertItem(alert) {
    const remove = el("button", { type: "button", class: "delete", "aria-label": `Delete alert ${alert.id}` }, "Delete");
    remove.addEventListener("click", () => this.deleteAlert(alert.id));
    const state = alert.armed ? "armed" : "fired, re-arms past the band";
    const fired = alert.fired_count === 1 ? "fired once" : `fired ${alert.fired_count} times`;
    return el("li", { dataset: { alertId: String(alert.id), armed: String(alert.armed) } },
      el("span", { class: "what" }, this.describe(alert)),
      alert.note ? el("span", { class: "note" }, ` “${alert.note}”`) : null,
      el("span", { class: "muted" }, ` · ${state} · ${fired}`),
      " ", remove);
  }

  async deleteAlert(id) {
    const [ok, answer] = await this.call("DELETE", `/api/v1/alerts/${encodeURIComponent(id)}`);
    this.$("alert-error").textContent = ok ? "" : `Alert not deleted: ${answer && answer.message ? answer.message : "error"}`;
    await this.loadAlerts();
  }

  async loadHistory() {
    const [ok, answer] = await this.call("GET", "/api/v1/alerts/history?limit=20");
    if (!ok) return;
    for (const event of answer.events.slice().reverse()) this.addEvent(event, false);
  }

  onTriggered(firing) {
    this.addEvent(firing, true);
    this.loadAlerts(); // armed state and fired count changed
  }

  addEvent(firing, live) {
    if (this.seenEvents.has(firing.id)) return; // a re-send keeps its id
    this.seenEvents.add(firing.id);
    const when = new Date(firing.fired_at).toLocaleTimeString();
    const item = el("li", { class: live ? "event live" : "event", dataset: { eventId: String(firing.id), symbol: firing.symbol } },
      el("strong", {}, this.describe(firing)),
      `: ${firing.symbol} at ${this.feed.formatUsd(firing.price)}`,
      firing.change_pct !== null ? ` (${firing.change_pct} %)` : "",
      el("time", { datetime: firing.fired_at }, ` · ${when}`));
    this.$("alert-events").prepend(item);
  }

  // --- portfolio ----------------------------------------------------------------------------------

  async loadPortfolio() {
    const [ok, answer] = await this.call("GET", "/api/v1/portfolio");
    if (!ok) return;
    this.showValuation(answer);
    fill(this.$("pf-rows"));
    for (const holding of answer.holdings) this.addHoldingRow(holding.symbol, String(holding.amount));
    // The valuation names an unpriced holding without its amount: ask for it again rather than drop it on save.
    for (const symbol of answer.unpriced) this.addHoldingRow(symbol, "").querySelector("input").required = true;
    if (answer.holdings.length === 0 && answer.unpriced.length === 0) this.addHoldingRow("", "");
  }

  addHoldingRow(symbol, amount) {
    const rows = this.$("pf-rows");
    const index = rows.children.length;
    const select = el("select", { name: "symbol", "aria-label": `Asset of holding ${index + 1}` },
      ...this.assetOptions.map((code) => el("option", { value: code, selected: code === symbol }, code)));
    const input = el("input", {
      name: "amount", inputmode: "decimal", autocomplete: "off", value: amount, placeholder: "amount",
      "aria-label": `Amount of holding ${index + 1}`,
    });
    const remove = el("button", { type: "button", "aria-label": `Remove holding ${index + 1}` }, "Remove");
    const row = el("div", { class: "pf-row" }, select, input, remove);
    remove.addEventListener("click", () => row.remove());
    rows.append(row);
    return row;
  }

  async saveHoldings() {
    const holdings = [];
    for (const row of this.$("pf-rows").querySelectorAll(".pf-row")) {
      const amount = row.querySelector("input").value.trim();
      if (amount) holdings.push({ symbol: row.querySelector("select").value, amount });
    }
    const [ok, answer] = await this.call("PUT", "/api/v1/portfolio", { holdings });
    this.$("pf-error").textContent = ok ? "" : `Holdings not saved: ${answer && answer.message ? answer.message : "error"}`;
    if (ok) this.showValuation(answer);
  }

  showValuation(v) {
    const usd = this.feed.formatUsd;
    const total = this.$("pf-total");
    total.textContent = usd(v.total_value);
    total.dataset.value = String(v.total_value);
    const change = this.$("pf-change");
    const pct = v.total_change_percent_24h === null ? "" : ` (${this.feed.formatSigned(v.total_change_percent_24h, "%")})`;
    change.textContent = v.total_change_24h === null ? "n/a" : this.feed.formatSigned(v.total_change_24h, "") + pct;
    change.dataset.direction = v.total_change_24h > 0 ? "up" : v.total_change_24h < 0 ? "down" : "flat";
    const rows = v.holdings.map((h) => el("tr", { dataset: { symbol: h.symbol } },
      el("th", { scope: "row" }, h.symbol),
      el("td", { class: "num" }, String(h.amount)),
      el("td", { class: "num" }, usd(h.price)),
      el("td", { class: "num" }, usd(h.value)),
      el("td", { class: "num" }, h.change_24h === null ? "n/a" : this.feed.formatSigned(h.change_24h, ""))));
    for (const symbol of v.unpriced) {
      rows.push(el("tr", { dataset: { symbol } }, el("th", { scope: "row" }, symbol),
        el("td", { colspan: "4", class: "muted" }, "no price yet")));
    }
    fill(this.$("pf-body"), ...rows);
  }
}
