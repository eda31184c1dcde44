"""Compressed input files as byte streams, for `training.sources`: gzip, zstd, bz2, xz.

Inside: `CODECS` (extension -> codec), `open_bytes(path, codec)` (the decompressed bytes, after checking
the codec's signature), `looks_compressed(path)` (a hint for a file that is not UTF-8 but is compressed).

Invariants: a file whose first bytes are not its codec's signature is refused before any byte is decoded
(a `.zst` that is gzip, plain text or empty, saying what it is); input that ends inside a compressed stream
raises EOFError for every codec (zstandard's own stream reader would end quietly at a cut, so `.zst` is
decoded here frame by frame, concatenated and skippable frames included), corrupt data raises OSError (or
the codec's own error); `training.sources` turns them into one line naming the file.
"""

from __future__ import annotations

import contextlib
import io
import lzma

from jaxmodel import storage
from training.documents import DataError

CODECS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
_EXTENSION = {codec: ext for ext, codec in CODECS.items()}
_SIGNATURES = {"gzip": (b"\x1f\x8b",), "zstd": (b"\x28\xb5\x2f\xfd",), "bz2": (b"BZh",), "xz": (b"\xfd7zXZ\x00",)}


def _codec_of_bytes(head: bytes) -> str | None:
    return next((c for c, sigs in _SIGNATURES.items() if head.startswith(sigs)), None)


def looks_compressed(path: str) -> str:
    """A hint for a file that is not UTF-8: `; it is gzip data: name it NAME.gz` when it is."""
    with contextlib.suppress(Exception), storage.open(path, "rb") as f:
        codec = _codec_of_bytes(f.read(8))
        if codec:
            return f"; it is {codec}-compressed: name it {storage.basename(path)}{_EXTENSION[codec]}"
    return ""


@contextlib.contextmanager
def open_bytes(path: str, codec: str | None):
    """The file's bytes, decompressed by `codec` (None: as they are), after checking the codec's signature."""
    with storage.open(path, "rb") as raw:
        if codec is None:
            yield raw
            return
        head = raw.read(8)
        actual = _codec_of_bytes(head)
        if actual != codec:
            what = ("it is empty" if not head else f"it is {actual} data" if actual else
                    f"it does not start with the {codec} signature (not compressed?)")
            raise DataError(f"{path}: not {codec} data: the name ends in {_EXTENSION[codec]}, but {what}")
        raw.seek(0)
        if codec == "gzip":
            import gzip

            f = gzip.GzipFile(fileobj=raw, mode="rb")
        elif codec == "bz2":
            import bz2

            f = bz2.BZ2File(raw)
        elif codec == "xz":
            f = lzma.LZMAFile(raw)
        else:  # zstandard's stream reader ends quietly at a cut: this one raises EOFError there
            f = io.BufferedReader(_ZstdReader(raw), 1 << 20)
        with f:
            yield f


class _ZstdReader(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame (concatenated and skippable frames included);
    input that ends inside a frame raises EOFError, as gzip, bz2 and lzma do; bad data raises OSError."""

    def __init__(self, raw):
        import zstandard

        self._raw, self._dctx, self._error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame = None  # the decompressor of the current frame
        self._rest = b""  # input after the current frame's end, not yet decoded
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            if not self._decode_more():
                return 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _decode_more(self) -> bool:
        """Decodes the next piece of input into `_out`; False at the end of the input."""
        chunk, self._rest = self._rest or self._raw.read(1 << 17), b""
        if not chunk:
            if self._frame is not None and not self._frame.eof:
                raise EOFError("the zstd stream ends inside a frame")
            return False
        if self._frame is None or self._frame.eof:
            self._frame = self._dctx.decompressobj()
        try:
            self._out, self._at = self._frame.decompress(chunk), 0
        except self._error as e:
            raise OSError(str(e).split("error: ", 1)[-1]) from None
        if self._frame.eof:
            self._rest = self._frame.unused_data
        return True
