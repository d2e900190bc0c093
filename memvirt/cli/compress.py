"""``memvirt wss``, ``memvirt compress`` and ``memvirt tier``: working sets and the compressed tier."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from memvirt.cli.output import JsonOpt, emit_json, err, human, out, spinner, table
from memvirt.errors import UsageError
from memvirt.qemu.vm import VM
from memvirt.units import parse_size

tier_app = typer.Typer(
    help="Set up, show and take down the compressed (zram) and disk swap tiers.", no_args_is_help=True
)


def _percent(text: str) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError as e:
        raise UsageError(f"--margin takes a percentage like 10%, not {text!r}") from e
    return value / 100


class _Stop:
    """SIGTERM ends the loop like Ctrl-C does, so limits are always lifted on the way out."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, *_: Any) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def _row(s: Any) -> str:
    limit = human(s.limit) if s.limit else "none"
    return (
        f"{s.t:7.1f}s {s.vm:<16} wss {human(s.wss):>10}  resident {human(s.resident):>10}  "
        f"swapped {human(s.swapped):>10}  limit {limit:>10}  refaulted {human(s.refaulted):>9}  {s.action}"
    )


def _loop(
    names: list[str],
    policy: Any,
    interval: float,
    duration: float | None,
    method: str,
    samples: int,
    json_: bool,
    plot: Path | None,
    title: str,
    owns_tier: bool = False,
) -> dict[str, Any]:
    from memvirt.compress.controller import Controller, choose_method
    from memvirt.compress.plot import draw_timeline

    choose_method(method)
    if duration is not None and duration <= 0:
        raise UsageError("--duration must be positive")
    vms = [VM.load(n) for n in names]
    with spinner("sampling guest pages"):
        ctl = Controller(vms, policy, interval, method, samples, owns_tier=owns_tier)
    if ctl.method_notice:
        err.print(f"memvirt: notice: {ctl.method_notice}", markup=False)
    stop = _Stop()
    rows: list[Any] = []

    def show(batch: list[Any]) -> None:
        rows.extend(batch)
        if not json_:
            for s in batch:
                err.print(_row(s), markup=False)

    try:
        ctl.run(duration, show, stop)
    except KeyboardInterrupt:
        pass
    finally:
        cpu = ctl.cpu_seconds()
        ctl.close()
    report = {
        "policy": policy.name,
        "method": ctl.method,
        "method_notice": ctl.method_notice,
        "interval": interval,
        "controller_cpu_s": round(cpu, 3),
        "vms": ctl.summary(),
        "samples": [s.to_json() for s in rows],
    }
    if plot is not None and rows:
        report["plot"] = str(draw_timeline(rows, plot, title))
    return report


def wss(
    names: Annotated[list[str], typer.Argument(help="Running memvirt VMs.", metavar="NAME...")],
    interval: Annotated[float, typer.Option(help="Seconds per estimate (the access window).")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="Stop after SECONDS (default: until Ctrl-C).")] = None,
    method: Annotated[str, typer.Option(help="auto (DAMON if present), damon, or referenced (clear_refs).")] = "auto",
    samples: Annotated[int, typer.Option(help="Guest pages DAMON watches per VM.")] = 4096,
    json_: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of the estimate over time.")] = None,
) -> None:
    """Estimate each VM's working set from the host over time (no guest agent, nothing changed).

    DAMON watches a random sample of the VM's pages by host frame; where DAMON is missing, the
    accessed bits of QEMU's RAM mapping are cleared and counted back (total only).
    """
    from memvirt.compress.controller import Policy

    if samples < 64:
        raise UsageError("--samples must be at least 64")
    report = _loop(names, Policy("none"), interval, duration, method, samples, json_, plot, "working set")
    if json_:
        emit_json(report)
        return
    table(
        None,
        ["VM", "intervals", "working set (last)", "resident", "swapped"],
        [
            [v["vm"], v["intervals"], human(v["wss_last"]), human(v["resident_last"]), human(v["swapped_last"])]
            for v in report["vms"]
        ],
    )
    if "plot" in report:
        out.print(f"plot: {report['plot']}")


