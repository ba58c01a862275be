"""The model card (`README.md`, Hugging Face format) of an exported merge.

The YAML front matter carries what the Hub and tools read (`base_model` = every merged model,
`base_model_relation: merge`, `tags`, the license passed through from the sources) plus an `evomerge:`
block (run, candidate, scores, lineage) that `evomerge verify` reads back. The body says how the candidate
was chosen, its scores and the front it came from, its lineage and how to rebuild it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import evomerge
from evomerge.errors import EvomergeError
from evomerge.fidelity.plan import is_exact
from evomerge.references import display_name, hub_id, locate, parts

MAX_FRONT_ROWS = 20
LICENSE_KEYS = ("license", "license_name", "license_link")


@dataclass
class CardInput:
    candidate: str
    how: str  # how the candidate was chosen
    run_dir: Path
    view: Any  # export.RunView
    summary: Any  # export.RecipeSummary
    mergekit: bool
    mergekit_reason: str
    dtype: str | None
    command: str


def _front_matter(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    parts = text.split("---\n", 2)
    if not text.startswith("---\n") or len(parts) < 3:
        return {}
    try:
        data = yaml.safe_load(parts[1])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_licenses(models: list[str]) -> dict[str, dict[str, str]]:
    """{model: {license, license_name, license_link}} from each source's card front matter or config.json
    (a LoRA ref `base+adapter` reads both parts); models without any are left out."""
    found: dict[str, dict[str, str]] = {}
    for ref in models:
        info: dict[str, str] = {}
        for part in parts(ref):
            try:
                d = locate(part)
            except EvomergeError:  # a hub model not cached here: its license stays unknown
                continue
            meta = _front_matter(d / "README.md")
            try:
                config = json.loads((d / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
            for key in LICENSE_KEYS:
                value = meta.get(key, config.get(key) if isinstance(config, dict) else None)
                if value and key not in info:
                    info[key] = str(value)
        if info:
            found[ref] = info
    return found


def _license_fields(licenses: dict[str, dict[str, str]]) -> dict[str, str]:
    """One license shared by every source that states one: passed through; several: `other`."""
    distinct = {tuple(sorted(v.items())) for v in licenses.values()}
    if len(distinct) == 1:
        return dict(next(iter(distinct)))
    if distinct:
        return {"license": "other", "license_name": "mixed"}
    return {}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_card(c: CardInput) -> str:
    view, s = c.view, c.summary
    cand = view.candidates[c.candidate]
    scores = view.results[c.candidate]["scores"]
    front = view.front()
    licenses = source_licenses(s.models)
    meta: dict[str, Any] = {
        "base_model": [hub_id(m) for m in s.models],  # the Hub reads repo ids there
        "base_model_relation": "merge",
        "library_name": "transformers",
        "tags": ["merge", "evomerge"] + (["mergekit"] if c.mergekit else []),
        **_license_fields(licenses),
        "merge_method": s.method,
        "merged_models": [m for m in s.models if m != s.base],
        "evomerge": {
            "run_dir": str(c.run_dir),
            "run_name": view.config.name,
            "candidate": c.candidate,
            "chosen_by": c.how,
            "generation": int(cand.get("generation", 0)),
            "parents": list(cand.get("parents", [])),
            "scores": {k: float(v) for k, v in scores.items()},
            "scores_exact": is_exact(view.results[c.candidate]),
            "evaluator": evaluator_options(view.config.evaluator),
            "on_pareto_front": c.candidate in front,
            "strategy": view.config.strategy.name,
            "version": evomerge.__version__,
        },
    }
    if s.base:
        meta["merge_base"] = s.base
    head = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"
    body = [
        f"# {view.config.name}-{c.candidate}",
        f"A merge of {len(s.models)} models made by evomerge (evolutionary merge search): candidate "
        f"`{c.candidate}` of the search `{view.config.name}` (strategy `{view.config.strategy.name}`, "
        f"{len(view.results)} candidates evaluated). Chosen by: {c.how}.",
        _merge_section(c),
        _scores_section(c, front),
        _lineage_section(c),
        _reproduce_section(c),
        _license_section(licenses),
    ]
    return head + "\n" + "\n\n".join(body) + "\n"


def _merge_section(c: CardInput) -> str:
    s = c.summary
    lines = ["## Merge", "", f"- method: `{s.method}`"]
    if s.base:
        lines.append(f"- base: `{s.base}`")
    lines += [f"- merged: `{m}`" for m in s.models if m != s.base]
    lines.append(f"- dtype: {c.dtype or 'as the sources'}")
    lines.append("- the exact recipe: `evomerge_recipe.yaml`")
    if any(not Path(p).is_absolute() for ref in s.models for p in ref.split("+")):
        lines.append("- model paths are as the run recorded them, relative to the directory it ran in")
    return "\n".join(lines)


def measured(result: dict[str, Any]) -> str:
    """How a score was measured: every item, re-scored on every item after the search, or on fewer items."""
    fid = result.get("fidelity", {})
    if fid.get("rescored"):
        return "all items (re-scored)"
    if is_exact(result):
        return "all items"
    what = "estimated" if fid.get("estimated") else "partial"
    return f"{what}, {sum(fid.get('items', {}).values())} items"


def evaluator_options(ev: Any) -> dict[str, Any]:
    """What the scores were measured with besides the weights (an EvaluatorConfig): for lm-eval its tasks and
    prompt options, since a chat template, a system instruction or generation kwargs change every score."""
    if ev.type != "lmeval":
        return {"type": ev.type}
    template = ev.apply_chat_template
    name = template if isinstance(template, str) else "tokenizer default"
    return {
        "type": ev.type,
        "tasks": list(ev.tasks),
        "apply_chat_template": bool(template),
        "chat_template": name if template else None,
        "fewshot_as_multiturn": ev.multiturn,
        "system_instruction": ev.system_instruction,
        "gen_kwargs": dict(ev.gen_kwargs) if ev.gen_kwargs else None,
        "max_length": ev.max_length,  # longer requests were truncated to it
    }


def prompt_line(ev: Any) -> str:
    """One sentence on how lm-eval built the prompts (plain, or which chat options)."""
    opts = evaluator_options(ev)
    if opts["type"] != "lmeval":
        return ""
    if opts["apply_chat_template"]:
        name = opts["chat_template"]
        what = "the tokenizer's chat template" if name == "tokenizer default" else f"chat template `{name}`"
        turns = "as multi-turn chat" if opts["fewshot_as_multiturn"] else "in one user turn"
        said = [f"Prompts: {what}, few-shot examples {turns}"]
    else:
        said = ["Prompts: plain text (no chat template)"]
    if opts["system_instruction"] is not None:
        said.append(f"system instruction {json.dumps(opts['system_instruction'])}")
    if opts["gen_kwargs"]:
        said.append(f"generation kwargs {json.dumps(opts['gen_kwargs'], sort_keys=True)}")
    if opts["max_length"]:
        said.append(f"requests truncated to {opts['max_length']} tokens")
    return "; ".join(said) + "."


def _scores_section(c: CardInput, front: list[str]) -> str:
    view = c.view
    result = view.results[c.candidate]
    names = list(result["scores"])
    estimate = result.get("estimate", {}).get("scores", {})
    rows = [[t, f"{result['scores'][t]:.4f}"] + ([f"{estimate[t]:.4f}"] if estimate else []) for t in names]
    header = ["task", "score"] + (["search's estimate"] if estimate else [])
    lines = ["## Scores", "", f"From the run's journal ({view.config.evaluator.type} evaluator, "
             f"tasks {', '.join(view.config.evaluator.tasks)}); measured on: {measured(result)}.", "",
             _table(header, rows)]  # fmt: skip
    if prompt := prompt_line(view.config.evaluator):
        lines[2] += " " + prompt
    order = sorted(
        front, key=lambda cid: (cid != c.candidate, -float(np.mean(view.results[cid]["objectives"])))
    )
    shown = order[:MAX_FRONT_ROWS]
    where = "is on" if c.candidate in front else "is not on"
    lines += ["", "### The Pareto front it came from", "",
              f"The candidate {where} the run's front ({len(front)} candidates"
              + (f", the {len(shown)} best by mean objective shown" if len(shown) < len(front) else "") + ")."]  # fmt: skip
    if shown:
        table = [
            [f"**{cid}** (exported)" if cid == c.candidate else cid]
            + [f"{view.results[cid]['scores'].get(n, float('nan')):.4f}" for n in view.names]
            + [measured(view.results[cid])]
            for cid in shown
        ]
        lines += ["", _table(["candidate", *view.names, "measured on"], table)]
    return "\n".join(lines)


def _lineage_section(c: CardInput) -> str:
    view = c.view
    cand = view.candidates[c.candidate]
    parents = list(cand.get("parents", []))
    lines = ["## Lineage", "", f"Generation {cand.get('generation', 0)}; "
             + (f"parents {', '.join(f'`{p}`' for p in parents)}." if parents else "no parents (sampled).")]  # fmt: skip
    rows = []
    for p in parents:
        r = view.results.get(p)
        gen = view.candidates.get(p, {}).get("generation", "?")
        scores = (
            ", ".join(f"{k} {v:.4f}" for k, v in r["scores"].items()) if r and r["status"] == "ok" else "-"
        )
        rows.append([p, str(gen), scores])
    if rows:
        lines += ["", _table(["parent", "generation", "scores"], rows)]
    return "\n".join(lines)


def _reproduce_section(c: CardInput) -> str:
    lines = [
        "## Reproduce",
        "",
        "```bash",
        "evomerge merge evomerge_recipe.yaml merged/   # the same tensors",
    ]
    if c.mergekit:
        lines.append("mergekit-yaml mergekit_config.yml merged/     # mergekit can build it too")
    lines += [f"{c.command}   # this export, from the run", "```"]
    if not c.mergekit:
        lines += ["", f"No `mergekit_config.yml`: mergekit cannot express this recipe ({c.mergekit_reason})."]
    return "\n".join(lines)


def _license_section(licenses: dict[str, dict[str, str]]) -> str:
    lines = ["## License", ""]
    if not licenses:
        lines.append("No license was found in the sources' model cards or configs; the merge is bound by "
                     "the terms of every source model.")  # fmt: skip
        return "\n".join(lines)
    lines.append("From the sources' model cards and configs (the merge is bound by all of them):")
    lines += [
        f"- `{display_name(ref)}`: {', '.join(f'{k} {v}' for k, v in info.items())}"
        for ref, info in licenses.items()
    ]
    return "\n".join(lines)
