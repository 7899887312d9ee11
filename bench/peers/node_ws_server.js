// Broadcast peer for bench/run.py: every message to every client, sender included.
//
// The plain `ws` way: clients.forEach(c => c.send(data, {binary})). No
// compression, no pings, backlog 4096 so connection bursts are not limited by
// the accept queue. Usage: node node_ws_server.js [port]   (0 or none: any free)
"use strict";

const { WebSocketServer, WebSocket } = require("ws");

const port = Number.parseInt(process.argv[2] || "0", 10);
const wss = new WebSocketServer({
  host: "127.0.0.1",
  port,
  backlog: 4096,
  perMessageDeflate: false,
  clientTracking: true,
});

wss.on("connection", (ws) => {
  ws.on("error", () => {}); // a reset client must not take the server down
  ws.on("message", (data, isBinary) => {
    wss.clients.forEach((c) => {
      if (c.readyState === WebSocket.OPEN) c.send(data, { binary: isBinary });
    });
  });
});

wss.on("listening", () => {
  console.log(`listening on ${wss.address().port}`);
});