def compress(
    names: Annotated[list[str], typer.Argument(help="Running memvirt VMs.", metavar="NAME...")],
    margin: Annotated[str, typer.Option(help="Resident memory kept above the working set.")] = "10%",
    policy: Annotated[str, typer.Option(help="adaptive (follow the working set) or static (--limit).")] = "adaptive",
    limit: Annotated[str | None, typer.Option(help="Static policy: each VM's memory cap, e.g. 300M.")] = None,
    interval: Annotated[float, typer.Option(help="Seconds per control step.")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="Stop after SECONDS (default: until Ctrl-C).")] = None,
    method: Annotated[str, typer.Option(help="Working-set tracker: auto, damon or referenced.")] = "auto",
    algorithm: Annotated[str, typer.Option(help="zram compressor if the tier is not up yet.")] = "lz4",
    samples: Annotated[int, typer.Option(help="Guest pages DAMON watches per VM.")] = 4096,
    json_: JsonOpt = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of working set, resident and limit.")] = None,
    keep_tier: Annotated[
        bool,
        typer.Option("--keep-tier/--release-tier", help="Leave a zram tier this command set up in place at the end."),
    ] = False,
) -> None:
    """Keep each VM's resident memory near its working set plus a margin; compress the cold rest.

    Cold guest pages go to zram by lowering the VM's memory-cgroup limit, so the host kernel
    picks its least recently used pages. Refaults raise the limit at once. On exit (also on
    Ctrl-C, SIGTERM, or by a watchdog after SIGKILL) the limits are lifted, and a zram tier this
    command had to set up is taken down again (its pages come back into RAM) unless --keep-tier;
    one set up by 'memvirt tier up' stays, its compressed pages coming back when touched.
    """
    from memvirt.compress import damon, tiers
    from memvirt.compress.controller import Policy, choose_method

    pol = Policy(policy, _percent(margin), parse_size(limit) if limit else None)
    choose_method(method)
    for name in names:
        VM.load(name).require_alive()
    had_tier, had_swap = tiers.status()["up"], bool(tiers.active_swaps())
    t = tiers.up(algorithm=algorithm)
    owns = not had_tier and not keep_tier
    err.print(
        f"compressed tier: /dev/{t.zram} ({t.algorithm}, up to {human(t.mem_limit)} of host RAM"
        + (", taken down at the end)" if owns else ")")
    )
    if not had_swap:
        for k in damon.pageout_schemes():
            err.print(
                f"memvirt: notice: with swap on, {k.describe()} of another tool now also pages out idle "
                "memory of every process, other VMs' RAM included",
                markup=False,
            )
    try:
        report = _loop(
            names, pol, interval, duration, method, samples, json_, plot, f"memvirt compress ({policy})", owns_tier=owns
        )
    except BaseException:
        if owns:
            tiers.down()
        raise
    st = tiers.status()
    report["zram"] = st.get("zram")
    report["ratio"] = st.get("ratio")
    if json_:
        emit_json(report)
        return
    table(
        None,
        ["VM", "resident first", "resident last", "in zram", "working set", "refaulted", "back-offs"],
        [
            [
                v["vm"],
                human(v["resident_first"]),
                human(v["resident_last"]),
                human(v["swapped_last"]),
                human(v["wss_last"]),
                human(v["refaulted_total"]),
                v["back_offs"],
            ]
            for v in report["vms"]
        ],
    )
    ratio = report["ratio"]
    out.print(
        f"compression ratio {ratio:.2f}:1" if ratio else "nothing compressed",
        f"; controller CPU {report['controller_cpu_s']} s",
    )
    if "plot" in report:
        out.print(f"plot: {report['plot']}")


