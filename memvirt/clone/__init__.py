"""Lazy VM cloning: clones that start in near-constant time and copy memory only when written.

A running VM is frozen into a *template* (:mod:`memvirt.clone.template`); each clone is a new QEMU
that maps the template's RAM file copy-on-write and loads its saved device state
(:mod:`memvirt.clone.start`); a clone's memory is read as the template's file overlaid with the
pages the clone wrote (:mod:`memvirt.memory.clonemem`).
"""

from memvirt.clone.start import Clone, CloneReport, clone, start_clone
from memvirt.clone.template import freeze

__all__ = ["Clone", "CloneReport", "clone", "freeze", "start_clone"]
