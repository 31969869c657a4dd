"""Moving TLS records between an OpenSSL memory-BIO connection and Python,
with as few Python-level steps as possible: the one place lbtwist reaches
into pyOpenSSL's private binding (``Connection._ssl`` / ``_into_ssl`` /
``_from_ssl`` / ``_raise_ssl_error`` and the ``_lib`` functions), behind a
version check.

Why (measured with ``bench/micro_tls.py``): pyOpenSSL's ``recv`` and
``bio_read`` signal "nothing more" by raising ``WantReadError``, and Twisted's
TLS protocol ends every read with one of each (about 3-4 us apiece); every
``send``/``recv``/``bio_read`` also allocates a 32 KiB buffer and runs the
error check even on success. Here a read drains the input BIO with
``SSL_read`` into one reused buffer and stops on ``SSL_ERROR_WANT_READ``
without an exception, a write encrypts a whole buffer in one loop of
``SSL_write`` without slicing it, and the encrypted output is taken in one
``BIO_read`` of exactly what the output BIO holds.

Errors are raised by pyOpenSSL's own ``_raise_ssl_error`` (so they are the
same exception types and messages as ``recv``/``send`` give). With an
unchecked pyOpenSSL (L{FAST} false) the same functions run on the public
API, with the exceptions; both paths are tested (tests/test_tls_records.py).
"""
from __future__ import annotations

from typing import Any

import OpenSSL
from OpenSSL import SSL

__all__ = ["FAST", "CHECKED_PYOPENSSL_MAJOR", "read_plaintext", "take_ciphertext", "write_plaintext", "feed_ciphertext"]

#: pyOpenSSL major versions whose private binding this module was checked against.
CHECKED_PYOPENSSL_MAJOR = (26,)

#: Plaintext bytes asked of one ``SSL_read``: one TLS record's worth at most.
READ_SIZE = 16384
#: Output taken through the reused buffer when it fits (else a new one).
_OUT_SIZE = 65536


def _binding() -> Any:
    lib = getattr(SSL, "_lib", None)
    ffi = getattr(SSL, "_ffi", None)
    if lib is None or ffi is None:
        return None
    needed = ("SSL_read", "SSL_write", "SSL_get_error", "SSL_ERROR_WANT_READ", "SSL_pending", "BIO_read",
              "BIO_write", "BIO_get_mem_data")
    if not all(hasattr(lib, n) for n in needed):
        return None
    for attr in ("_ssl", "_into_ssl", "_from_ssl"):
        if attr not in SSL.Connection.__init__.__code__.co_names:
            return None
    if not hasattr(SSL.Connection, "_raise_ssl_error"):
        return None
    return lib, ffi


def supported() -> bool:
    """True when this pyOpenSSL is one the private path was checked against."""
    try:
        major = int(OpenSSL.__version__.split(".")[0])
    except ValueError:
        return False
    return major in CHECKED_PYOPENSSL_MAJOR and _binding() is not None


#: The private path is used (see the module docstring).
FAST = supported()


def _error(conn: SSL.Connection, result: int) -> SSL.Error:
    """The exception pyOpenSSL would raise for this failed call's ``result``."""
    try:
        conn._raise_ssl_error(conn._ssl, result)
    except SSL.Error as e:
        return e
    return SSL.Error([("lbtwist", "", f"TLS call failed ({result}) without an OpenSSL error")])


# -- the public-API equivalents (the fallback, and the tests' reference) --------------


def _public_read(conn: SSL.Connection) -> tuple[bytes, SSL.Error | None]:
    parts = []
    while True:
        try:
            parts.append(conn.recv(READ_SIZE))
        except SSL.WantReadError:
            return b"".join(parts), None
        except SSL.Error as e:
            return b"".join(parts), e


def _public_write(conn: SSL.Connection, data: bytes) -> tuple[int, SSL.Error | None]:
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            done += conn.send(view[done:])
        except SSL.Error as e:
            return done, e
    return done, None


def _public_take(conn: SSL.Connection) -> bytes:
    parts = []
    while True:
        try:
            parts.append(conn.bio_read(_OUT_SIZE))
        except SSL.WantReadError:
            return b"".join(parts)


def _public_feed(conn: SSL.Connection, data: bytes) -> None:
    conn.bio_write(data)


