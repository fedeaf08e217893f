/*
 * loadgen: the benchmark's load generator for fast poetry servers.
 *
 * Steady mode (the default) keeps CONCURRENCY connections to one server in
 * flight at all times, from one thread with epoll.  Each connection
 * connects, reads to end of stream, checks that exactly BYTES arrived, and
 * closes; its slot starts the next connection at once (a closed loop).  The
 * run ends once POEMS connections have ended (-n), or, with -d, no new
 * connection starts after SECONDS and the run ends when the last one in
 * flight does.
 *
 * First-byte mode (-1) makes a single connection and times it: connect()
 * done, first byte, end of stream.  It measures cold starts, where that
 * connection is what starts the server.
 *
 *   loadgen -p PORT -b BYTES [-a ADDR] [-c CONCURRENCY] [-n POEMS | -d SECONDS]
 *           [-t TIMEOUT_S] [-s SOURCES] [-H FILE] [-P] [-T [-V VERSION]] [-1]
 *
 * -a ADDR is the server's IPv4 or IPv6 address (default 127.0.0.1).
 *
 * -s SOURCES spreads connections over the source addresses 127.0.0.1 ...
 * 127.0.0.SOURCES (every 127/8 address is local on Linux), each with its
 * own range of ephemeral ports, for a server on an IPv4 loopback address.
 *
 * -P (both modes) makes each connection speak as a load balancer's does
 * with HAProxy's send-proxy-v2: once connected, before it reads, it sends a
 * PROXY protocol v2 header in one send(): the 12-byte signature, 0x21
 * (version 2, PROXY), 0x11 (TCP over IPv4) or 0x21 (TCP over IPv6), the
 * length of the addresses (12 or 36, big-endian), then the source address,
 * the destination address, the source port and the destination port, in
 * network order.  The source is the connection's own local address
 * (getsockname), the destination the server's (-a, -p), so that a server
 * logging the client's address from the header logs a true one.  A send
 * that fails is a failure under its errno's reason (refused, reset...), a
 * short one under error.
 *
 * -T (steady mode) speaks TLS, with OpenSSL: each connection makes a full
 * handshake of its own, then reads the poem to the server's close_notify.
 * Nothing is resumed: every connection gets a new SSL object, no session
 * is ever handed to one (SSL_set_session), the client keeps no session
 * cache and asks for no TLS 1.2 ticket; TLS 1.3 tickets a server sends
 * anyway are read and dropped.  The certificate is not verified (this is
 * a benchmark, not a client) and no server name is sent (no SNI).  -V
 * VERSION is the one protocol version offered: 1.3 (the default) or 1.2.
 * The handshake is driven by epoll like everything else (non-blocking
 * SSL_connect and SSL_read), and the latency includes it.
 *
 * A connection fails if it ends with anything but exactly BYTES followed by
 * a clean end of stream: short, long (more bytes than the poem), reset,
 * refused, ports (no ephemeral port left: EADDRNOTAVAIL), timeout (not over
 * within TIMEOUT_S, default 30), error (anything else); with -T also
 * handshake (the TLS handshake failed: an alert, bytes that are not TLS,
 * the stream ending before the handshake did) and ragged (the whole poem,
 * then the end of the stream without a close_notify, which would let a cut
 * be taken for the end).  Over TLS a clean end of stream is the
 * close_notify; a stream that ends without one before the whole poem is
 * short.
 *
 * -H FILE (steady mode) also writes the latency histogram to FILE, one line
 * "VALUE_NS COUNT" per non-empty bucket, VALUE_NS being the bucket's middle
 * (the value its percentiles report).  Histograms of several runs add up
 * bucket by bucket, so percentiles over the runs together can be read from
 * their sum exactly as from one run (the benchmark measures in rounds).
 *
 * Output, one line of space-separated KEY=VALUE pairs on standard output:
 *   steady:     poems= failures= short= long= reset= refused= ports= timeout=
 *               error= handshake= ragged= seconds= rate= bytes= mean_us=
 *               p50_us= p90_us= p99_us= p999_us= max_us= cpu_s=
 *   first-byte: ok= failures= (the same reasons) connect_us= first_byte_us=
 *               eof_us= bytes= cpu_s=
 * poems counts connections that got the whole poem; latency runs from just
 * before socket() to end of stream, over those connections only; cpu_s is
 * the load generator's own CPU time (user and system).  The first failures
 * are described on standard error.  Exit status: 0 if nothing failed, 1 if
 * something did, 2 for a usage or setup error.
 *
 * Nothing is allocated per connection: one slot per concurrent connection
 * and one receive buffer shared by all of them (there is one thread); a
 * PROXY header is built on the stack.  With -T, OpenSSL allocates an SSL
 * object (and its buffers) for each connection: that is what a new,
 * unresumed TLS connection is.
 *
 * Build: gcc -std=c11 -O2 -Wall -Wextra -o loadgen loadgen.c -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* Linux 4.2; older C libraries lack the name. */
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum reason { SHORT, LONG, RESET, REFUSED, PORTS, TIMEOUT, ERROR, HANDSHAKE, RAGGED, NREASONS };
static const char *const REASON_NAMES[NREASONS] = {
    "short", "long", "reset", "refused", "ports", "timeout", "error", "handshake", "ragged",
};

