"""What a physical-machine migration did: downtime breakdown, image, wire and page figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from memvirt.pm.zram import ZramStats


@dataclass
class PMReport:
    """Figures of one migration (bytes, seconds).

    ``downtime`` runs from the source's freeze to the restored machine running on the target;
    ``freeze + create + transfer + restore`` make it up (transfer covers sending, the target's
    verification and its freeze, up to the start of the atomic restore). ``precopy_*`` happened
    while the source still ran (iterative scheme) and is not downtime.
    """

    source: str
    target: str
    scheme: str
    compress: str
    shrink: bool
    ram_bytes: int = 0
    used_bytes: int = 0
    image_bytes: int = 0
    wire_bytes: int = 0
    disk_bytes: int = 0
    pages: dict[str, int] = field(default_factory=dict)
    source_stages: dict[str, float] = field(default_factory=dict)
    """Seconds the frozen source spent reading the image, scanning pages (zero, hash, lookup),
    compressing, and sending (MAC and socket or disk writes)."""
    target_stages: dict[str, float] = field(default_factory=dict)
    """Seconds the target spent waiting for and checking frames, decompressing, reading its store
    disk, hashing pages for the checksum, and writing them to /dev/snapshot."""
    precopy_pages: int = 0
    precopy_wire_bytes: int = 0
    precopy_seconds: float = 0.0
    freeze_seconds: float = 0.0
    create_seconds: float = 0.0
    transfer_seconds: float = 0.0
    restore_seconds: float = 0.0
    downtime_seconds: float = 0.0
    total_seconds: float = 0.0
    address: str = ""
    zram: bool = False
    """Compressed swap in the source's RAM was added for the migration (and removed after)."""
    zram_device: str = ""
    preswap_seconds: float = 0.0
    """Swapping into zram while the source still ran (not downtime)."""
    swapped_bytes: int = 0
    """Swapped into zram while the image was made (the source's swap use, frozen)."""
    zram_stats: ZramStats | None = None
    zram_error: str = ""
    verdict: str = ""
    """The host's verdict to the source (``off`` or ``thaw``; empty when the agents settled it)."""
    ack_lost: bool = False
    """The source did not get the target's answer and waited, frozen, for the host's verdict."""
    ignored_events: list[str] = field(default_factory=list)
    """Event lines a console carried for a role its machine does not play (forged), ignored."""

    @property
    def stream_bytes(self) -> int:
        """The image stream as sent: on the network, or on the shared disk (disk scheme)."""
        return self.disk_bytes or self.wire_bytes

    @property
    def compression_ratio(self) -> float:
        """Image bytes per stream byte (zero pages and references included)."""
        return self.image_bytes / self.stream_bytes if self.stream_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["stream_bytes"] = self.stream_bytes
        d["compression_ratio"] = round(self.compression_ratio, 3)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = round(v, 3)
        return d
