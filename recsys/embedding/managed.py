"""Managed tables: raw ids → a fixed number of slots that admit new ids and evict stale ones.

::

    raw ids of every feature reading the table (one step)
        ├─ in the table ───────────────────────────────────────────┐
        └─ new ── counted across steps (pending, kept in checkpoints) │
               └─ seen ``admit_after`` times ─▶ admitted ────────────┤
                                   torchrec MCHManagedCollisionModule: every ``interval`` steps the
                                   admitted ids take slots, evicting by ``eviction`` (lru | lfu |
                                   decayed_lfu); the remap: id → its slot, any other id → the last
                                   slot, the shared default row
        evicted slots ─▶ the layer re-initialises their rows and their optimizer state

torchrec's remap and eviction policies do the slot bookkeeping. What it lacks and this module adds:
admission after an id was seen ``admit_after`` times across intervals (until then it reads the
default row), the evicted rows' re-initialisation (torchrec's unsharded managed collections hand a new
id the evicted id's row and optimizer state), per-slot statistics (count and last step seen) and the
pending and interval state in checkpoints (``get_extra_state``: a checkpoint mid-interval keeps the
ids admitted since the last eviction).

Example::

    managed = ManagedIds("user_id", capacity=1000, admit_after=2, eviction="lru", interval=10)
    slots = managed({"user_id": JaggedTensor(values=raw_ids, lengths=lengths)})   # ids in [0, 1000)
    managed.take_evicted()          # slots whose rows the layer must re-initialise (or None)
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor

from recsys.embedding.spec import EVICTIONS

EMPTY = torch.iinfo(torch.int64).max  # torchrec's marker of a free slot (that id can never be admitted)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _every_rank(values: Tensor) -> Tensor:
    """The ids of this step on every rank, in rank order (the ids themselves on one process): each
    rank then admits, evicts and counts alike, so the slots are the same everywhere while the table
    rows are sharded (``DistributedModelParallel``)."""
    if not _distributed():
        return values
    import torch.distributed as dist

    world, device = dist.get_world_size(), values.device  # (NCCL gathers device tensors, gloo CPU ones)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(values)], dtype=torch.int64, device=device))
    longest = int(max(int(n) for n in sizes))
    padded = torch.zeros(longest, dtype=torch.int64, device=device)
    padded[: len(values)] = values
    parts = [torch.zeros(longest, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)])


def _pack(values: Tensor) -> str:
    """int64 ids → base64 of their little-endian bytes: a plain string, which every checkpoint format
    stores and ``torch.load(weights_only=True)`` reads (an empty ``bytes`` pickles as a call it refuses)."""
    return base64.b64encode(values.detach().cpu().to(torch.int64).numpy().astype("<i8").tobytes()).decode("ascii")


def _unpack(data: str | Tensor) -> Tensor:
    if isinstance(data, Tensor):
        return data.to(torch.int64)
    return torch.from_numpy(np.frombuffer(base64.b64decode(data), dtype="<i8").astype(np.int64))


def eviction_policy(name: str) -> Any:
    """torchrec's policy for ``name``: least recently used, least frequently used (cumulative counts: a
    full table then admits only ids that beat the old counts) or frequency decayed by distance in steps."""
    if name == "lru":
        return LRU_EvictionPolicy()
    if name == "lfu":
        return LFU_EvictionPolicy()
    if name == "decayed_lfu":
        return DistanceLFU_EvictionPolicy()
    raise ValueError(f"eviction must be one of {list(EVICTIONS)}, got {name!r}")


class ManagedIds(nn.Module):
    """The slots of one managed table (see the module docstring).

    Args:
        name: the table-owning feature (for messages).
        capacity: slots, the shared default row (the last) included: the table's rows.
        admit_after: an id takes a slot once it was seen this many times (1: at once).
        eviction: ``lru``, ``lfu`` or ``decayed_lfu``.
        interval: training steps between admissions/evictions.
        pending: most not-yet-admitted ids remembered (the most frequent are kept); default 4 × capacity.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        admit_after: int = 1,
        eviction: str = "lru",
        interval: int = 1,
        pending: int | None = None,
    ) -> None:
        super().__init__()
        if capacity < 2:
            raise ValueError(f"{name}: capacity must be at least 2 (one slot plus the default row), got {capacity}")
        if admit_after < 1:
            raise ValueError(f"{name}: admit_after must be at least 1, got {admit_after}")
        self.name, self.capacity, self.admit_after, self.interval = name, capacity, admit_after, interval
        self.pending_capacity = pending or 4 * capacity
        self.mch = MCHManagedCollisionModule(
            zch_size=capacity,
            device=torch.device("cpu"),
            eviction_policy=eviction_policy(eviction),
            eviction_interval=interval,
            name=name,
        )
        self.register_buffer("slot_counts", torch.zeros(capacity, dtype=torch.int64))  # lookups since admitted
        self.register_buffer("slot_last_step", torch.full((capacity,), -1, dtype=torch.int64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("admissions", torch.zeros((), dtype=torch.int64))
        self.register_buffer("evictions", torch.zeros((), dtype=torch.int64))
        self.pending_ids = torch.zeros(0, dtype=torch.int64)  # sorted; in checkpoints via get_extra_state
        self.pending_counts = torch.zeros(0, dtype=torch.int64)
        self._restored_history: dict | None = None
        self._evicted: Tensor | None = None

    @property
    def default_slot(self) -> int:
        """The row every id without a slot reads."""
        return self.capacity - 1

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, features: dict[str, JaggedTensor]) -> dict[str, JaggedTensor]:
        """``{key: raw ids}`` → ``{key: slots}``; in training, also counts, admits and evicts."""
        if self.training and features:
            self._profile(features)
        return self.mch.remap(features)

    @torch.no_grad()
    def _profile(self, features: dict[str, JaggedTensor]) -> None:
        values = _every_rank(torch.cat([jt.values() for jt in features.values()]))
        ids, counts = torch.unique(values, return_counts=True)
        known = self._in_table(ids)
        eligible = self._admit(ids[~known], counts[~known])  # may take a slot at the interval's end
        keep = torch.isin(values, torch.cat([ids[known], eligible.to(ids.device)]))
        if int(known.sum()) + len(eligible) > self.capacity - 1:
            raise ValueError(
                f"managed table {self.name!r}: this step's {int(known.sum()) + len(eligible):,} distinct admitted "
                f"{'(over all ranks) ' if _distributed() else ''}"
                f"ids do not fit its {self.capacity - 1:,} slots (capacity {self.capacity:,}, the last slot is "
                f"the default row); raise embedding.features.{self.name}.capacity above the distinct ids of a batch"
            )
        self._restore_history()
        kept = values[keep]
        self._ensure_history(len(kept))
        mch = self.mch
        due = mch._current_iter == -1 or mch._current_iter + 1 - mch._last_eviction_iter >= self.interval
        before = self.slot_ids() if due else None  # (only a step that admits can evict)
        mch.profile({"ids": JaggedTensor(values=kept, lengths=kept.new_tensor([len(kept)]).int())})
        evicted = self.mch.evict()
        if evicted is not None and len(evicted):
            evicted = evicted[evicted != self.default_slot]  # the default row is never handed to an id
            self.slot_counts[evicted] = 0
            self.slot_last_step[evicted] = -1
            after = self.slot_ids()[evicted]
            self.admissions += int((after != EMPTY).sum())
            if before is not None:  # a free slot taken is no eviction
                self.evictions += int((before[evicted] != EMPTY).sum())
            self._evicted = evicted if self._evicted is None else torch.unique(torch.cat([self._evicted, evicted]))
            if len(self.pending_ids):  # ids admitted meanwhile (interval > 1) may have been counted again
                waiting = ~self._in_table(self.pending_ids)
                self.pending_ids, self.pending_counts = self.pending_ids[waiting], self.pending_counts[waiting]
        slots = self.mch.remap({"ids": JaggedTensor(values=values, lengths=values.new_tensor([len(values)]).int())})
        slots = slots["ids"].values()
        self.slot_counts.index_add_(0, slots, torch.ones_like(slots))
        self.slot_last_step[slots] = self.step
        self.step += 1

    def _ensure_history(self, incoming: int) -> None:
        """Room for ``incoming`` more ids in torchrec's interval history. It sizes the buffer once from
        the first batch and drops what does not fit; a first batch with few admitted ids (or a larger
        batch later) would lose sightings, so the buffers grow here, keeping what they hold."""
        mch = self.mch
        needed = mch._current_history_buffer_offset + incoming
        if mch._input_history_buffer_size >= max(needed, 1):
            return
        held = mch._current_history_buffer_offset if mch._input_history_buffer_size > 0 else 0
        old = {"ids": mch._history_accumulator[:held].clone()} if held else {}
        old |= {k: v[:held].clone() for k, v in mch._history_metadata.items()} if held else {}
        size = max(2 * needed, 1024)
        device = mch._mch_sorted_raw_ids.device
        mch._input_history_buffer_size = size
        mch._history_accumulator = torch.empty(size, dtype=torch.int64, device=device)
        for key, _, is_history in mch._eviction_policy.metadata_info:
            if is_history:
                buffer = torch.zeros(size, dtype=torch.int64, device=device)
                setattr(mch, f"_history_{key}", buffer)
                mch._history_metadata[key] = buffer
        if held:
            mch._history_accumulator[:held] = old["ids"]
            for key, buffer in mch._history_metadata.items():
                buffer[:held] = old[key]
        mch._current_history_buffer_offset = held

    def _in_table(self, ids: Tensor) -> Tensor:
        table = self.mch._mch_sorted_raw_ids
        position = torch.searchsorted(table[:-1], ids)
        return table[position] == ids

    def _admit(self, new: Tensor, counts: Tensor) -> Tensor:
        """New ids whose count, this step's plus what is pending, reached ``admit_after`` (they compete
        for slots under the eviction policy); the rest stay pending (the ``pending_capacity`` most
        frequent)."""
        if self.admit_after == 1 or len(new) == 0:
            return new
        self.pending_ids, self.pending_counts = self.pending_ids.to(new.device), self.pending_counts.to(new.device)
        if len(self.pending_ids):
            position = torch.searchsorted(self.pending_ids, new).clamp(max=len(self.pending_ids) - 1)
            seen = self.pending_ids[position] == new
            counts = counts + torch.where(seen, self.pending_counts[position], 0)
            untouched = ~torch.isin(self.pending_ids, new)
            new = torch.cat([new, self.pending_ids[untouched]])
            counts = torch.cat([counts, self.pending_counts[untouched]])
        ready = counts >= self.admit_after
        waiting, waiting_counts = new[~ready], counts[~ready]
        if len(waiting) > self.pending_capacity:
            top = torch.topk(waiting_counts, self.pending_capacity).indices
            waiting, waiting_counts = waiting[top], waiting_counts[top]
        order = torch.argsort(waiting)
        self.pending_ids, self.pending_counts = waiting[order], waiting_counts[order]
        return torch.sort(new[ready]).values

    def take_evicted(self) -> Tensor | None:
        """Slots evicted since the last call (their rows now belong to new ids), or None."""
        evicted, self._evicted = self._evicted, None
        return evicted

    # -- statistics ------------------------------------------------------------------------------
    def slot_ids(self) -> Tensor:
        """``[capacity]`` the raw id in each slot (``EMPTY`` for a free slot and the default row)."""
        out = torch.full((self.capacity,), EMPTY, dtype=torch.int64, device=self.mch._mch_sorted_raw_ids.device)
        out[self.mch._mch_remapped_ids_mapping] = self.mch._mch_sorted_raw_ids
        out[self.default_slot] = EMPTY
        return out

    def occupancy(self) -> float:
        """Share of the slots (the default row left out) that hold an id."""
        return float((self.slot_ids()[: self.default_slot] != EMPTY).sum()) / (self.capacity - 1)

    def statistics(self) -> dict[str, float]:
        return {
            "occupancy": self.occupancy(),
            "admissions": float(self.admissions),
            "evictions": float(self.evictions),
            "pending": float(len(self.pending_ids)),
        }

    # -- checkpoints -----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        """Pending ids and the current interval's history: a checkpoint mid-interval forgets nothing.
        Their lengths vary, so they travel as strings (``_pack``): a sharded (DCP) checkpoint loads tensors
        in place and would refuse a size that is not the fresh module's."""
        if self._restored_history is not None:  # restored, and no step since: what was restored
            return (
                dict(self._restored_history)
                | {"pending_ids": _pack(self.pending_ids)}
                | {"pending_counts": _pack(self.pending_counts)}
            )
        mch = self.mch
        offset = mch._current_history_buffer_offset if mch._input_history_buffer_size > 0 else 0
        history = {"ids": _pack(mch._history_accumulator[:offset] if offset else torch.zeros(0, dtype=torch.int64))}
        for key, _, is_history in mch._eviction_policy.metadata_info:
            if is_history:
                held = mch._history_metadata.get(key)
                history[key] = _pack(
                    held[:offset] if offset and held is not None else torch.zeros(0, dtype=torch.int64)
                )
        return {
            "pending_ids": _pack(self.pending_ids),
            "pending_counts": _pack(self.pending_counts),
            "history": history,
            "current_iter": int(mch._current_iter),
            "last_eviction_iter": int(mch._last_eviction_iter),
        }

    def set_extra_state(self, state: dict) -> None:
        self.pending_ids, self.pending_counts = _unpack(state["pending_ids"]), _unpack(state["pending_counts"])
        self._restored_history = state

    def _restore_history(self) -> None:
        """After a checkpoint: the interval's history and phase, once torchrec's buffers exist."""
        state, self._restored_history = self._restored_history, None
        if state is None or state["current_iter"] < 0:
            return
        mch = self.mch
        history = {k: _unpack(v) for k, v in state["history"].items()}
        mch._current_history_buffer_offset = 0
        self._ensure_history(len(history["ids"]))
        n = len(history["ids"])
        mch._history_accumulator[:n] = history["ids"][:n]
        for key, buffer in mch._history_metadata.items():
            buffer[:n] = history[key][:n]
        mch._current_history_buffer_offset = n
        mch._current_iter, mch._last_eviction_iter = state["current_iter"], state["last_eviction_iter"]