/* PROXY protocol v2 (HAProxy's proxy-protocol.txt, section 2.2): the
 * signature, the version and command byte (version 2, PROXY: the addresses
 * follow), the family and transport bytes, and the longest header -P sends
 * (16 bytes, then two IPv6 addresses and two ports). */
static const unsigned char PROXY_SIGNATURE[12] = {
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
};
#define PROXY_V2_PROXY 0x21
#define PROXY_TCP_OVER_IPV4 0x11
#define PROXY_TCP_OVER_IPV6 0x21
#define PROXY_HEADER_MAX (16 + 36)

/* Only the first failures are described; the counts cover them all. */
#define FAILURES_SHOWN 10

/* Reads per readiness event: enough for a 1 MiB poem, then the others get
 * a turn (epoll is level-triggered, so the rest is not forgotten). */
#define READS_PER_EVENT 4

#define MAX_EVENTS 256

/* ------------------------------------------------------------------------
 * Latency histogram, log-linear: exact below 2^SUB_BITS ns, then each power
 * of two split into 2^SUB_BITS buckets, so a percentile is within 1/128
 * (0.8%) of the true value.  Fixed size, no allocation while recording.
 */
#define SUB_BITS 7
#define SUB_COUNT (1u << SUB_BITS)
#define GROUPS 40 /* up to 2^(SUB_BITS + GROUPS) ns: hours */
#define BUCKETS (SUB_COUNT * (GROUPS + 1))

static uint64_t histogram[BUCKETS];

static unsigned bucket_of(uint64_t ns)
{
    if (ns < SUB_COUNT)
        return (unsigned)ns;
    unsigned top = 63u - (unsigned)__builtin_clzll(ns); /* >= SUB_BITS */
    unsigned shift = top - SUB_BITS;
    unsigned index = SUB_COUNT * (shift + 1) + (unsigned)((ns >> shift) - SUB_COUNT);
    return index < BUCKETS ? index : BUCKETS - 1;
}

/* The middle of a bucket, in ns. */
static double bucket_value(unsigned index)
{
    if (index < SUB_COUNT)
        return (double)index;
    unsigned shift = index / SUB_COUNT - 1;
    uint64_t low = (uint64_t)(SUB_COUNT + index % SUB_COUNT) << shift;
    return (double)low + (double)((uint64_t)1 << shift) / 2.0;
}

static double percentile_us(uint64_t count, double fraction)
{
    if (count == 0)
        return 0.0;
    uint64_t rank = (uint64_t)(fraction * (double)count + 0.999999);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < BUCKETS; i++) {
        seen += histogram[i];
        if (seen >= rank)
            return bucket_value(i) / 1000.0;
    }
    return bucket_value(BUCKETS - 1) / 1000.0;
}

