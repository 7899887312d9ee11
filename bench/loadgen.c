/*
 * loadgen: a WebSocket load generator for chatd's benchmarks (bench/run.py).
 *
 * Why C: the Python generator of bench/chat.py saturates its CPU long before
 * a fast server does, so fan-out numbers measured the generator. This one is
 * single-threaded (epoll, non-blocking sockets), parses only frame headers
 * plus the first PEEK bytes of each payload, and sends client frames with a
 * zero mask key (valid, and applying it is free).
 *
 * Every message it publishes carries the marker "@@" and 16 hex digits (the
 * CLOCK_MONOTONIC send time in ns), so it is recognised after chatd's plain
 * "ID<port>: " prefix or inside chatd.v1 JSON; frames without the marker
 * (welcome, joined, presence) are not counted.
 *
 * Modes (each prints JSON lines: {"event":...}; the last one is "result"):
 *   fanout      N members, one also publishes; window W messages in flight (a
 *               message is done when every member has it); M messages x R runs.
 *   latency     N members; publish R msg/s for T s; p50/p99 over all deliveries.
 *   idle        open N connections, hold them H s.
 *   handshakes  open N connections, at most --inflight at once; handshakes/s.
 *   slow        N members, the last K never read (tiny SO_RCVBUF); publish for T s
 *               as fast as the window (on the publisher's own copies) allows,
 *               then wait up to --grace s for the server to drop the non-readers.
 *
 * With --deflate 1 every connection offers permessage-deflate as Chromium does
 * ("permessage-deflate; client_max_window_bits") and inflates the first PEEK
 * bytes of each compressed (RSV1) frame on their own to find the marker: right
 * for a server without context takeover (chatd's default). Such a server sends
 * every member the same bytes for a message, so what was inflated is kept in a
 * small table keyed by the compressed bytes (a browser inflates each frame
 * once; the generator, standing in for thousands of them, would otherwise
 * spend its core on inflating the same bytes again). With --deflate 2
 * each connection keeps its own inflater (context takeover, the server's
 * choice), which needs every compressed frame whole: frames longer than PEEK
 * are counted in "inflate_skipped" of the result and their marker is lost.
 * What it publishes goes uncompressed, which RFC 7692 allows.
 *
 * With --linger S the connections stay open after the result until stdin is
 * closed (or S seconds), so the harness can read the server's memory and stop
 * the server before the clients go.
 *
 * Build: gcc -O2 -o bench/.build/loadgen bench/loadgen.c -lz
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define PEEK 256            /* payload bytes looked at per frame (the marker is near the start) */
#define CARRY (14 + PEEK)   /* the most a partial frame keeps between reads */
#define RBUF (256 * 1024)
#define RING 8192           /* completion counters of messages in flight (> window) */
#define MAX_EVENTS 1024
#define HS_MAX 8192

enum { ST_FREE, ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSED };
enum { M_FANOUT, M_LATENCY, M_IDLE, M_HANDSHAKES, M_SLOW };

typedef struct {
    int fd;
    int idx;
    int state;
    int reader;      /* 0: a slow-mode member that never reads */
    int attempts;
    uint32_t events; /* registered epoll events */
    uint64_t got;    /* marker frames received */
    unsigned char *hs;
    size_t hs_len;
    unsigned char carry[CARRY];
    size_t carry_len;
    uint64_t skip; /* bytes of the current frame still to discard */
    unsigned char *out;
    size_t out_len, out_off, out_cap;
    int close_code; /* from the server's close frame, -1: EOF/reset, 0: open */
    z_stream *z;    /* --deflate 2: this connection's inflater */
    uint64_t lost_at; /* when the connection ended */
} conn_t;

/* options */
static int o_port;
static int o_pub_port; /* --pub-port: the publisher (connection 0) on another node */
static const char *o_path = "/";
static const char *o_proto;
static const char *o_setup;  /* frames separated by '\n'; {i}: index, {g}: index / group */
static int o_group = 100;
static const char *o_wrap = "{p}"; /* the published text frame; {p}: the payload */
static int o_n = 100, o_m = 1000, o_size = 64, o_window = 32, o_runs = 1, o_slow;
static int o_inflight = 200;
static double o_rate = 50, o_duration = 5, o_hold = 3, o_timeout = 60, o_linger, o_quiet = 0.3;
static double o_grace = 6; /* slow: how long to wait for the server to drop non-readers */
static int o_deflate;       /* offer permessage-deflate; inflate RSV1 frames' first bytes */
static uint64_t inflate_skipped; /* --deflate 2: compressed frames too long to inflate */
static int mode;

