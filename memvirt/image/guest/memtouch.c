/*
 * memtouch - configurable guest memory workload (part of memvirt).
 *
 * Allocates a "hot" and a "cold" anonymous memory set, fills both once with
 * a chosen content class mix, then loops forever (or --duration seconds):
 * reads the whole hot set (one 64-bit word per 64-byte cache line) and
 * rewrites hot pages at --dirty-rate bytes/s with content of the same class.
 * The cold set is never touched after the fill.
 *
 * Content classes (per 4 KiB page):
 *   random  xorshift bytes, incompressible, unique
 *   text    printable word-like text, compresses roughly 3:1, unique
 *   zero    written with zeros (populated, but all-zero)
 *   dup     copy of one of --dup-groups template pages (identical pages)
 *   mix     page i of a set gets class of slot (i*61) % 100 against the
 *           cumulative percentages of --mix R,T,Z,D (default 40,30,15,15),
 *           so every aligned run of 100 pages holds exactly those counts.
 *
 * Output (stdout, flushed per line):
 *   memtouch ready hot=<bytes> cold=<bytes> content=<c> seed=<n> pid=<pid>
 *                  hot_addr=0x<hex vaddr> cold_addr=0x<hex vaddr, 0x0 if none>
 *   memtouch t=<sec> loops=<hot passes> rate=<passes/s> dirtied=<bytes>
 *   memtouch phase hot=<bytes> hot_addr=0x<hex vaddr>
 * "ready" is printed once both sets are filled; t= is seconds since then
 * (--duration also counts from then).  loops= is the number of completed
 * passes over the hot set; rate= is hot-set passes per second over the last
 * report interval (fractional passes counted); dirtied= is cumulative bytes
 * rewritten (whole pages).  Dirtying debt is capped at one second's worth,
 * so a pause (VM stopped, migration) does not cause a catch-up burst.
 *
 * --counter-file: rewritten in place (pwrite at offset 0, "<passes>\n";
 * the number only grows so no stale digits remain) every 50 ms and at each
 * report.  --phase-file: re-read at every report; a valid size there
 * resizes the hot set (grow = mremap + fill new pages, shrink = stop
 * touching the tail, which stays allocated).  If present at start it
 * overrides --hot.  Missing/invalid content leaves the size unchanged.
 * Mappings are named [anon:memtouch-hot] / [anon:memtouch-cold] when the
 * kernel has CONFIG_ANON_VMA_NAME (best effort).
 * SIGTERM/SIGINT: exit 0.  Bad arguments: usage on stderr, exit 2.
 *
 * Build: gcc -O2 -static -s -Wall -Wextra -o memtouch memtouch.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL
#define WORDS (PAGE / 8)
#define CHUNK_PAGES 64UL

enum { C_RANDOM, C_TEXT, C_ZERO, C_DUP, C_MIX };
static const char *class_names[] = { "random", "text", "zero", "dup", "mix" };

static volatile sig_atomic_t stop_flag;
static volatile uint64_t sink;

/* configuration */
static int content = C_MIX;
static unsigned mix_pct[4] = { 40, 30, 15, 15 };
static unsigned char slot_class[100];
static uint64_t seed = 1;
static uint64_t dup_groups = 16;
static unsigned char *templates;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void usage(const char *msg)
{
    if (msg)
        fprintf(stderr, "memtouch: %s\n", msg);
    fprintf(stderr,
        "usage: memtouch [--hot SIZE] [--cold SIZE] [--dirty-rate SIZE/s]\n"
        "                [--content random|text|zero|dup|mix] [--mix R,T,Z,D]\n"
        "                [--dup-groups N] [--seed N] [--duration SECONDS]\n"
        "                [--report SECONDS] [--phase-file PATH] [--counter-file PATH]\n"
        "  SIZE: integer or decimal with optional K/M/G/T suffix (binary units),\n"
        "        e.g. 64M, 1.5G, 4096.  --dirty-rate also accepts a '/s' suffix.\n"
        "  defaults: --hot 32M --cold 0 --dirty-rate 0 --content mix --mix 40,30,15,15\n"
        "            --dup-groups 16 --seed 1 --duration 0 (forever) --report 1\n");
    exit(2);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int parse_secs(const char *s, double *out)
{
    char *end;

    if (!s || !*s)
        return -1;
    errno = 0;
    *out = strtod(s, &end);
    return (errno || end == s || *end || *out < 0 || *out != *out) ? -1 : 0;
}

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline uint64_t page_key(uint64_t set, uint64_t index, uint64_t gen)
{
    uint64_t k = splitmix64(seed ^ (set << 60));
    k = splitmix64(k ^ index);
    k = splitmix64(k ^ (gen * 0xD1B54A32D192ED03ULL));
    return k | 1; /* non-zero xorshift state */
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void fill_random(unsigned char *p, uint64_t key)
{
    uint64_t *w = (uint64_t *)p;
    uint64_t s = key;
    for (unsigned i = 0; i < WORDS; i++)
        w[i] = xorshift64(&s);
}

/*
 * Word-like printable text: words from a 64-word vocabulary picked uniformly
 * at random, separated by spaces with occasional ',', '.' and newlines.
 * Measured per 4 KiB page: zlib-6 ~2.9:1, zstd-3 ~2.9:1, lz4 ~1.8:1.
 */
static const char *const vocab[] = {
    "the", "memory", "page", "guest", "host", "kernel", "of", "and", "to", "in",
    "is", "for", "with", "that", "this", "on", "as", "by", "an", "be",
    "virtual", "machine", "migration", "snapshot", "balloon", "cache", "dirty",
    "working", "set", "compress", "zero", "table", "frame", "address", "map",
    "read", "write", "thread", "process", "buffer", "block", "device", "queue",
    "system", "data", "value", "state", "time", "run", "copy", "clone", "merge",
    "hot", "cold", "swap", "fault", "tlb", "entry", "index", "node", "list",
    "free", "used", "total",
};
#define NVOCAB (sizeof(vocab) / sizeof(vocab[0]))
static unsigned char vocab_len[NVOCAB];

static void fill_text(unsigned char *p, uint64_t key)
{
    uint64_t s = key;
    size_t pos = 0;

    while (pos < PAGE) {
        uint64_t r = xorshift64(&s);
        const char *w = vocab[(r >> 8) % NVOCAB];
        size_t n = vocab_len[(r >> 8) % NVOCAB];
        unsigned sep = (unsigned)(r & 0x1f);

        if (pos + n > PAGE)
            n = PAGE - pos;
        memcpy(p + pos, w, n);
        pos += n;
        if (pos >= PAGE)
            break;
        if (sep == 0)
            p[pos++] = '.';
        else if (sep == 1)
            p[pos++] = ',';
        if (pos >= PAGE)
            break;
        p[pos++] = (sep == 2) ? '\n' : ' ';
    }
}

static int page_class(uint64_t index)
{
    if (content != C_MIX)
        return content;
    return slot_class[(index * 61) % 100];
}

static void fill_page(unsigned char *p, uint64_t set, uint64_t index, uint64_t gen)
{
    uint64_t key = page_key(set, index, gen);

    switch (page_class(index)) {
    case C_RANDOM:
        fill_random(p, key);
        break;
    case C_TEXT:
        fill_text(p, key);
        break;
    case C_ZERO:
        memset(p, 0, PAGE);
        /* keep the compiler from turning this into nothing */
        __asm__ volatile("" : : "r"(p) : "memory");
        break;
    default:
        memcpy(p, templates + (splitmix64(key) % dup_groups) * PAGE, PAGE);
        break;
    }
}

/* Fill pages [from, to) of a set.  Returns -1 if interrupted by a signal. */
static int fill_range(unsigned char *base, uint64_t set, uint64_t from, uint64_t to)
{
    for (uint64_t i = from; i < to; i++) {
        if ((i & 255) == 0 && stop_flag)
            return -1;
        fill_page(base + i * PAGE, set, i, 0);
    }
    return 0;
}

/* Name the mapping ([anon:NAME] in /proc/PID/maps) if the kernel supports it. */
static void name_mapping(void *p, size_t len, const char *name)
{
#ifndef PR_SET_VMA
#define PR_SET_VMA 0x53564d41
#define PR_SET_VMA_ANON_NAME 0
#endif
    if (p && len)
        prctl(PR_SET_VMA, PR_SET_VMA_ANON_NAME, (unsigned long)p, len,
              (unsigned long)name);
}

static void *map_anon(size_t len, const char *name)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    name_mapping(p, len, name);
    return p;
}

static void write_counter(int fd, uint64_t v)
{
    char buf[32];
    int n;

    if (fd < 0)
        return;
    /* The value only grows, so the new text is never shorter than the old. */
    n = snprintf(buf, sizeof(buf), "%llu\n", (unsigned long long)v);
    if (pwrite(fd, buf, (size_t)n, 0) != n) {
        /* ignore: progress reporting is best effort */
    }
}

/* Returns 1 and sets *pages if the phase file holds a valid size. */
static int read_phase(const char *path, uint64_t *pages)
{
    char buf[64];
    ssize_t n;
    uint64_t bytes;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0)
        return 0;
    n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' ' ||
                     buf[n - 1] == '\r' || buf[n - 1] == '\t'))
        buf[--n] = 0;
    if (parse_size(buf, &bytes, 0))
        return 0;
    *pages = (bytes + PAGE - 1) / PAGE;
    return 1;
}

