// chatd chat page, on chatd.js (the client library: reconnects, resumes, retries sends
// by cid, filters duplicates, applies edits, deletes and reactions). No framework, no CDN.
// Everything from the network is shown with textContent: text, never HTML; a link in a
// message is an <a> made with DOM calls, its href an http(s) URL checked by URL().
import { Chatd } from "./chatd.js";

// -- the interface's text, in one place -----------------------------------------------
const TEXT = {
  en: {
    nick: "Nick", room: "Room", join: "Join", leave: "Leave", send: "Send",
    members: "Members", rooms: "Rooms", placeholder: "Message (Enter sends)",
    showJoin: "Rooms and nick", messages: "Messages", roomList: "Rooms",
    notConnected: "not connected", connecting: "connecting…", reconnectingNow: "reconnecting…",
    reconnectingIn: "reconnecting in {s} s…", joining: "joining {room}…",
    inRoom: "{nick} in {room}", noRoom: "{nick}: join a room",
    unread: "{n} new", edited: "(edited)", deleted: "message deleted",
    typing1: "{a} is typing…", typingFew: "{names} are typing…", typingMany: "several people are typing…",
    joinedSys: "{nick} joined", leftSys: "{nick} left", lost: "connection lost, reconnecting…",
    reconnected: "reconnected", reset: "the server's history was reset",
    truncated: "some messages are too old to recover", newSince: "{n} new since you last read",
    error: "error: {msg}", edit: "edit", delete: "delete", react: "react {emoji}",
    editLabel: "edit message", confirmDelete: "Delete this message for everyone?",
    badToken: "Your sign-in link is no longer valid ({msg}): open a new one.",
    replaced: "This session was opened elsewhere: reload to come back here.",
    today: "Today", yesterday: "Yesterday", you: "(you)",
  },
  zh: {
    nick: "昵称", room: "房间", join: "加入", leave: "离开", send: "发送",
    members: "成员", rooms: "房间", placeholder: "消息（回车发送）",
    showJoin: "房间和昵称", messages: "消息", roomList: "房间",
    notConnected: "未连接", connecting: "连接中…", reconnectingNow: "重新连接中…",
    reconnectingIn: "{s} 秒后重新连接…", joining: "正在加入 {room}…",
    inRoom: "{nick} 在 {room}", noRoom: "{nick}：请加入一个房间",
    unread: "{n} 条新消息", edited: "（已编辑）", deleted: "消息已删除",
    typing1: "{a} 正在输入…", typingFew: "{names} 正在输入…", typingMany: "多人正在输入…",
    joinedSys: "{nick} 加入了", leftSys: "{nick} 离开了", lost: "连接断开，正在重新连接…",
    reconnected: "已重新连接", reset: "服务器的历史记录已重置",
    truncated: "部分消息太旧，无法恢复", newSince: "自上次阅读以来有 {n} 条新消息",
    error: "错误：{msg}", edit: "编辑", delete: "删除", react: "回应 {emoji}",
    editLabel: "编辑消息", confirmDelete: "为所有人删除这条消息？",
    badToken: "你的登录链接已失效（{msg}）：请打开新的链接。",
    replaced: "此会话已在别处打开：重新加载以回到这里。",
    today: "今天", yesterday: "昨天", you: "（你）",
  },
};
const LANG = (navigator.languages || [navigator.language || "en"])
  .map((l) => String(l).toLowerCase().slice(0, 2))
  .find((l) => l in TEXT) || "en";
const LOCALE = LANG === "zh" ? "zh-CN" : "en";
function t(key, args = {}) {
  return (TEXT[LANG][key] ?? TEXT.en[key]).replace(/\{(\w+)\}/g, (_, k) => String(args[k]));
}