/* Writes the non-empty buckets to path, "VALUE_NS COUNT" a line. */
static int write_histogram(const char *path)
{
    FILE *out = fopen(path, "w");
    if (!out)
        return -1;
    for (unsigned i = 0; i < BUCKETS; i++)
        if (histogram[i])
            fprintf(out, "%.1f %" PRIu64 "\n", bucket_value(i), histogram[i]);
    return fclose(out);
}

/* ------------------------------------------------------------------------
 * The run's settings and tallies.
 */
struct conn {
    int fd;          /* -1: the slot is free */
    uint64_t began;  /* ns, CLOCK_MONOTONIC, just before socket() */
    size_t got;      /* bytes received so far */
    int header_due;  /* -P: still connecting, the PROXY header not sent yet */
    SSL *ssl;        /* -T: this connection's own; NULL without -T */
    int handshaking; /* -T: the handshake is not over yet */
    uint32_t events; /* -T: what the slot waits for in the epoll set */
};

static struct sockaddr_storage server; /* -a and -p, IPv4 or IPv6 */
static socklen_t server_length;
static int proxy_header;          /* -P */
static SSL_CTX *tls;              /* -T: NULL without it */
static int tls_version = TLS1_3_VERSION; /* -V */
static size_t expected;           /* the poem's size */
static unsigned long concurrency = 1;
static uint64_t wanted;           /* -n: connections to make; 0 with -d */
static uint64_t stop_at;          /* -d: ns after which none starts; 0 with -n */
static uint64_t timeout_ns = 30ull * 1000000000ull;
static unsigned sources = 1;      /* -s */
static const char *histogram_path; /* -H: NULL for none */
static int epfd = -1;

static uint64_t started, ended, poems, failures, bytes_total;
static uint64_t reasons[NREASONS];
static uint64_t latency_sum_ns, latency_max_ns;

