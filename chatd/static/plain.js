// chatd plain page: the seed's test page, finished. No framework, no CDN.
// Everything received is shown with textContent: text, never HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const host = $("host"), port = $("port"), room = $("room"), text = $("text");
  const connectBtn = $("connect"), sendBtn = $("send"), state = $("state"), log = $("log");
  const MAX_LINES = 1000; // keep the page's memory flat on a busy room
  let ws = null;

  host.value = location.hostname || "127.0.0.1";
  port.value = location.port || (location.protocol === "https:" ? "443" : "80");

  function show(line, cls) {
    const div = document.createElement("div");
    if (cls) div.className = cls;
    div.textContent = line;
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.appendChild(div);
    while (log.childElementCount > MAX_LINES) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function setState(s, label) {
    state.dataset.state = s;
    state.textContent = label;
    const open = s === "open";
    text.disabled = sendBtn.disabled = !open;
    connectBtn.textContent = s === "closed" ? "连接 Connect" : "断开 Disconnect";
    if (open) text.focus();
  }

  function url() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const h = host.value.includes(":") && !host.value.startsWith("[") ? "[" + host.value + "]" : host.value;
    const path = room.value ? "/relay/" + encodeURIComponent(room.value) : "/";
    return scheme + "://" + h + ":" + port.value + path;
  }

  function connect() {
    let target;
    try {
      target = url();
      ws = new WebSocket(target);
    } catch (e) {
      show("cannot connect: " + e.message, "sys");
      return;
    }
    ws.binaryType = "arraybuffer";
    setState("connecting", "connecting…");
    ws.onopen = () => { setState("open", "connected"); show("connected to " + target, "sys"); };
    ws.onmessage = (ev) => {
      if (typeof ev.data === "string") show(ev.data);
      else show("[binary, " + ev.data.byteLength + " bytes]", "sys");
    };
    ws.onclose = (ev) => {
      ws = null;
      setState("closed", "disconnected");
      show("disconnected (code " + ev.code + (ev.reason ? ": " + ev.reason : "") + ")", "sys");
    };
  }

  $("connect-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (ws) ws.close(1000); else connect();
  });
  $("send-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!ws || ws.readyState !== WebSocket.OPEN || text.value === "") return;
    ws.send(text.value);
    text.value = "";
  });
})();