const $ = (id) => document.getElementById(id);
const main = document.querySelector("main.chat");
const nickEl = $("nick"), roomEl = $("room"), leaveBtn = $("leave"), stateEl = $("state");
const notice = $("notice"), log = $("log"), membersEl = $("members"), countEl = $("count");
const text = $("text"), sendBtn = $("send"), typingEl = $("typing"), roomsEl = $("rooms");
const unreadEl = $("unread"), roomName = $("room-name"), showJoin = $("show-join");
const TITLE = "chatd";
const TYPING_SHOWN = 5000, TYPING_EVERY = 2000, READ_EVERY = 2000;   // docs/PROTOCOL.md
const MAX_LINES = 1000;          // the page's memory stays flat on a busy room
const QUICK = ["👍", "❤️", "😂", "🎉"];
const GROUP_GAP = 10 * 60 * 1000;   // a sender's messages further apart start a new group

// The static text of index.html, in the page's language.
document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
for (const el of document.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);
for (const el of document.querySelectorAll("[data-t-label]")) {
  el.setAttribute("aria-label", t(el.dataset.tLabel));
}
text.placeholder = t("placeholder");

// A signed token (docs/AUTH.md) comes in the URL's fragment, #token=..., which
// browsers never send to a server: kept for this tab, taken out of the address bar.
const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) {
  sessionStorage.setItem("chatd.token", fromHash);
  history.replaceState(null, "", location.pathname + location.search);
}
const token = sessionStorage.getItem("chatd.token");
if (token) {                       // the name is the token's: no nick to ask for
  nickEl.required = false;
  nickEl.closest("label").hidden = true;
}
nickEl.value = localStorage.getItem("chatd.nick") || "";
roomEl.value = localStorage.getItem("chatd.room") || "lobby";

let chat = null;        // the Chatd client, while the user wants to be connected
let nick = "", me = "";  // our nick (with a token: its name) and the token's sub
let conn = "closed";    // chatd.js's state: connecting, open, reconnecting, closed
let countdown = null;   // {until, timer} while waiting to reconnect
let lostOnce = false;   // a "connection lost" line was written since the last open
const rooms = new Map();   // name -> view: the page's side of one joined room
let current = null;        // the name of the room shown
let mayType = true, typedAt = 0;

function roomView(name) {
  let v = rooms.get(name);
  if (!v) {
    const box = document.createElement("div");
    box.className = "room-log";
    v = { name, box, shown: new Map(), lastId: 0, readSent: 0, readTimer: null, unread: 0,
          joined: false, older: "idle", typers: new Map(), lines: 0 };
    rooms.set(name, v);
  }
  return v;
}

function saveRooms() {
  localStorage.setItem("chatd.rooms", JSON.stringify([...rooms.keys()]));
  if (current) localStorage.setItem("chatd.room", current);
}

// -- state in words ------------------------------------------------------------------
function renderState() {
  const v = current && rooms.get(current);
  let s = conn, label;
  if (conn === "open") {
    if (v && !v.joined) { s = "connecting"; label = t("joining", { room: current }); }
    else label = v ? t("inRoom", { nick, room: current }) : t("noRoom", { nick });
  } else if (conn === "reconnecting" && countdown) {
    const secs = Math.max(1, Math.ceil((countdown.until - Date.now()) / 1000));
    label = t("reconnectingIn", { s: secs });
  } else if (conn === "connecting") {
    label = lostOnce ? t("reconnectingNow") : t("connecting");
  } else if (conn === "reconnecting") label = t("reconnectingNow");
  else label = t("notConnected");
  stateEl.dataset.state = s;
  stateEl.textContent = label;
  const ready = s === "open" && !!v;
  const wasDisabled = text.disabled;
  text.disabled = sendBtn.disabled = !ready;
  leaveBtn.hidden = !v;
  nickEl.disabled = !!chat;
  main.classList.toggle("joined", !!chat && rooms.size > 0);
  if (ready && wasDisabled && !matchMedia("(max-width: 36rem)").matches) text.focus();
}

