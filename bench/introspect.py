"""Introspection speed and memory: bootstrap and rescan of a 4 GiB guest, beside makedumpfile.

Goals (the issue): bootstrap <= 1 s and each rescan <= 20 ms for a 4 GiB guest on this machine,
memory bounded (never a full copy of guest RAM). One run boots a guest with shared-file RAM (and
one with anonymous RAM, read through ``/proc/PID/mem``), fills most of its memory with
``memtouch --content mix`` and a hot set rewritten at ``--dirty-rate``, and measures, each in a
fresh Python process so that nothing cached in memory helps:

* bootstrap: the first ``Introspector(mem)`` of a process (cold) and a second one (warm), with
  ``kernel.timings`` per step, in ``--rounds`` processes per source, alternating between sources;
* rescan: ``--scans`` calls of ``intro.scan()`` on the paused guest over those processes
  (min/median/p95), ``scan(content=True)`` (reads all RAM to find zero pages), and
  ``scan(live=True)`` on the running guest;
* peak RSS of the measuring process per phase (``VmHWM``, reset between phases) and tracemalloc
  peaks, beside the guest's RAM size;
* a cProfile of a few rescans (which functions dominate).

The reference: the paused guest is dumped as ELF (``dump_vm``) and ``makedumpfile -d 16`` (the
Debian package) excludes free pages from the same dump, alternating with a fresh memvirt process
doing bootstrap + scan of that dump; makedumpfile's excluded free pages are compared with memvirt's
``free`` (buddy) pages. QEMU 7.2 writes its ELF section headers between the ELF header and the
program headers (``e_phoff`` 192) but makedumpfile reads program header *i* at
``sizeof(Elf64_Ehdr) + i * sizeof(Elf64_Phdr)`` whatever ``e_phoff`` says (``elf_info.c``,
``get_elf64_phdr``), finds no PT_LOAD and stops with "get_elf_info: Can't get the number of
PT_LOAD". The bench rewrites the dump's headers in place (program headers right after the ELF
header, section headers moved to the end of the file): no memory byte moves. A kdump-zlib dump is
also tried (``makedumpfile -R`` to un-flatten it, ``phys_base`` fixed: QEMU 7.2 parses VMCOREINFO's
decimal ``NUMBER(phys_base)`` as hex).

    python bench/introspect.py [--memory 4G] [--kernel 6.1] [--json FILE] [--no-anon] [--no-kdump]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from common import GIB, RESULTS, fill_and_pause, machine_info, run_main, size_arg, write_json
from intro import FILL_TIMEOUT, GOAL_BOOTSTRAP_S, GOAL_RESCAN_S, GUEST_LOG, VM_ANON, VM_SHARED, console, load, say
from intro.guests import (
    boot,
    elf_for_makedumpfile,
    fix_kdump_phys_base,
    make_dump,
    makedumpfile_version,
    run_makedumpfile,
    vmcoreinfo_number,
)
from intro.report import (
    code_state,
    mmp,
    ms,
    parts_table,
    profile_table,
    reference_table,
    steps_table,
    summarize,
    summary_table,
)
from intro.worker import run_worker, worker

# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--memory", default="4G", type=size_arg, help="guest RAM (default 4G)")
    p.add_argument("--fill", default="2560M", type=size_arg, help="bytes memtouch fills (default 2560M)")
    p.add_argument("--hot", default="64M", type=size_arg, help="memtouch hot set (default 64M)")
    p.add_argument("--dirty-rate", default="32M/s", help="memtouch --dirty-rate of the hot set (default 32M/s)")
    p.add_argument("--cpus", default=1, type=int, help="guest CPUs (default 1)")
    p.add_argument("--kernel", default="6.1", help="guest kernel spec for default_image (default 6.1)")
    p.add_argument("--layouts", default="auto", help="Introspector layouts (default auto)")
    p.add_argument(
        "--rounds",
        default=5,
        type=int,
        help="fresh measuring processes per source, alternating between the sources (and with\n"
        "makedumpfile on the dump); each times a cold and a warm bootstrap and\n"
        "scans/rounds rescans (default 5)",
    )
    p.add_argument("--scans", default=50, type=int, help="timed rescans per source, over all rounds (default 50)")
    p.add_argument("--content-scans", default=10, type=int, help="timed scan(content=True) per guest (default 10)")
    p.add_argument("--profile-scans", default=5, type=int, help="rescans under cProfile per guest (default 5)")
    p.add_argument("--no-anon", action="store_true", help="skip the anonymous-RAM guest (/proc/PID/mem)")
    p.add_argument("--no-kdump", action="store_true", help="skip the kdump-zlib dump (QEMU takes 1.5-3 min for 4 GiB)")
    p.add_argument("--json", type=Path, default=RESULTS / "introspect.json", help="where to write the results")
    p.add_argument("--keep-dumps", type=Path, metavar="DIR", help="write the dumps to DIR and keep them")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is None and (a.fill <= a.hot or a.fill > a.memory - (512 << 20)):
        p.error("--fill must be above --hot and at most --memory minus 512M")
    if a.rounds < 1 or a.scans < a.rounds or min(a.content_scans, a.profile_scans) < 0:
        p.error("--rounds must be positive and at most --scans; counts must not be negative")
    return a


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MEMVIRT_HOME", "/tmp/bench-intro-state")
    os.environ.setdefault("MEMVIRT_RAM_DIR", "/dev/shm/bench-intro-ram")
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    from memvirt.image.build import default_image
    from memvirt.qemu.accel import qemu_binary

    started = time.time()
    report: dict[str, Any] = {
        "bench": "introspect",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine_info(qemu_binary()),
        "code": code_state(),
        "goals": {"bootstrap_s": GOAL_BOOTSTRAP_S, "rescan_s": GOAL_RESCAN_S},
        "config": {
            "memory_bytes": args.memory,
            "fill_bytes": args.fill,
            "hot_bytes": args.hot,
            "dirty_rate": args.dirty_rate,
            "cpus": args.cpus,
            "layouts": args.layouts,
            "rounds": args.rounds,
            "scans": args.scans,
            "content_scans": args.content_scans,
            "profile_scans": args.profile_scans,
            "memvirt_home": os.environ["MEMVIRT_HOME"],
            "ram_dir": os.environ["MEMVIRT_RAM_DIR"],
            "makedumpfile": makedumpfile_version(),
            "units": "seconds in JSON; ms in the tables; MiB = 2^20 bytes",
        },
        "sources": {},
        "loadavg": {},
    }
    sources: dict[str, dict[str, Any]] = report["sources"]
    vms: list[Any] = []
    dump_dir = args.keep_dumps
    tmp_dir: Path | None = None
    error: str | None = None
    per_round = args.scans // args.rounds

    def phase(name: str) -> None:
        report["loadavg"][name] = load()
        say(f"[bold]{name}[/bold] (load {report['loadavg'][name]})")

    def round_task(source: str) -> dict[str, Any]:
        return {"source": source, "bootstraps": 2, "scans": per_round, "layouts": args.layouts}

    def nocache_task(source: str) -> dict[str, Any]:
        return {"source": source, "bootstraps": 2, "cache": False, "layouts": args.layouts}

    def said_round(name: str, r: int, res: dict[str, Any]) -> None:
        b = res["bootstraps"]
        say(
            f"{name} round {r + 1}: bootstrap cold {ms(b[0]['seconds'])} / warm {ms(b[1]['seconds'])} ms, "
            f"first scan {ms(res.get('first_scan_s'))} ms, rescan median {ms(res['rescan']['median_s'])} ms "
            f"(process {res['process_wall_s']:.2f} s)"
        )

    try:
        image = default_image(args.kernel)
        report["config"]["guest_kernel"] = image.release
        if dump_dir is None:
            tmp_dir = dump_dir = Path(tempfile.mkdtemp(prefix="memvirt-bench-intro-"))
        else:
            dump_dir.mkdir(parents=True, exist_ok=True)

        names = [(VM_SHARED, "shared")] + ([] if args.no_anon else [(VM_ANON, "anonymous")])
        phase("boot")
        vms = boot(image, args.memory, names, args.cpus)
        report["machine"]["accel"] = vms[0].config.accel
        guests = {vm.name: vm for vm in vms}
        label = {VM_SHARED: "RAM file", VM_ANON: "/proc/PID/mem"}
        cmd = (
            f"memtouch --hot {args.hot} --cold {args.fill - args.hot} --dirty-rate {args.dirty_rate} "
            f"--content mix --report 30"
        )
        phase("fill")
        report["guests"] = fill_and_pause(vms, cmd, GUEST_LOG, FILL_TIMEOUT, say, meminfo=True)

        # 1. paused guests: rounds of fresh processes, alternating between the sources.
        phase("paused guests: bootstrap and rescans")
        for r in range(args.rounds):
            for vm in vms:
                res = run_worker(round_task(vm.name), f"round {r + 1} {vm.name}")
                sources.setdefault(label[vm.name], {}).setdefault("rounds", []).append(res)
                said_round(label[vm.name], r, res)
                res = run_worker(nocache_task(vm.name), f"round {r + 1} {vm.name}, no cache")
                sources[label[vm.name]].setdefault("rounds_nocache", []).append(res)
                say(
                    f"{label[vm.name]} round {r + 1}, no build cache: bootstrap cold "
                    f"{ms(res['bootstraps'][0]['seconds'])} / warm {ms(res['bootstraps'][1]['seconds'])} ms"
                )

        # 2. paused guests: content scans, profile, tracemalloc.
        for vm in vms:
            phase(f"content scans and profile, {label[vm.name]}")
            res = run_worker(
                {
                    "source": vm.name,
                    "bootstraps": 1,
                    "content_scans": args.content_scans,
                    "profile_scans": args.profile_scans,
                    "tracemalloc": True,
                    "layouts": args.layouts,
                },
                f"extra {vm.name}",
            )
            sources[label[vm.name]]["extra"] = res
            say(
                f"{label[vm.name]}: content scan median {ms(res.get('content_scan', {}).get('median_s'))} ms, "
                f"zero pages {res.get('content_zero_pages')}, tracemalloc peaks {res.get('tracemalloc_peak_bytes')}"
            )

        # 3. running guests, one at a time: live rescans (memtouch keeps dirtying its hot set).
        for vm in vms:
            phase(f"live {label[vm.name]}")
            vm.resume()
            try:
                time.sleep(2)
                res = run_worker(
                    {"source": vm.name, "bootstraps": 1, "scans": args.scans, "live": True, "layouts": args.layouts},
                    f"live {vm.name}",
                )
            finally:
                vm.pause()
            sources[label[vm.name]]["live"] = res
            say(
                f"{label[vm.name]} live: rescan min/median/p95 {mmp(res['rescan'])} ms, "
                f"{res['scan_warnings']} warnings in {args.scans} scans"
            )

        shared = guests[VM_SHARED]
        if VM_ANON in guests:
            guests[VM_ANON].stop()
            vms.remove(guests[VM_ANON])
            say(f"{VM_ANON} stopped")

        # 4. the reference on an ELF dump of the paused guest.
        phase("ELF dump")
        ref: dict[str, Any] = {"makedumpfile_runs": []}
        report["reference"] = ref
        elf = dump_dir / f"{VM_SHARED}.elf"
        ref["dump"] = make_dump(shared, "elf", elf)
        if shared.status() != "paused":
            raise RuntimeError(f"{VM_SHARED} is {shared.status()} after the dump, not paused")
        mdf_args = ["--dry-run", "-d", "16", "--message-level", "31", str(elf), str(dump_dir / "out-d16")]
        ref["as_written"] = run_makedumpfile(mdf_args, "QEMU's ELF as written")
        ref["memvirt_as_written"] = run_worker(
            {"source": str(elf), "bootstraps": 1, "first_scan": True, "layouts": args.layouts},
            "memvirt on the ELF as written",
        )
        ref["header_fix"] = elf_for_makedumpfile(elf)
        say(f"ELF headers rewritten for makedumpfile: {ref['header_fix']}")
        phase("makedumpfile vs memvirt on the ELF dump, alternating")
        for r in range(args.rounds):
            m = run_makedumpfile(mdf_args, "fixed ELF")
            ref["makedumpfile_runs"].append(m)
            v = run_worker(round_task(str(elf)), "memvirt on the fixed ELF")
            sources.setdefault("ELF dump", {}).setdefault("rounds", []).append(v)
            sources["ELF dump"].setdefault("rounds_nocache", []).append(
                run_worker(nocache_task(str(elf)), "memvirt on the fixed ELF, no cache")
            )
            say(
                f"makedumpfile round {r + 1}: exit {m['returncode']}, {m['wall_s']:.2f} s, exclusion "
                f"{ms(m['steps_s'].get('Excluding unnecessary pages'))} ms, free {m.get('free_pages')}"
            )
            said_round("ELF dump", r, v)
        ref["memvirt_counts"] = sources["ELF dump"]["rounds"][-1]["counts"]
        ref["memvirt_counts_equal_before_and_after_fix"] = ref["memvirt_as_written"]["counts"] == ref["memvirt_counts"]
        if tmp_dir is not None:
            elf.unlink()

        # 5. a kdump-zlib dump: memvirt reads it as written; makedumpfile after -R and a phys_base fix.
        if not args.no_kdump:
            phase("kdump-zlib dump")
            kd = dump_dir / f"{VM_SHARED}.kdump"
            kref: dict[str, Any] = {"dump": make_dump(shared, "kdump-zlib", kd)}
            report["reference_kdump"] = kref
            res = run_worker({"source": str(kd), "bootstraps": 2, "scans": 10, "layouts": args.layouts}, "kdump")
            sources["kdump-zlib dump"] = {"rounds": [res]}
            said_round("kdump-zlib dump", 0, res)
            kref["memvirt_counts"] = res["counts"]
            kref["as_written"] = run_makedumpfile(
                ["--dry-run", "-d", "16", "--message-level", "31", str(kd), str(dump_dir / "out-k")], "QEMU's kdump"
            )
            plain = dump_dir / f"{VM_SHARED}.plain.kdump"
            kref["rearrange"] = run_makedumpfile(["-R", str(plain)], "-R", stdin=kd)
            if kref["rearrange"]["returncode"] == 0:
                pb = vmcoreinfo_number(kd, "phys_base")
                if pb is not None:
                    kref["phys_base_fix"] = fix_kdump_phys_base(plain, pb)
                    say(
                        f"kdump sub-header phys_base {kref['phys_base_fix']['header_phys_base']:#x}, "
                        f"VMCOREINFO says {pb:#x}"
                    )
                kref["refilter"] = run_makedumpfile(
                    ["--dry-run", "-d", "16", "--message-level", "31", str(plain), str(dump_dir / "out-k2")],
                    "un-flattened kdump",
                )
                say(
                    f"makedumpfile on the un-flattened kdump: exit {kref['refilter']['returncode']}, "
                    f"free {kref['refilter'].get('free_pages')} (memvirt {res['counts']['free']})"
                )
            if tmp_dir is not None:
                kd.unlink()
                plain.unlink(missing_ok=True)
    except BaseException as e:
        error = f"{type(e).__name__}: {e}"
        if not isinstance(e, KeyboardInterrupt | SystemExit):
            traceback.print_exc()
    finally:
        for vm in vms:
            try:
                vm.stop()
            except Exception as e:  # keep cleaning up the rest
                console().print(f"[red]could not stop {vm.name}: {e}[/red]")
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    report["wall_s"] = time.time() - started
    report["loadavg"]["end"] = load()
    if error:
        report["error"] = error
    for s in sources.values():
        s["summary"] = summarize(s)
    c = console()
    if sources:
        c.print(summary_table(report))
        c.print(steps_table(report))
        c.print(parts_table(report))
    if report.get("reference"):
        c.print(reference_table(report))
    for name in ("RAM file", "/proc/PID/mem"):
        if (sources.get(name) or {}).get("extra", {}).get("profile"):
            c.print(profile_table(sources[name]["extra"], name))
    c.print(
        f"Goals: bootstrap <= {GOAL_BOOTSTRAP_S:.0f} s (cold: first Introspector() of a fresh process, median of "
        f"{args.rounds}; with the build-id cache a previous census wrote, and with cache=False: the first sight of "
        f"a kernel build), rescan <= {GOAL_RESCAN_S * 1e3:.0f} ms (median of {per_round * args.rounds} over "
        f"{args.rounds} processes; p95 marked too). CPU = the measuring process's user+system time "
        "(time.process_time), which leaves out time other jobs held the CPU. Peak RSS = the measuring processes' "
        "highest VmHWM over "
        f"bootstrap, rescans and content scans (reset between phases; on the RAM file the mapped struct pages "
        f"count as RssShmem); baseline = Python + numpy + memvirt imported; guest RAM {args.memory / GIB:.0f} GiB. "
        f"Host load (1-min) per phase: "
        + "; ".join(f"{k} {v[0]}" for k, v in report["loadavg"].items())
        + f". Host: {report['machine']['cpus']} CPUs shared with other jobs; guests under "
        f"{report['machine'].get('accel', '?')}; a running guest takes a core."
    )
    out = write_json(args.json, report)
    say(f"wrote {out}; wall time {report['wall_s']:.0f} s")
    if error:
        c.print(f"[red]bench failed: {error}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    run_main(main)
