"""Host-side sanity checks for the C programs shipped for test guests.

Each program listed in memvirt/image/guest/programs.txt is compiled with the
same flags the image builder uses and run natively on the host.
"""

from __future__ import annotations

import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest

GUEST_DIR = Path(__file__).resolve().parents[1] / "memvirt" / "image" / "guest"
CFLAGS = ["-O2", "-static", "-s", "-Wall", "-Wextra"]
PAGE = 4096
M64 = (1 << 64) - 1

REPORT_RE = re.compile(r"^memtouch t=(\d+\.\d) loops=(\d+) rate=(\d+\.\d\d) dirtied=(\d+)$")
READY_RE = re.compile(
    r"^memtouch ready hot=(\d+) cold=(\d+) content=(\w+) seed=(\d+) pid=(\d+)"
    r" hot_addr=0x([0-9a-f]+) cold_addr=0x([0-9a-f]+)$"
)


# --------------------------------------------------------------------------
# reference implementations of the documented algorithms


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def physaddr_page(seed: int, index: int) -> bytes:
    """Page content written by `physaddr mark` (see physaddr.c)."""
    head = b"MEMVIRT_%08x%08x" % (seed & 0xFFFFFFFF, index & 0xFFFFFFFF)
    st = (seed ^ (0xD1B54A32D192ED03 * (index + 1))) & M64
    words = []
    for _ in range((PAGE - 24) // 8):
        st = (st + 0x9E3779B97F4A7C15) & M64
        z = st
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        words.append(z ^ (z >> 31))
    return head + struct.pack("<509Q", *words)


def datacheck_page(seed: int, index: int) -> bytes:
    """Page content written by `datacheck write` (see datacheck.c)."""
    s = splitmix64(splitmix64(seed) ^ index) | 1
    words = []
    for _ in range(PAGE // 8):
        s ^= (s << 13) & M64
        s ^= s >> 7
        s ^= (s << 17) & M64
        words.append(s)
    return struct.pack("<512Q", *words)


# --------------------------------------------------------------------------
# build


def _programs() -> list[tuple[str, str, list[str]]]:
    """(name, source, link flags) per line of programs.txt, as the image builder reads it."""
    out = []
    for line in (GUEST_DIR / "programs.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, src, *flags = line.split()
            out.append((name, src, flags))
    return out


def _compiler_warnings(stderr: str) -> str:
    """Warnings about the program itself: glibc's notes that a static libcrypto may call dlopen or
    the resolver (code paths pmagent never takes) are the linker's, not the program's."""
    lines = stderr.strip().splitlines()
    noise = [i for i, line in enumerate(lines) if "statically linked applications requires at runtime" in line]
    drop = set(noise) | {i - 1 for i in noise if i and "in function" in lines[i - 1]}
    return "\n".join(line for i, line in enumerate(lines) if i not in drop)


@pytest.fixture(scope="session")
def bins(tmp_path_factory) -> dict[str, Path]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not installed")
    d = tmp_path_factory.mktemp("guestbin")
    probe = d / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    r = subprocess.run([gcc, *CFLAGS, "-o", str(d / "probe"), str(probe)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"static glibc not available: {r.stderr.strip()}")
    result = {}
    for name, src, flags in _programs():
        out = d / name
        r = subprocess.run(
            [gcc, *CFLAGS, "-o", str(out), str(GUEST_DIR / src), *flags],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, f"{src} failed to compile:\n{r.stderr}"
        assert _compiler_warnings(r.stderr) == "", f"{src} compiled with warnings:\n{r.stderr}"
        result[name] = out
    return result


def test_programs_txt():
    progs = _programs()
    names = [n for n, _, _ in progs]
    assert {"datacheck", "memtouch", "physaddr", "pmagent"} <= set(names)
    assert len(names) == len(set(names))
    for _, src, _ in progs:
        assert (GUEST_DIR / src).is_file()


def test_all_compile_warning_free(bins):
    for name, path in bins.items():
        assert path.stat().st_size > 0, name


# --------------------------------------------------------------------------
# helpers


def _has_cap_sys_admin() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 21))
    return False


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(size)
    except OSError as e:
        pytest.skip(f"cannot read /proc/{pid}/mem: {e}")


@contextmanager
def _reaped(p: subprocess.Popen):
    """Kill ``p`` if the block fails, so the block's own failure is the one reported (an assert
    in ``finally`` would replace it)."""
    try:
        yield p
    except BaseException:
        if p.poll() is None:
            p.kill()
        p.wait()
        raise


def _stop(p: subprocess.Popen, timeout: float = 5) -> int:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    return p.wait(timeout=timeout)


def _wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------
# memtouch


def test_memtouch_reports_and_dirty_rate(bins, tmp_path):
    counter = tmp_path / "counter"
    rate = 8 << 20
    r = subprocess.run(
        [
            bins["memtouch"],
            "--hot",
            "4M",
            "--cold",
            "2M",
            "--dirty-rate",
            "8M/s",
            "--report",
            "0.2",
            "--duration",
            "2",
            "--counter-file",
            str(counter),
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    m = READY_RE.match(lines[0])
    assert m, lines[0]
    assert int(m[1]) == 4 << 20 and int(m[2]) == 2 << 20 and m[3] == "mix"
    reports = [REPORT_RE.match(x) for x in lines[1:]]
    assert all(reports), lines
    assert len(reports) >= 7
    ts = [float(x[1]) for x in reports]
    loops = [int(x[2]) for x in reports]
    dirtied = [int(x[4]) for x in reports]
    assert ts == sorted(ts)
    assert loops == sorted(loops) and loops[-1] > loops[0] > 0
    assert dirtied == sorted(dirtied)
    assert all(d % PAGE == 0 for d in dirtied)
    # roughly rate * elapsed (the debt is paid at least every 64 pages read)
    expect = rate * ts[-1]
    assert 0.75 * expect <= dirtied[-1] <= 1.25 * expect + PAGE, (dirtied[-1], expect)
    assert int(counter.read_text()) >= loops[-1]


def test_memtouch_readonly_counter_and_sigterm(bins, tmp_path):
    counter = tmp_path / "counter"
    p = subprocess.Popen(
        [bins["memtouch"], "--hot", "2M", "--report", "0.1", "--counter-file", str(counter)],
        stdout=subprocess.PIPE,
        text=True,
    )
    with _reaped(p):
        assert READY_RE.match(p.stdout.readline())
        line = p.stdout.readline()
        m = REPORT_RE.match(line.strip())
        assert m and int(m[4]) == 0, line
        first = _wait_for(lambda: int(counter.read_text() or 0), 3, "counter > 0")
        _wait_for(lambda: int(counter.read_text() or 0) > first, 3, "counter to grow")
    t = time.monotonic()
    assert _stop(p) == 0
    assert time.monotonic() - t < 2
    rest = p.stdout.read().splitlines()
    assert all(REPORT_RE.match(x) and x.endswith("dirtied=0") for x in rest), rest


def _pages(mem: bytes) -> list[bytes]:
    return [mem[i : i + PAGE] for i in range(0, len(mem), PAGE)]


def _classify(pages: list[bytes]) -> Counter:
    counts = Counter(pages)
    kinds = Counter()
    for pg in pages:
        if pg == bytes(PAGE):
            kinds["zero"] += 1
        elif counts[pg] > 1:
            kinds["dup"] += 1
        elif all(32 <= b < 127 or b == 10 for b in pg[:256]):
            kinds["text"] += 1
        else:
            kinds["random"] += 1
    return kinds


def test_memtouch_content_mix(bins):
    # 400 pages = 4 blocks of 100, so the mix is exact: 160/120/60/60
    n = 400
    want = {"random": 160, "text": 120, "zero": 60, "dup": 60}
    p = subprocess.Popen(
        [
            bins["memtouch"],
            "--hot",
            str(n * PAGE),
            "--cold",
            str(n * PAGE),
            "--dirty-rate",
            "64M",
            "--dup-groups",
            "4",
            "--report",
            "0.3",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    with _reaped(p):
        m = READY_RE.match(p.stdout.readline())
        assert m
        pid, hot, cold = int(m[5]), int(m[6], 16), int(m[7], 16)
        cold_before = _read_mem(pid, cold, n * PAGE)
        m = REPORT_RE.match(p.stdout.readline().strip())
        assert m and int(m[4]) > 4 * n * PAGE  # hot set rewritten several times over
        # The hot set is being rewritten; a SIGSTOP can land in the middle of a
        # page copy, so retry a few times until we get a consistent snapshot.
        for _ in range(10):
            p.send_signal(signal.SIGSTOP)
            try:
                hot_mem = _read_mem(pid, hot, n * PAGE)
            finally:
                p.send_signal(signal.SIGCONT)
            if _classify(_pages(hot_mem)) == want:
                break
            time.sleep(0.05)
        cold_after = _read_mem(pid, cold, n * PAGE)
    assert _stop(p) == 0
    assert cold_before == cold_after  # cold set is never rewritten
    for mem in (cold_before, hot_mem):
        pages = _pages(mem)
        assert _classify(pages) == want
        counts = Counter(pages)
        dup_pages = {pg for pg in pages if counts[pg] > 1 and any(pg)}
        assert 1 < len(dup_pages) <= 4
        text = b"".join(pg for pg in pages if all(32 <= b < 127 or b == 10 for b in pg))
        ratio = len(text) / sum(len(zlib.compress(text[i : i + PAGE], 6)) for i in range(0, len(text), PAGE))
        assert 2.3 < ratio < 4.0, ratio


def test_memtouch_single_class_and_mix_option(bins):
    for args, want in (
        (["--content", "zero"], {"zero": 100}),
        (["--content", "random"], {"random": 100}),
        (["--mix", "0,50,0,50"], {"text": 50, "dup": 50}),
    ):
        p = subprocess.Popen(
            [bins["memtouch"], "--hot", "0", "--cold", str(100 * PAGE), "--dup-groups", "4", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        with _reaped(p):
            m = READY_RE.match(p.stdout.readline())
            assert m
            mem = _read_mem(int(m[5]), int(m[7], 16), 100 * PAGE)
        assert _stop(p) == 0
        assert _classify(_pages(mem)) == want, args


def test_memtouch_phase_file(bins, tmp_path):
    phase = tmp_path / "phase"
    p = subprocess.Popen(
        [bins["memtouch"], "--hot", "2M", "--report", "0.1", "--phase-file", str(phase)],
        stdout=subprocess.PIPE,
        text=True,
    )
    with _reaped(p):
        m = READY_RE.match(p.stdout.readline())
        assert m and int(m[1]) == 2 << 20

        def wait_phase(size: int) -> None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                line = p.stdout.readline().strip()
                if line.startswith("memtouch phase "):
                    assert re.fullmatch(r"memtouch phase hot=(\d+) hot_addr=0x[0-9a-f]+", line)
                    assert int(line.split()[2].split("=")[1]) == size
                    return
                assert REPORT_RE.match(line), line
            raise AssertionError("no phase line")

        phase.write_text("6M\n")
        wait_phase(6 << 20)
        phase.write_text("1M")
        wait_phase(1 << 20)
        phase.write_text("garbage")  # ignored
        phase.write_text("3M")  # shrink-then-grow within the allocation
        wait_phase(3 << 20)
    assert _stop(p) == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--hot", "12Q"],
        ["--content", "foo"],
        ["--bogus", "1"],
        ["--mix", "1,2,3"],
        ["--mix", "50,50,10,0"],
        ["--report", "0"],
        ["--hot"],
        ["--dup-groups", "0"],
    ],
)
def test_memtouch_bad_args(bins, args):
    r = subprocess.run([bins["memtouch"], *args], capture_output=True, text=True, timeout=5)
    assert r.returncode == 2
    assert "usage: memtouch" in r.stderr


# --------------------------------------------------------------------------
# datacheck


def _start_datacheck(bins, state: Path, size: str, seed: int):
    p = subprocess.Popen(
        [bins["datacheck"], "write", "--size", size, "--seed", str(seed), "--state", str(state)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = p.stdout.readline().strip()
    m = re.fullmatch(r"datacheck ready pages=(\d+) pid=(\d+) addr=0x([0-9a-f]+)", line)
    assert m, line
    assert int(state.read_text()) == p.pid == int(m[2])
    return p, int(m[1]), int(m[3], 16)


def _verify(bins, state: Path, *extra: str):
    return subprocess.run(
        [bins["datacheck"], "verify", "--state", str(state), *extra],
        capture_output=True,
        text=True,
        timeout=15,
    )


def test_datacheck_ok_bad_and_pattern(bins, tmp_path):
    state = tmp_path / "dc.state"
    p, pages, addr = _start_datacheck(bins, state, "8M", 42)
    with _reaped(p):
        assert pages == 2048
        # the documented pattern
        for idx in (0, 1, 2047):
            assert _read_mem(p.pid, addr + idx * PAGE, PAGE) == datacheck_page(42, idx)
        for seq in (1, 2):
            r = _verify(bins, state)
            assert r.returncode == 0, r.stderr
            assert re.fullmatch(rf"OK seq={seq} pages=2048 start_ns=\d+\n", r.stdout), r.stdout
        # corrupt two pages through /proc/PID/mem (we are root / the parent)
        try:
            with open(f"/proc/{p.pid}/mem", "r+b", buffering=0) as f:
                for idx in (700, 5):
                    f.seek(addr + idx * PAGE + 123)
                    f.write(b"\xff")
        except OSError as e:
            pytest.skip(f"cannot write /proc/PID/mem: {e}")
        r = _verify(bins, state)
        assert r.returncode == 1
        assert re.fullmatch(r"BAD seq=3 pages=2048 first_bad_page=5 bad_pages=2 start_ns=\d+\n", r.stdout), r.stdout
        assert (tmp_path / "dc.state.result").read_text() == r.stdout
    assert _stop(p) == 0
    assert not state.exists()
    assert _verify(bins, state).returncode == 2


def test_datacheck_verify_errors(bins, tmp_path):
    state = tmp_path / "st"
    r = _verify(bins, state)
    assert r.returncode == 2 and "cannot read state file" in r.stderr
    state.write_text("not-a-pid\n")
    assert _verify(bins, state).returncode == 2
    # a live process that never answers -> timeout
    ign = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal,time; signal.signal(signal.SIGUSR1, signal.SIG_IGN); print(flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        ign.stdout.readline()
        state.write_text(f"{ign.pid}\n")
        t = time.monotonic()
        r = _verify(bins, state, "--timeout", "0.5")
        assert r.returncode == 2 and "timeout" in r.stderr
        assert time.monotonic() - t < 3
    finally:
        ign.kill()
        ign.wait()
    for args in (
        ["bogus"],
        ["write", "--size", "1M", "--state", "x"],
        ["verify"],
        ["write", "--size", "1X", "--seed", "1", "--state", "x"],
    ):
        r = subprocess.run([bins["datacheck"], *args], capture_output=True, text=True)
        assert r.returncode == 2 and "usage:" in r.stderr, args


def test_datacheck_concurrent_verifiers(bins, tmp_path):
    state = tmp_path / "dc.state"
    p, _, _ = _start_datacheck(bins, state, "32M", 7)
    with _reaped(p):
        vs = [
            subprocess.Popen([bins["datacheck"], "verify", "--state", str(state)], stdout=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        for v in vs:
            out, _ = v.communicate(timeout=15)
            assert v.returncode == 0 and out.startswith("OK seq="), out
    assert _stop(p) == 0


# --------------------------------------------------------------------------
# physaddr


def test_physaddr_mark(bins, tmp_path):
    dump = tmp_path / "pages.bin"
    seed, n = 0x1234ABCD, 16
    r = subprocess.run(
        [bins["physaddr"], "mark", "--pages", str(n), "--seed", hex(seed), "--dump-file", str(dump)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == n + 1 and lines[-1] == "READY"
    data = dump.read_bytes()
    assert len(data) == n * PAGE
    pfns = []
    for i, line in enumerate(lines[:-1]):
        m = re.fullmatch(r"(\d+) 0x([0-9a-f]+) ([0-9a-f]{16})", line)
        assert m, line
        assert int(m[1]) == i
        page = data[i * PAGE : (i + 1) * PAGE]
        assert page == physaddr_page(seed, i)
        assert page[:24] == b"MEMVIRT_1234abcd%08x" % i
        assert int(m[3], 16) == fnv1a64(page)
        pfns.append(int(m[2], 16))
    if _has_cap_sys_admin():
        assert all(pfns), pfns
        assert len(set(pfns)) == n
    else:
        assert "unknown PFN" in r.stderr


def test_physaddr_hold(bins):
    p = subprocess.Popen(
        [bins["physaddr"], "mark", "--pages", "3", "--seed", "9", "--hold"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with _reaped(p):
        first = [p.stdout.readline() for _ in range(4)]
        assert first[-1] == "READY\n"
        p.send_signal(signal.SIGUSR1)
        again = [p.stdout.readline() for _ in range(4)]
        assert again == first
        assert p.poll() is None
    assert _stop(p) == 0
    r = subprocess.run([bins["physaddr"], "mark", "--pages", "0", "--seed", "1"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_fnv1a64_reference():
    # published FNV-1a 64 test vectors
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8
