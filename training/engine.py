"""Distributed start-up, the model, and the DeepSpeed engine, all from the stillroom config.

The same code runs with gloo on CPU (tests, this machine) and NCCL on GPUs (clusters): the backend
and device follow from whether CUDA is available, and rendezvous comes from the task environment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch

from common.checksum import xxh3_file
from slurm.taskenv import TaskEnv
from training.config import TrainConfig

Config = TypeVar("Config", bound=TrainConfig)


def setup_distributed(env: TaskEnv) -> torch.device:
    """Join the job's process group; returns this rank's device."""
    on_gpu = torch.cuda.is_available()
    os.environ.update(env.torch_env())
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=30))
    if on_gpu:
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def for_device(cfg: Config, device: torch.device) -> Config:
    """`cfg` with its "auto" choices made for `device`, and the device's fp32 matmul precision set (TF32).

    On a GPU: bf16 when the device has it (DeepSpeed keeps fp32 master weights and optimizer state; fp32 runs
    matmuls at a few per cent of the tensor cores' bf16 rate), and flash-attention 2 when the flash_attn package
    is installed (in bf16 only: it has no fp32 kernel). On CPU: fp32 and transformers' own choice of attention
    (sdpa where the architecture has it), as before. Called by every training entrypoint once the device is
    known: the config is resolved on the login node, which may have no GPU.
    """
    gpu = device.type == "cuda"
    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"
    attention = cfg.model.attention
    if attention == "auto":
        flash = gpu and dtype == "bf16" and importlib.util.find_spec("flash_attn") is not None
        attention = "flash_attention_2" if flash else "auto"  # "auto" stays: transformers' default
    if gpu and cfg.engine.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True  # a process-wide setting of torch, made once per task
        torch.backends.cudnn.allow_tf32 = True
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=dtype, attention=attention))


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[leaf] = value


def deepspeed_config(cfg: TrainConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; saved beside the checkpoints. The LR is set by the loop."""
    zero: dict[str, Any] = {"stage": cfg.engine.zero_stage}
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.engine.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.engine.zero_stage == 3:
        # Consolidated 16-bit weights on save, so the export needs no offline conversion step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if on_gpu and cfg.engine.zero_stage in (1, 2):
        # Gradients reduced in buckets while the backward pass still runs, from one contiguous buffer (less
        # fragmentation); both are off by default in DeepSpeed for these stages (stage 3 overlaps already). On
        # CPU gloo has no separate stream to overlap on, so CPU runs keep DeepSpeed's defaults.
        zero["overlap_comm"] = cfg.engine.overlap_comm
        zero["contiguous_gradients"] = True
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.engine.micro_batch,
        "gradient_accumulation_steps": cfg.engine.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.optim.lr, "betas": [cfg.optim.beta1, cfg.optim.beta2], "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
            # FusedAdam/CPUAdam would JIT-compile for minutes; torch's AdamW is exact and fine on CPU.
            "torch_adam": not on_gpu}},
        "bf16": {"enabled": cfg.model.dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    for key, text in cfg.engine.overrides.items():
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        _set_dotted(config, key, value)
    return config


def model_fingerprint(path: str) -> str:
    """Identity of a model's architecture (its config.json), so a resume onto another model is refused."""
    config = json.loads((Path(path) / "config.json").read_text())
    config.pop("transformers_version", None)
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# What a model folder's weights may be stored as (what from_pretrained and the GGUF import read).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def weights_fingerprint(path: str | Path) -> str:
    """Identity of a model's weights: sha256 over the name, size and XXH3 of every weight file at the top of its
    folder (where from_pretrained reads them), in name order; model_fingerprint covers only its config.

    Cost: reads every weight byte once, 16 GB for an 8B model in bf16. XXH3 runs at memory speed, so the read
    decides: measured here (2 shared cores, a 2 GiB file) 3.3 GB/s from the page cache and 0.6 GB/s from this
    VM's disk, i.e. 5 s and 27 s for 16 GB; on a cluster the read bandwidth of one reader decides. Call it in
    one process: `shared_weights_fingerprint`.
    """
    folder = Path(path)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ValueError(f"model '{folder}' has no weight files ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")
    listing = "".join(f"{p.name}\0{p.stat().st_size}\0{xxh3_file(p)}\n" for p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def shared_weights_fingerprint(path: str | Path) -> str:
    """weights_fingerprint read once: by rank 0, broadcast to the others when a process group is up (every
    rank must call it then), so that N ranks do not each read the whole model (N x 16 GB for 8B in bf16)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return weights_fingerprint(path)
    answer: list[tuple[str, str] | None] = [None]
    if dist.get_rank() == 0:
        try:
            answer = [("ok", weights_fingerprint(path))]
        except (OSError, ValueError) as e:  # sent on: the other ranks must not wait in the broadcast for good
            answer = [("error", str(e))]
    dist.broadcast_object_list(answer, src=0)
    kind, text = answer[0] or ("error", "rank 0 sent no weights fingerprint")
    if kind == "error":
        raise ValueError(text)
    return text


def load_model(path: str, dtype: str, *, dropout: float = -1.0, gradient_checkpointing: bool = False,
               attention: str = "auto") -> torch.nn.Module:
    """A local Hugging Face causal LM in `dtype` ("fp32" or "bf16"; "auto" is fp32: see `for_device`); `dropout`
    >= 0 overrides its dropout rates (-1: keep them); `attention` names the attention implementation ("auto":
    transformers' choice)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"model '{path}' is not a local Hugging Face model folder (no config.json)")
    overrides: dict[str, Any] = {} if attention == "auto" else {"attn_implementation": attention}
    if dropout >= 0:
        config = AutoConfig.from_pretrained(path)
        overrides |= {k: dropout for k in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
                                           "attn_pdrop", "dropout") if hasattr(config, k)}
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, **overrides)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def load_for_engine(cfg: TrainConfig, on_gpu: bool) -> torch.nn.Module:
    """The model of `cfg` (resolved by `for_device`) as its DeepSpeed engine gets it.

    With ZeRO-3 it is built under DeepSpeed's zero.Init (transformers' HfDeepSpeedConfig, alive while the model
    loads): each parameter is partitioned as it is created, so no rank ever holds the whole model (8 ranks of a
    node would otherwise each hold all 16 GB of an 8B model in bf16 before DeepSpeed partitions it).
    """
    partitioned = None
    if cfg.engine.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        partitioned = HfDeepSpeedConfig(deepspeed_config(cfg, on_gpu))  # transformers keeps only a weak reference
    model = load_model(cfg.model.path, cfg.model.dtype, dropout=cfg.model.dropout,
                       gradient_checkpointing=cfg.model.gradient_checkpointing, attention=cfg.model.attention)
    del partitioned  # from here on a model loaded elsewhere in the process (the export check) loads whole
    return model


def build_engine(cfg: TrainConfig, model: torch.nn.Module, on_gpu: bool) -> Any:
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=deepspeed_config(cfg, on_gpu))
    return engine


