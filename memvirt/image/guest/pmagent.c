/*
 * pmagent - move this whole running Linux machine to another one through the
 * kernel's userland hibernation interface (/dev/snapshot). Part of memvirt.
 *
 *   pmagent send --to IP:PORT [--scheme memory|disk|iterative]
 *                [--compress none|lz4|zstd] [--disk DEV] [--verdict DEV]
 *                [--shrink | --image-size BYTES]
 *   pmagent recv --listen IP:PORT [--disk DEV] [--store DEV] [--timeout S]
 *   pmagent netbench send --to IP:PORT --bytes N | recv --listen IP:PORT
 *
 * The key (hex, >= 16 bytes) comes from the file $PMAGENT_KEY_FILE (read, then
 * removed) or $PMAGENT_KEY, never from the command line.
 *
 * Stream: frames  hdr{type u8, flags u8, 0 u16, len u32, seq u64} payload
 * tag[16], sealed with ChaCha20-Poly1305 under K_dir = HMAC-SHA256(key,
 * label) per direction: the payload is encrypted (the VM LAN is a multicast
 * group any local process can join), the header is the associated data, and
 * the nonce is the receiver's own frame count (seq, 64-bit little-endian,
 * then 4 zero bytes), so a dropped, replayed or reordered frame fails its
 * tag. Source: OPEN (kernel identity) before the freeze, [PAGE frames
 * (iterative: live copy of RAM read from /proc/kcore, pages the target keeps
 * on its store disk)], then HELLO (image size), DATA frames (pages: literal,
 * zero, or a reference to a stored page; literals compressed), END (image
 * bytes, image checksum: XXH3-128 of the list of every page's XXH3-64, so the
 * source hashes each page once for both the references and the checksum).
 * Disk scheme: HELLO..END go to the shared
 * disk and one DISK frame on the network says where. The target answers
 * READY to OPEN and ACK (or ERR) to END; it acks only once the whole image
 * is written to /dev/snapshot, checksummed, and its own FREEZE succeeded.
 *
 * Source safety: until the source starts sending END (disk scheme: DISK)
 * anything that fails frees the image and thaws, so the machine goes on: the
 * target cannot restore an image it has not seen whole. After that, an ACK
 * powers the source off and an ERR (the target refused the image) thaws it;
 * anything else (lost ACK, dead connection, timeout) leaves the outcome
 * unknown, since the target may have restored: the source then stays frozen
 * ("uncertain" event) until the host's verdict appears on the verdict device
 * (--verdict, the source's own store disk, which only the host and this
 * machine see): "off" powers it off, "thaw" thaws it. The verdict is block 0:
 * "MVPMVRD1", 'O' or 'T', HMAC-SHA256(HMAC(key, "memvirt-pm verdict"), those
 * 9 bytes). The copy that wakes up on the target returns from CREATE_IMAGE
 * with in_suspend=0, thaws and reports.
 *
 * Events go to /dev/console (the host reads the serial log and timestamps
 * them) as "memvirt-pm: ROLE EVENT k=v...".
 * Exit status: 0 ok, 1 failed (source thawed), 2 usage.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <linux/fs.h>
#include <lz4.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <zstd.h>
/* TCG emulates SSE2 with helper calls: XXH3's scalar path is the faster one in a guest without KVM. */
#define XXH_VECTOR XXH_SCALAR
#define XXH_INLINE_ALL
#include <xxhash.h>

#define PAGE 4096u
#define CHUNK_PAGES 256u /* 1 MiB of image per DATA frame */
#define TAG 16
#define VERDICT_TAG 32
#define MAX_FRAME (8u << 20)
#define DISK_ALIGN 4096u
#define DISK_BUF (1u << 20)

#define SNAPSHOT_FREEZE 0x3301
#define SNAPSHOT_UNFREEZE 0x3302
#define SNAPSHOT_ATOMIC_RESTORE 0x3304
#define SNAPSHOT_FREE 0x3305
#define SNAPSHOT_PREF_IMAGE_SIZE 0x3312
#define SNAPSHOT_CREATE_IMAGE 0x40043311
#define SNAPSHOT_GET_IMAGE_SIZE 0x8008330e

/*
 * PMAGENT_FUZZ builds the target's stream parser for the host's tests (with
 * sanitizers): no /dev/snapshot (the image goes to /dev/null, and FREEZE fails
 * there), no console, no O_DIRECT (test files live on tmpfs).
 */
#ifdef PMAGENT_FUZZ
#define SNAPSHOT_DEV "/dev/null"
#define DIRECT 0
#else
#define SNAPSHOT_DEV "/dev/snapshot"
#define DIRECT O_DIRECT
#endif

#define KPF_BUDDY (1ull << 10)
#define KPF_NOPAGE (1ull << 20)
#define KPF_OFFLINE (1ull << 23)

enum { F_OPEN = 1, F_READY, F_PAGES, F_PRECOPY_END, F_HELLO, F_DATA, F_END, F_DISK, F_ACK, F_ERR };
enum { S_MEMORY, S_DISK, S_ITERATIVE };
enum { C_NONE, C_LZ4, C_ZSTD };
enum { K_LIT, K_ZERO, K_REF };

static const char *SCHEMES[] = {"memory", "disk", "iterative"};
static const char *CODECS[] = {"none", "lz4", "zstd"};

struct fhdr {
    uint8_t type, flags;
    uint16_t zero;
    uint32_t len;
    uint64_t seq;
};

struct open_msg {
    char magic[8];
    uint32_t scheme, codec;
    uint64_t ram_bytes;
    char release[65], version[65];
};

struct ready_msg {
    uint64_t avail_bytes;
};

struct hello_msg {
    uint64_t image_bytes;
};

struct end_msg {
    uint64_t image_bytes;
    uint8_t sum[16];
};

struct disk_msg {
    uint64_t stream_bytes;
};

struct data_head {
    uint32_t npages, nref, clen, rawlit;
};

/* An encrypted, authenticated frame channel over a socket or (disk scheme) a block device. */
struct chan {
    int fd;
    int disk;            /* O_DIRECT block device: aligned buffered I/O */
    uint8_t ksend[32], krecv[32];
    EVP_CIPHER_CTX *enc, *dec;
    uint64_t sseq, rseq;
    uint64_t wire;       /* bytes written or read */
    uint8_t *dbuf;       /* disk staging buffer */
    size_t dlen, doff, davail;
    uint64_t dpos, dlimit;
};

static const char *role = "agent";
static double t_start;
static int console_fd = -1;
static int peer_refused;        /* an authenticated ERR frame arrived: the peer will not go on */
static uint8_t kverdict[32];    /* checks the host's verdict after an uncertain outcome */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* One event line, on the console (host timestamps it) and on stderr (the log). */
static void event(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    char line[640];
    int n = snprintf(line, sizeof line, "memvirt-pm: %s %s t=%.3f\n", role, msg, now() - t_start);
#ifndef PMAGENT_FUZZ
    if (console_fd < 0 && !getenv("PMAGENT_NO_CONSOLE"))
        console_fd = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
#endif
    if (console_fd >= 0 && write(console_fd, line, n) < 0)
        console_fd = -1;
    fputs(line, stderr);
    fflush(stderr);
}

static char errmsg[400];

static int fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(errmsg, sizeof errmsg, fmt, ap);
    va_end(ap);
    /* It goes into a quoted event field: no quotes, backslashes or control bytes (a peer's words). */
    for (char *c = errmsg; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f || *c == '"' || *c == '\\')
            *c = '?';
    return -1;
}

static int parse_hex(const char *s, uint8_t *out, size_t max, size_t *n)
{
    size_t len = strlen(s);
    if (len % 2 || len / 2 > max)
        return -1;
    for (size_t i = 0; i < len / 2; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = v;
    }
    *n = len / 2;
    return 0;
}

/* The disk scheme's stream gets keys of its own, so its frames never pass for network ones. */
static void disk_keys(struct chan *disk, const struct chan *net)
{
    unsigned len = 32;
    HMAC(EVP_sha256(), net->ksend, 32, (const uint8_t *)"disk", 4, disk->ksend, &len);
    HMAC(EVP_sha256(), net->krecv, 32, (const uint8_t *)"disk", 4, disk->krecv, &len);
}

