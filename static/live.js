// The live connection: SockJS to "live" (relative, so the page works behind a path prefix),
// token authentication when the server asks for it, topic subscriptions, and reconnects with
// exponential backoff. It reports its state to one callback and every decoded message to another.

const TRANSPORTS = ["websocket", "xhr-streaming", "eventsource", "xhr-polling"];
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 10000;
const CLOSE_UNAUTHORIZED = 3401;
const CLOSE_REASONS = {3000: "server restarting", 3008: "too slow, messages were dropped", 3401: "unauthorized"};

/**
 * States: "connecting" (first attempt), "open", "authenticating", "reconnecting" (waiting to
 * retry), "token-required" (the server wants a token and none is set), "unauthorized" (the
 * token was refused; no retry until it changes).
 */
export class LiveClient {
  /**
   * onData(message): a history or live message, as received (JSON text) or decoded, for the
   * page to decode and apply when it has time; onMessage(message): any other message, decoded.
   */
  constructor({onData, onMessage, onState, url = "live", healthUrl = "health"}) {
    this.onData = onData;
    this.onMessage = onMessage;
    this.onState = onState;
    this.url = url;
    this.healthUrl = healthUrl;
    this.token = "";
    this.sock = null;
    this.attempt = 0;
    this.timer = null;
    this.access = "open";      // "open" or "token", from /health
    this.state = "connecting";
    this.detail = "";
    this.transport = "";
    this.role = null;          // {role, merchant_id} after token authentication
    this.retryAt = 0;
    this.generation = 0;       // bumps on every (re)connect; stale callbacks check it
  }

  start() {
    this.connect();
  }

  setState(state, detail = "") {
    this.state = state;
    this.detail = detail;
    this.onState(this);
  }

  /** The token changed: a refused or missing token gets a new chance, a token session re-authenticates. */
  setToken(token) {
    if (token === this.token) return;
    this.token = token;
    if (this.state === "unauthorized" || this.state === "token-required" ||
        (this.access === "token" && (this.state === "open" || this.state === "authenticating"))) {
      this.restart();
    }
  }

  /** Receive only these topics from now on (the server sends each one's history again). */
  subscribe(topics) {
    if (this.state === "open") this.send({type: "subscribe", topics: [...topics]});
  }

  send(message) {
    if (this.sock !== null && this.sock.readyState === SockJS.OPEN) this.sock.send(JSON.stringify(message));
  }

  /** Drop the current connection (if any) and connect again now. */
  restart() {
    this.attempt = 0;
    this.connect();
  }

  teardown() {
    clearTimeout(this.timer);
    this.timer = null;
    this.generation++;
    const sock = this.sock;
    this.sock = null;
    if (sock !== null) {
      sock.onopen = sock.onmessage = sock.onclose = null;
      try { sock.close(); } catch (error) { /* already closed */ }
    }
  }

  async connect() {
    this.teardown();
    const generation = this.generation;
    this.role = null;
    this.transport = "";
    this.lastError = "";
    if (this.state !== "reconnecting") this.setState(this.attempt === 0 ? "connecting" : "reconnecting");
    // /health says whether live data needs a token; it answers 503 with a JSON body while the
    // proxy starts, and older servers do not say (then it is open).
    try {
      const response = await fetch(this.healthUrl, {cache: "no-store"});
      const body = await response.json().catch(() => ({}));
      this.access = body && body.live_access === "token" ? "token" : "open";
    } catch (error) {
      if (generation === this.generation) this.retry("server unreachable");
      return;
    }
    if (generation !== this.generation) return;
    if (this.access === "token" && !this.token) {
      this.setState("token-required", "live data needs a token: enter it under Access");
      return;
    }
    const sock = new SockJS(this.url, null, {transports: TRANSPORTS});
    this.sock = sock;
    sock.onopen = () => {
      this.transport = sock.transport;
      if (this.access === "token") {
        this.send({type: "auth", token: this.token});  // before anything else
        this.setState("authenticating");
      } else {
        this.opened();
      }
    };
    sock.onmessage = (event) => this.received(event.data);
    sock.onclose = (event) => this.closed(event);
  }

  opened() {
    this.attempt = 0;
    this.setState("open");
  }

  received(data) {
    // The proxy writes data messages with "type" first: they go undecoded to the page's queue.
    if (data.startsWith('{"type":"message"') || data.startsWith('{"type":"history"')) {
      this.onData(data);
      return;
    }
    let message;
    try {
      message = JSON.parse(data);
    } catch (error) {
      return;
    }
    if (message.type === "auth") {
      this.role = {role: message.role, merchant_id: message.merchant_id};
      this.opened();
      return;
    }
    if (message.type === "history" || message.type === "message") {
      this.onData(message);
      return;
    }
    if (message.type === "error") {
      this.lastError = String(message.error);
      if (this.state !== "open") this.setState(this.state, this.lastError);
    }
    this.onMessage(message);
  }

  closed(event) {
    this.sock = null;
    if (event.code === CLOSE_UNAUTHORIZED) {
      this.teardown();
      this.setState("unauthorized", this.lastError || event.reason || "unauthorized");
      return;
    }
    const why = CLOSE_REASONS[event.code] || "connection lost";
    this.retry(why);
  }

  retry(why) {
    this.teardown();
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** this.attempt) * (0.85 + 0.3 * Math.random());
    this.attempt++;
    this.retryAt = Date.now() + delay;
    this.setState("reconnecting", why);
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
