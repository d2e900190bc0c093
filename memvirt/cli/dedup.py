"""``memvirt reclaim``, ``memvirt dedup analyze`` and ``memvirt ksm``: act on what the guest holds free."""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Annotated, Any

import typer

from memvirt.cli.output import JsonOpt, byte_progress, emit_json, err, human, out, spinner, table
from memvirt.errors import MemvirtError, UsageError
from memvirt.qemu.vm import VM

app = typer.Typer(help="Find duplicate, zero and free pages within and across guests and dumps.", no_args_is_help=True)
ksm_app = typer.Typer(
    help="Drive the host's KSM for guests with anonymous RAM, helped by introspection.", no_args_is_help=True
)


def _running(name: str) -> VM:
    vm = VM.load(name)
    vm.require_alive()
    return vm


def reclaim(
    name: Annotated[str, typer.Argument(help="A running memvirt VM.")],
    watch: Annotated[float | None, typer.Option(help="Repeat every SECONDS until interrupted.")] = None,
    goal: Annotated[float, typer.Option(help="Longest pause allowed, in ms per GiB of guest RAM.")] = 20.0,
    json_: JsonOpt = False,
) -> None:
    """Return to the host the memory behind pages the guest holds free (no guest driver).

    Each page is re-verified free while the guest is paused, then discarded: a hole in a shared
    RAM file, MADV_DONTNEED inside QEMU for anonymous RAM. The guest reads zeros there. Pauses
    are kept under --goal ms per GiB.
    """
    if watch is not None and watch <= 0:
        raise UsageError("--watch needs a positive number of seconds")
    if goal <= 0:
        raise UsageError("--goal must be positive")
    from memvirt.dedup.reclaim import Reclaimer

    vm = _running(name)
    if vm.status() != "running":
        raise UsageError(f"VM {name!r} is {vm.status()}: reclaim works on a running guest (it pauses it itself)")
    with spinner(f"reading {name}'s kernel structures"):
        rec = Reclaimer(vm, goal_ms_per_gib=goal)
    with rec:
        while True:
            with byte_progress(f"reclaiming free pages of {name}") as update:
                rep = rec.run(lambda done, total: update(done * 4096, total * 4096))
            report = {
                "vm": name,
                "method": rec.discarder.method,
                "time": round(time.time(), 3),
                **rep.to_json(),
                "goal_ms": round(rec.budget_ms, 2),
            }
            if json_:
                emit_json(report)
            else:
                _print_reclaim(report)
            if watch is None:
                return
            time.sleep(watch)


def _print_reclaim(r: dict) -> None:
    out.print(
        f"[bold]{r['vm']}[/]: reclaimed {human(r['reclaimed_bytes'])} "
        f"(host held {human(r['resident_before'])}, now {human(r['resident_after'])}) by {r['method']}; "
        f"free {human(r['free_pages'] * 4096)}, of it still backed {human(r['candidate_pages'] * 4096)}"
    )
    out.print(
        f"  {r['pauses']} pauses, longest {r['pause_max_ms']} ms (goal {r['goal_ms']} ms), total "
        f"{r['pause_total_ms']} ms; {r['gone_pages']} pages were allocated again before their pause and left alone"
    )


@app.command("analyze")
def analyze(
    sources: Annotated[list[str], typer.Argument(help="VM names, pid:N, RAM files or dumps.")],
    json_: JsonOpt = False,
    pause: Annotated[
        bool, typer.Option("--pause/--no-pause", help="Hold each running guest still while reading it.")
    ] = False,
    introspect: Annotated[bool, typer.Option("--introspect/--no-introspect", help="Find free pages too.")] = True,
    skip_free: Annotated[
        bool, typer.Option("--skip-free", help="Do not read free pages (faster; no content-only figures).")
    ] = False,
) -> None:
    """Duplicate pages within and across sources, zero pages, and how much more the knowledge of
    free pages saves. Running guests are read live unless --pause (figures then approximate)."""
    from memvirt.dedup.analyze import analyze as run_analysis
    from memvirt.targets import held_still, open_memory

    if len(set(sources)) != len(sources):
        raise UsageError("a source is named twice")
    with ExitStack() as stack:
        named = []
        for s in sources:
            mem = stack.enter_context(open_memory(s))
            live = bool(stack.enter_context(held_still(s, pause))["live"])
            named.append((s, mem, live))
        with byte_progress("fingerprinting pages") as update:
            result = run_analysis(named, update, introspect=introspect, skip_free=skip_free)
    report = result.to_json()
    report["total"]["host_bytes"] = _host_bytes(sources)
    if json_:
        emit_json(report)
        return
    rows = []
    for s in report["sources"]:
        free = "?" if s["free"] is None else human(s["free"] * 4096)
        rows.append(
            [
                s["name"],
                human(s["pages"] * 4096),
                human(s["zero"] * 4096),
                human(s["duplicate"] * 4096),
                free,
                s["kernel"] or "",
                s["note"] or "",
            ]
        )
    table(None, ["SOURCE", "RAM", "ZERO", "DUPLICATE WITHIN", "FREE", "KERNEL", "NOTE"], rows)
    t = report["total"]
    if t["content_saving_bytes"] is not None:
        out.print(
            f"all together: {human(t['content_saving_bytes'])} saved by merging identical pages "
            f"(zero pages included), {human(t['free_aware_saving_bytes'])} when free pages are dropped too: "
            f"free pages unlock [bold]{human(t['free_unlocks_bytes'])}[/] more"
        )
    now = f"; the host holds them in {human(t['host_bytes'])} now" if t["host_bytes"] is not None else ""
    out.print(f"limit (distinct content of the pages in use): [bold]{human(t['limit_bytes'])}[/]{now}")
    out.print(f"read {human(t['pages'] * 4096)} in {report['seconds']} s ({report['gib_per_second']} GiB/s)")


