"""Build the out-of-the-box demo: a tiny character-level Llama and three LoRA adapters.

    python demo/build_demo.py --out demo/assets

Writes
    <out>/model/                 config.json, model.safetensors, generation_config.json,
                                 tokenizer.json, tokenizer_config.json, chat_template.jinja
    <out>/adapters/reverse/      PEFT folder (adapter_config.json, adapter_model.safetensors)
    <out>/adapters/sort/         PEFT folder
    <out>/adapters/caesar/       PEFT folder
    <out>/ACCURACY.json          greedy exact-match accuracy on held-out inputs

The base model is trained from scratch to copy its input (``<s>abc=abc</s>``); each
adapter is trained with PEFT on the frozen base for its own task (see demo/tasks.py).
Everything runs on one CPU thread with fixed seeds, so the output is reproducible
on the same torch build.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tasks  # noqa: E402  (demo/tasks.py, the reference functions)

SEED = 1234
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3
CHARS = [" "] + list(tasks.LETTERS) + list("=.,!?'-")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MAX_POSITIONS = 64
# The chat template renders only the last message: "<s>" + content + "=". It
# includes the bos token, following the HF convention that apply_chat_template
# tokenizes without adding special tokens again.
CHAT_TEMPLATE = "{{ bos_token }}{{ messages[-1]['content'] }}" + tasks.SEPARATOR
N_EVAL = 200


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    batch: int
    lr: float
    warmup: int = 50


@dataclass(frozen=True)
class AdapterSpec:
    task: str
    r: int
    alpha: int
    target_modules: tuple[str, ...]
    use_rslora: bool
    train: TrainSpec


BASE_TRAIN = TrainSpec(steps=800, batch=64, lr=3e-3)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTERS = [
    AdapterSpec("reverse", r=8, alpha=16, target_modules=ATTN + MLP, use_rslora=False,
                train=TrainSpec(steps=400, batch=64, lr=5e-3)),
    AdapterSpec("sort", r=16, alpha=16, target_modules=ATTN + MLP, use_rslora=True,
                train=TrainSpec(steps=700, batch=64, lr=5e-3)),
    AdapterSpec("caesar", r=4, alpha=8, target_modules=("v_proj", "o_proj") + MLP,
                use_rslora=False, train=TrainSpec(steps=450, batch=64, lr=5e-3)),
]


# --------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # one token per character, spaces included
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # join the tokens back with nothing in between (WordLevel alone would add spaces)
    tok.decoder = decoders.Fuse()
    tok.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS)
    hf.chat_template = CHAT_TEMPLATE
    assert [hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id] == [
        BOS_ID, EOS_ID, PAD_ID, UNK_ID]
    return hf, vocab


# --------------------------------------------------------------------------- data

def make_eval_inputs(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        s = tasks.random_input(rng)
        if s not in out:
            out.append(s)
    return out


class Batches:
    """Random training batches for one task, never using a held-out input.

    Rows are ``[<s>]*k + input + "=" + output + "</s>"`` padded on the right;
    k is 1 most of the time, sometimes 0 or 2, so the model does not depend on
    whether a client's tokenizer path added exactly one bos. Targets are -100
    except for the output characters and the final ``</s>``.
    """

    def __init__(self, task: str, vocab: dict[str, int], held_out: set[str], seed: int):
        self.fn = tasks.TASKS[task]
        self.vocab = vocab
        self.held_out = held_out
        self.rng = random.Random(seed)

    def _row(self) -> tuple[list[int], list[int]]:
        s = tasks.random_input(self.rng)
        while s in self.held_out:
            s = tasks.random_input(self.rng)
        u = self.rng.random()
        n_bos = 0 if u < 0.08 else (2 if u > 0.94 else 1)
        prompt = [BOS_ID] * n_bos + [self.vocab[c] for c in tasks.prompt_for(s)]
        answer = [self.vocab[c] for c in self.fn(s)] + [EOS_ID]
        return prompt + answer, [-100] * len(prompt) + answer

    def next(self, batch: int, chunks: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One batch as ``chunks`` (ids, targets) pairs of similar row length, so
        little compute goes to padding."""
        rows = sorted((self._row() for _ in range(batch)), key=lambda r: len(r[0]))
        size = math.ceil(batch / chunks)
        out = []
        for part in (rows[i: i + size] for i in range(0, batch, size)):
            width = max(len(x) for x, _ in part)
            ids = torch.full((len(part), width), PAD_ID, dtype=torch.long)  # [rows, seq]
            tgt = torch.full((len(part), width), -100, dtype=torch.long)
            for i, (x, y) in enumerate(part):
                ids[i, : len(x)] = torch.tensor(x)
                tgt[i, : len(y)] = torch.tensor(y)
            out.append((ids, tgt))
        return out