static int load_keys(struct chan *c, int is_source)
{
    const char *hex = getenv("PMAGENT_KEY"), *path = getenv("PMAGENT_KEY_FILE");
    char text[300] = "";
    uint8_t key[128];
    size_t n = 0;
    if (path) {
        FILE *f = fopen(path, "r");
        if (!f || !fgets(text, sizeof text, f))
            return fail("cannot read the key file %s", path);
        fclose(f);
        unlink(path);
        text[strcspn(text, "\r\n")] = 0;
        hex = text;
    }
    if (!hex || parse_hex(hex, key, sizeof key, &n) || n < 16)
        return fail("no key: set PMAGENT_KEY_FILE or PMAGENT_KEY (at least 32 hex digits)");
    unsigned len = 32;
    uint8_t a[32], b[32];
    HMAC(EVP_sha256(), key, n, (const uint8_t *)"memvirt-pm source->target", 25, a, &len);
    HMAC(EVP_sha256(), key, n, (const uint8_t *)"memvirt-pm target->source", 25, b, &len);
    HMAC(EVP_sha256(), key, n, (const uint8_t *)"memvirt-pm verdict", 18, kverdict, &len);
    memcpy(c->ksend, is_source ? a : b, 32);
    memcpy(c->krecv, is_source ? b : a, 32);
    OPENSSL_cleanse(key, sizeof key);
    OPENSSL_cleanse(text, sizeof text);
    OPENSSL_cleanse(a, sizeof a);
    OPENSSL_cleanse(b, sizeof b);
    return 0;
}

/* --- raw I/O ------------------------------------------------------------- */

static int write_all(int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        b += w;
        n -= w;
    }
    return 0;
}

static int read_all(int fd, void *p, size_t n)
{
    uint8_t *b = p;
    while (n) {
        ssize_t r = read(fd, b, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0) {
            errno = EPIPE;
            return -1;
        }
        b += r;
        n -= r;
    }
    return 0;
}

static int chan_put(struct chan *c, const void *p, size_t n)
{
    c->wire += n;
    if (!c->disk)
        return write_all(c->fd, p, n);
    const uint8_t *b = p;
    while (n) {
        size_t k = DISK_BUF - c->dlen < n ? DISK_BUF - c->dlen : n;
        memcpy(c->dbuf + c->dlen, b, k);
        c->dlen += k;
        b += k;
        n -= k;
        if (c->dlen == DISK_BUF) {
            if (pwrite(c->fd, c->dbuf, DISK_BUF, c->dpos) != (ssize_t)DISK_BUF)
                return -1;
            c->dpos += DISK_BUF;
            c->dlen = 0;
        }
    }
    return 0;
}

static int chan_flush(struct chan *c)
{
    if (!c->disk || !c->dlen)
        return 0;
    size_t len = (c->dlen + DISK_ALIGN - 1) / DISK_ALIGN * DISK_ALIGN;
    memset(c->dbuf + c->dlen, 0, len - c->dlen);
    if (pwrite(c->fd, c->dbuf, len, c->dpos) != (ssize_t)len || fdatasync(c->fd))
        return -1;
    c->dpos += len;
    c->dlen = 0;
    return 0;
}

static int chan_get(struct chan *c, void *p, size_t n)
{
    c->wire += n;
    if (!c->disk)
        return read_all(c->fd, p, n);
    uint8_t *b = p;
    while (n) {
        if (c->doff == c->davail) {
            if (c->dpos >= c->dlimit) {
                errno = EPIPE;
                return -1;
            }
            ssize_t r = pread(c->fd, c->dbuf, DISK_BUF, c->dpos);
            if (r <= 0) {
                if (r == 0)
                    errno = EPIPE;
                return -1;
            }
            c->dpos += r;
            c->doff = 0;
            c->davail = r;
        }
        size_t k = c->davail - c->doff < n ? c->davail - c->doff : n;
        memcpy(b, c->dbuf + c->doff, k);
        c->doff += k;
        b += k;
        n -= k;
    }
    return 0;
}

/* --- frames ---------------------------------------------------------------- */

/* ChaCha20-Poly1305, not AES-256-GCM: the guests' qemu64 CPU has no AES-NI or PCLMULQDQ, and there
 * OpenSSL's AES-GCM is 7x slower (`pmagent speed` in a TCG guest: 45 vs 6 MB/s; HMAC-SHA256 was ~30). */
static const EVP_CIPHER *aead(void)
{
    return EVP_chacha20_poly1305();
}

static void nonce(uint64_t seq, uint8_t iv[12])
{
    memset(iv, 0, 12);
    for (int i = 0; i < 8; i++)
        iv[i] = seq >> (8 * i);
}

/* Start sealing (enc) or opening a frame: the key is set once per context, the nonce per frame. */
static int aead_start(EVP_CIPHER_CTX **ctx, int enc, const uint8_t *key, const struct fhdr *h, uint64_t seq)
{
    uint8_t iv[12];
    int n, fresh = !*ctx;
    if (fresh && !(*ctx = EVP_CIPHER_CTX_new()))
        return -1;
    nonce(seq, iv);
    if (EVP_CipherInit_ex(*ctx, fresh ? aead() : NULL, NULL, fresh ? key : NULL, iv, enc) != 1)
        return -1;
    return EVP_CipherUpdate(*ctx, NULL, &n, (const uint8_t *)h, sizeof *h) == 1 ? 0 : -1;
}

static void chan_free(struct chan *c)
{
    EVP_CIPHER_CTX_free(c->enc);
    EVP_CIPHER_CTX_free(c->dec);
    c->enc = c->dec = NULL;
    OPENSSL_cleanse(c->ksend, sizeof c->ksend);
    OPENSSL_cleanse(c->krecv, sizeof c->krecv);
}

static int send_frame(struct chan *c, int type, int flags, const void *payload, uint32_t len)
{
    struct fhdr h = {type, flags, 0, len, c->sseq++};
    uint8_t tag[TAG], out[64 << 10];
    const uint8_t *p = payload;
    int n;
    if (aead_start(&c->enc, 1, c->ksend, &h, h.seq))
        return fail("sealing a frame failed");
    if (chan_put(c, &h, sizeof h))
        return fail("sending failed: %s", strerror(errno));
    for (uint32_t o = 0; o < len;) {
        int k = len - o < sizeof out ? (int)(len - o) : (int)sizeof out;
        if (EVP_EncryptUpdate(c->enc, out, &n, p + o, k) != 1)
            return fail("sealing a frame failed");
        if (chan_put(c, out, n))
            return fail("sending failed: %s", strerror(errno));
        o += k;
    }
    if (EVP_EncryptFinal_ex(c->enc, out, &n) != 1 || EVP_CIPHER_CTX_ctrl(c->enc, EVP_CTRL_AEAD_GET_TAG, TAG, tag) != 1)
        return fail("sealing a frame failed");
    if (chan_put(c, tag, TAG))
        return fail("sending failed: %s", strerror(errno));
    return 0;
}

/* Read one frame into *buf (grown as needed) and open it in place; checks size, sequence and tag. */
static int recv_frame(struct chan *c, struct fhdr *h, uint8_t **buf, size_t *cap)
{
    uint8_t tag[TAG];
    int n;
    if (chan_get(c, h, sizeof *h))
        return fail(errno == EPIPE ? "stream truncated (peer closed)" : "receiving failed: %s", strerror(errno));
    if (h->len > MAX_FRAME || h->zero)
        return fail("malformed frame (length %u)", h->len);
    if (h->seq != c->rseq)
        return fail("frame out of sequence");
    if (h->len + 1 > *cap) {
        free(*buf);
        *cap = h->len + 1;
        if (!(*buf = malloc(*cap))) {
            *cap = 0;
            return fail("out of memory for a frame");
        }
    }
    if (chan_get(c, *buf, h->len) || chan_get(c, tag, TAG))
        return fail(errno == EPIPE ? "stream truncated (peer closed)" : "receiving failed: %s", strerror(errno));
    if (aead_start(&c->dec, 0, c->krecv, h, c->rseq) ||
        (h->len && EVP_DecryptUpdate(c->dec, *buf, &n, *buf, h->len) != 1) ||
        EVP_CIPHER_CTX_ctrl(c->dec, EVP_CTRL_AEAD_SET_TAG, TAG, tag) != 1 ||
        EVP_DecryptFinal_ex(c->dec, tag, &n) != 1)
        return fail("bad tag: wrong key or tampered stream");
    c->rseq++;
    if (h->type == F_ERR) {
        peer_refused = 1;
        if (!h->len)
            return fail("peer failed");
        (*buf)[h->len] = 0;
        return fail("peer failed: %.300s", (char *)*buf);
    }
    return 0;
}