/* state */
static conn_t *conns;
static int ep;
static unsigned char rbuf[CARRY + RBUF];
static uint64_t t_now, t_start, deadline, t_last_frame;
static int next_conn, inprogress, opened, failed, rejected, retry_top;
static int *retry_stack;
static int readers_lost, slow_lost, stdin_eof;
static int stdin_tag;
static uint64_t total_got;            /* marker frames over all readers */
static uint32_t arrivals[RING];       /* fanout: members that have message k (mod RING) */
static uint64_t done;                 /* fanout: messages every member has */
static uint64_t *lat;                 /* latency samples, ns */
static size_t lat_n, lat_cap;
static char wrap_pre[512], wrap_post[512];
static size_t wrap_pre_len, wrap_post_len;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void emit(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void on_alarm(int sig) {
    (void)sig;
    static const char msg[] = "{\"event\":\"result\",\"error\":\"hard wall-clock limit\"}\n";
    ssize_t w = write(1, msg, sizeof msg - 1);
    (void)w;
    _exit(2);
}

static void die(const char *what) {
    emit("{\"event\":\"result\",\"error\":\"%s: %s\"}", what, strerror(errno));
    exit(1);
}

/* -- sending --------------------------------------------------------------- */

/* A masked (zero key) client frame of one piece or the concatenation of three. */
static size_t put_frame(unsigned char *dst, int opcode, const void *a, size_t alen, const void *b,
                        size_t blen, const void *c, size_t clen) {
    size_t n = alen + blen + clen, h = 0;
    dst[h++] = 0x80 | opcode;
    if (n < 126) {
        dst[h++] = 0x80 | n;
    } else if (n < 65536) {
        dst[h++] = 0x80 | 126;
        dst[h++] = n >> 8;
        dst[h++] = n & 0xff;
    } else {
        dst[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--) dst[h++] = (n >> (8 * i)) & 0xff;
    }
    memset(dst + h, 0, 4);
    h += 4;
    memcpy(dst + h, a, alen);
    if (blen) memcpy(dst + h + alen, b, blen);
    if (clen) memcpy(dst + h + alen + blen, c, clen);
    return h + n;
}

static void set_events(conn_t *c, uint32_t ev) {
    if (c->events == ev) return;
    struct epoll_event e = {.events = ev, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e) == 0) c->events = ev;
}

static uint32_t wanted_events(conn_t *c) {
    uint32_t ev = c->reader || c->state != ST_OPEN ? EPOLLIN : EPOLLRDHUP;
    if (c->out_len > c->out_off) ev |= EPOLLOUT;
    return ev;
}

static void lose(conn_t *c, int code);

static void flush_out(conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t w = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (w > 0) {
            c->out_off += w;
        } else if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            break;
        } else {
            lose(c, -1);
            return;
        }
    }
    if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
    set_events(c, wanted_events(c));
}

