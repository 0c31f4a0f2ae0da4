"""Initialise a student by depth pruning: a copy of the teacher that keeps a subset of its layers.

Like DistilBERT (every other layer) and Minitron (depth pruning), the student starts from the teacher's own
weights rather than from noise: embeddings, final norm and LM head are copied, and each kept decoder layer is
copied whole, so distillation starts close to the teacher and only has to repair the removed depth. Which
layers: evenly spaced (`choose_layers`), or those that change the residual stream most on sample data
(`block_influence`, after ShortGPT). Optionally, `fit_bridges` then adapts the layer before each removed
block so that it lands where the removed layers would have (a training-free repair, after ReplaceMe).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from common.publish import publish_json, publishing_dir
from training.engine import model_fingerprint
from training.export import TOKENIZER_FILES

DTYPES = MappingProxyType({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16})
# Config lists that name layer *indices* (not one entry per layer): remapped to the student's numbering.
INDEX_LIST_KEYS = ("mlp_only_layers", "moe_layers")


def choose_layers(n_teacher: int, n_student: int) -> list[int]:
    """Indices of the teacher layers a student of `n_student` layers keeps: evenly spaced, first and last kept.

    Layer i of the student is teacher layer round(i * (n_teacher - 1) / (n_student - 1)), rounding halves up
    (exact integer arithmetic, so no float or banker's-rounding surprises). The step is >= 1, hence the
    indices are strictly increasing. The first layer (reads the embeddings) and the last (feeds the head)
    are the ones whose removal hurts most, which is why both are always kept.
    """
    if n_teacher < 1:
        raise ValueError(f"the teacher must have at least 1 layer, got {n_teacher}")
    if n_teacher == 1 and n_student == 1:
        return [0]
    if n_student < 2:
        raise ValueError(f"a student needs at least 2 layers (first and last are kept), got {n_student}")
    if n_student > n_teacher:
        raise ValueError(f"a student cannot have more layers ({n_student}) than its teacher ({n_teacher})")
    span, steps = n_teacher - 1, n_student - 1
    return [(2 * i * span + steps) // (2 * steps) for i in range(n_student)]


def choose_layers_by_influence(influence: Sequence[float], n_student: int) -> list[int]:
    """The `n_student` layers with the highest block influence, in order; first and last always kept.

    Ties go to the earlier layer. First and last are kept for the reason given in `choose_layers`, and because
    a cosine ignores how much a layer rescales its input, which matters most at the two ends.
    """
    n_teacher = len(influence)
    choose_layers(n_teacher, n_student)  # the same checks on the counts
    if n_student == n_teacher:
        return list(range(n_teacher))
    middle = sorted(range(1, n_teacher - 1), key=lambda i: (-influence[i], i))[:n_student - 2]
    return [0, *sorted(middle), n_teacher - 1]


class _Enough(Exception):
    """Raised from a hook to end a forward pass once the layers after the one being fitted are not needed."""


def _forward_with_hooks(model: torch.nn.Module, rows: torch.Tensor, batch: int, handles: list[Any]) -> None:
    """Run `rows` through `model` in batches, without gradients, for the forward hooks `handles` to record;
    then remove them, also on error. A hook may end a pass early by raising _Enough."""
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch):
                with contextlib.suppress(_Enough):
                    model(input_ids=rows[start:start + batch])
    finally:
        for handle in handles:
            handle.remove()


def block_influence(model: torch.nn.Module, rows: torch.Tensor, batch: int = 4) -> list[float]:
    """Each decoder layer's block influence (ShortGPT, Men et al. 2024) on the token rows `rows`.

    1 - the mean cosine similarity between the hidden state entering a layer and the one leaving it, over
    every token: a layer that barely turns the residual stream is the cheapest to remove.
    """
    config: Any = model.config
    n_layers = int(config.num_hidden_layers)
    layers = _decoder_layers(model, n_layers)
    similarity = torch.zeros(n_layers, dtype=torch.float64)

    def hook(index: int) -> Any:
        def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(entering.double(), leaving.double(), dim=-1)
            similarity[index] += cosine.sum()
        return record

    _forward_with_hooks(model, rows, batch, [layer.register_forward_hook(hook(i), with_kwargs=True)
                                             for i, layer in enumerate(layers)])
    return (1.0 - similarity / rows.numel()).tolist()


def _bridge_parts(layer: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The pre-MLP norm (its input is the residual stream after attention) and the MLP output projection of a
    Llama-style pre-norm decoder layer, whose output is exactly that residual + the projection's output."""
    norm, mlp = getattr(layer, "post_attention_layernorm", None), getattr(layer, "mlp", None)
    down = getattr(mlp, "down_proj", None)
    if norm is None or not isinstance(down, torch.nn.Linear) or hasattr(layer, "post_feedforward_layernorm"):
        raise ValueError(f"student bridges need Llama-style pre-norm decoder layers (post_attention_layernorm, "
                         f"mlp.down_proj, nothing after the MLP); {type(layer).__name__} is not one")
    return norm, down


def _layer_streams(model: torch.nn.Module, norm: torch.nn.Module, down: torch.nn.Linear, rows: torch.Tensor,
                   batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream entering `norm` and the output of `down` (one layer's), on every row; each forward
    pass ends at `down`, since the layers after it do not matter to the fit."""
    seen: dict[str, list[torch.Tensor]] = {"residual": [], "mlp": []}

    def residual(module: torch.nn.Module, args: Any, output: Any) -> None:
        seen["residual"].append(args[0].detach().double())

    def mlp_out(module: torch.nn.Module, args: Any, output: Any) -> None:
        seen["mlp"].append(output.detach().double())
        raise _Enough

    _forward_with_hooks(model, rows, batch, [norm.register_forward_hook(residual), down.register_forward_hook(mlp_out)])
    return torch.cat(seen["residual"]), torch.cat(seen["mlp"])


def fit_bridges(teacher: torch.nn.Module, student: torch.nn.Module, kept: Sequence[int], rows: torch.Tensor,
                batch: int = 4, ridge: float = 1e-3) -> list[dict[str, Any]]:
    """Fold a linear map into the MLP output projection of every kept layer that removed layers follow, fitted
    by least squares on `rows` so that the residual stream leaving it approximates the teacher's after the
    removed block (ReplaceMe, Shopkhoev et al. 2025). Training-free; returns one record per bridge.

    Fitted in order on the student as bridged so far, so each fit also absorbs the error the earlier ones left.
    `ridge` scales a Tikhonov term (relative to the mean diagonal of the MLP outputs' Gram matrix) that keeps
    the solve well posed.
    """
    teacher_config: Any = teacher.config
    teacher_layers = _decoder_layers(teacher, int(teacher_config.num_hidden_layers))
    student_layers = _decoder_layers(student, len(kept))
    # (student layer, teacher layer whose output the bridged layer should reproduce), one per removed block
    ends = [*kept[1:], len(teacher_layers)]
    gaps = [(j, end - 1) for j, end in enumerate(ends) if end - kept[j] > 1]
    targets: dict[int, list[torch.Tensor]] = {t: [] for _, t in gaps}

    def keep_output(index: int) -> Any:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            targets[index].append((output[0] if isinstance(output, tuple) else output).detach().double())
        return record

    _forward_with_hooks(teacher, rows, batch, [teacher_layers[t].register_forward_hook(keep_output(t))
                                               for t in targets])
    fitted = []
    for j, t in gaps:
        norm, down = _bridge_parts(student_layers[j])
        residual, mlp = _layer_streams(student, norm, down, rows, batch)
        width = down.out_features
        m = mlp.reshape(-1, width)
        target = torch.cat(targets[t]).reshape(-1, width)
        want = target - residual.reshape(-1, width)  # what the layer's MLP would have to add
        gram = m.T @ m
        gram += torch.eye(width, dtype=gram.dtype) * (ridge * gram.diagonal().mean())
        bridge = torch.linalg.solve(gram, m.T @ want)  # m @ bridge ~ want
        # Errors of the residual stream leaving the layer, relative to the teacher's state there.
        before = float((want - m).pow(2).mean() / target.pow(2).mean())
        after = float((want - m @ bridge).pow(2).mean() / target.pow(2).mean())
        with torch.no_grad():  # out = z W^T, so out @ bridge = z (bridge^T W)^T; a bias maps along with it
            down.weight.copy_((bridge.T @ down.weight.double()).to(down.weight.dtype))
            if down.bias is not None:
                down.bias.copy_((down.bias.double() @ bridge).to(down.bias.dtype))
        fitted.append({"student_layer": j, "teacher_layer": kept[j], "replaces": list(range(kept[j] + 1, t + 1)),
                       "relative_error_before": round(before, 6), "relative_error_after": round(after, 6)})
    return fitted


def _decoder_layers(model: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    layers = model.get_submodule(_layer_prefix(model, n_layers).rstrip("."))
    assert isinstance(layers, torch.nn.ModuleList)  # _layer_prefix only finds ModuleLists
    return layers


def _layer_prefix(model: torch.nn.Module, n_layers: int) -> str:
    """State-dict prefix of the decoder layers ('model.layers.' for Llama, 'transformer.h.' for GPT-2).

    Found from the model rather than hard-coded: the shallowest ModuleList with one entry per layer.
    """
    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers]
    depth = min((name.count(".") for name in found), default=-1)
    top = [name for name in found if name.count(".") == depth]
    if len(top) != 1:
        raise ValueError(f"cannot tell which module holds the {n_layers} decoder layers (candidates: {found})")
    return top[0] + "."


def _student_config(config: Any, keep: list[int]) -> Any:
    """The teacher's config with `num_hidden_layers` and every per-layer setting cut down to the kept layers."""
    n = config.num_hidden_layers
    if getattr(config, "is_heterogeneous", False):  # transformers 5: per_layer_config overrides per layer
        raise ValueError("teacher config has per_layer_config (heterogeneous layers): depth pruning is unsupported")
    student = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        if "layer" not in key or not isinstance(value, list | tuple) or not value:
            continue
        if key in INDEX_LIST_KEYS:
            setattr(student, key, [j for j, i in enumerate(keep) if i in value])
        elif len(value) == n:  # one entry per layer, e.g. layer_types, mlp_layer_types, layer_rope_theta
            setattr(student, key, [value[i] for i in keep])
        else:  # silently keeping it could pair a kept layer with another layer's setting
            raise ValueError(f"teacher config key {key!r} = {value} refers to layers in a way stillroom cannot remap")
    student.num_hidden_layers = len(keep)
    return student


def student_from_teacher(teacher: Path, out: Path, *, layers: int | None = None, keep: Sequence[int] | None = None,
                         dtype: str = "fp32", provenance: dict[str, Any] | None = None,
                         bridge_rows: torch.Tensor | None = None) -> Path:
    """Write a depth-pruned copy of the local HF model `teacher` to `out` (which must not exist); returns `out`.

    Pass `layers` (evenly spaced by `choose_layers`) or `keep` (explicit teacher layer indices, increasing).
    `provenance` is added to the student.json written beside the weights (how the layers were chosen).
    With `bridge_rows` (token ids, rows x seq_len), `fit_bridges` adapts the kept layers before each gap.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher, out = Path(teacher), Path(out)
    if (layers is None) == (keep is None):
        raise ValueError("pass exactly one of layers= (a count) or keep= (teacher layer indices)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not (teacher / "config.json").is_file():
        raise ValueError(f"teacher '{teacher}' is not a local Hugging Face model folder (no config.json)")
    if out.exists():  # never overwrite: a student may already be training from it
        raise FileExistsError(f"{out} already exists; remove it or choose another output folder")
    # Validate the layer choice from config.json before the (possibly large) teacher weights are read.
    n_teacher = AutoConfig.from_pretrained(teacher, local_files_only=True).num_hidden_layers
    kept = choose_layers(n_teacher, layers) if layers is not None else list(keep or [])
    if not kept or kept[0] < 0 or kept[-1] >= n_teacher or any(b <= a for a, b in itertools.pairwise(kept)):
        raise ValueError(f"keep must be strictly increasing teacher layer indices in [0, {n_teacher}), got {kept}")
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=DTYPES[dtype], local_files_only=True)

    prefix = _layer_prefix(model, n_teacher)
    new_index = {i: j for j, i in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefix):  # embeddings, final norm, head (tied or not), buffers
            state[key] = tensor
            continue
        index, rest = key[len(prefix):].split(".", 1)
        if int(index) in new_index:
            state[f"{prefix}{new_index[int(index)]}.{rest}"] = tensor

    # Built in the target dtype directly: a bf16 student never exists as an fp32 copy in memory.
    student = AutoModelForCausalLM.from_config(_student_config(model.config, kept), dtype=DTYPES[dtype])
    # strict: a key the student lacks or does not fill means the renaming went wrong, not a warning. With tied
    # embeddings both names hold the same tensor and the student's head and embeddings are one parameter.
    student.load_state_dict(state, strict=True)
    if bridge_rows is not None:
        bridges = fit_bridges(model.eval(), student.eval(), kept, bridge_rows)
        provenance = {**(provenance or {}), "bridges": bridges, "bridge_rows": len(bridge_rows)}

    # Readers see no folder or a complete one: every file is fsynced before the folder is renamed into place.
    # No marker file (the folder's contents are what they always were); student.json is written last.
    with publishing_dir(out, marker=None, replace=False) as tmp:
        # transformers 5 always writes safetensors; the flag keeps 4.x (still allowed by pyproject) off pickle.
        student.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:  # the teacher's generation_config.json replaces the derived one
            if (teacher / name).is_file():
                shutil.copy2(teacher / name, tmp / name)
        publish_json(tmp / "student.json", {
            "teacher": str(teacher.resolve()), "teacher_fingerprint": model_fingerprint(str(teacher)),
            "kept_layers": kept, "teacher_layers": n_teacher, "dtype": dtype,
            "params_teacher": sum(p.numel() for p in model.parameters()),
            "params_student": sum(p.numel() for p in student.parameters()), **(provenance or {})})
    return out


def _vocab_size(folder: Path) -> int | None:
    config = json.loads((folder / "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if size is not None else None


def check_same_vocab(teacher: Path, student: Path) -> None:
    """Raise ValueError unless teacher and student share one tokenizer and one vocabulary size.

    Logit distillation compares distributions token id by token id, so a different tokenizer is a silent error.
    """
    from sharding.tokenize import TokenizerError, tokenizer_fingerprint

    digests = []
    for folder in (teacher, student):
        try:
            digests.append(tokenizer_fingerprint(folder))
        except TokenizerError as e:
            raise ValueError(f"{folder}: cannot check that the vocabularies match: {e}") from None
    if digests[0] != digests[1]:
        raise ValueError(f"teacher and student tokenizers differ (sha256 {digests[0][:12]}… vs {digests[1][:12]}…): "
                         "distillation needs one vocabulary")
    sizes = _vocab_size(teacher), _vocab_size(student)
    if sizes[0] != sizes[1]:
        raise ValueError(f"teacher and student vocabulary sizes differ ({sizes[0]} vs {sizes[1]}): "
                         "distillation needs one vocabulary")
