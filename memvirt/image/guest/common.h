/* Helpers shared by memvirt's static guest programs (included, not linked: each program is one
 * translation unit compiled by the image builder, memvirt/image/build.py). */
#ifndef MEMVIRT_GUEST_COMMON_H
#define MEMVIRT_GUEST_COMMON_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>

/* "123", "64M", "1.5GiB" (binary units); with allow_rate also "10M/s". 0 on success. */
static inline int parse_size(const char *s, uint64_t *out, int allow_rate)
{
    char *end;
    double v;
    uint64_t mul = 1;

    if (!s || !*s || *s == '-')
        return -1;
    errno = 0;
    v = strtod(s, &end);
    if (errno || end == s || v < 0)
        return -1;
    switch (*end) {
    case 'k': case 'K': mul = 1ULL << 10; end++; break;
    case 'm': case 'M': mul = 1ULL << 20; end++; break;
    case 'g': case 'G': mul = 1ULL << 30; end++; break;
    case 't': case 'T': mul = 1ULL << 40; end++; break;
    default: break;
    }
    if (mul > 1 && *end == 'i')
        end++;
    if (*end == 'B' || *end == 'b')
        end++;
    if (allow_rate && end[0] == '/' && end[1] == 's')
        end += 2;
    if (*end)
        return -1;
    v *= (double)mul;
    if (v > 1.8e19)
        return -1;
    *out = (uint64_t)v;
    return 0;
}

/* A decimal or 0x-prefixed hexadecimal unsigned 64-bit number, nothing after it. 0 on success. */
static inline int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    int base = 10;

    if (!s || !*s || *s == '-')
        return -1;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X'))
        base = 16;
    errno = 0;
    *out = strtoull(s, &end, base);
    return (errno || end == s || *end) ? -1 : 0;
}

#endif
