// The export panel: a merchant token (kept in memory only, never in the URL or any storage),
// a topic from GET /topics, and GET /export/data/<topic> which answers {"url": "data/<file>.csv"}.

import {escapeHtml} from "./util.js";

export class ExportPanel {
  constructor({tokenInput, topicSelect, button, result, getToken}) {
    this.tokenInput = tokenInput;
    this.topicSelect = topicSelect;
    this.button = button;
    this.result = result;
    this.getToken = getToken;
    this.busy = false;
    button.addEventListener("click", () => this.run());
  }

  setTopics(topics) {
    const selected = this.topicSelect.value;
    this.topicSelect.replaceChildren(...topics.map((topic) => new Option(topic, topic)));
    if (topics.includes(selected)) this.topicSelect.value = selected;
    else if (topics.includes("buyOffer")) this.topicSelect.value = "buyOffer";
  }

  show(kind, html) {
    this.result.className = `export-result ${kind}`;
    this.result.innerHTML = html;
    this.result.dataset.state = kind;
  }

  async run() {
    if (this.busy) return;
    const token = this.getToken();
    const topic = this.topicSelect.value;
    if (!token) {
      this.show("error", "Enter a merchant token first.");
      this.tokenInput.focus();
      return;
    }
    if (!topic) {
      this.show("error", "No topic to export.");
      return;
    }
    this.busy = true;
    this.button.disabled = true;
    this.show("busy", `Exporting <b>${escapeHtml(topic)}</b>…`);
    try {
      const response = await fetch(`export/data/${encodeURIComponent(topic)}`, {
        headers: {Authorization: `Token ${token}`, Accept: "application/json"},
        cache: "no-store",
        credentials: "omit",
      });
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        const message = body && typeof body.error === "string" ? body.error : `${response.status} ${response.statusText}`;
        this.show("error", `${escapeHtml(message)} <span class="muted">(HTTP ${response.status})</span>`);
        return;
      }
      if (!body || typeof body.url !== "string") {
        this.show("error", "The server's answer has no file URL.");
        return;
      }
      // The URL is relative to the page (which may sit behind a path prefix).
      const href = new URL(body.url, document.baseURI).href;
      const name = body.url.split("/").pop();
      this.show("ok", `<a class="download" href="${escapeHtml(href)}" download="${escapeHtml(name)}">` +
                      `Download ${escapeHtml(topic)} CSV</a><span class="muted">${escapeHtml(name)}</span>`);
    } catch (error) {
      this.show("error", "Cannot reach the server.");
    } finally {
      this.busy = false;
      this.button.disabled = false;
    }
  }
}
