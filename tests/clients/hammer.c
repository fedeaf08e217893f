/*
 * hammer: a closed-loop load generator for a fast poetry server.
 *
 * Keeps CONCURRENCY connections open at all times (one thread, epoll) and,
 * as each one ends, starts the next, until the COUNT of every MODE is done.
 * Each mode is a kind of client; the ones that read the whole poem compare
 * every byte received with the poem file, at its offset, so a truncated,
 * padded or mixed poem counts as a failure, as does any connection error.
 *
 *   hammer [-c CONCURRENCY] [-p PROGRESS_EVERY] [-t TIMEOUT_S] [-f MAX_FAILED]
 *          [-h ADDR] SMALL_PORT SMALL_FILE BIG_PORT BIG_FILE MODE=COUNT...
 *
 * A client that sees nothing happen for TIMEOUT_S seconds (default 30) has
 * failed.  After MAX_FAILED failures (default: never) no new connection is
 * started, so that a server that hangs or died cannot keep a test waiting for
 * a million timeouts; the tallies then show which counts were not reached.
 *
 * Modes (small: the poem on SMALL_PORT, big: the one on BIG_PORT):
 *   good       small: read to EOF, check every byte
 *   junk       small: send some junk first, then read to EOF and check
 *   halfclose  small: shutdown(SHUT_WR) first, then read to EOF and check
 *   hangup     small: close right after connect(), reading nothing
 *   reset      big:   read part of the poem (checked), then reset (SO_LINGER 0)
 *   big        big:   read to EOF, check every byte
 *   bigjunk    big:   send junk first, then read to EOF and check
 *
 * Progress goes to standard error every PROGRESS_EVERY connections, with the
 * first few failures, each with its reason.  At the end one line goes to
 * standard output, space-separated KEY=VALUE pairs:
 *   connections=N failed=N seconds=S rate=R MODE.done=N MODE.failed=N MODE.bytes=N ...
 * MODE.done counts the clients of that mode that ran, failed ones included;
 * MODE.bytes the poem bytes they received.
 * Exit status: 0 if nothing failed, 1 if something did, 2 for a usage error.
 *
 * Build: gcc -std=c11 -O2 -Wall -Wextra -o hammer hammer.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum mode { GOOD, JUNK, HALFCLOSE, HANGUP, RESET, BIG, BIGJUNK, NMODES };
static const char *const MODE_NAMES[NMODES] = {
    "good", "junk", "halfclose", "hangup", "reset", "big", "bigjunk",
};
/* Which poem each mode asks for: 0 small, 1 big. */
static const int MODE_POEM[NMODES] = {0, 0, 0, 0, 1, 1, 1};

enum state { CONNECTING, SENDING, READING };

struct poem {
    unsigned char *data;
    size_t size;
    struct sockaddr_in addr;
};

struct conn {
    int fd; /* -1: the slot is free */
    enum mode mode;
    enum state state;
    const struct poem *poem;
    unsigned long id;   /* which connection of the run, from 0 */
    size_t got;         /* poem bytes received so far */
    size_t junk_sent;   /* junk bytes sent so far */
    size_t reset_at;    /* RESET: reset once this many bytes came */
    double deadline;    /* give up if nothing happens until then */
};

struct tally {
    unsigned long wanted, started, done, failed;
    unsigned long long bytes;
};

/* Junk that a confused client might send: a request line and some noise.
 * It fits in any socket buffer, so one send() normally takes it all. */
static char junk[2048];
/* One receive buffer for every connection: the loop has one thread. */
static unsigned char buffer[256 * 1024];

static struct poem poems[2];
static struct tally tallies[NMODES];
static unsigned long total, started, finished, failures;
static unsigned long max_failed = (unsigned long)-1;
static double timeout_s = 30.0;
static int epfd;

/* Only the first failures are described; the tallies count them all. */
#define FAILURES_SHOWN 20

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void end(struct conn *c)
{
    close(c->fd);
    c->fd = -1;
    finished++;
}

static void succeed(struct conn *c)
{
    tallies[c->mode].done++;
    end(c);
}

static void fail(struct conn *c, const char *format, ...)
{
    tallies[c->mode].done++;
    tallies[c->mode].failed++;
    if (++failures <= FAILURES_SHOWN) {
        va_list args;
        va_start(args, format);
        fprintf(stderr, "hammer: FAILED %s client #%lu after %zu of %zu bytes: ",
                MODE_NAMES[c->mode], c->id, c->got, c->poem->size);
        vfprintf(stderr, format, args);
        fputc('\n', stderr);
        va_end(args);
    }
    end(c);
}

