// chatd chat page, on the chatd.v1 protocol (docs/PROTOCOL.md). No framework, no CDN.
// Everything from the network is shown with textContent: text, never HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const nickEl = $("nick"), roomEl = $("room"), joinBtn = $("join"), leaveBtn = $("leave");
  const state = $("state"), notice = $("notice"), log = $("log"), membersEl = $("members");
  const countEl = $("count"), text = $("text"), sendBtn = $("send"), typingEl = $("typing");
  const TYPING_SHOWN = 5000, TYPING_EVERY = 2000;   // docs/PROTOCOL.md, "typing"
  const typers = new Map();  // who is typing (user, or nick) -> {name, until}
  let readSent = 0, readTimer = null;   // the read marker said to the server, and when next
  let typedAt = 0, mayType = true;   // (a reader's typing is refused: then stop saying it)
  const MAX_LINES = 1000;          // the page's memory stays flat on a busy room
  const BACKOFF_MIN = 500, BACKOFF_MAX = 10000;

  let ws = null;         // the socket, while there is one
  let wanted = false;    // the user wants to be in `room` (so: reconnect when dropped)
  let nick = "", room = "";
  let lastId = 0;        // the last message id shown: resume point and duplicate filter
  let epoch = null;      // the history epoch lastId counts in (docs/PROTOCOL.md)
  let pendingLast = 0;   // while history pages come: the joined's last_id
  let members = [];
  let me = "";           // with a token: its sub, which our own messages carry as `user`
  let attempt = 0, timer = null;
  // Sends not yet acknowledged, by cid (the send's ref too): retried with the same cid
  // after a reconnect, so a send whose answer was lost is stored once (PROTOCOL.md).
  const unsent = new Map();
  let older = "idle";    // older history on scroll: "idle", "loading" or "done"
  // Messages on screen, by id: their state as it is now (edits, deletes and reactions
  // are events about them, applied only when newer than the state: PROTOCOL.md).
  const shown = new Map();
  const QUICK = ["👍", "❤️", "😂", "🎉"];
  // Messages not read yet (the joined's count, then what came while the tab was hidden):
  // a badge and the tab's title say how many, until the read marker moves.
  const unreadEl = $("unread"), title = document.title;
  let unread = 0;

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
    nickEl.closest("label").style.display = "none";
  }

  nickEl.value = localStorage.getItem("chatd.nick") || "";
  roomEl.value = localStorage.getItem("chatd.room") || "lobby";

  function setState(s, label) {
    state.dataset.state = s;
    state.textContent = label;
    const open = s === "open";
    text.disabled = sendBtn.disabled = !open;
    joinBtn.hidden = wanted;
    leaveBtn.hidden = !wanted;
    nickEl.disabled = roomEl.disabled = wanted;
    if (open) text.focus();
  }

  function showNotice(msg) {
    notice.textContent = msg;
    notice.hidden = !msg;
  }

  function atBottom() {
    return log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  }

  function append(node) {
    const stick = atBottom();
    log.appendChild(node);
    while (log.childElementCount > MAX_LINES) {
      shown.delete(Number(log.firstElementChild.dataset.id));
      log.firstElementChild.remove();
    }
    if (stick) log.scrollTop = log.scrollHeight;
  }

  function oldestId() {
    const first = log.querySelector(".msg");
    return first ? Number(first.dataset.id) : lastId + 1;
  }

  // Scrolled to the top: ask for the page before the oldest message shown (docs/PROTOCOL.md,
  // the history request), and keep what was on screen where it was.
  function loadOlder() {
    if (older !== "idle" || !ws || ws.readyState !== WebSocket.OPEN) return;
    if (oldestId() <= 1 || log.childElementCount >= MAX_LINES) { older = "done"; return; }
    older = "loading";
    send({ type: "history", room, before: oldestId(), limit: 50, ref: "older" });
  }

  function prependOlder(msgs, more) {
    const before = log.scrollHeight;
    const first = log.firstChild, bound = oldestId();
    for (const h of msgs) {
      if (h.id >= bound) continue;
      if (h.kind) applyEvent(h);       // (about a message shown: if newer than its state)
      else log.insertBefore(messageNode(h), first);   // oldest first, in order
    }
    log.scrollTop += log.scrollHeight - before;
    older = more ? "idle" : "done";
  }

  function sys(line) {
    const div = document.createElement("div");
    div.className = "sys";
    div.textContent = line;
    append(div);
  }

  function addMessage(m) {
    append(messageNode(m));
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

  function messageNode(m) {
    const div = document.createElement("div");
    div.dataset.id = m.id;
    div.tabIndex = -1;                 // (a tap focuses it: its actions show on phones)
    const s = { m: { ...m }, node: div };
    shown.set(m.id, s);
    fill(s);
    return div;
  }

  // (Re)draw a message from its state: text (or "message deleted"), "edited", its
  // reactions (click one to join or leave it), and what one may do with it.
  function fill(s) {
    const m = s.m, div = s.node;
    div.className = "msg" + (mine(m) ? " mine" : "") + (m.deleted ? " deleted" : "");
    const t = document.createElement("time");
    const d = new Date(m.ts);
    t.dateTime = d.toISOString();
    t.title = d.toLocaleString();
    t.textContent = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = m.from;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = m.deleted ? "message deleted" : m.text;
    div.replaceChildren(t, from, body);
    if (m.edited && !m.deleted) {
      const e = document.createElement("span");
      e.className = "edited";
      e.textContent = "(edited)";
      div.append(e);
    }
    if (m.deleted) return;
    const who = me || nick;
    const reactions = document.createElement("span");
    reactions.className = "reactions";
    for (const [emoji, people] of Object.entries(m.reactions || {})) {
      const on = people.includes(who);
      const b = button(emoji + " " + people.length, emoji + ": " + people.join(", "), () =>
        send({ type: on ? "unreact" : "react", room, id: m.id, emoji, ref: "react" }));
      if (on) b.className = "on";
      reactions.append(b);
    }
    const actions = document.createElement("span");
    actions.className = "actions";
    for (const emoji of QUICK) {
      actions.append(button(emoji, "react " + emoji, () =>
        send({ type: "react", room, id: m.id, emoji, ref: "react" })));
    }
    if (mine(m)) {
      actions.append(button("edit", "edit", () => startEdit(s)),
                     button("delete", "delete", () => {
                       if (confirm("Delete this message for everyone?")) {
                         send({ type: "delete", room, id: m.id, ref: "delete" });
                       }
                     }));
    }
    div.append(reactions, actions);
  }

  function startEdit(s) {
    const input = document.createElement("input");
    input.className = "edit";
    input.value = s.m.text;
    input.maxLength = 16384;
    input.setAttribute("aria-label", "edit message");
    s.node.querySelector(".text").replaceWith(input);
    input.focus();
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") fill(s);
      if (ev.key !== "Enter") return;
      ev.preventDefault();
      if (input.value.trim() && input.value !== s.m.text) {
        send({ type: "edit", room, id: s.m.id, text: input.value, ref: "edit" });
      }
      fill(s);
    });
  }

  // An edit, delete or reaction: applied to its message if shown, and only if newer.
  function applyEvent(e) {
    const s = shown.get(e.target);
    if (!s || e.id <= (s.m.updated || 0)) return;
    const m = s.m;
    m.updated = e.id;
    if (e.kind === "edit") { m.text = e.text; m.edited = true; }
    else if (e.kind === "delete") { m.deleted = true; m.text = ""; m.reactions = {}; }
    else {
      const who = e.user || e.from, r = m.reactions = m.reactions || {};
      const set = new Set(r[e.emoji] || []);
      if (e.kind === "react") set.add(who); else set.delete(who);
      if (set.size) r[e.emoji] = [...set]; else delete r[e.emoji];
    }
    if (!s.node.querySelector("input.edit")) fill(s);   // (not under the user's hands)
  }

  function renderUnread() {
    unreadEl.textContent = unread ? unread + " new" : "";
    unreadEl.hidden = !unread;
    document.title = unread ? "(" + unread + ") " + title : title;
  }

  function renderTyping() {
    const now = Date.now();
    for (const [k, t] of typers) if (t.until <= now) typers.delete(k);
    const names = [...typers.values()].map((t) => t.name);
    typingEl.textContent = names.length === 0 ? ""
      : names.length === 1 ? names[0] + " is typing…"
      : names.length <= 3 ? names.join(", ") + " are typing…" : "several people are typing…";
  }
  setInterval(renderTyping, 1000);

  // What is on screen while the tab is visible is read: tell the server (at most every 2 s),
  // so the user's other devices and, in a small room, the others know (PROTOCOL.md, read).
  function markRead() {
    if (document.hidden || lastId <= readSent || readTimer) return;
    readTimer = setTimeout(() => {
      readTimer = null;
      if (document.hidden || lastId <= readSent) return;
      readSent = lastId;
      send({ type: "read", room, id: lastId });
      unread = 0;
      renderUnread();
    }, 2000);
  }
  document.addEventListener("visibilitychange", markRead);

  function renderMembers() {
    membersEl.replaceChildren(...members.map((n) => {
      const li = document.createElement("li");
      li.textContent = n;
      if (n === nick) li.className = "me";
      return li;
    }));
    countEl.textContent = String(members.length);
  }

  function send(obj) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
  }

  function connect() {
    clearTimeout(timer);
    setState("connecting", attempt ? "reconnecting…" : "connecting…");
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const sock = new WebSocket(scheme + location.host + "/", "chatd.v1");
    ws = sock;
    // The last session's resume secret: on a new network the old connection may still
    // look open to the server; showing the secret takes it over instead of nick_taken.
    const resume = sessionStorage.getItem("chatd.resume");
    sock.onopen = () => send({ type: "hello", ...(token ? { token } : { nick }),
                               ...(resume ? { resume } : {}) });
    sock.onmessage = (ev) => {
      let m;
      try { m = JSON.parse(ev.data); } catch (e) { return; }
      handle(m);
    };
    sock.onclose = (ev) => {
      if (ws !== sock) return;
      ws = null;
      if (!wanted) { setState("closed", "not connected"); return; }
      // Dropped: come back by ourselves, resuming after the last id we showed.
      const delay = Math.min(BACKOFF_MAX, BACKOFF_MIN * 2 ** attempt) * (0.5 + Math.random() / 2);
      attempt += 1;
      setState("reconnecting", "reconnecting in " + Math.ceil(delay / 1000) + " s");
      if (attempt === 1) sys("connection lost (" + ev.code + "), reconnecting…");
      timer = setTimeout(connect, delay);
    };
  }

  function showHistory(msgs) {
    for (const h of msgs) {
      if (h.id <= lastId) continue;
      lastId = h.id;
      if (h.kind) applyEvent(h); else addMessage(h);
    }
  }

  function handle(m) {
    switch (m.type) {
      case "welcome":
        nick = m.nick;                       // (with a token: its name)
        me = m.user || "";
        if (m.resume) sessionStorage.setItem("chatd.resume", m.resume);
        send(lastId ? { type: "join", room, since: lastId, ...(epoch ? { epoch } : {}), ref: "join" }
                    : { type: "join", room, ref: "join" });
        break;
      case "joined": {
        if (m.reset || m.last_id < lastId) { // the server lost its history: start over
          log.replaceChildren(); shown.clear();
          lastId = 0;
          sys("the server's history was reset");
        }
        if (m.recovered === false && m.reason === "truncated") {
          sys("some messages are too old to recover");
        }
        showHistory(m.history);
        // Pages may follow (a long history comes in "history" frames, then live ones).
        if (m.more) pendingLast = m.last_id;
        else lastId = Math.max(lastId, m.last_id);
        epoch = m.epoch;
        readSent = Math.max(readSent, m.read || 0);
        if (m.unread > 0 && m.read > 0) sys(m.unread + " new since you last read");
        unread = m.unread || 0;
        renderUnread();
        markRead();
        members = m.members.slice();
        renderMembers();
        if (attempt) sys("reconnected");
        attempt = 0;
        older = "idle";
        for (const [cid, value] of unsent) send({ type: "send", room, text: value, cid, ref: cid });
        showNotice("");
        setState("open", nick + " in " + room);
        break;
      }
      case "reset":                          // a new epoch: what follows starts over
        if (m.room !== room) return;
        log.replaceChildren(); shown.clear();
        lastId = m.last_id;
        pendingLast = 0;
        epoch = m.epoch;
        sys("the server's history was reset");
        break;
      case "history":
        if (m.room !== room) return;
        if (m.ref === "older") { prependOlder(m.messages, m.more); return; }
        showHistory(m.messages);
        if (!m.more) lastId = Math.max(lastId, pendingLast);
        break;
      case "typing":
        if (m.room !== room) return;
        typers.set(m.user || "~" + m.name, { name: m.name, until: Date.now() + TYPING_SHOWN });
        renderTyping();
        break;
      case "message":
        if (m.ref !== undefined) unsent.delete(m.ref);    // ours, stored
        if (typers.delete(m.user || "~" + m.from)) renderTyping();   // done typing
        if (m.room !== room || m.id <= lastId) return;   // never shown twice
        lastId = m.id;
        if (m.kind) applyEvent(m); else addMessage(m);
        if (!m.kind && !mine(m) && document.hidden) { unread += 1; renderUnread(); }
        markRead();
        break;
      case "presence":
        if (m.room !== room) return;
        if (m.event === "join") { if (!members.includes(m.nick)) members.push(m.nick); }
        else members = members.filter((n) => n !== m.nick);
        renderMembers();
        sys(m.nick + (m.event === "join" ? " joined" : " left"));
        break;
      case "error":
        if (["nick_taken", "bad_nick", "bad_room", "hello_first", "unauthorized"].includes(m.code)
            || (m.code === "forbidden" && m.ref === "join")) {
          wanted = false;                    // cannot work as asked: stop and say why
          showNotice(m.code === "unauthorized"
            ? "Your sign-in link is no longer valid (" + m.message + "): open a new one."
            : m.message);
          if (ws) ws.close(1000);
        } else {
          if (m.ref === "typing") { mayType = false; break; }   // quietly: it is a hint
          if (m.ref === "older") older = "idle";
          else if (unsent.has(m.ref) && m.code !== "unavailable") unsent.delete(m.ref);
          sys("error: " + m.message);
        }
        break;
    }
  }

  $("join-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    nick = nickEl.value.trim();
    const newRoom = roomEl.value.trim();
    if (newRoom !== room) {
      log.replaceChildren(); shown.clear();
      lastId = 0; epoch = null; unsent.clear(); mayType = true; readSent = 0; unread = 0;
      renderUnread();
    }
    room = newRoom;
    localStorage.setItem("chatd.nick", nick);
    localStorage.setItem("chatd.room", room);
    wanted = true;
    attempt = 0;
    showNotice("");
    connect();
  });

  leaveBtn.addEventListener("click", () => {
    wanted = false;
    clearTimeout(timer);
    send({ type: "leave", room });
    if (ws) ws.close(1000); else setState("closed", "not connected");
    members = [];
    renderMembers();
  });

  $("send-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const value = text.value;
    if (!value.trim() || !ws || ws.readyState !== WebSocket.OPEN) return;
    const cid = "c" + Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
    unsent.set(cid, value);
    send({ type: "send", room, text: value, cid, ref: cid });
    text.value = "";
  });

  text.addEventListener("input", () => {
    const now = Date.now();
    if (mayType && text.value && now - typedAt >= TYPING_EVERY) {
      typedAt = now;
      send({ type: "typing", room, ref: "typing" });
    }
  });

  window.addEventListener("online", () => { if (wanted && !ws) connect(); });
  log.addEventListener("scroll", () => { if (log.scrollTop < 40) loadOlder(); });

  setState("closed", "not connected");
  // A reload (or a token) rejoins and shows the history.
  if (nickEl.value || token) $("join-form").requestSubmit();
})();
