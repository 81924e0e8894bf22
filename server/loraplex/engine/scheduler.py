"""Which sequences run in the next forward pass, and how many tokens each.

Iteration-level batching with one token budget per step (as vLLM v1):
running sequences go first, oldest first (a decode needs one token, an
unfinished prefill its next chunk); then waiting sequences are admitted in
arrival order while the budget, the sequence limit, KV blocks and adapter slots
allow (both orders by priority first, see below). A batch is formed only when every
adapter in it holds a slot, so the model never runs out of slots. When the KV cache
is full, the newest running sequence is preempted: its blocks are freed and it is
recomputed later.

With prefix caching (EngineConfig.prefix_caching), a sequence being admitted first takes
the cached blocks of its longest known prefix (same tokens, same adapter version; see
kv_cache) and computes only the rest; each block a step is to fill is remembered as the
step is scheduled, so a sequence admitted after it in the same step finds it. The last
known token is always computed, never found: it yields the logits the next token is
drawn from, and no shared block is ever written. A sequence that asked for prompt
logprobs computes its whole prompt (found blocks would give no logits to score it with).

Priorities (`GenerationRequest.priority`, lower first): sequences wait in priority order,
arrival order within one, and run in priority order, admission order within one; so a
sequence that must be preempted to let another grow is one of the lowest priority, the
newest among them. A running sequence is never preempted to admit a waiting one.

A model with linear-attention layers (`state_slots`) keeps a recurrent state per running
sequence: a sequence takes a free state slot as it starts running and gives it back when
it is preempted or finished; there are max_num_seqs of them, so one is always free.

Speculative decoding (EngineConfig.num_speculative_tokens, a `proposer`): once the batch
is formed, each decode may add draft tokens (engine/speculation.py) from what is left of
the token budget and of the free KV blocks, so drafts never keep a sequence waiting nor
preempt one. After the step the engine keeps the drafts its sampling reproduced
(`accept_drafts`): the blocks only the others used go back, and what they wrote in a
kept block is overwritten by later steps.

Shadow sequences (mirrored canary traffic, `GenerationRequest.shadow`) yield to
real work: they are admitted only when no real request is left waiting, and a
running shadow is the first victim when the KV cache runs out.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from loraplex.config import EngineConfig
from loraplex.engine.kv_cache import BlockAllocator, blocks_needed
from loraplex.engine.sequence import ScheduledSeq, Sequence, Status
from loraplex.engine.speculation import NgramProposer


class SlotProvider(Protocol):
    """The adapter cache as the scheduler sees it (paired verbs, like the allocator's)."""

    def has_slot(self, adapter) -> bool: ...

    def can_pin(self, adapter) -> bool: ...

    def pin(self, adapter) -> int: ...  # -> slot index

    def unpin(self, adapter) -> None: ...

    def slot_to_drain(self): ...  # -> the adapter whose slot should take no new requests


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockAllocator, slots: SlotProvider,
                 state_slots: bool = False, proposer: NgramProposer | None = None):
        self.cfg = cfg
        self.blocks = blocks
        self.slots = slots
        self.proposer = proposer  # drafts for speculative decoding (None: off)
        # free recurrent-state slots (None: the model keeps no state)
        self.free_states = list(range(cfg.max_num_seqs))[::-1] if state_slots else None
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.cfg.max_batch_tokens
        batch: list[ScheduledSeq] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_tokens - seq.num_computed, self.cfg.prefill_chunk, budget)
            if not self._reserve(seq, num_new):
                continue  # seq itself was preempted
            self._remember(seq, num_new)
            batch.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        batch += self._admit(budget)
        if self.proposer is not None:
            self._add_drafts(batch)
        return batch

    def _add_drafts(self, batch: list[ScheduledSeq]) -> None:
        """Give each decode of the formed batch the drafts the proposer finds, as many as
        the budget left, its max_new_tokens and the free KV blocks allow."""
        budget = self.cfg.max_batch_tokens - sum(item.num_new for item in batch)
        for item in batch:
            seq = item.seq
            if budget == 0:
                return
            if item.num_new != 1 or not item.samples:
                continue
            room = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size
            limit = min(budget, seq.request.sampling.max_new_tokens - len(seq.output_ids) - 1,
                        room - seq.num_tokens)
            draft = self.proposer.propose(seq, limit)
            if draft:
                self.blocks.grow(seq.block_table, seq.num_tokens + len(draft))
                item.draft, item.num_new = draft, 1 + len(draft)
                budget -= len(draft)

    def _reserve(self, seq: Sequence, num_new: int) -> bool:
        """Grow seq's blocks for num_new tokens, preempting the newest running sequences
        if needed. False when seq itself had to be preempted."""
        while not self.blocks.can_grow(seq.block_table, seq.num_computed + num_new):
            victim = self._victim(seq)
            self.preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq.block_table, seq.num_computed + num_new)
        return True

    def _victim(self, seq: Sequence) -> Sequence:
        """Whom to preempt so that seq can grow: the newest running shadow not yet
        scheduled in this step (those after seq), else the last running sequence (of the
        lowest priority, the newest among them: see _start_running)."""
        later = self.running[self.running.index(seq):]
        return next((s for s in reversed(later) if s.shadow), later[-1])

    def _admit(self, budget: int) -> list[ScheduledSeq]:
        admitted = []
        slot_blocked = False  # once an adapter cannot get a slot, later arrivals may not take one
        draining = None  # ...nor join the slot it will get, so that slot empties (no starvation)
        real_waits = False  # a real request stays waiting: no shadow may be admitted
        skipped: list[Sequence] = []
        # real requests first, by priority (stable: arrival order within one), so a shadow
        # is only reached when none is left
        self.waiting = deque(sorted(self.waiting, key=lambda s: (s.shadow, s.priority)))
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.shadow and real_waits:
                skipped.append(seq)
                continue
            if self.cfg.prefix_caching and not seq.scores_prompt:
                self._take_cached_prefix(seq)
            num_new = min(seq.num_tokens - seq.num_computed, self.cfg.prefill_chunk, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_computed + num_new):
                self._drop_blocks(seq)
                self.waiting.appendleft(seq)
                break
            if seq.adapter is not None and (seq.adapter is draining or
                                            not self._may_pin(seq.adapter, slot_blocked)):
                if not slot_blocked and not seq.shadow:
                    draining = self.slots.slot_to_drain()
                slot_blocked = True
                real_waits = real_waits or not seq.shadow
                self._drop_blocks(seq)
                skipped.append(seq)
                continue
            seq.lora_slot = self.slots.pin(seq.adapter) if seq.adapter is not None else 0
            self.blocks.grow(seq.block_table, seq.num_computed + num_new)
            self._remember(seq, num_new)
            if seq.num_cached is None:  # its first admission (not a recompute)
                seq.num_cached = seq.num_computed
            self._start_running(seq)
            admitted.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        return admitted

    def _start_running(self, seq: Sequence) -> None:
        """Put seq in `running` after every sequence of its priority or a higher one (a
        lower value), before those of a lower one: running stays in priority order,
        admission order within one, which is the order schedule() serves it in."""
        i = len(self.running)
        while i and self.running[i - 1].priority > seq.priority:
            i -= 1
        self.running.insert(i, seq)
        seq.status = Status.RUNNING
        if self.free_states is not None:
            seq.state_slot = self.free_states.pop()

    def _stop_running(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.adapter is not None:
            self.slots.unpin(seq.adapter)
        if self.free_states is not None:
            self.free_states.append(seq.state_slot)
            seq.state_slot = -1

    def _take_cached_prefix(self, seq: Sequence) -> None:
        """Start a waiting seq (which holds no block) on the cached blocks of its prefix."""
        bs = self.blocks.block_size
        usable = (seq.num_tokens - 1) // bs  # full blocks before the last known token's
        found = self.blocks.cached_prefix(seq.block_keys(usable, bs)[:usable])
        seq.block_table.extend(found)
        seq.num_computed = len(found) * bs

    def _remember(self, seq: Sequence, num_new: int) -> None:
        """Remember the blocks that this step's num_new tokens of seq fill."""
        if not self.cfg.prefix_caching:
            return
        bs = self.blocks.block_size
        first, filled = seq.num_computed // bs, (seq.num_computed + num_new) // bs
        if filled > first:  # (a decode mostly fills none)
            keys = seq.block_keys(filled, bs)
            for i in range(first, filled):
                self.blocks.remember(seq.block_table[i], keys[i])

    def _drop_blocks(self, seq: Sequence) -> None:
        """Undo _take_cached_prefix for a seq that waits on (what it found stays cached)."""
        self.blocks.free(seq.block_table)
        seq.num_computed = 0

    def _may_pin(self, adapter, slot_blocked: bool) -> bool:
        """An adapter already in a slot may always join; a new one only when no earlier
        arrival is still waiting for a slot (so nobody starves)."""
        if self.slots.has_slot(adapter):
            return True
        return not slot_blocked and self.slots.can_pin(adapter)

    def preempt(self, seq: Sequence) -> None:
        """Free seq's KV blocks and adapter pin; it waits at the front and is recomputed."""
        self._stop_running(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed = 0
        seq.lora_slot = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: list[ScheduledSeq]) -> None:
        """Account the tokens just computed (the engine appends sampled tokens, then
        accepts drafts)."""
        for item in batch:
            item.seq.num_computed += item.num_known
        self.blocks.settle()

    def accept_drafts(self, seq: Sequence, accepted: int) -> None:
        """The step's first `accepted` drafts of seq are its tokens now (appended): their
        keys and values, computed in the step, count, and the full blocks they complete
        are remembered. The blocks past its tokens, which only the other drafts used, are
        given back (drafts take free blocks for one step only)."""
        self._remember(seq, accepted)
        seq.num_computed += accepted
        self.blocks.settle()
        keep = blocks_needed(seq.num_tokens, self.blocks.block_size)
        if len(seq.block_table) > keep:
            tail = seq.block_table[keep:]
            del seq.block_table[keep:]
            self.blocks.free(tail)

    def abandon_step(self) -> None:
        """The step raised: its blocks may hold anything, so none is found again."""
        self.blocks.forget_unsettled()

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and free everything it holds."""
        if seq in self.running:
            self._stop_running(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