function onState(s) {
  conn = s.state;
  if (countdown) { clearInterval(countdown.timer); countdown = null; }
  if (s.state === "reconnecting") {
    countdown = { until: Date.now() + (s.in || 0), timer: setInterval(renderState, 1000) };
    if (!lostOnce) {
      lostOnce = true;
      for (const v of rooms.values()) sys(v, t("lost"));
    }
  }
  if (s.state !== "open") for (const v of rooms.values()) v.joined = false;
  if (s.state === "closed" && chat) {   // chatd.js gave up: replaced, or the token refused
    stop(s.code === 4000 ? t("replaced")
      : s.code === 4001 ? t("badToken", { msg: s.reason || "unauthorized" }) : undefined);
  }
  renderState();
}

function showNotice(msg) {
  notice.textContent = msg;
  notice.hidden = !msg;
}

// -- the log of a room -----------------------------------------------------------------
function atBottom() {
  return log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
}

function append(v, node) {
  const visible = v.name === current, stick = visible && atBottom();
  v.box.appendChild(node);
  v.lines += 1;
  if (v.lines > MAX_LINES) {
    while (v.lines > MAX_LINES) {
      const first = v.box.querySelector(".msg, .sys");
      if (first.dataset.id) v.shown.delete(Number(first.dataset.id));
      first.remove();
      v.lines -= 1;
    }
    regroup(v);
  } else if (node.classList.contains("msg")) placeLast(v, node);
  if (stick) log.scrollTop = log.scrollHeight;
}

function sys(v, line) {
  const div = document.createElement("div");
  div.className = "sys";
  div.textContent = line;
  append(v, div);
}

function dayKey(ts) {
  const d = new Date(ts);
  return d.getFullYear() + "-" + d.getMonth() + "-" + d.getDate();
}

function dayLabel(ts) {
  const now = new Date();
  if (dayKey(ts) === dayKey(now)) return t("today");
  if (dayKey(ts) === dayKey(now.getTime() - 86400000)) return t("yesterday");
  return new Date(ts).toLocaleDateString(LOCALE, {
    weekday: "long", year: "numeric", month: "long", day: "numeric" });
}

// Messages in groups: a date line before each day's first message, and a sender's name
// only on the first of their consecutive messages (on the same day, close in time).
function regroup(v) {
  let prev = null, day = null;
  for (const el of [...v.box.children]) {
    if (el.classList.contains("day")) { el.remove(); continue; }
    if (!el.classList.contains("msg")) { prev = null; continue; }
    const s = v.shown.get(Number(el.dataset.id));
    if (!s) continue;
    const key = dayKey(s.m.ts);
    if (key !== day) {
      day = key;
      prev = null;
      el.before(daySeparator(s.m.ts));
    }
    const who = s.m.user || "~" + s.m.from;
    const cont = !!prev && prev.who === who && s.m.ts - prev.ts < GROUP_GAP;
    el.classList.toggle("cont", cont);
    prev = { who, ts: s.m.ts };
  }
}

// The same for one message appended at the end (the usual case: no walk through the log).
function placeLast(v, el) {
  const s = v.shown.get(Number(el.dataset.id));
  let before = el.previousElementSibling, last = before;
  while (last && !last.classList.contains("msg")) last = last.previousElementSibling;
  const p = last && v.shown.get(Number(last.dataset.id));
  if (!p || dayKey(p.m.ts) !== dayKey(s.m.ts)) {
    el.before(daySeparator(s.m.ts));
    before = null;
  }
  const same = !!before && before === last && (p.m.user || "~" + p.m.from) === (s.m.user || "~" + s.m.from)
    && s.m.ts - p.m.ts < GROUP_GAP;
  el.classList.toggle("cont", same);
}

function daySeparator(ts) {
  const sep = document.createElement("div");
  sep.className = "day";
  sep.setAttribute("role", "separator");
  const label = document.createElement("span");
  label.textContent = dayLabel(ts);
  sep.append(label);
  return sep;
}

function mine(m) { return me ? m.user === me : !m.user && m.from === nick; }

function button(label, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.setAttribute("aria-label", title);
  b.addEventListener("click", onClick);
  return b;
}