/* Queue bytes for a connection and write what the socket takes now. */
static void conn_send(conn_t *c, const void *data, size_t len) {
    if (c->state == ST_CLOSED) return;
    if (c->out_len + len > c->out_cap) {
        if (c->out_off) {
            memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
            c->out_len -= c->out_off;
            c->out_off = 0;
        }
        if (c->out_len + len > c->out_cap) {
            c->out_cap = (c->out_len + len) * 2;
            c->out = realloc(c->out, c->out_cap);
            if (!c->out) die("realloc");
        }
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    flush_out(c);
}

/* The payload: marker, send time in hex, padding up to o_size bytes. */
static size_t make_payload(char *dst, uint64_t ts) {
    size_t n = (size_t)o_size < 18 ? 18 : (size_t)o_size;
    snprintf(dst, 19, "@@%016llx", (unsigned long long)ts);
    memset(dst + 18, 'x', n - 18);
    return n;
}

/* Append one published message (wrapped, framed) to buf; returns its length. */
static size_t make_message(unsigned char *buf, uint64_t ts) {
    char payload[65536];
    size_t n = make_payload(payload, ts);
    return put_frame(buf, 1, wrap_pre, wrap_pre_len, payload, n, wrap_post, wrap_post_len);
}

static void split_wrap(void) {
    const char *p = strstr(o_wrap, "{p}");
    if (!p || (size_t)(p - o_wrap) >= sizeof wrap_pre || strlen(p + 3) >= sizeof wrap_post) {
        fprintf(stderr, "--wrap needs one {p} and fewer than 512 bytes around it\n");
        exit(64);
    }
    wrap_pre_len = p - o_wrap;
    memcpy(wrap_pre, o_wrap, wrap_pre_len);
    wrap_post_len = strlen(p + 3);
    memcpy(wrap_post, p + 3, wrap_post_len);
}

/* The setup frames (e.g. chatd.v1 hello and join) of connection i. */
static void send_setup(conn_t *c) {
    if (!o_setup || !*o_setup) return;
    char text[4096];
    unsigned char frame[4200];
    const char *s = o_setup;
    while (*s) {
        size_t n = 0;
        while (*s && *s != '\n' && n < sizeof text - 24) {
            if (!strncmp(s, "{i}", 3)) {
                n += snprintf(text + n, 24, "%d", c->idx);
                s += 3;
            } else if (!strncmp(s, "{g}", 3)) {
                n += snprintf(text + n, 24, "%d", c->idx / (o_group > 0 ? o_group : 1));
                s += 3;
            } else {
                text[n++] = *s++;
            }
        }
        if (*s == '\n') s++;
        if (n) conn_send(c, frame, put_frame(frame, 1, text, n, NULL, 0, NULL, 0));
    }
}

/* -- receiving ------------------------------------------------------------- */

static unsigned hexval(unsigned char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    return 16;
}

static void record_latency(const unsigned char *m, size_t avail) {
    if (avail < 18) return;
    uint64_t ts = 0;
    for (int i = 2; i < 18; i++) {
        unsigned v = hexval(m[i]);
        if (v > 15) return;
        ts = ts << 4 | v;
    }
    if (lat_n == lat_cap) {
        lat_cap = lat_cap ? lat_cap * 2 : 1 << 16;
        if (lat_cap > (64u << 20)) return;
        lat = realloc(lat, lat_cap * sizeof *lat);
        if (!lat) die("realloc");
    }
    lat[lat_n++] = t_now > ts ? t_now - ts : 0;
}

/* --deflate 1: compressed starts already inflated, by a hash of their bytes. */
#define MEMO 1024
typedef struct {
    size_t in_len, out_len;
    unsigned char in[PEEK], out[PEEK * 4];
} memo_t;
static memo_t *memo;

static uint32_t fnv1a(const unsigned char *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* The start of a compressed message's payload, inflated (on its own, or with the
 * connection's context for --deflate 2): up to PEEK * 4 bytes of it in `out`;
 * how many. With --deflate 1 `out` may be replaced by a remembered copy. */
static size_t inflate_peek(conn_t *c, const unsigned char *in, size_t n, size_t len,
                           unsigned char **outp) {
    static z_stream shared;
    static int ready;
    static const unsigned char tail[4] = {0, 0, 0xff, 0xff};
    z_stream *z = &shared;
    unsigned char *out = *outp;
    memo_t *m = NULL;
    if (o_deflate == 1) {
        if (!memo && !(memo = calloc(MEMO, sizeof *memo))) die("calloc");
        m = &memo[fnv1a(in, n) % MEMO];
        if (m->in_len == n && !memcmp(m->in, in, n)) {
            *outp = m->out;
            return m->out_len;
        }
    }
    if (o_deflate == 2) {
        if (n < len) { /* its inflater would lose track: skip it */
            inflate_skipped++;
            return 0;
        }
        if (!c->z) {
            c->z = calloc(1, sizeof *c->z);
            if (!c->z || inflateInit2(c->z, -15) != Z_OK) die("inflateInit2");
        }
        z = c->z;
    } else if (!ready) {
        if (inflateInit2(z, -15) != Z_OK) die("inflateInit2");
        ready = 1;
    } else {
        inflateReset(z);
    }
    z->next_in = (unsigned char *)in;
    z->avail_in = n;
    z->next_out = out;
    z->avail_out = PEEK * 4;
    inflate(z, Z_SYNC_FLUSH); /* (1: a truncated stream: what came out is enough) */
    if (o_deflate == 2) {
        z->next_in = (unsigned char *)tail;
        z->avail_in = 4;
        inflate(z, Z_SYNC_FLUSH);
    }
    size_t got = PEEK * 4 - z->avail_out;
    if (m) {
        m->in_len = n;
        memcpy(m->in, in, n);
        m->out_len = got;
        memcpy(m->out, out, got);
    }
    return got;
}

/* One frame from the server: payload holds its first `look` bytes of `len`. */
static void on_frame(conn_t *c, int opcode, int rsv1, const unsigned char *payload, size_t look,
                     uint64_t len) {
    t_last_frame = t_now;
    unsigned char plain[PEEK * 4], *inflated = plain;
    if (rsv1 && opcode <= 2) {
        look = inflate_peek(c, payload, look, len, &inflated);
        payload = inflated;
    }
    if (opcode <= 2) { /* continuation, text, binary */
        const unsigned char *m = memmem(payload, look, "@@", 2);
        if (!m) return;
        uint64_t k = c->got++;
        total_got++;
        if (mode == M_FANOUT) {
            uint32_t *a = &arrivals[k % RING];
            if (++*a == (uint32_t)o_n) {
                *a = 0;
                done++;
            }
        } else if (mode == M_LATENCY) {
            record_latency(m, look - (m - payload));
        }
    } else if (opcode == 8) {
        c->close_code = look >= 2 ? (payload[0] << 8 | payload[1]) : 1005;
    } else if (opcode == 9) { /* ping: answer, though every server here has them off */
        unsigned char frame[140];
        conn_send(c, frame, put_frame(frame, 10, payload, look, NULL, 0, NULL, 0));
    }
}

/* Parse frames in p[0..n); keep a partial header (+ peek) in carry. */
static void parse(conn_t *c, unsigned char *p, size_t n) {
    size_t i = 0;
    while (i < n && c->state == ST_OPEN && c->close_code == 0) {
        if (c->skip) {
            size_t k = c->skip < n - i ? c->skip : n - i;
            i += k;
            c->skip -= k;
            continue;
        }
        size_t avail = n - i, h = 2;
        if (avail < 2) break;
        uint64_t len = p[i + 1] & 0x7f;
        if (len == 126) {
            if (avail < 4) break;
            len = (uint64_t)p[i + 2] << 8 | p[i + 3];
            h = 4;
        } else if (len == 127) {
            if (avail < 10) break;
            len = 0;
            for (int j = 0; j < 8; j++) len = len << 8 | p[i + 2 + j];
            h = 10;
        }
        if (p[i + 1] & 0x80) h += 4; /* a masked server frame: invalid, but skip it right */
        size_t look = len < PEEK ? len : PEEK;
        if (avail < h + look) break;
        on_frame(c, p[i] & 0x0f, p[i] & 0x40, p + i + h, look, len);
        if (avail >= h + len) {
            i += h + len;
        } else {
            c->skip = h + len - avail;
            i = n;
        }
    }
    c->carry_len = n - i;
    if (c->carry_len) memmove(c->carry, p + i, c->carry_len);
}

static void on_open(conn_t *c);

static void read_handshake(conn_t *c) {
    if (!c->hs) c->hs = malloc(HS_MAX);
    ssize_t r = recv(c->fd, c->hs + c->hs_len, HS_MAX - c->hs_len, 0);
    if (r <= 0) {
        if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
        lose(c, -1);
        return;
    }
    c->hs_len += r;
    unsigned char *end = memmem(c->hs, c->hs_len, "\r\n\r\n", 4);
    if (!end) {
        if (c->hs_len == HS_MAX) lose(c, -2);
        return;
    }
    if (c->hs_len < 12 || memcmp(c->hs, "HTTP/1.1 101", 12) != 0) {
        rejected++;
        lose(c, -2);
        return;
    }
    size_t rest = c->hs_len - (end + 4 - c->hs);
    unsigned char *tail = end + 4;
    c->state = ST_OPEN;
    on_open(c);
    if (c->state != ST_OPEN) return; /* lose() freed the buffer */
    if (rest && c->reader) {
        parse(c, tail, rest);
        if (c->close_code) {
            lose(c, c->close_code);
            return;
        }
    }
    free(c->hs);
    c->hs = NULL;
    c->hs_len = 0;
}

static void on_readable(conn_t *c) {
    if (c->state == ST_HANDSHAKE) {
        read_handshake(c);
        return;
    }
    memcpy(rbuf, c->carry, c->carry_len);
    if (mode == M_LATENCY) t_now = now_ns(); /* the arrival time of what this read returns */
    ssize_t r = recv(c->fd, rbuf + c->carry_len, RBUF, 0);
    if (r > 0) {
        parse(c, rbuf, c->carry_len + r);
        if (c->close_code) lose(c, c->close_code);
    } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
        lose(c, -1);
    }
}

/* -- connections ----------------------------------------------------------- */

static void start_connect(conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (!c->reader) {
        int small = 2048; /* the kernel doubles it; the handshake answer still fits */
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    }
    int port = o_pub_port && c == &conns[0] ? o_pub_port : o_port;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    c->fd = fd;
    c->state = ST_CONNECTING;
    c->attempts++;
    c->got = 0;
    c->carry_len = 0;
    c->skip = 0;
    c->close_code = 0;
    c->out_len = c->out_off = 0;
    if (c->z) inflateReset(c->z); /* a new connection: a new context */
    inprogress++;
    struct epoll_event e = {.events = EPOLLOUT, .data.ptr = c};
    c->events = EPOLLOUT;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e) < 0) die("epoll_ctl");
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) lose(c, -1);
}

