// Two clients chat on a real daemon: requests, events, history pages, the
// duplicate filter, edits/deletes/reactions by the `updated` rule, and the
// module as the daemon serves it.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import {
  Chatd,
  make,
  ChatdError,
  RoomState,
  SOURCE,
  client,
  cuttable,
  next,
  port,
  record,
  unique,
  until,
  url,
} from "./helpers.mjs";

const sorted = (r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, [...v].sort()]));

test("two clients chat: join, presence, send, typing, read, leave", async () => {
  const room = unique("tea");
  const a = make({ url: url(), nick: "alice" });
  const states = record(a, "state");
  a.connect();
  const joinedA = await a.join(room);
  assert.deepEqual(joinedA.members, ["alice"]);
  assert.equal(joinedA.lastId, 0);
  assert.deepEqual(states.map((s) => s.state), ["connecting", "open"]);

  const b = client({ nick: "bob" });
  const presence = next(a, "presence", (p) => p.room === room && p.nick === "bob");
  const joinedB = await b.join(room);
  assert.deepEqual(joinedB.members, ["alice", "bob"]);
  assert.equal((await presence).event, "join");
  assert.deepEqual(a.room(room).members, ["alice", "bob"]);

  const gotB = record(b, "message");
  const m = await a.send(room, "hello bob");
  assert.equal(m.id, 1);
  assert.equal(m.from, "alice");
  assert.equal(m.text, "hello bob");
  await until(() => gotB.length === 1, "bob's message");
  assert.equal(gotB[0].id, 1);

  const typing = next(b, "typing", (t) => t.room === room);
  await a.typing(room);
  assert.equal((await typing).name, "alice");
  const read = next(a, "read", (r) => r.room === room && r.name === "bob");
  await b.read(room, 1);
  assert.equal((await read).id, 1);

  const err = await a.send("not-joined-room", "x").catch((e) => e);
  assert.ok(err instanceof ChatdError);
  assert.equal(err.code, "not_joined");

  const left = next(a, "presence", (p) => p.room === room && p.event === "leave");
  await b.leave(room);
  await left;
  assert.deepEqual(a.room(room).members, ["alice"]);
  assert.deepEqual(b.rooms(), []);
  a.close();
  b.close();
  assert.equal(a.state, "closed");
});

test("a join reads every history page (more) and history() pages back", async () => {
  const room = unique("pages");
  const a = client({ nick: "writer" });
  await a.join(room);
  const big = "x".repeat(15000); // 6 of them are over one 64 KiB page
  for (let i = 1; i <= 6; i++) await a.send(room, `${i}${big}`);
  const b = client({ nick: "reader" });
  const pages = [];
  b.on("message", (m) => pages.push(m.id));
  const j = await b.join(room);
  assert.deepEqual(j.history.map((m) => m.id), [1, 2, 3, 4, 5, 6]);
  assert.deepEqual(pages, [1, 2, 3, 4, 5, 6]);
  assert.equal(j.lastId, 6);
  const page = await b.history(room, { before: 4, limit: 2 });
  assert.deepEqual(page.messages.map((m) => m.id), [2, 3]);
  assert.equal(page.more, true);
  a.close();
  b.close();
});

test("duplicates are filtered by id per room", async () => {
  const room = unique("dups");
  const ws = cuttable();
  const a = client({ nick: "dupe", WebSocket: ws.WebSocket });
  await a.join(room);
  ws.last().dup = true; // every message frame twice
  const got = record(a, "message");
  const b = client({ nick: "src" });
  await b.join(room);
  for (let i = 0; i < 5; i++) await b.send(room, `m${i}`);
  await until(() => got.length >= 5, "5 messages");
  await a.join(room); // a resynchronisation: joined again, nothing twice
  await b.send(room, "last");
  await until(() => got.some((m) => m.text === "last"), "the last message");
  assert.deepEqual(got.map((m) => m.id), [1, 2, 3, 4, 5, 6]);
  a.close();
  b.close();
});