static int expect(struct chan *c, int type, struct fhdr *h, uint8_t **buf, size_t *cap, uint32_t len)
{
    if (recv_frame(c, h, buf, cap))
        return -1;
    if (h->type != type || (len && h->len != len))
        return fail("unexpected frame type %d (length %u) where %d was due", h->type, h->len, type);
    return 0;
}

/* Tell the peer why we stop (best effort: the reason survives a failed send). */
static void send_err(struct chan *c)
{
    char why[sizeof errmsg];
    memcpy(why, errmsg, sizeof why);
    if (c->fd >= 0 && !c->disk)
        send_frame(c, F_ERR, 0, why, strlen(why) + 1);
    memcpy(errmsg, why, sizeof why);
}

/* --- helpers ------------------------------------------------------------- */

static uint64_t meminfo(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    uint64_t v = 0;
    size_t kl = strlen(key);
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == ':')
            v = strtoull(line + kl + 1, NULL, 10) << 10;
    if (f)
        fclose(f);
    return v;
}

static int is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    for (unsigned i = 0; i < PAGE / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

static int parse_ep(const char *s, struct sockaddr_in *sa)
{
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof host)
        return -1;
    memcpy(host, s, colon - s);
    host[colon - s] = 0;
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons(atoi(colon + 1));
    return inet_pton(AF_INET, host, &sa->sin_addr) == 1 ? 0 : -1;
}

static void tune(int fd)
{
    int one = 1, big = 4 << 20;
    struct timeval tv = {120, 0}; /* a peer that vanished must not hang a frozen machine */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
}

static int dial(const char *ep)
{
    struct sockaddr_in sa;
    if (parse_ep(ep, &sa))
        return fail("bad endpoint %s", ep);
    for (int i = 0; i < 50; i++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        tune(fd);
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0)
            return fd;
        close(fd);
        usleep(100000);
    }
    return fail("cannot connect to %s: %s", ep, strerror(errno));
}

static int accept_one(const char *ep, int timeout_s)
{
    struct sockaddr_in sa;
    if (parse_ep(ep, &sa))
        return fail("bad endpoint %s", ep);
    int one = 1, ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    tune(ls);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 1)) {
        close(ls);
        return fail("cannot listen on %s: %s", ep, strerror(errno));
    }
    event("listening on=%s", ep);
    struct pollfd p = {ls, POLLIN, 0};
    if (poll(&p, 1, timeout_s * 1000) != 1) {
        close(ls);
        return fail("nobody connected within %d s", timeout_s);
    }
    int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    close(ls);
    if (fd < 0)
        return fail("accept failed: %s", strerror(errno));
    return fd;
}

static int open_disk(const char *dev, int flags)
{
    int fd = open(dev, flags | DIRECT | O_CLOEXEC);
    if (fd < 0)
        return fail("cannot open disk %s: %s", dev, strerror(errno));
    return fd;
}

static void *aligned(size_t n)
{
    void *p = NULL;
    return posix_memalign(&p, DISK_ALIGN, n) ? NULL : p;
}

/* Open-addressing table: content hash -> slot of a page on the target's store. */
struct table {
    uint64_t *keys;
    uint32_t *vals;
    size_t mask;
};

static int table_init(struct table *t, size_t n)
{
    size_t cap = 1;
    while (cap < 2 * n + 16)
        cap <<= 1;
    t->keys = calloc(cap, 8);
    t->vals = calloc(cap, 4);
    t->mask = cap - 1;
    return t->keys && t->vals ? 0 : -1;
}

static void table_put(struct table *t, uint64_t k, uint32_t v)
{
    k |= 1; /* 0 marks an empty slot */
    size_t i = k & t->mask;
    while (t->keys[i] && t->keys[i] != k)
        i = (i + 1) & t->mask;
    t->keys[i] = k;
    t->vals[i] = v;
}

static int table_get(const struct table *t, uint64_t k, uint32_t *v)
{
    if (!t->keys)
        return 0;
    k |= 1;
    for (size_t i = k & t->mask; t->keys[i]; i = (i + 1) & t->mask)
        if (t->keys[i] == k) {
            *v = t->vals[i];
            return 1;
        }
    return 0;
}

static uint64_t zero_hash;

/* Each page's XXH3-64 (zero pages: a constant), fed to the image checksum. */
static uint64_t page_hash(const uint8_t *pg, int zero, XXH3_state_t *sum)
{
    uint64_t h = zero ? zero_hash : XXH3_64bits(pg, PAGE);
    XXH3_128bits_update(sum, &h, sizeof h);
    return h;
}

/* Seconds spent per stage of the final stream, reported with the "sent" event. */
struct stages {
    double read, scan, compress, send;
};

/* --- source: live copy for the iterative scheme ---------------------------- */

struct kseg {
    uint64_t paddr, size, off;
};

/* Physical RAM as /proc/kcore maps it: the largest segment holding each range. */
static int kcore_segments(int fd, struct kseg *segs, int max)
{
    Elf64_Ehdr eh;
    if (pread(fd, &eh, sizeof eh, 0) != sizeof eh || memcmp(eh.e_ident, ELFMAG, SELFMAG))
        return fail("/proc/kcore is not readable as ELF");
    int n = 0;
    for (int i = 0; i < eh.e_phnum && n < max; i++) {
        Elf64_Phdr ph;
        if (pread(fd, &ph, sizeof ph, eh.e_phoff + (uint64_t)i * eh.e_phentsize) != sizeof ph)
            return fail("/proc/kcore: short program header");
        if (ph.p_type == PT_LOAD && ph.p_paddr != (Elf64_Addr)-1 && ph.p_memsz >= (1u << 20))
            segs[n++] = (struct kseg){ph.p_paddr, ph.p_memsz, ph.p_offset};
    }
    /* The kernel text is mapped twice (text and direct map): keep only the outer segments. */
    int m = 0;
    for (int i = 0; i < n; i++) {
        int inner = 0;
        for (int j = 0; j < n && !inner; j++)
            inner = j != i && segs[j].paddr <= segs[i].paddr &&
                    segs[i].paddr + segs[i].size <= segs[j].paddr + segs[j].size &&
                    (segs[j].size > segs[i].size || j < i);
        if (!inner)
            segs[m++] = segs[i];
    }
    return m;
}

/*
 * Send every in-use, non-zero page of RAM (free pages per /proc/kpageflags
 * are skipped) while the machine runs; remember each page's content hash and
 * the store slot the target puts it in.
 */
static int precopy(struct chan *c, int codec, struct table *sent, uint64_t *pages_out)
{
    int kc = open("/proc/kcore", O_RDONLY | O_CLOEXEC), kf = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
    if (kc < 0 || kf < 0)
        return fail("iterative scheme needs /proc/kcore and /proc/kpageflags: %s", strerror(errno));
    struct kseg segs[32];
    int nseg = kcore_segments(kc, segs, 32);
    if (nseg <= 0)
        return nseg < 0 ? -1 : fail("/proc/kcore maps no RAM");
    uint64_t ram = meminfo("MemTotal");
    if (table_init(sent, ram / PAGE))
        return fail("out of memory for the page table");
    uint8_t *raw = malloc(CHUNK_PAGES * PAGE), *lit = malloc(CHUNK_PAGES * PAGE);
    size_t cbound = ZSTD_compressBound(CHUNK_PAGES * PAGE) + LZ4_compressBound(CHUNK_PAGES * PAGE);
    uint8_t *frame = malloc(sizeof(struct data_head) + cbound);
    uint64_t flags[CHUNK_PAGES];
    ZSTD_CCtx *z = ZSTD_createCCtx();
    uint32_t slot = 0;
    for (int s = 0; s < nseg; s++) {
        for (uint64_t off = 0; off < segs[s].size; off += CHUNK_PAGES * PAGE) {
            uint64_t pfn0 = (segs[s].paddr + off) / PAGE;
            unsigned n = (segs[s].size - off) / PAGE < CHUNK_PAGES ? (segs[s].size - off) / PAGE : CHUNK_PAGES;
            ssize_t fl = pread(kf, flags, n * 8, pfn0 * 8);
            if (fl != (ssize_t)(n * 8))
                memset(flags, 0, sizeof flags);
            if (pread(kc, raw, n * PAGE, segs[s].off + off) != (ssize_t)(n * PAGE))
                continue; /* a hole kcore will not read: nothing to pre-send */
            struct data_head *dh = (struct data_head *)frame;
            unsigned k = 0;
            for (unsigned i = 0; i < n; i++) {
                const uint8_t *pg = raw + (size_t)i * PAGE;
                if (flags[i] & (KPF_BUDDY | KPF_NOPAGE | KPF_OFFLINE) || is_zero(pg))
                    continue;
                uint64_t hsh = XXH3_64bits(pg, PAGE);
                uint32_t dummy;
                if (table_get(sent, hsh, &dummy))
                    continue;
                table_put(sent, hsh, slot++);
                memcpy(lit + (size_t)k * PAGE, pg, PAGE);
                k++;
            }
            if (!k)
                continue;
            uint8_t *cdst = (uint8_t *)(dh + 1);
            size_t clen = k * PAGE;
            if (codec == C_LZ4)
                clen = LZ4_compress_default((char *)lit, (char *)cdst, k * PAGE, LZ4_compressBound(k * PAGE));
            else if (codec == C_ZSTD)
                clen = ZSTD_compressCCtx(z, cdst, cbound, lit, k * PAGE, 1);
            else
                memcpy(cdst, lit, clen);
            if (clen == 0 || (codec == C_ZSTD && ZSTD_isError(clen)))
                return fail("compression failed");
            *dh = (struct data_head){k, 0, (uint32_t)clen, k * PAGE};
            if (send_frame(c, F_PAGES, codec, frame, sizeof *dh + clen))
                return -1;
        }
    }
    ZSTD_freeCCtx(z);
    free(raw);
    free(lit);
    free(frame);
    close(kc);
    close(kf);
    *pages_out = slot;
    return send_frame(c, F_PRECOPY_END, 0, &slot, sizeof slot);
}