static void on_connected(conn_t *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        lose(c, -1);
        return;
    }
    char req[1024];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n%s%s%s%s\r\n",
                     o_path, o_port, o_proto ? "Sec-WebSocket-Protocol: " : "", o_proto ? o_proto : "",
                     o_proto ? "\r\n" : "",
                     o_deflate ? "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                               : "");
    c->state = ST_HANDSHAKE;
    c->events = 0;
    set_events(c, EPOLLIN);
    conn_send(c, req, n);
}

static void on_open(conn_t *c) {
    inprogress--;
    opened++;
    c->close_code = 0;
    set_events(c, wanted_events(c));
    send_setup(c);
}

/* A connection ended (code: close frame's code, -1 EOF/error, -2 refused handshake). */
static void lose(conn_t *c, int code) {
    if (c->state == ST_CLOSED || c->state == ST_FREE) return;
    int was = c->state;
    close(c->fd);
    c->fd = -1;
    c->state = ST_CLOSED;
    c->close_code = code;
    c->lost_at = t_now;
    free(c->hs);
    c->hs = NULL;
    c->hs_len = 0;
    if (was == ST_OPEN) {
        opened--;
        if (c->reader)
            readers_lost++;
        else
            slow_lost++;
    } else {
        inprogress--;
        if (c->attempts < 3)
            retry_stack[retry_top++] = c->idx;
        else
            failed++;
    }
}