if FAST:
    _lib, _ffi = _binding()
    _SSL_read, _SSL_write, _SSL_get_error = _lib.SSL_read, _lib.SSL_write, _lib.SSL_get_error
    _SSL_pending = _lib.SSL_pending
    _BIO_read, _BIO_write, _BIO_get_mem_data = _lib.BIO_read, _lib.BIO_write, _lib.BIO_get_mem_data
    _WANT_READ = _lib.SSL_ERROR_WANT_READ
    _NULL = _ffi.NULL
    _from_buffer = _ffi.from_buffer
    _buffer = _ffi.buffer
    _alloc = _ffi.new_allocator(should_clear_after_alloc=False)
    _rbuf = _alloc("char[]", READ_SIZE)
    _obuf = _alloc("char[]", _OUT_SIZE)

    def feed_ciphertext(conn: SSL.Connection, data: bytes) -> None:
        """Put bytes read from the network into the connection's input BIO."""
        with _from_buffer(data) as p:
            if _BIO_write(conn._into_ssl, p, len(data)) != len(data):  # a memory BIO only fails on ENOMEM
                raise SSL.Error([("lbtwist", "", "BIO_write into the memory BIO failed")])

    def read_plaintext(conn: SSL.Connection) -> tuple[bytes, SSL.Error | None]:
        """Every byte of application data the input BIO's records decrypt to,
        and the error that ended reading (None when they simply ran out:
        ``SSL_ERROR_WANT_READ``). Data read before an error is returned with it.

        Reading stops without the last ``SSL_read`` (the one that would only
        say ``SSL_ERROR_WANT_READ``) once the input BIO is empty and OpenSSL
        holds no decrypted bytes (``SSL_pending``): with nothing left to
        read, that call cannot return data, an alert or an error."""
        ssl = conn._ssl
        into = conn._into_ssl
        n = _SSL_read(ssl, _rbuf, READ_SIZE)
        if n <= 0:
            if _SSL_get_error(ssl, n) == _WANT_READ:
                return b"", None
            return b"", _error(conn, n)
        first = _buffer(_rbuf, n)[:]
        if _BIO_get_mem_data(into, _NULL) <= 0 and _SSL_pending(ssl) <= 0:
            return first, None
        n = _SSL_read(ssl, _rbuf, READ_SIZE)
        if n <= 0:
            if _SSL_get_error(ssl, n) == _WANT_READ:
                return first, None
            return first, _error(conn, n)
        parts = [first, _buffer(_rbuf, n)[:]]
        while True:
            if _BIO_get_mem_data(into, _NULL) <= 0 and _SSL_pending(ssl) <= 0:
                return b"".join(parts), None
            n = _SSL_read(ssl, _rbuf, READ_SIZE)
            if n <= 0:
                err = None if _SSL_get_error(ssl, n) == _WANT_READ else _error(conn, n)
                return b"".join(parts), err
            parts.append(_buffer(_rbuf, n)[:])

    def write_plaintext(conn: SSL.Connection, data: bytes) -> tuple[int, SSL.Error | None]:
        """Encrypt all of ``data`` (into the output BIO); returns the bytes
        taken and the error that stopped it (None: all taken). A
        ``WantReadError`` means the rest must be written again later."""
        ssl = conn._ssl
        total = len(data)
        with _from_buffer(data) as p:
            done = 0
            while done < total:
                # Partial-write mode (pyOpenSSL's default): one record per call.
                n = _SSL_write(ssl, p + done, total - done)
                if n <= 0:
                    return done, _error(conn, n)
                done += n
        return done, None

    def take_ciphertext(conn: SSL.Connection) -> bytes:
        """Everything the output BIO holds (b"" when empty), in one read."""
        bio = conn._from_ssl
        size = _BIO_get_mem_data(bio, _NULL)
        if size <= 0:
            return b""
        buf = _obuf if size <= _OUT_SIZE else _alloc("char[]", size)
        n = _BIO_read(bio, buf, size)
        if n <= 0:
            return b""
        return _buffer(buf, n)[:]

else:
    feed_ciphertext = _public_feed
    read_plaintext = _public_read
    write_plaintext = _public_write
    take_ciphertext = _public_take