/* --- source ---------------------------------------------------------------- */

struct source_opts {
    const char *to, *disk, *verdict;
    int scheme, codec;
    long long image_size; /* PREF_IMAGE_SIZE, or -1: the kernel's own preference */
};

/*
 * Read up to n bytes of the image. The kernel hands it out a page per read
 * call; a readv of page-sized pieces gets many pages per system call.
 */
static ssize_t read_image(int fd, uint8_t *buf, size_t n)
{
    size_t got = 0;
    struct iovec iov[CHUNK_PAGES];
    while (got < n) {
        int k = 0;
        for (size_t o = got; o < n && k < (int)CHUNK_PAGES; o += PAGE)
            iov[k++] = (struct iovec){buf + o, PAGE};
        ssize_t r = readv(fd, iov, k);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        got += r;
    }
    return got;
}

/* Stream the image (HELLO, DATA..., END) from /dev/snapshot into c. */
static int stream_image(struct chan *c, int snap, int codec, uint64_t image_bytes, const struct table *sent,
                        uint64_t *counts, struct stages *st, int *committed)
{
    struct hello_msg hm = {image_bytes};
    if (send_frame(c, F_HELLO, 0, &hm, sizeof hm))
        return -1;
    uint8_t *raw = malloc(CHUNK_PAGES * PAGE), *lit = malloc(CHUNK_PAGES * PAGE);
    size_t cbound = ZSTD_compressBound(CHUNK_PAGES * PAGE) + LZ4_compressBound(CHUNK_PAGES * PAGE);
    uint8_t *frame = malloc(sizeof(struct data_head) + CHUNK_PAGES * 5 + cbound);
    ZSTD_CCtx *z = ZSTD_createCCtx();
    XXH3_state_t *sum = XXH3_createState();
    XXH3_128bits_reset(sum);
    uint64_t total = 0;
    if (!raw || !lit || !frame || !z || !sum)
        return fail("out of memory for the stream buffers");
    for (;;) {
        double t0 = now();
        ssize_t got = read_image(snap, raw, CHUNK_PAGES * PAGE);
        double t1 = now();
        st->read += t1 - t0;
        if (got < 0)
            return fail("reading the image failed: %s", strerror(errno));
        if (got == 0)
            break;
        if (got % PAGE)
            return fail("image read returned a partial page");
        total += got;
        unsigned n = got / PAGE, nlit = 0, nref = 0;
        struct data_head *dh = (struct data_head *)frame;
        uint8_t *kinds = (uint8_t *)(dh + 1);
        uint32_t refs[CHUNK_PAGES];
        for (unsigned i = 0; i < n; i++) {
            const uint8_t *pg = raw + (size_t)i * PAGE;
            uint32_t slot;
            int zero = is_zero(pg);
            uint64_t hsh = page_hash(pg, zero, sum);
            if (zero) {
                kinds[i] = K_ZERO;
                counts[1]++;
            } else if (sent && table_get(sent, hsh, &slot)) {
                kinds[i] = K_REF;
                refs[nref++] = slot;
                counts[2]++;
            } else {
                kinds[i] = K_LIT;
                memcpy(lit + (size_t)nlit++ * PAGE, pg, PAGE);
                counts[0]++;
            }
        }
        memcpy(kinds + n, refs, nref * 4);
        double t2 = now();
        st->scan += t2 - t1;
        uint8_t *cdst = kinds + n + nref * 4;
        size_t clen = (size_t)nlit * PAGE;
        if (nlit && codec == C_LZ4)
            clen = LZ4_compress_default((char *)lit, (char *)cdst, nlit * PAGE, LZ4_compressBound(nlit * PAGE));
        else if (nlit && codec == C_ZSTD)
            clen = ZSTD_compressCCtx(z, cdst, cbound, lit, nlit * PAGE, 1);
        else
            memcpy(cdst, lit, clen);
        if ((nlit && clen == 0) || (codec == C_ZSTD && ZSTD_isError(clen)))
            return fail("compression failed");
        *dh = (struct data_head){n, nref, (uint32_t)clen, nlit * PAGE};
        double t3 = now();
        st->compress += t3 - t2;
        if (send_frame(c, F_DATA, codec, frame, sizeof *dh + n + nref * 4 + clen))
            return -1;
        st->send += now() - t3;
    }
    if (total != image_bytes)
        return fail("image is %llu bytes, the kernel announced %llu", (unsigned long long)total,
                    (unsigned long long)image_bytes);
    struct end_msg em = {total, {0}};
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(sum));
    memcpy(em.sum, canon.digest, 16);
    XXH3_freeState(sum);
    ZSTD_freeCCtx(z);
    free(raw);
    free(lit);
    free(frame);
    if (committed)
        *committed = 1; /* from the first byte of END on, the target may hold the whole image */
    return send_frame(c, F_END, 0, &em, sizeof em);
}

enum { V_NONE = -1, V_THAW, V_OFF };

/* The host's verdict on the verdict device, if it gave one for this migration. */
static int read_verdict(const char *dev)
{
    static int fd = -1;
    static uint8_t *b;
    if (!dev || (!b && !(b = aligned(DISK_ALIGN))))
        return V_NONE;
    if (fd < 0 && (fd = open(dev, O_RDONLY | DIRECT | O_CLOEXEC)) < 0)
        return V_NONE;
    if (pread(fd, b, DISK_ALIGN, 0) != DISK_ALIGN || memcmp(b, "MVPMVRD1", 8) || (b[8] != 'O' && b[8] != 'T'))
        return V_NONE;
    uint8_t want[VERDICT_TAG];
    unsigned len = VERDICT_TAG;
    HMAC(EVP_sha256(), kverdict, sizeof kverdict, b, 9, want, &len);
    if (CRYPTO_memcmp(want, b + 9, VERDICT_TAG))
        return V_NONE;
    event("verdict %s", b[8] == 'O' ? "off" : "thaw");
    return b[8] == 'O' ? V_OFF : V_THAW;
}

/*
 * The outcome is unknown (the target may have restored): stay frozen until
 * the host's verdict is on the verdict device. Without one (pmagent used by
 * hand) the source thaws, as before this existed: two copies may then run.
 */
static int await_verdict(const char *dev)
{
    event("uncertain error=\"%s\"", errmsg);
    if (!dev)
        return V_THAW;
    double last = now();
    int v;
    while ((v = read_verdict(dev)) == V_NONE) {
        if (now() - last > 60) {
            event("awaiting verdict on=%s", dev);
            last = now();
        }
        usleep(100000);
    }
    return v;
}

/* Disk scheme, after a failure: the image (a machine's memory) must not stay on the shared disk. */
static void zero_disk(struct chan *disk)
{
    uint64_t size = 0, range[2] = {0, disk->dpos + DISK_BUF};
    if (disk->fd < 0 || ioctl(disk->fd, BLKGETSIZE64, &size))
        return;
    if (range[1] > size)
        range[1] = size / DISK_ALIGN * DISK_ALIGN;
    if (ioctl(disk->fd, BLKZEROOUT, range))
        event("wipe failed error=\"%s\"", strerror(errno));
}

