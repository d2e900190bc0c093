"""Seeded fuzzing of what a migration receiver reads from the network, without QEMU.

The frame decoders run against a real target RAM file in a temporary folder, in a child process
whose address space is capped (RLIMIT_AS) and whose run time is bounded. An oracle written here
with Python integers (no numpy, so nothing wraps) decides for every case whether each run lies
inside the declared regions; after every case the file must be exactly what the oracle expects:
untouched after a protocol error, and after a success changed only where the runs say, never
grown. Also fuzzed: the handshake (random bytes from an unauthenticated peer), sealed-frame
headers, and SETUP frames through the JSON parser and :func:`check_setup`.
"""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

SEED = 20261202
CASES = 4000
AS_HEADROOM = 512 << 20
"""Address space the fuzzing child may add to what it holds after its imports."""
TIME_LIMIT = 240
PAGE = 4096
U64 = (1 << 64) - 1


def _regions():
    from memvirt.memory.source import Region

    # Two regions with a hole between them, as on a pc machine with over 3.5 GiB.
    return (Region(0, 64 * PAGE, 0), Region(256 * PAGE, 64 * PAGE, 64 * PAGE))


def _inside(regions, start: int, length: int) -> bool:
    """The oracle: run [start, start+length) (pfns, exact integers) lies inside one region."""
    return length >= 1 and any(r.gpa // PAGE <= start and start + length <= r.end // PAGE for r in regions)


def _file_offset(regions, pfn: int) -> int:
    for r in regions:
        if r.gpa // PAGE <= pfn < r.end // PAGE:
            return r.offset + (pfn - r.gpa // PAGE) * PAGE
    raise AssertionError(pfn)


class FrameGen:
    """Frames that are valid, near-valid (runs at and across every boundary, wrap-around values)
    and garbage (mutated valid frames, random bytes)."""

    def __init__(self, rng: random.Random, max_pfn: int, regions):
        self.rng, self.max_pfn, self.regions = rng, max_pfn, regions

    def start(self) -> int:
        r = self.rng
        edges = [
            0,
            1,
            63,
            64,
            65,
            255,
            256,
            319,
            320,
            321,
            self.max_pfn - 1,
            1 << 31,
            1 << 32,
            (1 << 52),
            (1 << 63) - 1,
            1 << 63,
            U64,
            U64 - 1,
            U64 - 63,
            (1 << 64) - self.max_pfn,
        ]
        if r.random() < 0.6:
            reg = r.choice(self.regions)
            return reg.gpa // PAGE + r.randrange(reg.size // PAGE)
        return r.choice(edges)

    def inside(self) -> int:
        reg = self.rng.choice(self.regions)
        return reg.gpa // PAGE + self.rng.randrange(reg.size // PAGE)

    def length(self, start: int, wide: bool) -> int:
        r = self.rng
        top = U64 if wide else 0xFFFFFFFF
        choice = r.random()
        if choice < 0.5:
            return r.randint(1, 8)
        if choice < 0.7:
            return r.choice([0, 64, 65, self.max_pfn, self.max_pfn + 1, 0xFFFFFFFF, top])
        # lengths that make start + length wrap around 2**64 to a small number
        return min(top, max(0, (1 << 64) - start + r.randint(0, 70)))

    def runs(self, wide: bool) -> tuple[list[int], list[int]]:
        r = self.rng
        n = r.choice([0, 1, 1, 2, 3, 5, r.randint(1, 40)])
        if r.random() < 0.5:  # all runs inside the regions, as an honest sender's
            starts, lengths = [], []
            for _ in range(n):
                reg = r.choice(self.regions)
                first, end = reg.gpa // PAGE, reg.end // PAGE
                s = r.randrange(first, end)
                starts.append(s)
                lengths.append(r.randint(1, min(end - s, 16)))
            return starts, lengths
        starts = [self.start() for _ in range(n)]
        return starts, [self.length(s, wide) for s in starts]

    def frame(self) -> tuple[str, bytes, bytes]:
        """(kind name, payload, plain page bytes meant for a DATA frame or b'')."""
        from memvirt.migrate import codec

        r = self.rng
        kind = r.choice(["DATA", "DATA", "ZERO", "DISCARD", "DUP"])
        plain = b""
        if kind == "DATA":
            starts, lengths = self.runs(wide=False)
            total = sum(lengths)
            size = total * PAGE if total * PAGE <= 4 << 20 else r.randint(0, 3) * PAGE
            plain = r.randbytes(size) if r.random() < 0.5 else bytes(size)
            c = r.choice([codec.NONE, codec.LZ4, codec.ZSTD, codec.NONE, r.randint(3, 255)])
            blob = bytes(codec.compress(c, memoryview(plain))) if c in codec.NAMES else plain
            if r.random() < 0.1:
                blob = blob[: r.randint(0, len(blob))]
            payload = (
                struct.pack("!BI", c, len(starts))
                + b"".join(struct.pack("!Q", s) for s in starts)
                + b"".join(struct.pack("!I", n) for n in lengths)
                + blob
            )
        elif kind == "DUP":
            n = r.choice([0, 1, 2, 4, r.randint(1, 64)])
            pick = self.start if r.random() < 0.5 else self.inside
            dst, src = [pick() for _ in range(n)], [pick() for _ in range(n)]
            payload = struct.pack("!I", n) + b"".join(struct.pack("!Q", v) for v in dst + src)
        else:
            starts, lengths = self.runs(wide=True)
            payload = struct.pack("!I", len(starts)) + b"".join(struct.pack("!Q", v) for v in starts + lengths)
        roll = r.random()
        if roll < 0.15:
            payload = self.mutate(payload)
        elif roll < 0.2:
            payload = r.randbytes(r.randint(0, 200))
        return kind, payload, plain

    def mutate(self, payload: bytes) -> bytes:
        r = self.rng
        buf = bytearray(payload)
        for _ in range(r.randint(1, 4)):
            op = r.random()
            if op < 0.4 and buf:
                buf[r.randrange(len(buf))] ^= 1 << r.randrange(8)
            elif op < 0.6:
                del buf[r.randint(0, len(buf)) :]
            elif op < 0.8:
                buf += r.randbytes(r.randint(1, 32))
            elif len(buf) >= 8:
                i = r.randrange(len(buf) - 7)
                buf[i : i + 8] = struct.pack("!Q", r.choice([U64, 1 << 63, (1 << 63) - 1, 0, 1 << 32]))
        return bytes(buf)


def expected(kind: str, payload: bytes, regions, max_pfn: int):
    """The oracle's view of a frame: None if it must be refused, else the list of page writes
    it may make as (kind, runs). Exact integers throughout."""
    if kind == "DATA":
        if len(payload) < 5:
            return None
        c, n = struct.unpack_from("!BI", payload)
        if len(payload) < 5 + 12 * n:
            return None
        starts = [struct.unpack_from("!Q", payload, 5 + 8 * i)[0] for i in range(n)]
        lengths = [struct.unpack_from("!I", payload, 5 + 8 * n + 4 * i)[0] for i in range(n)]
        if not all(_inside(regions, s, ln) for s, ln in zip(starts, lengths, strict=True)):
            return None
        if sum(lengths) > max_pfn or c > 2:
            return None
        return ("DATA", list(zip(starts, lengths, strict=True)), c, payload[5 + 12 * n :])
    if len(payload) < 4:
        return None
    (n,) = struct.unpack_from("!I", payload)
    if len(payload) != 4 + 16 * n:
        return None
    a = [struct.unpack_from("!Q", payload, 4 + 8 * i)[0] for i in range(n)]
    b = [struct.unpack_from("!Q", payload, 4 + 8 * n + 8 * i)[0] for i in range(n)]
    if kind == "DUP":
        if not all(_inside(regions, v, 1) for v in a + b):
            return None
        return ("DUP", list(zip(a, b, strict=True)))
    if not all(_inside(regions, s, ln) for s, ln in zip(a, b, strict=True)) or sum(b) > max_pfn:
        return None
    return (kind, list(zip(a, b, strict=True)))


def _decompress(c: int, blob: bytes, size: int) -> bytes | None:
    import lz4.block
    import zstandard

    try:
        if c == 1:
            out = lz4.block.decompress(blob, uncompressed_size=size)
        elif c == 2:
            out = zstandard.ZstdDecompressor().decompress(blob, max_output_size=size)
        else:
            out = blob
    except Exception:
        return None
    return out if len(out) == size else None


def fuzz_frames(folder: Path, seed: int, cases: int) -> dict[str, int]:
    """Run ``cases`` frames through :meth:`TargetRam.apply` on a real file; returns outcome counts.
    Raises AssertionError at the first case that breaks the contract."""
    import numpy as np

    from memvirt.memory.pagehash import ZERO_HASH, hash_pages
    from memvirt.migrate.protocol import Kind, ProtocolError
    from memvirt.migrate.receiver import TargetRam

    regions = _regions()
    rng = random.Random(seed)
    path = folder / "target.ram"
    size = sum(r.size for r in regions)
    path.write_bytes(bytes(size))  # fresh and zero, as the receiver makes it; DATA frames fill it
    model = bytearray(path.read_bytes())
    ram = TargetRam(path, regions)
    gen = FrameGen(rng, ram.max_pfn, regions)
    in_ram = np.zeros(ram.max_pfn, dtype=bool)
    for r in regions:
        in_ram[r.gpa // PAGE : r.end // PAGE] = True
    counts = {"refused": 0, "applied": 0, "wrote": 0}
    t0 = time.monotonic()
    for case in range(cases):
        kind, payload, _ = gen.frame()
        want = expected(kind, payload, regions, ram.max_pfn)
        try:
            ram.apply(Kind[kind], payload)
            ok = True
        except ProtocolError:
            ok = False
        except BaseException as e:
            raise AssertionError(f"case {case} ({kind}, {payload[:64].hex()}): {e.__class__.__name__}: {e}") from None
        got = os.pread(ram.fd, size + 1, 0)
        assert len(got) == size and os.fstat(ram.fd).st_size == size, f"case {case}: the file grew"
        if not ok:
            assert got == bytes(model), f"case {case}: a refused {kind} frame changed the file"
            counts["refused"] += 1
            continue
        assert want is not None, f"case {case}: a {kind} frame with runs outside the regions was applied"
        new = bytearray(model)
        if want[0] == "DATA":
            _, runs, c, blob = want
            data = _decompress(c, blob, sum(n for _, n in runs) * PAGE)
            assert data is not None, f"case {case}: a DATA frame that does not decompress was applied"
            pos = 0
            for s, n in runs:
                for p in range(s, s + n):
                    off = _file_offset(regions, p)
                    new[off : off + PAGE] = data[pos : pos + PAGE]
                    pos += PAGE
        elif want[0] == "DUP":
            old = bytes(model)
            for d, src in want[1]:
                o, so = _file_offset(regions, d), _file_offset(regions, src)
                new[o : o + PAGE] = old[so : so + PAGE]
            for d, _ in want[1]:  # a destination named twice may hold any of its sources
                o = _file_offset(regions, d)
                options = {
                    old[_file_offset(regions, s) : _file_offset(regions, s) + PAGE] for dd, s in want[1] if dd == d
                }
                assert got[o : o + PAGE] in options, f"case {case}: DUP wrote the wrong page"
                new[o : o + PAGE] = got[o : o + PAGE]
        else:
            for s, n in want[1]:
                for p in range(s, s + n):
                    off = _file_offset(regions, p)
                    new[off : off + PAGE] = bytes(PAGE)
        assert got == bytes(new), f"case {case}: {kind} frame changed the file other than its runs say"
        counts["applied"] += 1
        counts["wrote"] += new != model
        model = new
        # What the receiver believes each page holds matches the file (gaps stay zero).
        pages = np.frombuffer(got, np.uint8)
        held = ram.held
        assert (held[~in_ram] == ZERO_HASH).all(), f"case {case}: fingerprints outside guest RAM"
        want_held = np.concatenate([hash_pages(pages[r.offset : r.offset + r.size]) for r in regions])
        assert (held[in_ram] == want_held).all(), f"case {case}: fingerprints differ from the file"
        assert time.monotonic() - t0 < TIME_LIMIT, "fuzzing took too long"
    ram.close()
    return counts


def fuzz_handshake(seed: int, cases: int) -> dict[str, int]:
    """Random or truncated handshakes from a peer without the secret: each ends in a protocol or
    authentication error, fast, and never yields a session."""
    from memvirt.migrate.protocol import HELLO, MAGIC, VERSION, AuthError, ProtocolError, server_handshake

    rng = random.Random(seed)
    counts = {"refused": 0}
    for case in range(cases):
        a, b = socket.socketpair()
        hello = HELLO.pack(MAGIC, rng.choice([VERSION, VERSION + 1, 0]), rng.choice([0, 1, 255]), rng.randbytes(32))
        msg = rng.choice(
            [
                hello + rng.randbytes(32),
                hello[: rng.randrange(len(hello))],
                rng.randbytes(rng.randint(0, 80)),
                hello + rng.randbytes(rng.randint(0, 31)),
            ]
        )
        a.sendall(msg)
        a.shutdown(socket.SHUT_WR)
        t = time.monotonic()
        try:
            server_handshake(b, b"0" * 64, 5, limit=2.0)
            raise AssertionError(f"case {case}: a peer without the secret got a session")
        except (AuthError, ProtocolError):
            counts["refused"] += 1
        assert time.monotonic() - t < 3.0
        a.close()
        b.close()
    return counts


def fuzz_channel(seed: int, cases: int) -> dict[str, int]:
    """Bytes after a good handshake that are not sealed frames (random headers, lengths up to and
    past the limit, flipped tags): every one a ProtocolError."""
    from memvirt.migrate.protocol import HEADER, TAG, Channel, Kind, ProtocolError

    rng = random.Random(seed)
    counts = {"refused": 0, "intact": 0}
    key = rng.randbytes(32)
    srv = socket.create_server(("127.0.0.1", 0))
    for case in range(cases):
        c, d = _tcp_pair(srv)
        size = Channel(c, key, key, 2).send(Kind.DATA, rng.randbytes(rng.randint(0, 300)))
        good = d.recv(size, socket.MSG_WAITALL)
        assert len(good) == size >= HEADER.size + TAG
        frame = bytearray(good)
        c.close()
        d.close()
        a, b = _tcp_pair(srv)
        rx = Channel(b, key, key, 2)
        op = rng.random()
        if op < 0.3:
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        elif op < 0.5:
            frame[1:5] = struct.pack("!I", rng.choice([0, 1, (128 << 20), (128 << 20) + 1, 0xFFFFFFFF]))
        elif op < 0.7:
            frame = frame[: rng.randrange(len(frame))]
        else:
            frame = bytearray(rng.randbytes(rng.randint(0, 64)))
        a.sendall(frame)  # at most a few hundred bytes: the socket buffer takes them
        a.shutdown(socket.SHUT_WR)
        damaged = frame != good
        try:
            rx.recv()
            assert not damaged, f"case {case}: a damaged frame opened"
            counts["intact"] += 1
        except ProtocolError:
            assert damaged, f"case {case}: an intact frame failed to open"
            counts["refused"] += 1
        a.close()
        b.close()
    srv.close()
    return counts


def _tcp_pair(srv: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (a Channel sets TCP options)."""
    a = socket.create_connection(srv.getsockname())
    b, _ = srv.accept()
    return a, b


def fuzz_setup(seed: int, cases: int) -> dict[str, int]:
    """SETUP objects mutated field by field (types, huge and negative numbers, commas and control
    characters, region lists shifted, overlapping, unaligned, reordered): each is refused with a
    ProtocolError or is sane in every field."""
    from memvirt.arch import ARCHES
    from memvirt.memory import rammap
    from memvirt.migrate.protocol import Kind, ProtocolError, parse_json
    from memvirt.migrate.receiver import ACCELS, check_setup, max_memory

    rng = random.Random(seed)
    counts = {"refused": 0, "accepted": 0}
    weird = [
        None,
        True,
        False,
        -1,
        0,
        1,
        2**63,
        2**64 + 5,
        1.5,
        1e308,
        "",
        ",",
        "tcg,accel=kvm",
        "a\nb",
        "\x00",
        "é",
        [],
        {},
        [[[]]],
        "x" * 5000,
        "../../etc",
        "tcg",
        "kvm",
        512 << 20,
        4096,
        1 << 52,
    ]
    for _ in range(cases):
        mem = rng.choice([64 << 20, 512 << 20, 4 << 30, 3584 << 20])
        setup: dict = {
            "name": "vm1",
            "source": "src",
            "memory": mem,
            "cpus": 1,
            "image": "/x/images/6.1-abc",
            "accel": "tcg",
            "append": "",
            "regions": rammap.to_dict(rammap.pc_ram_map(mem)),
        }
        for _ in range(rng.randint(1, 3)):
            op = rng.random()
            key = rng.choice(list(setup) + ["extra"])
            if op < 0.35:
                setup[key] = rng.choice(weird)
            elif op < 0.45:
                setup.pop(key, None)
            elif op < 0.9 and isinstance(setup.get("regions"), list) and setup["regions"]:
                reg = rng.choice(setup["regions"])
                if isinstance(reg, dict) and reg:
                    f = rng.choice(list(reg))
                    v = reg[f] if type(reg[f]) is int else 0
                    reg[f] = rng.choice([v + rng.choice([-PAGE, PAGE, 1, -1, 1 << 30]), rng.choice(weird)])
                if rng.random() < 0.3:
                    other = rng.choice(setup["regions"])
                    setup["regions"].append(dict(other) if isinstance(other, dict) and rng.random() < 0.5 else {})
                if rng.random() < 0.2:
                    setup["regions"].reverse()
            else:
                setup[key] = rng.choice(weird)
        raw = json.dumps(setup).encode()
        if rng.random() < 0.1:
            raw = raw[: rng.randrange(len(raw) + 1)]
        try:
            st = check_setup(parse_json(Kind.SETUP, raw))
        except ProtocolError:
            counts["refused"] += 1
            continue
        assert st.accel in ACCELS
        for text in (st.name, st.source, st.append, st.image.name):
            assert all(0x20 <= ord(ch) < 0x7F for ch in text), text
        assert "," not in st.name + st.image.name and "/" not in st.name
        assert 64 << 20 <= st.memory <= max_memory() and 1 <= st.cpus <= 64
        assert st.regions in {rammap.machine_ram_map(a, st.memory) for a in ARCHES}
        counts["accepted"] += 1
    deep = b"[" * 200000 + b"]" * 200000
    for raw in (deep, b'{"a": ' * 100000, b"\xff\xfe", b"[]", b"1e999999"):
        with pytest.raises(ProtocolError):
            check_setup(parse_json(Kind.SETUP, raw))
    return counts


@pytest.mark.parametrize(
    ("kind", "a", "b"),
    [
        ("ZERO", (1 << 63) - 1, 2),
        ("ZERO", 5, (1 << 64) - 3),
        ("DISCARD", U64, 1),
        ("ZERO", 63, 2),
        ("ZERO", 64, 1),
        ("ZERO", 0, 0),
        ("DUP", (1 << 63) + 3, 0),
        ("DUP", 0, (1 << 64) - 256),
        ("DATA", (1 << 64) - 1, 2),
    ],
)
def test_runs_that_wrap_or_leave_ram_are_refused(tmp_path: Path, kind: str, a: int, b: int) -> None:
    """The int64 wrap-around of the old bounds check, and runs across a region's end or into the
    hole: a protocol error, and the file is untouched."""
    from memvirt.migrate.protocol import Kind, ProtocolError
    from memvirt.migrate.receiver import TargetRam

    path = tmp_path / "ram"
    path.write_bytes(b"\x5a" * (128 * PAGE))
    if kind == "DATA":
        payload = struct.pack("!BIQI", 0, 1, a, b) + bytes(b * PAGE)
    else:
        payload = struct.pack("!IQQ", 1, a, b)
    ram = TargetRam(path, _regions())
    try:
        with pytest.raises(ProtocolError, match=f"malformed {kind} frame"):
            ram.apply(Kind[kind], payload)
    finally:
        ram.close()
    assert path.read_bytes() == b"\x5a" * (128 * PAGE)


def _child(folder: str) -> None:
    """The fuzzing child: cap the address space, then run every fuzzer; prints the counts."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + AS_HEADROOM, vm + AS_HEADROOM))
    resource.setrlimit(resource.RLIMIT_CPU, (TIME_LIMIT, TIME_LIMIT))
    out = {
        "frames": fuzz_frames(Path(folder), SEED, CASES),
        "handshake": fuzz_handshake(SEED + 1, 300),
        "channel": fuzz_channel(SEED + 2, 500),
        "setup": fuzz_setup(SEED + 3, 3000),
    }
    print(json.dumps(out))


def test_fuzz_receiver_decoders_bounded(tmp_path: Path) -> None:
    """A few thousand seeded frames against a real RAM file, in a child with capped memory and
    time: every case is a clean protocol error or a correct write within the regions."""
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MALLOC_ARENA_MAX": "2",
    }
    proc = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, env=env, timeout=TIME_LIMIT + 30
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    frames = counts["frames"]
    # The generator must exercise both outcomes in earnest, or the fuzz proves nothing.
    assert frames["refused"] > CASES // 5 and frames["applied"] > CASES // 5 and frames["wrote"] > CASES // 10, counts
    assert counts["setup"]["accepted"] > 50 and counts["setup"]["refused"] > 1000, counts
    assert counts["handshake"]["refused"] == 300 and counts["channel"]["refused"] > 400


if __name__ == "__main__":
    _child(sys.argv[1])
