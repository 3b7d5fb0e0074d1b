// The purchase console: one WebSocket to this server for purchases and their replies, and
// gRPC-Web calls of wallet.v1.WalletService/GetTotalSpent for the totals. No framework, no build
// step. Amounts are never parsed into numbers: they are sent as the text typed and shown as the
// strings the server returns.
"use strict";

const $ = (id) => document.getElementById(id);
const CODES = ["OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
  "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"];

let socket = null;
let totalsUrl = null;
let watched = [];
let poller = null;

function status(text) { $("connection-status").textContent = text; }

function logReply(kind, code, text) {
  const item = document.createElement("li");
  item.className = kind;
  const label = document.createElement("span");
  label.className = "kind";
  label.textContent = kind === "ack" ? "ack" : code;
  item.append(label, document.createTextNode(text));
  $("replies").prepend(item);
}

function connect(event) {
  event.preventDefault();
  if (socket) socket.close(1000, "reconnecting");
  const token = $("token").value.trim();
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  // Browsers cannot set Authorization on a WebSocket: the token goes in the subprotocol offer.
  socket = token ? new WebSocket(url, ["purchases.v1", "bearer." + token]) : new WebSocket(url);
  status("Connecting…");
  socket.addEventListener("open", () => {
    status("Connected to " + url + ".");
    $("send").disabled = false;
  });
  socket.addEventListener("message", (message) => {
    let reply;
    try { reply = JSON.parse(message.data); } catch { logReply("error", "unreadable", String(message.data)); return; }
    if (reply.type === "ack") {
      logReply("ack", "", `${reply.amount} for ${reply.user_id} (purchase ${reply.purchase_id})`);
    } else {
      logReply("error", reply.code, reply.message + (reply.purchase_id ? ` (purchase ${reply.purchase_id})` : ""));
    }
  });
  socket.addEventListener("close", (close) => {
    $("send").disabled = true;
    status(close.code === 1006
      ? "Not connected: the server refused the connection (a missing or invalid token is refused with 401)."
      : `Disconnected (${close.code}${close.reason ? ": " + close.reason : ""}).`);
  });
}

function sendPurchase(event) {
  event.preventDefault();
  if (!socket || socket.readyState !== WebSocket.OPEN) return;
  const frame = { user_id: $("user-id").value.trim(), amount: $("amount").value.trim() };
  const purchaseId = $("purchase-id").value.trim();
  if (purchaseId) frame.purchase_id = purchaseId;
  socket.send(JSON.stringify(frame));
  $("amount").value = "";
  $("amount").focus();
}

// ---- gRPC-Web: the request and response messages of GetTotalSpent, by hand (protobuf wire format).

function varint(value) {
  const bytes = [];
  while (value > 127) { bytes.push((value & 127) | 128); value >>>= 7; }
  bytes.push(value);
  return bytes;
}

function encodeRequest(userId) {
  const text = new TextEncoder().encode(userId);
  const message = [0x0a, ...varint(text.length), ...text]; // field 1, length-delimited
  const frame = new Uint8Array(5 + message.length);
  new DataView(frame.buffer).setUint32(1, message.length);
  frame.set(message, 5);
  return frame;
}

function decodeResponse(bytes) {
  const fields = {};
  let i = 0;
  const readVarint = () => {
    let result = 0n, shift = 0n;
    for (;;) {
      const byte = bytes[i++];
      result |= BigInt(byte & 127) << shift;
      if (byte < 128) return result;
      shift += 7n;
    }
  };
  while (i < bytes.length) {
    const key = Number(readVarint());
    const field = key >> 3, wire = key & 7;
    if (wire === 0) fields[field] = readVarint();
    else if (wire === 2) {
      const length = Number(readVarint());
      fields[field] = new TextDecoder().decode(bytes.subarray(i, i + length));
      i += length;
    } else throw new Error("unexpected wire type " + wire);
  }
  return { userId: fields[1] ?? "", total: fields[3] ?? "0.00", count: (fields[4] ?? 0n).toString() };
}

async function getTotal(userId) {
  const headers = { "content-type": "application/grpc-web+proto", "x-grpc-web": "1" };
  const token = $("token").value.trim();
  if (token) headers.authorization = "Bearer " + token;
  const response = await fetch(totalsUrl + "/wallet.v1.WalletService/GetTotalSpent",
    { method: "POST", headers, body: encodeRequest(userId) });
  const body = new Uint8Array(await response.arrayBuffer());
  let message = null;
  let grpcStatus = response.headers.get("grpc-status");
  let grpcMessage = response.headers.get("grpc-message");
  for (let i = 0; i + 5 <= body.length;) {
    const flag = body[i];
    const length = new DataView(body.buffer, body.byteOffset + i + 1, 4).getUint32(0);
    const payload = body.subarray(i + 5, i + 5 + length);
    i += 5 + length;
    if (flag & 0x80) {
      for (const line of new TextDecoder().decode(payload).split("\r\n")) {
        const at = line.indexOf(":");
        if (at < 0) continue;
        const name = line.slice(0, at).trim().toLowerCase(), value = line.slice(at + 1).trim();
        if (name === "grpc-status") grpcStatus = value;
        if (name === "grpc-message") grpcMessage = value;
      }
    } else {
      message = payload;
    }
  }
  if (grpcStatus !== null && grpcStatus !== "0") {
    const code = CODES[Number(grpcStatus)] ?? grpcStatus;
    throw new Error(`${code}: ${decodeURIComponent(grpcMessage ?? "")}`);
  }
  if (!response.ok || message === null) throw new Error(`HTTP ${response.status}`);
  return decodeResponse(message);
}

async function refreshTotals() {
  const rows = [];
  const problems = [];
  for (const user of watched) {
    try {
      rows.push(await getTotal(user));
    } catch (error) {
      problems.push(`${user}: ${error.message}`);
    }
  }
  const body = $("totals").tBodies[0];
  body.replaceChildren(...rows.map((row) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of [[row.userId, ""], [row.total, "amount"], [row.count, ""]]) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  }));
  $("totals-status").textContent = problems.length ? problems.join("; ") : "";
}

function watch(event) {
  event.preventDefault();
  watched = $("watch-users").value.split(",").map((user) => user.trim()).filter(Boolean);
  if (!totalsUrl) {
    $("totals-status").textContent = "Totals are not configured on this server (CONSOLE_TOTALS_URL).";
    return;
  }
  clearInterval(poller);
  refreshTotals();
  poller = setInterval(refreshTotals, 1000);
}

async function start() {
  $("connect-form").addEventListener("submit", connect);
  $("purchase-form").addEventListener("submit", sendPurchase);
  $("totals-form").addEventListener("submit", watch);
  try {
    const config = await (await fetch("/console/config.json")).json();
    totalsUrl = config.totals_url || null;
  } catch {
    totalsUrl = null;
  }
}

start();