/* The mode of the next connection.  Every mode gets its exact count, spread
 * evenly over the run: pick the mode furthest behind its share so far. */
static enum mode next_mode(void)
{
    enum mode best = GOOD;
    long double best_lag = -1.0L;
    for (int m = 0; m < NMODES; m++) {
        if (tallies[m].started >= tallies[m].wanted)
            continue;
        long double lag = (long double)tallies[m].wanted * (started + 1) / total
                          - tallies[m].started;
        if (lag > best_lag) {
            best_lag = lag;
            best = (enum mode)m;
        }
    }
    return best;
}

static void watch(struct conn *c, uint32_t events, int op)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0)
        die("epoll_ctl");
}

static void start(struct conn *c)
{
    c->mode = next_mode();
    c->poem = &poems[MODE_POEM[c->mode]];
    c->id = started++;
    tallies[c->mode].started++;
    c->got = 0;
    c->junk_sent = 0;
    /* Anywhere in the poem, from its first byte to its last: early on the
     * server is still sending, late it may have handed everything over. */
    c->reset_at = 1 + (size_t)((c->id * 2654435761UL) % (c->poem->size - 1));
    c->deadline = now() + timeout_s;
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket");
    int rc = connect(c->fd, (const struct sockaddr *)&c->poem->addr, sizeof c->poem->addr);
    if (rc < 0 && errno != EINPROGRESS) {
        fail(c, "connect: %s", strerror(errno));
        return;
    }
    if (c->mode == HANGUP) { /* gone before the server even accepts */
        succeed(c);
        return;
    }
    c->state = CONNECTING;
    watch(c, EPOLLOUT, EPOLL_CTL_ADD);
}

/* Reads what has come; ends the connection at EOF, reset or failure. */
static void receive(struct conn *c)
{
    for (int round = 0; round < 8; round++) { /* then let the others have a turn */
        ssize_t n = recv(c->fd, buffer, sizeof buffer, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return;
            fail(c, "recv: %s", strerror(errno));
            return;
        }
        if (n == 0) {
            if (c->got == c->poem->size)
                succeed(c);
            else
                fail(c, "EOF before the end of the poem");
            return;
        }
        if (c->got + (size_t)n > c->poem->size) {
            fail(c, "%zd bytes more than the poem", (ssize_t)(c->got + (size_t)n - c->poem->size));
            return;
        }
        if (memcmp(buffer, c->poem->data + c->got, (size_t)n) != 0) {
            size_t at = 0;
            while (buffer[at] == c->poem->data[c->got + at])
                at++;
            fail(c, "byte %zu differs from the poem", c->got + at);
            return;
        }
        c->got += (size_t)n;
        tallies[c->mode].bytes += (unsigned long long)n;
        if (c->mode == RESET && c->got >= c->reset_at) {
            /* Linger on, zero timeout: close() sends a reset, not a FIN. */
            struct linger lg = {.l_onoff = 1, .l_linger = 0};
            if (setsockopt(c->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) < 0)
                die("setsockopt SO_LINGER");
            succeed(c);
            return;
        }
    }
}

static void advance(struct conn *c)
{
    c->deadline = now() + timeout_s;
    if (c->state == CONNECTING) {
        int error = 0;
        socklen_t len = sizeof error;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &len) < 0)
            error = errno;
        if (error) {
            fail(c, "connect: %s", strerror(error));
            return;
        }
        if (c->mode == HALFCLOSE && shutdown(c->fd, SHUT_WR) < 0) {
            fail(c, "shutdown: %s", strerror(errno));
            return;
        }
        if (c->mode != JUNK && c->mode != BIGJUNK) {
            c->state = READING;
            watch(c, EPOLLIN, EPOLL_CTL_MOD);
            return;
        }
        c->state = SENDING; /* and writable already: send now */
    }
    if (c->state == SENDING) {
        /* 1 to 2048 bytes of junk, a different length for each client. */
        size_t length = 1 + c->id % sizeof junk;
        ssize_t n = send(c->fd, junk + c->junk_sent, length - c->junk_sent, MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EINTR) {
            fail(c, "send: %s", strerror(errno));
            return;
        }
        if (n > 0)
            c->junk_sent += (size_t)n;
        if (c->junk_sent == length) {
            c->state = READING;
            watch(c, EPOLLIN, EPOLL_CTL_MOD);
        }
        return;
    }
    receive(c);
}