static void poll_once(int timeout_ms) {
    static struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(ep, evs, MAX_EVENTS, timeout_ms);
    if (n < 0 && errno != EINTR) die("epoll_wait");
    t_now = now_ns();
    for (int i = 0; i < n; i++) {
        uint32_t ev = evs[i].events;
        if (evs[i].data.ptr == &stdin_tag) {
            char b[256];
            if (read(0, b, sizeof b) <= 0) {
                stdin_eof = 1;
                epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
            }
            continue;
        }
        conn_t *c = evs[i].data.ptr;
        if (c->state == ST_CLOSED) continue; /* closed earlier in this batch */
        if (c->state == ST_CONNECTING) {
            on_connected(c);
            continue;
        }
        if (c->state == ST_OPEN && !c->reader) { /* never read: only notice the end */
            if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) lose(c, -1);
            continue;
        }
        if (ev & EPOLLOUT) flush_out(c);
        if (c->state != ST_CLOSED && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(c);
    }
}

/* Open connections 0..n-1, at most o_inflight at once, each retried up to 3 times. */
static void connect_all(int n) {
    while (opened + failed + readers_lost + slow_lost < n && t_now < deadline) {
        while (inprogress < o_inflight && (retry_top || next_conn < n)) {
            int i = retry_top ? retry_stack[--retry_top] : next_conn++;
            start_connect(&conns[i]);
        }
        poll_once(10);
    }
}

/* Read until nothing arrived for o_quiet seconds: setup answers and presence storms. */
static void drain(void) {
    t_last_frame = t_now;
    while (t_now < deadline && t_now - t_last_frame < (uint64_t)(o_quiet * 1e9)) poll_once(20);
}

static void linger(void) {
    if (o_linger <= 0) return;
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = &stdin_tag};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e);
    uint64_t until = now_ns() + (uint64_t)(o_linger * 1e9);
    while (!stdin_eof && t_now < until) poll_once(100);
}

static double secs(uint64_t a, uint64_t b) { return b > a ? (b - a) / 1e9 : 1e-9; }

