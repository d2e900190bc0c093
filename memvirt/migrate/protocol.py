"""The migration wire protocol: versioned, framed, every frame encrypted and authenticated.

Handshake (HMAC-SHA256 challenge-response over a shared secret; no secret ever crosses the wire)::

    client -> HELLO      "MVMG" version:u16 flags:u8 client_nonce[32]
    server -> CHALLENGE  "MVMG" version:u16 flags:u8 server_nonce[32] HMAC(secret, "server"|cn|sn)
    client -> AUTH       HMAC(secret, "client"|cn|sn)
    server -> OK frame   (the first sealed frame: the client knows it was accepted)

Each side proves it knows the secret and checks the other's proof with ``hmac.compare_digest``;
a peer that fails is disconnected before it can send a frame. Then every frame is
``kind:u8 length:u32 ciphertext[length] tag[16]``: the payload sealed with AES-256-GCM under a
per-direction session key (derived from the secret and both nonces, so fresh for every session),
the nonce being the frame's sequence number and the header the associated data. A forged,
replayed, reordered, truncated or reflected frame fails to open and ends the session, and guest
memory never crosses the wire in the clear. (AES-GCM runs at several GB/s with AES-NI, six
times HMAC-SHA256's pace here.) ``--insecure`` uses a well-known secret, so peers still frame
and version-check but prove and hide nothing; both sides must choose it, a secure peer refuses
an insecure one, and it is refused on any address but loopback.

The server's first proof lets anyone who connects test guesses of the secret offline, so the
secret must be 32 random bytes (:func:`check_secret`): guessing that is out of reach, no key
stretching needed. The whole handshake must be over within :data:`HANDSHAKE_TIMEOUT`, however
slowly the peer trickles its bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import queue
import re
import secrets
import socket
import stat
import struct
import threading
import time
from enum import IntEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from memvirt.errors import AuthError, PeerError, ProtocolError, UsageError

Buffer = bytes | bytearray | memoryview

MAGIC = b"MVMG"
VERSION = 3
FLAG_INSECURE = 1
INSECURE_SECRET = b"memvirt-migrate-insecure"
NONCE = 32
PROOF = 32
TAG = 16
MAX_FRAME = 128 << 20
SMALL_FRAME = 64 << 10
QUEUE_DEPTH = 4
"""Frames a :class:`SendQueue` holds before its caller waits."""
HEADER = struct.Struct("!BI")
HELLO = struct.Struct(f"!4sHB{NONCE}s")
CHALLENGE = struct.Struct(f"!4sHB{NONCE}s{PROOF}s")
DEFAULT_PORT = 4444
SECRET_ENV = "MEMVIRT_SECRET"
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a peer has for the whole handshake: one byte a minute must not hold a receiver."""
MAX_JSON = 1 << 20
"""Largest JSON control frame (SETUP, COMMIT, ...) accepted."""
SECRET_BYTES = 32
SECRET_FORMS = (
    "64 or more hex digits ('openssl rand -hex 32') or base64 of 32 or more bytes ('head -c 32 /dev/urandom | base64')"
)
"""How a shared secret is written; the same text on both ends."""
MAX_SECRET_FILE = 4096


class Kind(IntEnum):
    """Frame kinds, in the order a migration uses them."""

    OK = 1
    SETUP = 2
    READY = 3
    DATA = 4
    ZERO = 5
    DISCARD = 6
    DUP = 7
    ROUND_END = 8
    DEVSTATE = 9
    COMMIT = 10
    VERIFIED = 11
    GO = 12
    RUNNING = 13
    ERROR = 14
    ROUND_ACK = 15
    """Receiver to sender: every frame of a live round is written (v3: the sender pauses only
    once the receiver has caught up, or its backlog would be downtime)."""


def load_secret(secret_file: Path | None, insecure: bool) -> bytes | None:
    """The shared secret from ``--secret-file`` or ``$MEMVIRT_SECRET``; None only with ``--insecure``.

    Secure by default: without a secret memvirt refuses to migrate rather than run unauthenticated.
    ``$MEMVIRT_SECRET`` is removed from the environment here, whichever source is used, so no QEMU
    or watchdog this process starts inherits it. A secret file others may read is refused (as ssh
    refuses such a key), and so is a secret that is not 32 random bytes (:func:`check_secret`).
    """
    env = os.environ.pop(SECRET_ENV, "")
    if insecure:
        if secret_file is not None:
            raise UsageError("--insecure and --secret-file exclude each other")
        return None
    if secret_file is not None:
        secret = _read_secret_file(secret_file)
    else:
        secret = env.encode(errors="replace").strip()
    if not secret:
        raise UsageError(
            f"no shared secret: give --secret-file FILE or set ${SECRET_ENV} to {SECRET_FORMS} "
            f"(or --insecure on loopback)"
        )
    return check_secret(secret)


