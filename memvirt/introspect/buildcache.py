"""What one kernel build needs, remembered by its build id, so a new process skips the decoding.

A bootstrap decodes kallsyms (~100k symbols) and BTF (~100k types) to learn a few dozen facts.
Those facts are fixed for a kernel build: symbol addresses move only by the boot's KASLR offset
(which VMCOREINFO gives), and layouts not at all. After a first census the symbols and layout
facts it used are written to ``cache_home()/introspect/``; later bootstraps of the same build
load them instead. A fact the cache lacks makes the caller bootstrap in full.

The guest writes everything an entry is derived from, and reclaim trusts the offsets an entry
holds, so a guest must not be able to plant facts another VM then uses:

- The build id names a file only if it is what the kernel prints (40 hex digits).
- An entry is keyed by the build id *and* a digest of what its facts were derived from: the
  boot-invariant VMCOREINFO lines, and (inside the entry) a digest of the kallsyms tables and
  the BTF blob. A guest claiming another kernel's build id with other types or symbols gets
  another key, and an entry whose content digest does not match this guest's own bytes, or
  whose facts contradict this guest's VMCOREINFO, is ignored (with a logged warning).
- Entries are written once, atomically (a private temporary file linked into place), 0600 in
  a 0700 folder owned by this user; an existing entry is never overwritten, and a file that is
  a symlink, someone else's or readable by others is not read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from memvirt.errors import MemvirtError
from memvirt.introspect.kernel import arm64_is_linear
from memvirt.introspect.layout import KeyedLayout, LayoutMissing
from memvirt.introspect.pgtable import KERNEL_IMAGE_SIZE, START_KERNEL_map
from memvirt.introspect.vmcoreinfo import BUILD_ID, Vmcoreinfo
from memvirt.paths import cache_home

log = logging.getLogger(__name__)

VERSION = 2
BOOT_SYMBOLS = ("page_offset_base", "vmemmap_base", "__start_BTF", "__stop_BTF", "_stext", "init_top_pgt")
"""Symbols the bootstrap itself looks up, before anything could record them."""
KALLSYMS_SYMBOLS = (
    "kallsyms_names",
    "kallsyms_num_syms",
    "kallsyms_token_table",
    "kallsyms_token_index",
    "kallsyms_offsets",
    "kallsyms_relative_base",
    "kallsyms_addresses",
    "kallsyms_markers",
)
MAX_HASHED = 64 << 20
"""Kallsyms tables or a BTF blob bigger than this (6.12's BTF is ~6 MiB) are not cached."""
MAX_ENTRY_BYTES = 4 << 20
MAX_CANDIDATES = 8
"""Entries of one build and VMCOREINFO looked at on load; more can only come from hostile guests."""
# NUMBER() lines that change from boot to boot (KASLR, the machine) and say nothing about layouts.
_BOOT_NUMBERS = {
    "phys_base",
    "VMALLOC_START",
    "VMEMMAP_START",
    "PAGE_OFFSET",
    "page_offset_base",
    "sme_mask",
    "KERNEL_IMAGE_SIZE",
    "pgtable_l5_enabled",
    # arm64 (arch/arm64/kernel/vmcore_info.c): the image's and the linear map's KASLR offsets,
    # and what the CPU offers (52-bit addresses, pointer authentication).
    "kimage_voffset",
    "PHYS_OFFSET",
    "TCR_EL1_T1SZ",
    "KERNELPACMASK",
}
_CHOICE = re.compile(r"[a-z]{1,16}")
_HEX = re.compile(r"[0-9a-f]{64}")

ReadVA = Callable[[int, int], np.ndarray]


def _in_image(info: Vmcoreinfo, va: int, size: int = 0) -> bool:
    """Whether ``[va, va + size)`` is kernel-image memory, whose place moves only with KASLR.
    arm64 has no fixed image window like x86's ``__START_KERNEL_map``: there it is anything
    outside the linear map (``kernel.arm64_is_linear``)."""
    if info.arch == "arm64":
        return not arm64_is_linear(info, va) and not arm64_is_linear(info, va + size)
    return START_KERNEL_map <= va and va + size <= START_KERNEL_map + KERNEL_IMAGE_SIZE


def vmcoreinfo_digest(info: Vmcoreinfo) -> str:
    """SHA-256 of the VMCOREINFO lines that hold for every boot of one build: layouts,
    numbers, the release and build id; not symbol addresses, KASLR or the crash time."""
    h = hashlib.sha256()
    for key in sorted(info.entries):
        kind = key.split("(", 1)[0]
        name = key[len(kind) + 1 : -1]
        if kind == "NUMBER" and name in _BOOT_NUMBERS:
            continue
        if kind in ("SIZE", "OFFSET", "LENGTH", "NUMBER") or key in ("OSRELEASE", "BUILD-ID", "PAGESIZE"):
            h.update(f"{key}={info.entries[key].strip()}\n".encode())
    return h.hexdigest()


def content_digest(info: Vmcoreinfo, read_va: ReadVA, btf: tuple[int, int] | None) -> str | None:
    """SHA-256 of the kallsyms tables (located by VMCOREINFO) and of the BTF blob at ``btf``
    (``__start_BTF``, ``__stop_BTF``); None when they are not in the kernel image or too big.

    The absolute addresses among the tables (``kallsyms_relative_base``, ``kallsyms_addresses``)
    are hashed relative to the boot's KASLR offset, so every boot of a build has one digest."""
    try:
        kaslr = info.kerneloffset
        at = {n: info.symbol(n) for n in KALLSYMS_SYMBOLS if info.has_symbol(n)}
        if "kallsyms_num_syms" not in at:
            return None
        num = int(read_va(at["kallsyms_num_syms"], 4).view("<u4")[0])
        ends = [a + 512 for a in at.values()]
        if "kallsyms_offsets" in at:
            ends.append(at["kallsyms_offsets"] + 4 * num)
        if "kallsyms_addresses" in at:
            ends.append(at["kallsyms_addresses"] + 8 * num)
        spans = [(min(at.values()), max(ends))]
        if btf is not None:
            spans.append(btf)
        h = hashlib.sha256()
        for n, (start, stop) in enumerate(spans):
            if not (0 < stop - start <= MAX_HASHED and _in_image(info, start, stop - start)):
                return None
            h.update(f"{start - kaslr:x}-{stop - start:x}\n".encode())
            data = read_va(start, stop - start)
            if n == 0:
                data = data.copy()
                for name, count in (("kallsyms_relative_base", 1), ("kallsyms_addresses", num)):
                    if name in at and (at[name] - start) % 8 == 0:
                        words = data[at[name] - start :][: 8 * count].view("<u8")
                        words -= np.uint64(kaslr % (1 << 64))
            h.update(data.data)
    except MemvirtError:
        return None
    return h.hexdigest()


def _folder(create: bool) -> Path | None:
    """The cache folder, private to this user (0700, not a symlink), or None (logged) if it is not."""
    path = cache_home() / "introspect"
    try:
        if create:
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("build-id cache not used: %s", e)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        log.warning("build-id cache not used: %s is not a folder owned by this user", path)
        return None
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _stem(info: Vmcoreinfo, choice: str) -> str | None:
    build_id = info.build_id
    if build_id is None or not BUILD_ID.fullmatch(build_id) or not _CHOICE.fullmatch(choice):
        return None
    return f"{build_id}-{vmcoreinfo_digest(info)[:32]}-{choice}"


def _read_private(path: Path) -> Any:
    """JSON of a regular file owned by this user and readable by nobody else, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            log.warning("build-id cache entry %s ignored: not a private file of this user", path.name)
            return None
        if st.st_size > MAX_ENTRY_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return json.loads(f.read(MAX_ENTRY_BYTES))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _well_formed(entry: Any, choice: str) -> bool:
    def table(d: Any, value: tuple[type, ...]) -> bool:
        return isinstance(d, dict) and all(isinstance(k, str) and isinstance(v, value) for k, v in d.items())

    return (
        isinstance(entry, dict)
        and entry.get("version") == VERSION
        and entry.get("choice") == choice
        and isinstance(entry.get("release"), str)
        and isinstance(entry.get("content"), str)
        and _HEX.fullmatch(entry["content"]) is not None
        and table(entry.get("symbols"), (int, type(None)))
        and table(entry.get("facts"), (int,))
        and table(entry.get("sources"), (str,))
        and all(not isinstance(v, bool) for v in entry["facts"].values())
    )


def _contradiction(entry: dict[str, Any], info: Vmcoreinfo) -> str | None:
    """The first cached fact or symbol that this guest's own VMCOREINFO says otherwise, if any."""
    for key, value in entry["facts"].items():
        other = key
        if key.startswith("ENUM("):
            other = f"NUMBER({key[5:-1].rsplit('.', 1)[-1]})"
        if other in info.entries and other.split("(", 1)[0] in ("SIZE", "OFFSET", "LENGTH", "NUMBER"):
            try:
                mine = info.integer(other, 0 if other.startswith("NUMBER(") else 10)
            except MemvirtError:
                return f"{other} is not a number"
            if mine != value:
                return f"{key} is {value} in the cache, VMCOREINFO says {mine}"
    kaslr = info.kerneloffset
    for name, rel in entry["symbols"].items():
        if (
            rel is not None
            and info.has_symbol(name)
            and _in_image(info, info.symbol(name))
            and rel + kaslr != info.symbol(name)
        ):
            return f"symbol {name} differs from VMCOREINFO"
    return None


def _btf_span(symbols: dict[str, int | None], kaslr: int) -> tuple[int, int] | None:
    start, stop = symbols.get("__start_BTF"), symbols.get("__stop_BTF")
    if start is None or stop is None:
        return None
    return start + kaslr, stop + kaslr


def check(entry: Any, info: Vmcoreinfo, choice: str, read_va: ReadVA) -> tuple[CachedSymbols, CachedLayout] | str:
    """An entry's symbols (relocated for this boot) and layout if it holds for this guest, else why not:
    well-formed, same release, no fact this guest's VMCOREINFO contradicts, and derived from the
    same kallsyms and BTF bytes as this guest's own (read from its memory now)."""
    if not _well_formed(entry, choice) or entry["release"] != info.osrelease:
        return "malformed"
    try:
        why = _contradiction(entry, info)
        if (
            why is None
            and content_digest(info, read_va, _btf_span(entry["symbols"], info.kerneloffset)) != entry["content"]
        ):
            why = "this guest's kallsyms or BTF bytes differ from those it was derived from"
    except MemvirtError as e:
        why = str(e)
    if why is not None:
        return why
    return CachedSymbols(entry["symbols"], info.kerneloffset), CachedLayout(entry["facts"], entry["sources"])


def load(info: Vmcoreinfo, choice: str, read_va: ReadVA) -> tuple[CachedSymbols, CachedLayout] | None:
    """The cached symbols and layout for this build and layout choice, if a census of the same
    kernel (same VMCOREINFO facts, same kallsyms and BTF bytes) stored them."""
    stem = _stem(info, choice)
    folder = _folder(create=False) if stem is not None else None
    if folder is None or stem is None:
        return None
    candidates = sorted(folder.glob(f"{stem}-*.json"))[:MAX_CANDIDATES]
    for path in candidates:
        entry = _read_private(path)
        if entry is None:
            continue
        if _well_formed(entry, choice) and not path.name.endswith(f"-{entry['content'][:32]}.json"):
            got: tuple[CachedSymbols, CachedLayout] | str = "its name does not match its content digest"
        else:
            got = check(entry, info, choice, read_va)
        if not isinstance(got, str):
            return got
        log.warning("build-id cache entry %s ignored: %s", path.name, got)
    return None


def make_entry(
    info: Vmcoreinfo,
    choice: str,
    read_va: ReadVA,
    symbols: RecordingSymbols,
    values: dict[str, int],
    sources: dict[str, str],
) -> dict[str, Any] | None:
    """What a census of this build used (symbols relative to the boot's KASLR offset), keyed by
    its content digest; None when the build cannot be keyed."""
    if _stem(info, choice) is None:
        return None
    try:
        kaslr = info.kerneloffset
    except MemvirtError:
        return None
    # Only kallsyms addresses: a name kallsyms lacks stays absent, so a later bootstrap falls
    # back to VMCOREINFO's SYMBOL() as a fresh one does (those may be direct-map addresses,
    # which KASLR moves by another offset).
    rel: dict[str, int | None] = {}
    for name in sorted(symbols.asked):
        addr = symbols._symbols.get(name)
        rel[name] = None if addr is None else addr - kaslr
    content = content_digest(info, read_va, _btf_span(rel, kaslr))
    if content is None:
        return None
    return {
        "version": VERSION,
        "release": info.osrelease,
        "choice": choice,
        "content": content,
        "symbols": rel,
        "facts": values,
        "sources": sources,
    }


def store(
    info: Vmcoreinfo,
    choice: str,
    read_va: ReadVA,
    symbols: RecordingSymbols,
    values: dict[str, int],
    sources: dict[str, str],
) -> Path | None:
    """Remember what a census of this build used (:func:`make_entry`) in the cache folder.

    Write-once: an entry already there (from this or any other bootstrap) stays as it is.
    Returns the entry's path, or None when nothing could be keyed or written."""
    stem = _stem(info, choice)
    entry = make_entry(info, choice, read_va, symbols, values, sources)
    folder = _folder(create=True) if entry is not None else None
    if folder is None or entry is None or stem is None:
        return None
    path = folder / f"{stem}-{entry['content'][:32]}.json"
    if path.exists():
        return path
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1, sort_keys=True)
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError as e:
        log.warning("build-id cache entry not written: %s", e)
        return None
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Shelf:
    """One process's bootstraps shared by kernel build: the VMs of a host mostly run a few builds,
    and each full bootstrap holds the guest's kallsyms and BTF (~12 MB); a VM whose build is on
    the shelf keeps only the few dozen symbols and facts it uses (~2 MB with its page tables).

    Entries are those :func:`store` would write, kept in memory, and checked for each guest
    exactly as the folder's are (:func:`check`: its own kallsyms and BTF bytes, its VMCOREINFO),
    so a guest cannot plant facts another one uses. Entries of one key were derived from the
    same bytes, so a later bootstrap's facts are added to an entry, never replace its values.
    Loads fall back to the cache folder (:func:`load`); stores go to both. Thread-safe."""

    def __init__(self, folder: bool = True):
        self.folder = folder
        self._entries: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, info: Vmcoreinfo, choice: str, read_va: ReadVA) -> tuple[CachedSymbols, CachedLayout] | None:
        stem = _stem(info, choice)
        with self._lock:
            candidates = [e for k, e in self._entries.items() if stem is not None and k.startswith(f"{stem}-")]
        for entry in candidates[:MAX_CANDIDATES]:
            got = check(entry, info, choice, read_va)
            if not isinstance(got, str):
                return got
            log.warning("shared bootstrap of %s not used: %s", info.build_id, got)
        return load(info, choice, read_va) if self.folder else None

    def store(
        self,
        info: Vmcoreinfo,
        choice: str,
        read_va: ReadVA,
        symbols: RecordingSymbols,
        values: dict[str, int],
        sources: dict[str, str],
    ) -> None:
        entry = make_entry(info, choice, read_va, symbols, values, sources)
        stem = _stem(info, choice)
        if entry is None or stem is None:
            return
        key = f"{stem}-{entry['content']}"
        with self._lock:
            old = self._entries.get(key)
            if old is None and sum(k.startswith(f"{stem}-") for k in self._entries) >= MAX_CANDIDATES:
                return  # more variants of one build can only come from hostile guests: bounded
            if old is not None:
                for table in ("symbols", "facts", "sources"):
                    entry[table] = {**entry[table], **old[table]}
            self._entries[key] = entry
        if self.folder:
            store(info, choice, read_va, symbols, values, sources)