/* One receive buffer for every connection: the loop has one thread. */
static unsigned char buffer[256 * 1024];

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec)
           + (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

/* The failure an errno from connect() or recv() stands for. */
static enum reason reason_of(int error)
{
    switch (error) {
    case ECONNRESET:
    case EPIPE:
        return RESET;
    case ECONNREFUSED:
        return REFUSED;
    case EADDRNOTAVAIL:
    case EADDRINUSE:
        return PORTS;
    case ETIMEDOUT:
        return TIMEOUT;
    default:
        return ERROR;
    }
}

static void count_failure(enum reason why, size_t got, const char *detail)
{
    reasons[why]++;
    if (++failures <= FAILURES_SHOWN)
        fprintf(stderr, "loadgen: connection failed (%s) after %zu of %zu bytes%s%s\n",
                REASON_NAMES[why], got, expected, detail[0] ? ": " : "", detail);
}

/* ------------------------------------------------------------------------
 * The PROXY protocol v2 header (-P).
 */

/* Writes fd's header into out, PROXY_HEADER_MAX bytes at most: the
 * connection's local address as the source, the server's as the
 * destination.  Its length, or 0 if getsockname() failed (errno says why). */
static size_t build_proxy_header(int fd, unsigned char *out)
{
    struct sockaddr_storage local;
    socklen_t local_length = sizeof local;
    if (getsockname(fd, (struct sockaddr *)&local, &local_length) < 0)
        return 0;
    size_t addresses;
    memcpy(out, PROXY_SIGNATURE, sizeof PROXY_SIGNATURE);
    out[12] = PROXY_V2_PROXY;
    if (server.ss_family == AF_INET6) {
        const struct sockaddr_in6 *source = (const struct sockaddr_in6 *)&local;
        const struct sockaddr_in6 *destination = (const struct sockaddr_in6 *)&server;
        out[13] = PROXY_TCP_OVER_IPV6;
        memcpy(out + 16, &source->sin6_addr, 16);
        memcpy(out + 32, &destination->sin6_addr, 16);
        memcpy(out + 48, &source->sin6_port, 2); /* both already in network order */
        memcpy(out + 50, &destination->sin6_port, 2);
        addresses = 36;
    } else {
        const struct sockaddr_in *source = (const struct sockaddr_in *)&local;
        const struct sockaddr_in *destination = (const struct sockaddr_in *)&server;
        out[13] = PROXY_TCP_OVER_IPV4;
        memcpy(out + 16, &source->sin_addr, 4);
        memcpy(out + 20, &destination->sin_addr, 4);
        memcpy(out + 24, &source->sin_port, 2);
        memcpy(out + 26, &destination->sin_port, 2);
        addresses = 12;
    }
    out[14] = (unsigned char)(addresses >> 8); /* the length, big-endian */
    out[15] = (unsigned char)addresses;
    return 16 + addresses;
}

enum header_sent { HEADER_SENT, HEADER_NOT_YET, HEADER_FAILED };

/* What went wrong with the last header that failed (count_failure's detail). */
static char header_failure[160];

/* Sends fd's PROXY header in one send().  HEADER_NOT_YET: the socket is not
 * connected yet (non-blocking) or its send timed out (blocking), EAGAIN
 * either way; HEADER_FAILED: *why is the failure's reason, and
 * header_failure says what happened. */
static enum header_sent send_proxy_header(int fd, enum reason *why)
{
    unsigned char header[PROXY_HEADER_MAX];
    const char *step = "getsockname";
    size_t length = build_proxy_header(fd, header);
    if (length) {
        step = "send";
        /* MSG_NOSIGNAL: a connection the server has already reset is a
         * failure to count, not a SIGPIPE that ends the run. */
        ssize_t n = send(fd, header, length, MSG_NOSIGNAL);
        if (n == (ssize_t)length)
            return HEADER_SENT;
        if (n >= 0) {
            *why = ERROR;
            snprintf(header_failure, sizeof header_failure,
                     "the PROXY header went short: %zd of %zu bytes", n, length);
            return HEADER_FAILED;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return HEADER_NOT_YET;
    }
    *why = reason_of(errno);
    snprintf(header_failure, sizeof header_failure, "sending the PROXY header (%s): %s", step, strerror(errno));
    return HEADER_FAILED;
}

/* ------------------------------------------------------------------------
 * Steady mode.
 */
static void finish(struct conn *c)
{
    /* No SSL_shutdown: the server has said all it had to, and a
     * close_notify of ours would only reach a socket it has closed. */
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    close(c->fd); /* also takes it out of the epoll set */
    c->fd = -1;
    ended++;
}

static void fail(struct conn *c, enum reason why, const char *detail)
{
    count_failure(why, c->got, detail);
    finish(c);
}

static void succeed(struct conn *c, uint64_t t)
{
    uint64_t latency = t - c->began;
    histogram[bucket_of(latency)]++;
    latency_sum_ns += latency;
    if (latency > latency_max_ns)
        latency_max_ns = latency;
    poems++;
    finish(c);
}

static int may_start(uint64_t t)
{
    return stop_at ? t < stop_at : started < wanted;
}

/* -P: sends c's header, if it is connected; a failure ends it.  Whether the
 * header is still due (c is still connecting). */
static int header_still_due(struct conn *c)
{
    enum reason why;
    switch (send_proxy_header(c->fd, &why)) {
    case HEADER_SENT:
        return 0;
    case HEADER_NOT_YET:
        return 1;
    case HEADER_FAILED:
    default:
        fail(c, why, header_failure);
        return 0;
    }
}

/* ------------------------------------------------------------------------
 * TLS (-T).
 */

/* The client context every connection's SSL comes from: one protocol
 * version, no verification, no session kept or offered. */
static SSL_CTX *tls_context(int version)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (!ctx) {
        fprintf(stderr, "loadgen: SSL_CTX_new failed\n");
        exit(2);
    }
    if (!SSL_CTX_set_min_proto_version(ctx, version) || !SSL_CTX_set_max_proto_version(ctx, version)) {
        fprintf(stderr, "loadgen: this OpenSSL cannot pin the TLS version\n");
        exit(2);
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    return ctx;
}

/* What went wrong with the last TLS failure (count_failure's detail). */
static char tls_failure[200];

/* The reason of the error at the head of OpenSSL's queue, for a person. */
static const char *tls_error_text(void)
{
    const char *text = ERR_reason_error_string(ERR_peek_error());
    return text ? text : "no reason given";
}

/* c's TLS call failed with SSL_get_error() == error, errno being saved:
 * counts it under its reason and ends c. */
static void tls_fail(struct conn *c, int error, int saved)
{
    int eof = 0; /* the stream ended without a close_notify */
    if (error == SSL_ERROR_SYSCALL && saved == 0)
        eof = 1; /* how OpenSSL 1.1 says it */
    else if (error == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)
        eof = 1; /* and OpenSSL 3 */
    enum reason why;
    if (error == SSL_ERROR_SYSCALL && saved != 0) {
        why = reason_of(saved);
        snprintf(tls_failure, sizeof tls_failure, "%s%s", c->handshaking ? "in the TLS handshake: " : "",
                 strerror(saved));
    } else if (c->handshaking) {
        why = HANDSHAKE;
        snprintf(tls_failure, sizeof tls_failure, "the TLS handshake failed: %s",
                 eof ? "the stream ended" : tls_error_text());
    } else if (eof && c->got == expected) {
        why = RAGGED;
        snprintf(tls_failure, sizeof tls_failure, "the whole poem, then the end of the stream without a close_notify");
    } else if (eof) {
        why = SHORT;
        snprintf(tls_failure, sizeof tls_failure, "end of stream (without a close_notify) before the end of the poem");
    } else {
        why = ERROR;
        snprintf(tls_failure, sizeof tls_failure, "TLS: %s", tls_error_text());
    }
    ERR_clear_error();
    fail(c, why, tls_failure);
}

/* Takes c, connected or connecting, as far as it goes without waiting: the
 * handshake, then the poem.  What c waits for next (EPOLLIN or EPOLLOUT),
 * or 0 if it has ended, whole or failed. */
static uint32_t tls_advance(struct conn *c)
{
    if (c->handshaking) {
        ERR_clear_error();
        int r = SSL_connect(c->ssl);
        int saved = errno;
        if (r != 1) {
            int error = SSL_get_error(c->ssl, r);
            if (error == SSL_ERROR_WANT_READ)
                return EPOLLIN;
            if (error == SSL_ERROR_WANT_WRITE)
                return EPOLLOUT; /* still connecting, or a full send buffer */
            tls_fail(c, error, saved);
            return 0;
        }
        c->handshaking = 0;
    }
    /* Beyond READS_PER_EVENT, only what OpenSSL holds already: epoll would
     * not say it is there. */
    for (int round = 0; round < READS_PER_EVENT || SSL_has_pending(c->ssl); round++) {
        ERR_clear_error();
        int n = SSL_read(c->ssl, buffer, (int)sizeof buffer);
        int saved = errno;
        if (n > 0) {
            c->got += (size_t)n;
            bytes_total += (uint64_t)n;
            if (c->got > expected) {
                fail(c, LONG, "more bytes than the poem");
                return 0;
            }
            continue;
        }
        int error = SSL_get_error(c->ssl, n);
        switch (error) {
        case SSL_ERROR_WANT_READ:
            return EPOLLIN;
        case SSL_ERROR_WANT_WRITE:
            return EPOLLOUT;
        case SSL_ERROR_ZERO_RETURN: /* the close_notify: a clean end */
            if (c->got == expected)
                succeed(c, now_ns());
            else
                fail(c, SHORT, "close_notify before the end of the poem");
            return 0;
        default:
            tls_fail(c, error, saved);
            return 0;
        }
    }
    return EPOLLIN;
}

/* -T: c's SSL, on its socket, and its first steps; c ended if they failed. */
static void tls_begin(struct conn *c)
{
    c->ssl = SSL_new(tls);
    if (!c->ssl || !SSL_set_fd(c->ssl, c->fd)) {
        fprintf(stderr, "loadgen: SSL_new or SSL_set_fd failed\n");
        exit(2);
    }
    SSL_set_connect_state(c->ssl);
    c->handshaking = 1;
    c->events = tls_advance(c);
}

/* -T: c is ready for what it waited for, or has failed. */
static void tls_continue(struct conn *c)
{
    uint32_t events = tls_advance(c);
    if (c->fd < 0 || events == c->events)
        return;
    c->events = events;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl");
}

static void bind_source(int fd, uint64_t id)
{
    struct sockaddr_in source = {.sin_family = AF_INET};
    source.sin_addr.s_addr = htonl(INADDR_LOOPBACK + (uint32_t)(id % sources));
    int one = 1;
    /* The port is chosen at connect(), per destination, not at bind(). */
    if (setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one) < 0)
        die("setsockopt IP_BIND_ADDRESS_NO_PORT");
    if (bind(fd, (const struct sockaddr *)&source, sizeof source) < 0)
        die("bind to a loopback source address");
}

/* Starts the next connection in slot c, unless the run is over. */
static void start(struct conn *c, uint64_t t)
{
    while (c->fd < 0 && may_start(t)) {
        c->began = now_ns();
        c->got = 0;
        c->fd = socket(server.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0)
            die("socket");
        if (sources > 1)
            bind_source(c->fd, started);
        started++;
        if (connect(c->fd, (const struct sockaddr *)&server, server_length) < 0
            && errno != EINPROGRESS) {
            fail(c, reason_of(errno), strerror(errno));
            continue; /* the slot is free again: try the next one */
        }
        /* Only EPOLLIN: the poem's arrival shows the connect worked, and a
         * failed connect reports EPOLLERR, which is always watched. */
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (tls) {
            /* The ClientHello goes at once if the socket is connected;
             * otherwise OpenSSL's send() says EAGAIN and c waits to be
             * writable.  (-T and -P do not go together.) */
            tls_begin(c);
            if (c->fd < 0)
                continue; /* it failed: the slot is free again */
            ev.events = c->events;
        } else if (proxy_header) {
            /* At once: on loopback the handshake is over when connect()
             * returns.  Otherwise, when the socket is writable (connected),
             * and only then EPOLLIN: the header always goes before a read. */
            c->header_due = header_still_due(c);
            if (c->fd < 0)
                continue; /* it failed: the slot is free again */
            if (c->header_due)
                ev.events = EPOLLOUT;
        }
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            die("epoll_ctl");
    }
}

/* -P: c, connecting when it started, is writable or has failed. */
static void send_due_header(struct conn *c)
{
    c->header_due = header_still_due(c);
    if (c->fd < 0 || c->header_due)
        return; /* failed and ended; or not yet (level-triggered: it comes back) */
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl");
}

/* Reads what has arrived; ends the connection at end of stream or error. */
static void receive(struct conn *c)
{
    for (int round = 0; round < READS_PER_EVENT; round++) {
        ssize_t n = recv(c->fd, buffer, sizeof buffer, 0);
        if (n > 0) {
            c->got += (size_t)n;
            bytes_total += (uint64_t)n;
            if (c->got > expected) {
                fail(c, LONG, "more bytes than the poem");
                return;
            }
            continue;
        }
        if (n == 0) {
            if (c->got == expected)
                succeed(c, now_ns());
            else
                fail(c, SHORT, "end of stream before the end of the poem");
            return;
        }
        if (errno == EAGAIN || errno == EINTR)
            return;
        fail(c, reason_of(errno), strerror(errno));
        return;
    }
}

static void sweep(struct conn *conns, uint64_t t)
{
    for (unsigned long i = 0; i < concurrency; i++)
        if (conns[i].fd >= 0 && t - conns[i].began > timeout_ns)
            fail(&conns[i], TIMEOUT, "no end of stream within the timeout");
}

static int run_steady(void)
{
    struct conn *conns = calloc(concurrency, sizeof *conns);
    if (!conns)
        die("calloc");
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    for (unsigned long i = 0; i < concurrency; i++)
        conns[i].fd = -1;

    uint64_t began = now_ns();
    if (stop_at)
        stop_at += began;
    uint64_t swept = began;
    for (unsigned long i = 0; i < concurrency; i++)
        start(&conns[i], began);

    struct epoll_event events[MAX_EVENTS];
    while (started > ended) {
        int n = epoll_wait(epfd, events, MAX_EVENTS, 1000);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->ssl)
                tls_continue(c);
            else if (c->header_due)
                send_due_header(c);
            else
                receive(c);
            if (c->fd < 0) /* ended: the slot takes the next connection */
                start(c, now_ns());
        }
        uint64_t t = now_ns();
        if (t - swept >= 1000000000ull) {
            swept = t;
            sweep(conns, t);
            for (unsigned long i = 0; i < concurrency; i++)
                start(&conns[i], t);
        }
    }
    double seconds = (double)(now_ns() - began) / 1e9;

    printf("poems=%" PRIu64 " failures=%" PRIu64, poems, failures);
    for (int r = 0; r < NREASONS; r++)
        printf(" %s=%" PRIu64, REASON_NAMES[r], reasons[r]);
    printf(" seconds=%.6f rate=%.1f bytes=%" PRIu64, seconds, (double)poems / seconds, bytes_total);
    printf(" mean_us=%.1f p50_us=%.1f p90_us=%.1f p99_us=%.1f p999_us=%.1f max_us=%.1f",
           poems ? (double)latency_sum_ns / (double)poems / 1000.0 : 0.0,
           percentile_us(poems, 0.50), percentile_us(poems, 0.90),
           percentile_us(poems, 0.99), percentile_us(poems, 0.999),
           (double)latency_max_ns / 1000.0);
    printf(" cpu_s=%.3f\n", cpu_seconds());
    free(conns);
    if (histogram_path && write_histogram(histogram_path) < 0) {
        fprintf(stderr, "loadgen: writing the histogram to %s: %s\n", histogram_path, strerror(errno));
        return 2;
    }
    return failures ? 1 : 0;
}