static int cmd_send(const struct source_opts *o)
{
    role = "source";
    struct chan net = {.fd = -1};
    struct fhdr h;
    uint8_t *buf = NULL;
    size_t cap = 0;
    if (load_keys(&net, 1))
        return 1;
    if ((net.fd = dial(o->to)) < 0)
        goto failed_early;
    struct utsname u;
    uname(&u);
    struct open_msg om = {"MVPM1", o->scheme, o->codec, meminfo("MemTotal"), {0}, {0}};
    snprintf(om.release, sizeof om.release, "%s", u.release);
    snprintf(om.version, sizeof om.version, "%s", u.version);
    if (send_frame(&net, F_OPEN, 0, &om, sizeof om) || expect(&net, F_READY, &h, &buf, &cap, sizeof(struct ready_msg)))
        goto failed_early;
    event("connected to=%s scheme=%s compress=%s", o->to, SCHEMES[o->scheme], CODECS[o->codec]);

    struct table sent = {0};
    uint64_t precopied = 0;
    if (o->scheme == S_ITERATIVE) {
        uint64_t w0 = net.wire;
        double t0 = now();
        if (precopy(&net, o->codec, &sent, &precopied))
            goto failed_early;
        event("precopied pages=%llu wire=%llu seconds=%.3f", (unsigned long long)precopied,
              (unsigned long long)(net.wire - w0), now() - t0);
    }
    struct chan disk = {.fd = -1};
    if (o->scheme == S_DISK) {
        disk_keys(&disk, &net);
        disk.disk = 1;
        disk.dbuf = aligned(DISK_BUF);
        if ((disk.fd = open_disk(o->disk, O_WRONLY)) < 0 || !disk.dbuf)
            goto failed_early;
    }

    int snap = open("/dev/snapshot", O_RDONLY | O_CLOEXEC);
    if (snap < 0) {
        fail("cannot open /dev/snapshot: %s", strerror(errno));
        goto failed_early;
    }
    if (o->image_size >= 0)
        ioctl(snap, SNAPSHOT_PREF_IMAGE_SIZE, (unsigned long)o->image_size);
    event("freezing used=%llu", (unsigned long long)(meminfo("MemTotal") - meminfo("MemFree")));
    sync();
    double t0 = now();
    if (ioctl(snap, SNAPSHOT_FREEZE, 0)) {
        fail("freezing processes failed: %s", strerror(errno));
        goto failed_early;
    }
    double t1 = now();
    event("frozen seconds=%.3f", t1 - t0);
    int in_suspend = 0, committed = 0;
    if (ioctl(snap, SNAPSHOT_CREATE_IMAGE, &in_suspend)) {
        if (errno == ENOMEM)
            fail("image too large for free memory (the kernel could not allocate the snapshot: ENOMEM)");
        else
            fail("creating the image failed: %s", strerror(errno));
        goto thaw;
    }
    if (!in_suspend) {
        /* This is the copy that woke up on the target. */
        role = "resumed";
        ioctl(snap, SNAPSHOT_UNFREEZE, 0);
        close(net.fd);
        event("running");
        return 0;
    }
    double t2 = now();
    uint64_t image_bytes = 0;
    ioctl(snap, SNAPSHOT_GET_IMAGE_SIZE, &image_bytes);
    event("created seconds=%.3f image=%llu swapped=%llu", t2 - t1, (unsigned long long)image_bytes,
          (unsigned long long)(meminfo("SwapTotal") - meminfo("SwapFree")));

    uint64_t counts[3] = {0, 0, 0}, wire0 = net.wire;
    struct stages stg = {0, 0, 0, 0};
    if (o->scheme == S_DISK) {
        if (stream_image(&disk, snap, o->codec, image_bytes, NULL, counts, &stg, NULL) || chan_flush(&disk)) {
            if (!*errmsg || !strncmp(errmsg, "sending", 7))
                fail("writing the image to %s failed: %s", o->disk, strerror(errno));
            goto thaw;
        }
        event("written disk=%llu seconds=%.3f", (unsigned long long)disk.wire, now() - t2);
        struct disk_msg dm = {disk.dpos};
        committed = 1;
        if (send_frame(&net, F_DISK, 0, &dm, sizeof dm))
            goto thaw;
    } else if (stream_image(&net, snap, o->codec, image_bytes, sent.keys ? &sent : NULL, counts, &stg, &committed)) {
        goto thaw;
    }
    double t3 = now();
    event("sent literal=%llu zero=%llu ref=%llu wire=%llu disk=%llu seconds=%.3f read=%.3f scan=%.3f compress=%.3f "
          "send=%.3f", (unsigned long long)counts[0], (unsigned long long)counts[1], (unsigned long long)counts[2],
          (unsigned long long)(net.wire - wire0), (unsigned long long)disk.wire, t3 - t2, stg.read, stg.scan,
          stg.compress, stg.send);
    /* The host may settle it first (it saw the machine run on the target, or the target fail). */
    struct pollfd p = {net.fd, POLLIN, 0};
    int verdict = V_NONE, ready = 0;
    for (int i = 0; i < 1500 && !ready && verdict == V_NONE; i++)
        if (!(ready = poll(&p, 1, 200) == 1))
            verdict = read_verdict(o->verdict);
    if (verdict == V_OFF) {
        event("acked verdict=off");
        goto power_off;
    }
    if (verdict == V_THAW) {
        fail("no answer from the target, which the host says did not restore");
        goto thaw_now;
    }
    if (!ready) {
        fail("the target did not acknowledge within 300 s");
        goto thaw;
    }
    if (expect(&net, F_ACK, &h, &buf, &cap, 0))
        goto thaw;
    event("acked seconds=%.3f", now() - t3);
power_off:
    sync();
    reboot(RB_POWER_OFF);
    fail("power off failed: %s", strerror(errno));
    return 1;

thaw:
    if (committed && !peer_refused && await_verdict(o->verdict) == V_OFF) {
        event("acked verdict=off");
        goto power_off;
    }
thaw_now:
    ioctl(snap, SNAPSHOT_FREE, 0);
    ioctl(snap, SNAPSHOT_UNFREEZE, 0);
    close(snap);
    send_err(&net);
    if (o->scheme == S_DISK)
        zero_disk(&disk); /* before the event: the host wipes the disk's file after it */
    event("thawed error=\"%s\"", errmsg);
    fprintf(stderr, "pmagent: %s\n", errmsg);
    return 1;
failed_early:
    if (net.fd >= 0)
        send_err(&net);
    event("failed error=\"%s\"", errmsg);
    fprintf(stderr, "pmagent: %s\n", errmsg);
    return 1;
}

/* --- target ---------------------------------------------------------------- */

struct target_opts {
    const char *listen, *disk, *store;
    int timeout;
};

#define WINDOW_PAGES 512u
#define CACHE_PAGES 256u

/*
 * Pages the source sent before its freeze, on the store disk by slot. The
 * image asks for them in slot order, mostly, so they are read back through a
 * 2 MiB window: a small O_DIRECT read costs about as much as a large one.
 * The window moves only where the stream of references goes on (a miss right
 * after the previous reference); an isolated reference elsewhere (a duplicate
 * of another page, a page that moved) is read alone into a small
 * direct-mapped cache, so it neither drags the window away nor misses twice.
 */
struct store {
    int fd;
    uint64_t slots, cap;
    uint8_t *win, *cache;
    uint64_t win_first, win_count, last;
    int64_t cache_slot[CACHE_PAGES];
};

static const uint8_t *store_page(struct store *st, uint32_t slot)
{
    uint64_t prev = st->last;
    st->last = slot;
    if (slot >= st->win_first && slot < st->win_first + st->win_count)
        return st->win + (size_t)(slot - st->win_first) * PAGE;
    if (!st->cache) {
        if (!(st->cache = aligned((size_t)CACHE_PAGES * PAGE)))
            return NULL;
        memset(st->cache_slot, 0xff, sizeof st->cache_slot);
    }
    unsigned c = slot % CACHE_PAGES;
    uint8_t *pg = st->cache + (size_t)c * PAGE;
    if (st->cache_slot[c] == slot)
        return pg;
    if (st->win_count && !(slot > prev && slot - prev <= 8)) {
        if (pread(st->fd, pg, PAGE, (uint64_t)slot * PAGE) != PAGE)
            return NULL;
        st->cache_slot[c] = slot;
        return pg;
    }
    uint64_t count = st->slots - slot < WINDOW_PAGES ? st->slots - slot : WINDOW_PAGES;
    if (!st->win && !(st->win = aligned((size_t)WINDOW_PAGES * PAGE)))
        return NULL;
    if (pread(st->fd, st->win, count * PAGE, (uint64_t)slot * PAGE) != (ssize_t)(count * PAGE))
        return NULL;
    st->win_first = slot;
    st->win_count = count;
    return st->win;
}

