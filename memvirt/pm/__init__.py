"""Physical-machine migration: move a running Linux machine through its kernel's hibernation image.

No hypervisor copies anything: an agent inside the machine (``pmagent``, a static program in the
initramfs, see ``memvirt/image/guest/pmagent.c``) freezes it with ``/dev/snapshot``, has the
kernel build its hibernation image, and streams it, encrypted (the LAN is open to local
processes), over the machines' own network to the same agent on a second machine booted with the
same kernel, which writes it into its own ``/dev/snapshot`` and restores it atomically. memvirt's
guests stand in for the two physical machines; the host only starts the agents (over the trusted
command channel, which also carries a fresh key per migration), reads their events from the
serial consoles, and settles a migration whose outcome the agents cannot tell.

Schemes: ``memory`` streams the image while it is read from ``/dev/snapshot``; ``disk`` writes it
to the LAN's shared disk and the target reads it from there (the SAN model); ``iterative`` first
copies the machine's in-use RAM while it runs, then sends each image page the target already holds
as a reference to it.

Names after a migration: the VM named DST *is* the migrated machine (its QEMU runs the source's
kernel state, so the guest's hostname, processes, address and MAC are the source's); the source's
QEMU exits when the machine powers off and its memvirt state is removed. On any failure before
the source sent the whole image the source thaws and goes on, and DST is left as it was; after
that, only the target's answer or, if it is lost, the host's verdict (:mod:`memvirt.pm.migrate`)
lets the source thaw or power off, so the machine never runs twice.
"""