@tier_app.command("up")
def tier_up(
    algorithm: Annotated[
        str, typer.Option(help="zram compressor (lz4, lzo-rle, zstd... as the kernel offers).")
    ] = "lz4",
    size: Annotated[str | None, typer.Option(help="zram capacity, uncompressed (default: half of host RAM).")] = None,
    mem_limit: Annotated[str | None, typer.Option(help="Host RAM zram may use (default: a quarter).")] = None,
    disk_swap: Annotated[str | None, typer.Option(help="Add a disk swap file of SIZE below zram.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Set up the compressed tier (zram swap, priority 100) and optionally a disk tier below it."""
    from memvirt.compress import tiers

    t = tiers.up(
        algorithm,
        parse_size(size) if size else None,
        parse_size(mem_limit) if mem_limit else None,
        parse_size(disk_swap) if disk_swap else 0,
    )
    if json_:
        emit_json(tiers.status())
        return
    out.print(
        f"/dev/{t.zram}: {t.algorithm}, capacity {human(t.disksize)}, host RAM cap {human(t.mem_limit)}"
        + (f"; disk tier {t.disk_file} ({human(t.disk_size)})" if t.disk_file else "")
    )


@tier_app.command("down")
def tier_down() -> None:
    """Take down what 'tier up' set up (swapped pages come back into RAM first)."""
    from memvirt.compress import tiers

    with spinner("swapping the tiers back into RAM"):
        t = tiers.down()
    out.print("tiers removed" if t else "no memvirt tiers were set up")


@tier_app.command("status")
def tier_status(json_: JsonOpt = False) -> None:
    """Show the tiers and how well the compressed one does."""
    from memvirt.compress import tiers

    st = tiers.status()
    if json_:
        emit_json(st)
        return
    if not st["up"]:
        out.print("no memvirt tiers are up")
        return
    z = st["zram"]
    out.print(
        f"/dev/{st['tiers']['zram']}: holds {human(z['orig_data_size'])} in {human(z['mem_used_total'])}"
        + (f" ({st['ratio']:.2f}:1)" if st["ratio"] else "")
    )
    table(
        None,
        ["swap", "size", "used", "priority"],
        [[k, human(v["size"]), human(v["used"]), v["priority"]] for k, v in st["swaps"].items()],
    )


def demo_compress(vm: VM, seconds: float = 12.0) -> dict[str, Any]:
    """The demo's step: follow the guest's working set for a few seconds with the cold rest in
    zram, then lift the limit (and take the tier down again if the demo set it up)."""
    from memvirt.compress import tiers
    from memvirt.compress.controller import Controller, Policy

    owns = not tiers.status()["up"]
    t = tiers.up()
    try:
        ctl = Controller([vm], Policy("adaptive"), interval=1.0, owns_tier=owns)
    except BaseException:
        if owns:
            tiers.down()
        raise
    try:
        ctl.run(seconds)
        st = tiers.zram_stats(t.zram)
        summary = ctl.summary()[0]
    finally:
        ctl.close()
    return {
        **summary,
        "method": ctl.method,
        "method_notice": ctl.method_notice,
        "algorithm": t.algorithm,
        "zram_orig": st["orig_data_size"],
        "zram_used": st["mem_used_total"],
        "seconds": seconds,
    }


def print_demo_compress(c: dict[str, Any]) -> None:
    ratio = c["zram_orig"] / c["zram_used"] if c["zram_used"] else 0.0
    out.print(
        f"[bold]Compression[/] ({c['method']} working set, {c['algorithm']} zram): working set "
        f"{human(c['wss_last'])}; guest RAM resident {human(c['resident_first'])} -> {human(c['resident_last'])}; "
        f"{human(c['zram_orig'])} of cold pages held in {human(c['zram_used'])} of zram ({ratio:.1f}:1); "
        f"refaulted {human(c['refaulted_total'])} in {c['intervals']} intervals"
        + (f" ({c['method_notice']})" if c.get("method_notice") else "")
    )
