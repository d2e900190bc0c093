"""Read throughput of every memvirt memory source, beside a plain sequential read of the same bytes.

One run boots two guests (shared-file RAM and anonymous RAM), fills most of their memory with
``memtouch --content mix``, pauses them and measures, for the RAM file, ``/proc/PID/mem``, a QEMU
ELF dump, a QEMU kdump-zlib dump (flattened, as QEMU 7.2 writes it) and a raw image:

* a full sequential read through ``GuestMemory.chunks()`` (best of ``--repeat``, alternating with
  the baseline so that drift in host load hits both alike), GB/s;
* the baseline: ``os.preadv`` of the same backing byte ranges (for kdump: the whole compressed
  file) into one reusable, pre-faulted buffer of the same chunk size, and the ratio of the two;
* ``read_pages`` of ``--pages`` random RAM frames, in random and in sorted order, pages/s;
* the time QEMU (or memvirt, for raw) takes to write each dump.

File-backed figures are page-cache hot: the RAM file is on tmpfs and each dump is read right
after it was written (and fsynced); caches are not dropped. GB = 1e9 bytes.

    python bench/memsource.py [--memory 4G] [--fill 3G] [--json FILE] [--keep-dumps DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from common import (
    GB,
    GIB,
    RESULTS,
    best_of_interleaved,
    fill_and_pause,
    fs_type,
    machine_info,
    make_console,
    run_main,
    size_arg,
    write_json,
)
from rich.table import Table

VM_SHARED = "bench-shared"
VM_ANON = "bench-anon"
HOT = 16 << 20
GUEST_LOG = "/tmp/bench-memtouch.log"
FILL_TIMEOUT = 3600.0
SEED = 20240601

console = make_console(220)
T0 = time.monotonic()


def say(msg: str) -> None:
    console.print(f"[dim]{time.monotonic() - T0:7.1f}s[/dim] {msg}")


# --- measured paths -----------------------------------------------------------------------------


def memvirt_sequential(mem: Any, chunk: int) -> int:
    """Walk all RAM through the memvirt interface; bytes read."""
    n = 0
    for _gpa, data in mem.chunks(chunk):
        n += len(data)
    return n


def plain_sequential(path: str, ranges: list[tuple[int, int]], buf: memoryview) -> int:
    """``os.preadv`` of ``ranges`` of ``path`` into ``buf``, one chunk at a time; bytes read."""
    chunk = len(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, size in ranges:
            pos, end = off, off + size
            while pos < end:
                n = os.preadv(fd, [buf[: min(chunk, end - pos)]], pos)
                if n <= 0:
                    raise OSError(f"{path}: short read at {pos:#x}")
                pos += n
    finally:
        os.close(fd)
    return sum(size for _, size in ranges)


def sample_pfns(mem: Any, count: int, seed: int) -> np.ndarray:
    """``count`` distinct random RAM frames of ``mem`` (uniform over its RAM pages)."""
    ranges = np.array(mem.pfn_ranges(), dtype=np.int64).reshape(-1, 2)
    sizes = ranges[:, 1] - ranges[:, 0]
    ends = np.cumsum(sizes)
    idx = np.random.default_rng(seed).choice(int(ends[-1]), size=min(count, int(ends[-1])), replace=False)
    which = np.searchsorted(ends, idx, "right")
    return ranges[which, 0] + idx - (ends[which] - sizes[which])


def in_regions(mem: Any, pfns: np.ndarray) -> np.ndarray:
    ranges = np.array(mem.pfn_ranges(), dtype=np.int64).reshape(-1, 2)
    at = np.searchsorted(ranges[:, 0], pfns, "right") - 1
    return (at >= 0) & (pfns < ranges[np.maximum(at, 0), 1])


# --- one source ---------------------------------------------------------------------------------


def measure(
    name: str,
    mem: Any,
    baseline_path: str,
    baseline_ranges: list[tuple[int, int]],
    baseline_what: str,
    args: argparse.Namespace,
    buf: memoryview,
    ref: Any | None,
    note: str,
) -> dict[str, Any]:
    say(f"{name}: {mem.describe()}, {mem.ram_size / GIB:.2f} GiB RAM in {len(mem.regions)} region(s)")
    got = memvirt_sequential(mem, args.chunk)
    if got != mem.ram_size:
        raise RuntimeError(f"{name}: chunks() returned {got} bytes, expected {mem.ram_size}")
    base_bytes = sum(size for _, size in baseline_ranges)
    (seq_best, seq_runs), (base_best, base_runs) = best_of_interleaved(
        [lambda: memvirt_sequential(mem, args.chunk), lambda: plain_sequential(baseline_path, baseline_ranges, buf)],
        args.repeat,
    )
    seq_gbps = mem.ram_size / seq_best / GB
    base_gbps = base_bytes / base_best / GB
    say(f"{name}: sequential memvirt {seq_gbps:.2f} GB/s, plain preadv {base_gbps:.2f} GB/s")

    pfns = sample_pfns(mem, args.pages, SEED)
    ordered = np.sort(pfns)
    pages = mem.read_pages(pfns)
    (rnd_best, rnd_runs), (srt_best, srt_runs) = best_of_interleaved(
        [lambda: mem.read_pages(pfns), lambda: mem.read_pages(ordered)], args.repeat
    )
    say(f"{name}: random 4 KiB pages {len(pfns) / rnd_best:,.0f}/s unsorted, {len(pfns) / srt_best:,.0f}/s sorted")

    nonzero = np.any(pages.view(np.uint64), axis=1)
    check = "n/a"
    if ref is not None and ref is not mem:
        ok = in_regions(ref, pfns)
        same = np.all(pages[ok] == ref.read_pages(pfns[ok]), axis=1)
        check = "equal" if same.all() else f"{int((~same).sum())} pages differ"
        if not ok.all():
            check += f" ({int((~ok).sum())} page(s) outside the RAM file's map)"
    elif ref is mem:
        check = "reference"

    return {
        "source": name,
        "describe": mem.describe(),
        "kind": mem.kind,
        "regions": [{"gpa": r.gpa, "size": r.size, "offset": r.offset} for r in mem.regions],
        "ram_bytes": mem.ram_size,
        "chunk_bytes": args.chunk,
        "sequential": {
            "bytes": mem.ram_size,
            "runs_s": seq_runs,
            "best_s": seq_best,
            "median_s": float(np.median(seq_runs)),
            "GB_per_s": seq_gbps,
            "GiB_per_s": mem.ram_size / seq_best / GIB,
        },
        "baseline": {
            "what": baseline_what,
            "path": baseline_path,
            "bytes": base_bytes,
            "runs_s": base_runs,
            "best_s": base_best,
            "median_s": float(np.median(base_runs)),
            "GB_per_s": base_gbps,
            "GiB_per_s": base_bytes / base_best / GIB,
        },
        "ratio_memvirt_over_baseline": seq_gbps / base_gbps,
        "random_pages": {
            "count": len(pfns),
            "seed": SEED,
            "unsorted": {"runs_s": rnd_runs, "best_s": rnd_best, "pages_per_s": len(pfns) / rnd_best},
            "sorted": {"runs_s": srt_runs, "best_s": srt_best, "pages_per_s": len(pfns) / srt_best},
            "nonzero_fraction": float(nonzero.mean()),
        },
        "check_vs_ram_file": check,
        "note": note,
    }


# --- guests -------------------------------------------------------------------------------------


def fill_guests(vms: list[Any], fill: int) -> dict[str, dict[str, Any]]:
    """Fill each guest with memtouch (``fill`` bytes, mixed content); each is paused once ready."""
    cmd = f"memtouch --hot {HOT} --cold {fill - HOT} --content mix --report 30"
    return fill_and_pause(vms, cmd, GUEST_LOG, FILL_TIMEOUT, say)


def boot(image: Any, memory: int) -> list[Any]:
    from memvirt.errors import VMError
    from memvirt.qemu.vm import BOOT_TIMEOUT, _tail, start_vm

    vms: list[Any] = []
    try:
        say(f"booting {VM_SHARED} (shared-file RAM) and {VM_ANON} (anonymous RAM), {memory / GIB:.1f} GiB each")
        shared = start_vm(VM_SHARED, image, memory=memory, ram="shared", wait=False)
        vms.append(shared)
        vms.append(start_vm(VM_ANON, image, memory=memory, ram="anonymous"))
        try:
            shared.channel.wait_ready(BOOT_TIMEOUT, shared.alive)
        except Exception:
            raise VMError(f"VM {VM_SHARED!r} did not boot: {_tail(shared.serial_log)}") from None
    except BaseException:
        for vm in vms:
            vm.stop()
        raise
    say(f"booted ({shared.config.accel})")
    return vms


def make_dump(vm: Any, fmt: str, dest: Path) -> dict[str, Any]:
    from memvirt.qemu.dump import dump_vm

    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 10:
            last[0] = time.monotonic()
            say(f"dump {fmt}: {100 * done / max(total, 1):.0f}%")

    say(f"dumping {vm.name} as {fmt} to {dest}")
    t0 = time.perf_counter()
    dump_vm(vm, dest, fmt, progress)
    dump_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    fd = os.open(dest, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    sync_s = time.perf_counter() - t1
    st = os.stat(dest)
    say(f"dump {fmt}: {dump_s:.1f} s, {st.st_size / GB:.2f} GB ({st.st_blocks * 512 / GB:.2f} GB allocated)")
    return {
        "format": fmt,
        "path": str(dest),
        "seconds": dump_s,
        "fsync_s": sync_s,
        "size_bytes": st.st_size,
        "allocated_bytes": st.st_blocks * 512,
        "fs": fs_type(dest),
    }


# --- output -------------------------------------------------------------------------------------


def table(results: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title)
    for col, just in [
        ("source", "left"),
        ("read GB", "right"),
        ("memvirt GB/s", "right"),
        ("GiB/s", "right"),
        ("baseline GB/s", "right"),
        ("memvirt/baseline", "right"),
        ("random 4K pages/s", "right"),
        ("sorted 4K pages/s", "right"),
        ("dump s", "right"),
        ("dump GB", "right"),
        ("check", "left"),
        ("note", "left"),
    ]:
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for r in results:
        d = r.get("dump")
        t.add_row(
            r["source"],
            f"{r['ram_bytes'] / GB:.2f}",
            f"{r['sequential']['GB_per_s']:.2f}",
            f"{r['sequential']['GiB_per_s']:.2f}",
            f"{r['baseline']['GB_per_s']:.2f}",
            f"{r['ratio_memvirt_over_baseline']:.2f}",
            f"{r['random_pages']['unsorted']['pages_per_s']:,.0f}",
            f"{r['random_pages']['sorted']['pages_per_s']:,.0f}",
            f"{d['seconds']:.1f}" if d else "-",
            f"{d['size_bytes'] / GB:.2f}" if d else "-",
            r["check_vs_ram_file"],
            r["note"],
        )
    return t


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--memory", default="4G", type=size_arg, help="RAM of each guest (default 4G)")
    p.add_argument("--fill", default="3G", type=size_arg, help="bytes memtouch fills in each guest (default 3G)")
    p.add_argument("--chunk", default="64M", type=size_arg, help="sequential read chunk (default 64M, chunks()' own)")
    p.add_argument("--pages", default=20000, type=int, help="random 4 KiB pages per read_pages test (default 20000)")
    p.add_argument("--repeat", default=3, type=int, help="runs per figure; the best is reported (default 3)")
    p.add_argument("--kernel", default="6.1", help="guest kernel spec for default_image (default 6.1)")
    p.add_argument("--json", type=Path, default=RESULTS / "memsource.json", help="where to write the results")
    p.add_argument("--keep-dumps", type=Path, metavar="DIR", help="write the dumps to DIR and keep them")
    a = p.parse_args(argv)
    if a.fill <= HOT or a.fill > a.memory - (256 << 20):
        p.error(f"--fill must be between {HOT >> 20}M and --memory minus 256M")
    if a.repeat < 1 or a.pages < 1 or a.chunk < 4096 or a.chunk % 4096:
        p.error("--repeat and --pages must be positive, --chunk a multiple of 4 KiB")
    return a


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-state")
    os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-ram")
    args = parse_args(argv)

    from memvirt.image.build import default_image
    from memvirt.paths import ram_dir
    from memvirt.qemu.accel import qemu_binary
    from memvirt.qemu.vm import vm_memory
    from memvirt.targets import open_memory

    started = time.time()
    report: dict[str, Any] = {
        "bench": "memsource",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(qemu_binary()),
        "config": {
            "memory_bytes": args.memory,
            "fill_bytes": args.fill,
            "hot_bytes": HOT,
            "chunk_bytes": args.chunk,
            "random_pages": args.pages,
            "repeat": args.repeat,
            "memvirt_home": os.environ["MEMVIRT_HOME"],
            "ram_dir": os.environ["MEMVIRT_RAM_DIR"],
            "units": "GB = 1e9 bytes, GiB = 2^30 bytes; best of `repeat` runs",
            "cache": "file-backed sources are page-cache hot (RAM file on tmpfs; dumps read right after "
            "being written and fsynced); caches are not dropped",
        },
        "sources": [],
    }
    results: list[dict[str, Any]] = report["sources"]
    vms: list[Any] = []
    mems: list[Any] = []
    dump_dir = args.keep_dumps
    tmp_dir: Path | None = None
    error: str | None = None
    buf_arr = np.ones(args.chunk, dtype=np.uint8)  # pre-faulted, reused by every baseline read
    buf = memoryview(buf_arr)
    try:
        image = default_image(args.kernel)
        report["config"]["guest_kernel"] = image.release
        report["config"]["image"] = str(image.path)
        if dump_dir is None:
            tmp_dir = dump_dir = Path(tempfile.mkdtemp(prefix="memvirt-bench-dumps-"))
        else:
            dump_dir.mkdir(parents=True, exist_ok=True)
        report["config"]["dump_dir_fs"] = fs_type(dump_dir)
        report["config"]["ram_dir_fs"] = fs_type(ram_dir())

        vms = boot(image, args.memory)
        shared, anon = vms
        report["machine"]["accel"] = shared.config.accel
        report["guests"] = fill_guests(vms, args.fill)

        ram = vm_memory(shared)
        mems.append(ram)
        results.append(
            measure(
                "RAM file",
                ram,
                shared.config.ram_path,
                [(r.offset, r.size) for r in ram.regions],
                "preadv of the RAM file's RAM ranges",
                args,
                buf,
                ram,
                f"{fs_type(shared.config.ram_path)} RAM file, page-cache resident",
            )
        )

        proc = vm_memory(anon)
        mems.append(proc)
        results.append(
            measure(
                "/proc/PID/mem",
                proc,
                f"/proc/{anon.config.pid}/mem",
                [(r.offset, r.size) for r in proc.regions],
                "preadv of /proc/PID/mem over the RAM mapping",
                args,
                buf,
                None,
                "anonymous RAM of the other guest (same fill)",
            )
        )
        proc.close()
        anon.stop()
        vms.remove(anon)
        say(f"{VM_ANON} stopped (its memory is no longer needed)")

        for fmt, suffix, label in [
            ("elf", "elf", "ELF dump"),
            ("kdump-zlib", "kdump", "kdump-zlib"),
            ("raw", "raw", "raw image"),
        ]:
            dest = dump_dir / f"{VM_SHARED}.{suffix}"
            dump = make_dump(shared, fmt, dest)
            if shared.status() != "paused":
                raise RuntimeError(f"{VM_SHARED} is {shared.status()} after the {fmt} dump, not paused")
            if fmt == "raw":
                mem = open_memory(str(dest), "raw", ram_size=args.memory)
            else:
                mem = open_memory(str(dest))
            try:
                if fmt == "kdump-zlib":
                    ranges = [(0, dump["size_bytes"])]
                    what = "preadv of the whole compressed dump file"
                    dump_gb = f"{dump['size_bytes'] / GB:.2f} GB"
                    note = f"memvirt incl. zlib decompression; baseline = the {dump_gb} compressed file"
                    if getattr(mem, "flattened", False):
                        note += " (flattened)"
                else:
                    ranges = [(r.offset, r.size) for r in mem.regions]
                    what = "preadv of the dump's RAM ranges"
                    note = f"page-cache hot {fs_type(dest)} file"
                    if fmt == "raw":
                        note += ", sparse, written by memvirt"
                row = measure(label, mem, str(dest), ranges, what, args, buf, ram, note)
                row["dump"] = dump
                results.append(row)
            finally:
                mem.close()
            if tmp_dir is not None:
                dest.unlink()
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        if not isinstance(e, KeyboardInterrupt | SystemExit):
            traceback.print_exc()
    finally:
        for m in mems:
            m.close()
        for vm in vms:
            try:
                vm.stop()
            except Exception as e:  # keep cleaning up the rest
                console.print(f"[red]could not stop {vm.name}: {e}[/red]")
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    report["wall_s"] = time.time() - started
    if error:
        report["error"] = error
    m = report["machine"]
    title = (
        f"memvirt memory sources, {args.memory / GIB:.0f} GiB guest, {args.fill / GIB:.1f} GiB filled "
        f"({m['cpu_model']}, {m['cpus']} CPUs, {m.get('accel', '?')}, {m['qemu'].split('(')[0].strip()})"
    )
    if results:
        console.print(table(results, title))
    console.print(
        "GB = 1e9 bytes; sequential = best of "
        f"{args.repeat} full reads with {args.chunk >> 20} MiB chunks; baseline = os.preadv of the same "
        "byte ranges into one reused buffer (kdump: the compressed file). File-backed figures are "
        "page-cache hot (tmpfs RAM file, dumps just written); caches were not dropped. "
        f"Random = read_pages of {args.pages} distinct random RAM frames."
    )
    out = write_json(args.json, report)
    say(f"wrote {out}; wall time {report['wall_s']:.0f} s")
    if error:
        console.print(f"[red]bench failed: {error}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
