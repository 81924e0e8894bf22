"""The engine's state of one request while it waits, runs and finishes."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.kv_cache import block_key
from loraplex.engine.stops import StopStringFilter
from loraplex.engine.request import GenerationRequest, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    adapter: Any  # AdapterVersion (loraplex.lora.cache) or None for the base model
    detokenizer: IncrementalDetokenizer
    stops: StopStringFilter
    sink: Any  # the caller's RequestStream: outputs go to sink.deliver on sink.loop
    index: int = 0  # which of its request's n completions it computes
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    block_table: list[int] = field(default_factory=list)
    lora_slot: int = 0  # 0 = base model; set while running
    state_slot: int = -1  # its recurrent-state slot (linear-attention models), while running
    status: Status = Status.WAITING
    generator: torch.Generator | None = None  # for seeded sampling
    arrival: float = field(default_factory=time.monotonic)
    last_token_time: float | None = None
    # (inter-token latency, generated tokens) metric children of its labels, looked up at its
    # first token: labels() takes a lock and a dict lookup, twice per token otherwise
    token_metrics: tuple | None = None
    first_scheduled: bool = False  # set once it first ran (its queue time is recorded)
    num_cached: int | None = None  # prompt tokens found in the prefix cache at admission
    _block_keys: list[bytes] = field(default_factory=list)  # of its first full blocks
    # with SamplingParams.prompt_logprobs: [i] scores prompt token i + 1 (kept through a
    # recompute, which scores only what is missing)
    prompt_scores: list[TokenLogprob] = field(default_factory=list)
    guide: Any = None  # engine.guide.Guide of a guided request
    guide_state: int = 0  # its automaton's state after the output so far
    bad_words: tuple[tuple[int, ...], ...] = ()  # SamplingParams.bad_words as token ids
    lookup: bytearray = field(default_factory=bytearray)  # its tokens, for speculation.py

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def key(self) -> tuple[str, int]:
        """Unique among the engine's sequences: a request's completions share its id."""
        return self.request_id, self.index

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def shadow(self) -> bool:
        return self.request.shadow

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt = self.request.prompt_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):  # decodes: no copy of the whole sequence
            return self.output_ids[start - len(prompt):end - len(prompt)]
        return (prompt + self.output_ids)[start:end]

    def block_keys(self, num_blocks: int, block_size: int) -> list[bytes]:
        """Prefix-cache keys (kv_cache.block_key) of its full blocks, at least the first
        `num_blocks` (the list it keeps: not to be changed)."""
        keys = self._block_keys
        while len(keys) < num_blocks:
            start = len(keys) * block_size
            keys.append(block_key(keys[-1] if keys else b"", self.adapter_label,
                                  self.token_ids(start, start + block_size)))
        return keys

    @property
    def scores_prompt(self) -> bool:
        """True while prompt logprobs were asked for and some are still missing (then its
        prompt is computed in full, not found in the prefix cache)."""
        return (self.request.sampling.prompt_logprobs is not None
                and len(self.prompt_scores) < len(self.request.prompt_ids) - 1)

    @property
    def adapter_label(self) -> str:
        return self.adapter.key if self.adapter is not None else ""

    @property
    def metric_labels(self) -> tuple[str, str]:
        """(adapter, version) labels of the engine's metrics; ("", "") = base model."""
        return (self.adapter.name, self.adapter.version) if self.adapter is not None else ("", "")


@dataclass(eq=False)
class ScheduledSeq:
    """One sequence's share of a step."""

    seq: Sequence
    num_new: int  # tokens of this sequence computed in this step, drafts included
    # speculated tokens after its last known one (engine/speculation.py): the step computes
    # them too, and the engine keeps those its sampling reproduces
    draft: tuple[int, ...] = ()

    @property
    def num_known(self) -> int:
        """Tokens computed in this step that the sequence holds (all but the drafts)."""
        return self.num_new - len(self.draft)

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token."""
        return self.seq.num_computed + self.num_known == self.seq.num_tokens

    @property
    def scored_positions(self) -> range:
        """Positions computed in this step whose logits score a prompt token not scored yet
        (position p scores token p + 1); empty unless the sequence scores its prompt."""
        seq = self.seq
        if not seq.scores_prompt:
            return range(0)
        start = max(seq.num_computed, len(seq.prompt_scores))
        return range(start, min(seq.num_computed + self.num_known, len(seq.prompt_ids) - 1))
