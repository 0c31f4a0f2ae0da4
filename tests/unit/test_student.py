"""Depth-pruned students: exact copies of the kept teacher layers, on real (tiny) Hugging Face models."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from sharding.tokenize import train_bpe_tokenizer
from training.student import (
    _student_config,
    block_influence,
    check_same_vocab,
    choose_layers,
    choose_layers_by_influence,
    fit_bridges,
    student_from_teacher,
)
from training.tiny import build_tiny_llama

PROBE = (torch.arange(40).reshape(2, 20) * 37 % 300).long()  # fixed token ids, all inside the tiny vocabularies


def _sentences(seed: int, n: int = 300) -> list[str]:
    rng = random.Random(seed)
    subjects = ["The miller", "A young clerk", "The old ferryman", "Her neighbour", "The river pilot", "A weaver"]
    verbs = ["carried", "repaired", "sold", "painted", "counted", "forgot", "borrowed", "measured"]
    objects = ["the wooden oars", "a basket of apples", "three copper kettles", "the harbour lamps", "his ledger"]
    tails = ["before the storm.", "at dawn.", "for the winter fair.", "without a word.", "near the mill pond."]
    return [" ".join(rng.choice(part) for part in (subjects, verbs, objects, tails)) for _ in range(n)]


def _save(model: Any, tokenizer_json: Path, out: Path) -> Path:
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy2(tokenizer_json, out / "tokenizer.json")
    return out


def _load(folder: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe_tokenizer(_sentences(0), 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def teachers(tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """6-layer teachers: Llama tied (tiny.py) and untied, GPT-2 (layers under `transformer.h`)."""
    root = tmp_path_factory.mktemp("teachers")
    tied = build_tiny_llama(tokenizer, root / "llama-tied", layers=6)
    config = AutoConfig.from_pretrained(tied)
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    untied = _save(AutoModelForCausalLM.from_config(config), tokenizer, root / "llama-untied")
    vocab = config.vocab_size
    torch.manual_seed(2)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=6, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
    return {"llama-tied": tied, "llama-untied": untied, "gpt2": _save(gpt2, tokenizer, root / "gpt2")}


@pytest.mark.parametrize(("n", "k", "expected"), [
    (12, 6, [0, 2, 4, 7, 9, 11]),
    (30, 15, [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]),  # 14.5 rounds up to 15
    (4, 2, [0, 3]),
    (5, 5, [0, 1, 2, 3, 4]),
    (6, 3, [0, 3, 5]),
    (1, 1, [0]),
])
def test_choose_layers(n: int, k: int, expected: list[int]) -> None:
    assert choose_layers(n, k) == expected


@pytest.mark.parametrize(("n", "k", "message"), [
    (12, 1, "at least 2 layers"), (12, 0, "at least 2 layers"), (4, 5, "more layers"), (1, 2, "more layers"),
    (0, 0, "at least 1 layer"),
])
def test_choose_layers_errors(n: int, k: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_layers(n, k)


@pytest.mark.parametrize(("name", "prefix"), [
    ("llama-tied", "model.layers."), ("llama-untied", "model.layers."), ("gpt2", "transformer.h.")])
def test_student_copies_kept_layers_exactly(teachers: dict[str, Path], tmp_path: Path, name: str, prefix: str) -> None:
    folder = student_from_teacher(teachers[name], tmp_path / "student", layers=3)
    teacher, student = _load(teachers[name]), _load(folder)
    assert student.config.num_hidden_layers == 3
    info = json.loads((folder / "student.json").read_text())
    assert info["kept_layers"] == [0, 3, 5] and info["teacher_layers"] == 6
    assert info["params_student"] == sum(p.numel() for p in student.parameters()) < info["params_teacher"]
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").read_bytes() == (teachers[name] / "tokenizer.json").read_bytes()

    t_state, s_state = teacher.state_dict(), student.state_dict()
    for j, i in enumerate(info["kept_layers"]):
        t_layer = {k.removeprefix(f"{prefix}{i}."): v for k, v in t_state.items() if k.startswith(f"{prefix}{i}.")}
        s_layer = {k.removeprefix(f"{prefix}{j}."): v for k, v in s_state.items() if k.startswith(f"{prefix}{j}.")}
        assert t_layer and s_layer.keys() == t_layer.keys()
        for key, tensor in t_layer.items():
            assert torch.equal(s_layer[key], tensor), f"student layer {j} {key} != teacher layer {i}"
    rest = {k for k in t_state if not k.startswith(prefix)}  # embeddings, final norm, head
    assert rest == {k for k in s_state if not k.startswith(prefix)}
    assert all(torch.equal(s_state[k], t_state[k]) for k in rest)

    head, embed = student.get_output_embeddings().weight, student.get_input_embeddings().weight
    assert student.config.tie_word_embeddings == teacher.config.tie_word_embeddings
    assert (head.data_ptr() == embed.data_ptr()) == (name != "llama-untied")  # tied stays tied, untied stays apart
    with torch.no_grad():
        assert not torch.allclose(student(PROBE).logits, teacher(PROBE).logits)  # a different, shallower network
        generated = student.generate(PROBE[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 9)


@pytest.mark.parametrize("name", ["llama-tied", "llama-untied", "gpt2"])
def test_student_with_all_layers_is_the_teacher(teachers: dict[str, Path], tmp_path: Path, name: str) -> None:
    folder = student_from_teacher(teachers[name], tmp_path / "student", keep=range(6))
    with torch.no_grad():
        assert torch.equal(_load(folder)(PROBE).logits, _load(teachers[name])(PROBE).logits)


def test_bf16_student_holds_the_teachers_bf16_weights(teachers: dict[str, Path], tmp_path: Path) -> None:
    folder = student_from_teacher(teachers["llama-untied"], tmp_path / "student", layers=2, dtype="bf16")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    teacher = _load(teachers["llama-untied"]).to(torch.bfloat16).state_dict()
    assert all(t.dtype == torch.bfloat16 for t in saved.values())
    assert torch.equal(saved["model.layers.1.mlp.up_proj.weight"], teacher["model.layers.5.mlp.up_proj.weight"])
    assert torch.equal(saved["lm_head.weight"], teacher["lm_head.weight"])


def test_per_layer_config_lists_are_sliced(tokenizer: Path, teachers: dict[str, Path], tmp_path: Path) -> None:
    """Qwen3 keeps a layer_types list; a kept sliding layer must stay sliding (the window is shorter than PROBE)."""
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen3Config(vocab_size=AutoConfig.from_pretrained(teachers["gpt2"]).vocab_size, hidden_size=32,
                         intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, layer_types=types, sliding_window=4, use_sliding_window=True)
    torch.manual_seed(3)
    teacher = _save(Qwen3ForCausalLM(config), tokenizer, tmp_path / "qwen3")
    folder = student_from_teacher(teacher, tmp_path / "student", keep=[1, 2])
    assert _load(folder).config.layer_types == ["sliding_attention", "full_attention"]
    everything = student_from_teacher(teacher, tmp_path / "all", layers=4)
    assert _load(everything).config.layer_types == types
    with torch.no_grad():
        assert torch.equal(_load(everything)(PROBE).logits, _load(teacher)(PROBE).logits)


def test_layer_index_lists_are_remapped_or_refused() -> None:
    config = LlamaConfig.from_dict({"num_hidden_layers": 6, "mlp_only_layers": [3, 4]})
    assert _student_config(config, [0, 3, 5]).mlp_only_layers == [1]  # teacher layer 3 is student layer 1
    with pytest.raises(ValueError, match="'skip_layers'"):  # a layer list of unknown meaning is not guessed at
        _student_config(LlamaConfig.from_dict({"num_hidden_layers": 6, "skip_layers": [2]}), [0, 3, 5])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"keep": [3, 1]}, "strictly increasing"), ({"keep": [0, 6]}, "strictly increasing"), ({"keep": []}, "strictly"),
    ({"layers": 7}, "more layers"), ({}, "exactly one"), ({"layers": 2, "keep": [0, 5]}, "exactly one"),
    ({"layers": 2, "dtype": "int8"}, "dtype")])
def test_bad_requests_fail_before_anything_is_written(teachers: dict[str, Path], tmp_path: Path,
                                                      kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        student_from_teacher(teachers["llama-tied"], tmp_path / "s", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_never_overwritten(teachers: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        student_from_teacher(teachers["llama-tied"], tmp_path / "taken", layers=2)


def test_check_same_vocab(teachers: dict[str, Path], tmp_path: Path) -> None:
    teacher = teachers["llama-tied"]
    student = student_from_teacher(teacher, tmp_path / "student", layers=2)
    check_same_vocab(teacher, student)

    other_tok = train_bpe_tokenizer([s.upper() for s in _sentences(1)], 300, tmp_path / "tok2")
    other = student_from_teacher(build_tiny_llama(other_tok, tmp_path / "t2", layers=4), tmp_path / "s2", layers=2)
    with pytest.raises(ValueError, match=r"^teacher and student tokenizers differ \(sha256 [0-9a-f]{12}… vs "
                                         r"[0-9a-f]{12}…\): distillation needs one vocabulary$"):
        check_same_vocab(teacher, other)

    config = json.loads((student / "config.json").read_text())
    (student / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        check_same_vocab(teacher, student)


@pytest.mark.parametrize(("influence", "k", "expected"), [
    ([0.9, 0.1, 0.5, 0.3, 0.2, 0.05], 4, [0, 2, 3, 5]),  # ends kept even when the last scores lowest
    ([0.9, 0.2, 0.2, 0.2, 0.2, 0.9], 3, [0, 1, 5]),  # ties go to the earlier layer
    ([0.1, 0.5, 0.4], 3, [0, 1, 2]),
    ([0.1, 0.5, 0.4, 0.3], 2, [0, 3]),
])
def test_choose_layers_by_influence(influence: list[float], k: int, expected: list[int]) -> None:
    assert choose_layers_by_influence(influence, k) == expected


def test_choose_layers_by_influence_checks_counts() -> None:
    with pytest.raises(ValueError, match="more layers"):
        choose_layers_by_influence([0.1, 0.2], 3)
    with pytest.raises(ValueError, match="at least 2 layers"):
        choose_layers_by_influence([0.1, 0.2, 0.3], 1)


@pytest.mark.parametrize("name", ["llama-tied", "gpt2"])
def test_a_layer_that_passes_its_input_through_has_no_influence(teachers: dict[str, Path], name: str) -> None:
    # Zeroing the projections that write into the residual stream makes layer 3 the identity (output = input).
    model = _load(teachers[name])
    writes = ("self_attn.o_proj", "mlp.down_proj") if name.startswith("llama") else ("attn.c_proj", "mlp.c_proj")
    prefix = "model.layers.3." if name.startswith("llama") else "transformer.h.3."
    with torch.no_grad():
        for module in writes:
            for tensor in model.get_submodule(prefix + module).parameters():
                tensor.zero_()
    # Not the pad token (id 0): its embedding is zero, and a zero vector has no direction to compare.
    influence = block_influence(model, PROBE.clamp(min=1), batch=1)
    assert len(influence) == 6
    assert abs(influence[3]) < 1e-9, influence
    assert min(x for i, x in enumerate(influence) if i != 3) > 1e-4, influence
    assert 3 not in choose_layers_by_influence(influence, 5)


CALIBRATION = (torch.arange(8 * 32).reshape(8, 32) * 37 % 299 + 1).long()  # 256 tokens > 64 wide: a full-rank fit


def _residual_error(model: Any, layer: int, rows: torch.Tensor, target: torch.Tensor) -> float:
    """Relative squared error of the residual stream leaving `layer` of `model` against `target`."""
    seen: list[torch.Tensor] = []
    handle = model.model.layers[layer].register_forward_hook(lambda m, a, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).double()))
    with torch.no_grad():
        model(input_ids=rows)
    handle.remove()
    return float((target - seen[0]).pow(2).mean() / target.pow(2).mean())


def _teacher_outputs(model: Any, rows: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        states = model(input_ids=rows, output_hidden_states=True).hidden_states
    return [h.double() for h in states[1:-1]]  # output of layer i (the last one is after the final norm)


def test_bridges_fit_the_teachers_state_after_each_removed_block(teachers: dict[str, Path], tmp_path: Path) -> None:
    keep = [0, 2, 5]  # removed blocks: layer 1 (bridged in layer 0) and layers 3-4 (bridged in layer 2)
    teacher = _load(teachers["llama-tied"])
    plain = _load(student_from_teacher(teachers["llama-tied"], tmp_path / "plain", keep=keep))
    out = student_from_teacher(teachers["llama-tied"], tmp_path / "bridged", keep=keep, bridge_rows=CALIBRATION)
    bridged = _load(out)
    bridges = json.loads((out / "student.json").read_text())["bridges"]
    assert [(b["student_layer"], b["teacher_layer"], b["replaces"]) for b in bridges] == [(0, 0, [1]), (1, 2, [3, 4])]
    outputs = _teacher_outputs(teacher, CALIBRATION)
    for b in bridges:
        target = outputs[b["replaces"][-1]]
        # Recomputed from the saved student: the fold into the weights is the map that was fitted...
        assert _residual_error(bridged, b["student_layer"], CALIBRATION, target) == pytest.approx(
            b["relative_error_after"], rel=1e-3, abs=1e-9)
        assert b["relative_error_after"] < b["relative_error_before"]
    # ...and the first gap's error before bridging is the plain student's (later ones start from bridged input).
    assert _residual_error(plain, 0, CALIBRATION, outputs[1]) == pytest.approx(
        bridges[0]["relative_error_before"], rel=1e-3)
    # Only the MLP output projections before a gap change.
    changed = {k for k, v in bridged.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    with torch.no_grad():
        logits = teacher(input_ids=CALIBRATION).logits
        gap = [float((m(input_ids=CALIBRATION).logits - logits).pow(2).mean()) for m in (plain, bridged)]
    assert gap[1] < gap[0], gap


def test_a_removed_layer_that_passes_its_input_through_needs_no_bridge(teachers: dict[str, Path]) -> None:
    teacher = _load(teachers["llama-tied"])
    with torch.no_grad():  # layer 3 becomes the identity, so keeping [0, 1, 2, 4, 5] loses nothing
        for module in ("self_attn.o_proj", "mlp.down_proj"):
            teacher.get_submodule(f"model.layers.3.{module}").weight.zero_()
    student = _load(teachers["llama-tied"])
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in (0, 1, 2, 4, 5)])
    for j, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = j
    student.config.num_hidden_layers = 5
    fitted = fit_bridges(teacher, student, [0, 1, 2, 4, 5], CALIBRATION, ridge=1e-12)
    assert [b["replaces"] for b in fitted] == [[3]] and fitted[0]["relative_error_before"] < 1e-12
    with torch.no_grad():
        assert torch.allclose(student(input_ids=CALIBRATION).logits, teacher(input_ids=CALIBRATION).logits, atol=1e-5)


def test_bridges_refuse_layers_that_are_not_llama_style(teachers: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"student bridges need Llama-style pre-norm decoder layers .* GPT2Block"):
        student_from_teacher(teachers["gpt2"], tmp_path / "s", keep=[0, 2, 5], bridge_rows=CALIBRATION)
    assert not (tmp_path / "s").exists()
