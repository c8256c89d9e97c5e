"""Capture files: the raw frames a source received, one NDJSON record per line, for replay and benchmarks.

A line is `{"source": "<name>", "received_ns": <int>, "frame": "<raw frame text>"}`: `source` names the
parser that reads the frame (`registry.build_parser`), `received_ns` is the collector's receive time (ns since
the epoch, UTC), `frame` the frame as the venue sent it. Frames are UTF-8 text (WebSocket text frames, JSON
bodies); bytes that are not UTF-8 are written as U+FFFD, a frame that was garbage stays garbage.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import msgspec

from pricewire_collector.sources.base import VenueFrameError

__all__ = ["CaptureRecord", "CaptureWriter", "decode_record", "encode_record"]


class CaptureRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One captured frame."""

    source: str
    received_ns: int
    frame: str


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(CaptureRecord)


def encode_record(source: str, frame: bytes, received_ns: int) -> bytes:
    """The capture line of one frame, newline included."""
    record = CaptureRecord(source=source, received_ns=received_ns, frame=frame.decode("utf-8", errors="replace"))
    return _ENCODER.encode(record) + b"\n"


def decode_record(line: bytes) -> CaptureRecord:
    """The record of one capture line; raises VenueFrameError (`malformed_frame`) naming the bad field."""
    try:
        return _DECODER.decode(line)
    # RecursionError: what msgspec raises, instead of a DecodeError, for JSON nested ~1000 deep.
    except (msgspec.DecodeError, RecursionError) as exc:
        raise VenueFrameError(f"capture line: {exc}", reason="malformed_frame") from exc


class CaptureWriter:
    """Appends frames to a capture file; callable as the collector's frame tap (`runtime.FrameTap`).

    Writes are buffered; `close` (or leaving the `with` block) flushes. `counts` holds the frames
    written per source.
    """

    def __init__(self, path: Path | str, *, buffer_bytes: int = 1 << 16) -> None:
        self.path = Path(path)
        self._file: BinaryIO = self.path.open("wb", buffering=buffer_bytes)
        self.counts: Counter[str] = Counter()

    def __call__(self, source: str, frame: bytes, received_ns: int) -> None:
        self._file.write(encode_record(source, frame, received_ns))
        self.counts[source] += 1

    @property
    def closed(self) -> bool:
        return self._file.closed

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        """Flush and close the file (once; later calls do nothing)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
