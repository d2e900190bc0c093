/*
 * memsnap - print the guest's own memory figures, then hold still.
 *
 *   memsnap [--delay MS] [--out PATH] [FILE...]
 *   (default files: /proc/meminfo /proc/vmstat /proc/zoneinfo; default delay 300 ms)
 *
 * Waits --delay first, so the shells that started it have exited. Then reads the files into a buffer that was touched before the first read, writes them to PATH
 * (default /dev/ttyS0) between "MEMSNAP-BEGIN <n>" and "MEMSNAP-END <n>" lines, then sleeps
 * in pause() until killed. Staying alive matters: a process that exits right after reading
 * /proc frees its memory, so the figures would no longer describe the guest the host pauses.
 * The host waits for the END line, pauses the VM, and compares what it reads in guest memory
 * with these figures.
 *
 *   memsnap --freeze --out PATH [FILE...]
 *
 * Exact variant: the output file is filled with zeros (allocated) before the files are read,
 * the figures are written over it (no new allocation), and memsnap then freezes the whole VM
 * itself by writing to QEMU's pvpanic port (0x505; QEMU runs with -action panic=pause), so
 * nothing changes between reading /proc and the pause. arm64 has no I/O ports: there QEMU's
 * pvpanic-pci device (1b36:0011, hw/misc/pvpanic-pci.c) is written through its BAR 0, mapped
 * from sysfs (resource0) before the reads, so firing it allocates nothing. After the host resumes the VM, memsnap
 * exits; the figures are in PATH, padded with NUL bytes.
 *
 * Build: gcc -O2 -static -s -Wall -Wextra -o memsnap memsnap.c
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <sys/io.h>
#define SERIAL "/dev/ttyS0"
#else
#include <dirent.h>
#define SERIAL "/dev/ttyAMA0"
#endif

#define BUF_SIZE (1 << 20)
#define PVPANIC_PORT 0x505
#define PVPANIC_PANICKED 1

#if defined(__x86_64__) || defined(__i386__)
static int pvpanic_open(void)
{
    return ioperm(PVPANIC_PORT, 1, 1);
}

static void pvpanic_fire(void)
{
    outb(PVPANIC_PANICKED, PVPANIC_PORT);
}
#else
static volatile unsigned char *pvpanic_bar;

/* Map BAR 0 of the pvpanic-pci device (vendor 0x1b36, device 0x0011). */
static int pvpanic_open(void)
{
    DIR *d = opendir("/sys/bus/pci/devices");
    struct dirent *e;
    char path[300], id[16];

    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL && pvpanic_bar == NULL) {
        int fd, ok = 1;
        const char *want[2][2] = { { "vendor", "0x1b36" }, { "device", "0x0011" } };

        if (e->d_name[0] == '.')
            continue;
        for (int k = 0; k < 2 && ok; k++) {
            snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/%s", e->d_name, want[k][0]);
            fd = open(path, O_RDONLY);
            memset(id, 0, sizeof(id));
            ok = fd >= 0 && read(fd, id, sizeof(id) - 1) > 0 && strncmp(id, want[k][1], 6) == 0;
            if (fd >= 0)
                close(fd);
        }
        if (!ok)
            continue;
        /* No driver binds it (pvpanic is not loaded), so its memory decoding is off until
         * sysfs enables the device (pci_enable_device). */
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/enable", e->d_name);
        fd = open(path, O_WRONLY);
        if (fd < 0 || write(fd, "1", 1) != 1) {
            if (fd >= 0)
                close(fd);
            continue;
        }
        close(fd);
        /* sysfs maps the page holding BAR 0; with pages bigger than the BAR's alignment (16 KiB
         * pages, a 4 KiB-aligned BAR) the register sits at the BAR's offset in that page. */
        unsigned long long start = 0;
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource", e->d_name);
        FILE *res = fopen(path, "r");
        if (res == NULL || fscanf(res, "%llx", &start) != 1) {
            if (res != NULL)
                fclose(res);
            continue;
        }
        fclose(res);
        size_t page = (size_t)sysconf(_SC_PAGESIZE);
        snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", e->d_name);
        fd = open(path, O_RDWR | O_SYNC);
        if (fd < 0)
            continue;
        void *p = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
        if (p != MAP_FAILED)
            pvpanic_bar = (volatile unsigned char *)p + (start & (page - 1));
    }
    closedir(d);
    return pvpanic_bar != NULL ? 0 : -1;
}

static void pvpanic_fire(void)
{
    *pvpanic_bar = PVPANIC_PANICKED;
}
#endif