@app.command("run")
def dedup_run(
    names: Annotated[list[str], typer.Argument(help="Running memvirt VMs with anonymous RAM.")],
    ksmd_cpu: Annotated[
        str | None, typer.Option(help="Keep ksmd within this share of one CPU, e.g. 1.5% (default: no cap).")
    ] = None,
    duration: Annotated[float, typer.Option(help="Seconds to run (0: until interrupted).")] = 120.0,
    interval: Annotated[float, typer.Option(help="Seconds between samples (and ksmd pacing).")] = 5.0,
    refresh: Annotated[float, typer.Option(help="Seconds between refreshes of the candidate set.")] = 20.0,
    pass_seconds: Annotated[float, typer.Option(help="Seconds one KSM pass over the candidates should take.")] = 5.0,
    directed: Annotated[
        bool, typer.Option("--directed/--blind", help="Only duplicate candidates mergeable (--blind: all RAM).")
    ] = True,
    json_: JsonOpt = False,
) -> None:
    """Reclaim free pages and direct KSM at the pages that have a twin in some guest.

    Each refresh: free pages discarded, every page in use fingerprinted across the guests, only
    runs of duplicate candidates left MADV_MERGEABLE inside QEMU, pages_to_scan set so a pass over
    them takes --pass-seconds (capped by --ksmd-cpu). At the end (also Ctrl-C, SIGTERM, and
    SIGKILL through a watchdog) QEMU's RAM is all mergeable again and KSM's settings come back.
    """
    from memvirt.dedup.directed import DirectedKsm

    if duration < 0 or interval <= 0 or refresh <= 0:
        raise UsageError("--duration must be 0 or more, --interval and --refresh positive")
    vms = [_running(n) for n in names]
    if len({vm.name for vm in vms}) != len(vms):
        raise UsageError("a VM is named twice")
    samples = []
    shown: set[str] = set()
    with DirectedKsm(
        vms,
        _share(ksmd_cpu) if ksmd_cpu else None,
        pass_seconds=pass_seconds,
        refresh_seconds=refresh,
        directed=directed,
    ) as eng:
        while True:
            row = eng.tick()
            for note in eng.notices:
                if note not in shown:  # once: a guest whose tracking was refused or ended
                    shown.add(note)
                    err.print(f"[dim]{note}[/]")
            samples.append(row)
            if not json_:
                r = row.get("refresh")
                if r:
                    out.print(
                        f"[dim]refresh: {r['candidates']} candidate pages, {r['mergeable']} mergeable present, "
                        f"reclaimed {human(r['reclaimed_bytes'])}, pages_to_scan <= {r['pages_to_scan_max']}, "
                        f"{r['seconds']} s[/]"
                    )
                out.print(
                    f"{row['t']:7.1f} s  guests hold {human(row['guest_bytes'])}  KSM saves "
                    f"{human(row['ksm_saving_bytes'])}  reclaimed {human(row['reclaimed_bytes'])}  "
                    f"ksmd CPU {row['ksmd_cpu_seconds']:.2f} s, scanned {row['pages_scanned']} pages"
                )
            if duration and row["t"] >= duration:
                break
            time.sleep(min(interval, max(duration - row["t"], 0.05)) if duration else interval)
    if json_:
        emit_json(
            {
                "vms": names,
                "directed": directed,
                "ksmd_cpu_budget": _share(ksmd_cpu) if ksmd_cpu else None,
                "samples": samples,
                "restored": True,
            }
        )