# --------------------------------------------------------------------------- training

def train(model, params, batches: Batches, spec: TrainSpec, label: str) -> float:
    """AdamW with linear warmup and cosine decay; loss on the answer tokens only.

    Right padding needs no attention mask: with causal attention no real token
    ever sees a pad that comes after it.
    """
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        p = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0 = time.time()
    ema = None
    for step in range(spec.steps):
        chunks = batches.next(spec.batch)
        n_targets = sum(int((tgt != -100).sum()) for _, tgt in chunks)
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for ids, tgt in chunks:
            logits = model(input_ids=ids).logits  # [rows, seq, vocab]
            part = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   tgt[:, 1:].reshape(-1), ignore_index=-100,
                                   reduction="sum") / n_targets
            part.backward()
            loss += part.detach()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 100 == 0 or step == spec.steps - 1:
            print(f"  [{label}] step {step:4d}  loss {ema:.4f}  {time.time() - t0:5.1f}s",
                  flush=True)
    model.eval()
    return time.time() - t0


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def greedy_outputs(model, tokenizer, inputs: list[str]) -> list[str]:
    """Plain ``generate(do_sample=False)``; prompts of equal length share a batch so
    no padding is involved."""
    by_len: dict[int, list[int]] = {}
    for i, s in enumerate(inputs):
        by_len.setdefault(len(s), []).append(i)
    out = [""] * len(inputs)
    for idx in by_len.values():
        enc = tokenizer([tasks.prompt_for(inputs[i]) for i in idx], return_tensors="pt")
        gen = model.generate(**enc, do_sample=False, max_new_tokens=tasks.MAX_LEN + 2,
                             eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[row, enc.input_ids.shape[1]:],
                                      skip_special_tokens=True)
    return out


def accuracy(model, tokenizer, task: str, inputs: list[str]) -> tuple[float, list]:
    got = greedy_outputs(model, tokenizer, inputs)
    fn = tasks.TASKS[task]
    misses = [(s, fn(s), g) for s, g in zip(inputs, got) if g != fn(s)]
    return 1 - len(misses) / len(inputs), misses


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo/assets")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "adapters").mkdir(parents=True)
    t_start = time.time()

    tokenizer, vocab = build_tokenizer()
    eval_inputs = make_eval_inputs(SEED + 1, N_EVAL)
    held_out = set(eval_inputs)

    # ---- base model: copy
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS, rope_theta=10000.0,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"base model: {n_params:,} parameters", flush=True)
    train_times = {}
    train_times["copy"] = train(model, list(model.parameters()),
                                Batches("copy", vocab, held_out, SEED + 10),
                                BASE_TRAIN, "base/copy")
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        do_sample=False, max_new_tokens=tasks.MAX_LEN + 2)
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    acc = {}
    acc["copy"], misses = accuracy(model, tokenizer, "copy", eval_inputs)
    print(f"copy (base): {acc['copy']:.3f}  misses: {misses[:5]}", flush=True)

    # ---- adapters on the frozen base
    for i, spec in enumerate(ADAPTERS):
        torch.manual_seed(SEED + 100 + i)
        base = LlamaForCausalLM.from_pretrained(model_dir)
        lcfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0,
                          target_modules=list(spec.target_modules),
                          use_rslora=spec.use_rslora, bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(base, lcfg)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        print(f"adapter {spec.task}: r={spec.r} alpha={spec.alpha} rslora={spec.use_rslora} "
              f"{sum(p.numel() for p in params):,} trainable", flush=True)
        train_times[spec.task] = train(peft_model, params,
                                       Batches(spec.task, vocab, held_out, SEED + 20 + i),
                                       spec.train, spec.task)
        adir = out / "adapters" / spec.task
        peft_model.save_pretrained(adir)
        (adir / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template
        # evaluate what was written, loaded the ordinary way
        loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(model_dir), adir)
        loaded.eval()
        acc[spec.task], misses = accuracy(loaded, tokenizer, spec.task, eval_inputs)
        print(f"{spec.task}: {acc[spec.task]:.3f}  misses: {misses[:5]}", flush=True)

    total = time.time() - t_start
    report = {
        "metric": "greedy exact match (transformers/PEFT generate, do_sample=False)",
        "n_inputs": N_EVAL,
        "held_out_seed": SEED + 1,
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "train_seconds": {k: round(v, 1) for k, v in train_times.items()},
        "build_seconds": round(total, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "parameters": n_params,
    }
    (out / "ACCURACY.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["accuracy"], indent=2))
    print(f"build took {total:.0f}s")


if __name__ == "__main__":
    main()