/* ------------------------------------------------------------------------
 * First-byte mode: one blocking connection, timed at each step.
 */

/* -P: the header on the blocking socket fd; 0 if it failed (counted). */
static int header_sent_blocking(int fd)
{
    enum reason why = ERROR;
    switch (send_proxy_header(fd, &why)) {
    case HEADER_SENT:
        return 1;
    case HEADER_NOT_YET: /* blocking: SO_SNDTIMEO ran out */
        count_failure(TIMEOUT, 0, "the PROXY header could not be sent within the timeout");
        return 0;
    case HEADER_FAILED:
    default:
        count_failure(why, 0, header_failure);
        return 0;
    }
}

static int run_first_byte(void)
{
    uint64_t t0 = now_ns(), connected = 0, first = 0, eof = 0;
    size_t got = 0;
    int fd = socket(server.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    struct timeval tv = {.tv_sec = (time_t)(timeout_ns / 1000000000ull)};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0
        || setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        die("setsockopt SO_RCVTIMEO");
    int reading = 0;
    if (connect(fd, (const struct sockaddr *)&server, server_length) < 0) {
        count_failure(reason_of(errno), 0, strerror(errno));
    } else {
        connected = now_ns();
        reading = !proxy_header || header_sent_blocking(fd);
    }
    if (reading) {
        for (;;) {
            ssize_t n = recv(fd, buffer, sizeof buffer, 0);
            if (n > 0) {
                if (!got)
                    first = now_ns();
                got += (size_t)n;
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0) {
                int error = errno == EAGAIN ? ETIMEDOUT : errno;
                count_failure(reason_of(error), got, strerror(error));
            } else if (got != expected) {
                count_failure(got < expected ? SHORT : LONG, got, "wrong number of bytes");
            } else {
                eof = now_ns();
            }
            break;
        }
    }
    close(fd);
    printf("ok=%d failures=%" PRIu64, failures == 0, failures);
    for (int r = 0; r < NREASONS; r++)
        printf(" %s=%" PRIu64, REASON_NAMES[r], reasons[r]);
    printf(" connect_us=%.1f first_byte_us=%.1f eof_us=%.1f bytes=%zu cpu_s=%.3f\n",
           connected ? (double)(connected - t0) / 1000.0 : 0.0,
           first ? (double)(first - t0) / 1000.0 : 0.0,
           eof ? (double)(eof - t0) / 1000.0 : 0.0, got, cpu_seconds());
    return failures ? 1 : 0;
}

/* ------------------------------------------------------------------------ */
static void usage(void)
{
    fputs("usage: loadgen -p PORT -b BYTES [-a ADDR] [-c CONCURRENCY] [-n POEMS | -d SECONDS]\n"
          "               [-t TIMEOUT_S] [-s SOURCES] [-H FILE] [-P] [-T [-V 1.3|1.2]] [-1]\n",
          stderr);
    exit(2);
}

static unsigned long long number(const char *text)
{
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 10);
    if (errno || end == text || *end)
        usage();
    return value;
}

