/*
 * physaddr - fill pages with recognizable content and report their
 * guest-physical frame numbers (part of memvirt).
 *
 *   physaddr mark --pages N --seed S [--hold] [--dump-file PATH]
 *
 * Output (stdout), one line per page, then a terminator:
 *   <index> 0x<pfn hex> <fnv1a64 of the 4096 bytes, 16 hex digits>
 *   READY
 * pfn 0x0 means the PFN is unknown (no CAP_SYS_ADMIN or page not present);
 * a warning is printed on stderr in that case.  With --hold the process
 * then keeps the pages mapped (mlocked if possible) until SIGTERM/SIGINT
 * (exit 0); SIGUSR1 re-reads pagemap and prints the lines + READY again.
 * --dump-file writes the N*4096 page bytes, in index order, to PATH.
 *
 * Page content for (seed S, index i), 4096 bytes:
 *   bytes 0..23   ASCII "MEMVIRT_" + "%08x" (S & 0xffffffff) + "%08x" (i)
 *   bytes 24..4095  509 64-bit little-endian words: with
 *     st = (S ^ (0xD1B54A32D192ED03 * (i + 1))) mod 2^64, for each word
 *     st += 0x9E3779B97F4A7C15; z = st;
 *     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;
 *     z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
 *     word = z ^ (z >> 31)            (all arithmetic mod 2^64)
 * Hash: FNV-1a 64 over the 4096 bytes:
 *   h = 0xcbf29ce484222325; for each byte b: h ^= b; h = (h * 0x100000001b3) mod 2^64
 *
 * Build: gcc -O2 -static -s -Wall -Wextra -o physaddr physaddr.c
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
#include <unistd.h>

#include "common.h"

#define PAGE 4096UL
#define PFN_MASK ((1ULL << 55) - 1)
#define PM_PRESENT (1ULL << 63)

static void usage(const char *msg)
{
    if (msg)
        fprintf(stderr, "physaddr: %s\n", msg);
    fprintf(stderr,
        "usage: physaddr mark --pages N --seed S [--hold] [--dump-file PATH]\n"
        "  prints '<index> 0x<pfn> <fnv1a64-hex>' per page, then READY\n");
    exit(2);
}

static void fill_page(unsigned char *p, uint64_t seed, uint64_t index)
{
    char tag[32];
    uint64_t st = seed ^ (0xD1B54A32D192ED03ULL * (index + 1));

    snprintf(tag, sizeof(tag), "MEMVIRT_%08x%08x",
             (unsigned)(seed & 0xffffffffu), (unsigned)(index & 0xffffffffu));
    memcpy(p, tag, 24);
    for (unsigned off = 24; off < PAGE; off += 8) {
        uint64_t z;
        st += 0x9E3779B97F4A7C15ULL;
        z = st;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        z ^= z >> 31;
        for (int b = 0; b < 8; b++)
            p[off + b] = (unsigned char)(z >> (8 * b));
    }
}

static uint64_t fnv1a64(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

/* Print the per-page lines and READY.  Returns the number of unknown PFNs. */
static uint64_t report(const unsigned char *mem, uint64_t pages)
{
    uint64_t *ent = calloc(pages, sizeof(uint64_t));
    uint64_t unknown = 0;
    int fd;

    if (!ent) {
        fprintf(stderr, "physaddr: out of memory\n");
        exit(1);
    }
    fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        fprintf(stderr, "physaddr: cannot open /proc/self/pagemap: %s\n", strerror(errno));
    } else {
        size_t want = pages * sizeof(uint64_t);
        off_t off = (off_t)((uintptr_t)mem / PAGE * sizeof(uint64_t));
        ssize_t n = pread(fd, ent, want, off);
        if (n != (ssize_t)want)
            fprintf(stderr, "physaddr: short read from /proc/self/pagemap\n");
        close(fd);
    }
    for (uint64_t i = 0; i < pages; i++) {
        uint64_t pfn = (ent[i] & PM_PRESENT) ? (ent[i] & PFN_MASK) : 0;
        if (!pfn)
            unknown++;
        printf("%llu 0x%llx %016llx\n", (unsigned long long)i, (unsigned long long)pfn,
               (unsigned long long)fnv1a64(mem + i * PAGE, PAGE));
    }
    printf("READY\n");
    fflush(stdout);
    if (unknown)
        fprintf(stderr, "physaddr: warning: %llu page(s) with unknown PFN "
                "(need root/CAP_SYS_ADMIN to read PFNs from pagemap)\n",
                (unsigned long long)unknown);
    free(ent);
    return unknown;
}

int main(int argc, char **argv)
{
    uint64_t pages = 0, seed = 0;
    int have_pages = 0, have_seed = 0, hold = 0;
    const char *dump = NULL;
    unsigned char *mem;
    size_t len;
    sigset_t set;

    if (argc < 2 || strcmp(argv[1], "mark"))
        usage(argc < 2 ? NULL : "unknown command (only 'mark' is supported)");
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = (i + 1 < argc) ? argv[i + 1] : NULL;
        if (!strcmp(a, "--hold")) {
            hold = 1;
            continue;
        }
        if (!strcmp(a, "--pages")) {
            if (!v || parse_u64(v, &pages) || pages == 0 || pages > (1ULL << 28))
                usage("bad or missing value for --pages");
            have_pages = 1;
        } else if (!strcmp(a, "--seed")) {
            if (!v || parse_u64(v, &seed))
                usage("bad or missing value for --seed");
            have_seed = 1;
        } else if (!strcmp(a, "--dump-file")) {
            if (!v || !*v)
                usage("missing value for --dump-file");
            dump = v;
        } else {
            fprintf(stderr, "physaddr: unknown option '%s'\n", a);
            usage(NULL);
        }
        i++;
    }
    if (!have_pages || !have_seed)
        usage("--pages and --seed are required");
    if (sysconf(_SC_PAGESIZE) != (long)PAGE) {
        fprintf(stderr, "physaddr: page size is not 4096\n");
        return 1;
    }

    /* Block the signals we wait for; SIGTERM/SIGINT/SIGUSR1 are taken synchronously. */
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);

    len = pages * PAGE;
    mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
        fprintf(stderr, "physaddr: cannot allocate %zu bytes: %s\n", len, strerror(errno));
        return 1;
    }
    /* 4 KiB pages only, so khugepaged never collapses (= moves) them. */
    madvise(mem, len, MADV_NOHUGEPAGE);
    for (uint64_t i = 0; i < pages; i++)
        fill_page(mem + i * PAGE, seed, i);
    if (mlock(mem, len))
        fprintf(stderr, "physaddr: warning: mlock failed: %s\n", strerror(errno));

    if (dump) {
        int fd = open(dump, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        size_t done = 0;
        if (fd < 0) {
            fprintf(stderr, "physaddr: cannot create %s: %s\n", dump, strerror(errno));
            return 1;
        }
        while (done < len) {
            ssize_t n = write(fd, mem + done, len - done);
            if (n <= 0) {
                fprintf(stderr, "physaddr: write to %s failed: %s\n", dump, strerror(errno));
                return 1;
            }
            done += (size_t)n;
        }
        close(fd);
    }

    report(mem, pages);
    if (!hold)
        return 0;

    for (;;) {
        int sig;
        if (sigwait(&set, &sig))
            continue;
        if (sig == SIGUSR1)
            report(mem, pages);
        else
            break;
    }
    return 0;
}
