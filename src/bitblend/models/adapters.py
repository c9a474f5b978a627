"""LoRA adapters over a frozen backbone, built with peft (`model.adapter`, docs/peft.md).

`add_lora` wraps the backbone of a MultiTaskModel with `peft.get_peft_model`: peft replaces
the target Linear layers in place (the model's `backbone` stays the same transformers
object, its target layers gain `base_layer` + `lora_A` / `lora_B`) and freezes every other
backbone weight. Task heads, modality adapters (patch / feature / own-vocabulary
embeddings) and the modality-type table live outside the backbone and stay trainable. The
PeftModel wrapper is kept beside the model (not as a submodule, so parameter names and the
state_dict keep the `backbone.` prefix) for what only it does: `save_pretrained` in peft's
layout, loading that layout back, and `merge_and_unload`.

A run's `model/` then holds the frozen base in transformers' save_pretrained layout (LoRA
keys dropped, `base_layer.` folded back), heads.safetensors, bitblend.json with the adapter
settings, and `model/adapter/` (adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bitblend.config.schema import AdapterConfig
from bitblend.errors import BitblendError
from bitblend.models.backbones import save_lm_pretrained
from bitblend.models.trunk import MultiTaskModel

ADAPTER_DIR = "adapter"  # model/adapter/: peft's save_pretrained layout
_PEFT = "_bitblend_peft"  # the PeftModel, kept in the model's __dict__ (not a submodule)
_OWN = "_bitblend_own_adapters"  # tasks with their own adapter

# Role names a recipe may use for every architecture: the layer names per family, with
# GPT-2's fused q/k/v projection (c_attn) standing for each of them.
TARGET_ALIASES = {
    "query": ("query", "q_proj", "q_lin", "c_attn"),
    "key": ("key", "k_proj", "k_lin", "c_attn"),
    "value": ("value", "v_proj", "v_lin", "c_attn"),
}


def _peft() -> Any:
    """The peft package (imported on first use: it takes seconds to import)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torchao").setLevel(logging.ERROR)
            import peft
    except ImportError:
        raise BitblendError(
            "model.adapter.kind: lora needs the peft package (pip install peft)"
        ) from None
    return peft


def _linear_names(backbone: nn.Module) -> list[str]:
    """Names of the backbone's Linear (and GPT-2 Conv1D) layers: what LoRA can wrap."""
    return [
        name
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    ]


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(backbone: nn.Module, targets: list[str] | str) -> list[str] | str:
    """peft's target_modules for `targets` on this backbone; a target naming no Linear layer
    is a one-line error naming it."""
    if targets == "all-linear":
        return "all-linear"
    names = _linear_names(backbone)
    out: list[str] = []
    for target in targets:
        found = [
            s for s in TARGET_ALIASES.get(target, (target,)) if any(_matches(n, s) for n in names)
        ]
        if not found:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise BitblendError(
                f"model.adapter.targets: {target!r} matches no Linear layer of the backbone "
                f"(its Linear layers are named {', '.join(leaves[:12])}); or use all-linear"
            )
        out.extend(s for s in found if s not in out)
    return out


def lora_config(cfg: AdapterConfig, backbone: nn.Module) -> Any:
    """The peft LoraConfig of `cfg` for this backbone."""
    targets = resolve_targets(backbone, cfg.targets)
    conv1d = any(type(m).__name__ == "Conv1D" for m in backbone.modules())
    return _peft().LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores W as (in, out)
    )


def adapter_name(task: str) -> str:
    """The peft adapter name of a task's own adapter (the shared one is peft's `default`)."""
    return f"task_{task}"


