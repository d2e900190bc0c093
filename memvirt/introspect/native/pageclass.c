/*
 * The inner loops of memvirt's page census, for when numpy's many passes over a strided
 * struct page array are too slow (a 4 GiB guest has a million struct pages; the census must
 * take milliseconds). Each function does one pass; the Python side (census.py) keeps the
 * logic's description and a numpy version of each, and tests check both agree.
 *
 * Built by memvirt.introspect.pageclass with: gcc -O2 -shared -fPIC
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Class codes, as memvirt.introspect.census.CLASSES orders them. */
enum { UNBACKED, RESERVED, FREE, FREE_PCP, PAGE_CACHE, ANON, SLAB, PAGE_TABLE, KERNEL };

struct layout {
    uint64_t stride;        /* sizeof(struct page) */
    uint64_t off_flags, off_head, off_mapping, off_type, off_private, off_lru;
    uint64_t head_mask;     /* PG_head as a mask */
    int64_t top_byte;       /* 1: page type in the top byte (6.12+), 0: a cleared bit (4.18..6.11) */
    uint64_t buddy;         /* type value that means buddy (byte or full word) */
    int64_t table;          /* type value for page tables, -1 if unknown */
    int64_t slab_type;      /* type value for slab, -1 if slab is a flag */
    int64_t slab_bit;       /* PG_slab bit, -1 if slab is a type */
    int64_t reserved_bit;   /* PG_reserved bit, -1 if unknown */
    uint64_t max_order;     /* buddy orders are below this (the length of zone.free_area) */
};

static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static inline int is_type(const struct layout *l, uint32_t t, uint64_t value)
{
    return l->top_byte ? (t >> 24) == value : t == value;
}

/*
 * Classify the n struct pages of frames first_pfn.. (all_classes is indexed by frame number).
 * Returns the buddy heads in buddy_idx/buddy_private, and in tail_idx/tail_head the tail pages
 * whose compound_head does not point at a lower frame's struct page (inconsistent).
 * The struct pages inside a free buddy block describe nothing the census needs, so the loop
 * jumps over them: an idle guest's census reads a small part of its struct page array.
 */
void classify_block(const struct layout *l, const uint8_t *pages, uint64_t n, uint8_t *all_classes,
                    uint64_t first_pfn, uint64_t vmemmap, uint64_t *lru_next, int64_t *buddy_idx,
                    uint64_t *buddy_private, uint64_t *nbuddy, int64_t *tail_idx, uint64_t *tail_head,
                    uint64_t *ntail)
{
    uint64_t nb = 0, nt = 0;
    uint8_t *classes = all_classes + first_pfn;

    for (uint64_t i = 0; i < n; i++) {
        const uint8_t *p = pages + i * l->stride;
        uint64_t flags = rd64(p + l->off_flags);
        uint64_t head = rd64(p + l->off_head);
        uint64_t mapping = rd64(p + l->off_mapping);
        uint32_t type = rd32(p + l->off_type);
        uint8_t c = KERNEL;

        if (mapping != 0 && (mapping & 3) == 0)
            c = PAGE_CACHE;
        if (mapping & 1)
            c = ANON;
        if ((flags & l->head_mask) && mapping == 0)
            c = SLAB;
        if (l->table >= 0 && is_type(l, type, (uint64_t)l->table))
            c = PAGE_TABLE;
        if ((l->slab_type >= 0 && is_type(l, type, (uint64_t)l->slab_type)) ||
            (l->slab_bit >= 0 && ((flags >> l->slab_bit) & 1)))
            c = SLAB;
        if (l->reserved_bit >= 0 && ((flags >> l->reserved_bit) & 1))
            c = RESERVED;
        classes[i] = c;
        lru_next[i] = rd64(p + l->off_lru);
        if (is_type(l, type, l->buddy)) {
            uint64_t order = rd64(p + l->off_private);
            buddy_idx[nb] = (int64_t)i;
            buddy_private[nb++] = order;
            if (order > 0 && order < l->max_order) {
                uint64_t end = i + ((uint64_t)1 << order);
                if (end > n)
                    end = n;
                memset(classes + i, FREE, end - i);
                memset(lru_next + i + 1, 0, (end - i - 1) * sizeof(*lru_next));
                i = end - 1;
                continue;
            }
        }
        if (head & 1) {
            /* A tail takes its head's class; the head sits at a lower frame, so it is done.
             * compound_head is the head's address + 1, or (7.x, power-of-2 struct page) a mask
             * + 1 that the tail's own address is ANDed with: see census.compound_head_pfns. */
            uint64_t v = head - 1, at = v;
            if (v && ((-v) & (-v - 1)) == 0)
                at = (vmemmap + (first_pfn + i) * l->stride) & v;
            uint64_t rel = at - vmemmap, hp = rel / l->stride;
            if (at >= vmemmap && rel % l->stride == 0 && hp < first_pfn + i) {
                classes[i] = all_classes[hp];
            } else {
                tail_idx[nt] = (int64_t)i;
                tail_head[nt++] = head;
            }
        }
    }
    *nbuddy = nb;
    *ntail = nt;
}

/* classes[start[k] .. start[k] + (1 << order[k])) = code, clipped to n. */
void mark_blocks(uint8_t *classes, uint64_t n, const int64_t *start, const int64_t *order, uint64_t count,
                 uint8_t code)
{
    for (uint64_t k = 0; k < count; k++) {
        uint64_t s = (uint64_t)start[k], e;
        if (s >= n || order[k] < 0)
            continue;
        e = order[k] >= 63 || s + ((uint64_t)1 << order[k]) < s ? n : s + ((uint64_t)1 << order[k]);
        memset(classes + s, code, (e > n ? n : e) - s);
    }
}

/* Histogram of class codes; four interleaved tables keep the increments independent. */
void count_codes(const uint8_t *classes, uint64_t n, uint64_t *counts, uint64_t ncodes)
{
    uint64_t h[4][256] = { { 0 } };
    uint64_t i = 0;

    for (; i + 4 <= n; i += 4) {
        h[0][classes[i]]++;
        h[1][classes[i + 1]]++;
        h[2][classes[i + 2]]++;
        h[3][classes[i + 3]]++;
    }
    for (; i < n; i++)
        h[0][classes[i]]++;
    for (uint64_t c = 0; c < ncodes; c++)
        counts[c] = h[0][c] + h[1][c] + h[2][c] + h[3][c];
}

/*
 * Follow a list_head chain through struct pages: start at `first` (the list head's next),
 * stop at `sentinel` (the list head's own address). Writes page frame numbers; returns how many,
 * or -1 if a link leaves the array, the list is longer than max_out, or it meets a frame
 * already marked in `visited` (a cycle, or a page on two lists: the guest wrote the links).
 * Frames walked are marked, so walks sharing `visited` take at most npfn steps in all.
 */
int64_t walk_list(const uint64_t *lru_next, uint64_t npfn, uint64_t first, uint64_t sentinel,
                  uint64_t vmemmap, uint64_t lru_off, uint64_t stride, int64_t *out, uint64_t max_out,
                  uint8_t *visited)
{
    uint64_t k = 0, node = first;

    while (node != sentinel) {
        uint64_t rel = node - lru_off - vmemmap, pfn = rel / stride;
        if (node < vmemmap + lru_off || rel % stride || pfn >= npfn || k >= max_out || visited[pfn])
            return -1;
        visited[pfn] = 1;
        out[k++] = (int64_t)pfn;
        node = lru_next[pfn];
    }
    return (int64_t)k;
}
