/* A userspace WAN link for the benchmark, used where the kernel has no sch_netem.

   usage: delayline HOST_TAP NS_TAP RATE_BPS DELAY_US LOSS_NS_TO_HOST LOSS_HOST_TO_NS LIMIT [SEED]

   Creates two TAP devices (IFF_TAP|IFF_NO_PI) and forwards Ethernet frames between them. Each direction
   is a FIFO link: a frame of n bytes (Ethernet header included, as netem's rate counts it) occupies the
   link n*8/RATE_BPS seconds after the previous frame has left, then arrives DELAY_US later (propagation).
   Frames beyond LIMIT queued in one direction (serialising or in flight) are dropped (drop-tail); each
   frame is lost at random with the direction's probability (0.001 = 0.1%) before it is queued.
   Prints "ready" on stdout once both devices exist; exits when stdin closes or on SIGTERM/SIGINT, which
   closes the devices (the kernel then deletes them, also the one moved into another namespace).
   On exit prints per-direction counters on stderr. No busy loop: ppoll() with a timeout to the next
   delivery, CLOCK_MONOTONIC. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define SLOT 2048 /* frames up to an MTU of 1500 + header fit; larger ones are counted and dropped */

struct frame {
    int64_t due_ns; /* when it reaches the far end */
    uint32_t len;
    unsigned char data[SLOT];
};

struct dir {
    const char *name;
    int in_fd, out_fd;
    double loss;
    struct frame *ring;
    size_t head, count, limit;
    int64_t link_free_ns; /* when the link finishes serialising the last queued frame */
    uint64_t rx, lost, tail_dropped, oversize, delivered, write_failed, bytes;
};

static volatile sig_atomic_t stop;
static double rate_bps;
static int64_t delay_ns;
static uint64_t rng_state;

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double uniform(void) { /* xorshift64*, in [0, 1) */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1DULL) >> 11) / 9007199254740992.0;
}

static int tap_open(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        perror("delayline: open /dev/net/tun");
        exit(1);
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        fprintf(stderr, "delayline: cannot create TAP device %s: %s\n", name, strerror(errno));
        exit(1);
    }
    return fd;
}

/* Reads every frame waiting on d->in_fd into the link's queue. */
static void intake(struct dir *d, int64_t now) {
    unsigned char buf[65536];
    for (int i = 0; i < 256; i++) {
        ssize_t n = read(d->in_fd, buf, sizeof buf);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) return;
            fprintf(stderr, "delayline: read on %s failed: %s\n", d->name, strerror(errno));
            stop = 1;
            return;
        }
        if (n == 0) return;
        d->rx++;
        if ((size_t)n > SLOT) {
            d->oversize++;
            continue;
        }
        if (d->loss > 0 && uniform() < d->loss) {
            d->lost++;
            continue;
        }
        if (d->count >= d->limit) {
            d->tail_dropped++;
            continue;
        }
        int64_t start = d->link_free_ns > now ? d->link_free_ns : now;
        int64_t done = start + (int64_t)((double)n * 8.0 * 1e9 / rate_bps + 0.5);
        d->link_free_ns = done;
        struct frame *f = &d->ring[(d->head + d->count) % d->limit];
        f->due_ns = done + delay_ns;
        f->len = (uint32_t)n;
        memcpy(f->data, buf, (size_t)n);
        d->count++;
    }
}

/* Writes out every frame whose time has come; returns the time of the next one (or -1). */
static int64_t deliver(struct dir *d, int64_t now) {
    while (d->count > 0) {
        struct frame *f = &d->ring[d->head];
        if (f->due_ns > now) return f->due_ns;
        if (write(d->out_fd, f->data, f->len) < 0)
            d->write_failed++;
        else {
            d->delivered++;
            d->bytes += f->len;
        }
        d->head = (d->head + 1) % d->limit;
        d->count--;
    }
    return -1;
}

