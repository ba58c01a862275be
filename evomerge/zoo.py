"""Tiny offline model families for demos and tests (no hub downloads).

- `make_random_llama` / `make_random_family`: a random Llama base and "experts" = base + Gaussian noise.
  They merge for real but know nothing (engine tests).
- `build_zoo`: the trained skill zoo. A character-level Llama base that knows easy versions of a few string
  skills, and one expert per skill fine-tuned on the hard version; a plain task-arithmetic merge of the
  experts beats every expert on the average over skills, so a merge search has something to find.
  `write_task_data` writes the held-out prompts of the bundled lm-eval tasks (`evomerge/evaluate/tasks/zoo`);
  `greedy_exact_match` is the fast scorer lm-eval's numbers are checked against.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import string
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.fsutil import atomic_dir

log = logging.getLogger(__name__)


def make_random_llama(
    path: Path,
    seed: int,
    *,
    base: Path | None = None,
    scale: float = 0.05,
    vocab: int = 64,
    hidden: int = 32,
    layers: int = 4,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Save a random tiny LlamaForCausalLM; with `base`, an expert = base + scale * N(0, 1) on every weight."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    ref = (
        LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict() if base is not None else None
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(noise * 0.1 if ref is None else ref[name] + scale * noise)
    model.to(dtype).save_pretrained(path)
    return path


def make_random_family(root: Path, n_experts: int = 3, **kw) -> dict[str, Path]:
    """{'base': root/base, 'e0': root/e0, ...}: a base and n experts near it."""
    family = {"base": make_random_llama(root / "base", 0, **kw)}
    for i in range(n_experts):
        family[f"e{i}"] = make_random_llama(root / f"e{i}", i + 1, base=family["base"], **kw)
    return family


# ---------------------------------------------------------------------------------------------------------
# The trained skill zoo: a tiny base trained on generic string tasks and on short (easy) versions of a few
# skills, and one expert per skill fine-tuned from it on the longer (hard) version with replay of the base
# mixture, loss on answer tokens only. Held-out prompts (hard lengths) never appear in training.
# ---------------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
CHARS = " \n" + string.digits + string.ascii_lowercase + string.ascii_uppercase + ":=+-"
VOCAB = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *CHARS))}

EASY_LENGTHS = (2, 4)  # what the base sees of every skill
HARD_LENGTHS = (5, 6)  # what an expert learns, and what the tasks test
SPLIT_SIZES = {"validation": 150, "test": 250}
# Larger held-out splits drawn from another split's bucket, disjoint from that split's rows: `search` (1,000
# prompts per skill) gives cheap-fitness subsets room without touching which prompts count as training.
EXTRA_SPLITS = {"search": ("validation", 1000)}
TASK_SPLIT_SIZES = {**SPLIT_SIZES, **{split: n for split, (_, n) in EXTRA_SPLITS.items()}}
_SPLIT_BUCKETS = {"test": 0, "validation": 1}  # bucket of a prompt (see `split_of`); the rest is training
_N_BUCKETS = 10


@dataclass(frozen=True)
class Skill:
    """A prompt -> answer string task: prompt `"{name}:{x}="`, answer `fn(x)`, x drawn from `alphabet`."""

    name: str
    alphabet: str
    fn: Callable[[str], str]

    def prompt(self, x: str) -> str:
        return f"{self.name}:{x}="

    def sample(self, rng: random.Random, lengths: tuple[int, int]) -> tuple[str, str]:
        x = "".join(rng.choices(self.alphabet, k=rng.randint(*lengths)))
        return self.prompt(x), self.fn(x)


def _shift(x: str) -> str:
    return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in x)


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("rev", string.ascii_lowercase, lambda x: x[::-1]),
        Skill("sort", string.digits, lambda x: "".join(sorted(x))),
        Skill("up", string.ascii_lowercase, str.upper),
        Skill("shift", string.ascii_lowercase, _shift),
    )
}
# Generic tasks only the base trains on (the "language" the skills build on). Measured with seed 0 (test
# exact match): copying letters up to length 7 let the base solve half of the hard `up` prompts and the
# experts were no specialists (up to 63% on other skills); with every generic task at most 4-5 long the
# experts shared too little and task arithmetic fell below the best expert (13-22% average). Letters up to
# 4, digits up to 7: specialists (<= 2% off their skill) whose task-arithmetic merge beats each of them.
GENERIC: tuple[tuple[Skill, tuple[int, int]], ...] = (
    (Skill("cp", string.ascii_lowercase + string.digits, lambda x: x), (2, 4)),
    (Skill("cpd", string.digits, lambda x: x), (2, 7)),
    (Skill("dup", string.ascii_lowercase + string.digits, lambda x: "".join(c + c for c in x)), (2, 4)),
    (Skill("last", string.ascii_lowercase + string.digits, lambda x: x[-1]), (2, 7)),
    (Skill("inc", string.digits, lambda x: "".join(str((int(c) + 1) % 10) for c in x)), (2, 6)),
)


def split_of(prompt: str) -> str:
    """'test', 'validation' or 'train': a fixed function of the prompt, so the held-out splits of any seed
    are disjoint from each other and from every training example of any seed."""
    bucket = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "big") % _N_BUCKETS
    return next((split for split, b in _SPLIT_BUCKETS.items() if b == bucket), "train")


def _draw(
    skill: Skill, rng: random.Random, bucket: str, n: int, exclude: frozenset[str] = frozenset()
) -> list[dict]:
    """n distinct hard-length rows whose prompts fall in `bucket` and are not in `exclude`, in draw order."""
    rows: dict[str, str] = {}
    while len(rows) < n:
        prompt, answer = skill.sample(rng, HARD_LENGTHS)
        if split_of(prompt) == bucket and prompt not in exclude:
            rows.setdefault(prompt, answer)
    return [{"prompt": p, "answer": a} for p, a in rows.items()]


def _split_rows(name: str, split: str, n: int, seed: int, sizes: Mapping[str, int]) -> list[dict]:
    """One split of one skill, with its own rng stream. An extra split (`EXTRA_SPLITS`) draws from its
    parent's bucket and skips the parent's rows (of `sizes`, else the bundled size)."""
    rng = random.Random(f"evomerge-zoo-data/{seed}/{name}/{split}")
    if split not in EXTRA_SPLITS:
        return _draw(SKILLS[name], rng, split, n)
    parent = EXTRA_SPLITS[split][0]
    taken = _split_rows(name, parent, sizes.get(parent, SPLIT_SIZES[parent]), seed, sizes)
    return _draw(SKILLS[name], rng, parent, n, frozenset(r["prompt"] for r in taken))


def task_data(seed: int = 0, sizes: Mapping[str, int] = TASK_SPLIT_SIZES) -> dict[str, dict[str, list[dict]]]:
    """{skill: {split: [{"prompt", "answer"}, ...]}}: distinct hard-length prompts of each held-out split."""
    return {
        name: {split: _split_rows(name, split, n, seed, sizes) for split, n in sizes.items()}
        for name in SKILLS
    }


def write_task_data(out_dir: str | Path, seed: int = 0) -> list[Path]:
    """Write `{skill}_{split}.jsonl` for every skill and held-out split (the data of the bundled lm-eval
    tasks: `evomerge/evaluate/tasks/zoo/data`, seed 0). Same seed, same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, splits in task_data(seed).items():
        for split, rows in splits.items():
            path = out / f"{name}_{split}.jsonl"
            path.write_bytes("".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows).encode())
            written.append(path)
    return written


