"""The model card (README.md) of every export: what the model is, what it was trained from and on, and how it
scored, from the export's provenance; the license from the base model's own card when it states one.

Hugging Face reads the YAML block at the top (license, base_model, tags); the rest is for people. Nothing here
is invented: a number or a license the run does not know is said to be unknown.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.S)
_LICENSE = re.compile(r"^license:\s*['\"]?([^'\"\n#]+?)['\"]?\s*(#.*)?$", re.M)


def card_license(folder: str | Path) -> str | None:
    """The `license:` of a model folder's README.md front matter, or None."""
    try:
        text = (Path(folder) / "README.md").read_text(errors="replace")
    except OSError:
        return None
    block = _FRONT_MATTER.match(text)
    found = _LICENSE.search(block.group(1)) if block else None
    return found.group(1).strip() if found else None


def _metrics(validation: dict[str, Any]) -> list[str]:
    rows = []
    for name in ("domain", "general"):
        loss, ppl = validation.get(f"{name}_loss"), validation.get(f"{name}_ppl")
        if isinstance(loss, int | float) and isinstance(ppl, int | float):
            rows.append(f"| {name} validation | {loss:.4f} | {ppl:.2f} |")
    return ["| set | loss | perplexity |", "|---|---|---|", *rows] if rows else ["No evaluation was recorded."]


def model_card(provenance: dict[str, Any], sources: list[str | Path]) -> str:
    """README.md text for an export with `provenance` (training.loop's provenance.json), the license looked up in
    the cards of `sources` (the base model, then the teacher), the first found."""
    license_ = next((found for folder in sources if folder and (found := card_license(folder))), None)
    base = str(provenance.get("base_model") or "unknown")
    objective = provenance.get("objective", "unknown")
    what = {"cpt": "continued pretraining of the base model on domain data",
            "distill": f"knowledge distillation of the teacher {provenance.get('teacher', '')} into a student "
                       "made from its layers"}.get(objective, str(objective))
    front = ["---", f"license: {license_ or 'other'}", f"base_model: {json.dumps(base)}",
             "library_name: transformers", "tags:", "- stillroom", f"- {objective}", "---"]
    tokens, steps = provenance.get("tokens"), provenance.get("steps")
    lines = [
        *front, "", f"# {Path(base).name or base} ({objective})", "",
        f"Made with stillroom: {what}.", "",
        "| | |", "|---|---|",
        f"| base model | `{base}` |",
        f"| optimizer steps | {steps if steps is not None else 'unknown'} |",
        f"| training tokens | {f'{tokens:,}' if isinstance(tokens, int) else 'unknown'} |",
        f"| weights | {provenance.get('weights', 'the last step')} |",
        f"| stopped early | {provenance.get('stopped') or 'no'} |",
        f"| config sha256 | `{provenance.get('config_sha256', 'unknown')}` |",
        "", "## Evaluation (held-out shards, the run's last evaluation)", "",
        *_metrics(provenance.get("validation") or {}),
        "", "## Data", "",
        "The training shards' manifests, by sha256 (each shard folder's manifest.json):", "",
        *([f"- `{sha}`" for sha in provenance.get("data_manifests", [])] or ["- unknown"]),
        "", "## License", "",
        (f"`{license_}`, as stated by the base model's card; check that its terms allow this use." if license_ else
         "The base model's card states no license: the base model's terms apply, whatever they are. "
         "`license: other` above says so to the Hub."),
        "", "Every number above comes from `provenance.json` beside this card.", ""]
    return "\n".join(lines)
