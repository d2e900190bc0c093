/*
 * datacheck - write known data into anonymous memory and re-verify it on
 * request (part of memvirt).
 *
 *   datacheck write --size SIZE --seed N --state PATH
 *       Fills SIZE (rounded up to 4 KiB pages) with a pattern derived from
 *       (seed, page index), then writes its pid to PATH (atomically, via
 *       rename; PATH appearing means "ready") and prints
 *         datacheck ready pages=<n> pid=<pid> addr=0x<vaddr of the buffer>
 *       Runs in the foreground until SIGTERM/SIGINT/SIGHUP (exit 0, PATH
 *       removed).  On every SIGUSR1 it re-verifies all pages and atomically
 *       replaces PATH.result with
 *         OK seq=<k> pages=<n> start_ns=<t>
 *         BAD seq=<k> pages=<n> first_bad_page=<i> bad_pages=<m> start_ns=<t>
 *       seq counts verifications (1, 2, ...); start_ns is CLOCK_MONOTONIC
 *       (ns) when the verification started, i.e. after the signal arrived.
 *
 *   datacheck verify --state PATH [--timeout SECONDS]
 *       Sends SIGUSR1 to the pid in PATH and waits for a PATH.result whose
 *       start_ns is not older than the request, prints that line and exits
 *       0 on OK, 1 on BAD, 2 on error or timeout (default 120 s).
 *
 * Pattern (so other tools can regenerate it): for page p,
 *   s = splitmix64(splitmix64(seed) ^ p) | 1, then the page's 512 64-bit
 *   little-endian words are successive xorshift64 outputs
 *   (s ^= s << 13; s ^= s >> 7; s ^= s << 17; word = s).
 *   splitmix64(x): x += 0x9E3779B97F4A7C15; x = (x ^ x>>30) * 0xBF58476D1CE4E5B9;
 *   x = (x ^ x>>27) * 0x94D049BB133111EB; return x ^ x>>31.
 *
 * Build: gcc -O2 -static -s -Wall -Wextra -o datacheck datacheck.c
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
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL
#define WORDS (PAGE / 8)

static void usage(const char *msg)
{
    if (msg)
        fprintf(stderr, "datacheck: %s\n", msg);
    fprintf(stderr,
        "usage: datacheck write --size SIZE --seed N --state PATH\n"
        "       datacheck verify --state PATH [--timeout SECONDS]\n"
        "  SIZE: integer or decimal with optional K/M/G suffix (binary units)\n"
        "  verify exit status: 0 OK, 1 BAD, 2 error/timeout\n");
    exit(2);
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static inline uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline uint64_t page_state(uint64_t seed_mixed, uint64_t page)
{
    return splitmix64(seed_mixed ^ page) | 1;
}

static void fill_page(uint64_t *w, uint64_t s)
{
    for (unsigned i = 0; i < WORDS; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w[i] = s;
    }
}

/* Returns non-zero if the page differs from its pattern. */
static uint64_t check_page(const uint64_t *w, uint64_t s)
{
    uint64_t diff = 0;
    for (unsigned i = 0; i < WORDS; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        diff |= w[i] ^ s;
    }
    return diff;
}

/* Atomically write text to path via a temp file + rename. */
static int write_atomic(const char *path, const char *text)
{
    char tmp[4096];
    int fd;
    size_t len = strlen(text);

    if (snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof(tmp))
        return -1;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    if (write(fd, text, len) != (ssize_t)len) {
        close(fd);
        unlink(tmp);
        return -1;
    }
    close(fd);
    if (rename(tmp, path)) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

static int cmd_write(uint64_t size, uint64_t seed, const char *state)
{
    char result_path[4096], line[256];
    uint64_t pages = (size + PAGE - 1) / PAGE;
    uint64_t seed_mixed = splitmix64(seed);
    uint64_t seq = 0;
    sigset_t set;
    uint64_t *mem;

    if (snprintf(result_path, sizeof(result_path), "%s.result", state) >= (int)sizeof(result_path)) {
        fprintf(stderr, "datacheck: state path too long\n");
        return 2;
    }
    /* Handle signals synchronously; block them before anything else. */
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigprocmask(SIG_BLOCK, &set, NULL);

    unlink(result_path);
    mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        fprintf(stderr, "datacheck: cannot allocate %llu bytes: %s\n",
                (unsigned long long)(pages * PAGE), strerror(errno));
        return 2;
    }
    for (uint64_t p = 0; p < pages; p++)
        fill_page(mem + p * WORDS, page_state(seed_mixed, p));

    snprintf(line, sizeof(line), "%d\n", (int)getpid());
    if (write_atomic(state, line)) {
        fprintf(stderr, "datacheck: cannot write state file %s: %s\n", state, strerror(errno));
        return 2;
    }
    printf("datacheck ready pages=%llu pid=%d addr=0x%llx\n", (unsigned long long)pages,
           (int)getpid(), (unsigned long long)(uintptr_t)mem);
    fflush(stdout);

    for (;;) {
        siginfo_t si;
        int sig = sigwaitinfo(&set, &si);

        if (sig < 0)
            continue;
        if (sig != SIGUSR1)
            break;

        uint64_t start = mono_ns();
        uint64_t bad = 0, first_bad = 0;
        for (uint64_t p = 0; p < pages; p++) {
            if (check_page(mem + p * WORDS, page_state(seed_mixed, p))) {
                if (!bad)
                    first_bad = p;
                bad++;
            }
        }
        seq++;
        if (bad)
            snprintf(line, sizeof(line),
                     "BAD seq=%llu pages=%llu first_bad_page=%llu bad_pages=%llu start_ns=%llu\n",
                     (unsigned long long)seq, (unsigned long long)pages,
                     (unsigned long long)first_bad, (unsigned long long)bad,
                     (unsigned long long)start);
        else
            snprintf(line, sizeof(line), "OK seq=%llu pages=%llu start_ns=%llu\n",
                     (unsigned long long)seq, (unsigned long long)pages,
                     (unsigned long long)start);
        if (write_atomic(result_path, line))
            fprintf(stderr, "datacheck: cannot write %s: %s\n", result_path, strerror(errno));
    }
    unlink(state);
    return 0;
}

