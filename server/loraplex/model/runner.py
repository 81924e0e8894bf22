"""Turn a scheduled batch into tensors, run the model once, return logits.

The batch is packed into one row: decodes (one new token each) first, then the
prefill chunks. Every token carries its position, its KV-cache slot and its
sequence's LoRA slot. Logits are computed only where a sequence samples
(the last token of a finished prefill, or a decode, and each of a decode's draft tokens:
speculative decoding) or scores its prompt. A decode with drafts is packed as one decode
row per token, each attending to the cache up to its own position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.engine.kv_cache import blocks_needed
from loraplex.engine.sequence import ScheduledSeq
from loraplex.lora.ops import choose_backend
from loraplex.model.attention import (AttentionBatch, DecodeGroup, KVCache, PrefillSeq,
                                       attention_step, choose_decode_attention, group_decodes)
from loraplex.model.linear_attention import RecurrentBatch, RecurrentState
from loraplex.model.loader import LoadedModel


@dataclass
class StepLogits:
    # [Σ 1 + len(draft) over the items whose `samples` is True, vocab], in batch order
    sampled: torch.Tensor
    scored: list[torch.Tensor]  # per item with `scored_positions`, in batch order: [len, vocab]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, kv_cache: KVCache, block_size: int,
                 lora_backend: str, slot_ranks: list[int], attention_backend: str = "auto",
                 recurrent: RecurrentState | None = None):
        if lora_backend == "triton" and loaded.device.type != "cuda":
            raise ValueError("lora_backend 'triton' runs on CUDA only; the model is on "
                             f"{loaded.device}: use 'auto'")
        self.loaded = loaded
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.lora_delta = choose_backend(lora_backend, loaded.device, loaded.dtype,
                                         loaded.lora_dtype)
        # the CPU kernel attends each decode to its own length: one group holds them all
        self.decode_kernel = choose_decode_attention(attention_backend, loaded.device,
                                                     loaded.dtype, kv_cache.k[0].dtype)
        self.slot_ranks = slot_ranks  # rank of the adapter in each slot (0 = empty), kept by the cache
        self.recurrent = recurrent  # linear-attention layers' state (Sequence.state_slot)

    def _cache_slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end) of a sequence."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> StepLogits:
        """Run one forward pass; returns the logits of the sampling sequences and of the
        prompt positions being scored."""
        # Decodes first, each group sorted by adapter slot: then a slot's tokens usually
        # sit side by side and the LoRA kernels read them in place (see Segments). A decode
        # with drafts is a run of decode rows, each attending up to its own position.
        decodes = sorted((s for s in batch if s.num_known == 1), key=lambda s: s.seq.lora_slot)
        prefills = sorted((s for s in batch if s.num_known > 1), key=lambda s: s.seq.lora_slot)
        ordered = decodes + prefills
        device = self.loaded.device

        ids, positions, lora_slots, slot_mapping = [], [], [], []
        prefill_seqs, decode_tables, decode_lens, first_row, offset = [], [], [], {}, 0
        for item in ordered:
            seq, start = item.seq, item.seq.num_computed
            end = start + item.num_new
            ids.extend(seq.token_ids(start, start + item.num_known))
            ids.extend(item.draft)
            positions.extend(range(start, end))
            lora_slots.extend([seq.lora_slot] * item.num_new)
            slot_mapping.extend(self._cache_slots(seq.block_table, start, end))
            table = seq.block_table[:blocks_needed(end, self.block_size)]
            if item.num_known > 1:
                prefill_seqs.append(PrefillSeq(offset, item.num_new, end,
                                               torch.tensor(table, device=device)))
            else:
                decode_tables += [table] * item.num_new
                decode_lens += range(start + 1, end + 1)
            first_row[id(item)] = offset
            offset += item.num_new
        # Kept rows follow the caller's batch order, not the packed order; a sequence with
        # drafts keeps the row of its last known token and one per draft.
        keep = [row for item in batch if item.samples
                for row in range(first_row[id(item)] + item.num_known - 1,
                                 first_row[id(item)] + item.num_new)]
        num_sampled, scored_sizes = len(keep), []
        for item in batch:
            scored = item.scored_positions
            if scored:
                row = first_row[id(item)] - item.seq.num_computed
                keep.extend(range(row + scored.start, row + scored.stop))
                scored_sizes.append(len(scored))

        if self.decode_kernel is None and device.type == "cpu":  # (on a GPU a call costs
            groups = group_decodes([len(t) for t in decode_tables])  # more than padding)
        else:
            groups = [list(range(len(decode_tables)))] if decode_tables else []
        attn = AttentionBatch(
            cache=self.kv_cache, slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            decode_groups=[self._decode_group(g, decode_tables, decode_lens) for g in groups],
            prefills=prefill_seqs, decode_kernel=self.decode_kernel,
            recurrent=self._recurrent_batch(ordered))
        self._set_lora(lora_slots)
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
        position_ids = torch.tensor([positions], dtype=torch.long, device=device)  # [1, T]
        with attention_step(attn):
            out = self.loaded.model(input_ids=input_ids, position_ids=position_ids,
                                    use_cache=False, logits_to_keep=torch.tensor(
                                        keep, dtype=torch.long, device=device))
        logits = out.logits[0]  # [len(keep), vocab]
        return StepLogits(logits[:num_sampled],
                          list(logits[num_sampled:].split(scored_sizes)) if scored_sizes else [])

    def _decode_group(self, rows: list[int], tables: list[list[int]],
                      lens: list[int]) -> DecodeGroup:
        """The decodes at `rows` (ascending) of the packed batch."""
        width = max(len(tables[i]) for i in rows)
        blocks = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in rows],
                              dtype=torch.long).view(len(rows), width)  # [Dg, Bmax]
        device = self.loaded.device
        every = len(rows) == len(tables)  # then rows == 0..D-1: attention slices, no index
        return DecodeGroup(rows=None if every else torch.tensor(rows, device=device),
                           blocks=blocks.to(device),
                           lens=torch.tensor([lens[i] for i in rows], device=device))

    def _recurrent_batch(self, ordered: list[ScheduledSeq]) -> RecurrentBatch | None:
        """The state slots of the packed batch (decodes first); a sequence at position 0
        (new, or recomputed after a preemption) starts from a cleared slot."""
        if self.recurrent is None:
            return None
        starting = [item.seq.state_slot for item in ordered if item.seq.num_computed == 0]
        if starting:
            self.recurrent.clear(starting)
        decodes = [item.seq.state_slot for item in ordered if item.num_new == 1]
        chunks = ordered[len(decodes):]
        slots = torch.tensor(decodes + [item.seq.state_slot for item in chunks], dtype=torch.long,
                             device=self.loaded.device)  # (one copy to the device a step)
        prefills, row = [], len(decodes)
        for i, item in enumerate(chunks, len(decodes)):
            prefills.append((row, item.num_new, slots[i:i + 1]))
            row += item.num_new
        return RecurrentBatch(self.recurrent, slots[:len(decodes)], prefills)

    def _set_lora(self, lora_slots: list[int]) -> None:
        layers = self.loaded.lora_layers.values()
        self.loaded.lora_plan.start_step(torch.tensor(lora_slots, dtype=torch.long),  # [T]
                                         self.slot_ranks, self.lora_delta, self.loaded.device,
                                         {layer.active_slots for layer in layers})