test("edits, deletes and reactions: the room state by the updated rule", async () => {
  const room = unique("edits");
  const a = client({ nick: "ann" });
  const b = client({ nick: "ben" });
  await a.join(room);
  await b.join(room);
  const m1 = await a.send(room, "frist");
  const m2 = await a.send(room, "oops");
  const e = await a.edit(room, m1.id, "first");
  assert.equal(e.kind, "edit");
  assert.equal(e.target, m1.id);
  await b.react(room, m1.id, "👍");
  await a.react(room, m1.id, "👍");
  await a.react(room, m1.id, "🎉");
  await a.unreact(room, m1.id, "🎉");
  const d = await a.delete(room, m2.id);
  assert.equal(d.kind, "delete");
  const err = await b.edit(room, m1.id, "mine now").catch((x) => x);
  assert.equal(err.code, "forbidden");
  const want = {
    [m1.id]: { text: "first", edited: true, deleted: false, reactions: { "👍": ["ann", "ben"] } },
    [m2.id]: { text: "", edited: false, deleted: true, reactions: {} },
  };
  const view = (store) =>
    Object.fromEntries(
      store.list().map((s) => [s.id, { text: s.text, edited: s.edited, deleted: s.deleted, reactions: sorted(s.reactions) }]),
    );
  await until(() => b.room(room).get(m2.id)?.deleted, "ben sees the delete");
  assert.deepEqual(view(a.room(room)), want);
  assert.deepEqual(view(b.room(room)), want);

  // A newcomer reads the messages as they are now (updated), and the events
  // themselves in any order give the same state.
  const c = client({ nick: "cid" });
  const j = await c.join(room);
  assert.deepEqual(view(c.room(room)), want);
  const all = (await c.history(room, { after: 0, limit: 100 })).messages;
  for (let round = 0; round < 20; round++) {
    const shuffled = [...all, ...j.history].sort(() => Math.random() - 0.5);
    const s = new RoomState(room);
    for (const m of shuffled) s.apply(m);
    assert.deepEqual(view(s), want, `order ${shuffled.map((m) => m.id)}`);
  }
  // Events only, their targets first or last: the same.
  const s = new RoomState(room);
  for (const m of [...all].reverse()) s.apply(m);
  assert.deepEqual(view(s), want);
  // An event at or below a message's updated is not applied again.
  const stale = { ...e, text: "stale" };
  assert.equal(c.room(room).apply(stale), null);
  assert.equal(c.room(room).get(m1.id).text, "first");
  a.close();
  b.close();
  c.close();
});

test("the daemon serves the module at /chatd.js, with the page's headers", async () => {
  const res = await fetch(`http://127.0.0.1:${port()}/chatd.js`);
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type"), /^text\/javascript/);
  assert.match(res.headers.get("content-security-policy"), /default-src 'self'/);
  assert.equal(res.headers.get("x-content-type-options"), "nosniff");
  assert.equal(await res.text(), readFileSync(SOURCE, "utf8"));
});

test("the TypeScript declarations name every export, method and getter (tsc is not run here)", async () => {
  const dts = readFileSync(new URL("../chatd.d.ts", import.meta.url), "utf8");
  const mod = await import(SOURCE);
  for (const name of Object.keys(mod)) {
    if (name === "default") assert.match(dts, /export default Chatd;/);
    else assert.match(dts, new RegExp(`export declare (const|class) ${name}\\b`), name);
  }
  for (const cls of [Chatd, RoomState]) {
    for (const m of Object.getOwnPropertyNames(cls.prototype)) {
      if (m === "constructor" || m.startsWith("_")) continue;
      assert.match(dts, new RegExp(`\\n  (readonly )?${m}[<(:]`), `${cls.name}.${m}`);
    }
  }
  const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"));
  assert.equal(pkg.types, "./chatd.d.ts");
  assert.deepEqual(pkg.files.sort(), ["README.md", "chatd.d.ts", "chatd.js"]);
  assert.equal(pkg.version, mod.VERSION);
});
