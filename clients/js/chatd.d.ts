// TypeScript declarations of chatd.js (chatd/static/chatd.js): the chatd.v1 client.

export declare const VERSION: string;
export declare const SUBPROTOCOL: "chatd.v1";

/** A WebSocket constructor: the browser's, Node 22's global one, or the `ws` package's. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

export interface ChatdOptions {
  /** ws:// or wss:// URL of the daemon; by default the page's own host. */
  url?: string;
  /** The nick (without a token). */
  nick?: string;
  /** A connection token (docs/AUTH.md), used for every connection. */
  token?: string;
  /** Called before every connection and before the token expires; returns a fresh token. */
  getToken?: () => string | Promise<string>;
  /** The WebSocket constructor (default: globalThis.WebSocket). */
  WebSocket?: WebSocketConstructor;
  /** ms before the first reconnect (default 1000), doubled by `factor` up to `maxDelay` (30000). */
  initialDelay?: number;
  maxDelay?: number;
  factor?: number;
  /** Each delay is cut by up to this fraction at random (default 0.5). */
  jitter?: number;
  /** ms from a new socket to its welcome before giving up on it (default 10000). */
  connectTimeout?: number;
  /** ms a request waits for its answer, 0 for no limit (default 30000). */
  requestTimeout?: number;
  /** s before the token's exp to refresh it, at most half its life (default 60). */
  refreshBefore?: number;
  /** ids remembered per room to filter duplicates (default 5000). */
  maxSeen?: number;
  /** An earlier session's resume secret (`resumeSecret`, kept across a reload): the first
   * connection takes that session over instead of meeting its nick as taken. */
  resume?: string;
}

export type Reactions = Record<string, string[]>;

/** A `message` frame: a message, or an event about one (`kind` and `target`). */
export interface Message {
  type: "message";
  room: string;
  id: number;
  ts: number;
  from: string;
  user?: string;
  text?: string;
  ref?: string | number;
  kind?: "edit" | "delete" | "react" | "unreact";
  target?: number;
  emoji?: string;
  /** A message read from the history comes as it is now: */
  edited?: boolean;
  deleted?: boolean;
  reactions?: Reactions;
  updated?: number;
}

/** A message as it is now, in a RoomState. */
export interface MessageState {
  room: string;
  id: number;
  ts: number;
  from: string;
  user?: string;
  text: string;
  edited: boolean;
  deleted: boolean;
  reactions: Reactions;
  /** The id of the latest event applied to it (its own id if none). */
  updated: number;
}

export interface Joined {
  room: string;
  members: string[];
  /** Every message of the join's history (all pages), oldest first. */
  history: Message[];
  lastId: number;
  epoch: string | null;
  read: number;
  unread: number;
  recovered?: boolean;
  reason?: "truncated" | "epoch" | "unknown_id";
  reset?: boolean;
  truncated?: boolean;
}

export interface HistoryPage {
  room: string;
  messages: Message[];
  more: boolean;
  epoch: string | null;
}

export type State = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface StateEvent {
  state: State;
  /** reconnecting: ms until the next attempt. */
  in?: number;
  attempt?: number;
  /** reconnecting, closed: the close code (4000: replaced, 4001: unauthorized) and reason. */
  code?: number;
  reason?: string;
  /** open: whether the welcome took the previous session over. */
  resumed?: boolean;
  session?: string;
}

export interface Presence {
  type: "presence";
  room: string;
  nick: string;
  user?: string;
  event: "join" | "leave";
}
export interface Typing {
  type: "typing";
  room: string;
  name: string;
  user?: string;
}
export interface Read {
  type: "read";
  room: string;
  name: string;
  user?: string;
  id: number;
}
export interface Welcome {
  type: "welcome";
  nick: string;
  user?: string;
  exp?: number;
  session: string;
  resume?: string;
  resumed?: boolean;
  rooms?: string[];
}

export interface ChatdEvents {
  state: (e: StateEvent) => void;
  welcome: (w: Welcome) => void;
  joined: (j: Joined) => void;
  /** Every message and event of a joined room, once (history, replays and live). */
  message: (m: Message) => void;
  /** A message's state in its RoomState changed. */
  update: (state: MessageState, cause: Message) => void;
  presence: (p: Presence) => void;
  typing: (t: Typing) => void;
  read: (r: Read) => void;
  /** The room's history started again: forget its messages. */
  reset: (r: { room: string; epoch: string | null; lastId: number }) => void;
  refreshed: (r: { exp: number }) => void;
  /** Errors that answer no request of this client. */
  error: (e: Error) => void;
}

export declare class ChatdError extends Error {
  /** The server's error code (bad_field, forbidden, not_found, ...) or disconnected, closed, timeout, left. */
  code: string;
  frame?: object;
  /** On an "error" event: the request without an answer (typing, read) it refuses, if known. */
  request?: { type: string; room?: string; [field: string]: unknown } | null;
  constructor(code: string, message?: string, frame?: object);
}

export declare class RoomState {
  constructor(name: string);
  name: string;
  members: string[];
  messages: Map<number, MessageState>;
  /** Applies a message or an event by the `updated` rule; returns the state it changed, or null. */
  apply(m: Message): MessageState | null;
  get(id: number): MessageState | undefined;
  list(): MessageState[];
  clear(): void;
}

export declare class Chatd {
  constructor(options: ChatdOptions);
  readonly options: Required<Omit<ChatdOptions, "url" | "nick" | "token" | "getToken" | "WebSocket">> & ChatdOptions;
  url: string;
  state: State;
  nick: string | null;
  session: string | null;
  user: string | null;
  exp: number | null;
  on<K extends keyof ChatdEvents>(name: K, fn: ChatdEvents[K]): () => void;
  off<K extends keyof ChatdEvents>(name: K, fn: ChatdEvents[K]): void;
  connect(): void;
  close(): void;
  reconnectNow(): void;
  join(room: string): Promise<Joined>;
  leave(room: string): Promise<{ room: string }>;
  send(room: string, text: string, options?: { cid?: string }): Promise<Message>;
  history(room: string, options?: { before?: number; after?: number; limit?: number }): Promise<HistoryPage>;
  edit(room: string, id: number, text: string): Promise<Message>;
  delete(room: string, id: number): Promise<Message>;
  react(room: string, id: number, emoji: string): Promise<Message>;
  unreact(room: string, id: number, emoji: string): Promise<Message>;
  /** The secret that lets a later connection take this session over, or null. */
  readonly resumeSecret: string | null;
  typing(room: string): Promise<void>;
  read(room: string, id: number): Promise<void>;
  room(name: string): RoomState | undefined;
  rooms(): string[];
}

export default Chatd;
