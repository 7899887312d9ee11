// chatd.js: a client for chatd's chat protocol, chatd.v1 (docs/PROTOCOL.md).
//
// An ES module without dependencies, for browsers (the daemon serves it at
// /chatd.js) and Node (pass a WebSocket constructor: Node 22's global one,
// `node --experimental-websocket` on Node 20, or the `ws` package). It
// reconnects with exponential backoff and jitter, resumes (the welcome's
// `resume` secret, `since` and `epoch` per room, `cid` retries of sends not
// acknowledged), filters duplicate messages by id per room, refreshes tokens
// through a callback, and keeps each room's state with edits, deletes and
// reactions applied by the `updated` rule (RoomState).
//
//   import { Chatd } from "/chatd.js";
//   const chat = new Chatd({ nick: "alice" });
//   chat.on("message", (m) => console.log(m.room, m.from, m.text));
//   chat.on("state", (s) => console.log(s.state, s.in));
//   chat.connect();
//   await chat.join("tea");
//   const m = await chat.send("tea", "hello");  // the stored message (m.id)
//
// This file is the one source: the npm package in clients/js/ copies it.

export const VERSION = "0.1.0";
export const SUBPROTOCOL = "chatd.v1";

const DEFAULTS = {
  initialDelay: 1000, // ms before the first reconnect (then doubled up to maxDelay)
  maxDelay: 30000,
  factor: 2,
  jitter: 0.5, // each delay is cut by up to this fraction, at random
  connectTimeout: 10000, // ms from a new socket to the welcome
  requestTimeout: 30000, // ms a request may wait for its answer (0: no limit)
  refreshBefore: 60, // s before the token's exp to refresh it (at most half its life)
  maxSeen: 5000, // ids remembered per room to filter duplicates
};

// Frames whose answer is a `message` carrying their ref.
const ANSWERED_BY_MESSAGE = new Set(["send", "edit", "delete", "react", "unreact"]);
// Frames that are sent again on the next connection when it dropped before their answer.
const RETRIED = new Set(["join", "send", "history", "react", "unreact", "read"]);

/** An `error` frame of the server (code: bad_field, forbidden, ...) or of the client (disconnected, closed, timeout). */
export class ChatdError extends Error {
  constructor(code, message, frame) {
    super(message || code);
    this.name = "ChatdError";
    this.code = code;
    this.frame = frame;
  }
}

function randomId(n = 16) {
  const abc = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  const bytes = new Uint8Array(n);
  if (globalThis.crypto?.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < n; i++) bytes[i] = Math.floor(Math.random() * 256);
  let s = "";
  for (const b of bytes) s += abc[b % abc.length];
  return s;
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) return null;
  return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/";
}

function applyEvent(target, e) {
  if (e.id <= target.updated) return false;
  target.updated = e.id;
  if (e.kind === "edit") {
    target.text = e.text;
    target.edited = true;
  } else if (e.kind === "delete") {
    target.text = "";
    target.deleted = true;
  } else if (e.kind === "react" || e.kind === "unreact") {
    const who = e.user ?? e.from;
    const now = (target.reactions[e.emoji] || []).filter((w) => w !== who);
    if (e.kind === "react") now.push(who);
    if (now.length) target.reactions[e.emoji] = now;
    else delete target.reactions[e.emoji];
  }
  return true;
}

/**
 * One room's messages as they are now: edits, deletes and reactions (messages
 * with `kind` and `target`) applied to their target only when their id is
 * above its `updated`, so pages, replays and the live stream can come in any
 * order and give the same state. The client keeps one per joined room
 * (`chat.room(name)`); it can be used alone too.
 */
export class RoomState {
  constructor(name) {
    this.name = name;
    this.members = [];
    this.messages = new Map(); // id -> message state
    this._early = new Map(); // target id -> events that came before it
    this._earlyCount = 0;
  }

  /** Applies a message or an event; returns the message state it changed, or null. */
  apply(m) {
    if (m.kind) {
      const t = this.messages.get(m.target);
      if (t) return applyEvent(t, m) ? t : null;
      if (this._earlyCount >= 2000) {
        const first = this._early.keys().next().value;
        this._earlyCount -= this._early.get(first).length;
        this._early.delete(first);
      }
      const list = this._early.get(m.target) || [];
      list.push(m);
      this._early.set(m.target, list);
      this._earlyCount++;
      return null;
    }
    const have = this.messages.get(m.id);
    const updated = m.updated ?? m.id;
    if (have && updated <= have.updated) return null;
    const state = {
      ...m,
      edited: !!m.edited,
      deleted: !!m.deleted,
      updated,
      reactions: Object.fromEntries(
        Object.entries(m.reactions || {}).map(([k, v]) => [k, [...v]]),
      ),
    };
    delete state.type;
    delete state.ref;
    this.messages.set(m.id, state);
    const early = this._early.get(m.id);
    if (early) {
      this._early.delete(m.id);
      this._earlyCount -= early.length;
      for (const e of early.sort((a, b) => a.id - b.id)) applyEvent(state, e);
    }
    return state;
  }