static int store_pages(struct store *st, unsigned npages, const uint8_t *pages)
{
    if (st->fd < 0 || (st->slots + npages) * PAGE > st->cap)
        return fail("the store disk is missing or too small for the pages sent before the freeze");
    if (pwrite(st->fd, pages, (size_t)npages * PAGE, st->slots * PAGE) != (ssize_t)(npages * PAGE))
        return fail("writing the store disk failed: %s", strerror(errno));
    st->slots += npages;
    return 0;
}

static int decompress(int codec, const uint8_t *src, size_t clen, uint8_t *dst, size_t rawlen)
{
    if (codec == C_NONE)
        return clen == rawlen ? (memcpy(dst, src, rawlen), 0) : fail("malformed frame (raw length)");
    if (codec == C_LZ4)
        return LZ4_decompress_safe((const char *)src, (char *)dst, clen, rawlen) == (int)rawlen
                   ? 0 : fail("malformed frame (lz4 data)");
    if (codec == C_ZSTD) {
        size_t r = ZSTD_decompress(dst, rawlen, src, clen);
        return !ZSTD_isError(r) && r == rawlen ? 0 : fail("malformed frame (zstd data)");
    }
    return fail("malformed frame (codec %d)", codec);
}

static int write_snapshot(int snap, const uint8_t *p, size_t n, int first)
{
    struct iovec iov[CHUNK_PAGES];
    while (n) {
        int k = 0;
        for (size_t o = 0; o < n && k < (int)CHUNK_PAGES; o += PAGE)
            iov[k++] = (struct iovec){(uint8_t *)p + o, PAGE};
        ssize_t w = writev(snap, iov, k);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            if (first && (errno == EPERM || errno == EINVAL))
                return fail("the kernel refused the image: kernel or memory size mismatch (%s)", strerror(errno));
            if (errno == ENOMEM)
                return fail("image too large for free memory on the target (%s)", strerror(errno));
            return fail("writing the image to /dev/snapshot failed: %s", strerror(errno));
        }
        p += w;
        n -= w;
        first = 0;
    }
    return 0;
}

/* Seconds the target spent per stage: waiting and MAC checks, decompression, store reads, hashing, writing. */
struct rstages {
    double recv, decompress, store, hash, write;
};

/* Receive HELLO, DATA..., END from c into /dev/snapshot; returns the open fd. */
static int receive_image(struct chan *c, struct store *st, uint64_t *image_out, struct rstages *rs)
{
    struct fhdr h;
    uint8_t *buf = NULL, *raw = aligned(CHUNK_PAGES * PAGE), *lit = malloc(CHUNK_PAGES * PAGE);
    size_t cap = 0;
    int snap = -1;
    XXH3_state_t *sum = XXH3_createState();
    if (!raw || !lit || !sum) {
        fail("out of memory for the image buffers");
        goto bad;
    }
    if (expect(c, F_HELLO, &h, &buf, &cap, sizeof(struct hello_msg)))
        goto bad;
    uint64_t image_bytes = ((struct hello_msg *)buf)->image_bytes, avail = meminfo("MemAvailable");
    if (image_bytes > avail || avail - image_bytes < (32u << 20)) {
        fail("image too large for free memory: %llu MiB image, %llu MiB available on the target",
             (unsigned long long)(image_bytes >> 20), (unsigned long long)(avail >> 20));
        goto bad;
    }
    if ((snap = open(SNAPSHOT_DEV, O_WRONLY | O_CLOEXEC)) < 0) {
        fail("cannot open /dev/snapshot: %s", strerror(errno));
        goto bad;
    }
    XXH3_128bits_reset(sum);
    uint64_t total = 0;
    for (;;) {
        double t0 = now();
        if (recv_frame(c, &h, &buf, &cap))
            goto bad;
        double t1 = now();
        rs->recv += t1 - t0;
        if (h.type == F_END)
            break;
        if (h.type != F_DATA || h.len < sizeof(struct data_head)) {
            fail("unexpected frame type %d in the image", h.type);
            goto bad;
        }
        struct data_head *dh = (struct data_head *)buf;
        if (dh->npages == 0 || dh->npages > CHUNK_PAGES || dh->nref > dh->npages ||
            h.len != sizeof *dh + dh->npages + (size_t)dh->nref * 4 + dh->clen || dh->rawlit % PAGE ||
            dh->rawlit > (dh->npages - dh->nref) * PAGE) {
            fail("malformed data frame");
            goto bad;
        }
        if (total + (uint64_t)dh->npages * PAGE > image_bytes) {
            fail("image longer than announced");
            goto bad;
        }
        const uint8_t *kinds = (uint8_t *)(dh + 1);
        uint32_t refs[CHUNK_PAGES];
        memcpy(refs, kinds + dh->npages, dh->nref * 4);
        const uint8_t *cdata = kinds + dh->npages + dh->nref * 4;
        if (dh->rawlit && decompress(h.flags, cdata, dh->clen, lit, dh->rawlit))
            goto bad;
        double t2 = now();
        rs->decompress += t2 - t1;
        unsigned li = 0, ri = 0;
        for (unsigned i = 0; i < dh->npages; i++) {
            uint8_t *dst = raw + (size_t)i * PAGE;
            if (kinds[i] == K_ZERO) {
                memset(dst, 0, PAGE);
            } else if (kinds[i] == K_LIT && li < dh->rawlit / PAGE) {
                memcpy(dst, lit + (size_t)li++ * PAGE, PAGE);
            } else if (kinds[i] == K_REF && ri < dh->nref && refs[ri] < st->slots) {
                const uint8_t *pg = store_page(st, refs[ri++]);
                if (!pg) {
                    fail("reading the store disk failed: %s", strerror(errno));
                    goto bad;
                }
                memcpy(dst, pg, PAGE);
            } else {
                fail("malformed data frame (page kinds)");
                goto bad;
            }
        }
        if (li != dh->rawlit / PAGE || ri != dh->nref) {
            fail("malformed data frame (page counts)");
            goto bad;
        }
        size_t n = (size_t)dh->npages * PAGE;
        double t3 = now();
        rs->store += t3 - t2;
        for (unsigned i = 0; i < dh->npages; i++)
            page_hash(raw + (size_t)i * PAGE, kinds[i] == K_ZERO, sum);
        double t4 = now();
        rs->hash += t4 - t3;
        if (write_snapshot(snap, raw, n, total == 0))
            goto bad;
        rs->write += now() - t4;
        total += n;
    }
    if (h.len != sizeof(struct end_msg)) {
        fail("malformed end frame");
        goto bad;
    }
    struct end_msg *em = (struct end_msg *)buf;
    XXH128_canonical_t canon;
    XXH128_canonicalFromHash(&canon, XXH3_128bits_digest(sum));
    if (em->image_bytes != image_bytes || total != image_bytes) {
        fail("image incomplete: %llu of %llu bytes", (unsigned long long)total, (unsigned long long)image_bytes);
        goto bad;
    }
    if (memcmp(canon.digest, em->sum, 16)) {
        fail("image checksum mismatch");
        goto bad;
    }
    *image_out = total;
    goto done;
bad:
    if (snap >= 0)
        close(snap);
    snap = -1;
done:
    free(buf);
    free(raw);
    free(lit);
    XXH3_freeState(sum);
    return snap;
}

/* Test-only faults on the target (a file the test writes into the machine): "drop-ack" restores
 * without acknowledging, "vanish" exits without a word once the image is complete. */
static char fault[16];

static void read_fault(void)
{
#ifndef PMAGENT_FUZZ
    FILE *f = fopen("/run/memvirt-pm.fault", "r");
    if (f) {
        if (!fgets(fault, sizeof fault, f))
            fault[0] = 0;
        fault[strcspn(fault, "\r\n")] = 0;
        fclose(f);
        unlink("/run/memvirt-pm.fault");
    }
#endif
}

/* The target's side of one migration over an accepted connection; returns on failure only
 * (a successful restore never returns: this machine becomes the source's). */