def add_lora(model: MultiTaskModel, cfg: AdapterConfig, own: Sequence[str] = ()) -> Any:
    """Freeze `model`'s backbone and give it LoRA adapters (B zero-initialised, so the model
    computes exactly what it did before): the shared one, plus one per task in `own`
    (tasks[i].adapter: own); returns the PeftModel."""
    peft = _peft()
    config = lora_config(cfg, model.backbone)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices, deprecation chatter
        wrapped = peft.get_peft_model(model.backbone, config)
        for task in own:
            # The config resolved on the plain backbone (target layers are wrapped now).
            wrapped.add_adapter(adapter_name(task), copy.deepcopy(config))
    if own:
        # peft freezes every adapter but the active one; each task's adapter trains on its
        # own batches, so all of them stay trainable (an idle one just gets no gradient).
        for name, p in model.backbone.named_parameters():
            if any(part.startswith("lora_") for part in name.split(".")):
                p.requires_grad_(True)
    model.__dict__[_PEFT] = wrapped
    set_lm_heads_trainable(model, cfg.train_lm_head)
    _route(model, own)
    return wrapped


def checkpoint_lm_heads(model: MultiTaskModel) -> list[str]:
    """Tasks whose head is the checkpoint's own LM head (HeadSpec.lm_head), which
    `model.adapter.train_lm_head` governs; fresh heads always train."""
    return [task for task, spec in model.specs.items() if spec.lm_head]


def set_lm_heads_trainable(model: MultiTaskModel, train: bool) -> None:
    """Freeze (or unfreeze) the checkpoint's LM heads. peft freezes only the backbone it
    wraps; bitblend's LM head lives outside it, and training it costs a full-precision
    weight, gradient and two Adam states per vocab x width weight: on llama-15m the head
    alone held more model state than the NF4 base and its adapters together. A head tied
    to the token table shares that tensor, so `train` there trains the table too."""
    for task in checkpoint_lm_heads(model):
        model.heads[task].requires_grad_(train)