// The text of a message, with http(s) URLs as links: text nodes and <a> elements made
// here, never markup from the message.
const URLS = /\bhttps?:\/\/[^\s<>"']+/gi;
function linkify(into, str) {
  let at = 0;
  for (const match of str.matchAll(URLS)) {
    let url = match[0];
    const trail = /[.,;:!?)\]}'"]+$/.exec(url);
    if (trail) url = url.slice(0, -trail[0].length);
    let href = null;
    try {
      const u = new URL(url);
      if (u.protocol === "http:" || u.protocol === "https:") href = u.href;
    } catch { /* not a URL: stays text */ }
    if (!href) continue;
    into.append(document.createTextNode(str.slice(at, match.index)));
    const a = document.createElement("a");
    a.href = href;
    a.target = "_blank";
    a.rel = "noopener noreferrer";
    a.textContent = url;
    into.append(a);
    at = match.index + url.length;
  }
  into.append(document.createTextNode(str.slice(at)));
}

function messageNode(v, m) {
  const div = document.createElement("div");
  div.dataset.id = m.id;
  div.tabIndex = -1;                 // (a tap focuses it: its actions show on phones)
  const s = { m, node: div, room: v.name };
  v.shown.set(m.id, s);
  fill(s);
  return div;
}

function fail(v) {
  return (e) => {
    if (!e || e.code === "left" || e.code === "closed" || !v || rooms.get(v.name) !== v) return;
    sys(v, t("error", { msg: e.message }));
  };
}

// (Re)draw a message from its state: text (or "message deleted"), "(edited)", its
// reactions (click one to join or leave it), and what one may do with it.
function fill(s) {
  const m = s.m, div = s.node, room = s.room, v = rooms.get(room);
  const cont = div.classList.contains("cont");
  div.className = "msg" + (mine(m) ? " mine" : "") + (m.deleted ? " deleted" : "") + (cont ? " cont" : "");
  const head = document.createElement("span");
  head.className = "head";
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = m.from;
  head.append(from);
  if (mine(m)) {
    const you = document.createElement("span");
    you.className = "you";
    you.textContent = " " + t("you");
    head.append(you);
  }
  const time = document.createElement("time");
  const d = new Date(m.ts);
  time.dateTime = d.toISOString();
  time.title = d.toLocaleString(LOCALE);
  time.textContent = d.toLocaleTimeString(LOCALE, { hour: "2-digit", minute: "2-digit" });
  const body = document.createElement("span");
  body.className = "text";
  if (m.deleted) body.textContent = t("deleted");
  else linkify(body, m.text);
  div.replaceChildren(head, time, body);
  if (m.edited && !m.deleted) {
    const e = document.createElement("span");
    e.className = "edited";
    e.textContent = t("edited");
    div.append(e);
  }
  if (m.deleted) return;
  const who = me || nick;
  const reactions = document.createElement("span");
  reactions.className = "reactions";
  for (const [emoji, people] of Object.entries(m.reactions || {})) {
    const on = people.includes(who);
    const b = button(emoji + " " + people.length, emoji + ": " + people.join(", "), () =>
      (on ? chat?.unreact(room, m.id, emoji) : chat?.react(room, m.id, emoji))?.catch(fail(v)));
    if (on) b.className = "on";
    reactions.append(b);
  }
  const actions = document.createElement("span");
  actions.className = "actions";
  for (const emoji of QUICK) {
    actions.append(button(emoji, t("react", { emoji }), () =>
      chat?.react(room, m.id, emoji).catch(fail(v))));
  }
  if (mine(m)) {
    actions.append(button(t("edit"), t("edit"), () => startEdit(s)),
                   button(t("delete"), t("delete"), () => {
                     if (confirm(t("confirmDelete"))) chat?.delete(room, m.id).catch(fail(v));
                   }));
  }
  div.append(reactions, actions);
}