int main(int argc, char **argv) {
    if (argc < 8) {
        fprintf(stderr, "usage: %s HOST_TAP NS_TAP RATE_BPS DELAY_US LOSS_NS_TO_HOST LOSS_HOST_TO_NS LIMIT [SEED]\n",
                argv[0]);
        return 2;
    }
    rate_bps = atof(argv[3]);
    delay_ns = (int64_t)(atof(argv[4]) * 1000.0);
    size_t limit = (size_t)atol(argv[7]);
    rng_state = argc > 8 ? strtoull(argv[8], NULL, 0) : ((uint64_t)now_ns() ^ ((uint64_t)getpid() << 32));
    if (rng_state == 0) rng_state = 0x9E3779B97F4A7C15ULL;
    if (rate_bps <= 0 || delay_ns < 0 || limit == 0) {
        fprintf(stderr, "delayline: RATE_BPS and LIMIT must be positive, DELAY_US not negative\n");
        return 2;
    }
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake-ups to the microsecond, not the default 50 us */

    sigset_t block, empty;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigprocmask(SIG_BLOCK, &block, NULL);
    sigemptyset(&empty);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int host_fd = tap_open(argv[1]), ns_fd = tap_open(argv[2]);
    struct dir dirs[2] = {
        {.name = argv[2], .in_fd = ns_fd, .out_fd = host_fd, .loss = atof(argv[5]), .limit = limit},
        {.name = argv[1], .in_fd = host_fd, .out_fd = ns_fd, .loss = atof(argv[6]), .limit = limit},
    };
    for (int i = 0; i < 2; i++) {
        dirs[i].ring = malloc(limit * sizeof(struct frame));
        if (dirs[i].ring == NULL) {
            fprintf(stderr, "delayline: cannot allocate a queue of %zu frames\n", limit);
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);

    while (!stop) {
        int64_t now = now_ns(), next = -1;
        for (int i = 0; i < 2; i++) {
            int64_t t = deliver(&dirs[i], now);
            if (t >= 0 && (next < 0 || t < next)) next = t;
        }
        struct pollfd p[3] = {
            {.fd = ns_fd, .events = POLLIN},
            {.fd = host_fd, .events = POLLIN},
            {.fd = 0, .events = POLLIN},
        };
        struct timespec ts, *tsp = NULL;
        if (next >= 0) {
            int64_t wait = next - now_ns();
            if (wait < 0) wait = 0;
            ts.tv_sec = wait / 1000000000LL;
            ts.tv_nsec = wait % 1000000000LL;
            tsp = &ts;
        }
        int r = ppoll(p, 3, tsp, &empty);
        if (r < 0) {
            if (errno == EINTR) continue;
            perror("delayline: ppoll");
            break;
        }
        if (p[2].revents) {
            char c[256];
            ssize_t n = read(0, c, sizeof c);
            if (n <= 0) break; /* the benchmark closed our stdin (or exited) */
        }
        now = now_ns();
        if (p[0].revents & POLLIN) intake(&dirs[0], now);
        if (p[1].revents & POLLIN) intake(&dirs[1], now);
        if ((p[0].revents | p[1].revents) & (POLLERR | POLLHUP | POLLNVAL)) {
            fprintf(stderr, "delayline: a TAP device went away\n");
            break;
        }
    }
    for (int i = 0; i < 2; i++) {
        struct dir *d = &dirs[i];
        fprintf(stderr,
                "delayline: from %s: %llu frames read, %llu lost at random, %llu dropped (queue full), "
                "%llu oversize, %llu delivered (%llu bytes), %llu write failures\n",
                d->name, (unsigned long long)d->rx, (unsigned long long)d->lost,
                (unsigned long long)d->tail_dropped, (unsigned long long)d->oversize,
                (unsigned long long)d->delivered, (unsigned long long)d->bytes,
                (unsigned long long)d->write_failed);
    }
    close(host_fd);
    close(ns_fd);
    return 0;
}
