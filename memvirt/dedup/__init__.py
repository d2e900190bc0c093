"""De-duplication with introspection: the host acts on what the guest kernel holds free.

A free guest page's contents are immaterial, so the host may take its memory back (``reclaim``:
holes in a shared RAM file, ``MADV_DONTNEED`` inside QEMU for anonymous RAM), and a duplicate
finder or KSM need not spend time on it (``analyze``, ``ksm``). No driver in the guest.

    freepages  which buddy blocks are free, re-verified while the guest is paused
    discard    giving the memory behind guest pages back to the host; what the host holds
    remote     system calls run inside QEMU (ptrace), for MADV_DONTNEED on its anonymous RAM
    reclaim    scan, pause, re-verify, discard, resume, in bounded pauses
    fingerprint, analyze   duplicate and zero pages within and across guests and dumps
    ksm        the host's KSM: settings, counters, ksmd's CPU time
"""