class NoLoad:
    """A shelf that never has an entry and stores into ``shelf``: a full bootstrap that records
    what it used, for a caller that needs facts the shelf's entry lacks."""

    def __init__(self, shelf: Any):
        self.shelf = shelf

    def load(self, *_: Any) -> None:
        return None

    def store(self, *args: Any) -> Any:
        return self.shelf.store(*args)


class RecordingSymbols:
    """Wraps kallsyms and remembers every name asked for (present or not)."""

    def __init__(self, symbols: Any):
        self._symbols = symbols
        self.asked: set[str] = set(BOOT_SYMBOLS)

    def get(self, name: str, default: int | None = None) -> int | None:
        self.asked.add(name)
        return self._symbols.get(name, default)

    def __contains__(self, name: object) -> bool:
        self.asked.add(str(name))
        return name in self._symbols

    def __getitem__(self, name: str) -> int:
        self.asked.add(name)
        return self._symbols[name]

    def __len__(self) -> int:
        return len(self._symbols)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._symbols, name)


class CachedSymbols:
    """Symbol addresses of a build, relocated by this boot's KASLR offset; absent names stay absent."""

    def __init__(self, relative: dict[str, int | None], kaslr: int):
        self._addr = {k: None if v is None else v + kaslr for k, v in relative.items()}

    def get(self, name: str, default: int | None = None) -> int | None:
        v = self._addr.get(name)
        return default if v is None else v

    def __contains__(self, name: object) -> bool:
        return self._addr.get(str(name)) is not None

    def __getitem__(self, name: str) -> int:
        v = self._addr.get(name)
        if v is None:
            raise KeyError(name)
        return v

    def __len__(self) -> int:
        return len(self._addr)


class CachedLayout(KeyedLayout):
    """Layout facts remembered from a previous census of the same build and ``--layouts`` choice."""

    source = "cache"

    def __init__(self, facts: dict[str, int], sources: dict[str, str]):
        self.facts = facts
        self.sources = sources

    def _get(self, key: str) -> int:
        if key not in self.facts:
            raise LayoutMissing(f"the build-id cache lacks {key}")
        return self.facts[key]

    def constant(self, name: str) -> int:
        return self._get(f"CONST({name})")

    def has_member(self, struct: str, path: str) -> bool:
        return f"OFFSET({struct}.{path})" in self.facts
