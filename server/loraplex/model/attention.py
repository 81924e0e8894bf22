"""Attention over our paged KV cache, plugged into transformers models.

transformers lets a model call a registered attention function. We run a packed batch
(every sequence's new tokens in one row, `position_ids` restarting per sequence) inside
`attention_step(AttentionBatch(...))`, which every attention layer of that forward pass
reads. The function writes the new keys and values into the cache and attends each
sequence to its own cached context.

Sequences with one new token (decodes) are attended together in padded SDPA
calls, in groups of similar context length (`group_decodes`), so that one long
context does not pad every other decode to its length; each sequence with several
new tokens (a prefill chunk) gets its own call. For fp32 or bf16 on the CPU, a C kernel
(`decode_kernel`) attends every decode in place in the cache instead, each to its own
length, in one call.
"""

from __future__ import annotations

import ctypes
import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from loraplex import cpu_kernels, hugepages

ATTENTION_NAME = "loraplex_paged"
# what models pass to attention beside its inputs that changes nothing in it
IGNORED_OPTIONS = frozenset({"position_ids", "use_cache", "output_router_logits",
                             "output_attentions", "cache_position"})


# Per attending layer: (kv heads, key size, value size) per head. Keys and values may
# differ (DeepSeek's latent attention, latent_attention.py: keys of its latent and rotary
# key, 576, values of the latent, 512), and so may layers
# (Gemma 4: its global layers' heads are twice its sliding ones', with fewer kv heads).
KVShape = tuple[int, int, int]