def _host_bytes(sources: list[str]) -> int | None:
    """Host memory the sources hold now, when every source is a running memvirt VM (else None)."""
    from memvirt.dedup.discard import host_usage
    from memvirt.targets import owning_vm

    vms = [owning_vm(s) for s in sources]
    if any(vm is None or not vm.alive() for vm in vms):
        return None
    return sum(host_usage(vm) for vm in vms if vm is not None)


@ksm_app.command("status")
def ksm_status(json_: JsonOpt = False) -> None:
    """KSM's settings and counters, and what each memvirt VM holds and shares."""
    from memvirt.dedup import ksm
    from memvirt.dedup.discard import host_usage

    if not ksm.available():
        raise UsageError("this host kernel has no KSM (/sys/kernel/mm/ksm is missing)")
    vms: list[dict[str, Any]] = []
    for vm in VM.all():
        if not vm.alive():
            continue
        st = ksm.process_stat(vm.config.pid)
        vms.append(
            {
                "name": vm.name,
                "ram": vm.config.ram,
                "host_bytes": host_usage(vm),
                "mergeable": vm.config.ram == "anonymous",
                **st,
            }
        )
    report: dict[str, Any] = {
        "settings": ksm.settings(),
        "counters": ksm.counters(),
        "saving_bytes": ksm.saving_bytes(),
        "ksmd_cpu_seconds": round(ksm.ksmd_cpu_seconds(), 2),
        "vms": vms,
    }
    if json_:
        emit_json(report)
        return
    s = report["settings"]
    out.print(
        f"KSM run={s.get('run')} pages_to_scan={s.get('pages_to_scan')} sleep={s.get('sleep_millisecs')} ms "
        f"use_zero_pages={s.get('use_zero_pages')}; saving {human(report['saving_bytes'])}; "
        f"ksmd used {report['ksmd_cpu_seconds']} s of CPU"
    )
    table(
        None,
        ["VM", "RAM", "HOST HOLDS", "KSM MERGING PAGES", "KSM ZERO PAGES"],
        [
            [v["name"], v["ram"], human(v["host_bytes"]), v.get("ksm_merging_pages", ""), v.get("ksm_zero_pages", "")]
            for v in vms
        ],
    )