static double seconds_arg(const char *text)
{
    char *end;
    double value = strtod(text, &end);
    if (end == text || *end || !(value > 0))
        usage();
    return value;
}

int main(int argc, char **argv)
{
    const char *address = "127.0.0.1";
    unsigned long long port = 0, size = 0;
    int first_byte = 0, use_tls = 0;
    const char *version = NULL;
    int opt;
    while ((opt = getopt(argc, argv, "a:p:b:c:n:d:t:s:H:PTV:1")) != -1) {
        switch (opt) {
        case 'a': address = optarg; break;
        case 'p': port = number(optarg); break;
        case 'b': size = number(optarg); break;
        case 'c': concurrency = (unsigned long)number(optarg); break;
        case 'n': wanted = number(optarg); break;
        case 'd': stop_at = (uint64_t)(seconds_arg(optarg) * 1e9); break;
        case 't': timeout_ns = (uint64_t)(seconds_arg(optarg) * 1e9); break;
        case 's': sources = (unsigned)number(optarg); break;
        case 'H': histogram_path = optarg; break;
        case 'P': proxy_header = 1; break;
        case 'T': use_tls = 1; break;
        case 'V': version = optarg; break;
        case '1': first_byte = 1; break;
        default: usage();
        }
    }
    if (optind != argc || port == 0 || port > 65535 || size == 0 || concurrency == 0
        || sources == 0 || sources > 254)
        usage();
    if (!first_byte && (wanted == 0) == (stop_at == 0))
        usage(); /* exactly one of -n and -d */
    /* -T: steady mode only, without -P; -V only with -T. */
    if ((use_tls && (first_byte || proxy_header)) || (version && !use_tls))
        usage();
    if (version && strcmp(version, "1.3") != 0) {
        if (strcmp(version, "1.2") != 0)
            usage();
        tls_version = TLS1_2_VERSION;
    }
    if (use_tls) {
        tls = tls_context(tls_version);
        /* OpenSSL writes with plain send(): a server that has reset the
         * connection must give a failure to count, not a SIGPIPE. */
        signal(SIGPIPE, SIG_IGN);
    }
    expected = (size_t)size;
    struct sockaddr_in *v4 = (struct sockaddr_in *)&server;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&server;
    if (inet_pton(AF_INET, address, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        server_length = sizeof *v4;
    } else {
        memset(&server, 0, sizeof server); /* what the IPv4 attempt may have left */
        if (inet_pton(AF_INET6, address, &v6->sin6_addr) != 1) {
            fprintf(stderr, "loadgen: not an IPv4 or IPv6 address: %s\n", address);
            return 2;
        }
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        server_length = sizeof *v6;
    }
    if (sources > 1 && server.ss_family != AF_INET) {
        fprintf(stderr, "loadgen: -s spreads over 127.0.0.N: it needs an IPv4 server address\n");
        return 2;
    }
    return first_byte ? run_first_byte() : run_steady();
}