/* Why connect_all() left connections unopened, as a JSON value (null: it did not). */
static const char *connect_error(int n) {
    static char msg[96];
    if (opened >= n) return "null";
    if (t_now >= deadline) return "\"timeout while connecting\"";
    snprintf(msg, sizeof msg, "\"only %d of %d connected\"", opened, n);
    return msg;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* -- modes ----------------------------------------------------------------- */

static void publish(conn_t *pub, int count) {
    static unsigned char buf[1 << 20];
    size_t len = 0;
    uint64_t ts = now_ns();
    for (int k = 0; k < count; k++) {
        if (len + o_size + 1024 > sizeof buf) {
            conn_send(pub, buf, len);
            len = 0;
        }
        len += make_message(buf + len, ts);
    }
    if (len) conn_send(pub, buf, len);
}

static void mode_fanout(void) {
    uint64_t t0 = now_ns();
    connect_all(o_n);
    double connect_s = secs(t0, t_now);
    if (opened < o_n) {
        emit("{\"event\":\"result\",\"mode\":\"fanout\",\"open\":%d,\"failed\":%d,\"error\":%s}",
             opened, failed, connect_error(o_n));
        return;
    }
    drain();
    emit("{\"event\":\"ready\",\"open\":%d,\"connect_s\":%.3f,\"setup_s\":%.3f}", opened, connect_s,
         secs(t0, t_now));
    conn_t *pub = &conns[0];
    uint64_t sent = 0;
    char runs[8192];
    size_t rl = 0;
    const char *error = NULL;
    for (int r = 0; r < o_runs && !error; r++) {
        uint64_t target = sent + o_m, base = done;
        emit("{\"event\":\"start\",\"run\":%d}", r);
        uint64_t r0 = now_ns();
        double c0 = cpu_s();
        t_now = r0;
        while (done < target && t_now < deadline) {
            if (readers_lost) {
                error = "a member was disconnected";
                break;
            }
            if (sent < target && sent - done < (uint64_t)o_window) {
                int k = (int)((uint64_t)o_window - (sent - done));
                if ((uint64_t)k > target - sent) k = (int)(target - sent);
                publish(pub, k);
                sent += k;
            }
            poll_once(50);
        }
        double el = secs(r0, t_now), gen = cpu_s() - c0;
        uint64_t deliveries = (done - base) * (uint64_t)o_n;
        emit("{\"event\":\"end\",\"run\":%d}", r);
        rl += snprintf(runs + rl, sizeof runs - rl,
                       "%s{\"seconds\":%.4f,\"deliveries\":%llu,\"deliveries_per_s\":%.1f,"
                       "\"gen_cpu_s\":%.4f,\"gen_cpu_share\":%.3f,\"complete\":%s}",
                       r ? "," : "", el, (unsigned long long)deliveries, deliveries / el, gen,
                       gen / el, done == target ? "true" : "false");
        if (done < target && !error) error = "timeout";
    }
    emit("{\"event\":\"result\",\"mode\":\"fanout\",\"members\":%d,\"messages\":%d,\"window\":%d,"
         "\"connect_s\":%.3f,\"runs\":[%s],\"error\":%s%s%s}",
         o_n, o_m, o_window, connect_s, runs, error ? "\"" : "", error ? error : "null",
         error ? "\"" : "");
}

static void mode_latency(void) {
    uint64_t t0 = now_ns();
    connect_all(o_n);
    double connect_s = secs(t0, t_now);
    if (opened < o_n) {
        emit("{\"event\":\"result\",\"mode\":\"latency\",\"open\":%d,\"error\":%s}", opened,
             connect_error(o_n));
        return;
    }
    drain();
    emit("{\"event\":\"ready\",\"open\":%d,\"connect_s\":%.3f}", opened, connect_s);
    conn_t *pub = &conns[0];
    uint64_t total = (uint64_t)(o_rate * o_duration), sent = 0, interval = (uint64_t)(1e9 / o_rate);
    emit("{\"event\":\"start\"}");
    double c0 = cpu_s();
    uint64_t r0 = now_ns(), stop = r0 + (uint64_t)(o_duration * 1e9) + 5000000000ull;
    uint64_t got0 = total_got;
    t_now = r0;
    while (t_now < deadline && t_now < stop && pub->state == ST_OPEN) {
        if (sent < total && t_now >= r0 + sent * interval) {
            publish(pub, 1);
            sent++;
        }
        if (sent == total && total_got - got0 >= sent * (uint64_t)opened) break;
        int wait = 10;
        if (sent < total) {
            uint64_t next = r0 + sent * interval;
            wait = next > t_now ? (int)((next - t_now) / 1000000) : 0;
        }
        poll_once(wait);
    }
    double el = secs(r0, t_now), gen = cpu_s() - c0;
    emit("{\"event\":\"end\"}");
    uint64_t received = total_got - got0, expected = sent * (uint64_t)o_n;
    double p50 = -1, p99 = -1, pmax = -1;
    if (lat_n) {
        qsort(lat, lat_n, sizeof *lat, cmp_u64);
        p50 = lat[lat_n / 2] / 1e6;
        p99 = lat[(size_t)(lat_n * 0.99)] / 1e6;
        pmax = lat[lat_n - 1] / 1e6;
    }
    emit("{\"event\":\"result\",\"mode\":\"latency\",\"members\":%d,\"rate\":%.1f,\"sent\":%llu,"
         "\"deliveries\":%llu,\"expected\":%llu,\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,"
         "\"seconds\":%.3f,\"gen_cpu_share\":%.3f,\"members_lost\":%d,\"inflate_skipped\":%llu,"
         "\"error\":%s}",
         o_n, o_rate, (unsigned long long)sent, (unsigned long long)received,
         (unsigned long long)expected, p50, p99, pmax, el, gen / el, readers_lost,
         (unsigned long long)inflate_skipped, received < expected ? "\"incomplete\"" : "null");
}

static void mode_idle(void) {
    uint64_t t0 = now_ns();
    connect_all(o_n);
    double connect_s = secs(t0, t_now);
    const char *error = connect_error(o_n);
    drain();
    emit("{\"event\":\"open\",\"open\":%d,\"connect_s\":%.3f}", opened, connect_s);
    uint64_t until = now_ns() + (uint64_t)(o_hold * 1e9);
    while (t_now < until && t_now < deadline) poll_once(100);
    emit("{\"event\":\"result\",\"mode\":\"idle\",\"conns\":%d,\"open\":%d,\"failed\":%d,"
         "\"rejected\":%d,\"lost\":%d,\"connect_s\":%.3f,\"error\":%s}",
         o_n, opened, failed, rejected, readers_lost, connect_s, error);
}

static void mode_handshakes(void) {
    emit("{\"event\":\"start\"}");
    uint64_t t0 = now_ns();
    double c0 = cpu_s();
    connect_all(o_n);
    double el = secs(t0, t_now), gen = cpu_s() - c0;
    const char *error = connect_error(o_n);
    emit("{\"event\":\"end\"}");
    emit("{\"event\":\"result\",\"mode\":\"handshakes\",\"conns\":%d,\"open\":%d,\"failed\":%d,"
         "\"rejected\":%d,\"seconds\":%.3f,\"handshakes_per_s\":%.1f,\"gen_cpu_share\":%.3f,"
         "\"error\":%s}",
         o_n, opened, failed, rejected, el, opened / el, gen / el, error);
}

static void mode_slow(void) {
    for (int i = o_n - o_slow; i < o_n; i++) conns[i].reader = 0;
    uint64_t t0 = now_ns();
    connect_all(o_n);
    double connect_s = secs(t0, t_now);
    if (opened < o_n) {
        emit("{\"event\":\"result\",\"mode\":\"slow\",\"open\":%d,\"error\":%s}", opened,
             connect_error(o_n));
        return;
    }
    drain();
    emit("{\"event\":\"ready\",\"open\":%d,\"connect_s\":%.3f}", opened, connect_s);
    conn_t *pub = &conns[0];
    uint64_t base[o_n];
    for (int i = 0; i < o_n; i++) base[i] = conns[i].got;
    uint64_t sent = 0;
    emit("{\"event\":\"start\"}");
    double c0 = cpu_s();
    uint64_t r0 = now_ns(), stop = r0 + (uint64_t)(o_duration * 1e9);
    t_now = r0;
    while (t_now < stop && t_now < deadline && pub->state == ST_OPEN) {
        uint64_t own = pub->got - base[0];
        if (sent - own < (uint64_t)o_window) {
            publish(pub, (int)(o_window - (sent - own)));
            sent += o_window - (sent - own);
        }
        poll_once(50);
    }
    uint64_t send_end = t_now;
    /* let healthy members catch up: until each has everything, or 5 s of trying */
    uint64_t settle = now_ns() + 5000000000ull;
    for (;;) {
        int behind = 0;
        for (int i = 0; i < o_n; i++)
            if (conns[i].reader && conns[i].state == ST_OPEN && conns[i].got - base[i] < sent) behind++;
        if (!behind || t_now >= settle || t_now >= deadline) break;
        poll_once(50);
    }
    /* a server that drops slow consumers may first send a close and wait for the reply */
    uint64_t grace = t_now + (uint64_t)(o_grace * 1e9);
    while (slow_lost < o_slow && t_now < grace && t_now < deadline) poll_once(100);
    double el = secs(r0, t_now), gen = cpu_s() - c0;
    emit("{\"event\":\"end\"}");
    uint64_t expected = 0, received = 0;
    int healthy = 0, slow_gone = 0;
    uint64_t last_drop = 0;
    for (int i = 0; i < o_n; i++) {
        conn_t *c = &conns[i];
        if (c->reader) {
            healthy++;
            expected += sent;
            received += c->got - base[i] < sent ? c->got - base[i] : sent;
        } else if (c->state == ST_CLOSED) {
            slow_gone++;
            if (c->lost_at > last_drop) last_drop = c->lost_at;
        } else {
            struct tcp_info ti;
            socklen_t len = sizeof ti;
            if (getsockopt(c->fd, IPPROTO_TCP, TCP_INFO, &ti, &len) == 0 &&
                ti.tcpi_state != TCP_ESTABLISHED)
                slow_gone++;
        }
    }
    emit("{\"event\":\"result\",\"mode\":\"slow\",\"members\":%d,\"slow\":%d,\"sent\":%llu,"
         "\"messages_per_s\":%.1f,\"healthy\":%d,\"healthy_expected\":%llu,"
         "\"healthy_received\":%llu,\"healthy_loss\":%.6f,\"healthy_disconnected\":%d,"
         "\"slow_disconnected\":%d,\"last_drop_s\":%.3f,\"seconds\":%.3f,"
         "\"gen_cpu_share\":%.3f,\"error\":null}",
         o_n, o_slow, (unsigned long long)sent, sent / secs(r0, send_end), healthy,
         (unsigned long long)expected, (unsigned long long)received,
         expected ? 1.0 - (double)received / expected : 0.0, readers_lost, slow_gone,
         last_drop ? secs(r0, last_drop) : -1.0, el, gen / el);
}

/* -- main ------------------------------------------------------------------ */

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen fanout|latency|idle|handshakes|slow --port P [--pub-port P2]\n"
            "  [--path /relay/x]\n"
            "  [--proto chatd.v1] [--setup 'frame\\nframe' ({i} index, {g} index/--group)]\n"
            "  [--wrap '...{p}...'] [-n members/conns] [-m messages] [--size B] [--window W]\n"
            "  [--runs R] [--rate msg/s] [--duration s] [--slow K] [--hold s] [--inflight k]\n"
            "  [--timeout s] [--linger s] [--quiet s] [--grace s] [--deflate 1]\n");
    exit(64);
}