static int read_small(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t n;

    if (fd < 0)
        return -1;
    n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0)
        return -1;
    buf[n] = 0;
    return (int)n;
}

static int cmd_verify(const char *state, double timeout)
{
    char result_path[4096], buf[512];
    uint64_t pid64;
    pid_t pid;
    uint64_t req;
    unsigned delay_us = 2000;

    if (snprintf(result_path, sizeof(result_path), "%s.result", state) >= (int)sizeof(result_path)) {
        fprintf(stderr, "datacheck: state path too long\n");
        return 2;
    }
    if (read_small(state, buf, sizeof(buf)) < 0) {
        fprintf(stderr, "datacheck: cannot read state file %s: %s\n", state, strerror(errno));
        return 2;
    }
    buf[strcspn(buf, "\r\n")] = 0;
    if (parse_u64(buf, &pid64) || pid64 < 2 || pid64 > 0x7fffffff) {
        fprintf(stderr, "datacheck: state file %s does not hold a pid\n", state);
        return 2;
    }
    pid = (pid_t)pid64;

    req = mono_ns();
    if (kill(pid, SIGUSR1)) {
        fprintf(stderr, "datacheck: cannot signal pid %d: %s\n", (int)pid, strerror(errno));
        return 2;
    }
    for (;;) {
        if (read_small(result_path, buf, sizeof(buf)) > 0) {
            const char *p = strstr(buf, "start_ns=");
            unsigned long long start;
            if (p && sscanf(p, "start_ns=%llu", &start) == 1 && start >= req) {
                fputs(buf, stdout);
                fflush(stdout);
                if (!strncmp(buf, "OK ", 3))
                    return 0;
                if (!strncmp(buf, "BAD ", 4))
                    return 1;
                fprintf(stderr, "datacheck: malformed result line\n");
                return 2;
            }
        }
        if (kill(pid, 0) && errno == ESRCH) {
            fprintf(stderr, "datacheck: writer pid %d exited before answering\n", (int)pid);
            return 2;
        }
        if ((double)(mono_ns() - req) * 1e-9 >= timeout) {
            fprintf(stderr, "datacheck: timeout after %.1f s waiting for %s\n", timeout, result_path);
            return 2;
        }
        usleep(delay_us);
        if (delay_us < 100000)
            delay_us *= 2;
    }
}

int main(int argc, char **argv)
{
    const char *state = NULL;
    uint64_t size = 0, seed = 0;
    int have_size = 0, have_seed = 0;
    double timeout = 120;
    int mode;

    if (argc < 2)
        usage(NULL);
    if (!strcmp(argv[1], "write"))
        mode = 0;
    else if (!strcmp(argv[1], "verify"))
        mode = 1;
    else if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help"))
        usage(NULL);
    else
        usage("unknown command");

    for (int i = 2; i < argc; i += 2) {
        const char *a = argv[i], *v = (i + 1 < argc) ? argv[i + 1] : NULL;
        int ok = 0, known = 1;

        if (mode == 0 && !strcmp(a, "--size")) {
            ok = v && !parse_size(v, &size, 0) && size > 0;
            have_size = 1;
        } else if (mode == 0 && !strcmp(a, "--seed")) {
            ok = v && !parse_u64(v, &seed);
            have_seed = 1;
        } else if (!strcmp(a, "--state"))
            ok = v && *(state = v);
        else if (mode == 1 && !strcmp(a, "--timeout")) {
            char *end;
            if (v) {
                errno = 0;
                timeout = strtod(v, &end);
                ok = !errno && end != v && !*end && timeout >= 0;
            }
        } else
            known = 0;
        if (!known) {
            fprintf(stderr, "datacheck: unknown option '%s'\n", a);
            usage(NULL);
        }
        if (!ok) {
            fprintf(stderr, "datacheck: bad or missing value for %s\n", a);
            usage(NULL);
        }
    }
    if (!state)
        usage("--state is required");
    if (mode == 0) {
        if (!have_size || !have_seed)
            usage("write needs --size and --seed");
        return cmd_write(size, seed, state);
    }
    return cmd_verify(state, timeout);
}
