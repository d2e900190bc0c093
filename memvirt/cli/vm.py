"""``memvirt vm``: start, inspect, drive and stop guests."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from memvirt.cli.output import JsonOpt, byte_progress, emit_json, human, out, spinner, table
from memvirt.errors import UsageError
from memvirt.image.build import find_image
from memvirt.qemu.config import Workload
from memvirt.qemu.dump import dump_vm
from memvirt.qemu.vm import DUMP_FORMATS, VM, start_vm
from memvirt.units import parse_size

app = typer.Typer(help="Start, list, drive and stop memvirt guests.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="VM name.")]


def vm_info(vm: VM) -> dict[str, Any]:
    c = vm.config
    return {
        "name": c.name,
        "status": vm.status(),
        "pid": c.pid,
        "memory": c.memory,
        "cpus": c.cpus,
        "ram": c.ram,
        "ram_path": c.ram_path or None,
        "accel": c.accel,
        "kernel": c.kernel_release,
        "image": c.image,
        "uptime": round(time.time() - c.started, 1),
        "regions": c.regions,
        "serial_log": str(vm.serial_log),
        "qmp": str(vm.qmp_path),
        "role": c.role or ("clone" if c.clone_of else ""),
        "clone_of": c.clone_of or None,
        "lazy": c.ram == "cow" if c.clone_of else None,
        "lan": c.lan or None,
        "lan_ip": c.lan_ip or None,
        "clones": [v.name for v in vm.lazy_clones()] if vm.is_template else [],
        "ksm": ksm_text(c.ram),
    }


def ksm_text(ram: str) -> str:
    """Whether the host's KSM can merge this guest's RAM: only anonymous private memory (QEMU's
    mem-merge=on); a shared RAM file or a clone's mapping is tmpfs/file memory KSM never scans,
    so memvirt offers those guests free-page reclaim (holes in the file) instead. Short: the
    table's other columns need the width."""
    return "yes" if ram == "anonymous" else "no"


def role_text(info: dict[str, Any]) -> str:
    """``template (N lazy clones)``, ``lazy clone of T``, ``eager clone of T`` or empty."""
    if info["role"] == "template":
        return f"template ({len(info['clones'])} lazy clones)"
    if info["clone_of"]:
        return f"{'lazy' if info['lazy'] else 'eager'} clone of {info['clone_of']}"
    return ""


