"""Adapters through PEFT, and the factor groups every method reasons about.

Factors are found structurally by walking PEFT's adapter layers (``LoraLayer``'s
``lora_A``/``lora_B``, ``VeraLayer``'s ``vera_lambda_d``/``vera_lambda_b``, and
``ModulesToSaveWrapper`` for the head), never by pattern-matching state-dict keys. Each
trainable tensor gets a :class:`Factor`: its parameter name, the adapted module, the
transformer layer index, and its role (``A``, ``B`` or ``head``). VeRA's ``lambda_d`` plays the
role of ``A`` (shared, down side) and ``lambda_b`` the role of ``B``, as in the FedSA-LoRA code.

``adapter.target_modules: [auto]`` takes PEFT's own per-architecture list (``c_attn`` for GPT-2,
``q_proj``/``v_proj`` for Llama-style decoders, ``query``/``value`` for BERT). A model without a
head module (a decoder LM) has no ``head`` factors. Base weights of GPT-2's ``Conv1D`` layers are
stored (in, out); :class:`AdaptedModel` reads and writes them as (out, in), like an ``nn.Linear``'s,
so the exact-aggregation methods see ``W0`` in the orientation of ``B @ A``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlora.pointwise import use_pointwise

ADAPTER = "default"
_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|blocks|block)\.(\d+)\.")


@dataclass(frozen=True)
class Factor:
    name: str  # parameter name in model.named_parameters()
    module: str  # adapted module path (PEFT wrapper prefix removed)
    layer: int | None  # transformer layer index (None for the head)
    role: str  # "A" | "B" | "head"


def layer_index(module_name: str) -> int | None:
    match = _LAYER_INDEX.search(f".{module_name}.")
    return int(match.group(1)) if match else None


def resolve_target_modules(model: nn.Module, cfg: Any) -> list[str]:
    """``cfg.target_modules``, with ``[auto]`` replaced by PEFT's default for the model's architecture."""
    if list(cfg.target_modules) != ["auto"]:
        return list(cfg.target_modules)
    from peft.utils import constants  # noqa: PLC0415

    mapping = (constants.TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING if cfg.type == "vera"
               else constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
    model_type = next((getattr(m.config, "model_type", None) for m in model.modules() if hasattr(m, "config")), None)
    if model_type not in mapping:
        from fedlora.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"adapter.target_modules=[auto] knows no default for model type '{model_type}'; "
                          "name the layers to adapt, e.g. adapter.target_modules=[q_proj,v_proj]")
    return list(mapping[model_type])


def _peft_config(cfg: Any, head: list[str] | None, targets: list[str] | None = None, fan_in_fan_out: bool = False) -> Any:
    """``fan_in_fan_out``: the targets are GPT-2's Conv1D (weight (in, out)); PEFT would set it itself, with a warning."""
    import peft  # noqa: PLC0415

    common = {
        "target_modules": list(cfg.target_modules) if targets is None else targets,
        "modules_to_save": head,
        "layers_to_transform": cfg.layers,
    }
    if cfg.type == "vera":
        return peft.VeraConfig(r=cfg.rank, vera_dropout=cfg.dropout, save_projection=True, **common)
    return peft.LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
        fan_in_fan_out=fan_in_fan_out, **common
    )


def _strip(name: str) -> str:
    return name.removeprefix("base_model.model.")


def find_factors(model: nn.Module) -> list[Factor]:
    """Walk PEFT's adapter layers and name every trainable adapter tensor."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415
    from peft.tuners.vera import VeraLayer  # noqa: PLC0415
    from peft.utils import ModulesToSaveWrapper  # noqa: PLC0415

    factors: list[Factor] = []
    for mname, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            for role, sub in (("A", module.lora_A[ADAPTER]), ("B", module.lora_B[ADAPTER])):
                sub_name = f"{mname}.lora_{role}.{ADAPTER}"
                for pname, _ in sub.named_parameters():
                    factors.append(Factor(f"{sub_name}.{pname}", _strip(mname), layer_index(_strip(mname)), role))
        elif isinstance(module, VeraLayer) and ADAPTER in module.vera_lambda_d:
            for role, key in (("A", "vera_lambda_d"), ("B", "vera_lambda_b")):
                factors.append(Factor(f"{mname}.{key}.{ADAPTER}", _strip(mname), layer_index(_strip(mname)), role))
        elif isinstance(module, ModulesToSaveWrapper) and ADAPTER in module.modules_to_save:
            for pname, _ in module.modules_to_save[ADAPTER].named_parameters():
                factors.append(Factor(f"{mname}.modules_to_save.{ADAPTER}.{pname}", _strip(mname), None, "head"))
    return factors


def base_weight_name(lora_a_name: str) -> str:
    """The frozen weight beside a LoRA A factor: PEFT's ``<module>.base_layer.weight``."""
    return lora_a_name.split(f".lora_A.{ADAPTER}.")[0] + ".base_layer.weight"


