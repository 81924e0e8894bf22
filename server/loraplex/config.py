"""Every option of the server, as frozen dataclasses validated on construction.

This is the only place options live. The CLI parses flags, a config file and
environment variables once at start and builds these objects; no other option
comes from the environment (only OMP_NUM_THREADS, XDG_CACHE_HOME and CC are read,
when used: engine/threads.py, cpu_kernels.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

QUANTIZE_CHOICES = ("nf4", "fp4", "int8", "none")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
LORA_BACKENDS = ("auto", "loop", "gather", "grouped", "segmented", "bgmv", "triton")
ATTENTION_BACKENDS = ("auto", "sdpa", "cpu")
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic",
                     "qwen3_coder")  # (openai_tools.py)
REASONING_PARSERS = ("deepseek_r1", "qwen3")  # (openai_reasoning.py; vLLM's names)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
               "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str | int) -> int:
    """'512MiB' -> 536870912, '2G' -> 2000000000, 1024 -> 1024."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"cannot read size {text!r}: use e.g. 512MiB, 2GiB or a number of bytes")
    unit = (match.group(2) or "").upper().rstrip("B")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_switch(text: str) -> bool:
    """'on', 'true', 'yes', '1' -> True; 'off', 'false', 'no', '0' -> False."""
    value = {"on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(f"expected on or off, got {text!r}")
    return value


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and how to hold it."""

    path: str
    quantize: str = "none"  # nf4 | fp4 | int8 | none
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto = cuda if available else cpu
    max_model_len: int = 0  # 0 = the model's max_position_embeddings

    def __post_init__(self):
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        if self.max_model_len < 0:
            raise ValueError("max_model_len must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the batching engine and the adapter cache."""

    max_batch_tokens: int = 2048  # tokens (prefill + decode) in one forward pass
    max_num_seqs: int = 64  # sequences in one forward pass
    prefill_chunk: int = 512  # longest slice of one prompt prefilled in one step
    kv_cache_memory: int = 256 * 2**20  # bytes for the paged KV cache
    kv_cache_dtype: str = "auto"  # of the cached keys and values: auto = the model's dtype
    block_size: int = 16  # tokens per KV block
    prefix_caching: bool = True  # share the KV blocks of equal prefixes (same adapter version)
    max_gpu_adapters: int = 16  # adapter slots next to the base model
    max_cpu_adapters: int = 64  # adapters kept in host memory (LRU)
    max_lora_rank: int = 64
    lora_dtype: str = "auto"  # adapter weights in their slots: auto = the model's dtype
    max_queue: int = 1024  # waiting requests before RESOURCE_EXHAUSTED
    lora_backend: str = "auto"
    attention_backend: str = "auto"  # decode: "auto" (the CPU kernel for fp32, bf16), "sdpa", "cpu"
    threads: int = 0  # torch threads of the step loop on CPU (0: OMP_NUM_THREADS, else one per CPU)
    max_step_failures: int = 3  # consecutive failed steps after which the engine gives up
    step_timeout: float = 300.0  # seconds one step may take before the server gives up (0: never)
    # speculative decoding by prompt lookup (engine/speculation.py): drafts per decode step
    num_speculative_tokens: int = 0  # 0: off
    prompt_lookup_max: int = 4  # longest n-gram of the last tokens looked up earlier
    prompt_lookup_min: int = 2  # shortest

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_num_seqs", "prefill_chunk", "kv_cache_memory",
                     "block_size", "max_gpu_adapters", "max_cpu_adapters", "max_lora_rank",
                     "max_queue", "max_step_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.step_timeout == 0 or 1 <= self.step_timeout < float("inf")):
            raise ValueError(f"step_timeout must be 0 (no limit) or at least 1 s, got "
                             f"{self.step_timeout}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0 (0: off), got "
                             f"{self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max, "
                             f"got {self.prompt_lookup_min} and {self.prompt_lookup_max}")
        if self.prefill_chunk > self.max_batch_tokens:
            raise ValueError("prefill_chunk must not exceed max_batch_tokens")
        if self.max_num_seqs > self.max_batch_tokens:
            raise ValueError("max_num_seqs must not exceed max_batch_tokens")
        if self.max_cpu_adapters < self.max_gpu_adapters:
            raise ValueError("max_cpu_adapters must be >= max_gpu_adapters")
        if self.lora_backend not in LORA_BACKENDS:
            raise ValueError(f"lora_backend must be one of {LORA_BACKENDS}")
        if self.lora_dtype not in DTYPE_CHOICES:
            raise ValueError(f"lora_dtype must be one of {DTYPE_CHOICES}, got {self.lora_dtype!r}")
        if self.kv_cache_dtype not in DTYPE_CHOICES:
            raise ValueError(f"kv_cache_dtype must be one of {DTYPE_CHOICES}, got "
                             f"{self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}")


@dataclass(frozen=True)
class ServerConfig:
    """Network, security and lifecycle options of the gRPC server."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9400  # 0 disables the Prometheus endpoint
    adapter_root: str = "adapters"
    preload: tuple[tuple[str, str], ...] = ()  # (name, path relative to adapter_root)
    admin_token: str = ""  # bearer token for the Adapters and Routes services ("" = open)
    generate_token: str = ""  # bearer token for the Generation service ("" = open)
    tls_cert: str = ""
    tls_key: str = ""
    grace_period: float = 30.0  # seconds in-flight calls get after SIGTERM
    data_dir: str = ""  # where routes and the adapter registry persist ("" = nowhere)
    http_port: int = 0  # the OpenAI-compatible HTTP API (0 = off)
    served_model_name: str = ""  # the base model's name in that API ("" = the model path)
    tool_call_parser: str = ""  # how that API reads tool calls out of text ("" = none)
    reasoning_parser: str = ""  # how it reads the reasoning out of text ("" = none)
    response_store_mb: float = 256.0  # the Responses API's stored responses (0 = none kept)

    def __post_init__(self):
        if not all(0 <= p < 65536 for p in (self.port, self.metrics_port, self.http_port)):
            raise ValueError("ports must be in 0..65535")
        if self.response_store_mb < 0:
            raise ValueError(f"response_store_mb must be >= 0, got {self.response_store_mb}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.grace_period < 0:
            raise ValueError("grace_period must be >= 0")
        if self.tool_call_parser not in ("", *TOOL_CALL_PARSERS):
            raise ValueError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS} (or empty), "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser not in ("", *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {REASONING_PARSERS} (or empty), "
                             f"got {self.reasoning_parser!r}")


@dataclass(frozen=True)
class Config:
    model: ModelConfig
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
