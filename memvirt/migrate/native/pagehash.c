/*
 * pagehash - XXH64 (seed 0) of every 4 KiB page of a buffer, for memvirt's migration.
 *
 * Same values as xxhash.xxh64_intdigest(page), so sender, receiver and the numpy fallback agree.
 * Pages whose skip[i] is non-zero get hash 0 without being read (free pages, file holes).
 */
#include <stdint.h>
#include <string.h>

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL
#define PAGE 4096

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rnd(uint64_t acc, uint64_t in) { acc += in * P2; acc = rotl(acc, 31); return acc * P1; }
static inline uint64_t merge(uint64_t acc, uint64_t v) { acc ^= rnd(0, v); return acc * P1 + P4; }

static uint64_t xxh64_page(const uint8_t *p)
{
    uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = -P1, w[4];
    for (int i = 0; i < PAGE; i += 32) {
        memcpy(w, p + i, 32);
        v1 = rnd(v1, w[0]); v2 = rnd(v2, w[1]); v3 = rnd(v3, w[2]); v4 = rnd(v4, w[3]);
    }
    uint64_t h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
    h = merge(h, v1); h = merge(h, v2); h = merge(h, v3); h = merge(h, v4);
    h += PAGE;
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

void hash_pages(const uint8_t *base, uint64_t n, const uint8_t *skip, uint64_t *out)
{
    for (uint64_t i = 0; i < n; i++)
        out[i] = (skip && skip[i]) ? 0 : xxh64_page(base + i * PAGE);
}