@ksm_app.command("run")
def ksm_run(
    names: Annotated[list[str], typer.Argument(help="Running memvirt VMs with anonymous RAM.")],
    duration: Annotated[float, typer.Option(help="Seconds to drive KSM.")] = 120.0,
    interval: Annotated[float, typer.Option(help="Seconds between reports (and reclaim passes).")] = 5.0,
    reclaim_free: Annotated[
        bool, typer.Option("--reclaim/--no-reclaim", help="Discard free guest pages each interval.")
    ] = True,
    pages_to_scan: Annotated[int, typer.Option(help="KSM pages per wake-up (stock: 100).")] = 100,
    sleep_ms: Annotated[int, typer.Option(help="KSM sleep between wake-ups in ms (stock: 20).")] = 20,
    zero_pages: Annotated[
        bool, typer.Option("--zero-pages/--no-zero-pages", help="Merge zero pages with the zero page.")
    ] = True,
    ksmd_cpu: Annotated[
        str | None,
        typer.Option(
            help="Keep ksmd within this share of one CPU, e.g. 0.5% "
            "(pages_to_scan set each interval, at most --pages-to-scan)."
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep/--restore", help="Leave KSM running with these settings at the end.")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Run KSM over the guests with introspection's help and report its saving over time.

    Free guest pages are discarded (so they cost nothing and KSM's passes skip them) and zero pages
    merge with the zero page; KSM runs at the rate given (stock by default), or with --ksmd-cpu as
    fast as that CPU budget allows (never faster than the rate given).
    KSM's previous settings come back at the end unless --keep.
    """
    from memvirt.dedup import ksm
    from memvirt.dedup.discard import host_usage
    from memvirt.dedup.reclaim import Reclaimer

    if duration <= 0 or interval <= 0:
        raise UsageError("--duration and --interval must be positive")
    if pages_to_scan <= 0 or sleep_ms <= 0:
        raise UsageError("--pages-to-scan and --sleep-ms must be positive")
    vms = [_running(n) for n in names]
    for vm in vms:
        if vm.config.ram != "anonymous":
            raise UsageError(
                f"VM {vm.name!r} has {vm.config.ram} RAM: KSM merges only anonymous RAM (start it with --ram anonymous)"
            )
    ksm.refuse_other_tuners()
    samples = []
    before = ksm.settings()
    with ExitStack() as stack:
        recs = [stack.enter_context(Reclaimer(vm)) for vm in vms] if reclaim_free else []
        borrowed = None
        if keep:
            _apply(ksm, pages_to_scan, sleep_ms, zero_pages)
        else:
            borrowed = stack.enter_context(
                ksm.configured(
                    run=1, pages_to_scan=pages_to_scan, sleep_millisecs=sleep_ms, use_zero_pages=int(zero_pages)
                )
            )
        pacer = ksm.Pacer(_share(ksmd_cpu), pages_to_scan, borrowed) if ksmd_cpu else None
        t0, cpu0, reclaimed = time.monotonic(), ksm.ksmd_cpu_seconds(), 0
        while True:
            for r in recs:
                reclaimed += r.run().reclaimed_bytes
            if borrowed is not None:
                changed = borrowed.check()
                if changed:
                    path, mine, now = changed[0]
                    raise MemvirtError(
                        f"another tool changed {path} ({mine} -> {now}) while memvirt drove KSM; "
                        "memvirt stops rather than fight it (its other settings are restored)"
                    )
            if pacer is not None:
                pacer.step()
            s = ksm.sample(t0, [host_usage(vm) for vm in vms])
            row = {
                **s.to_json(),
                "reclaimed_bytes": reclaimed,
                "ksmd_cpu_seconds": round(s.ksmd_cpu - cpu0, 3),
                "pages_to_scan": pacer.pages if pacer is not None else pages_to_scan,
            }
            samples.append(row)
            if not json_:
                out.print(
                    f"{row['t']:7.1f} s  guests hold {human(row['guest_bytes'])}  KSM saves "
                    f"{human(row['ksm_saving_bytes'])}  reclaimed {human(reclaimed)}  "
                    f"ksmd CPU {row['ksmd_cpu_seconds']:.2f} s"
                )
            if s.t >= duration:
                break
            time.sleep(min(interval, max(duration - s.t, 0.05)))
    report: dict[str, Any] = {
        "vms": names,
        "settings": {
            "pages_to_scan": pages_to_scan,
            "sleep_millisecs": sleep_ms,
            "use_zero_pages": int(zero_pages),
            "reclaim": reclaim_free,
            "ksmd_cpu_budget": _share(ksmd_cpu) if ksmd_cpu else None,
        },
        "restored": not keep,
        "previous": before,
        "samples": samples,
    }
    if json_:
        emit_json(report)


def _share(text: str) -> float:
    """``0.5%`` or ``0.005`` -> 0.005 (a share of one CPU)."""
    try:
        return float(text.removesuffix("%")) / 100 if text.endswith("%") else float(text)
    except ValueError as e:
        raise UsageError(f"--ksmd-cpu takes a share of one CPU such as 0.5% or 0.005, not {text!r}") from e


def _apply(ksm, pages_to_scan: int, sleep_ms: int, zero_pages: bool) -> None:
    for k, v in (("pages_to_scan", pages_to_scan), ("sleep_millisecs", sleep_ms), ("use_zero_pages", int(zero_pages))):
        ksm.write(k, v)
    ksm.write("run", 1)


@ksm_app.command("stop")
def ksm_stop(
    unmerge: Annotated[bool, typer.Option(help="Also split every merged page again (run=2).")] = False,
) -> None:
    """Stop ksmd (merged pages stay merged unless --unmerge)."""
    from memvirt.dedup import ksm

    ksm.write("run", 2 if unmerge else 0)


DEMO_CHURN = "memtouch --hot 160M --content random --duration 1 >/dev/null"


def demo_reclaim(vm: VM) -> dict:
    """For ``memvirt demo``: the guest allocates and frees 160 MiB (its free memory is now dirty, as
    in any long-running guest), then one reclaim pass gives it back; the guest must still run."""
    from memvirt.dedup.reclaim import Reclaimer

    vm.exec(DEMO_CHURN, timeout=300).check("allocating and freeing memory in the guest")
    with Reclaimer(vm) as rec:
        rep = rec.run()
    alive = vm.exec("echo alive").text.strip() == "alive"
    return {"method": rec.discarder.method, "goal_ms": round(rec.budget_ms, 2), "guest_alive": alive, **rep.to_json()}


def print_demo_reclaim(r: dict) -> None:
    out.print(
        f"[bold]Reclaim[/] (no guest driver): the guest freed 160 MiB; memvirt gave the host back "
        f"{human(r['reclaimed_bytes'])} ({human(r['resident_before'])} -> {human(r['resident_after'])}) by "
        f"{r['method']} in {r['pauses']} pauses of at most {r['pause_max_ms']} ms (goal {r['goal_ms']} ms); "
        f"guest {'still running' if r['guest_alive'] else 'NOT ANSWERING'}"
    )