@app.command("start")
def start(
    name: NameArg,
    memory: Annotated[str, typer.Option(help="Guest RAM (e.g. 512M, 4G).")] = "512M",
    cpus: Annotated[int, typer.Option(help="Virtual CPUs.")] = 1,
    image: Annotated[
        str | None, typer.Option(help="Image name or folder, or a kernel series (6.1, 6.12). Default: Debian 6.1.")
    ] = None,
    ram: Annotated[
        str, typer.Option(help="shared: RAM in a file on /dev/shm; anonymous: private QEMU memory.")
    ] = "shared",
    workload: Annotated[
        str | None, typer.Option(help="A command to start in the guest once it is up (e.g. 'memtouch --hot 64M').")
    ] = None,
    append: Annotated[str, typer.Option(help="Extra kernel command-line arguments.")] = "",
    lan: Annotated[
        str | None, typer.Option(help="Join this VM LAN (a private segment on loopback; see 'memvirt pm').")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Boot a guest and wait until its command channel answers."""
    size = parse_size(memory)
    with spinner("preparing image"):
        img = find_image(image)
    with spinner(f"booting {name} ({human(size)}, {img.release})"):
        vm = start_vm(name, img, memory=size, cpus=cpus, ram=ram, append=append, lan_name=lan or "")
        if workload:
            pid = vm.exec_background(workload, "/tmp/workload.log")
            vm.config.workload = Workload(workload, pid, "/tmp/workload.log")
            vm.save()
    if json_:
        emit_json(vm_info(vm))
    else:
        out.print(
            f"VM {name} running (pid {vm.config.pid}, {vm.config.accel}, {human(size)} {ram} RAM; "
            f"KSM can merge it: {ksm_text(vm.config.ram)})"
        )


@app.command("list")
def list_(json_: JsonOpt = False) -> None:
    """List VMs with their status (a VM whose QEMU died shows as dead)."""
    vms = VM.all()
    infos = [vm_info(v) for v in vms]
    if json_:
        emit_json(infos)
        return
    table(
        None,
        ["NAME", "STATUS", "PID", "MEMORY", "RAM", "ACCEL", "KERNEL", "ROLE"],
        [
            [
                i["name"],
                i["status"],
                i["pid"],
                human(i["memory"]),
                f"{i['ram']} (KSM)" if i["ksm"] == "yes" else i["ram"],
                i["accel"],
                i["kernel"],
                role_text(i),
            ]
            for i in infos
        ],
    )
    if any(i["ksm"] != "yes" for i in infos):
        # in the RAM column rather than a column of its own: the table must fit 80 columns
        out.print("(KSM) marks guests host KSM can merge; the others get free-page reclaim (memvirt reclaim)")


@app.command("status")
def status(name: NameArg, json_: JsonOpt = False) -> None:
    """Show one VM's state. Exit code 1 if it is dead."""
    vm = VM.load(name)
    info = vm_info(vm)
    if json_:
        emit_json(info)
    else:
        for k, v in info.items():
            if k != "regions":
                out.print(f"{k:11} {v}")
        for r in vm.regions:
            out.print(f"{'region':11} gpa {r.gpa:#014x}-{r.end:#014x} ({human(r.size)}) at offset {r.offset:#x}")
    if info["status"] == "dead":
        raise typer.Exit(1)


@app.command("exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def exec_(
    ctx: typer.Context,
    name: NameArg,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the command.")] = 60.0,
    background: Annotated[bool, typer.Option(help="Start detached; print its guest pid.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Run a command in the guest: memvirt vm exec NAME -- CMD [ARGS...]. Exits with its exit code."""
    import shlex

    if not ctx.args:
        raise UsageError("no command given: memvirt vm exec NAME -- CMD [ARGS...]")
    script = ctx.args[0] if len(ctx.args) == 1 else shlex.join(ctx.args)
    vm = VM.load(name)
    if background:
        pid = vm.exec_background(script, f"/tmp/bg-{int(time.time() * 1000)}.log")
        emit_json({"pid": pid}) if json_ else out.print(pid)
        return
    res = vm.exec(script, timeout=timeout)
    if json_:
        emit_json({"rc": res.rc, "output": res.text})
    else:
        sys.stdout.write(res.text)
    raise typer.Exit(res.rc)


@app.command("pause")
def pause(name: NameArg) -> None:
    """Stop the guest's CPUs (its memory stays put)."""
    VM.load(name).pause()


ForceOpt = Annotated[bool, typer.Option("--force", help="Also a template whose RAM lazy clones still map.")]


@app.command("resume")
def resume(name: NameArg, force: ForceOpt = False) -> None:
    """Let a paused guest run again (a template becomes an ordinary VM; refused while its lazy clones run)."""
    VM.load(name).resume(force=force)


@app.command("dump")
def dump(
    name: NameArg,
    file: Annotated[Path, typer.Argument(help="Where to write the dump.")],
    format: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(DUMP_FORMATS)}.")] = "elf",
    json_: JsonOpt = False,
) -> None:
    """Dump guest memory: QEMU ELF core, kdump-compressed (zlib), or raw (offset = guest-physical)."""
    vm = VM.load(name)
    t0 = time.monotonic()
    with byte_progress(f"dumping {name} ({format})") as update:
        path = dump_vm(vm, file, format, update)
    info: dict[str, Any] = {
        "file": str(path),
        "format": format,
        "bytes": path.stat().st_size,
        "seconds": round(time.monotonic() - t0, 2),
    }
    if json_:
        emit_json(info)
    else:
        out.print(f"wrote {path} ({format}, {human(info['bytes'])}) in {info['seconds']} s")


@app.command("stop")
def stop(name: NameArg, force: ForceOpt = False) -> None:
    """Stop the guest and remove its state and RAM file (also cleans up a dead VM; refused for a template
    while its lazy clones run)."""
    VM.load(name).stop(force=force)
