/*
 * pagehash - XXH3-64 (seed 0) of every 4 KiB page of a buffer, for memvirt's migration and dedup.
 *
 * Same values as xxhash.xxh3_64_intdigest(page), so sender, receiver and the numpy fallback agree.
 * Pages whose skip[i] is non-zero get hash 0 without being read (free pages, file holes).
 * The header-only xxhash (libxxhash-dev) gives the SIMD loop; a page is hashed at memory speed.
 */
#define XXH_INLINE_ALL
#include <stdint.h>
#include <xxhash.h>

#define PAGE 4096

void hash_pages(const uint8_t *base, uint64_t n, const uint8_t *skip, uint64_t *out)
{
    for (uint64_t i = 0; i < n; i++)
        out[i] = (skip && skip[i]) ? 0 : XXH3_64bits(base + i * PAGE, PAGE);
}
