"""pmagent's stream parser (the target's side) built for the host with ASan and UBSan, fed valid
and mutated streams sealed by :mod:`memvirt.pm.stream`.

The agent's ``PMAGENT_FUZZ`` entry runs the real receiving code over a socketpair per case (the
image goes to /dev/null, where FREEZE fails: a stream accepted whole ends in "freezing the target
failed"). Mutations are mostly made on the plaintext and sealed again, so they get past the tag
and reach the frame decoders; the rest are made on the sealed bytes and must fail the tag or the
framing. Seeded, a few thousand cases, each bounded by the harness (20 s) and the run by a timeout.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
from importlib import resources
from pathlib import Path

import lz4.block
import pytest
import zstandard

from memvirt.pm import stream
from memvirt.pm.stream import Codec, Frame

KEY = bytes(range(32))
TO_TARGET = stream.direction_key(KEY, stream.TO_TARGET)
PAGE = stream.PAGE
SEED = 20261202
CASES = int(os.environ.get("MEMVIRT_FUZZ_CASES", "800"))
"""Seeded mutated streams per run (MEMVIRT_FUZZ_CASES=20000 for a deeper search than the quick default)."""
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pmagent.c with its PMAGENT_FUZZ entry, built with -fsanitize=address,undefined."""
    if not shutil.which("gcc"):
        pytest.skip("no gcc: cannot build pmagent with sanitizers")
    d = tmp_path_factory.mktemp("pmfuzz")
    src = d / "pmagent.c"
    src.write_bytes(resources.files("memvirt.image").joinpath("guest", "pmagent.c").read_bytes())
    out = d / "pmagent-fuzz"
    proc = subprocess.run(
        [
            "gcc",
            "-O1",
            "-g",
            "-DPMAGENT_FUZZ",
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-Wall",
            "-Wextra",
            "-Wno-unused-function",
            "-Werror",
            "-o",
            str(out),
            str(src),
            "-llz4",
            "-lzstd",
            "-lcrypto",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode and ("No such file" in proc.stderr or "cannot find -l" in proc.stderr):
        pytest.skip(f"sanitizer build impossible here (headers or libraries missing): {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr
    return out


# --- valid streams ------------------------------------------------------------------------------


def _host_open(scheme: int, codec: int) -> bytes:
    u = os.uname()
    with open("/proc/meminfo") as f:
        total = int(f.readline().split()[1]) * 1024
    return stream.open_payload(u.release, u.version, total, scheme, codec)


def _compress(codec: int, data: bytes) -> bytes:
    if codec == Codec.LZ4:
        return lz4.block.compress(data, store_size=False)
    if codec == Codec.ZSTD:
        return zstandard.ZstdCompressor(level=1).compress(data)
    return data


def _pages(rng: random.Random, n: int) -> list[bytes]:
    """A mix like an image: zero pages, repetitive pages, random pages."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(bytes(PAGE))
        elif r < 0.7:
            out.append(bytes([rng.randrange(256)]) * 64 * 64)
        else:
            out.append(rng.randbytes(PAGE))
    return out


def _data_frames(
    codec: int, pages: list[bytes], slots: dict[bytes, int], chunk: int = 5
) -> list[tuple[int, int, bytes]]:
    frames = []
    for i in range(0, len(pages), chunk):
        group = pages[i : i + chunk]
        kinds, refs, lit = bytearray(), [], b""
        for p in group:
            if p == bytes(PAGE):
                kinds.append(stream.ZERO)
            elif p in slots:
                kinds.append(stream.REF)
                refs.append(slots[p])
            else:
                kinds.append(stream.LITERAL)
                lit += p
        frames.append(
            (Frame.DATA, codec, stream.data_payload(bytes(kinds), refs, lit, _compress(codec, lit) if lit else b""))
        )
    return frames


def valid_stream(
    rng: random.Random, scheme: str, codec: int
) -> tuple[list[tuple[int, int, bytes]], list[tuple[int, int, bytes]]]:
    """(network frames, shared-disk frames) of a small machine image, as the source sends them."""
    pages = _pages(rng, rng.randrange(1, 14))
    net: list[tuple[int, int, bytes]] = [
        (Frame.OPEN, 0, _host_open(("memory", "disk", "iterative").index(scheme), codec))
    ]
    slots: dict[bytes, int] = {}
    if scheme == "iterative":
        pre = [p for p in dict.fromkeys(pages) if p != bytes(PAGE)][: max(1, len(pages) // 2)]
        for i in range(0, len(pre), 3):
            group = b"".join(pre[i : i + 3])
            net.append(
                (
                    Frame.PAGES,
                    codec,
                    stream.DATA_HEAD.pack(len(group) // PAGE, 0, len(_compress(codec, group)), len(group))
                    + _compress(codec, group),
                )
            )
        slots = {p: i for i, p in enumerate(pre)}
        net.append((Frame.PRECOPY_END, 0, struct.pack("<I", len(pre))))
    image = [
        (Frame.HELLO, 0, stream.HELLO.pack(len(pages) * PAGE)),
        *_data_frames(codec, pages, slots),
        (Frame.END, 0, stream.END.pack(len(pages) * PAGE, stream.image_checksum(pages))),
    ]
    if scheme == "disk":
        return net, image
    return net + image, []


def seal(frames: list[tuple[int, int, bytes]], key: bytes) -> bytes:
    return b"".join(stream.encode(key, kind, payload, seq, flags) for seq, (kind, flags, payload) in enumerate(frames))


def case_bytes(net: list[tuple[int, int, bytes]], disk: list[tuple[int, int, bytes]]) -> tuple[bytes, bytes]:
    """The sealed network bytes and the shared disk's content (DISK frame added for the disk scheme)."""
    if not disk:
        return seal(net, TO_TARGET), b""
    on_disk = seal(disk, stream.disk_key(TO_TARGET))
    on_disk += bytes(-len(on_disk) % 4096)
    return seal(net + [(Frame.DISK, 0, stream.DISK.pack(len(on_disk)))], TO_TARGET), on_disk


# --- mutations ----------------------------------------------------------------------------------

BOUNDARY = [0, 1, 2, 255, 256, 257, 4095, 4096, 4097, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]


def mutate_payload(rng: random.Random, payload: bytes) -> bytes:
    p = bytearray(payload)
    r = rng.random()
    if r < 0.35 and len(p) >= 4:  # a 32-bit field (data_head counts, references) set to a boundary value
        off = rng.randrange(0, min(len(p) - 3, 64)) & ~3
        struct.pack_into("<I", p, off, rng.choice(BOUNDARY))
    elif r < 0.5 and len(p) >= 8:  # a 64-bit field (image sizes) set to a boundary value
        off = rng.randrange(0, min(len(p) - 7, 32)) & ~7
        struct.pack_into("<Q", p, off, rng.choice([0, 1, 1 << 63, (1 << 64) - 1, (1 << 64) - (16 << 20), 4096]))
    elif r < 0.7 and p:
        for _ in range(rng.randrange(1, 8)):
            p[rng.randrange(len(p))] = rng.randrange(256)
    elif r < 0.8:
        p = p[: rng.randrange(len(p) + 1)]
    elif r < 0.9:
        p += rng.randbytes(rng.randrange(1, 300))
    else:
        p = bytearray(rng.randbytes(rng.randrange(0, 200)))
    return bytes(p)


def mutate_frames(rng: random.Random, frames: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
    frames = list(frames)
    i = rng.randrange(len(frames))
    kind, flags, payload = frames[i]
    r = rng.random()
    if r < 0.6:
        frames[i] = (kind, flags, mutate_payload(rng, payload))
    elif r < 0.7:
        frames[i] = (rng.randrange(0, 256) if rng.random() < 0.3 else rng.randrange(1, 11), flags, payload)
    elif r < 0.8:
        frames[i] = (kind, rng.choice([0, 1, 2, 3, 255]), payload)
    elif r < 0.9:
        del frames[i]
    else:
        frames.insert(i, frames[rng.randrange(len(frames))])
    return frames


def mutate_wire(rng: random.Random, data: bytes) -> bytes:
    d = bytearray(data)
    r = rng.random()
    if r < 0.4:
        for _ in range(rng.randrange(1, 4)):
            d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
    elif r < 0.6:  # a header field of the first frame: length, zero, sequence
        field = rng.choice(
            [(4, "<I", [0, 1 << 30, stream.MAX_FRAME + 1, (1 << 32) - 1]), (2, "<H", [1]), (8, "<Q", [1, 1 << 63])]
        )
        struct.pack_into(field[1], d, field[0], rng.choice(field[2]))
    elif r < 0.8:
        d = d[: rng.randrange(len(d))]
    else:
        d += rng.randbytes(rng.randrange(1, 100))
    return bytes(d)


def corpus(rng: random.Random) -> tuple[list[tuple[bytes, bytes]], int]:
    """Cases (network bytes, disk bytes); the first ``n_valid`` are whole, valid streams."""
    cases = []
    shapes = [(s, c) for s in ("memory", "disk", "iterative") for c in (Codec.NONE, Codec.LZ4, Codec.ZSTD)]
    for s, c in shapes:
        cases.append(case_bytes(*valid_stream(rng, s, c)))
    n_valid = len(cases)
    while len(cases) < CASES:
        s, c = rng.choice(shapes)
        net, disk = valid_stream(rng, s, c)
        r = rng.random()
        if r < 0.4 or (r < 0.75 and not disk):
            net = mutate_frames(rng, net)
        elif r < 0.75:
            disk = mutate_frames(rng, disk)
        n, d = case_bytes(net, disk)
        if r >= 0.75:
            if disk and rng.random() < 0.5:
                d = mutate_wire(rng, d)
            else:
                n = mutate_wire(rng, n)
        cases.append((n, d))
    return cases, n_valid


def run_harness(harness: Path, tmp: Path, cases: list[tuple[bytes, bytes]]) -> tuple[list[str], str, int]:
    """(one error per case, stderr, peak RSS of the harness in KiB)."""
    path = tmp / "corpus"
    with path.open("wb") as f:
        for n, d in cases:
            f.write(struct.pack("<II", len(n), len(d)) + n + d)
    env = {
        **os.environ,
        "PMAGENT_KEY": KEY.hex(),
        "ASAN_OPTIONS": "halt_on_error=1:detect_leaks=1:abort_on_error=0:exitcode=99",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=98",
    }
    # The harness's own peak: wait4 in a small Python parent that forks it. Measured from this
    # process, the child's pre-exec moments would count (vfork shares this process's memory:
    # ~1 GB in a full test run), and RUSAGE_CHILDREN holds every earlier child too.
    runner = (
        "import os, sys\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.execv(sys.argv[2], sys.argv[2:])\n"
        "_, status, usage = os.wait4(pid, 0)\n"
        "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    with (tmp / "stdout").open("w") as out, (tmp / "stderr").open("w") as err:
        child = subprocess.run(
            [
                sys.executable,
                "-S",
                "-c",
                runner,
                str(tmp / "maxrss"),
                str(harness),
                str(path),
                str(tmp / "store"),
                str(tmp / "disk"),
            ],
            env=env,
            stdout=out,
            stderr=err,
            timeout=600,
        )
    rss = int((tmp / "maxrss").read_text())
    proc = subprocess.CompletedProcess(
        child.args,
        child.returncode,
        (tmp / "stdout").read_text(errors="replace"),
        (tmp / "stderr").read_text(errors="replace"),
    )
    assert not any(m in proc.stderr for m in SANITIZER_MARKS), proc.stderr[-4000:]
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("case ")]
    assert len(lines) == len(cases), proc.stdout[-2000:]
    return [line.split(": ", 1)[1] if ": " in line else "" for line in lines], proc.stderr, rss


FREEZE = "freezing the target failed"


def test_valid_streams_are_accepted_whole(harness: Path, tmp_path: Path) -> None:
    """Every scheme and codec, sealed by the Python reference, gets through the parser to the
    freeze: the reference and the agent agree on the format."""
    cases, n_valid = corpus(random.Random(SEED))
    errors, _, _ = run_harness(harness, tmp_path, cases[:n_valid])
    assert all(e.startswith(FREEZE) for e in errors), errors


def test_mutated_streams_are_rejected_cleanly_under_sanitizers(harness: Path, tmp_path: Path) -> None:
    cases, n_valid = corpus(random.Random(SEED))
    errors, stderr, rss_kib = run_harness(harness, tmp_path, cases)
    assert all(e.startswith(FREEZE) for e in errors[:n_valid])
    mutated = errors[n_valid:]
    assert all(e and "\n" not in e for e in mutated), "every case ends with a one-line error"
    rejected = [e for e in mutated if not e.startswith(FREEZE)]
    # Some mutations are harmless (a padding byte of OPEN, a frame's flags where no codec is read,
    # bytes after END, the slot count of PRECOPY_END): ~17 % here. The rest must be refused, and the
    # decoders past the tag must have been reached.
    assert len(rejected) > 0.75 * len(mutated), len(rejected)
    kinds = {e.split(":")[0].split(" (")[0] for e in rejected}
    for needle in (
        "bad tag",
        "malformed data frame",
        "image checksum mismatch",
        "unexpected frame type",
        "stream truncated",
        "malformed frame",
    ):
        assert any(k.startswith(needle) for k in kinds), (needle, sorted(kinds))
    assert rss_kib < 512 << 10, f"harness peak RSS {rss_kib} KiB"


def test_verdict_block_is_read_by_the_agent(harness: Path, tmp_path: Path) -> None:
    """The host's verdict, as a waiting source reads it: its own migration's key only."""
    dev = tmp_path / "store"

    def read(block: bytes, key: bytes = KEY) -> str:
        dev.write_bytes(block)
        proc = subprocess.run(
            [str(harness), "verdict", str(dev)],
            env={**os.environ, "PMAGENT_KEY": key.hex()},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0 and not any(m in proc.stderr for m in SANITIZER_MARKS), proc.stderr
        return proc.stdout.strip()

    assert read(stream.verdict_block(KEY, thaw=True)) == "verdict thaw"
    assert read(stream.verdict_block(KEY, thaw=False)) == "verdict off"
    assert read(bytes(4096)) == "verdict none"
    assert read(stream.verdict_block(b"y" * 32, thaw=True)) == "verdict none", "another migration's verdict"
    forged = bytearray(stream.verdict_block(KEY, thaw=True))
    forged[8] = ord("O")
    assert read(bytes(forged)) == "verdict none", "a verdict changed without the key"