int main(int argc, char **argv)
{
    uint64_t hot_bytes = 32ULL << 20, cold_bytes = 0, rate = 0;
    double duration = 0, report = 1;
    const char *phase_file = NULL, *counter_file = NULL;
    struct sigaction sa;

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = (i + 1 < argc) ? argv[i + 1] : NULL;
        int ok = 0;

        if (!strcmp(a, "-h") || !strcmp(a, "--help"))
            usage(NULL);
        static const char *const known[] = {
            "--hot", "--cold", "--dirty-rate", "--content", "--mix", "--dup-groups",
            "--seed", "--duration", "--report", "--phase-file", "--counter-file",
        };
        int is_known = 0;
        for (size_t k = 0; k < sizeof(known) / sizeof(known[0]); k++)
            is_known |= !strcmp(a, known[k]);
        if (!is_known) {
            fprintf(stderr, "memtouch: unknown option '%s'\n", a);
            usage(NULL);
        }
        if (!v) {
            fprintf(stderr, "memtouch: missing value for %s\n", a);
            usage(NULL);
        }
        if (!strcmp(a, "--hot"))
            ok = !parse_size(v, &hot_bytes, 0);
        else if (!strcmp(a, "--cold"))
            ok = !parse_size(v, &cold_bytes, 0);
        else if (!strcmp(a, "--dirty-rate"))
            ok = !parse_size(v, &rate, 1);
        else if (!strcmp(a, "--content")) {
            for (int c = 0; c <= C_MIX; c++)
                if (!strcmp(v, class_names[c])) {
                    content = c;
                    ok = 1;
                }
        } else if (!strcmp(a, "--mix")) {
            unsigned r, t, z, d;
            char extra;
            if (sscanf(v, "%u,%u,%u,%u%c", &r, &t, &z, &d, &extra) == 4 &&
                r + t + z + d == 100 && r <= 100 && t <= 100 && z <= 100 && d <= 100) {
                mix_pct[0] = r; mix_pct[1] = t; mix_pct[2] = z; mix_pct[3] = d;
                ok = 1;
            }
        } else if (!strcmp(a, "--dup-groups"))
            ok = !parse_u64(v, &dup_groups) && dup_groups >= 1 && dup_groups <= (1U << 20);
        else if (!strcmp(a, "--seed"))
            ok = !parse_u64(v, &seed);
        else if (!strcmp(a, "--duration"))
            ok = !parse_secs(v, &duration);
        else if (!strcmp(a, "--report"))
            ok = !parse_secs(v, &report) && report > 0;
        else if (!strcmp(a, "--phase-file"))
            ok = (phase_file = v) != NULL && *v;
        else if (!strcmp(a, "--counter-file"))
            ok = (counter_file = v) != NULL && *v;
        if (!ok) {
            fprintf(stderr, "memtouch: bad value '%s' for %s\n", v, a);
            usage(NULL);
        }
        i++;
    }

    /* mix slot table */
    {
        unsigned s = 0;
        for (int c = 0; c < 4; c++)
            for (unsigned k = 0; k < mix_pct[c]; k++)
                slot_class[s++] = (unsigned char)c;
    }
    for (size_t i = 0; i < NVOCAB; i++)
        vocab_len[i] = (unsigned char)strlen(vocab[i]);

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    templates = map_anon(dup_groups * PAGE, "memtouch-templates");
    if (!templates) {
        fprintf(stderr, "memtouch: out of memory for dup templates\n");
        return 1;
    }
    for (uint64_t t = 0; t < dup_groups; t++)
        fill_random(templates + t * PAGE, page_key(3, t, 0));

    uint64_t hot_alloc = (hot_bytes + PAGE - 1) / PAGE;
    uint64_t cold_pages = (cold_bytes + PAGE - 1) / PAGE;
    unsigned char *hot = NULL, *cold = NULL;

    if (phase_file) {
        uint64_t p;
        if (read_phase(phase_file, &p))
            hot_alloc = p;
    }
    uint64_t active = hot_alloc;

    if (hot_alloc && !(hot = map_anon(hot_alloc * PAGE, "memtouch-hot"))) {
        fprintf(stderr, "memtouch: cannot allocate hot set (%llu bytes): %s\n",
                (unsigned long long)(hot_alloc * PAGE), strerror(errno));
        return 1;
    }
    if (cold_pages && !(cold = map_anon(cold_pages * PAGE, "memtouch-cold"))) {
        fprintf(stderr, "memtouch: cannot allocate cold set (%llu bytes): %s\n",
                (unsigned long long)(cold_pages * PAGE), strerror(errno));
        return 1;
    }
    if (fill_range(cold, 2, 0, cold_pages) || fill_range(hot, 1, 0, hot_alloc))
        return 0;

    int cfd = -1;
    if (counter_file) {
        cfd = open(counter_file, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (cfd < 0) {
            fprintf(stderr, "memtouch: cannot open counter file %s: %s\n",
                    counter_file, strerror(errno));
            return 1;
        }
        write_counter(cfd, 0);
    }

    printf("memtouch ready hot=%llu cold=%llu content=%s seed=%llu pid=%d"
           " hot_addr=0x%llx cold_addr=0x%llx\n",
           (unsigned long long)(active * PAGE), (unsigned long long)(cold_pages * PAGE),
           class_names[content], (unsigned long long)seed, (int)getpid(),
           (unsigned long long)(uintptr_t)hot, (unsigned long long)(uintptr_t)cold);
    fflush(stdout);

    double t0 = now_s(), now = t0;
    double next_report = t0 + report;
    double end = duration > 0 ? t0 + duration : 0;
    double last_counter = t0;
    uint64_t pos = 0, passes = 0, dirtied = 0, skipped = 0;
    uint64_t pages_read = 0, last_pages_read = 0;
    double last_report = t0;
    uint64_t rng = page_key(4, 0, 0);
    /* at most one second worth (and at least one page) of dirtying debt */
    uint64_t max_debt = rate / PAGE > 0 ? rate / PAGE : 1;
    uint64_t acc = 0;

    while (!stop_flag) {
        if (active) {
            uint64_t n = active - pos < CHUNK_PAGES ? active - pos : CHUNK_PAGES;
            const uint64_t *w = (const uint64_t *)(hot + pos * PAGE);
            for (uint64_t k = 0; k < n * WORDS; k += 8)
                acc += w[k];
            pos += n;
            pages_read += n;
            if (pos >= active) {
                pos = 0;
                passes++;
            }
        } else {
            struct timespec ts = { 0, 10 * 1000 * 1000 };
            nanosleep(&ts, NULL);
        }

        now = now_s();

        if (rate && active) {
            uint64_t target = (uint64_t)((now - t0) * (double)rate / (double)PAGE) - skipped;
            if (target > dirtied + max_debt) {
                skipped += target - dirtied - max_debt;
                target = dirtied + max_debt;
            }
            while (dirtied < target && !stop_flag) {
                uint64_t idx = xorshift64(&rng) % active;
                dirtied++;
                fill_page(hot + idx * PAGE, 1, idx, dirtied);
            }
        }

        if (cfd >= 0 && now - last_counter >= 0.05) {
            write_counter(cfd, passes);
            last_counter = now;
        }

        if (now >= next_report) {
            double dt = now - last_report;
            double prate = (active && dt > 0)
                ? (double)(pages_read - last_pages_read) / (double)active / dt : 0.0;
            printf("memtouch t=%.1f loops=%llu rate=%.2f dirtied=%llu\n",
                   now - t0, (unsigned long long)passes, prate,
                   (unsigned long long)(dirtied * PAGE));
            fflush(stdout);
            sink = acc;
            last_report = now;
            last_pages_read = pages_read;
            next_report += report;
            if (next_report <= now)
                next_report = now + report;
            write_counter(cfd, passes);
            last_counter = now;

            uint64_t want;
            if (phase_file && read_phase(phase_file, &want) && want != active) {
                if (want > hot_alloc) {
                    unsigned char *np = hot
                        ? mremap(hot, hot_alloc * PAGE, want * PAGE, MREMAP_MAYMOVE)
                        : mmap(NULL, want * PAGE, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                    if (np == MAP_FAILED) {
                        fprintf(stderr, "memtouch: cannot grow hot set to %llu bytes: %s\n",
                                (unsigned long long)(want * PAGE), strerror(errno));
                        want = active;
                    } else {
                        hot = np;
                        name_mapping(hot, want * PAGE, "memtouch-hot");
                        if (fill_range(hot, 1, hot_alloc, want))
                            break;
                        hot_alloc = want;
                    }
                }
                if (want != active) {
                    active = want;
                    if (pos >= active)
                        pos = 0;
                    printf("memtouch phase hot=%llu hot_addr=0x%llx\n",
                           (unsigned long long)(active * PAGE),
                           (unsigned long long)(uintptr_t)hot);
                    fflush(stdout);
                }
            }
        }

        if (end && now >= end)
            break;
    }

    sink = acc;
    write_counter(cfd, passes);
    if (cfd >= 0)
        close(cfd);
    return 0;
}