int main(int argc, char **argv) {
    if (argc < 2) usage();
    const char *m = argv[1];
    if (!strcmp(m, "fanout")) mode = M_FANOUT;
    else if (!strcmp(m, "latency")) mode = M_LATENCY;
    else if (!strcmp(m, "idle")) mode = M_IDLE;
    else if (!strcmp(m, "handshakes")) mode = M_HANDSHAKES;
    else if (!strcmp(m, "slow")) mode = M_SLOW;
    else usage();
    for (int i = 2; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        i++;
        if (!strcmp(k, "--port")) o_port = atoi(v);
        else if (!strcmp(k, "--pub-port")) o_pub_port = atoi(v);
        else if (!strcmp(k, "--path")) o_path = v;
        else if (!strcmp(k, "--proto")) o_proto = *v ? v : NULL;
        else if (!strcmp(k, "--setup")) o_setup = v;
        else if (!strcmp(k, "--group")) o_group = atoi(v);
        else if (!strcmp(k, "--wrap")) o_wrap = v;
        else if (!strcmp(k, "-n")) o_n = atoi(v);
        else if (!strcmp(k, "-m")) o_m = atoi(v);
        else if (!strcmp(k, "--size")) o_size = atoi(v);
        else if (!strcmp(k, "--window")) o_window = atoi(v);
        else if (!strcmp(k, "--runs")) o_runs = atoi(v);
        else if (!strcmp(k, "--rate")) o_rate = atof(v);
        else if (!strcmp(k, "--duration")) o_duration = atof(v);
        else if (!strcmp(k, "--slow")) o_slow = atoi(v);
        else if (!strcmp(k, "--hold")) o_hold = atof(v);
        else if (!strcmp(k, "--inflight")) o_inflight = atoi(v);
        else if (!strcmp(k, "--timeout")) o_timeout = atof(v);
        else if (!strcmp(k, "--linger")) o_linger = atof(v);
        else if (!strcmp(k, "--quiet")) o_quiet = atof(v);
        else if (!strcmp(k, "--grace")) o_grace = atof(v);
        else if (!strcmp(k, "--deflate")) o_deflate = atoi(v);
        else usage();
    }
    if (o_port <= 0 || o_n <= 0 || o_n > 1000000 || o_slow < 0 || o_slow >= o_n || o_rate <= 0 ||
        o_window < 1 || o_window >= RING || o_size > 60000 || o_inflight < 1 || o_runs < 1 ||
        o_runs > 50)
        usage();
    split_wrap();

    /* one fd per connection: take the hard limit */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    alarm((unsigned)(o_timeout + o_linger + 15));

    conns = calloc(o_n, sizeof *conns);
    retry_stack = calloc(o_n, sizeof *retry_stack);
    if (!conns || !retry_stack) die("calloc");
    for (int i = 0; i < o_n; i++) {
        conns[i].idx = i;
        conns[i].fd = -1;
        conns[i].reader = 1;
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) die("epoll_create1");
    t_start = t_now = now_ns();
    deadline = t_start + (uint64_t)(o_timeout * 1e9);

    switch (mode) {
    case M_FANOUT: mode_fanout(); break;
    case M_LATENCY: mode_latency(); break;
    case M_IDLE: mode_idle(); break;
    case M_HANDSHAKES: mode_handshakes(); break;
    case M_SLOW: mode_slow(); break;
    }
    linger();
    return 0;
}