function startEdit(s) {
  const input = document.createElement("input");
  input.className = "edit";
  input.value = s.m.text;
  input.maxLength = 16384;
  input.setAttribute("aria-label", t("editLabel"));
  s.node.querySelector(".text").replaceWith(input);
  input.focus();
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") fill(s);
    if (ev.key !== "Enter") return;
    ev.preventDefault();
    if (input.value.trim() && input.value !== s.m.text) {
      chat?.edit(s.room, s.m.id, input.value).catch(fail(rooms.get(s.room)));
    }
    fill(s);
  });
}

// -- older history, when scrolled to the top --------------------------------------------
function oldestId(v) {
  const first = v.box.querySelector(".msg");
  return first ? Number(first.dataset.id) : v.lastId + 1;
}

function loadOlder() {
  const v = current && rooms.get(current);
  if (!v || v.older !== "idle" || !chat || !v.joined) return;
  const bound = oldestId(v);
  if (bound <= 1 || v.shown.size >= MAX_LINES) { v.older = "done"; return; }
  v.older = "loading";
  chat.history(v.name, { before: bound, limit: 50 }).then((page) => {
    if (rooms.get(v.name) !== v) return;
    const store = chat?.room(v.name);
    const visible = v.name === current, before = log.scrollHeight;
    const first = v.box.querySelector(".msg") || v.box.firstChild, now = oldestId(v);
    for (const h of page.messages) {   // oldest first, in order
      if (h.kind || h.id >= now || v.shown.has(h.id)) continue;
      v.box.insertBefore(messageNode(v, store?.get(h.id) || h), first);
      v.lines += 1;
    }
    regroup(v);
    if (visible) log.scrollTop += log.scrollHeight - before;
    v.older = page.more ? "idle" : "done";
  }, (e) => { v.older = "idle"; fail(v)(e); });
}
log.addEventListener("scroll", () => { if (log.scrollTop < 40) loadOlder(); });

// -- unread, read markers, typing, members ----------------------------------------------
function renderUnread() {
  let total = 0;
  for (const v of rooms.values()) total += v.unread;
  unreadEl.textContent = total ? t("unread", { n: total }) : "";
  unreadEl.hidden = !total;
  document.title = total ? "(" + total + ") " + TITLE : TITLE;
  renderRooms();
}

// What is on screen while the tab is visible is read: tell the server (at most every 2 s),
// so the user's other devices and, in a small room, the others know (PROTOCOL.md, read).
function markRead() {
  const v = current && rooms.get(current);
  if (!v || document.hidden || v.lastId <= v.readSent || v.readTimer) return;
  v.readTimer = setTimeout(() => {
    v.readTimer = null;
    if (!chat || rooms.get(v.name) !== v || v.name !== current || document.hidden
        || v.lastId <= v.readSent) return;
    v.readSent = v.lastId;
    chat.read(v.name, v.lastId).catch(() => {});
    v.unread = 0;
    renderUnread();
  }, READ_EVERY);
}
document.addEventListener("visibilitychange", markRead);

function renderTyping() {
  const v = current && rooms.get(current);
  const now = Date.now();
  for (const r of rooms.values()) for (const [k, x] of r.typers) if (x.until <= now) r.typers.delete(k);
  const names = v ? [...v.typers.values()].map((x) => x.name) : [];
  typingEl.textContent = names.length === 0 ? ""
    : names.length === 1 ? t("typing1", { a: names[0] })
    : names.length <= 3 ? t("typingFew", { names: names.join(", ") }) : t("typingMany");
}
setInterval(renderTyping, 1000);

function renderMembers() {
  const members = (current && chat?.room(current)?.members) || [];
  membersEl.replaceChildren(...members.map((n) => {
    const li = document.createElement("li");
    li.textContent = n;
    if (n === nick) li.className = "me";
    return li;
  }));
  countEl.textContent = String(members.length);
}

function renderRooms() {
  roomsEl.replaceChildren(...[...rooms.values()].map((v) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "room";
    b.dataset.room = v.name;
    if (v.name === current) b.setAttribute("aria-current", "true");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = v.name;
    b.append(name);
    if (v.unread) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = String(v.unread);
      b.append(badge);
    }
    b.addEventListener("click", () => select(v.name));
    li.append(b);
    return li;
  }));
}