def _device_name(offload: Any) -> str | None:
    """An offload setting's device ("cpu", "nvme"), or None when nothing is offloaded."""
    device = getattr(offload, "device", None)
    name = None if device is None else str(getattr(device, "value", device))  # an enum in DeepSpeed's config
    return None if name in (None, "none") else name


def _checkpointing(module: Any) -> bool:
    """Whether activation (gradient) checkpointing is on: transformers 5 names it `is_activation_checkpointing`
    (and warns on the old name), 4.x `is_gradient_checkpointing`."""
    flag = getattr(module, "is_activation_checkpointing", None)
    return bool(getattr(module, "is_gradient_checkpointing", False) if flag is None else flag)


def engine_summary(engine: Any) -> dict[str, Any]:
    """What a built engine actually runs with, read from it rather than from the config (a DeepSpeed override or
    an "auto" choice may differ from what the config says): recorded once per attempt as the `setup` event."""
    module = engine.module
    offload_opt, offload_param = engine.zero_offload_optimizer(), engine.zero_offload_param()
    return {"zero_stage": int(engine.zero_optimization_stage()), "bf16": bool(engine.bfloat16_enabled()),
            "param_dtype": str(next(module.parameters()).dtype).removeprefix("torch."),
            "attention": getattr(module.config, "_attn_implementation", None),
            "gradient_checkpointing": _checkpointing(module),
            "offload_optimizer": _device_name(offload_opt), "offload_params": _device_name(offload_param),
            "gradient_clipping": float(engine.gradient_clipping()),
            "micro_batch": int(engine.train_micro_batch_size_per_gpu()),
            "grad_accum": int(engine.gradient_accumulation_steps())}