static void recv_session(struct chan *net, const struct target_opts *o)
{
    struct fhdr h;
    uint8_t *buf = NULL, *page_buf = NULL;
    size_t cap = 0;
    struct store st = {.fd = -1};
    struct chan disk = {.fd = -1};
    int snap = -1;
    if (expect(net, F_OPEN, &h, &buf, &cap, sizeof(struct open_msg)))
        goto out;
    struct open_msg om = *(struct open_msg *)buf;
    struct utsname u;
    uname(&u);
    om.release[64] = om.version[64] = 0;
    if (memcmp(om.magic, "MVPM1", 6) || om.scheme > S_ITERATIVE || om.codec > C_ZSTD) {
        fail("malformed open frame");
        goto out;
    }
    if (strcmp(om.release, u.release) || strcmp(om.version, u.version)) {
        fail("kernel mismatch: source runs %s %s, this machine %s %s", om.release, om.version, u.release, u.version);
        goto out;
    }
    if (om.ram_bytes != meminfo("MemTotal")) {
        fail("memory size mismatch: source has %llu MiB, this machine %llu MiB",
             (unsigned long long)(om.ram_bytes >> 20), (unsigned long long)(meminfo("MemTotal") >> 20));
        goto out;
    }
    struct ready_msg rm = {meminfo("MemAvailable")};
    if (send_frame(net, F_READY, 0, &rm, sizeof rm))
        goto out;
    event("accepted scheme=%s compress=%s", SCHEMES[om.scheme], CODECS[om.codec]);
    double t0 = now();
    if (om.scheme == S_ITERATIVE) {
        if (o->store && (st.fd = open_disk(o->store, O_RDWR)) < 0)
            goto out;
        if (st.fd >= 0)
            st.cap = lseek(st.fd, 0, SEEK_END);
        if (!(page_buf = aligned(CHUNK_PAGES * PAGE))) {
            fail("out of memory for the page buffer");
            goto out;
        }
        for (;;) {
            if (recv_frame(net, &h, &buf, &cap))
                goto out;
            if (h.type == F_PRECOPY_END)
                break;
            struct data_head *dh = (struct data_head *)buf;
            if (h.type != F_PAGES || h.len < sizeof *dh || !dh->npages || dh->npages > CHUNK_PAGES ||
                dh->rawlit != dh->npages * PAGE || h.len != sizeof *dh + (size_t)dh->clen) {
                fail("malformed page frame");
                goto out;
            }
            if (decompress(h.flags, buf + sizeof *dh, dh->clen, page_buf, dh->rawlit) ||
                store_pages(&st, dh->npages, page_buf))
                goto out;
        }
        event("precopied pages=%llu seconds=%.3f", (unsigned long long)st.slots, now() - t0);
    }
    struct chan *src = net;
    if (om.scheme == S_DISK) {
        if (expect(net, F_DISK, &h, &buf, &cap, sizeof(struct disk_msg)))
            goto out;
        disk_keys(&disk, net);
        disk.disk = 1;
        disk.dbuf = aligned(DISK_BUF);
        disk.dlimit = ((struct disk_msg *)buf)->stream_bytes;
        if (!o->disk || (disk.fd = open_disk(o->disk, O_RDONLY)) < 0 || !disk.dbuf) {
            if (!o->disk)
                fail("disk scheme but this machine has no shared disk");
            else if (!disk.dbuf)
                fail("out of memory for the disk buffer");
            goto out;
        }
        src = &disk;
    }
    double t1 = now();
    event("receiving");
    uint64_t image_bytes = 0;
    struct rstages rs = {0, 0, 0, 0, 0};
    if ((snap = receive_image(src, &st, &image_bytes, &rs)) < 0)
        goto out;
    double t2 = now();
    event("received image=%llu wire=%llu seconds=%.3f recv=%.3f decompress=%.3f store=%.3f hash=%.3f write=%.3f",
          (unsigned long long)image_bytes, (unsigned long long)(src->wire), t2 - t1, rs.recv, rs.decompress,
          rs.store, rs.hash, rs.write);
    if (!strcmp(fault, "vanish"))
        _exit(3);
    if (ioctl(snap, SNAPSHOT_FREEZE, 0)) {
        fail("freezing the target failed: %s", strerror(errno));
        goto out;
    }
    if (!strcmp(fault, "drop-ack")) {
        shutdown(net->fd, SHUT_RDWR);
    } else if (send_frame(net, F_ACK, 0, "ok", 3)) {
        ioctl(snap, SNAPSHOT_UNFREEZE, 0);
        goto out;
    }
    event("restoring");
    ioctl(snap, SNAPSHOT_ATOMIC_RESTORE, 0);
    fail("atomic restore failed: %s", strerror(errno));
    ioctl(snap, SNAPSHOT_UNFREEZE, 0);
    close(snap);
    snap = -1;
    event("failed error=\"%s\"", errmsg);
    fail("");
out:
    if (snap >= 0)
        close(snap);
    if (st.fd >= 0)
        close(st.fd);
    if (disk.fd >= 0)
        close(disk.fd);
    chan_free(&disk);
    free(disk.dbuf);
    free(st.win);
    free(st.cache);
    free(page_buf);
    free(buf);
}

static int cmd_recv(const struct target_opts *o)
{
    role = "target";
    struct chan net = {.fd = -1};
    read_fault();
    if (load_keys(&net, 0) || (net.fd = accept_one(o->listen, o->timeout)) < 0) {
        event("failed error=\"%s\"", errmsg);
        fprintf(stderr, "pmagent: %s\n", errmsg);
        return 1;
    }
    recv_session(&net, o);
    if (*errmsg) { /* empty: the failure after the restore was already reported */
        send_err(&net);
        event("failed error=\"%s\"", errmsg);
        fprintf(stderr, "pmagent: %s\n", errmsg);
    }
    chan_free(&net);
    close(net.fd);
    return 1;
}

/* --- link measurement -------------------------------------------------------- */

static int cmd_netbench(int sender, const char *ep, uint64_t bytes, int timeout)
{
    role = "netbench";
    size_t bs = 1 << 20;
    uint8_t *b = calloc(1, bs);
    int fd = sender ? dial(ep) : accept_one(ep, timeout);
    if (fd < 0) {
        fprintf(stderr, "pmagent: %s\n", errmsg);
        return 1;
    }
    double t0 = now();
    uint64_t done = 0;
    if (sender) {
        for (unsigned i = 0; i < bs; i++)
            b[i] = (uint8_t)(i * 2654435761u >> 13);
        while (done < bytes) {
            size_t k = bytes - done < bs ? bytes - done : bs;
            if (write_all(fd, b, k))
                break;
            done += k;
        }
        shutdown(fd, SHUT_WR);
        char c;
        while (read(fd, &c, 1) > 0)
            ;
    } else {
        ssize_t r;
        while ((r = read(fd, b, bs)) > 0)
            done += r;
    }
    double dt = now() - t0;
    printf("netbench bytes=%llu seconds=%.3f mbps=%.2f\n", (unsigned long long)done, dt, done / dt / 1e6);
    close(fd);
    return done == bytes || !sender ? 0 : 1;
}

/* --- CPU cost of each stage of the stream, on this machine ------------------ */

static double rate(double t0, size_t n)
{
    return n / (now() - t0) / 1e6;
}