function select(name) {
  current = name;
  const v = name && rooms.get(name);
  roomName.textContent = name || "";
  log.replaceChildren(...(v ? [v.box] : []));
  if (v) log.scrollTop = log.scrollHeight;
  saveRooms();
  renderRooms();
  renderMembers();
  renderTyping();
  renderState();
  markRead();
}

// -- the connection ------------------------------------------------------------------------
function stop(msg) {
  const c = chat;
  chat = null;
  if (c) c.close();
  for (const v of rooms.values()) clearTimeout(v.readTimer);
  rooms.clear();
  current = null;
  conn = "closed";
  if (msg !== undefined) showNotice(msg);
  select(null);
  renderUnread();
}

function start() {
  // The last session's resume secret, across reloads: the old connection may still look
  // open to the server; showing the secret takes it over instead of nick_taken.
  const resume = sessionStorage.getItem("chatd.resume") || undefined;
  chat = new Chatd(token ? { token, resume } : { nick, resume });
  const c = chat;
  const mineOnly = (fn) => (...a) => { if (chat === c) fn(...a); };
  c.on("state", mineOnly(onState));
  c.on("welcome", mineOnly((w) => {
    nick = w.nick;
    me = w.user || "";
    if (w.resume) sessionStorage.setItem("chatd.resume", w.resume);
  }));
  c.on("joined", mineOnly(onJoined));
  c.on("message", mineOnly(onMessage));
  c.on("update", mineOnly(onUpdate));
  c.on("reset", mineOnly((r) => {
    const v = rooms.get(r.room);
    if (!v) return;
    v.box.replaceChildren();
    v.shown.clear();
    v.lines = 0;
    v.lastId = r.lastId;
    v.older = "idle";
    sys(v, t("reset"));
  }));
  c.on("presence", mineOnly((p) => {
    const v = rooms.get(p.room);
    if (!v) return;
    if (p.room === current) renderMembers();
    sys(v, t(p.event === "join" ? "joinedSys" : "leftSys", { nick: p.nick }));
  }));
  c.on("typing", mineOnly((f) => {
    const v = rooms.get(f.room);
    if (!v) return;
    v.typers.set(f.user || "~" + f.name, { name: f.name, until: Date.now() + TYPING_SHOWN });
    renderTyping();
  }));
  c.on("read", mineOnly((f) => {     // our marker moved (on another device): read there
    const v = rooms.get(f.room);
    if (!v || !(me ? f.user === me : !f.user && f.name === nick)) return;
    v.readSent = Math.max(v.readSent, f.id);
    if (f.id >= v.lastId && v.unread) { v.unread = 0; renderUnread(); }
  }));
  c.on("error", mineOnly(onError));
  c.connect();
}

function onJoined(info) {
  const v = rooms.get(info.room);
  if (!v) return;
  if (info.recovered === false && info.reason === "truncated") sys(v, t("truncated"));
  if (info.unread > 0 && info.read > 0 && !v.joined && v.lastId === 0) {
    sys(v, t("newSince", { n: info.unread }));
  }
  v.lastId = Math.max(v.lastId, info.lastId);
  v.readSent = Math.max(v.readSent, info.read || 0);
  v.unread = info.unread || 0;
  v.joined = true;
  v.older = "idle";
  if (lostOnce && [...rooms.values()].every((r) => r.joined)) {
    lostOnce = false;
    for (const r of rooms.values()) sys(r, t("reconnected"));
  }
  renderUnread();
  if (info.room === current) { renderMembers(); markRead(); }
  renderState();
}

function onMessage(m) {
  const v = rooms.get(m.room);
  if (!v) return;
  if (v.typers.delete(m.user || "~" + m.from)) renderTyping();   // done typing
  if (m.id > v.lastId) v.lastId = m.id;
  if (m.kind || v.shown.has(m.id)) return;       // (events: see "update")
  const state = chat.room(m.room)?.get(m.id) || m;
  append(v, messageNode(v, state));
  // Live (not the join's history) and not ours: unread unless seen as it comes.
  if (v.joined && !mine(m) && (m.room !== current || document.hidden)) {
    v.unread += 1;
    renderUnread();
  }
  if (m.room === current) markRead();
}