static void load_poem(struct poem *p, const char *host, const char *port, const char *path)
{
    FILE *f = fopen(path, "rb");
    struct stat st;
    if (!f || fstat(fileno(f), &st) < 0)
        die(path);
    p->size = (size_t)st.st_size;
    if (p->size < 2) {
        fprintf(stderr, "hammer: %s: a poem must have at least 2 bytes\n", path);
        exit(2);
    }
    p->data = malloc(p->size);
    if (!p->data || fread(p->data, 1, p->size, f) != p->size)
        die(path);
    fclose(f);
    memset(&p->addr, 0, sizeof p->addr);
    p->addr.sin_family = AF_INET;
    p->addr.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, host, &p->addr.sin_addr) != 1) {
        fprintf(stderr, "hammer: not an IPv4 address: %s\n", host);
        exit(2);
    }
}

/* The mode named by "MODE=COUNT", or -1. */
static int parse_mode(const char *arg)
{
    const char *eq = strchr(arg, '=');
    for (int m = 0; eq && m < NMODES; m++)
        if (strlen(MODE_NAMES[m]) == (size_t)(eq - arg) && strncmp(arg, MODE_NAMES[m], (size_t)(eq - arg)) == 0)
            return m;
    return -1;
}

static void usage(void)
{
    fputs("usage: hammer [-c CONCURRENCY] [-p PROGRESS_EVERY] [-t TIMEOUT_S] [-f MAX_FAILED]\n"
          "              [-h ADDR] SMALL_PORT SMALL_FILE BIG_PORT BIG_FILE MODE=COUNT...\n"
          "modes: good junk halfclose hangup reset big bigjunk\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    unsigned long concurrency = 64, progress = 100000;
    const char *host = "127.0.0.1";
    int opt;
    while ((opt = getopt(argc, argv, "c:p:t:f:h:")) != -1) {
        switch (opt) {
        case 'c': concurrency = strtoul(optarg, NULL, 10); break;
        case 'p': progress = strtoul(optarg, NULL, 10); break;
        case 't': timeout_s = strtod(optarg, NULL); break;
        case 'f': max_failed = strtoul(optarg, NULL, 10); break;
        case 'h': host = optarg; break;
        default: usage();
        }
    }
    if (argc - optind < 5 || concurrency == 0 || progress == 0 || timeout_s <= 0)
        usage();
    load_poem(&poems[0], host, argv[optind], argv[optind + 1]);
    load_poem(&poems[1], host, argv[optind + 2], argv[optind + 3]);
    for (int i = optind + 4; i < argc; i++) {
        int m = parse_mode(argv[i]);
        if (m < 0)
            usage();
        tallies[m].wanted = strtoul(strchr(argv[i], '=') + 1, NULL, 10);
        total += tallies[m].wanted;
    }
    if (total == 0)
        usage();

    for (size_t i = 0; i < sizeof junk; i++) /* a request line, then noise */
        junk[i] = (char)(' ' + (i * 7) % 95);
    memcpy(junk, "GET / HTTP/1.0\r\n", 16);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    struct conn *conns = calloc(concurrency, sizeof *conns);
    if (!conns)
        die("calloc");
    for (unsigned long i = 0; i < concurrency; i++)
        conns[i].fd = -1;

    double began = now(), swept = began;
    unsigned long reported = 0;
    struct epoll_event events[256];
    for (;;) {
        /* Closed loop: every free slot gets the next connection at once. */
        for (unsigned long i = 0; i < concurrency; i++)
            while (conns[i].fd < 0 && started < total && failures < max_failed)
                start(&conns[i]);
        if (started == finished) /* nothing open, and nothing more to start */
            break;
        int n = epoll_wait(epfd, events, 256, 1000);
        if (n < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < n; i++)
            advance(events[i].data.ptr);
        double t = now();
        if (t - swept >= 1.0) { /* a client stuck that long counts as failed */
            swept = t;
            for (unsigned long i = 0; i < concurrency; i++)
                if (conns[i].fd >= 0 && conns[i].deadline < t)
                    fail(&conns[i], "nothing happened for %g s", timeout_s);
        }
        if (finished / progress > reported) {
            reported = finished / progress;
            fprintf(stderr, "hammer: %lu of %lu connections, %.0f/s, %lu failed\n",
                    finished, total, (double)finished / (t - began), failures);
        }
    }
    if (started < total)
        fprintf(stderr, "hammer: gave up after %lu failures, %lu connections not made\n",
                failures, total - started);

    double seconds = now() - began;
    printf("connections=%lu failed=%lu seconds=%.3f rate=%.1f", finished, failures, seconds,
           (double)finished / seconds);
    for (int m = 0; m < NMODES; m++)
        printf(" %s.done=%lu %s.failed=%lu %s.bytes=%llu", MODE_NAMES[m], tallies[m].done,
               MODE_NAMES[m], tallies[m].failed, MODE_NAMES[m], tallies[m].bytes);
    putchar('\n');
    return failures ? 1 : 0;
}