class KVCache:
    """Per layer, keys [num_blocks * block_size, kv_heads, key size] and values [...,
    value size] of every cached token, shaped by `shapes` (empty for a layer not in it,
    e.g. a linear-attention one). For the layers in `values_in_keys`, whose values are
    their keys' first value-size entries (a latent attention's latent: latent_attention.py),
    the values are a view of the keys and take no memory of their own.

    Attention reads a sequence's context by copying its blocks out (`gather`) into two
    scratch buffers the cache keeps. Whole blocks: one 16-token block is one row of
    block_size * KVH * d values, and copying those rows is ~1.6x faster on CPU than
    copying token rows. Kept buffers: a fresh multi-MB tensor per layer came from glibc's
    mmap and page-faulted on first touch (18k faults, ~40% of a 32-sequence decode step
    on a 2-core CPU); the buffers only grow, to the largest context gathered so far.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int,
                 shapes: dict[int, KVShape], dtype: torch.dtype, device: torch.device,
                 values_in_keys: frozenset[int] = frozenset()):
        self.block_size = block_size
        self.values_in_keys = values_in_keys

        def zeros(layer: int, value: bool) -> torch.Tensor:  # on the CPU, on huge pages
            if layer not in shapes:  # (loraplex.hugepages)
                return torch.zeros(0, 0, 0, dtype=dtype, device=device)
            kv_heads, key_dim, value_dim = shapes[layer]
            shape = (num_blocks * block_size, kv_heads, value_dim if value else key_dim)
            if device.type != "cpu":
                return torch.zeros(shape, dtype=dtype, device=device)
            return hugepages.zeros(math.prod(shape), dtype).view(shape)
        self.k = [zeros(i, False) for i in range(num_layers)]
        self.v = [self.k[i][..., :shapes[i][2]] if i in values_in_keys else zeros(i, True)
                  for i in range(num_layers)]
        self._scratch = [torch.empty(0, dtype=dtype, device=device)
                         for _ in range(2)]  # keys, values: rows of whole blocks, flat

    @staticmethod
    def bytes_per_block(block_size: int, shapes: dict[int, KVShape], dtype: torch.dtype,
                        values_in_keys: frozenset[int] = frozenset()) -> int:
        values = sum(kv_heads * (key_dim + (0 if layer in values_in_keys else value_dim))
                     for layer, (kv_heads, key_dim, value_dim) in shapes.items())
        return block_size * values * torch.finfo(dtype).bits // 8

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks: [n] -> keys, values of those blocks of `layer`, in that order:
        [n * block_size, KVH, d] each. They live in the scratch buffers: valid until the
        next call."""
        keys = self._copy_blocks(0, self.k[layer], blocks)
        if layer in self.values_in_keys:  # the keys' first entries
            return keys, keys[..., :self.v[layer].shape[2]]
        return keys, self._copy_blocks(1, self.v[layer], blocks)

    def _copy_blocks(self, buffer: int, cache: torch.Tensor,
                     blocks: torch.Tensor) -> torch.Tensor:
        """cache [slots, KVH, d] -> its `blocks`, [n * block_size, KVH, d], in scratch buffer
        `buffer` (0: keys, 1: values)."""
        width = self.block_size * cache.shape[1] * cache.shape[2]
        rows = cache.view(-1, width)  # [num_blocks, block_size * KVH * d]
        if self._scratch[buffer].numel() < blocks.numel() * width:
            self._scratch[buffer] = rows.new_empty(blocks.numel() * width * 5 // 4)
        buf = self._scratch[buffer][:blocks.numel() * width].view(-1, width)
        torch.index_select(rows, 0, blocks, out=buf)  # (~6x faster than rows[blocks] on CPU)
        return buf.view(-1, *cache.shape[1:])


# A decode group costs about what this many padded KV blocks of one sequence cost, per
# layer (CPU, 2 threads: its gathers and SDPA call ~60 us; a block gathered and attended
# ~8 us); see group_decodes.
GROUP_COST_BLOCKS = 8


def group_decodes(num_blocks: list[int]) -> list[list[int]]:
    """Decodes (by their KV block counts) -> groups of indices, each attended in one call
    padded to its longest context, indices ascending. Walking from the longest, a new
    group starts where that saves more padded blocks than a group costs."""
    if not num_blocks:
        return []
    order = sorted(range(len(num_blocks)), key=lambda i: -num_blocks[i])
    groups, width = [[]], num_blocks[order[0]]
    for k, i in enumerate(order):
        if groups[-1] and (width - num_blocks[i]) * (len(order) - k) > GROUP_COST_BLOCKS:
            groups.append([])
            width = num_blocks[i]
        groups[-1].append(i)
    return [sorted(g) for g in groups]


@dataclass
class DecodeGroup:
    """Decodes attended together in one padded SDPA call."""

    rows: torch.Tensor | None  # [Dg] their rows in the packed batch; None: rows 0..Dg-1
    blocks: torch.Tensor  # [Dg, Bmax] block tables, padded with block 0
    lens: torch.Tensor  # [Dg] context lengths (including the new token)
    _masks: dict = field(default_factory=dict)  # (window, chunk) -> mask, memoized per step
    _fits: dict = field(default_factory=dict)  # (blocks, block_size) -> bool, see fits

    def fits(self, num_blocks: int, block_size: int) -> bool:
        """Block ids within a cache of `num_blocks`, lengths within the tables (checked
        once per step, not per layer)."""
        key = (num_blocks, block_size)
        if key not in self._fits:
            self._fits[key] = bool(
                self.blocks.dtype == self.lens.dtype == torch.int64
                and self.blocks.is_contiguous() and self.blocks.shape[0] == self.lens.numel() > 0
                and 0 <= int(self.blocks.min()) and int(self.blocks.max()) < num_blocks
                and int(self.lens.min()) >= 1
                and int(self.lens.max()) <= self.blocks.shape[1] * block_size)
        return self._fits[key]

    def mask(self, block_size: int, window: int | None,
             chunk: int | None = None) -> torch.Tensor:  # [Dg, 1, 1, W] bool
        if (window, chunk) not in self._masks:
            kpos = torch.arange(self.blocks.shape[1] * block_size, device=self.lens.device)
            qpos = (self.lens - 1).unsqueeze(1)  # [Dg, 1]
            mask = kpos.unsqueeze(0) <= qpos  # [Dg, W]: padding (and block 0) masked out
            mask &= _span(qpos, kpos.unsqueeze(0), window, chunk)
            self._masks[window, chunk] = mask[:, None, None, :]
        return self._masks[window, chunk]


def _span(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None,
          chunk: int | None) -> torch.Tensor | bool:
    """Which keys a query may see beyond causality: the last `window` positions (a sliding
    window), or those of its own `chunk`-long block (Llama 4's chunked attention)."""
    if chunk:
        return kpos // chunk == qpos // chunk
    if window:
        return qpos - kpos < window
    return True


@dataclass
class PrefillSeq:
    """One sequence with several new tokens at [start, start + length) of the packed row."""

    start: int
    length: int
    context: int  # its context after this step (positions 0..context-1), new tokens included
    blocks: torch.Tensor  # [ceil(context / block_size)] its block table


def decode_kernel(lib: ctypes.CDLL) -> Callable:
    """Decode attention by the CPU kernel (loraplex.cpu_kernels): each sequence attends to
    its own context in place in the paged cache, so one group holds every decode. A cache
    of fp32 or bf16, under a model of either (--kv-cache-dtype); the kernel takes the
    queries and sums in fp32 (a bf16 model's queries and outputs go through fp32 copies,
    D x H x d values a layer)."""
    kernels = {torch.float32: lib.paged_decode_attention,
               torch.bfloat16: lib.paged_decode_attention_bf16}

    def attend(q: torch.Tensor, cache: KVCache, layer: int, group: DecodeGroup,
               scale: float, window: int | None, chunk: int | None, softcap: float | None,
               sinks: torch.Tensor | None, out: torch.Tensor) -> None:
        """q: [D, H, d] -> out: [D, H, dv] (both contiguous, of the model's dtype; dv: the
        cached values' size); sinks: [H] logits or None."""
        k, v = cache.k[layer], cache.v[layer]  # [slots, KVH, d], [slots, KVH, dv]
        (D, H, d), bs, blocks, lens = q.shape, cache.block_size, group.blocks, group.lens
        dv, vs = v.shape[2], v.stride(1)  # vs: d where v is a view of k's first dv
        # the kernel trusts its pointers: check what it will read
        if not (q.is_contiguous() and out.is_contiguous() and out.shape == (D, H, dv)
                and q.dtype == out.dtype in kernels and k.dtype == v.dtype and k.dtype in kernels
                and k.is_contiguous() and k.shape[:2] == v.shape[:2] and dv <= vs
                and v.stride() == (v.shape[1] * vs, vs, 1)
                and (vs == dv or (vs == d and v.data_ptr() == k.data_ptr()))
                and k.shape[2] == d and H % k.shape[1] == 0 and lens.numel() == D
                and group.fits(k.shape[0] // bs, bs)):
            raise ValueError("the CPU decode-attention kernel got inconsistent inputs")
        if sinks is not None:
            sinks = sinks.float().contiguous()  # [H]
            if sinks.shape != (H,) or sinks.device.type != "cpu":
                raise ValueError("the CPU decode-attention kernel got inconsistent sinks")
        q32 = q.float()  # (q itself when fp32)
        out32 = out if out.dtype == torch.float32 else torch.empty_like(out, dtype=torch.float32)
        kernels[k.dtype](q32.data_ptr(), k.data_ptr(), v.data_ptr(), blocks.data_ptr(),
                         blocks.shape[1], lens.data_ptr(), D, H, k.shape[1], d, dv, vs, bs,
                         scale, window or 0, chunk or 0, softcap or 0.0,
                         None if sinks is None else sinks.data_ptr(), out32.data_ptr())
        if out32 is not out:
            out.copy_(out32)

    return attend


def choose_decode_attention(name: str, device: torch.device, dtype: torch.dtype,
                            kv_dtype: torch.dtype | None = None) -> Callable | None:
    """`name` from EngineConfig.attention_backend, for a model of `dtype` and a cache of
    `kv_dtype` (default: the same): the CPU kernel ("auto" where both are fp32 or bf16 on
    the CPU and it can be built, or "cpu", which raises ValueError where it cannot run), or
    None: SDPA over the gathered blocks."""
    if name == "sdpa":
        return None
    model, cache = (str(d).removeprefix("torch.") for d in (dtype, kv_dtype or dtype))
    takes = ("float32", "bfloat16")
    # the model's dtype decides, once the cache's is one the kernel takes (else a name
    # outside `takes` that says why)
    described = (model if cache in takes or cache == model
                 else f"{model} with a {cache} KV cache")
    lib = cpu_kernels.load_for(device.type, described,
                               "attention_backend 'cpu'" if name == "cpu" else "", takes)
    return None if lib is None else decode_kernel(lib)


@dataclass
class AttentionBatch:
    """What attention needs for one step; built once by the runner, read by every layer."""

    cache: KVCache
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    decode_groups: list[DecodeGroup]  # the decodes: the first tokens of the packed row
    prefills: list[PrefillSeq]
    decode_kernel: Callable | None = None  # see decode_kernel; None: SDPA
    recurrent: object = None  # linear_attention.RecurrentBatch, with linear-attention layers
    _masks: dict = field(default_factory=dict)  # (prefill, window, chunk) -> mask, per step

    def prefill_mask(self, i: int, window: int | None,
                     chunk: int | None = None) -> torch.Tensor:  # [q, context] bool
        key = (i, window, chunk)
        if key not in self._masks:
            seq = self.prefills[i]
            kpos = torch.arange(seq.context, device=seq.blocks.device)
            qpos = kpos[seq.context - seq.length:].unsqueeze(1)  # [q, 1]
            mask = kpos.unsqueeze(0) <= qpos
            mask &= _span(qpos, kpos.unsqueeze(0), window, chunk)
            self._masks[key] = mask
        return self._masks[key]


# paged_attention's sliding_window when a model passes none (as Moshi's, whose config sets
# one that HF applies in its mask alone): refused by the probe where the config has a window
NOT_PASSED = object()

@dataclass
class LayerProbe:
    """The batch of a probe forward pass (loader.probe_attention): attention records
    the layers that reach it, and the shapes of their keys and values, and returns zeros,
    writing nothing."""

    layers: set[int] = field(default_factory=set)
    shapes: dict[int, KVShape] = field(default_factory=dict)
    config_window: int | None = None  # the text config's sliding_window

    def record(self, module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, sliding_window: object,
               options: dict) -> None:
        """One attention call of the probe's forward pass (paged_attention's arguments):
        its layer and shapes recorded, or a ValueError for what loraplex's attention does
        not implement."""
        unknown = sorted(k for k, v in options.items() if k not in IGNORED_OPTIONS and v is not None)
        name = type(module).__name__
        if unknown:
            raise ValueError(f"{name} passes attention options loraplex's attention does not "
                             f"implement: {', '.join(unknown)}")
        # (transformers builds no mask for an attention function it has no mask function
        # for, as this one: a mask here is the model's own)
        if attention_mask is not None:
            raise ValueError(f"{name} passes attention a mask of its own (position biases, as "
                             "ALiBi, or a learned dynamic mask), which loraplex's attention, "
                             "building its own causal masks, does not read")
        if not getattr(module, "is_causal", True):
            raise ValueError(f"{name} attends both ways (is_causal is False: an encoder such as "
                             "BERT's, or a bidirectional option of the model's); loraplex serves "
                             "causal attention only")
        if sliding_window is NOT_PASSED and self.config_window:
            raise ValueError(f"{name} does not pass attention the sliding window of "
                             f"{self.config_window} its config sets (HF applies it in "
                             "its mask alone, which loraplex's attention does not read)")
        if not isinstance(getattr(module, "layer_idx", None), int):
            raise ValueError(f"{name} has no layer index (an attention block shared by "
                             "layers, as Zamba's); loraplex's KV cache holds keys and values "
                             "by layer")
        if module.layer_idx in self.layers:
            raise ValueError(f"{name} calls attention twice in layer {module.layer_idx} (as "
                             "DiffLlama's differential attention); loraplex's KV cache holds "
                             "one set of keys and values per layer")
        self.layers.add(module.layer_idx)
        self.shapes[module.layer_idx] = (key.shape[1], key.shape[3], value.shape[3])


_STEP: ContextVar[AttentionBatch | LayerProbe | None] = ContextVar("loraplex_attention_step",
                                                                   default=None)


@contextmanager
def attention_step(batch: AttentionBatch | LayerProbe) -> Iterator[None]:
    """The batch every attention layer reads during one forward pass of the model (in this
    thread). Not a keyword argument of `model(...)`: some HF decoder layers (StableLM's,
    Falcon's) do not pass theirs on to attention."""
    token = _STEP.set(batch)
    try:
        yield
    finally:
        _STEP.reset(token)


def current_step() -> AttentionBatch | LayerProbe | None:
    """The batch of the forward pass running in this thread (see attention_step)."""
    return _STEP.get()


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    scaling: float | None = None, dropout: float = 0.0,
                    sliding_window: int | None | object = NOT_PASSED, softcap: float | None = None,
                    s_aux: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, d], key: [1, KVH, T, d], value: [1, KVH, T, dv] -> output
    [1, T, H, dv]. `softcap` (Gemma 2's attn_logit_softcapping): the scores become
    softcap * tanh(score / softcap) before the softmax. `s_aux` (GPT-OSS's sinks, [H]): one
    more logit per head in the softmax, weighing no value. Any other option a model passes
    is refused (at load, by the probe), never ignored. The batch is the one of
    attention_step. In a latent attention layer (latent_attention.py) key is its latents
    and rotary keys, value their latents: the decodes attend over them absorbed, each
    prefill chunk expanded or absorbed (LatentProjection.expands), and the output is
    [1, T, H, v_head_dim]."""
    b = current_step()
    if b is None:
        raise RuntimeError("loraplex attention runs only inside the loraplex runner")
    latent = getattr(module, "loraplex_latent", None)  # latent_attention.LatentProjection
    H, T = query.shape[1], query.shape[2]
    dv = value.shape[3] if latent is None else latent.v  # the output's size a head
    if isinstance(b, LayerProbe):
        b.record(module, key, value, attention_mask, sliding_window, kwargs)
        return query.new_zeros(1, T, H, dv), None
    window = None if sliding_window is NOT_PASSED else sliding_window
    layer, chunk = module.layer_idx, _chunk_of(module)
    scale = scaling if scaling is not None else query.shape[3] ** -0.5
    k_cache, v_cache = b.cache.k[layer], b.cache.v[layer]  # [slots, KVH, d], [.., dv]
    k_cache.index_copy_(0, b.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    if layer not in b.cache.values_in_keys:  # (else written with the keys)
        v_cache.index_copy_(0, b.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))
    if softcap:
        def attend(q, k, v, mask, scale, expand_kv):
            return math_attention(q, k, v, mask, scale, softcap, s_aux)
    elif s_aux is not None:
        def attend(q, k, v, mask, scale, expand_kv):
            return sdpa_with_sinks(q, k, v, mask, scale, s_aux, expand_kv)
    else:
        attend = sdpa

    q = query[0]  # [H, T, d]
    out = q.new_empty(T, H, dv)  # [T, H, dv]
    decodes = sum(group.blocks.shape[0] for group in b.decode_groups)  # the first rows
    if latent is None:
        _attend_decodes(b, layer, q, out, attend, scale, window, chunk, softcap, s_aux)
    elif decodes:  # over the cached latents: the queries and outputs absorbed
        lora = latent.lora(0, decodes, q.dtype)
        q_lat = latent.queries(query[:, :, :decodes], lora)[0]  # [H, D, rank + rope]
        o_lat = q.new_empty(decodes, H, latent.rank)  # [D, H, rank]
        _attend_decodes(b, layer, q_lat, o_lat, attend, scale, window, chunk, softcap, s_aux)
        out[:decodes] = latent.outputs(o_lat.unsqueeze(0), lora)[0]
    for i, seq in enumerate(b.prefills):
        rows = slice(seq.start, seq.start + seq.length)
        kp, vp = b.cache.gather(layer, seq.blocks)  # [blocks * bs, KVH, d / dv]
        kp, vp = kp[:seq.context].to(q.dtype), vp[:seq.context].to(q.dtype)  # [L, KVH, ..]
        # (on CUDA always expanded, as vLLM's MLA prefill: absorbed, a masked chunk would
        # repeat the latents per head, sdpa's expand_kv, more than expanding holds)
        absorbed = latent is not None and not (q.is_cuda
                                               or latent.expands(seq.length, seq.context))
        lora = latent.lora(rows.start, rows.stop, q.dtype) if latent is not None else None
        if latent is None or absorbed:
            kp, vp = kp.transpose(0, 1), vp.transpose(0, 1)  # [KVH, L, d / dv]
        else:  # expanded, HF's keys and values: [H, L, nope + rope], [H, L, v]
            kp, vp = latent.expand(kp, lora)
        qp = (latent.queries(query[:, :, rows], lora)[0] if absorbed
              else q[:, rows])  # [H, q, d (or rank + rope)]
        # no cached prefix and no window cut: SDPA's own causal mask (it skips the masked
        # half: 2x faster on a 2048-token CPU prefill, and flash attention on CUDA)
        causal = (seq.context == seq.length and (not window or seq.length <= window)
                  and (not chunk or seq.length <= chunk))
        op = attend(qp.unsqueeze(0), kp.unsqueeze(0), vp.unsqueeze(0),
                    None if causal else b.prefill_mask(i, window, chunk), scale,
                    expand_kv=q.is_cuda)  # [1, H, q, dv (or rank)]
        op = op.transpose(1, 2)  # [1, q, H, ..]
        out[rows] = (latent.outputs(op, lora) if absorbed else op)[0]
    return out.unsqueeze(0), None


def _attend_decodes(b: AttentionBatch, layer: int, q: torch.Tensor, out: torch.Tensor,
                    attend: Callable, scale: float, window: int | None, chunk: int | None,
                    softcap: float | None, sinks: torch.Tensor | None) -> None:
    """q: [H, T, d] (the decodes its first rows) -> out[:D]: [D, H, dv], each decode
    attended to its cached context (the CPU kernel's or SDPA's, by decode group)."""
    for group in b.decode_groups:
        D = group.blocks.shape[0]
        qd = q[:, :D] if group.rows is None else q.index_select(1, group.rows)  # [H, D, d]
        if b.decode_kernel is not None:
            od = out[:D] if group.rows is None else q.new_empty(D, *out.shape[1:])  # [D, H, dv]
            b.decode_kernel(qd.transpose(0, 1).contiguous(), b.cache, layer, group, scale,
                            window, chunk, softcap, sinks, od)
            if group.rows is not None:
                out.index_copy_(0, group.rows, od)
            continue
        kd, vd = b.cache.gather(layer, group.blocks.view(-1))  # [D * Bmax * bs, KVH, d / dv]
        kd = kd.view(D, -1, *kd.shape[1:]).transpose(1, 2)  # [D, KVH, Bmax * bs, d]
        vd = vd.view(D, -1, *vd.shape[1:]).transpose(1, 2)
        od = attend(qd.transpose(0, 1).unsqueeze(2), kd.to(q.dtype), vd.to(q.dtype),
                    group.mask(b.cache.block_size, window, chunk), scale,
                    expand_kv=q.is_cuda).squeeze(2)  # [D, H, dv]
        if group.rows is None:
            out[:D] = od
        else:
            out.index_copy_(0, group.rows, od)


def _chunk_of(module: torch.nn.Module) -> int | None:
    """The chunk of a chunked-attention layer (Llama 4's, whose HF code says it only in its
    mask: layer_types and attention_chunk_size), else None."""
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None)
    if types and types[module.layer_idx] == "chunked_attention":
        return config.attention_chunk_size
    return None


# the most query rows a masked prefill chunk is folded into (see sdpa)
FOLD_ROWS = 1024


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
         scale: float | None, expand_kv: bool) -> torch.Tensor:
    """q: [N, H, q, d], k: [N, KVH, L, d], v: [N, KVH, L, dv] (query head h reads K/V head
    h // (H / KVH)), mask: broadcastable to [N, 1, q, L] (bool), or None for a causal mask
    (q == L) -> [N, H, q, dv].

    Grouped-query K/V are not copied per head for a decode (q == 1): the query heads of
    each K/V head become its query rows, [N, KVH, H / KVH, d], which was the fastest form
    on the CPU (32 decodes over 1,024 positions, fp32: 1.4 ms; enable_gqa 2.4 ms; K/V
    repeated per head 43 ms). A masked prefill chunk repeats K/V per head with `expand_kv`
    (on CUDA, where enable_gqa with a mask leaves only SDPA's slow math kernel, as
    transformers' use_gqa_in_sdpa says). Else, with heads wider than 128, it is folded as
    a decode, its mask repeated per query head of a K/V head: on the CPU (fp32) 4 queries
    over 4,096 positions of latent attention's one 576-wide K/V head for 16 query heads
    take 5 ms so, 16 ms with enable_gqa (64 queries: 64 ms, 91 ms; 512 queries: 592 ms,
    598 ms); 2 heads of 256 for 8, 256 queries over 2,048 positions 31 ms, 34 ms. Up to
    FOLD_ROWS folded rows: the repeated mask holds that many bytes a context position, so a
    long chunk (where folding gains nothing) passes enable_gqa. Narrower heads pass
    enable_gqa (32 of 128 over 8, 256 queries over 1,024: 30 ms either way), and with no
    mask, enable_gqa everywhere (flash attention takes it on CUDA).

    Values of another size than the keys (DeepSeek's latent attention: keys of 192, values
    of 128 expanded; 576 and 512 absorbed) are padded with zeros to the wider size, and the
    output cut back: SDPA's flash kernels take one size for both (on the CPU, as on CUDA),
    and its math kernel, where it falls back, holds every score. On the CPU, 512 queries
    over 4,096 positions, 64 heads over 8 of 192 keys and 128 values: 1,657 ms and 1.5 GiB
    more peak memory as they were, 1,229 ms and 36 MiB padded."""
    N, H, Q, d = q.shape
    kv_heads, dv = k.shape[1], v.shape[3]
    if dv != d:  # one head size, or SDPA falls back to its math kernel (see docstring)
        width = max(d, dv)  # (only the narrower side copied)
        out = sdpa(*(t if t.shape[3] == width else F.pad(t, (0, width - t.shape[3]))
                     for t in (q, k, v)), mask, scale if scale is not None else d ** -0.5,
                   expand_kv)
        return out[..., :dv]
    gqa, per_kv = H != kv_heads, H // kv_heads
    if gqa and mask is not None and (Q == 1 or (d > 128 and per_kv * Q <= FOLD_ROWS
                                                 and not expand_kv)):
        rows = mask if Q == 1 else mask.expand(N, 1, Q, mask.shape[-1]).repeat(1, 1, per_kv, 1)
        out = F.scaled_dot_product_attention(q.reshape(N, kv_heads, per_kv * Q, d), k, v,
                                             attn_mask=rows, scale=scale)  # [N, KVH, H/KVH * Q, dv]
        return out.view(N, H, Q, v.shape[3])
    if gqa and expand_kv and mask is not None:
        k = k.repeat_interleave(per_kv, dim=1)  # [N, H, L, d]
        v = v.repeat_interleave(per_kv, dim=1)
        gqa = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          scale=scale, enable_gqa=gqa)


def sdpa_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None, scale: float | None, sinks: torch.Tensor,
                    expand_kv: bool) -> torch.Tensor:
    """sdpa's contract with sinks ([H] logits, GPT-OSS's: one more column of each head's
    softmax, weighing no value), through SDPA itself: each sink is one more key, before the
    context, that every query sees. Its score comes from one more query entry (the head's
    sink / scale) against the key's 1 there (0 in every context key), and its value is 0.
    So no [N, H, q, L] scores are held, as math_attention holds them (GPT-OSS's 64 heads, a
    512-token chunk over 32,768 positions: 4 GiB in fp32), and CUDA may run flash attention
    (the entries padded to a multiple of 8)."""
    N, H, Q, d = q.shape
    kv_heads, L = k.shape[1], k.shape[2]
    scale = scale if scale is not None else d ** -0.5
    wide = d + 8 - d % 8  # d, one entry for the sink and zeros
    q1 = q.new_zeros(N, H, Q, wide)
    q1[..., :d] = q
    q1[..., d] = (sinks.float() / scale).to(q.dtype).view(1, H, 1)
    k1 = k.new_zeros(N, kv_heads, L + 1, wide)  # the sink's key first
    k1[:, :, 0, d] = 1
    k1[:, :, 1:, :d] = k
    dv = v.shape[3]
    v1 = v.new_zeros(N, kv_heads, L + 1, max(wide, dv))  # the sink's zero value first, and
    v1[:, :, 1:, :dv] = v  # as wide as the keys (one head size for SDPA: see sdpa)
    if mask is None:  # causal, Q == L
        mask = torch.ones(Q, L, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat((mask.new_ones(*mask.shape[:-1], 1), mask), dim=-1)  # [.., L + 1]
    return sdpa(q1, k1, v1, mask, scale, expand_kv)[..., :dv]


# the most scores math_attention holds at once (64 MiB of fp32); beyond, it takes the
# context in pieces
MATH_SCORES = 2 ** 24


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor | None, scale: float | None,
                   softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """sdpa's contract with what SDPA cannot do: the scores soft-capped before the softmax
    (Gemma 2: softmax(softcap * tanh(q k^T scale / softcap)) v), with sinks too where given
    ([H] logits: one more column of the softmax per head, dropped before the values;
    without a cap, sdpa_with_sinks). The math of transformers' eager attention (scores in
    q's dtype, the softmax in fp32), its [N, H, q, L] scores in memory, up to MATH_SCORES
    of them (16 heads of a 512-token chunk over 2,048 positions). Over more, the context
    is taken in pieces of that many scores, with a running (online) softmax in fp32: Gemma
    2 27B's 32 heads over 16, a 512-token chunk over 8,192 positions, grew the peak memory
    by 359 MiB so, 1,811 MiB holding every score, in about the same time (4.3 s; 4.2 to
    5.9 s, 2 CPU threads)."""
    N, H, Q, d = q.shape
    L, per_kv = k.shape[2], H // k.shape[1]
    scale = scale if scale is not None else d ** -0.5
    if mask is None:  # causal, Q == L
        mask = torch.ones(Q, L, dtype=torch.bool, device=q.device).tril()
    piece = max(1, MATH_SCORES // (N * H * Q))  # context positions at a time
    if piece < L:
        return _math_attention_in_pieces(q, k, v, mask, scale, softcap, sinks, piece)
    if per_kv > 1:
        k = k.repeat_interleave(per_kv, dim=1)  # [N, H, L, d]
        v = v.repeat_interleave(per_kv, dim=1)  # [N, H, L, dv]
    scores = q @ k.transpose(2, 3) * scale  # [N, H, Q, L]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, H, 1, 1).expand(N, H, Q, 1)
        scores = torch.cat([scores, sink], dim=-1)  # [N, H, Q, L + 1]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return weights[..., :L] @ v  # [N, H, Q, dv]


def _math_attention_in_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              mask: torch.Tensor, scale: float, softcap: float | None,
                              sinks: torch.Tensor | None, piece: int) -> torch.Tensor:
    """math_attention over `piece` context positions at a time: each piece's scores (in
    q's dtype, capped, masked) join a running max m, sum l and weighted sum of the values,
    all fp32, rescaled by exp(m_old - m_new) as the max grows."""
    N, H, Q, _ = q.shape
    L, per_kv = k.shape[2], H // k.shape[1]
    m = torch.full((N, H, Q, 1), float("-inf"), device=q.device)  # running max
    l = torch.zeros(N, H, Q, 1, device=q.device)  # running sum of exp(score - m)
    acc = torch.zeros(N, H, Q, v.shape[3], device=q.device)  # running sum of exp(..) v
    for lo in range(0, L, piece):
        kp = k[:, :, lo:lo + piece].repeat_interleave(per_kv, dim=1)  # [N, H, P, d]
        vp = v[:, :, lo:lo + piece].repeat_interleave(per_kv, dim=1)  # [N, H, P, dv]
        scores = q @ kp.transpose(2, 3) * scale  # [N, H, Q, P]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        scores = scores.float().masked_fill(~mask[..., lo:lo + piece], float("-inf"))
        new_m = torch.maximum(m, scores.amax(dim=-1, keepdim=True))
        shift = new_m.masked_fill(new_m == float("-inf"), 0.0)  # (rows that saw nothing yet)
        weights = torch.exp(scores - shift)
        rescale = torch.exp(m - shift)
        l = l * rescale + weights.sum(dim=-1, keepdim=True)
        acc = acc * rescale + weights @ vp.float()
        m = new_m
    if sinks is not None:  # one more logit per head, weighing no value
        l = l + torch.exp(sinks.float().view(1, H, 1, 1) - m)
    return (acc / l).to(q.dtype)  # [N, H, Q, dv]


def register_attention() -> None:
    """Make `attn_implementation="loraplex_paged"` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, paged_attention)