# A chat template in the zoo's own characters ("system:...", "user:...", then "assistant:"). The zoo models
# never saw it: it exists so the evaluator's chat path (lm-eval's apply_chat_template) can be tested on them.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_tokenizer():
    """The zoo's character-level tokenizer: one token per character of `CHARS`, BOS prepended, left padding,
    and `CHAT_TEMPLATE` (saved as chat_template.jinja)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=64,
        chat_template=CHAT_TEMPLATE,
    )


def encode(text: str) -> list[int]:
    """Token ids of `text` without BOS (what the tokenizer gives after its BOS)."""
    return [VOCAB.get(c, UNK) for c in text]


ZOO_VERSION = 1  # bump when code changes what a zoo with the same settings contains
MANIFEST = "zoo.json"


@dataclass(frozen=True)
class ZooSettings:
    """Everything a zoo depends on besides the seed (hashed into its manifest)."""

    hidden: int = 64
    layers: int = 3
    heads: int = 4
    mlp: int = 256
    batch: int = 64
    base_steps: int = 1500
    base_lr: float = 2e-3
    base_skill_fraction: float = 0.3  # the rest: generic tasks
    expert_steps: int = 500
    expert_lr: float = 5e-4
    expert_skill_fraction: float = 0.2  # the rest: replay of the base mixture
    warmup: int = 50
    skills: tuple[str, ...] = tuple(SKILLS)
    merge_lambda: float = 0.5

    def digest(self, seed: int) -> str:
        """Hash of the seed, these settings and the data definitions (bump ZOO_VERSION when code changes
        what a zoo contains)."""
        data = {
            "chars": CHARS, "easy": EASY_LENGTHS, "hard": HARD_LENGTHS,
            "skills": {n: SKILLS[n].alphabet for n in self.skills},
            "generic": [(g.name, g.alphabet, lengths) for g, lengths in GENERIC],
        }  # fmt: skip
        payload = {"version": ZOO_VERSION, "seed": seed, "data": data, **asdict(self)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _model_config(s: ZooSettings):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=s.hidden, intermediate_size=s.mlp, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip


def _base_example(rng: random.Random, s: ZooSettings) -> tuple[str, str]:
    if rng.random() < s.base_skill_fraction:
        return _skill_example(rng, SKILLS[rng.choice(s.skills)], EASY_LENGTHS)
    skill, lengths = rng.choice(GENERIC)
    return skill.sample(rng, lengths)


def _skill_example(rng: random.Random, skill: Skill, lengths: tuple[int, int]) -> tuple[str, str]:
    while True:  # never train on a held-out prompt
        prompt, answer = skill.sample(rng, lengths)
        if split_of(prompt) == "train":
            return prompt, answer


def _batch(examples: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, labels on the answer and EOS only."""
    seqs = [([BOS, *encode(p)], [*encode(a), EOS]) for p, a in examples]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.full((len(seqs), width), PAD)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, a) in enumerate(seqs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _train(model, sample: Callable[[], tuple[str, str]], steps: int, lr: float, s: ZooSettings) -> float:
    """AdamW, linear warmup then cosine to 0; returns the mean loss of the last 50 steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)

    def factor(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, steps - s.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    for _ in range(steps):
        loss = model(**_batch([sample() for _ in range(s.batch)])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses[-50:]))


@torch.no_grad()
def greedy_exact_match(
    model,
    tokenizer,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 64,
    max_new_tokens: int | None = None,
    stop: Sequence[str] = ("\n",),
) -> np.ndarray:
    """Per prompt 1.0 when greedy decoding reproduces its answer exactly, else 0.0.

    Batched `model.generate` with KV cache and left padding; a continuation ends at EOS (special tokens are
    dropped when decoding) and is cut at the first `stop` string (and the EOS string), as lm-eval's HFLM
    `generate_until` does with `until: stop`.
    `max_new_tokens` defaults to the longest answer in tokens + 1 (room for EOS); lm-eval's `max_gen_toks`
    must be the same for the two to agree. Prompts run longest first (ties by text) in batches of
    `batch_size`: the order lm-eval's HFLM batches in, so the same batch size gives the same padded batches.
    """
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if max_new_tokens is None:
        lengths = tokenizer(answers, add_special_tokens=False)["input_ids"] if answers else []
        max_new_tokens = max((len(ids) for ids in lengths), default=0) + 1
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], prompts[i]))
    stops = [*stop, *([tokenizer.eos_token] if tokenizer.eos_token else [])]
    scores = np.zeros(len(prompts))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], padding="longest", return_tensors="pt")
            ids = enc["input_ids"].to(model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=enc["attention_mask"].to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :].tolist(), skip_special_tokens=True)
            for i, text in zip(idx, texts):
                for s in stops:
                    text = text.split(s)[0]
                scores[i] = float(text == answers[i])
    finally:
        tokenizer.padding_side = side
    return scores


def score_models(
    models: Mapping[str, Any], data: Mapping[str, Sequence[Mapping[str, str]]], batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """{model: {task: exact match %}} for model dirs (or (model, tokenizer) pairs) on {task: rows}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    table = {}
    for name, ref in models.items():
        if isinstance(ref, tuple):
            model, tok = ref
        else:
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(ref)
        prompts = [r["prompt"] for rows in data.values() for r in rows]
        answers = [r["answer"] for rows in data.values() for r in rows]
        hits = greedy_exact_match(model, tok, prompts, answers, batch_size=batch_size)
        row, at = {}, 0
        for task, rows in data.items():
            row[task] = 100.0 * float(hits[at : at + len(rows)].mean())
            at += len(rows)
        row["avg"] = float(np.mean([row[t] for t in data]))
        table[name] = row
    return table


def _save_model(model, root: Path, name: str, digest: str) -> Path:
    """Write model + tokenizer to a temp dir beside `root/name`, then rename (a partial write is never seen)."""
    from transformers import GenerationConfig

    final = root / name
    with atomic_dir(final) as tmp:
        model.generation_config = GenerationConfig(
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, do_sample=False
        )
        model.save_pretrained(tmp)
        make_tokenizer().save_pretrained(tmp)
        (tmp / "zoo_model.json").write_text(json.dumps({"name": name, "digest": digest}) + "\n")
    return final


def refresh_tokenizer(path: Path) -> list[str]:
    """Bring a cached zoo model's tokenizer files up to `make_tokenizer()`'s; returns the files written.

    The tokenizer is not trained, so it is not in the zoo's digest: a zoo cached before the chat template
    existed keeps its weights (and every score without a template) and only gains chat_template.jinja. Files
    already current are not touched (a read-only zoo that is current still loads); each write is atomic."""
    written = []
    with tempfile.TemporaryDirectory(prefix="evomerge-tok-") as tmp:
        make_tokenizer().save_pretrained(tmp)
        for fresh in sorted(Path(tmp).iterdir()):
            target = path / fresh.name
            data = fresh.read_bytes()
            if target.exists() and target.read_bytes() == data:
                continue
            part = path / f".{fresh.name}.{os.getpid()}.tmp"
            part.write_bytes(data)
            os.replace(part, target)
            written.append(fresh.name)
    return written


def _is_built(path: Path, digest: str) -> bool:
    try:
        marker = json.loads((path / "zoo_model.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("digest") == digest and (path / "model.safetensors").exists()


def load_zoo(out_dir: str | Path, seed: int = 0, settings: ZooSettings | None = None) -> dict | None:
    """The manifest of a complete zoo in `out_dir` built with this seed and settings, else None."""
    s = settings or ZooSettings()
    root = Path(out_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("digest") != s.digest(seed):
        return None
    if not all(_is_built(root / rel, manifest["digest"]) for rel in manifest.get("models", {}).values()):
        return None
    return manifest


def open_zoo(out_dir: str | Path) -> dict[str, Path] | None:
    """The model dirs of the complete zoo in `out_dir`, whatever seed and settings built it; else None.

    For tools pointed at a zoo (`--zoo DIR`): a zoo built with other settings is used as it is, not rebuilt."""
    root = Path(out_dir)
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        settings = ZooSettings(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["settings"].items()}
        )
        seed = manifest["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if load_zoo(root, seed, settings) is None:
        return None
    return {name: root / rel for name, rel in manifest["models"].items()}


def build_zoo(out_dir: str | Path, seed: int = 0, settings: ZooSettings | None = None) -> dict[str, Path]:
    """Train (or reuse) the skill zoo in `out_dir`: {'base': ..., 'expert_rev': ..., ...} model dirs.

    A complete zoo with the same seed and settings is returned at once; models finished by an interrupted
    build are reused. Writes `SCORES.md`/`SCORES.json` (test exact match per model and skill, and a
    task-arithmetic merge of all experts) and the manifest `zoo.json` last. Trains with one torch thread.
    """
    s = settings or ZooSettings()
    root = Path(out_dir)
    manifest = load_zoo(root, seed, s)
    if manifest is not None:
        paths = {name: root / rel for name, rel in manifest["models"].items()}
        for path in paths.values():
            refresh_tokenizer(path)
        return paths
    root.mkdir(parents=True, exist_ok=True)
    digest = s.digest(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        paths, seconds = _train_zoo(root, seed, s, digest)
        scores = _score_zoo(root, paths, s)
    finally:
        torch.set_num_threads(threads)
    _write_scores(root, scores, seed, s, seconds)
    manifest = {
        "digest": digest, "seed": seed, "version": ZOO_VERSION, "settings": asdict(s),
        "models": {name: p.name for name, p in paths.items()}, "train_seconds": seconds,
    }  # fmt: skip
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, root / MANIFEST)
    return paths


def _train_zoo(
    root: Path, seed: int, s: ZooSettings, digest: str
) -> tuple[dict[str, Path], dict[str, float]]:
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    paths: dict[str, Path] = {"base": root / "base"}
    seconds: dict[str, float] = {}
    if not _is_built(paths["base"], digest):
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(_model_config(s))
        rng = random.Random(f"evomerge-zoo/{seed}/base")
        loss = _train(model, lambda: _base_example(rng, s), s.base_steps, s.base_lr, s)
        _save_model(model, root, "base", digest)
        seconds["base"] = time.perf_counter() - start
        log.info("zoo: base trained in %.1f s (loss %.4f)", seconds["base"], loss)
    for name in s.skills:
        key = f"expert_{name}"
        paths[key] = root / key
        if _is_built(paths[key], digest):
            continue
        start = time.perf_counter()
        model = LlamaForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
        rng = random.Random(f"evomerge-zoo/{seed}/{key}")
        skill = SKILLS[name]

        def sample(rng=rng, skill=skill) -> tuple[str, str]:
            if rng.random() < s.expert_skill_fraction:
                return _skill_example(rng, skill, HARD_LENGTHS)
            return _base_example(rng, s)

        loss = _train(model, sample, s.expert_steps, s.expert_lr, s)
        _save_model(model, root, key, digest)
        seconds[key] = time.perf_counter() - start
        log.info("zoo: %s trained in %.1f s (loss %.4f)", key, seconds[key], loss)
    return paths, seconds


def merge_recipe(paths: Mapping[str, Path], lam: float = 0.5) -> dict:
    """mergekit-style task arithmetic over every expert of a zoo (weight 1 each, `lambda` = lam)."""
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(paths["base"]),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for n, p in paths.items() if n != "base"],
        "parameters": {"lambda": lam},
        "dtype": "float32",
    }


def _score_zoo(root: Path, paths: dict[str, Path], s: ZooSettings) -> dict[str, dict[str, float]]:
    from evomerge.merge.engine import merge_to_dir
    from evomerge.merge.mergekit_io import recipe_from_dict

    data = {name: rows["test"] for name, rows in task_data(0, {"test": SPLIT_SIZES["test"]}).items()}
    data = {name: data[name] for name in s.skills}
    with tempfile.TemporaryDirectory(prefix=".merge-", dir=root) as tmp:
        merged = merge_to_dir(recipe_from_dict(merge_recipe(paths, s.merge_lambda)), Path(tmp) / "merged")
        return score_models({**paths, f"task arithmetic (lambda {s.merge_lambda})": merged}, data)


def _write_scores(root: Path, scores: dict, seed: int, s: ZooSettings, seconds: dict[str, float]) -> None:
    tasks = [*s.skills, "avg"]
    lines = [
        f"# Zoo scores (seed {seed})",
        "",
        f"Exact match (%) on the held-out test split ({SPLIT_SIZES['test']} prompts per skill, greedy decoding).",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---" * (len(tasks) + 1) + "|",
    ]
    lines += [f"| {m} | " + " | ".join(f"{row[t]:.1f}" for t in tasks) + " |" for m, row in scores.items()]
    (root / "SCORES.md").write_text("\n".join(lines) + "\n")
    payload = {"seed": seed, "split": "test", "metric": "exact_match_percent", "scores": scores,
               "merge": merge_recipe({"base": Path("base"), **{f"expert_{n}": Path(f"expert_{n}") for n in s.skills}},
                                     s.merge_lambda),
               "train_seconds": seconds}  # fmt: skip
    (root / "SCORES.json").write_text(json.dumps(payload, indent=2) + "\n")