def _read_secret_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot read secret file {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"secret file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise UsageError(
                f"secret file {path} is open to group or others (mode {st.st_mode & 0o777:04o}): 'chmod 600 {path}'"
            )
        if st.st_uid not in (os.getuid(), 0):
            raise UsageError(f"secret file {path} belongs to another user (uid {st.st_uid})")
        data = os.read(fd, MAX_SECRET_FILE + 1)
    except OSError as e:
        raise UsageError(f"cannot read secret file {path}: {e.strerror}") from e
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise UsageError(f"secret file {path} is over {MAX_SECRET_FILE} bytes: not a secret")
    return data.strip()


def check_secret(secret: bytes) -> bytes:
    """``secret`` if it carries 32 random bytes, written as :data:`SECRET_FORMS`; else UsageError.

    The server's first proof is an HMAC over public nonces, so a recorded handshake lets a
    secret be guessed offline at GPU speed: only a secret nobody can enumerate is safe. The text
    itself is the key (both ends use the same text); the check only looks at what it encodes,
    and refuses one whose bytes repeat (``0000...``, a pattern) as not random."""
    weak = f"the shared secret is too weak: use 32 random bytes written as {SECRET_FORMS}"
    try:
        text = secret.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(weak) from None
    raw: bytes | None = None
    if re.fullmatch(r"[0-9a-fA-F]+", text):
        raw = bytes.fromhex(text[: len(text) // 2 * 2])
    elif re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", text):
        b64 = text.rstrip("=").replace("-", "+").replace("_", "/")
        try:
            raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) < SECRET_BYTES:
        raise UsageError(weak)
    if len(set(raw)) < SECRET_BYTES // 2:
        raise UsageError(f"the shared secret does not look random (its bytes repeat): use {SECRET_FORMS}")
    return secret


def check_insecure(host: str) -> None:
    """``--insecure`` only where nobody else can connect: a loopback address."""
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UsageError(
            f"--insecure is only allowed on loopback (127.0.0.1, ::1), not on {host!r}: give a shared secret"
        )


def parse_endpoint(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` -> (host, port)."""
    host, _, port = text.rpartition(":")
    try:
        p = int(port)
    except ValueError:
        raise UsageError(f"not an endpoint: {text!r} (use HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT})") from None
    if not 0 <= p <= 65535:
        raise UsageError(f"port out of range in {text!r}")
    return (host.strip("[]") or default_host), p


def _mac(key: bytes, label: bytes, cn: bytes, sn: bytes) -> bytes:
    return hmac.new(key, label + cn + sn, hashlib.sha256).digest()


class Channel:
    """One authenticated session: framed, sealed (AES-256-GCM), sequence-numbered messages over a socket."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes, timeout: float):
        self.sock = sock
        self._seal, self._open = AESGCM(send_key), AESGCM(recv_key)
        self._send_seq = self._recv_seq = 0
        self._send_lock = threading.Lock()
        """Held from taking a sequence number until the frame is on the socket (with the send
        buffers): frames from two threads then never share a nonce nor reach the wire out of order.
        Receiving has one reader by construction (borrowed payloads live until the next recv)."""
        self.max_rate = 0.0
        """Bytes per second this side may send (0: as fast as the link goes), like QEMU's
        ``max-bandwidth``: a migration must not starve the network it shares."""
        self._due = 0.0
        self._bufs: dict[str, bytearray] = {}
        """Buffers large frames are built and opened in, reused: a fresh megabyte per frame costs
        page faults and zeroing at both ends."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bytes_sent = self.bytes_received = 0
        sock.settimeout(timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def send(self, kind: Kind, payload: Buffer | list[Buffer] = b"") -> int:
        """Seal and send one frame made of ``payload`` (a buffer or a list of pieces); returns its
        size on the wire. Safe to call from several threads (one frame at a time)."""
        pieces = _pieces(payload)
        n = _payload_size(pieces)
        header = HEADER.pack(kind, n)
        with self._send_lock:
            nonce = _nonce(self._send_seq)
            self._send_seq += 1
            try:
                if n < SMALL_FRAME:
                    plain = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    self.sock.sendall(header + self._seal.encrypt(nonce, plain, header))
                else:
                    plain = _gather(pieces, self._buf("out_plain", n), n)
                    sealed = memoryview(self._buf("out_sealed", n + TAG))[: n + TAG]
                    self._seal.encrypt_into(nonce, plain, header, sealed)
                    self.sock.sendall(header)
                    self.sock.sendall(sealed)
            except TimeoutError:
                raise ProtocolError("the peer stopped reading (send timed out)") from None
            except OSError as e:
                raise ProtocolError(f"connection lost while sending: {e.strerror or e}") from e
            self.bytes_sent += HEADER.size + n + TAG
            self._pace(HEADER.size + n + TAG)
        return HEADER.size + n + TAG

    def _buf(self, name: str, n: int) -> bytearray:
        """Reused buffer ``name`` of at least ``n`` bytes; a larger one replaces it (never resized in
        place: a view of the old one, a borrowed payload, may still be held)."""
        buf = self._bufs.get(name)
        if buf is None or len(buf) < n:
            buf = self._bufs[name] = bytearray(max(n, 2 * len(buf) if buf else n))
        return buf

    def _pace(self, size: int) -> None:
        """Wait until ``size`` bytes would have crossed a link of :attr:`max_rate`."""
        if self.max_rate <= 0:
            return
        now = time.monotonic()
        self._due = max(self._due, now) + size / self.max_rate
        if self._due > now:
            time.sleep(self._due - now)

    def send_json(self, kind: Kind, obj: Any) -> None:
        self.send(kind, json.dumps(obj).encode())

    def send_json_sized(self, kind: Kind, obj: Any) -> int:
        """:meth:`send_json`, returning the frame's size on the wire."""
        return self.send(kind, json.dumps(obj).encode())

    def recv(self, *expect: Kind, borrow: bool = False) -> tuple[Kind, bytes | memoryview]:
        """The next frame; an ERROR frame raises :class:`PeerError`, a kind not in ``expect``
        (when given) or a frame that fails to open raises :class:`ProtocolError`. With ``borrow``
        a large payload is a view of the channel's buffer, valid until the next ``recv``."""
        header = _recv_exact(self.sock, HEADER.size)
        kind_no, n = HEADER.unpack(header)
        if n > MAX_FRAME:
            raise ProtocolError(f"malformed frame: length {n} exceeds the {MAX_FRAME}-byte limit")
        nonce = _nonce(self._recv_seq)
        try:
            if borrow and n >= SMALL_FRAME:
                sealed = _recv_into(self.sock, memoryview(self._buf("in_sealed", n + TAG))[: n + TAG])
                payload: bytes | memoryview = memoryview(self._buf("in_plain", n))[:n]
                self._open.decrypt_into(nonce, sealed, header, payload)
            else:
                sealed = _recv_into(self.sock, memoryview(bytearray(n + TAG)))
                payload = self._open.decrypt(nonce, sealed, header)
        except InvalidTag:
            raise AuthError("frame failed authentication (bad tag: forged, corrupted or out of order)") from None
        self._recv_seq += 1
        self.bytes_received += HEADER.size + n + TAG
        try:
            kind = Kind(kind_no)
        except ValueError:
            raise ProtocolError(f"malformed frame: unknown kind {kind_no}") from None
        if kind == Kind.ERROR:
            raise PeerError(bytes(payload).decode(errors="replace"))
        if expect and kind not in expect:
            raise ProtocolError(f"unexpected {kind.name} frame (expected {'/'.join(k.name for k in expect)})")
        return kind, payload

    def recv_json(self, *expect: Kind) -> dict[str, Any]:
        kind, payload = self.recv(*expect)
        return parse_json(kind, payload)

    def send_error(self, message: str) -> None:
        """Tell the peer why we give up (best effort: the connection may already be gone)."""
        try:
            self.send(Kind.ERROR, message.encode()[:4000])
        except ProtocolError:
            pass


def parse_json(kind: Kind, payload: bytes | memoryview) -> dict[str, Any]:
    """A JSON control frame's object; anything else (too large, too deeply nested, not an object)
    is a :class:`ProtocolError`."""
    if len(payload) > MAX_JSON:
        raise ProtocolError(f"malformed {kind.name} frame: {len(payload)} bytes of JSON (limit {MAX_JSON})")
    try:
        obj = json.loads(bytes(payload))
    except (ValueError, RecursionError):
        raise ProtocolError(f"malformed {kind.name} frame: not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {kind.name} frame: not a JSON object")
    return obj


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "big")


def _pieces(payload: Buffer | list[Buffer]) -> list[Buffer]:
    return payload if isinstance(payload, list) else [payload]


def _payload_size(pieces: list[Buffer]) -> int:
    n = sum(memoryview(p).nbytes for p in pieces)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    return n


class SendQueue:
    """Sends a channel's frames on a thread of their own, so sealing and the socket overlap the
    caller reading and compressing the next batch (both release the GIL).

    While it is open every frame must go through it, in order. A send that failed on the thread
    is raised by the next :meth:`send` or by :meth:`flush`, which also waits until all queued
    frames are on the socket: call it before waiting for the peer's answer."""

    def __init__(self, chan: Channel, depth: int = QUEUE_DEPTH):
        self.chan = chan
        self._q: queue.Queue[tuple[Kind, list[Buffer]] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._dropping = False
        self.sent_bytes = 0
        self.busy_seconds = 0.0
        """Bytes the thread put on the socket and the time it spent doing so: the link's pace."""
        self._thread = threading.Thread(target=self._run, name="memvirt-send", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._q.get()) is not None:
            if self._error is None and not self._dropping:
                try:
                    t = time.perf_counter()
                    self.sent_bytes += self.chan.send(*item)
                    self.busy_seconds += time.perf_counter() - t
                except BaseException as e:
                    self._error = e
            self._q.task_done()
        self._q.task_done()

    def rate(self) -> float:
        """Bytes per second the link took while there was something to send (0 before any)."""
        return self.sent_bytes / self.busy_seconds if self.busy_seconds > 0.01 else 0.0

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def send(self, kind: Kind, payload: Buffer | list[Buffer] = b"") -> int:
        """Queue one frame (its buffers must not change until sent); returns its size on the wire."""
        self._check()
        pieces = _pieces(payload)
        n = _payload_size(pieces)
        self._q.put((kind, pieces))
        return HEADER.size + n + TAG

    def send_json_sized(self, kind: Kind, obj: Any) -> int:
        return self.send(kind, json.dumps(obj).encode())

    def flush(self) -> None:
        self._q.join()
        self._check()

    def close(self) -> None:
        """Send what is queued and stop the thread; raises what a send raised."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()
        self._check()

    def abort(self, wait: float = 5.0) -> bool:
        """Drop what is queued and stop the thread; False if it is still stuck in a send after
        ``wait`` seconds (then the channel is unusable: shut its socket down)."""
        self._dropping = True
        try:
            while True:
                self._q.get_nowait()
                self._q.task_done()
        except queue.Empty:
            pass
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join(wait)
        return not self._thread.is_alive()


def _recv_into(sock: socket.socket, view: memoryview, deadline: float | None = None) -> memoryview:
    """Fill ``view`` from the socket; returns it. With ``deadline`` (a ``time.monotonic()``) the
    whole read must be over by then, however the bytes trickle in."""
    got, n = 0, len(view)
    while got < n:
        try:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            if deadline is not None:
                raise ProtocolError("the handshake took over its time limit (--handshake-timeout)") from None
            raise ProtocolError("the peer went silent (receive timed out)") from None
        except OSError as e:
            raise ProtocolError(f"connection lost: {e.strerror or e}") from e
        if k == 0:
            raise ProtocolError("connection closed by the peer")
        got += k
    return view


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    return bytes(_recv_into(sock, memoryview(bytearray(n)), deadline))


def _gather(pieces: list[Buffer], buf: bytearray, n: int) -> memoryview:
    """The pieces copied one after another into ``buf``; a view of the ``n`` bytes."""
    out = memoryview(buf)[:n]
    pos = 0
    for p in pieces:
        m = memoryview(p).cast("B")
        out[pos : pos + m.nbytes] = m
        pos += m.nbytes
    return out


def _keys(secret: bytes, cn: bytes, sn: bytes) -> tuple[bytes, bytes]:
    """Session keys (client->server, server->client): distinct, so no frame can be reflected."""
    return _mac(secret, b"memvirt-migrate c2s", cn, sn), _mac(secret, b"memvirt-migrate s2c", cn, sn)


def client_handshake(
    sock: socket.socket, secret: bytes | None, timeout: float, limit: float = HANDSHAKE_TIMEOUT
) -> Channel:
    """Authenticate to a receiver (and it to us) within ``limit`` seconds; returns the session."""
    key = secret if secret is not None else INSECURE_SECRET
    flags = FLAG_INSECURE if secret is None else 0
    deadline = time.monotonic() + limit
    sock.settimeout(limit)
    cn = secrets.token_bytes(NONCE)
    try:
        sock.sendall(HELLO.pack(MAGIC, VERSION, flags, cn))
    except OSError as e:
        raise ProtocolError(f"connection lost during the handshake: {e.strerror or e}") from e
    try:
        magic, version, sflags, sn, proof = CHALLENGE.unpack(_recv_exact(sock, CHALLENGE.size, deadline))
    except ProtocolError as e:
        raise ProtocolError(f"the receiver closed the handshake ({e}): is it a memvirt receiver?") from e
    if magic != MAGIC:
        raise ProtocolError("the peer is not a memvirt receiver (bad magic)")
    if version != VERSION:
        raise ProtocolError(f"protocol version mismatch: receiver speaks v{version}, this memvirt v{VERSION}")
    if sflags != flags:
        raise AuthError(
            "the receiver requires a shared secret; this side runs --insecure"
            if flags
            else "the receiver runs --insecure (unauthenticated): refusing to send to it"
        )
    if not hmac.compare_digest(proof, _mac(key, b"memvirt-migrate server", cn, sn)):
        raise AuthError("the receiver failed authentication (shared secrets differ)")
    try:
        sock.sendall(_mac(key, b"memvirt-migrate client", cn, sn))
    except OSError as e:
        raise ProtocolError(f"connection lost during the handshake: {e.strerror or e}") from e
    c2s, s2c = _keys(key, cn, sn)
    chan = Channel(sock, c2s, s2c, max(0.1, min(timeout, deadline - time.monotonic())))
    try:
        chan.recv(Kind.OK)
    except PeerError:
        raise
    except ProtocolError:
        raise AuthError("the receiver refused us (shared secrets differ?)") from None
    chan.settimeout(timeout)
    return chan


def server_handshake(
    sock: socket.socket, secret: bytes | None, timeout: float, limit: float = HANDSHAKE_TIMEOUT
) -> Channel:
    """Check a connecting sender, all within ``limit`` seconds; raises :class:`AuthError` if it
    cannot prove the secret, :class:`ProtocolError` if it is too slow or not a memvirt sender.
    Nothing is allocated or computed for the peer before it proved the secret but two HMACs."""
    key = secret if secret is not None else INSECURE_SECRET
    flags = FLAG_INSECURE if secret is None else 0
    deadline = time.monotonic() + limit
    magic, version, cflags, cn = HELLO.unpack(_recv_exact(sock, HELLO.size, deadline))
    if magic != MAGIC:
        raise ProtocolError("the peer is not a memvirt sender (bad magic)")
    sn = secrets.token_bytes(NONCE)
    proof = _mac(key, b"memvirt-migrate server", cn, sn) if version == VERSION and cflags == flags else bytes(PROOF)
    try:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        sock.sendall(CHALLENGE.pack(MAGIC, VERSION, flags, sn, proof))
    except OSError as e:
        raise ProtocolError(f"connection lost during the handshake: {e.strerror or e}") from e
    if version != VERSION:
        raise ProtocolError(f"protocol version mismatch: sender speaks v{version}, this memvirt v{VERSION}")
    if cflags != flags:
        raise AuthError(
            "refused an insecure sender" if cflags else "the sender requires a secret; this receiver runs --insecure"
        )
    answer = _recv_exact(sock, PROOF, deadline)
    if not hmac.compare_digest(answer, _mac(key, b"memvirt-migrate client", cn, sn)):
        raise AuthError("refused a sender that failed authentication")
    c2s, s2c = _keys(key, cn, sn)
    chan = Channel(sock, s2c, c2s, timeout)
    chan.send(Kind.OK)
    return chan