// An edit, delete or reaction (chatd.js applied it to the message's state): redraw it,
// unless the user is editing it.
function onUpdate(state) {
  const v = rooms.get(state.room);
  const s = v?.shown.get(state.id);
  if (!s) return;
  s.m = state;
  if (!s.node.querySelector("input.edit")) fill(s);
}

function onError(e) {
  const code = e.code;
  if (["nick_taken", "bad_nick", "hello_first", "unauthorized"].includes(code)) {
    // Cannot work as asked: stop and say why.
    stop(code === "unauthorized" ? t("badToken", { msg: e.message }) : e.message);
    return;
  }
  // A typing refused (a reader's): stop saying it, quietly; it is a hint.
  if (e.request && e.request.type === "typing") {
    mayType = false;
    return;
  }
  const v = current && rooms.get(current);
  if (v) sys(v, t("error", { msg: e.message }));
}

function joinRoom(name) {
  const v = roomView(name);
  saveRooms();
  select(name);
  chat.join(name).catch((e) => {
    if (e.code === "left" || e.code === "closed" || e.code === "disconnected") return;
    if (rooms.get(name) !== v) return;
    showNotice(e.message);
    if (e.code === "unauthorized") { stop(t("badToken", { msg: e.message })); return; }
    chat.leave(name).catch(() => {});
    dropRoom(name);
  });
}

function dropRoom(name) {
  const v = rooms.get(name);
  if (v) clearTimeout(v.readTimer);
  rooms.delete(name);
  if (rooms.size === 0) { stop(); saveRooms(); return; }
  select(current === name ? [...rooms.keys()][0] : current);
  saveRooms();
  renderUnread();
}

// -- the forms -----------------------------------------------------------------------------
$("join-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = roomEl.value.trim();
  if (!name) return;
  showNotice("");
  localStorage.setItem("chatd.room", name);
  main.classList.remove("join-open");
  showJoin.setAttribute("aria-expanded", "false");
  if (!chat) {
    nick = nickEl.value.trim();
    localStorage.setItem("chatd.nick", nick);
    lostOnce = false;
    start();
  }
  if (rooms.has(name)) { select(name); return; }
  joinRoom(name);
});

leaveBtn.addEventListener("click", () => {
  if (!current || !chat) return;
  const name = current;
  chat.leave(name).catch(() => {});
  dropRoom(name);
});

showJoin.addEventListener("click", () => {
  const open = main.classList.toggle("join-open");
  showJoin.setAttribute("aria-expanded", String(open));
  if (open) roomEl.focus();
});

$("send-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const value = text.value;
  const v = current && rooms.get(current);
  if (!value.trim() || !chat || !v) return;
  chat.send(v.name, value).catch(fail(v));   // (chatd.js retries it by cid after a drop)
  text.value = "";
});

text.addEventListener("input", () => {
  const now = Date.now();
  if (mayType && chat && current && text.value && now - typedAt >= TYPING_EVERY) {
    typedAt = now;
    chat.typing(current).catch(() => {});
  }
});

renderState();
// A reload (or a token) rejoins the rooms and shows their history.
if (nickEl.value || token) {
  let saved = [];
  try { saved = JSON.parse(localStorage.getItem("chatd.rooms") || "[]"); } catch { saved = []; }
  const want = localStorage.getItem("chatd.room") || roomEl.value || "lobby";
  if (!Array.isArray(saved) || saved.length === 0) saved = [want];
  nick = nickEl.value.trim();
  start();
  for (const name of saved) if (typeof name === "string" && name) roomView(name);
  for (const name of rooms.keys()) joinRoom(name);
  select(rooms.has(want) ? want : [...rooms.keys()][0]);
}
