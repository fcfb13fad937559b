"""A schedule as the network runs it: ordered rounds of (src, dst, bytes) transfers at rates.

A round lasts max over its transfers of bytes / rate_bytes_s and the rounds run back to back, so
the makespan is the sum of the rounds. plan.schedule builds schedules (and re-exports Schedule);
the fluid simulation records what a transport without a plan did as one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    """An all-to-all as ordered rounds of transfers, stored column-wise and sorted by round.

    round_of [T] int64: the round of each transfer (0 .. num_rounds-1, non-decreasing).
    src [T], dst [T] int64: sending and receiving device.
    bytes [T] float64: bytes moved by the transfer in its round.
    rate_bytes_s [T] float64: the rate it runs at; the round lasts max(bytes / rate) over its transfers.
    num_devices: n. strategy: which algorithm built it.
    """

    round_of: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    bytes: np.ndarray
    rate_bytes_s: np.ndarray
    num_rounds: int
    num_devices: int
    strategy: str

    @property
    def num_transfers(self) -> int:
        return int(self.src.shape[0])

    def round_durations_s(self, latency_s: float = 0.0) -> np.ndarray:
        """[num_rounds] seconds: each round's longest transfer, plus latency_s per round.

        A round's transfers are messages posted together, so a round pays one per-message latency
        (the simulator's network model); latency_s = 0 is the planner's fluid model."""
        durations = np.zeros(self.num_rounds)
        if self.num_transfers:
            np.maximum.at(durations, self.round_of, self.bytes / self.rate_bytes_s)
        return durations + latency_s if latency_s else durations

    @property
    def makespan_s(self) -> float:
        return float(self.round_durations_s().sum())

    def makespan_with_latency_s(self, latency_s: float) -> float:
        """Round by round, each round latency_s + its longest transfer: makespan_s + rounds * latency_s."""
        return float(self.round_durations_s(latency_s).sum())

    def round_crowding(self) -> np.ndarray:
        """[num_rounds] int: the most flows (distinct peers) any device sends to or receives from in
        each round; 1 in every busy round of a matching schedule."""
        rounds, n = self.num_rounds, self.num_devices
        pairs = np.zeros((rounds, n, n), dtype=bool)
        pairs[self.round_of, self.src, self.dst] = self.bytes > 0
        sends = pairs.sum(axis=2).max(axis=1, initial=0)
        receives = pairs.sum(axis=1).max(axis=1, initial=0)
        return np.maximum(sends, receives)

    def delivered_bytes(self) -> np.ndarray:
        """[n, n] bytes moved from each src to each dst over all rounds."""
        n = self.num_devices
        flat = np.bincount(self.src * n + self.dst, weights=self.bytes, minlength=n * n)
        return flat.reshape(n, n)

    def rounds(self) -> list[list[tuple[int, int, float]]]:
        """The rounds as lists of (src, dst, bytes): for printing and small plans, not for n = 1024."""
        out: list[list[tuple[int, int, float]]] = [[] for _ in range(self.num_rounds)]
        for r, s, d, b in zip(
            self.round_of.tolist(), self.src.tolist(), self.dst.tolist(), self.bytes.tolist(), strict=True
        ):
            out[r].append((s, d, b))
        return out
