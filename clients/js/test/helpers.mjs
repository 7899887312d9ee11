// Shared by the tests: the daemons' addresses (from tests/test_js.py), bounded
// waits, a WebSocket that a test can cut, and HS256 tokens.
import { createHmac } from "node:crypto";
import { after } from "node:test";
import { fileURLToPath } from "node:url";

export const SOURCE = fileURLToPath(new URL("../../../chatd/static/chatd.js", import.meta.url));
export const { Chatd, RoomState, ChatdError } = await import(SOURCE);

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set: run these tests through tests/test_js.py`);
  return v;
}

export const port = () => Number(env("CHATD_PORT"));
export const url = (p = port()) => `ws://127.0.0.1:${p}/`;

/** Polls until check() is truthy (and returns it), at most `ms`. */
export async function until(check, what, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The first event `name` of `client` that passes `test`, at most `ms`. */
export function next(client, name, test = () => true, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`timed out waiting for ${name}`));
    }, ms);
    const off = client.on(name, (...a) => {
      if (!test(...a)) return;
      clearTimeout(timer);
      off();
      resolve(a[0]);
    });
  });
}

/** Every event `name` of `client`, in a list. */
export function record(client, name) {
  const got = [];
  client.on(name, (e) => got.push(e));
  return got;
}

let n = 0;
export const unique = (prefix) => `${prefix}${process.pid % 10000}x${++n}`;

/**
 * A WebSocket constructor whose sockets a test can cut (as a network would),
 * pause (frames from the server vanish), or filter (`dropIn`/`dropOut`
 * predicates on the raw frames; `dup`: every `message` frame comes twice).
 */
export function cuttable() {
  const sockets = [];
  class CutWS {
    constructor(u, protocols) {
      this.real = new WebSocket(u, protocols);
      this.dead = false;
      this.paused = false;
      this.dropIn = null;
      this.dropOut = null;
      this.dup = false;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      this.real.onopen = (e) => this.onopen?.(e);
      this.real.onmessage = (e) => {
        if (this.dead || this.paused || this.dropIn?.(e.data, this)) return;
        this.onmessage?.(e);
        if (this.dup && e.data.includes('"type":"message"')) this.onmessage?.(e);
      };
      this.real.onclose = (e) => {
        if (!this.dead) this.onclose?.(e);
      };
      this.real.onerror = (e) => this.onerror?.(e);
      sockets.push(this);
    }
    get readyState() {
      return this.real.readyState;
    }
    send(data) {
      if (this.dead || this.dropOut?.(data, this)) return;
      this.real.send(data);
    }
    close(code, reason) {
      this.real.close(code, reason);
    }
    /** The connection is gone for the client; `silent`: the server is not told (a dead network). */
    cut({ silent = false } = {}) {
      if (this.dead) return;
      this.dead = true;
      if (!silent) this.real.close();
      queueMicrotask(() => this.onclose?.({ code: 1006, reason: "cut by the test" }));
    }
  }
  return { WebSocket: CutWS, sockets, last: () => sockets.at(-1) };
}

function b64url(x) {
  return Buffer.from(typeof x === "string" ? x : JSON.stringify(x)).toString("base64url");
}

/** An HS256 connection token signed with the daemon's --jwt-key (CHATD_JWT_KEY). */
export function token(claims) {
  const head = b64url({ alg: "HS256", typ: "JWT" });
  const body = b64url({ exp: Math.floor(Date.now() / 1000) + 600, ...claims });
  const sig = createHmac("sha256", env("CHATD_JWT_KEY")).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** Asks tests/test_js.py to act on the restartable daemon (stop, start, aside). */
export async function control(what) {
  const res = await fetch(`http://127.0.0.1:${env("CHATD_CONTROL_PORT")}/${what}`, { method: "POST" });
  if (!res.ok) throw new Error(`control ${what}: ${res.status} ${await res.text()}`);
  return res.json();
}

const made = [];
// Every client a test made is closed once its file's tests are done, failed or
// not, so that no socket or timer keeps node running.
after(() => {
  for (const c of made) if (c.state !== "closed") c.close();
});

/** A client (not connected yet), closed after the tests. */
export function make(options) {
  const c = new Chatd(options);
  made.push(c);
  return c;
}

/** A connected client of the plain daemon, quick to reconnect. */
export function client(options) {
  const c = make({ url: url(), initialDelay: 100, maxDelay: 1000, ...options });
  c.connect();
  return c;
}
