"""A conflating mailbox: the latest price frame per asset awaiting one client's writer.

A client that reads slowly gets fewer frames, never older ones, and never costs more memory than
one frame per asset. Frames are ordered by the event's `seq`, so a snapshot read from Redis never
replaces (or follows) a newer live update for the same asset.
"""

from __future__ import annotations


class Mailbox:
    """Pending frames of one client, keyed by asset; pure, no I/O."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[int, bytes]] = {}
        self._sent: dict[str, int] = {}
        self.conflated = 0
        """Frames replaced by a newer one before the client could be sent them."""

    def __len__(self) -> int:
        return len(self._pending)

    def offer(self, asset: str, seq: int, frame: bytes) -> bool:
        """Keep `frame` if it is newer than what was sent and what waits; True if it was kept."""
        if seq <= self._sent.get(asset, -1):
            return False
        waiting = self._pending.get(asset)
        if waiting is not None:
            if waiting[0] >= seq:
                return False
            self.conflated += 1
        self._pending[asset] = (seq, frame)
        return True

    def mark_sent(self, asset: str, seq: int) -> bool:
        """Record `seq` of `asset` as sent straight away (nothing waits); False if it is not newer than sent."""
        if seq <= self._sent.get(asset, -1):
            return False
        self._sent[asset] = seq
        return True

    def take(self) -> list[bytes]:
        """Every waiting frame, oldest asset entry first; they count as sent."""
        return [frame for _, _, frame in self.take_keyed()]

    def take_keyed(self) -> list[tuple[str, int, bytes]]:
        """Every waiting (asset, seq, frame), oldest asset entry first; they count as sent."""
        taken = []
        for asset, (seq, frame) in self._pending.items():
            self._sent[asset] = seq
            taken.append((asset, seq, frame))
        self._pending.clear()
        return taken

    def assets(self) -> set[str]:
        """Assets with a frame waiting or sent."""
        return set(self._pending) | set(self._sent)

    def forget(self, asset: str) -> None:
        """Drop what waits for `asset` and what was sent: the client no longer follows it."""
        self._pending.pop(asset, None)
        self._sent.pop(asset, None)
