"""FLix layers inside PEFT: ``get_peft_model`` with a config from :func:`flix_lora_config`.

:class:`FLixLoraConfig` is a ``LoraConfig`` that carries the FeatureSpace (field
``flix_space``, saved in ``adapter_config.json``) and registers :class:`FLixLoraLinear` for
the targeted linear layers through ``LoraConfig._register_custom_module``. The layers are
:class:`~flix_kernels.FLixLinear` (so ``flix_layers``, ``set_routing``, ``use_routing``,
``merge`` and the kernels apply unchanged) and follow enough of PEFT's tuner-layer protocol
for ``get_peft_model``, training, ``save_pretrained``, ``PeftModel.from_pretrained(...,
config=FLixLoraConfig.from_pretrained(path))`` (or :func:`load_flix_peft`),
``disable_adapter()``, ``unmerge_adapter()`` and ``unload()``.

What released PEFT (0.21.2 and 0.22.0, where this is tested) does and does not do here:

* ``_register_custom_module`` is private and documented as experimental; its mapping is not
  serialised. ``FLixLoraConfig`` registers it again whenever it is constructed (also in
  ``from_pretrained``), but ``PeftModel.from_pretrained(base, path)`` *without* ``config=``
  builds a plain ``LoraConfig``: PEFT warns that ``flix_space`` is an unexpected key and
  that adapter keys are missing, and the result is a plain, untrained LoRA. Pass the config
  or use :func:`load_flix_peft`.
* One FLix adapter per model: the FeatureSpace already holds every feature. A second FLix
  adapter raises; a plain LoRA added to the same model, or a FLix config added to a model
  whose layers are already LoRA layers (PEFT then only adds a plain LoRA adapter to them),
  is not supported and not detected. ``delete_adapter`` and ``set_adapter`` do not touch
  FLix layers (our ``lora_A``/``lora_B`` are plain parameters, not per-adapter dicts), and
  the saved keys carry no adapter name (``...q_proj.lora_A``).
* ``merge_adapter()`` / ``merge_and_unload()`` cannot choose a feature set and raise; fold
  one with ``flix_kernels.merge(peft_model, {...})`` first, after which ``merge_and_unload()``
  (or ``unload()``) returns the base model with it merged. ``unmerge_adapter()`` works.
* PEFT's mixed-batch ``adapter_names=`` argument does not reach FLix layers; route with
  ``set_routing`` / ``use_routing``. ``rank_pattern`` is refused (ranks come from the
  space); ``alpha_pattern`` works (per-layer alpha). Adapters are float32 for
  float16/bfloat16 base layers, as with PEFT's default ``autocast_adapter_dtype``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from .._io import read_json
from ..features import FeatureSpace
from ..model import flix_layers
from ..nn import FLixLinear, is_conv1d
from .peft_import import CONFIG_NAME, WEIGHTS_NAME, UNSUPPORTED_LORA_OPTIONS

__all__ = ["FLixLoraConfig", "FLixLoraLinear", "flix_lora_config", "load_flix_peft"]

# LoraConfig options FLix layers do not implement (value -> why), refused when truthy: those the
# importer refuses, but modules_to_save (left to PEFT here), plus the ones only a live config has.
_UNSUPPORTED = {
    **{k: v for k, v in UNSUPPORTED_LORA_OPTIONS.items() if k != "modules_to_save"},
    "rank_pattern": "FLix ranks come from the FeatureSpace, one per group",
    "megatron_config": "Megatron parallel layers are not implemented by FLix layers",
}
_INITS = {True: "lora", "gaussian": "gaussian", False: "lora"}


def _check_supported(config: LoraConfig) -> None:
    for option, why in _UNSUPPORTED.items():
        if getattr(config, option, None):
            raise NotImplementedError(f"FLix PEFT layers: {option}={getattr(config, option)!r} is not supported ({why})")
    if config.bias != "none":
        raise NotImplementedError(f"FLix PEFT layers: bias={config.bias!r} is not supported; use bias='none'")
    init = config.init_lora_weights
    if not any(init is k or (isinstance(init, str) and init == k) for k in _INITS):
        raise NotImplementedError(f"FLix PEFT layers: init_lora_weights={init!r} is not supported; use True, False or "
                                  "'gaussian'")


class FLixLoraLinear(FLixLinear, BaseTunerLayer):
    """A :class:`~flix_kernels.FLixLinear` that PEFT's LoRA tuner creates, saves and loads.

    Built by PEFT as ``FLixLoraLinear(target, adapter_name, config=..., lora_alpha=..., ...)``
    for each targeted ``nn.Linear`` (or transformers Conv1D):
    space from ``config.flix_space``, alpha from ``lora_alpha`` (``alpha_pattern`` applied by
    PEFT), ``lora_dropout``, ``use_rslora``; adapters frozen when ``config.inference_mode``.
    """

    # PEFT's per-adapter containers: none (lora_A / lora_B are plain parameters).
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str = "default", *, config: LoraConfig,
                 lora_alpha: float | None = None, target_name: str | None = None, **kwargs):
        where = f"module {target_name!r}" if target_name else type(base_layer).__name__
        if isinstance(base_layer, FLixLinear):
            raise NotImplementedError(
                f"{where} already has a FLix adapter; one FLix adapter per model (its FeatureSpace holds every "
                f"feature), so adapter {adapter_name!r} cannot be added")
        if isinstance(base_layer, BaseTunerLayer):
            raise NotImplementedError(f"{where} already has a PEFT adapter ({type(base_layer).__name__}); FLix layers "
                                      "cannot be stacked on other PEFT layers")
        space_dict = getattr(config, "flix_space", None)
        if space_dict is None:
            raise ValueError("FLixLoraLinear needs a config with a FeatureSpace; use flix_kernels.flix_lora_config")
        if not (isinstance(base_layer, nn.Linear) or is_conv1d(base_layer)):
            raise NotImplementedError(f"{where} has type {type(base_layer).__name__}; FLix layers adapt linear layers "
                                      "only (nn.Linear and transformers' Conv1D); remove it from target_modules")
        _check_supported(config)
        nn.Module.__init__(self)
        w = base_layer.weight
        adapter_dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else None
        alpha = config.lora_alpha if lora_alpha is None else lora_alpha
        self._setup(base_layer, FeatureSpace.from_dict(space_dict), float(alpha), config.lora_dropout,
                    config.use_rslora, _INITS[config.init_lora_weights], adapter_dtype, "auto")
        if config.init_lora_weights is False:  # PEFT's "no init": B random as well, so the layer is not the identity
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_B, a=5 ** 0.5)
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.requires_grad_(False)
        self.lora_A.requires_grad_(not config.inference_mode)
        self.lora_B.requires_grad_(not config.inference_mode)

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        if self.disable_adapters:  # inside PEFT's `with peft_model.disable_adapter():`
            if self.merged is not None:
                self.unmerge()
            return self.base_layer(x)
        return super().forward(x, routing)

    def merge(self, feature_ids=None, safe_merge: bool = False, adapter_names=None) -> None:
        """FLix merge of ``feature_ids``; PEFT's call without features is only allowed once merged."""
        if feature_ids is not None:
            return super().merge(feature_ids)
        if self.merged is None:
            raise NotImplementedError(
                "a FLix adapter has no single weight update to merge; choose a feature set first with "
                "flix_kernels.merge(peft_model, {'group': 'value', ...}); merge_and_unload() then returns the base model "
                "with that set merged")


