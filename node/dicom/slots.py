"""Association slots counted for the whole node, across every serve process.

`node.max_associations` and `node.max_associations_per_address` are promises about the
node, not about one of its processes: with four serve processes, one remote address must
still hold at most its share. A connection goes through two stages, counted apart:

- from accept until its A-ASSOCIATE-RQ it is *pending*. Pending connections take no
  association slot: a silent connection cannot lock anyone out of an association. Those
  from addresses that are not a `[[peers]]` host share a pool of
  `node.max_unknown_associations`; a peer's host always gets its connection accepted;
- once its A-ASSOCIATE-RQ names the caller it holds an association slot: a `[[peers]]`
  caller any of the `node.max_associations`, an unknown caller one of the
  `node.max_unknown_associations` among them, so the rest are kept for peers.

One remote address holds at most `node.max_associations_per_address` connections, pending
or associated. The counts live in shared memory made by the supervising `serve` process and
handed to each serve process when it starts; each process counts in its own row, so the
rows of a process that died can be cleared by the supervisor (`clear_row`) without
touching anyone else's.

Row layout (int64): [associations, unknown associations, unknown pending, accepting (1 while
the process's listeners run), then `capacity` pairs of (address key, connections of that
address)].

The same counts spread the work: all serve processes wait on one listening socket, and a
process that holds more connections than another that accepts leaves a new connection to
that one for a moment (`GuardedServer.get_request`). Otherwise whichever process wakes
first takes it, and four senders often land three on one process and one on the other,
which then idles while the first is short of CPU.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from dataclasses import dataclass

ADMITTED = "admitted"
NODE_FULL = "node full"
ADDRESS_FULL = "address full"
PENDING_FULL = "pending full"
UNKNOWN_FULL = "unknown full"

PENDING = "pending"
PEER = "peer"
UNKNOWN = "unknown"
GONE = "gone"

_HEADER = 4  # associations, unknown associations, unknown pending, accepting
_ACCEPTING = 3
_PAIR = 2


def address_key(address: str) -> int:
    """A non-zero 63-bit key for an IP address (0 marks a free pair)."""
    digest = hashlib.blake2b(address.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 1) or 1


@dataclass(frozen=True)
class SlotVerdict:
    outcome: str  # ADMITTED, NODE_FULL, ADDRESS_FULL or PENDING_FULL
    held_by_address: int  # connections the address held before this one


@dataclass
class Ticket:
    """What one connection holds: PENDING, then PEER or UNKNOWN, or GONE."""

    address: str
    peer_address: bool  # from the host of a [[peers]] entry: not in the unknown pending pool
    stage: str = PENDING


class AssociationSlots:
    """Shared connection counts; picklable into processes started with `spawn`."""

    def __init__(
        self, total: int, per_address: int, processes: int, unknown: int | None = None
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.total = total
        self.per_address = per_address
        self.unknown = total if unknown is None else unknown
        # No process holds more connections than associations plus pending ones.
        self.capacity = 2 * total + self.unknown + 8
        self._row_length = _HEADER + _PAIR * self.capacity
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

    def _sum(self, column: int) -> int:
        width = self._row_length
        return sum(self._counts[row * width + column] for row in range(self.processes))

    def _held_by(self, key: int) -> int:
        counts = self._counts
        held = 0
        for row in range(self.processes):
            base = row * self._row_length
            for pair in range(base + _HEADER, base + self._row_length, _PAIR):
                if counts[pair] == key:
                    held += counts[pair + 1]
        return held

    def _add_address(self, key: int, delta: int) -> bool:
        counts = self._counts
        base = self.row * self._row_length
        free = None
        for pair in range(base + _HEADER, base + self._row_length, _PAIR):
            if counts[pair] == key:
                counts[pair + 1] += delta
                if counts[pair + 1] <= 0:
                    counts[pair] = counts[pair + 1] = 0
                return True
            if free is None and counts[pair] == 0:
                free = pair
        if delta <= 0 or free is None:
            return False
        counts[free] = key
        counts[free + 1] = delta
        return True

    def connect(self, address: str, peer_address: bool = False) -> tuple[SlotVerdict, Ticket]:
        """Count a new connection from `address` as pending, if there is room for it."""
        key = address_key(address)
        ticket = Ticket(address, peer_address, GONE)
        base = self.row * self._row_length
        with self._lock:
            held_by_address = self._held_by(key)
            if held_by_address >= self.per_address:
                return SlotVerdict(ADDRESS_FULL, held_by_address), ticket
            if not peer_address and self._sum(2) >= self.unknown:
                return SlotVerdict(PENDING_FULL, held_by_address), ticket
            if not self._add_address(key, 1):
                return SlotVerdict(PENDING_FULL, held_by_address), ticket
            if not peer_address:
                self._counts[base + 2] += 1
        ticket.stage = PENDING
        return SlotVerdict(ADMITTED, held_by_address), ticket

    def associate(self, ticket: Ticket, peer: bool) -> str:
        """Turn a pending connection into an association of a [[peers]] caller (`peer`)
        or of an unknown one: ADMITTED, or NODE_FULL or UNKNOWN_FULL, the connection then
        counted nowhere."""
        if ticket.stage != PENDING:
            return NODE_FULL
        base = self.row * self._row_length
        counts = self._counts
        with self._lock:
            if not ticket.peer_address:
                counts[base + 2] = max(0, counts[base + 2] - 1)
            full = None
            if self._sum(0) >= self.total:
                full = NODE_FULL
            elif not peer and self._sum(1) >= self.unknown:
                full = UNKNOWN_FULL
            if full is not None:
                self._add_address(address_key(ticket.address), -1)
                ticket.stage = GONE
                return full
            counts[base] += 1
            if not peer:
                counts[base + 1] += 1
        ticket.stage = PEER if peer else UNKNOWN
        return ADMITTED

    def give_back(self, ticket: Ticket) -> None:
        """Free what the connection of `ticket` held in this process's row."""
        base = self.row * self._row_length
        counts = self._counts
        with self._lock:  # the connection's reactor and its handler may both give back
            if ticket.stage == GONE:
                return
            if ticket.stage == PENDING and not ticket.peer_address:
                counts[base + 2] = max(0, counts[base + 2] - 1)
            elif ticket.stage in (PEER, UNKNOWN):
                counts[base] = max(0, counts[base] - 1)
                if ticket.stage == UNKNOWN:
                    counts[base + 1] = max(0, counts[base + 1] - 1)
            self._add_address(address_key(ticket.address), -1)
            ticket.stage = GONE

    def set_accepting(self, accepting: bool) -> None:
        """Mark this process as one whose listeners accept (or no longer do)."""
        self._counts[self.row * self._row_length + _ACCEPTING] = int(accepting)

    def _connections_of(self, row: int) -> int:
        base = row * self._row_length
        counts = self._counts
        pairs = range(base + _HEADER, base + self._row_length, _PAIR)
        return sum(counts[pair + 1] for pair in pairs)

    def another_accepts_with_fewer(self) -> bool:
        """True if another accepting process holds fewer connections than this one: the
        one a new connection should go to. Read without the lock: a hint, not a count."""
        if self.processes == 1:
            return False
        own = self._connections_of(self.row)
        if own == 0:
            return False
        width = self._row_length
        return any(
            row != self.row
            and self._counts[row * width + _ACCEPTING]
            and self._connections_of(row) < own
            for row in range(self.processes)
        )

    def clear_row(self, row: int) -> None:
        """Forget every slot serve process `row` held (it died; its sockets are gone)."""
        base = row * self._row_length
        with self._lock:
            for index in range(base, base + self._row_length):
                self._counts[index] = 0

    def held(self) -> int:
        """Associations the whole node holds now."""
        with self._lock:
            return self._sum(0)