def _route(model: MultiTaskModel, own: Sequence[str]) -> None:
    """Send each forward of a task in `own` through that task's adapter, every other task
    through the shared one (a forward pre-hook: batches are one task each)."""
    if not own:
        return
    peft = _peft()
    layers = [
        m
        for m in model.backbone.modules()
        if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)
    ]
    routes = {task: adapter_name(task) for task in own}

    def pick(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        task = args[0] if args else kwargs.get("task")
        active = [routes.get(str(task), "default")]
        for layer in layers:
            # Set the active adapter without peft's set_adapter, which would also flip
            # requires_grad (and so the optimizer's and the checkpoint's parameter sets).
            layer._active_adapter = active

    model.register_forward_pre_hook(pick, with_kwargs=True)
    model.__dict__[_OWN] = list(own)


def peft_model(model: nn.Module) -> Any | None:
    """The PeftModel around `model`'s backbone, or None when it has no adapter."""
    return model.__dict__.get(_PEFT)


def checkpoint_filter(model: nn.Module) -> Callable[[str], bool] | None:
    """Which state_dict keys a checkpoint must hold: with adapters, the trainable parameters
    and everything outside the backbone but frozen parameters (the frozen base and a frozen
    LM head are rebuilt from the recipe); None (everything) without."""
    if peft_model(model) is None:
        return None
    named = list(model.named_parameters(remove_duplicate=False))  # a tied head under both names
    trainable = {n for n, p in named if p.requires_grad}
    # Frozen parameters outside the backbone (a frozen LM head) are rebuilt from the recipe
    # like the base: saving them would also round-trip them through their low-bit format.
    frozen = {n for n, p in named if not p.requires_grad}
    return lambda name: name in trainable or not (name.startswith("backbone.") or name in frozen)


def base_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen base's weights under plain transformers keys: LoRA tensors dropped,
    peft's `base_layer.` folded back (low-bit layers hand back dequantised weights)."""
    out = {}
    for key, value in backbone.state_dict().items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().contiguous()
    return out


def save_model(
    model: MultiTaskModel,
    directory: Path,
    tokenizer: Any,
    task_tokenizers: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    adapter: AdapterConfig | None = None,
) -> None:
    """`model.save`, and with adapters: the base in save_pretrained layout plus
    `adapter/` in peft's layout (adapter settings recorded in bitblend.json)."""
    wrapped = peft_model(model)
    if wrapped is None:
        model.save(directory, tokenizer, task_tokenizers, extra)
        return
    settings: dict[str, Any] = asdict(adapter) if adapter is not None else {"kind": "lora"}
    settings["own"] = list(model.__dict__.get(_OWN, []))  # tasks with their own adapter
    info = {"adapter": settings}
    model.save(directory, tokenizer, task_tokenizers, {**(extra or {}), **info})
    # Overwrite the trunk model.save wrote (LoRA keys inside) with the plain base; a run
    # with an LM head saves it in the same checkpoint class model.save used (a bare
    # backbone checkpoint there would drop the trained head: from_pretrained re-initialises it).
    base = base_state_dict(model.backbone)
    lm_task = model.lm_checkpoint_task
    if lm_task is not None:
        head, arch = model.heads[lm_task], model.specs[lm_task].lm_head
        save_lm_pretrained(directory, model.backbone, head, arch, base_state=base)
    else:
        model.backbone.save_pretrained(directory, state_dict=base)  # type: ignore[operator]
    _record_widest_dtype(directory, [*base.values(), *model.heads.parameters()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped.save_pretrained(str(directory / ADAPTER_DIR))


def _record_widest_dtype(directory: Path, tensors: Sequence[torch.Tensor]) -> None:
    """Set config.json's dtype to the widest float format saved. save_pretrained records
    the model's first parameter's, and from_pretrained loads every weight in it: a frozen
    bf16 token table (base_bits 16) would round the fp32 norms and LM head saved beside it."""
    from transformers import AutoConfig

    widest = max((t.dtype for t in tensors if t.is_floating_point()), key=lambda d: d.itemsize)
    config = AutoConfig.from_pretrained(directory)
    if config.dtype != widest:
        config.dtype = widest
        config.save_pretrained(directory)


def load_adapter(model: MultiTaskModel, directory: Path, meta: dict[str, Any]) -> bool:
    """Put the saved adapter of a model directory back on its (reloaded) base; False when
    the directory has none."""
    if "adapter" not in meta:
        return False
    path = directory / ADAPTER_DIR
    if not (path / "adapter_config.json").is_file():
        raise BitblendError(f"{directory}: bitblend.json names an adapter but {path} is missing")
    peft = _peft()
    own = list(meta["adapter"].get("own", []))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.PeftModel.from_pretrained(model.backbone, str(path))
        for task in own:  # save_pretrained put each non-default adapter in a sub-folder
            name = adapter_name(task)
            wrapped.load_adapter(str(path / name), adapter_name=name)
    model.__dict__[_PEFT] = wrapped
    if "train_lm_head" in meta["adapter"]:  # older runs trained every head
        # A frozen head is stored in the base's format again when the run is served in its
        # training precision (freeze_base takes frozen layers), as it was in training.
        set_lm_heads_trainable(model, bool(meta["adapter"]["train_lm_head"]))
    _route(model, own)
    return True


def merge_lora(model: MultiTaskModel) -> None:
    """Fold the adapters into the base weights (W + alpha/r * B @ A) in place: afterwards
    `model` is a plain MultiTaskModel that saves and loads without peft."""
    if model.__dict__.get(_OWN):
        raise BitblendError(
            "tasks[i].adapter: own: merge --method lora-merge folds one adapter into the base; "
            f"this run has per-task adapters ({', '.join(model.__dict__[_OWN])}): train with "
            "adapter: shared to merge"
        )
    wrapped = model.__dict__.pop(_PEFT, None)
    if wrapped is None:
        raise BitblendError("merge --method lora-merge: the run has no LoRA adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.backbone = wrapped.merge_and_unload()