def conv1d_base_weights(model: nn.Module) -> frozenset[str]:
    """Names of the frozen base weights that are transformers' ``Conv1D`` (GPT-2: weight (in, out))."""
    try:
        from transformers.pytorch_utils import Conv1D  # noqa: PLC0415
    except ImportError:  # pragma: no cover - transformers is a dependency
        return frozenset()
    return frozenset(f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D) and n.endswith(".base_layer"))


class AdaptedModel:
    """A PEFT model plus its factor table and state get/set by parameter name."""

    def __init__(self, peft_model: nn.Module, factors: list[Factor]) -> None:
        self.model = peft_model
        self.factors = factors
        self.named: dict[str, nn.Parameter] = dict(peft_model.named_parameters())  # every parameter, for load
        self.params: dict[str, nn.Parameter] = {f.name: self.named[f.name] for f in factors}
        self.by_name = {f.name: f for f in factors}
        self.transposed = conv1d_base_weights(peft_model)  # stored (in, out): read and written as (out, in)

    def base_weight_names(self) -> list[str]:
        """Names of the frozen base weights W0 of the LoRA-adapted modules (one per A factor)."""
        names = [base_weight_name(f.name) for f in self.factors if f.role == "A"]
        missing = [n for n in names if n not in self.named]
        if missing:
            raise KeyError(f"no base weight '{missing[0]}' in the model (LoRA adapters only)")
        return names

    def names(self, *, roles: tuple[str, ...] = ("A", "B", "head")) -> list[str]:
        return [f.name for f in self.factors if f.role in roles]

    def state(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Detached copies of the named tensors (all factors by default)."""
        keys = self.params if names is None else names
        return {k: self.named[k].detach().t().contiguous() if k in self.transposed else self.named[k].detach().clone()
                for k in keys}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors into the model by parameter name (factors, or any other parameter)."""
        with torch.no_grad():
            for k, v in state.items():
                target = self.named[k].t() if k in self.transposed else self.named[k]
                if tuple(v.shape) != tuple(target.shape):  # copy_ would broadcast a (1,) tensor into every value
                    raise ValueError(f"'{k}' has shape {tuple(v.shape)}, the model's is {tuple(target.shape)}")
                target.copy_(v)

    def set_active(self, names: set[str] | frozenset[str]) -> None:
        for k, p in self.params.items():
            p.requires_grad_(k in names)

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the adapter as loaded now, in PEFT's own format."""
        self.model.save_pretrained(str(directory))


def inject_adapters(model: nn.Module, cfg: Any, seed: int, head: str = "classifier") -> AdaptedModel:
    """Freeze ``model``, add adapters per ``cfg`` (an AdapterConfig); same init on every process."""
    import peft  # noqa: PLC0415

    for p in model.parameters():
        p.requires_grad_(False)
    targets = resolve_target_modules(model, cfg)
    if cfg.type == "vera":  # PEFT's VeRA wraps nn.Linear (and Conv1D) only
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.split(".")[-1] in targets]
        if convs:
            from fedlora.errors import ConfigError  # noqa: PLC0415

            raise ConfigError(f"VeRA (adapter.type=vera) adapts linear layers only, but '{convs[0]}' is a convolution; "
                              "use adapter.type=lora (and a LoRA method) for this model")
    torch.manual_seed(seed)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n.split(".")[-1] in targets}
    peft_model = peft.get_peft_model(model, _peft_config(cfg, [head] if cfg.train_head else None, targets,
                                                         fan_in_fan_out=kinds == {"Conv1D"}))
    use_pointwise(peft_model)  # 1x1 conv factors (and bases) as matrix products on one-pixel maps
    factors = find_factors(peft_model)
    if not any(f.role in ("A", "B") for f in factors):
        from fedlora.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(f"adapter.target_modules {targets} matched no layer of the model")
    adapted = AdaptedModel(peft_model, factors)
    adapted.set_active(set(adapted.params))
    return adapted
