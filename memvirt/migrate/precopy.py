"""Precopy rounds: what changed since it was sent, what is free, what is zero or a duplicate.

The sender keeps, per guest frame, the fingerprint of the bytes the target holds (``held``): a
fresh target RAM file is all holes, so it starts as the zero page's fingerprint everywhere. Round 0
fingerprints the guest's non-free, populated pages. A later round looks only at its *candidates*:
with the dirty tracker (:mod:`memvirt.qemu.dirty`), the frames written (or punched) since the
previous round's scan plus those that were free at the previous census and are not now; without
it (no ``PAGEMAP_SCAN``), every non-free page, fingerprinted again. Every frame a round does not
look at keeps its ``held`` fingerprint as its current one. Then:

* punches on the target every page the guest holds free whose target copy is not zero (the
  target then reads zero there, as a page never sent does);
* sends changed all-zero pages as run markers (the target punches them too);
* sends a changed page whose content the target already holds in a page left unchanged, or that
  an earlier page of this round carries, as a reference (``dst <- src``), bytes checked equal;
* sends the rest in batches of contiguous runs, compressed.

``held`` is only ever set from what the target was told: a DATA page gets the fingerprint of the
bytes actually read and sent (the guest may have written it after it was fingerprinted), a
reference the source page's ``held``. A page the guest writes after its round read it is reported
by the next scan, so after the final round, on the paused guest, every non-free page's bytes are
the ones whose fingerprint is ``held``, and the target holds them: :meth:`Tracker.verify` checks
exactly that by fingerprinting everything (``--verify full``), the receiver's digest of what it
received (XXH3-128 over ``held``) checks the link cheaply on every migration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import xxhash

from memvirt.errors import MemvirtError
from memvirt.memory.pagehash import ZERO_HASH, hash_pages
from memvirt.memory.ramfile import RamFileMemory
from memvirt.memory.source import PAGE_SIZE
from memvirt.migrate import codec
from memvirt.migrate.protocol import QUEUE_DEPTH, Kind

BATCH_PAGES = 256
DUP_CHECK = 4096
MAX_PAIRS = 1 << 20
RING = QUEUE_DEPTH + 3
"""Batch buffers reused in turn: a DATA frame may be queued (QUEUE_DEPTH) or on the socket (1)
while the next is read, so a buffer comes round again only after its frame was sent. Reusing
them spares the page faults of a fresh megabyte per batch."""

Send = Callable[[Kind, list[bytes | bytearray | memoryview]], int]
"""Sends one frame made of the given pieces; returns its size on the wire."""


@dataclass
class Round:
    """What one round found and sent (pages, except ``*_bytes`` and seconds)."""

    index: int
    final: bool = False
    free: int = 0
    discarded: int = 0
    changed: int = 0
    zero: int = 0
    dup: int = 0
    data: int = 0
    data_bytes: int = 0
    wire_bytes: int = 0
    hashed: int = 0
    written: int = 0
    """Frames the dirty tracker reported for this round (0 in round 0 and without a tracker)."""
    interval: float = 0.0
    """Seconds since the previous scan (what ``written`` accumulated over)."""
    throttle: float = 0.0
    scan_seconds: float = 0.0
    hash_seconds: float = 0.0
    send_seconds: float = 0.0
    seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


class Tracker:
    """The sender's record of what the target holds, and one precopy round over a RAM file."""

    def __init__(self, mem: RamFileMemory, chooser: codec.CodecChooser):
        self.mem = mem
        self.chooser = chooser
        self.max_pfn = mem.max_pfn
        self.held = np.full(self.max_pfn, ZERO_HASH, dtype=np.uint64)
        self.ram = np.zeros(self.max_pfn, dtype=bool)
        for a, b in mem.pfn_ranges():
            self.ram[a:b] = True
        self._populated: np.ndarray | None = None
        """Frames the RAM file backs, as of the last round (only the holes are probed again)."""
        self.redo = np.zeros(self.max_pfn, dtype=bool)
        """Frames the next round must look at although nobody wrote them: a reference to a page of
        the same round whose bytes changed between the byte check and its send (the target copied
        the new bytes; the source's page still has the old)."""
        self._known: tuple[np.ndarray, np.ndarray] | None = None
        """``held`` of every page that held non-zero content at the end of the last round, sorted,
        with its frames: the dedup index, built outside the pause."""
        self._ring = [np.empty((BATCH_PAGES, PAGE_SIZE), dtype=np.uint8) for _ in range(RING)]
        self._turn = 0
        self._views: list[tuple[int, int, np.ndarray]] = []
        for r in mem.regions:
            view = mem.view(r.gpa, r.size)
            if view is None:
                raise MemvirtError(f"{mem.describe()} cannot be mapped for migration")
            self._views.append((r.gpa // PAGE_SIZE, r.end // PAGE_SIZE, view.reshape(-1, PAGE_SIZE)))

    def digest(self) -> str:
        """What the target must hold, in one value: XXH3-128 over ``held``."""
        return xxhash.xxh3_128_hexdigest(self.held.tobytes())

    def fingerprints(
        self, free: np.ndarray, cand: np.ndarray | None = None, holes: np.ndarray | None = None
    ) -> tuple[np.ndarray, int]:
        """Fingerprint of every frame now (free pages, file holes and non-RAM count as zero);
        also how many pages were read. With ``cand`` (bool per frame) only those frames are read
        and every other keeps its ``held`` fingerprint; ``holes`` are frames known to have been
        punched since (probed again rather than read, which would fill them)."""
        if holes is not None and len(holes) and self._populated is not None:
            self._populated[holes] = False
        populated = self._populated = self.mem.populated_pfns(self._populated)
        if cand is None:
            cur = np.full(self.max_pfn, ZERO_HASH, dtype=np.uint64)
            read = ~free & populated
        else:
            cand = cand | self.redo
            self.redo[:] = False
            cur = self.held.copy()
            cur[free | (cand & ~populated)] = ZERO_HASH
            read = cand & ~free & populated
        hashed = 0
        for p0, p1, pages in self._views:
            rd = read[p0:p1]
            if cand is not None and not rd.any():
                continue
            h = hash_pages(pages.reshape(-1), ~rd)
            cur[p0:p1] = np.where(rd, h, cur[p0:p1] if cand is not None else np.uint64(ZERO_HASH))
            hashed += int(rd.sum())
        return cur, hashed

    def verify(self, free: np.ndarray) -> int:
        """Pages in use whose bytes now differ from what the target was sent (``--verify full``,
        on the paused guest after the final round): 0 is the migration's invariant."""
        cur, _ = self.fingerprints(free)
        return int((self.ram & ~free & (cur != self.held)).sum())

    def run(
        self,
        index: int,
        free: np.ndarray,
        send: Send,
        final: bool = False,
        cand: np.ndarray | None = None,
        holes: np.ndarray | None = None,
    ) -> Round:
        """One round: fingerprint (all pages, or the candidates ``cand``), plan, send every frame
        (not ROUND_END)."""
        t0 = time.perf_counter()
        st = Round(index, final, free=int(free.sum()))
        cur, st.hashed = self.fingerprints(free, cand, holes)
        st.hash_seconds = time.perf_counter() - t0
        discard = np.flatnonzero(free & (self.held != ZERO_HASH))
        changed = ~free & self.ram & (cur != self.held)
        st.changed = int(changed.sum())
        zero = np.flatnonzero(changed & (cur == ZERO_HASH))
        zero = zero[self._all_zero(zero)]
        changed[zero] = False
        data, dst, src = self._dups(np.flatnonzero(changed), cur, free)
        ts = time.perf_counter()
        for kind, pages in ((Kind.DISCARD, discard), (Kind.ZERO, zero)):
            for part in _split(pages, MAX_PAIRS):
                starts, lengths = codec.runs(part)
                st.wire_bytes += send(kind, [codec.encode_pairs(starts, lengths)])
            self.held[pages] = ZERO_HASH
        st.discarded, st.zero = len(discard), len(zero)
        for batch in _split(data, BATCH_PAGES):
            st.wire_bytes += self._send_data(batch, send)
        self.chooser.pause()
        st.data, st.data_bytes = len(data), len(data) * PAGE_SIZE
        for at in range(0, len(dst), MAX_PAIRS):
            d, s = dst[at : at + MAX_PAIRS], src[at : at + MAX_PAIRS]
            self.redo[d[self.held[s] != cur[d]]] = True
            st.wire_bytes += send(Kind.DUP, [codec.encode_pairs(d, s)])
            self.held[d] = self.held[s]
        st.dup = len(dst)
        st.send_seconds = time.perf_counter() - ts
        if not final:
            self._index()
        st.seconds = time.perf_counter() - t0
        return st

    def _index(self) -> None:
        """Rebuild the dedup index from ``held`` (between rounds, so the final one only looks up)."""
        known = np.flatnonzero(self.ram & (self.held != ZERO_HASH))
        kh = self.held[known]
        order = np.argsort(kh, kind="stable")
        self._known = (kh[order], known[order])

    def _all_zero(self, pfns: np.ndarray) -> np.ndarray:
        """Which of these pages (fingerprint of zero) really are all zero; holes need no reading."""
        ok = np.ones(len(pfns), dtype=bool)
        populated = self._populated[pfns] if len(pfns) and self._populated is not None else ok
        idx = np.flatnonzero(populated)
        for part in _split(idx, DUP_CHECK):
            ok[part] = ~self._read(pfns[part]).any(axis=1)
        return ok

    def _dups(self, cand: np.ndarray, cur: np.ndarray, free: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split changed pages into (data, dup targets, dup sources), vectorized: sources are
        unchanged pages whose target copy has the same content, else the first page of the round
        with it. Pairs whose bytes differ (a fingerprint collision, or a live guest's write) go
        back to data. The index of target copies is the one built after the last round; a source
        found there counts only if this round leaves it as it was (not changed, not freed)."""
        if len(cand) == 0:
            e = np.empty(0, np.int64)
            return e, e, e
        h = cur[cand]
        if self._known is None:
            self._index()
        assert self._known is not None
        ks, kp = self._known
        pos = np.minimum(np.searchsorted(ks, h), max(len(ks) - 1, 0))
        hit = (ks[pos] == h) if len(ks) else np.zeros(len(cand), bool)
        src = kp[pos[hit]] if len(ks) else np.empty(0, np.int64)
        ok = (cur[src] == self.held[src]) & (self.held[src] == h[hit]) & ~free[src]
        ok &= ~np.isin(src, cand)
        hit[np.flatnonzero(hit)[~ok]] = False
        ref_dst, ref_src = cand[hit], src[ok]
        rest = cand[~hit]
        _, first, inverse = np.unique(cur[rest], return_index=True, return_inverse=True)
        rep = rest[first][inverse.reshape(-1)]
        is_dup = rep != rest
        dst = np.concatenate((ref_dst, rest[is_dup]))
        src = np.concatenate((ref_src, rep[is_dup]))
        same = np.ones(len(dst), dtype=bool)
        for part in _split(np.arange(len(dst)), DUP_CHECK):
            same[part] = (self._read(dst[part]) == self._read(src[part])).all(axis=1)
        data = np.sort(np.concatenate((rest[~is_dup], dst[~same])))
        return data, dst[same], src[same]

    def _read(self, pfns: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Copies of the pages ``pfns`` (all populated: a mapping's read of a hole would allocate
        it), gathered from the mapped RAM file in one vectorized step per region."""
        out = np.empty((len(pfns), PAGE_SIZE), dtype=np.uint8) if out is None else out[: len(pfns)]
        for p0, p1, pages in self._views:
            sel = (pfns >= p0) & (pfns < p1)
            if sel.all():
                np.take(pages, pfns - p0, axis=0, out=out)
                break
            out[sel] = pages[pfns[sel] - p0]
        return out

    def _send_data(self, batch: np.ndarray, send: Send) -> int:
        """Read, fingerprint, compress and send one batch; the frame may still be queued for the
        socket (its buffer is not reused before it was sent, see :data:`RING`)."""
        self._turn = (self._turn + 1) % RING
        pages = self._read(batch, self._ring[self._turn])
        self.held[batch] = hash_pages(pages.reshape(-1))
        c, blob = self.chooser.encode(pages.reshape(-1).data)
        starts, lengths = codec.runs(batch)
        return send(Kind.DATA, codec.encode_data(c, starts, lengths, blob))


def _split(a: np.ndarray, n: int) -> Iterator[np.ndarray]:
    for i in range(0, len(a), n):
        yield a[i : i + n]
