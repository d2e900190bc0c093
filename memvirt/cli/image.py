"""``memvirt image``: build and list guest images."""

from __future__ import annotations

from typing import Annotated

import typer

from memvirt.cli.output import JsonOpt, emit_json, out, spinner, table
from memvirt.image.build import build_image, list_images
from memvirt.image.kernel import resolve_kernel

app = typer.Typer(help="Build and list guest images (kernel + busybox initramfs).", no_args_is_help=True)


@app.command("build")
def build(
    kernel: Annotated[
        str,
        typer.Option(help="Debian series (6.1, 6.12, 7.2), a linux-image-* package name, or a path to a vmlinuz."),
    ] = "6.1",
    flavour: Annotated[
        str | None,
        typer.Option(help="Debian kernel flavour: cloud, rt, 16k (arm64, 16 KiB pages); default: the plain one."),
    ] = None,
    arch: Annotated[str, typer.Option(help="Guest architecture: amd64 or arm64 (TCG on an x86 host).")] = "amd64",
    modules: Annotated[
        str | None, typer.Option(help="Module folder (/lib/modules/RELEASE) to go with a --kernel PATH.")
    ] = None,
    suite: Annotated[
        str | None,
        typer.Option(
            help="Debian suite for the kernel: bookworm, trixie or sid (default: the host's apt, then trixie, sid)."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if a matching image exists.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Fetch a kernel (apt-get download, cached in ~/.cache/memvirt) and build an initramfs for it.

    Kernels of trixie and sid, and every arm64 package (kernel, busybox, the -dev packages the
    cross-compiled guest programs link), come through a private apt (~/.cache/memvirt/apt/SUITE,
    SUITE-arm64) that leaves the host's apt sources and state alone.

    The initramfs holds busybox, memvirt's guest init and command agent, the workload programs
    (memtouch, datacheck, physaddr) and the modules the guest needs (virtio console and net,
    qemu_fw_cfg).
    """
    with spinner(f"fetching kernel {kernel} ({flavour or arch})"):
        k = resolve_kernel(kernel, flavour, modules, suite, arch)
    with spinner(f"building image for {k.release}"):
        img = build_image(k, force=force)
    if json_:
        emit_json(img.to_json())
    else:
        out.print(f"image {img.name}\n  kernel  {img.vmlinuz}\n  initrd  {img.initrd}")


@app.command("list")
def list_(json_: JsonOpt = False) -> None:
    """List built images."""
    imgs = list_images()
    if json_:
        emit_json([i.to_json() for i in imgs])
        return
    table(
        None, ["NAME", "KERNEL", "ARCH", "PROGRAMS"], [[i.name, i.release, i.arch, ",".join(i.programs)] for i in imgs]
    )