static char buf[BUF_SIZE];

static int open_fds[16];
static int nopen;

/* Append a file to buf. With keep_open the file stays open: closing a /proc file frees its
 * seq_file buffer, and pages freed then would change the per-cpu counts just read. */
static size_t append_file(size_t used, const char *path, int keep_open)
{
    int fd = open(path, O_RDONLY);
    ssize_t n;

    if (fd < 0) {
        fprintf(stderr, "memsnap: cannot open %s\n", path);
        exit(2);
    }
    used += (size_t)snprintf(buf + used, BUF_SIZE - used, "==> %s <==\n", path);
    while (used < BUF_SIZE - 1 && (n = read(fd, buf + used, BUF_SIZE - 1 - used)) > 0)
        used += (size_t)n;
    if (keep_open && nopen < (int)(sizeof(open_fds) / sizeof(open_fds[0])))
        open_fds[nopen++] = fd;
    else
        close(fd);
    return used;
}

/* Fold every CPU's pending vmstat deltas into the global counters that /proc/meminfo prints
 * (vm.stat_refresh); otherwise MemFree lags the free lists by up to the per-cpu thresholds. */
static void refresh_stats(void)
{
    int fd = open("/proc/sys/vm/stat_refresh", O_WRONLY);

    if (fd >= 0) {
        if (write(fd, "1", 1) < 0)
            fprintf(stderr, "memsnap: vm.stat_refresh failed\n");
        close(fd);
    }
}

static void write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w <= 0)
            exit(1);
        p += w;
        n -= (size_t)w;
    }
}

int main(int argc, char **argv)
{
    const char *out = SERIAL;
    /* zoneinfo last: reading a file allocates (seq_file buffers, slab pages from the per-cpu
     * lists), so the per-cpu counts must be the last figures read before the freeze. */
    const char *defaults[] = { "/proc/meminfo", "/proc/vmstat", "/proc/zoneinfo" };
    const char **files = defaults;
    int nfiles = 3, i = 1, fd;
    size_t used = 0;
    char line[64];
    unsigned long tag = (unsigned long)getpid();

    long delay_ms = 300;
    int freeze = 0;

    while (i < argc && argv[i][0] == '-') {
        if (i + 1 >= argc && strcmp(argv[i], "--freeze") != 0)
            break;
        if (strcmp(argv[i], "--freeze") == 0) {
            freeze = 1;
            i += 1;
            continue;
        }
        if (strcmp(argv[i], "--out") == 0) {
            out = argv[i + 1];
        } else if (strcmp(argv[i], "--delay") == 0) {
            delay_ms = strtol(argv[i + 1], NULL, 10);
        } else {
            break;
        }
        i += 2;
    }
    if (i < argc && argv[i][0] == '-') {
        fprintf(stderr, "usage: memsnap [--freeze] [--delay MS] [--out PATH] [FILE...]\n");
        return 2;
    }
    if (i < argc) {
        files = (const char **)&argv[i];
        nfiles = argc - i;
    }
    memset(buf, 0, sizeof(buf));
    mlockall(MCL_CURRENT);
    usleep((useconds_t)(delay_ms * 1000));
    fd = open(out, freeze ? O_WRONLY | O_CREAT | O_TRUNC : O_WRONLY | O_NOCTTY, 0644);
    if (fd < 0) {
        fprintf(stderr, "memsnap: cannot open %s\n", out);
        return 2;
    }
    if (freeze) {
        if (pvpanic_open() != 0) {
            fprintf(stderr, "memsnap: no access to the pvpanic device\n");
            return 2;
        }
        write_all(fd, buf, BUF_SIZE / 4);
        fsync(fd);
        lseek(fd, 0, SEEK_SET);
    }
    /* A first pass warms the slab caches the reads allocate from; the second pass is kept. */
    for (int pass = 0; pass < 2; pass++) {
        used = 0;
        refresh_stats();
        for (int f = 0; f < nfiles; f++)
            used = append_file(used, files[f], freeze && pass == 1);
    }
    if (freeze) {
        if (used > BUF_SIZE / 4)
            used = BUF_SIZE / 4;
        write_all(fd, buf, used);
        pvpanic_fire();
        return 0;
    }
    snprintf(line, sizeof(line), "\nMEMSNAP-BEGIN %lu\n", tag);
    write_all(fd, line, strlen(line));
    write_all(fd, buf, used);
    snprintf(line, sizeof(line), "\nMEMSNAP-END %lu\n", tag);
    write_all(fd, line, strlen(line));
    for (;;)
        pause();
}
