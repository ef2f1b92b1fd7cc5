"""The Dynamic Class Pool: Q label-keyed slots, two G-Net feature rows per slot, LRU eviction, vectorised.

State (all tensors on the pool's device, no Python loop over labels):
  features   [2, Q, D] fp32   row 0 / row 1 of every slot; initialised uniform [0, 1) then L2-normalised
  slot_label [Q] int64        the label held by each slot, -1 while empty
  last_seen  [Q] int64        recency stamp: clock + position in the gathered batch of the last write;
                              empty slots hold distinct negative stamps so they fill in slot order first
  row_ptr    [Q] int64        which row the next write to a slot goes to (0 or 1)
  clock      int              stamps handed out so far (advances by the batch length on commit)

Insertion of one gathered batch (labels in gather order) follows the reference LRU sequence: a new label
takes the least recently written slot (free slots first) and writes row 0; every further sighting writes the
other row of its slot and marks the slot "refreshed". Two deliberate deviations (docs/f2c): the writes are
deduplicated (per slot only the last two sightings of the batch are written, so each (row, slot) gets one
value), and labels present in the batch are never evicted by it (the reference could evict a pooled label
earlier in the same batch and re-insert it). A batch with more distinct labels than Q is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from facescale.errors import InputError
from facescale.heads.block_init import fill_blocks
from facescale.heads.sampling import derive_seed

INIT_BLOCK_SLOTS = 4096  # the random init is drawn per block of global slots: identical for any sharding
_INIT_SALT = 0xDC9
_NEVER = torch.iinfo(torch.int64).max


class PoolTooSmallError(InputError, ValueError):
    """One gathered batch holds more distinct labels than the pool (or pool shard) has slots."""

    default_fix = "raise head.f2c.queue_size or lower the batch per rank"


def init_pool_rows(first_slot: int, count: int, dim: int, seed: int) -> Tensor:
    """[2, count, dim] rows of global slots [first_slot, first_slot + count): uniform [0, 1), normalised."""
    out = torch.empty(2, count, dim)
    stop = first_slot + count

    def fill(block: int, scratch: dict) -> None:
        if "block" not in scratch:
            scratch["block"] = torch.empty(2, INIT_BLOCK_SLOTS, dim)
        generator = torch.Generator().manual_seed(derive_seed(seed, _INIT_SALT, block))
        values = torch.rand(2, INIT_BLOCK_SLOTS, dim, generator=generator, out=scratch["block"])
        lo, hi = max(first_slot, block * INIT_BLOCK_SLOTS), min(stop, (block + 1) * INIT_BLOCK_SLOTS)
        base = block * INIT_BLOCK_SLOTS
        out[:, lo - first_slot : hi - first_slot] = values[:, lo - base : hi - base]

    fill_blocks(range(first_slot // INIT_BLOCK_SLOTS, -(-stop // INIT_BLOCK_SLOTS)), fill)
    return torch.nn.functional.normalize(out, dim=2)


@dataclass
class PoolView:
    """The pool as one pass's loss sees it: row-0 weights, mixed weights and the label -> slot lookup."""

    weight0: Tensor  # [Q, D] row 0 of every slot
    weight_mix: Tensor  # [Q, D] row 1 where the slot was refreshed by this pass, row 0 elsewhere
    refreshed: Tensor  # [Q] bool
    sorted_labels: Tensor  # [Q] slot labels ascending (-1 for empty slots first)
    sorted_slots: Tensor  # [Q] the slot of each entry of sorted_labels

    def lookup(self, labels: Tensor) -> Tensor:
        """Slot of each label, or -1 where the label is not pooled (probe lookups do not refresh recency)."""
        return lookup_slots(self.sorted_labels, self.sorted_slots, labels)


def lookup_slots(sorted_labels: Tensor, sorted_slots: Tensor, labels: Tensor) -> Tensor:
    """Vectorised label -> slot lookup by binary search over the sorted slot labels; -1 when absent."""
    labels = labels.to(sorted_labels.device, torch.int64)
    position = torch.searchsorted(sorted_labels, labels).clamp_max(sorted_labels.numel() - 1)
    hit = (sorted_labels[position] == labels) & (labels >= 0)
    return torch.where(hit, sorted_slots[position], torch.full_like(labels, -1))