/* MB/s of each per-byte step, over a 2:1-compressible, partly zero buffer like an image. */
static int cmd_speed(size_t mib)
{
    size_t n = mib << 20, bound = ZSTD_compressBound(CHUNK_PAGES * PAGE);
    uint8_t *buf = malloc(n), *dst = malloc(bound), *back = malloc(CHUNK_PAGES * PAGE), tag[TAG];
    uint64_t x = 88172645463325252ull, acc = 0;
    for (size_t i = 0; i < n / 8; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        ((uint64_t *)buf)[i] = (i / 512) % 5 == 0 ? 0 : (i % 2 ? x : i);
    }
    double t = now();
    for (size_t o = 0; o < n; o += PAGE)
        acc += is_zero(buf + o);
    printf("zero-check %.0f\n", rate(t, n));
    t = now();
    for (size_t o = 0; o < n; o += PAGE)
        acc += XXH3_64bits(buf + o, PAGE);
    printf("xxh3-page %.0f\n", rate(t, n));
    t = now();
    acc += XXH3_128bits(buf, n).low64;
    printf("xxh3-128 %.0f\n", rate(t, n));
    const EVP_CIPHER *ciphers[] = {EVP_aes_256_gcm(), EVP_chacha20_poly1305()};
    const char *cnames[] = {"aes-256-gcm", "chacha20-poly1305"};
    uint8_t key[32] = {1}, iv[12] = {0};
    for (int ci = 0; ci < 2; ci++) {
        EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
        int len;
        EVP_EncryptInit_ex(ctx, ciphers[ci], NULL, key, iv);
        t = now();
        for (size_t o = 0; o < n; o += CHUNK_PAGES * PAGE) {
            EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv);
            EVP_EncryptUpdate(ctx, dst, &len, buf + o, CHUNK_PAGES * PAGE);
            EVP_EncryptFinal_ex(ctx, dst, &len);
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG, tag);
        }
        printf("%s %.0f\n", cnames[ci], rate(t, n));
        EVP_CIPHER_CTX_free(ctx);
    }
    size_t clen = 0;
    t = now();
    for (size_t o = 0; o < n; o += CHUNK_PAGES * PAGE)
        clen += LZ4_compress_default((char *)buf + o, (char *)dst, CHUNK_PAGES * PAGE, bound);
    printf("lz4 %.0f ratio=%.2f\n", rate(t, n), (double)n / clen);
    int c1 = LZ4_compress_default((char *)buf, (char *)dst, CHUNK_PAGES * PAGE, bound);
    t = now();
    for (size_t o = 0; o < n; o += CHUNK_PAGES * PAGE)
        acc += LZ4_decompress_safe((char *)dst, (char *)back, c1, CHUNK_PAGES * PAGE);
    printf("lz4-decompress %.0f\n", rate(t, n));
    ZSTD_CCtx *z = ZSTD_createCCtx();
    clen = 0;
    t = now();
    for (size_t o = 0; o < n; o += CHUNK_PAGES * PAGE)
        clen += ZSTD_compressCCtx(z, dst, bound, buf + o, CHUNK_PAGES * PAGE, 1);
    printf("zstd-1 %.0f ratio=%.2f\n", rate(t, n), (double)n / clen);
    size_t z1 = ZSTD_compressCCtx(z, dst, bound, buf, CHUNK_PAGES * PAGE, 1);
    t = now();
    for (size_t o = 0; o < n; o += CHUNK_PAGES * PAGE)
        acc += ZSTD_decompress(back, CHUNK_PAGES * PAGE, dst, z1);
    printf("zstd-decompress %.0f\n", rate(t, n));
    t = now();
    for (size_t o = 0; o < n; o += CHUNK_PAGES * PAGE)
        memcpy(back, buf + o, CHUNK_PAGES * PAGE);
    printf("memcpy %.0f\n", rate(t, n));
    return acc == 42;
}

/* --- main ------------------------------------------------------------------ */

static int usage(void)
{
    fprintf(stderr,
            "usage: pmagent send --to IP:PORT [--scheme memory|disk|iterative] [--compress none|lz4|zstd]\n"
            "                    [--disk DEV] [--verdict DEV] [--shrink | --image-size BYTES]\n"
            "       pmagent recv --listen IP:PORT [--disk DEV] [--store DEV] [--timeout S]\n"
            "       pmagent netbench send --to IP:PORT --bytes N | netbench recv --listen IP:PORT\n"
            "       pmagent speed [MIB]   (MB/s of each stream stage on this machine)\n"
            "  the key (hex) comes from the file $PMAGENT_KEY_FILE or $PMAGENT_KEY\n");
    return 2;
}

static int pick(const char *v, const char **names, int n)
{
    for (int i = 0; v && i < n; i++)
        if (!strcmp(v, names[i]))
            return i;
    return -1;
}

#ifdef PMAGENT_FUZZ
#include <sys/wait.h>

/*
 * Test-only entry (tests/unit/test_pm_fuzz.py): the target's session over each
 * case of a corpus, fed through a socketpair by a child process. CORPUS holds
 * records of u32 network length, u32 disk length, the bytes the source sends,
 * and the shared disk's content (written to DISK first). Prints one line per
 * case, "case N: ERROR", and stops a case that runs for more than 20 s.
 * "verdict DEV" prints the verdict a waiting source reads from DEV.
 */
int main(int argc, char **argv)
{
    t_start = now();
    static const uint8_t zeros[PAGE];
    zero_hash = XXH3_64bits(zeros, PAGE);
    signal(SIGPIPE, SIG_IGN);
    if (argc == 3 && !strcmp(argv[1], "verdict")) { /* what a waiting source makes of a verdict device */
        struct chan c = {.fd = -1};
        if (load_keys(&c, 1))
            return 2;
        int v = read_verdict(argv[2]);
        printf("verdict %s\n", v == V_OFF ? "off" : v == V_THAW ? "thaw" : "none");
        return 0;
    }
    if (argc != 4) {
        fprintf(stderr, "usage: pmagent-fuzz CORPUS STORE DISK | verdict DEV\n");
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f)
        return 2;
    struct target_opts o = {NULL, argv[3], argv[2], 0};
    role = "target";
    for (unsigned n = 0;; n++) {
        uint32_t len[2];
        if (fread(len, 4, 2, f) != 2)
            break;
        if (len[0] > (64u << 20) || len[1] > (64u << 20))
            return 2;
        uint8_t *net = malloc(len[0] + 1), *dsk = malloc(len[1] + 1);
        if (!net || !dsk || fread(net, 1, len[0], f) != len[0] || fread(dsk, 1, len[1], f) != len[1])
            return 2;
        int fd = open(argv[3], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || write_all(fd, dsk, len[1]) || close(fd))
            return 2;
        fd = open(argv[2], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        if (fd < 0 || ftruncate(fd, 16u << 20) || close(fd))
            return 2;
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv))
            return 2;
        fflush(stdout);
        fflush(stderr);
        pid_t pid = fork();
        if (pid < 0)
            return 2;
        if (pid == 0) {
            close(sv[0]);
            write_all(sv[1], net, len[0]);
            shutdown(sv[1], SHUT_WR);
            char drain[4096];
            while (read(sv[1], drain, sizeof drain) > 0)
                ;
            _exit(0);
        }
        close(sv[1]);
        struct chan c = {.fd = sv[0]};
        errmsg[0] = 0;
        peer_refused = 0;
        alarm(20);
        if (load_keys(&c, 0))
            return 2;
        recv_session(&c, &o);
        alarm(0);
        if (*errmsg)
            send_err(&c);
        chan_free(&c);
        close(sv[0]);
        waitpid(pid, NULL, 0);
        printf("case %u: %s\n", n, errmsg);
        free(net);
        free(dsk);
    }
    fclose(f);
    return 0;
}
#else
int main(int argc, char **argv)
{
    t_start = now();
    static const uint8_t zeros[PAGE];
    zero_hash = XXH3_64bits(zeros, PAGE);
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2)
        return usage();
    const char *cmd = argv[1];
    if (!strcmp(cmd, "speed"))
        return cmd_speed(argc > 2 ? strtoul(argv[2], NULL, 10) : 64);
    int bench = !strcmp(cmd, "netbench"), first = bench ? 3 : 2;
    if (bench && argc < 3)
        return usage();
    struct source_opts so = {NULL, NULL, NULL, S_MEMORY, C_LZ4, -1};
    struct target_opts to = {NULL, NULL, NULL, 600};
    uint64_t bytes = 64u << 20;
    for (int i = first; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--shrink")) {
            so.image_size = 0;
            continue;
        }
        if (!v)
            return usage();
        i++;
        if (!strcmp(a, "--to"))
            so.to = v;
        else if (!strcmp(a, "--listen"))
            to.listen = v;
        else if (!strcmp(a, "--disk"))
            so.disk = to.disk = v;
        else if (!strcmp(a, "--store"))
            to.store = v;
        else if (!strcmp(a, "--verdict"))
            so.verdict = v;
        else if (!strcmp(a, "--timeout"))
            to.timeout = atoi(v);
        else if (!strcmp(a, "--image-size"))
            so.image_size = strtoll(v, NULL, 10);
        else if (!strcmp(a, "--bytes"))
            bytes = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--scheme")) {
            if ((so.scheme = pick(v, SCHEMES, 3)) < 0)
                return usage();
        } else if (!strcmp(a, "--compress")) {
            if ((so.codec = pick(v, CODECS, 3)) < 0)
                return usage();
        } else
            return usage();
    }
    if (bench) {
        int sender = !strcmp(argv[2], "send");
        if (sender ? !so.to : !to.listen)
            return usage();
        return cmd_netbench(sender, sender ? so.to : to.listen, bytes, to.timeout);
    }
    if (!strcmp(cmd, "send")) {
        if (!so.to || (so.scheme == S_DISK && !so.disk))
            return usage();
        return cmd_send(&so);
    }
    if (!strcmp(cmd, "recv")) {
        if (!to.listen)
            return usage();
        return cmd_recv(&to);
    }
    return usage();
}
#endif