  get(id) {
    return this.messages.get(id);
  }

  /** The messages (not the events), oldest first. */
  list() {
    return [...this.messages.values()].sort((a, b) => a.id - b.id);
  }

  clear() {
    this.messages.clear();
    this._early.clear();
    this._earlyCount = 0;
  }
}

/**
 * A chatd.v1 connection that comes back by itself.
 *
 * Events (`on(name, fn)`, returns a function that removes fn): `state`
 * ({state: "connecting"|"open"|"reconnecting"|"closed", in?, attempt?, code?, reason?}),
 * `welcome`, `joined`, `message`, `update` (a RoomState message changed),
 * `presence`, `typing`, `read`, `reset`, `refreshed`, `error` (errors that
 * answer no request of this client).
 */
export class Chatd {
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.url = options.url ?? defaultUrl();
    if (!this.url) throw new TypeError("chatd.js: options.url is required outside a page");
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError("chatd.js: no WebSocket here: pass options.WebSocket");
    if (!options.nick && !options.token && !options.getToken) {
      throw new TypeError("chatd.js: a nick, a token or getToken is required");
    }
    this.nick = options.nick ?? null;
    this.state = "idle";
    this.session = null;
    this.user = null;
    this.exp = null;
    this._id = randomId(6);
    this._n = 0;
    this._listeners = new Map();
    this._rooms = new Map(); // name -> {store, active, joined, epoch, lastId, seen, floor, collecting}
    this._pending = new Map(); // ref -> request, in the order asked
    this._ws = null;
    this._ready = false; // welcomed on the current socket
    this._resume = options.resume ?? null; // a session to take over (an earlier welcome's)
    this._sent = new Map(); // ref -> frame of the last requests that have no answer
    this._attempt = 0;
    this._timer = null;
    this._connectTimer = null;
    this._refreshTimer = null;
    this._onOnline = () => {
      if (this.state === "reconnecting") this.reconnectNow();
    };
  }

  // -- events ------------------------------------------------------------------

  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
  }

  _emit(name, ...args) {
    for (const fn of [...(this._listeners.get(name) || [])]) {
      try {
        fn(...args);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  _setState(state, detail = {}) {
    this.state = state;
    this._emit("state", { state, ...detail });
  }

  // -- the connection ------------------------------------------------------------

  /** Opens the connection (and keeps it open until close()). */
  connect() {
    if (this.state !== "idle" && this.state !== "closed") return;
    globalThis.addEventListener?.("online", this._onOnline);
    this._open();
  }

  /** Closes for good: pending requests fail with `closed`. */
  close() {
    clearTimeout(this._timer);
    globalThis.removeEventListener?.("online", this._onOnline);
    const ws = this._ws;
    this._drop();
    if (ws) ws.close(1000);
    for (const req of this._pending.values()) this._fail(req, "closed", "the client was closed");
    this._setState("closed", { code: 1000, reason: "closed by the client" });
  }

  /** Reconnects at once instead of waiting for the backoff's delay. */
  reconnectNow() {
    if (this.state !== "reconnecting") return;
    clearTimeout(this._timer);
    this._open();
  }

  async _open() {
    this._setState("connecting", { attempt: this._attempt });
    let token = this.options.token;
    if (this.options.getToken) {
      try {
        token = await this.options.getToken();
      } catch (e) {
        this._emit("error", e);
        this._retry(0, "getToken failed");
        return;
      }
      if (this.state !== "connecting") return; // closed meanwhile
    }
    let ws;
    try {
      ws = new this.WebSocket(this.url, SUBPROTOCOL);
    } catch (e) {
      this._emit("error", e);
      this._retry(0, String(e.message || e));
      return;
    }
    this._ws = ws;
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && !this._ready) {
        this._lost(ws, 0, "no welcome in time");
        ws.close();
      }
    }, this.options.connectTimeout);
    ws.onopen = () => {
      const hello = { type: "hello" };
      if (token) hello.token = token;
      else hello.nick = this.nick;
      if (this._resume) hello.resume = this._resume;
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws || typeof ev.data !== "string") return;
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch {
        return;
      }
      this._frame(f);
    };
    ws.onclose = (ev) => this._lost(ws, ev.code, ev.reason);
    // A close follows an error, except in some implementations (Node 20's
    // WebSocket when the connection is refused): take the error as the end.
    ws.onerror = () => {
      this._lost(ws, 1006, "connection error");
      try {
        ws.close();
      } catch {
        // (already closing)
      }
    };
  }

  _drop() {
    const ws = this._ws;
    this._ws = null;
    this._ready = false;
    clearTimeout(this._connectTimer);
    clearTimeout(this._refreshTimer);
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    for (const room of this._rooms.values()) {
      room.joined = false;
      room.collecting = null;
    }
  }

  _lost(ws, code, reason) {
    if (ws !== this._ws) return;
    this._drop();
    for (const req of [...this._pending.values()]) {
      if (!req.written) continue;
      req.written = false;
      if (req.frame.type === "leave") this._done(req, { room: req.room });
      else if (!RETRIED.has(req.frame.type) || req.internal) {
        this._fail(req, "disconnected", "the connection dropped before the answer");
      }
    }
    if (code === 4000) return this._stop(code, "replaced: another connection resumed this session");
    if (code === 4001 && !this.options.getToken) return this._stop(code, reason || "unauthorized");
    this._retry(code, reason);
  }

  _stop(code, reason) {
    for (const req of this._pending.values()) this._fail(req, "closed", reason);
    this._setState("closed", { code, reason });
  }

  _retry(code, reason) {
    const o = this.options;
    const base = Math.min(o.maxDelay, o.initialDelay * o.factor ** this._attempt);
    const delay = Math.round(base * (1 - o.jitter * Math.random()));
    this._attempt++;
    this._setState("reconnecting", { in: delay, attempt: this._attempt, code, reason });
    this._timer = setTimeout(() => this._open(), delay);
  }

  _write(frame) {
    this._ws.send(JSON.stringify(frame));
  }

  // -- requests ------------------------------------------------------------------

  _request(frame, { room, internal = false, noAnswer = false } = {}) {
    return new Promise((resolve, reject) => {
      const ref = `${this._id}.${++this._n}`;
      const req = { ref, frame, room, internal, noAnswer, resolve, reject, written: false };
      this._pending.set(ref, req);
      if (this.options.requestTimeout > 0) {
        req.timer = setTimeout(
          () => this._fail(req, "timeout", `no answer to ${frame.type} in time`),
          this.options.requestTimeout,
        );
      }
      if (this._ready) this._send(req);
    });
  }

  _send(req) {
    const frame = typeof req.frame.build === "function" ? req.frame.build() : req.frame;
    const { build, ...wire } = frame;
    this._write({ ...wire, ref: req.ref });
    req.written = true;
    if (req.noAnswer) {
      // Its refusal may still come: an "error" event then names it (ChatdError.request).
      this._sent.set(req.ref, wire);
      if (this._sent.size > 32) this._sent.delete(this._sent.keys().next().value);
      this._done(req, undefined);
    }
  }

  _done(req, value) {
    if (!this._pending.delete(req.ref)) return;
    clearTimeout(req.timer);
    req.resolve(value);
  }

  _fail(req, code, message, frame) {
    if (!this._pending.delete(req.ref)) return;
    clearTimeout(req.timer);
    if (req.frame.type === "join" && !req.internal && code !== "disconnected") {
      const room = this._rooms.get(req.room);
      if (room && !room.joined && code !== "closed") room.active = false;
    }
    req.reject(new ChatdError(code, message, frame));
  }

  _room(name) {
    let room = this._rooms.get(name);
    if (!room) {
      room = {
        name,
        store: new RoomState(name),
        active: false,
        joined: false,
        epoch: null,
        lastId: 0,
        seen: new Set(),
        floor: 0,
        collecting: null,
      };
      this._rooms.set(name, room);
    }
    return room;
  }

  _joinFrame(room) {
    return {
      type: "join",
      room: room.name,
      build: () => {
        const f = { type: "join", room: room.name };
        if (room.lastId > 0 || room.epoch) {
          f.since = room.lastId;
          if (room.epoch) f.epoch = room.epoch;
        }
        return f;
      },
    };
  }

  /**
   * Joins a room (again after every reconnect, with `since` and `epoch`).
   * Resolves once every history page is in: {room, members, history, lastId,
   * epoch, read, unread, recovered?, reason?, reset?, truncated?}.
   */
  join(name) {
    const room = this._room(name);
    room.active = true;
    return this._request(this._joinFrame(room), { room: name });
  }

  /** Leaves a room; its state is forgotten. */
  leave(name) {
    const room = this._rooms.get(name);
    this._rooms.delete(name);
    for (const req of [...this._pending.values()]) {
      if (req.room === name) this._fail(req, "left", `left ${name}`);
    }
    if (!this._ready || !room?.joined) return Promise.resolve({ room: name });
    return this._request({ type: "leave", room: name }, { room: name });
  }

  /**
   * Sends a text; resolves with the stored message (its id, ts...). Sent
   * again with the same `cid` after a reconnect until it is acknowledged:
   * the server stores it once.
   */
  send(room, text, { cid } = {}) {
    return this._request({ type: "send", room, text, cid: cid ?? randomId(20) }, { room });
  }

  /** A page of history: {messages, more, epoch}; `before`, `after`, `limit` as in the protocol. */
  history(room, { before, after, limit } = {}) {
    const f = { type: "history", room };
    if (before != null) f.before = before;
    if (after != null) f.after = after;
    if (limit != null) f.limit = limit;
    return this._request(f, { room });
  }

  /** Edits one's own message; resolves with the edit event (a message with kind "edit"). */
  edit(room, id, text) {
    return this._request({ type: "edit", room, id, text }, { room });
  }

  delete(room, id) {
    return this._request({ type: "delete", room, id }, { room });
  }

  react(room, id, emoji) {
    return this._request({ type: "react", room, id, emoji }, { room });
  }

  unreact(room, id, emoji) {
    return this._request({ type: "unreact", room, id, emoji }, { room });
  }

  /** Says the user is typing (every 2 s or so); dropped while disconnected. */
  /** The secret that lets a later connection take this session over (a reload: give
   * it as the `resume` option), or null before the first welcome. */
  get resumeSecret() {
    return this._resume;
  }

  typing(room) {
    if (!this._ready) return Promise.resolve();
    return this._request({ type: "typing", room }, { room, noAnswer: true });
  }

  /** Moves the read marker up to id (sent on reconnect if offline now). */
  read(room, id) {
    return this._request({ type: "read", room, id }, { room, noAnswer: true });
  }

  /** The RoomState of a joined room (messages as they are now, members). */
  room(name) {
    return this._rooms.get(name)?.store;
  }

  /** The rooms joined or being joined. */
  rooms() {
    return [...this._rooms.values()].filter((r) => r.active).map((r) => r.name);
  }

  // -- frames from the server --------------------------------------------------

  _frame(f) {
    const req = f.ref != null ? this._pending.get(f.ref) : undefined;
    switch (f.type) {
      case "welcome":
        return this._welcome(f);
      case "joined":
        return this._joined(f, req);
      case "history":
        return this._history(f, req);
      case "message":
        return this._message(f, req);
      case "reset":
        return this._reset(this._rooms.get(f.room), f.epoch, f.last_id);
      case "presence": {
        const store = this.room(f.room);
        if (store) {
          store.members = store.members.filter((n) => n !== f.nick);
          if (f.event === "join") store.members.push(f.nick);
        }
        return this._emit("presence", f);
      }
      case "typing":
        return this._emit("typing", f);
      case "read":
        return this._emit("read", f);
      case "left":
        if (req) this._done(req, { room: f.room });
        return;
      case "refreshed":
        if (req) this._done(req, f);
        return;
      case "error": {
        if (req) return this._fail(req, f.code, f.message, f);
        const e = new ChatdError(f.code, f.message, f);
        e.request = f.ref != null ? (this._sent.get(f.ref) ?? null) : null;
        return this._emit("error", e);
      }
    }
  }

  _welcome(f) {
    clearTimeout(this._connectTimer);
    this._ready = true;
    this._attempt = 0;
    this._resume = f.resume ?? null;
    this.nick = f.nick;
    this.session = f.session;
    this.user = f.user ?? null;
    this.exp = f.exp ?? null;
    this._emit("welcome", f);
    this._setState("open", { resumed: !!f.resumed, session: f.session });
    this._scheduleRefresh();
    // Rooms first (with since and epoch), then what waited, in the order asked.
    const joining = new Set();
    for (const req of this._pending.values()) {
      if (req.frame.type === "join") joining.add(req.room);
    }
    for (const room of this._rooms.values()) {
      if (room.active && !joining.has(room.name)) {
        this._request(this._joinFrame(room), { room: room.name, internal: true }).catch((e) => {
          if (e.code !== "disconnected" && e.code !== "closed") this._emit("error", e);
        });
      }
    }
    const waiting = [...this._pending.values()];
    waiting.sort((a, b) => (a.internal === b.internal ? 0 : a.internal ? -1 : 1));
    for (const req of waiting) {
      if (!req.written && this._ready) this._send(req);
    }
  }

  _seen(room, id) {
    if (id <= room.floor || room.seen.has(id)) return true;
    room.seen.add(id);
    if (room.seen.size > this.options.maxSeen) {
      const ids = [...room.seen].sort((a, b) => a - b);
      const drop = ids.slice(0, ids.length >> 1);
      for (const i of drop) room.seen.delete(i);
      room.floor = drop[drop.length - 1];
    }
    return false;
  }

  _deliver(room, m) {
    if (this._seen(room, m.id)) return false;
    if (m.id > room.lastId) room.lastId = m.id;
    const changed = room.store.apply(m);
    this._emit("message", m);
    if (changed) this._emit("update", changed, m);
    return true;
  }

  _reset(room, epoch, lastId) {
    if (!room) return;
    room.epoch = epoch ?? null;
    room.lastId = lastId ?? 0;
    room.seen.clear();
    room.floor = 0;
    room.store.clear();
    this._emit("reset", { room: room.name, epoch: room.epoch, lastId: room.lastId });
  }

  _joined(f, req) {
    const room = this._rooms.get(f.room);
    if (!room || !room.active) return; // left meanwhile
    const lost =
      f.reset ||
      (f.recovered === false && f.reason !== "truncated") ||
      (room.epoch && f.epoch !== room.epoch) ||
      (!room.epoch && f.last_id < room.lastId);
    if (lost) this._reset(room, f.epoch, 0);
    room.epoch = f.epoch ?? room.epoch;
    room.store.members = [...f.members];
    const info = {
      room: f.room,
      members: f.members,
      history: [],
      lastId: f.last_id,
      epoch: f.epoch,
      read: f.read,
      unread: f.unread,
    };
    for (const k of ["recovered", "reason", "reset", "truncated"]) {
      if (f[k] !== undefined) info[k] = f[k];
    }
    room.collecting = { info, req };
    this._page(room, f.history || [], !!f.more);
  }

  _page(room, messages, more) {
    const c = room.collecting;
    for (const m of messages) {
      c.info.history.push(m);
      this._deliver(room, m);
    }
    if (more) return;
    room.collecting = null;
    room.joined = true;
    if (c.info.lastId > room.lastId) room.lastId = c.info.lastId;
    this._emit("joined", c.info);
    if (c.req) this._done(c.req, c.info);
  }

  _history(f, req) {
    const room = this._rooms.get(f.room);
    if (req) {
      if (room && (!f.epoch || !room.epoch || f.epoch === room.epoch)) {
        for (const m of f.messages) {
          const changed = room.store.apply(m);
          if (changed) this._emit("update", changed, m);
        }
      }
      return this._done(req, { room: f.room, messages: f.messages, more: f.more, epoch: f.epoch });
    }
    if (room?.collecting) this._page(room, f.messages || [], !!f.more);
  }

  _message(f, req) {
    const room = this._rooms.get(f.room);
    if (room) this._deliver(room, f);
    if (req && ANSWERED_BY_MESSAGE.has(req.frame.type) && req.frame.room === f.room) {
      this._done(req, f);
    }
  }

  // -- tokens --------------------------------------------------------------------

  _scheduleRefresh() {
    clearTimeout(this._refreshTimer);
    if (!this.options.getToken || !this.exp) return;
    const left = this.exp * 1000 - Date.now();
    const lead = Math.min(this.options.refreshBefore * 1000, left / 2);
    this._refreshTimer = setTimeout(() => this._refresh(), Math.max(0, left - lead));
  }

  async _refresh() {
    try {
      const token = await this.options.getToken();
      if (!this._ready) return; // the next connection's hello takes a new token anyway
      const f = await this._request({ type: "refresh", token });
      this.exp = f.exp;
      this._emit("refreshed", { exp: f.exp });
      this._scheduleRefresh();
    } catch (e) {
      this._emit("error", e);
      if (this._ready) this._refreshTimer = setTimeout(() => this._refresh(), 5000);
    }
  }
}

export default Chatd;
