"""The engine: one step loop on its own thread, fed by asyncio callers.

    batch = scheduler.schedule()
    logits = runner.run(batch)
    scheduler.postprocess(batch); then score prompts, sample, append, finish

Callers submit from the event loop and get a `RequestStream`; the step thread
hands each step's outputs back with `loop.call_soon_threadsafe`. Cancellations
and new requests reach the thread through one inbox and take effect at the
next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Callable

import torch

from loraplex import cpu_kernels
from loraplex.config import EngineConfig, ModelConfig
from loraplex.engine import bad_words
from loraplex.engine.byte_regex import GuideTooLarge
from loraplex.engine.detokenizer import IncrementalDetokenizer
from loraplex.engine.guide import GuideCache, Vocabulary
from loraplex.engine.guide_compiler import ProcessCompiler
from loraplex.engine.kv_cache import BlockAllocator, blocks_needed
from loraplex.engine.request import (MAX_COMPLETIONS, FinishReason, GenerationRequest,
                                     RequestOutput, SamplingParams, TokenLogprob)
from loraplex.engine.scheduler import Scheduler
from loraplex.engine.sequence import ScheduledSeq, Sequence, Status
from loraplex.engine.speculation import NgramProposer
from loraplex.engine.stops import StopStringFilter
from loraplex.engine.threads import (default_threads, helper_executor, run_in_fresh_thread,
                                     use_threads)
from loraplex.errors import InvalidArgument, ResourceExhausted, Unavailable
from loraplex.lora.cache import AdapterCache, AdapterVersion
from loraplex.lora.store import AdapterStore
from loraplex.metrics import Metrics
from loraplex.model.attention import KVCache
from loraplex.model.linear_attention import RecurrentState
from loraplex.model.loader import LoadedModel, load_model, resolve_dtype
from loraplex.model.runner import ModelRunner
from loraplex.model import sampler

log = logging.getLogger(__name__)


class AdapterManager:
    """The management face of the adapter cache (blocking calls; run them off the loop)."""

    def __init__(self, cache: AdapterCache):
        self._cache = cache

    def list(self):
        return self._cache.list()

    def load(self, name: str, path: str | None = None):
        return self._cache.load(name, path)

    def unload(self, name: str, drain: bool = False, timeout: float = 30.0, refuse=None):
        return self._cache.unload(name, drain, timeout, refuse)

    def swap(self, name: str, path: str):
        return self._cache.swap(name, path)

    def resident_bytes(self) -> int:
        return self._cache.resident_bytes()

    def merge(self, name: str, sources, weights=None, combination_type: str = "linear",
              density: float | None = None, majority_sign_method: str = "total",
              svd_rank: int | None = None, seed: int | None = None, *, should_stop=None,
              progress=None):
        """Merge loaded adapters into a new adapter `name` (PEFT add_weighted_adapter), write
        it under the adapter root and serve it; see loraplex.lora.merge_service."""
        from loraplex.lora.merge_service import service_for

        return service_for(self._cache).merge(
            name, sources, weights, combination_type, density, majority_sign_method, svd_rank,
            seed, should_stop=should_stop, progress=progress)


class Engine:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig, adapter_root: str,
                 metrics: Metrics | None = None):
        if loaded.linear_attention and cfg.prefix_caching:
            # (a sequence's recurrent state covers all its tokens: no block can be reused)
            log.info("prefix caching is off: the model has linear-attention layers")
            cfg = replace(cfg, prefix_caching=False)
        if loaded.linear_attention and cfg.num_speculative_tokens:
            # (a recurrent state cannot take back the tokens of rejected drafts)
            log.info("speculative decoding is off: the model has linear-attention layers")
            cfg = replace(cfg, num_speculative_tokens=0)
        self.cfg = cfg
        self.threads = cfg.threads or default_threads()  # torch intra-op threads of the step loop
        self.loaded = loaded
        self.metrics = metrics or Metrics()
        self.tokenizer = loaded.tokenizer
        self.special_ids = frozenset(self.tokenizer.all_special_ids)  # (logprobs mark them)
        self.max_model_len = loaded.max_model_len
        self.model_name = loaded.name
        kv_dtype = (loaded.dtype if cfg.kv_cache_dtype == "auto"
                    else resolve_dtype(cfg.kv_cache_dtype, loaded.device))
        block_bytes = KVCache.bytes_per_block(cfg.block_size, loaded.kv_shapes, kv_dtype,
                                              loaded.values_in_keys)
        # linear-attention layers (linear_attention.py): one recurrent-state slot per running
        # sequence, out of the same memory budget
        state_bytes = cfg.max_num_seqs * RecurrentState.bytes_per_slot(loaded.linear_attention,
                                                                       loaded.dtype)
        num_blocks = (cfg.kv_cache_memory - state_bytes) // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {cfg.kv_cache_memory} B holds no block of "
                             f"{block_bytes} B" + (f" beside the linear-attention state of "
                                                   f"{cfg.max_num_seqs} sequences "
                                                   f"({state_bytes} B)" if state_bytes else "")
                             + "; raise --kv-cache-memory"
                             + (" or lower --max-num-seqs" if state_bytes else ""))
        self.kv_cache = KVCache(loaded.num_layers, num_blocks, cfg.block_size, loaded.kv_shapes,
                                kv_dtype, loaded.device, loaded.values_in_keys)
        self.recurrent = (RecurrentState(loaded.linear_attention, cfg.max_num_seqs, loaded.dtype,
                                         loaded.device) if loaded.linear_attention else None)
        if self.recurrent is not None:
            log.info("linear-attention state: %d slots, %.1f MiB in all (KV cache: %d blocks)",
                     cfg.max_num_seqs, state_bytes / 2**20, num_blocks)
        self.blocks = BlockAllocator(num_blocks, cfg.block_size)
        self.cache = AdapterCache(AdapterStore(adapter_root, cfg.max_lora_rank),
                                  loaded.lora_layers, cfg.max_gpu_adapters, cfg.max_cpu_adapters,
                                  self.metrics, base_model=loaded.name,
                                  off_text_linears=loaded.off_text_linears)
        self.adapters = AdapterManager(self.cache)
        self._guide_compiler = ProcessCompiler()  # (off the GIL of the step loop)
        # (the tokens as bytes, read now: 1.4 s for 128k tokens, not in a served step)
        self.guides = GuideCache(Vocabulary.of(self.tokenizer, loaded.vocab_size),
                                 self._guide_compiler, cpu_kernels.load())
        self._eos = tuple(sorted(loaded.eos_token_ids))
        proposer = (NgramProposer(cfg.num_speculative_tokens, cfg.prompt_lookup_max,
                                  cfg.prompt_lookup_min) if cfg.num_speculative_tokens else None)
        self.scheduler = Scheduler(cfg, self.blocks, self.cache,
                                   state_slots=self.recurrent is not None, proposer=proposer)
        self.runner = ModelRunner(loaded, self.kv_cache, cfg.block_size, cfg.lora_backend,
                                  self.cache.slot_ranks, cfg.attention_backend, self.recurrent)
        # a request's Sequences (tuple) to add | Sequence.keys (list) to cancel
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox_seqs = 0  # sequences in the inbox (for the queue limit), under its lock
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()
        self._seqs: dict[tuple[str, int], Sequence] = {}  # by Sequence.key; engine thread only
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._on_failure: Callable[[], None] | None = None
        self._batch: list[ScheduledSeq] | None = None  # the step's, once scheduled
        self.failure: str | None = None  # "the engine has failed: why" (see _fail); set once
        self._step_started: float | None = None  # monotonic; None between steps (busy_for)
        self.steps = 0
        self._preemptions_seen = 0
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}  # engine thread only
        self._loader = helper_executor("loraplex-adapter-load")  # hot-loads for requests

    @classmethod
    def build(cls, model_cfg: ModelConfig, engine_cfg: EngineConfig, adapter_root: str,
              metrics: Metrics | None = None) -> Engine:
        def build() -> Engine:
            loaded = load_model(model_cfg, engine_cfg.max_gpu_adapters, engine_cfg.max_lora_rank,
                                engine_cfg.lora_dtype)
            return cls(loaded, engine_cfg, adapter_root, metrics)
        # not on the caller's thread: its OpenMP pool would outlive the load (see threads.py)
        return run_in_fresh_thread(build, engine_cfg.threads or default_threads(), "loraplex-load")

    # ---- lifecycle ---------------------------------------------------------------

    def start(self, on_failure: Callable[[], None] | None = None) -> None:
        """Start the step loop. `on_failure()` is called on the engine thread when the
        engine gives up (`max_step_failures` failed steps in a row, a CUDA error, the loop
        itself raising): `failure` then says why, and every request is refused."""
        if self._thread is None:
            self._stopping = False
            self._on_failure = on_failure
            self._thread = threading.Thread(target=self._loop, name="loraplex-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the step loop; False if it did not end within `timeout` (a hung step: the
        thread is a daemon, so the process can still exit)."""
        self._stopping = True
        self._wake.set()
        self._guide_compiler.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def busy_for(self) -> float:
        """Seconds the current step has run (0 between steps); read from any thread, to
        tell a hung step (a GPU that never returns) from a slow one."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    # ---- submission (event loop) -------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Validate a request and return its stream (queued once iterated, after its
        adapter is acquired; with n > 1, one sequence per completion); raises
        LoraplexError naming what to fix."""
        if self.failure is not None:
            raise Unavailable(f"{self.failure}; this replica is stopping, retry on another")
        if self._thread is None or self._stopping:
            raise Unavailable("the engine is not running; retry on another replica")
        self.validate(request)
        if request.n > self.cfg.max_queue:  # (no retry would fit it)
            raise InvalidArgument(f"n = {request.n} is more than the queue holds "
                                  f"({self.cfg.max_queue} requests); lower n")
        waiting = len(self.scheduler.waiting) + self._inbox_seqs
        if waiting + request.n > self.cfg.max_queue:
            adds = f" and this request adds {request.n}" if request.n > 1 else ""
            raise ResourceExhausted(f"{waiting} requests are already waiting{adds} (limit "
                                    f"{self.cfg.max_queue}); retry later")
        if not request.request_id:
            request = replace(request, request_id=f"req-{next(self._ids)}")
        return RequestStream(self, request, asyncio.get_running_loop())

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` adds to decoded text; a special token's own text (logprobs
        name their tokens with it)."""
        data = self.guides.vocabulary.by_id.get(token_id)
        if data is None:
            text = self.tokenizer.convert_ids_to_tokens(token_id)
            data = text.encode() if isinstance(text, str) else b""
        return data

    def prepare_guide(self, params: SamplingParams) -> None:
        """Check `params` and compile its guide, if any, so that `submit` finds it compiled.
        It waits for the compile in a child process (tens of ms for a big schema): call this
        off the event loop, before `submit` (raises InvalidArgument as `submit` would)."""
        params.validate(self.loaded.vocab_size)
        if params.guide:
            self.guides.get(params.guide)

    def validate(self, request: GenerationRequest) -> None:
        ids = request.prompt_ids
        if not ids:
            raise InvalidArgument("the prompt is empty; send at least one token")
        vocab = self.loaded.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidArgument(f"prompt token ids must be in [0, {vocab})")
        if not 1 <= request.n <= MAX_COMPLETIONS:
            raise InvalidArgument(f"n must be in [1, {MAX_COMPLETIONS}], got {request.n}")
        request.sampling.validate(vocab)
        params = request.sampling
        if params.guide:  # (InvalidArgument for a pattern or schema that does not compile)
            self.guides.get(params.guide)
        if (params.allowed_token_ids and params.min_tokens
                and set(params.allowed_token_ids) <= set(self._stop_ids(params))):
            raise InvalidArgument("every allowed_token_ids is a stop or EOS token, which "
                                  "min_tokens bans: allow another token or drop min_tokens")
        limit = self.max_model_len
        if len(ids) >= limit:
            raise InvalidArgument(f"the prompt has {len(ids)} tokens; the model's context is "
                                  f"{limit} tokens, and at least one must be left to generate")
        total = len(ids) + request.sampling.max_new_tokens
        if total > limit:
            raise InvalidArgument(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({request.sampling.max_new_tokens}) "
                f"= {total} exceeds the context of {limit}; lower max_new_tokens to "
                f"{limit - len(ids)} or less")
        if blocks_needed(total, self.cfg.block_size) > self.blocks.num_blocks:
            raise InvalidArgument(
                f"{total} tokens need more KV cache than the server has "
                f"({self.blocks.num_blocks * self.cfg.block_size} tokens); lower max_new_tokens")

    def _enqueue(self, request: GenerationRequest, adapters: list[AdapterVersion | None],
                 sink: RequestStream) -> None:
        """Queue the request's n sequences, one per completion, each holding its adapter
        (`adapters[i]`), as one inbox item: they join the same step, where the first to
        compute the prompt's full blocks shares them with the others (prefix caching)."""
        key = request.sampling.guide
        guide = self.guides.get(key) if key else None  # (one for the n completions)
        banned_words = bad_words.token_sequences(self.tokenizer, request.sampling.bad_words)
        seqs = []
        for index, adapter in enumerate(adapters):
            one = replace(request, sampling=request.sampling.for_completion(index))
            seq = Sequence(request=one, adapter=adapter, sink=sink, index=index,
                           detokenizer=IncrementalDetokenizer(
                               self.tokenizer, one.prompt_ids,
                               skip_special_tokens=not one.sampling.keep_special_tokens),
                           stops=StopStringFilter(one.sampling.stop,
                                                  one.sampling.include_stop_str_in_output))
            if one.sampling.seed is not None:
                seq.generator = torch.Generator().manual_seed(one.sampling.seed)
            if guide is not None:
                seq.guide, seq.guide_state = guide, guide.start
            seq.bad_words = banned_words
            seqs.append(seq)
        with self._inbox_lock:
            self._inbox_seqs += len(seqs)
        self._inbox.put(tuple(seqs))
        self._wake.set()

    def _abort(self, request_id: str, n: int) -> None:
        """Cancel the n sequences of a request (those not finished yet)."""
        self._inbox.put([(request_id, index) for index in range(n)])
        self._wake.set()

    # ---- the step loop (engine thread) -------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        use_threads(self.threads)
        failed_steps = 0  # in a row
        while not self._stopping:
            try:
                failed_steps = self._turn(failed_steps)
            except Exception as exc:  # raised outside a step (its bookkeeping): give up
                log.exception("the engine loop raised outside a step")
                if self.failure is None:
                    self._fail(f"the engine has failed: its loop raised {type(exc).__name__}")
                else:  # (no hot loop of tracebacks while the server stops)
                    self._wake.wait(0.5)
            self._flush_outputs()
        self._drain_inbox()
        if self.failure is not None:
            self._refuse_all()
        for seq in list(self._seqs.values()):
            self._finish(seq, FinishReason.CANCELLED, "the server is shutting down")
        self._flush_outputs()

    def _turn(self, failed_steps: int) -> int:
        """One pass of the loop: new requests and cancellations in, one step; returns the
        steps failed in a row since."""
        self._drain_inbox()
        if self.failure is not None:  # requests accepted before the failure end at once
            self._refuse_all()
        self._expire_deadlines()
        if not self.scheduler.has_work():
            self._flush_outputs()
            self._wake.wait(0.5)
            self._wake.clear()
            return failed_steps
        self._batch = None
        self._step_started = time.monotonic()
        try:
            return 0 if self.step() else failed_steps
        except Exception as exc:  # a bug, not bad input: fail the batch, keep serving
            self.scheduler.abandon_step()
            failed_steps += 1
            self.metrics.step_failures.inc()
            log.exception("engine step failed (%d in a row); finishing its requests with an "
                          "error", failed_steps)
            in_step = ([s for s in self._seqs.values() if s not in self.scheduler.waiting]
                       if self._batch is None else [item.seq for item in self._batch])
            for seq in in_step:
                if seq.key in self._seqs:  # (not finished by the step already)
                    self._finish(seq, FinishReason.ERROR, "internal engine error (a server "
                                 "bug, logged; retrying the request may succeed)")
            # a CUDA error (illegal access, device-side assert) poisons the context for good
            sticky = isinstance(exc, getattr(torch, "AcceleratorError", ()))
            if sticky or failed_steps >= self.cfg.max_step_failures:
                self._fail(f"the engine has failed: its steps raised, {failed_steps} in a "
                           f"row, the last {type(exc).__name__}")
            return failed_steps
        finally:
            self._step_started = None

    def _fail(self, reason: str) -> None:
        """Give up: `on_failure` tells the server to stop serving, and every request ends
        (`_refuse_all`), now and at each later pass (if one release raises here, the loop
        catches it and the next pass ends the rest)."""
        self.failure = reason
        log.error("%s; it refuses every request from now on", reason)
        if self._on_failure is not None:
            try:
                self._on_failure()
            except Exception:  # noqa: BLE001  (e.g. the server's event loop is closed)
                log.exception("on_failure raised")
        self._refuse_all()

    def _refuse_all(self) -> None:
        """After a failure: requests that made no token end UNAVAILABLE (retry elsewhere),
        the others with an error (INTERNAL)."""
        for seq in list(self._seqs.values()):
            self._finish(seq, FinishReason.ERROR if seq.output_ids else FinishReason.UNAVAILABLE,
                         f"{self.failure}; retry on another replica")

    def step(self) -> bool:
        """One forward pass over the scheduled batch; False when nothing could run."""
        batch = self.scheduler.schedule()
        if not batch:
            self._wake.wait(0.01)  # waiting only for a slot or blocks held by nobody running
            self._wake.clear()
            return False
        self._batch = batch  # for the failure handler
        self._record_batch(batch)
        sampling = [item for item in batch if item.samples]
        scoring = [(item.seq, item.scored_positions) for item in batch if item.scored_positions]
        step_logits = self.runner.run(batch)
        self.scheduler.postprocess(batch)
        for (seq, positions), scores in zip(scoring, step_logits.scored):
            targets = seq.prompt_ids[positions.start + 1:positions.stop + 1]
            seq.prompt_scores += sampler.token_logprobs(
                scores, targets, [seq.request.sampling.prompt_logprobs] * len(targets))
        self._sample(sampling, step_logits.sampled)
        self.steps += 1
        self.metrics.preemptions.inc(self.scheduler.num_preemptions - self._preemptions_seen)
        self._preemptions_seen = self.scheduler.num_preemptions
        return True

    def _sample(self, items: list[ScheduledSeq], logits: torch.Tensor) -> None:
        """Draw and append each item's next token from logits: [Σ 1 + len(draft), vocab]
        (runner.StepLogits.sampled). An item with drafts then draws from the row of its
        first draft, and so on while each draw reproduces the draft it follows: so its
        tokens are those it would have drawn a step at a time (its generator, penalties and
        guide see them in order), and the drafts past the first miss are dropped."""
        rows = list(itertools.accumulate((1 + len(item.draft) for item in items), initial=0))
        accepted = [0] * len(items)
        pending = list(range(len(items)))  # items still drawing; each at row accepted[i]
        while pending:
            index = [rows[i] + accepted[i] for i in pending]
            drawn = self._draw([items[i].seq for i in pending],
                               logits if len(index) == len(logits) else logits[index])
            pending = [i for i, token in zip(pending, drawn)
                       if accepted[i] < len(items[i].draft) and token == items[i].draft[accepted[i]]
                       and items[i].seq.status is not Status.FINISHED]
            for i in pending:
                accepted[i] += 1
        for item, count in zip(items, accepted):
            if item.draft:
                self.metrics.draft_tokens.inc(len(item.draft))
                self.metrics.accepted_draft_tokens.inc(count)
                if item.seq.status is not Status.FINISHED:
                    self.scheduler.accept_drafts(item.seq, count)

    def _draw(self, sampling: list[Sequence], logits: torch.Tensor) -> list[int | None]:
        """Sample and append one token for each of `sampling` from its row of logits:
        [len(sampling), vocab]; None for a guided sequence that ended instead."""
        drawn: list[int | None] = [None] * len(sampling)
        order = list(range(len(sampling)))
        masks = [None] * len(sampling)
        if any(s.guide is not None for s in sampling):
            started = time.perf_counter()
            masks = [self._guide_mask(s) for s in sampling]  # (ends the guided rows stuck)
            self.metrics.guide_mask_time.observe(time.perf_counter() - started)
            kept = [i for i, s in enumerate(sampling) if s.status is not Status.FINISHED]
            if len(kept) < len(sampling):
                sampling, masks, logits, order = [sampling[i] for i in kept], \
                    [masks[i] for i in kept], logits[kept], kept
        if sampling:
            tokens = sampler.sample(logits, [s.request.sampling for s in sampling],
                                    [sampler.RowContext(s.prompt_ids, s.output_ids,
                                                        self._banned(s), s.generator, mask)
                                     for s, mask in zip(sampling, masks)])
            want = [s.request.sampling.logprobs or s.request.sampling.top_logprobs > 0
                    for s in sampling]
            logprobs = (sampler.token_logprobs(logits, tokens,
                                               [s.request.sampling.top_logprobs for s in sampling])
                        if any(want) else [None] * len(sampling))
            for i, seq, token, lp, w in zip(order, sampling, tokens, logprobs, want):
                self._append(seq, token, lp if w else None)
                drawn[i] = token
        return drawn

    def _record_batch(self, batch: list[ScheduledSeq]) -> None:
        now = time.monotonic()
        adapters = set()
        for item in batch:
            seq = item.seq
            adapters.add(seq.adapter_label)
            if not seq.first_scheduled:
                seq.first_scheduled = True
                self.metrics.queue_time.labels(*seq.metric_labels).observe(now - seq.arrival)
                self.metrics.prompt_tokens.labels(*seq.metric_labels).inc(len(seq.prompt_ids))
                self.metrics.prefix_cache_hit_tokens.inc(seq.num_cached)
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_cache_usage.set(self.blocks.usage())
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(sum(item.num_new for item in batch))
        self.metrics.batch_adapters.observe(len(adapters - {""}))

    def _eos_ids(self, params: SamplingParams) -> tuple[int, ...]:
        """The model's EOS ids, unless the request ignores EOS."""
        return () if params.ignore_eos else self._eos

    def _stop_ids(self, params: SamplingParams) -> tuple[int, ...]:
        """The token ids that end an output: the stop ids, and EOS unless ignored."""
        return params.stop_token_ids + self._eos_ids(params)

    def _banned(self, seq: Sequence) -> tuple[int, ...]:
        """The ids seq may not produce next: before min_tokens, what would stop it; and
        what would end one of its bad words."""
        params = seq.request.sampling
        stops = () if len(seq.output_ids) >= params.min_tokens else self._stop_ids(params)
        if not seq.bad_words:
            return stops
        return stops + tuple(bad_words.banned_next(seq.bad_words, seq.output_ids))

    def _guide_mask(self, seq: Sequence) -> torch.Tensor | None:
        """[vocab] bool: the tokens a guided sequence may produce next (None unguided). A
        guide that cannot go on ends its sequence (INVALID) and returns None."""
        if seq.guide is None:
            return None
        try:
            mask = seq.guide.mask(seq.guide_state, self._eos_ids(seq.request.sampling))
        except GuideTooLarge as exc:
            self._finish(seq, FinishReason.INVALID, _too_large(exc))
            return None
        if not mask.any():
            self._finish(seq, FinishReason.INVALID, "guided decoding stopped: no token of the "
                         "vocabulary continues the output toward a match of the pattern")
            return None
        return mask

    @staticmethod
    def _advance_guide(seq: Sequence, token: int) -> tuple[bool, str]:
        """Move a guided sequence's automaton past `token`: (whether its output is now a
        match nothing can extend, why the guide cannot go on or "")."""
        if seq.guide is None:
            return False, ""
        try:
            seq.guide_state = seq.guide.advance(seq.guide_state, token)
            return seq.guide.is_final(seq.guide_state), ""
        except GuideTooLarge as exc:
            return False, _too_large(exc)

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        now = time.monotonic()
        label, labels = seq.adapter_label, seq.metric_labels
        if seq.last_token_time is None:
            self.metrics.time_to_first_token.labels(*labels).observe(now - seq.arrival)
            seq.token_metrics = (self.metrics.inter_token_latency.labels(*labels),
                                 self.metrics.generated_tokens.labels(*labels))
        else:
            seq.token_metrics[0].observe(now - seq.last_token_time)
        seq.last_token_time = now
        seq.output_ids.append(token)
        seq.token_metrics[1].inc()
        params = seq.request.sampling
        ending = token in params.stop_token_ids or (
            not params.ignore_eos and token in self.loaded.eos_token_ids)
        # (a kept special token is text, but not the one that ends the output)
        piece = "" if ending and params.keep_special_tokens else seq.detokenizer.add(token)
        text, hit_stop = seq.stops.feed(piece, armed=len(seq.output_ids) >= params.min_tokens)
        matched, error = self._advance_guide(seq, token)
        reason = None
        if error:
            reason = FinishReason.INVALID
        elif hit_stop or matched or ending:
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None and not hit_stop:  # what the stop filter, then the
            text += seq.stops.flush() + seq.detokenizer.flush()  # detokenizer held back
        out = RequestOutput(
            request_id=seq.request_id, token_ids=(token,), text=text, adapter=label,
            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
            logprobs=(logprob,) if logprob is not None else (),
            prompt_logprobs=tuple(seq.prompt_scores) if len(seq.output_ids) == 1 else (),
            finish_reason=reason, error=error, index=seq.index)
        try:
            if reason is not None:  # free everything before the caller hears it finished
                self._release(seq, reason)
        finally:  # (sent even if the release raises: the caller must hear the end)
            self._send(seq, out)

    def _finish(self, seq: Sequence, reason: FinishReason, error: str = "") -> None:
        """End a sequence early (cancel, deadline, shutdown, failure) and tell its caller
        (also when the release raises)."""
        try:
            self._release(seq, reason)
        finally:
            self._send(seq, RequestOutput(
                request_id=seq.request_id, token_ids=(), text="", adapter=seq.adapter_label,
                prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
                finish_reason=reason, error=error, index=seq.index))

    def _send(self, seq: Sequence, out: RequestOutput) -> None:
        """Queue an output for its caller; `_flush_outputs` hands them over once per step."""
        self._outbox.setdefault(seq.sink.loop, []).append((seq.sink, out))

    def _flush_outputs(self) -> None:
        """One cross-thread call per event loop for all of a step's outputs (not one per
        request per token: each call writes the loop's wake-up pipe)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is gone: nobody is listening
                pass

    def _release(self, seq: Sequence, reason: FinishReason) -> None:
        self._seqs.pop(seq.key, None)  # first: a sequence is finished once, whatever
        self.scheduler.finish(seq)
        if seq.adapter is not None:
            self.cache.release(seq.adapter, served=reason in (FinishReason.STOP, FinishReason.LENGTH))
        self.metrics.e2e_latency.labels(*seq.metric_labels).observe(time.monotonic() - seq.arrival)
        self.metrics.running.set(len(self.scheduler.running))
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_cache_usage.set(self.blocks.usage())  # (its blocks are free now)

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, tuple):  # a request's sequences
                with self._inbox_lock:
                    self._inbox_seqs -= len(item)
                for seq in item:
                    self._seqs[seq.key] = seq
                    self.scheduler.add(seq)
            else:  # keys of sequences to cancel
                for key in item:
                    seq = self._seqs.get(key)
                    if seq is not None and seq.status is not Status.FINISHED:
                        self._finish(seq, FinishReason.CANCELLED)

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        for seq in [s for s in self._seqs.values()
                    if s.request.deadline is not None and s.request.deadline <= now]:
            self._finish(seq, FinishReason.DEADLINE, "the request's deadline passed")


class RequestStream:
    """Async iterator over one request's outputs. Iterating starts the request: its adapter
    is resolved (and loaded from disk if needed) off the event loop, then it is queued. With
    n > 1 the outputs of its n completions interleave, told apart by RequestOutput.index;
    the stream ends once all have finished."""

    def __init__(self, engine: Engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self._engine = engine
        self.request = request
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._started = False
        self._done = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        if self._started:
            raise RuntimeError("a RequestStream can be iterated once")
        self._started = True
        adapter = await self._acquire_adapter()
        n = self.request.n
        if adapter is not None and n > 1:  # each completion holds it
            self._engine.cache.hold_more(adapter, n - 1)
        if self._done:  # cancelled while its adapter was loading
            if adapter is not None:
                for _ in range(n):
                    self._engine.cache.release(adapter, served=False)
            return
        self._engine._enqueue(self.request, [adapter] * n, self)
        running = n
        while running:
            out = await self._queue.get()
            if out.finished:
                running -= 1
                self._done = not running
            yield out

    async def _acquire_adapter(self) -> AdapterVersion | None:
        if not self.request.adapter:
            return None
        # Resident adapters are held right here; a thread hop per request would let the
        # engine thread (holding the GIL between kernels) trickle a burst in over many steps.
        resident = self._engine.cache.acquire_resident(self.request.adapter)
        if resident is not None:
            return resident
        future = self._loop.run_in_executor(self._engine._loader, self._engine.cache.acquire,
                                            self.request.adapter)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: f.exception() is None and self._engine.cache.release(f.result(), False))
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def deliver(self, out: RequestOutput) -> None:
        """Called on the stream's own event loop."""
        self._queue.put_nowait(out)

    def cancel(self) -> None:
        """Leave the batch at the next step (no-op once finished)."""
        if self._done:
            return
        self._done = True
        if self._started:
            self._engine._abort(self.request_id, self.request.n)


def _too_large(exc: GuideTooLarge) -> str:
    return f"guided decoding stopped: {exc}; simplify the pattern"


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.deliver(out)


async def collect(stream: RequestStream) -> RequestOutput:
    """Run a stream to the end and fold its deltas into one RequestOutput."""
    tokens, text, logprobs, prompt_logprobs, last = [], [], [], [], None
    async for out in stream:
        tokens.extend(out.token_ids)
        text.append(out.text)
        logprobs.extend(out.logprobs)
        prompt_logprobs.extend(out.prompt_logprobs)
        last = out
    return replace(last, token_ids=tuple(tokens), text="".join(text), logprobs=tuple(logprobs),
                   prompt_logprobs=tuple(prompt_logprobs))