class ClassPool(torch.nn.Module):
    """Q slots of the pool (all of it, or this rank's shard); see the module docstring for the semantics."""

    def __init__(self, num_slots: int, dim: int, *, seed: int, first_slot: int = 0, device=None) -> None:
        super().__init__()
        if num_slots < 1 or dim < 1:
            raise ValueError(f"a pool needs >= 1 slot and dim >= 1, got {num_slots} slots of dim {dim}")
        self.num_slots, self.dim, self.first_slot, self.seed = num_slots, dim, first_slot, seed
        slots = torch.arange(num_slots, device=device)
        self.register_buffer("features", init_pool_rows(first_slot, num_slots, dim, seed).to(device), False)
        self.register_buffer(
            "slot_label", torch.full((num_slots,), -1, dtype=torch.int64, device=device), False
        )
        self.register_buffer("last_seen", slots - num_slots, False)
        self.register_buffer("row_ptr", torch.zeros(num_slots, dtype=torch.int64, device=device), False)
        self.clock = 0
        self._sorted: tuple[Tensor, Tensor] | None = None

    def label_map(self) -> tuple[Tensor, Tensor]:
        """(sorted slot labels, their slots) for lookups, rebuilt after every committed insertion."""
        if self._sorted is None:
            self._sorted = _sorted_map(self.slot_label)
        return self._sorted

    def lookup(self, labels: Tensor) -> Tensor:
        """Slot of each label in the committed pool, or -1."""
        return lookup_slots(*self.label_map(), labels)

    def fill(self) -> int:
        """How many slots hold an identity."""
        return int((self.slot_label >= 0).sum())

    def distinct_labels(self, labels: Tensor) -> int:
        """Distinct labels in a batch (what one insertion needs in free or evictable slots)."""
        return int(torch.unique(labels).numel())

    @torch.no_grad()
    def insert(self, features: Tensor, labels: Tensor, *, commit: bool) -> PoolView:
        """Write one gathered batch of G-Net features; commit=False leaves the pool exactly as it was."""
        features = features.to(self.features.device, torch.float32)
        labels = labels.to(self.features.device, torch.int64)
        if labels.dim() != 1 or features.shape != (labels.numel(), self.dim):
            raise ValueError(
                f"insert needs features [n, {self.dim}] and labels [n], got "
                f"{tuple(features.shape)} and {tuple(labels.shape)}"
            )
        if labels.numel() == 0:
            sorted_labels, sorted_slots = self.label_map()
            none = torch.zeros(self.num_slots, dtype=torch.bool, device=labels.device)
            return PoolView(self.features[0], self.features[0], none, sorted_labels, sorted_slots)
        plan = self._plan(labels)
        rows, slots, keep = plan["rows"], plan["slots"], plan["keep"]
        if commit:
            table = self.features
            table.index_put_((rows[keep], slots[keep]), features[keep])
        else:  # the trial pass: write into a copy, so there is nothing to undo in the pool
            table = self.features.index_put((rows[keep], slots[keep]), features[keep])
        sorted_labels, sorted_slots = _sorted_map(plan["slot_label"])
        refreshed = plan["refreshed"]
        weight_mix = torch.where(refreshed[:, None], table[1], table[0])
        if commit:
            self.slot_label, self.last_seen, self.row_ptr = (
                plan["slot_label"],
                plan["last_seen"],
                plan["row_ptr"],
            )
            self.clock += labels.numel()
            self._sorted = (sorted_labels, sorted_slots)
        return PoolView(table[0], weight_mix, refreshed, sorted_labels, sorted_slots)

    def _plan(self, labels: Tensor) -> dict[str, Tensor]:
        """Slots, rows and the kept (deduplicated) writes of a batch, and the new small state tensors."""
        n, device = labels.numel(), labels.device
        unique, inverse, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
        if unique.numel() > self.num_slots:
            raise PoolTooSmallError(
                f"one gathered batch holds {unique.numel()} distinct labels but the pool has only "
                f"{self.num_slots} slots; raise head.f2c.queue_size to at least {unique.numel()}"
            )
        positions = torch.arange(n, device=device)
        first = torch.full_like(unique, n).scatter_reduce(0, inverse, positions, "amin")
        last = torch.full_like(unique, -1).scatter_reduce(0, inverse, positions, "amax")
        slot_of = self.lookup(unique)
        is_new = slot_of < 0
        new_ids = torch.nonzero(is_new).squeeze(1)
        new_ids = new_ids[torch.argsort(first[new_ids])]  # new labels in order of first sighting
        recency = self.last_seen.clone()
        recency[slot_of[~is_new]] = _NEVER  # labels of this batch are never evicted by it
        if new_ids.numel():
            victims = torch.topk(recency, new_ids.numel(), largest=False, sorted=True).indices
            slot_of = slot_of.clone()
            slot_of[new_ids] = victims  # least recently written first, as the reference LRU
        start_row = torch.where(is_new, 0, self.row_ptr[slot_of.clamp_min(0)])
        order = torch.argsort(inverse, stable=True)  # sightings grouped by label, in gather order
        group_start = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(positions)
        rank[order] = positions - group_start[inverse[order]]  # 0 for a label's first sighting, 1, 2, ...
        slot_label, last_seen, row_ptr = self.slot_label.clone(), self.last_seen.clone(), self.row_ptr.clone()
        slot_label[slot_of] = unique
        last_seen[slot_of] = self.clock + last
        row_ptr[slot_of] = (start_row + counts) % 2
        refreshed = torch.zeros(self.num_slots, dtype=torch.bool, device=device)
        refreshed[slot_of] = ~is_new | (counts >= 2)
        return {
            "rows": (start_row[inverse] + rank) % 2,
            "slots": slot_of[inverse],
            "keep": rank >= counts[inverse] - 2,  # the last two sightings: distinct rows, one value each
            "slot_label": slot_label,
            "last_seen": last_seen,
            "row_ptr": row_ptr,
            "refreshed": refreshed,
        }

    def lru_order(self) -> Tensor:
        """Pooled labels from least to most recently written (the reference LRU list, reversed)."""
        used = self.slot_label >= 0
        return self.slot_label[used][torch.argsort(self.last_seen[used])]

    def pool_state(self) -> dict[str, Tensor | int]:
        """Everything that defines the pool (features, label map, recency, row pointers, clock), cloned,
        plus its global first slot and init seed (what resharding needs to lay out empty slots)."""
        return {
            "features": self.features.detach().clone(),
            "slot_label": self.slot_label.clone(),
            "last_seen": self.last_seen.clone(),
            "row_ptr": self.row_ptr.clone(),
            "clock": self.clock,
            "first_slot": self.first_slot,
            "init_seed": self.seed,
        }

    def load_pool_state(self, state: dict) -> None:
        """Restore `pool_state()` output saved for this exact pool (same slots and dimension)."""
        expected = (2, self.num_slots, self.dim)
        if tuple(state["features"].shape) != expected:
            raise ValueError(
                f"saved pool features are {tuple(state['features'].shape)}, this pool is "
                f"{expected}; resume with the same head.f2c.queue_size, pool mode and world size"
            )
        device = self.features.device
        self.features = state["features"].to(device, torch.float32).clone()
        self.slot_label = state["slot_label"].to(device, torch.int64).clone()
        self.last_seen = state["last_seen"].to(device, torch.int64).clone()
        self.row_ptr = state["row_ptr"].to(device, torch.int64).clone()
        self.clock = int(state["clock"])
        self.seed = int(state.get("init_seed", self.seed))  # the seed the loaded pool's empty slots came from
        self._sorted = None


def _sorted_map(slot_label: Tensor) -> tuple[Tensor, Tensor]:
    sorted_labels, sorted_slots = torch.sort(slot_label, stable=True)
    return sorted_labels, sorted_slots
