"""Association slots counted for the whole node, across every serve process.

`node.max_associations` and `node.max_associations_per_address` are promises about the
node, not about one of its processes: with four serve processes, one remote address must
still hold at most its share. The counts live in shared memory made by the supervising
`serve` process and handed to each serve process when it starts; each process counts in its
own row, so the rows of a process that died can be cleared by the supervisor (`clear_row`)
without touching anyone else's.

Row layout (int64): [associations held, then `capacity` pairs of (address key, count)].
"""

from __future__ import annotations

import hashlib
import multiprocessing
from dataclasses import dataclass

ADMITTED = "admitted"
NODE_FULL = "node full"
ADDRESS_FULL = "address full"


def address_key(address: str) -> int:
    """A non-zero 63-bit key for an IP address (0 marks a free pair)."""
    digest = hashlib.blake2b(address.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


@dataclass(frozen=True)
class SlotVerdict:
    outcome: str  # ADMITTED, NODE_FULL or ADDRESS_FULL
    held_by_address: int  # associations the address held before this one


class AssociationSlots:
    """Shared association counts; picklable into processes started with `spawn`."""

    def __init__(self, total: int, per_address: int, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.total = total
        self.per_address = per_address
        self.capacity = total  # no process ever holds more than the node's total
        self._row_length = 1 + 2 * self.capacity
        self._lock = context.Lock()
        self._counts = context.RawArray("q", self._row_length * max(1, processes))
        self.processes = max(1, processes)
        self.row = 0

    def for_process(self, row: int) -> AssociationSlots:
        """The same shared counts, counting for serve process number `row`."""
        other = object.__new__(AssociationSlots)
        other.__dict__.update(self.__dict__)
        other.row = row
        return other

    def take(self, address: str) -> SlotVerdict:
        """Count a new association from `address` if the node and the address have room."""
        key = address_key(address)
        counts = self._counts
        width = self._row_length
        with self._lock:
            held_total = 0
            held_by_address = 0
            for row in range(self.processes):
                base = row * width
                held_total += counts[base]
                for pair in range(base + 1, base + width, 2):
                    if counts[pair] == key:
                        held_by_address += counts[pair + 1]
            if held_by_address >= self.per_address:
                return SlotVerdict(ADDRESS_FULL, held_by_address)
            if held_total >= self.total:
                return SlotVerdict(NODE_FULL, held_by_address)
            base = self.row * width
            free = None
            for pair in range(base + 1, base + width, 2):
                if counts[pair] == key:
                    counts[pair + 1] += 1
                    break
                if free is None and counts[pair] == 0:
                    free = pair
            else:
                if free is None:  # cannot happen: a row has a pair for each of its slots
                    return SlotVerdict(NODE_FULL, held_by_address)
                counts[free] = key
                counts[free + 1] = 1
            counts[base] += 1
        return SlotVerdict(ADMITTED, held_by_address)

    def give_back(self, address: str) -> None:
        """Free the slot an association from `address` held in this process's row."""
        key = address_key(address)
        counts = self._counts
        base = self.row * self._row_length
        with self._lock:
            for pair in range(base + 1, base + self._row_length, 2):
                if counts[pair] == key:
                    counts[pair + 1] -= 1
                    if counts[pair + 1] <= 0:
                        counts[pair] = 0
                        counts[pair + 1] = 0
                    counts[base] = max(0, counts[base] - 1)
                    return

    def clear_row(self, row: int) -> None:
        """Forget every slot serve process `row` held (it died; its sockets are gone)."""
        base = row * self._row_length
        with self._lock:
            for index in range(base, base + self._row_length):
                self._counts[index] = 0

    def held(self) -> int:
        """Associations the whole node holds now."""
        with self._lock:
            return sum(
                self._counts[row * self._row_length] for row in range(self.processes)
            )