@dataclass
class FLixLoraConfig(LoraConfig):
    """A ``LoraConfig`` whose targeted linear layers become :class:`FLixLoraLinear`.

    ``flix_space`` is ``FeatureSpace.to_dict()``; ``r`` is set to the space's total rank
    (informational: each feature has its group's rank). Build it with :func:`flix_lora_config`.
    """

    flix_space: Optional[dict] = field(default=None, metadata={"help": "flix_kernels FeatureSpace.to_dict()"})

    def __post_init__(self):
        super().__post_init__()
        if self.flix_space is None:
            raise ValueError("FLixLoraConfig needs flix_space=FeatureSpace.to_dict(); use flix_kernels.flix_lora_config")
        space = FeatureSpace.from_dict(self.flix_space)
        self.flix_space = space.to_dict()
        self.r = space.total_rank
        _check_supported(self)
        # nn.Module last: every other targeted module type reaches FLixLoraLinear and is refused there
        # instead of silently becoming a plain LoRA layer inside a FLix adapter.
        mapping = {nn.Linear: FLixLoraLinear}
        conv1d = _conv1d_class()
        if conv1d is not None:
            mapping[conv1d] = FLixLoraLinear
        mapping[nn.Module] = FLixLoraLinear
        self._register_custom_module(mapping)

    @property
    def space(self) -> FeatureSpace:
        return FeatureSpace.from_dict(self.flix_space)

    @classmethod
    def from_peft_type(cls, **kwargs):
        # PEFT's version builds the class registered for peft_type (plain LoraConfig); build ours.
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            warnings.warn(f"FLixLoraConfig: ignoring keys {unknown} unknown to this PEFT version")
        return cls(**{k: v for k, v in kwargs.items() if k in known})


def _conv1d_class():
    """transformers' Conv1D, or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def flix_lora_config(space: FeatureSpace, *, target_modules, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                     use_rslora: bool = False, **lora_kwargs) -> FLixLoraConfig:
    """See :func:`flix_kernels.flix_lora_config`."""
    if not isinstance(space, FeatureSpace):
        raise TypeError(f"space must be a FeatureSpace, got {type(space).__name__}")
    return FLixLoraConfig(flix_space=space.to_dict(), target_modules=target_modules, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, use_rslora=use_rslora, **lora_kwargs)


def load_flix_peft(base_model: nn.Module, path: str, *, adapter_name: str = "default", is_trainable: bool = False,
                   **kwargs) -> PeftModel:
    """See :func:`flix_kernels.load_flix_peft`."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, CONFIG_NAME)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path!r}")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path!r} (flix_kernels never unpickles adapter_model.bin)")
    raw = read_json(cfg_path)
    if not isinstance(raw, dict) or raw.get("flix_space") is None:
        raise ValueError(f"{cfg_path} has no flix_space: not a FLix adapter (import plain LoRA adapters with "
                         "flix_kernels.from_peft_adapters)")
    config = FLixLoraConfig.from_pretrained(path)
    model = PeftModel.from_pretrained(base_model, path, adapter_name=adapter_name, is_trainable=is_trainable,
                                      config=config, **kwargs)
    # PEFT only reports missing keys that contain the adapter name, which ours do not: check here.
    with safe_open(weights, framework="pt", device="cpu") as f:
        saved = set(f.keys())
    missing = [f"{n}.{p}" for n, _ in flix_layers(model) for p in ("lora_A", "lora_B") if f"{n}.{p}" not in saved]
    if missing:
        raise ValueError(f"{weights} lacks the FLix tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}: it does "
                         "not match this base model and target_modules")
    return model
