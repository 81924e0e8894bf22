"""What goes into the engine (GenerationRequest) and what comes out (RequestOutput).

Plain dataclasses: the API layer converts protobuf to these and back; the engine
never sees protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from loraplex.errors import InvalidArgument


MAX_LOGIT_BIAS = 1024  # tokens per request
MAX_GUIDED_REGEX = 16_384  # characters of a guided_regex or guided_json
MAX_GUIDED_CHOICES = 256  # strings, each at most MAX_GUIDED_CHOICE characters
MAX_GUIDED_CHOICE = 1024
MAX_COMPLETIONS = 32  # n of one request
MAX_BAD_WORDS = 64  # words per request, each at most MAX_BAD_WORD characters
MAX_BAD_WORD = 256


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # EOS, a stop token id or a stop string
    CANCELLED = "cancelled"  # the caller went away
    DEADLINE = "deadline"  # the request's deadline passed
    ERROR = "error"  # an internal engine error (a failed step); see RequestOutput.error
    UNAVAILABLE = "unavailable"  # the engine failed before it made a token: retry elsewhere
    INVALID = "invalid"  # it cannot go on as asked (its guide outgrew its limits); see error


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # subtracted from the logit of every token in the output
    frequency_penalty: float = 0.0  # times the token's count in the output, subtracted
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest one (0 = off)
    min_tokens: int = 0  # no EOS nor stop token / string before this many new tokens
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False  # the stop string that ended it ends the text
    keep_special_tokens: bool = False  # in the text (the one that ends the output: never)
    stop_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()  # vLLM's: token sequences the output may not hold
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's
    allowed_token_ids: tuple[int, ...] = ()  # when set, the only ids it may produce
    ignore_eos: bool = False
    logprobs: bool = False  # log-probability of each chosen token
    top_logprobs: int = 0  # and of this many most likely alternatives
    # log-probability of each prompt token after the first, given those before it, with
    # this many most likely alternatives (None = off; 0 = the prompt token's alone)
    prompt_logprobs: int | None = None
    # guided decoding (engine.guide): the output fully matches this pattern, is one of
    # these strings, or is JSON that this JSON schema allows; at most one of the three
    # (and not with allowed_token_ids)
    guided_regex: str = ""
    guided_choice: tuple[str, ...] = ()
    guided_json: str = ""

    @property
    def guide(self) -> tuple[str, str | tuple[str, ...]] | None:
        """What guides the output, as the key its compiled guide is cached under
        (engine.guide.GuideCache): ("regex", pattern), ("choice", choices) or ("json",
        schema); None when unguided."""
        if self.guided_choice:
            return ("choice", self.guided_choice)
        if self.guided_json:
            return ("json", self.guided_json)
        return ("regex", self.guided_regex) if self.guided_regex else None

    def for_completion(self, i: int) -> SamplingParams:
        """These params for completion i of a request's n. It draws from seed + i (when
        seeded), so each is reproducible and they differ; only completion 0 scores the
        prompt (prompt_logprobs), so the others may take the prompt's KV blocks from the
        prefix cache, where completion 0 puts them in the same step."""
        if i == 0:
            return self
        return replace(self, seed=None if self.seed is None else (self.seed + i) % 2**64,
                       prompt_logprobs=None)

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidArgument naming the field to fix."""
        if self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidArgument(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidArgument(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidArgument(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgument(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidArgument(f"min_tokens must be in [0, max_new_tokens = "
                                  f"{self.max_new_tokens}], got {self.min_tokens}")
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidArgument(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidArgument(
                f"prompt_logprobs must be in [0, 20] when set, got {self.prompt_logprobs}")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise InvalidArgument("stop takes at most 16 non-empty strings of at most 256 chars")
        if len(self.bad_words) > MAX_BAD_WORDS or any(
                not w.strip() or len(w) > MAX_BAD_WORD for w in self.bad_words):
            raise InvalidArgument(f"bad_words takes at most {MAX_BAD_WORDS} words, each 1 to "
                                  f"{MAX_BAD_WORD} characters and not only whitespace")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidArgument(f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got "
                                  f"{len(self.logit_bias)}")
        for name, ids in (("stop_token_ids", self.stop_token_ids),
                          ("logit_bias", [t for t, _ in self.logit_bias]),
                          ("allowed_token_ids", self.allowed_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise InvalidArgument(
                    f"{name} {bad[:8]} are outside the vocabulary [0, {vocab_size})")
        bad = [t for t, b in self.logit_bias if not -100.0 <= b <= 100.0]
        if bad:
            raise InvalidArgument(f"logit_bias values must be in [-100, 100]; tokens {bad[:8]}")
        constraints = [name for name in ("guided_regex", "guided_choice", "guided_json",
                                         "allowed_token_ids") if getattr(self, name)]
        if len(constraints) > 1:
            raise InvalidArgument(f"set at most one of {', '.join(constraints)}")
        for name in ("guided_regex", "guided_json"):
            if len(getattr(self, name)) > MAX_GUIDED_REGEX:
                raise InvalidArgument(f"{name} is longer than {MAX_GUIDED_REGEX} characters")
        if (len(self.guided_choice) > MAX_GUIDED_CHOICES
                or any(not c or len(c) > MAX_GUIDED_CHOICE for c in self.guided_choice)):
            raise InvalidArgument(f"guided_choice takes at most {MAX_GUIDED_CHOICES} non-empty "
                                  f"strings of at most {MAX_GUIDED_CHOICE} characters")


@dataclass
class GenerationRequest:
    """One generation job. `adapter` is "" (base model), "name" or "name@version"."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str = ""
    request_id: str = ""  # filled by the engine when empty
    deadline: float | None = None  # time.monotonic() value after which it is dropped
    shadow: bool = False  # mirrored canary traffic: admitted only when no real request waits
    priority: int = 0  # lower is served first (vLLM's order); ties by arrival
    n: int = 1  # completions of the prompt, each its own sequence (see for_completion)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), most likely first
    rank: int = 1  # 1 + how many tokens were more likely


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request (a delta, not the total)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    adapter: str  # resolved name@version ("" for the base model)
    prompt_tokens: int
    completion_tokens: int  # total so far
    logprobs: tuple[TokenLogprob, ...] = ()
    # with the first token, when asked for: one per prompt token after the first
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    error: str = ""  # why, with FinishReason.ERROR, UNAVAILABLE or INVALID
    index: int = 0  # which of the request's n completions this output belongs to

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
