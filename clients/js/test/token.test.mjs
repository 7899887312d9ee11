// A token client: who it is comes from the token, getToken gives a token for
// each connection and a refresh before exp; a refused static token ends it.
import assert from "node:assert/strict";
import { test } from "node:test";
import { make, next, record, token, unique, url } from "./helpers.mjs";

const authUrl = () => url(Number(process.env.CHATD_AUTH_PORT));

test("a token client joins, sends as its user and refreshes its token before exp", async () => {
  const room = unique("team-");
  const rooms = { "team-*": "rw" };
  const asked = [];
  const exps = [];
  const c = make({
    url: authUrl(),
    initialDelay: 100,
    getToken: () => {
      // the first token lives 4 s: the refresh comes at about 2 s
      const exp = Math.floor(Date.now() / 1000) + (asked.length === 0 ? 4 : 600);
      asked.push(exp);
      return token({ sub: "u-42", name: "Ada", rooms, exp });
    },
  });
  c.on("refreshed", (r) => exps.push(r.exp));
  const welcome = next(c, "welcome");
  c.connect();
  assert.equal((await welcome).user, "u-42");
  assert.equal(c.nick, "Ada");
  assert.equal(c.exp, asked[0]);
  await c.join(room);
  const m = await c.send(room, "signed");
  assert.equal(m.from, "Ada");
  assert.equal(m.user, "u-42");
  const refreshed = await next(c, "refreshed", () => true, 8000);
  assert.equal(refreshed.exp, asked[1]);
  assert.equal(c.exp, asked[1]);
  assert.equal(c.state, "open");
  const forbidden = await c.join("elsewhere").catch((e) => e);
  assert.equal(forbidden.code, "forbidden");
  c.close();
});

test("a refused static token ends the client (4001) instead of retrying", async () => {
  const bad = token({ sub: "u-1", rooms: { x: "rw" } }).slice(0, -4) + "AAAA";
  const c = make({ url: authUrl(), token: bad, initialDelay: 100 });
  const states = record(c, "state");
  const closed = next(c, "state", (s) => s.state === "closed");
  c.connect();
  const pending = c.join("x").catch((e) => e);
  const s = await closed;
  assert.equal(s.code, 4001);
  assert.equal((await pending).code, "closed");
  assert.ok(!states.some((x) => x.state === "reconnecting"), JSON.stringify(states));
});

test("a reader's refused typing comes as an error event that names the typing", async () => {
  const room = unique("news-");
  const c = make({ url: authUrl(), initialDelay: 100, token: token({ sub: "u-7", rooms: { "news-*": "r" } }) });
  c.connect();
  await c.join(room);
  const refused = next(c, "error");
  await c.typing(room); // no answer of its own: the refusal comes as an event
  const e = await refused;
  assert.equal(e.code, "forbidden");
  assert.deepEqual([e.request.type, e.request.room], ["typing", room]);
  c.close();
});

test("the resume option takes an earlier session over (a reload)", async () => {
  const room = unique("reload-");
  const nick = unique("r");
  const first = make({ url: url(), nick, initialDelay: 100 });
  const welcomed = next(first, "welcome");
  first.connect();
  await welcomed;
  await first.join(room);
  const secret = first.resumeSecret;
  assert.equal(typeof secret, "string");
  const replaced = next(first, "state", (s) => s.state === "closed");
  // The same nick while the first still holds it: taken, unless the session is resumed.
  const second = make({ url: url(), nick, resume: secret, initialDelay: 100 });
  const welcome = next(second, "welcome");
  second.connect();
  const w = await welcome;
  assert.equal(w.resumed, true);
  assert.deepEqual(w.rooms, [room]);
  assert.equal((await replaced).code, 4000);
  await second.join(room);
  second.close();
});
