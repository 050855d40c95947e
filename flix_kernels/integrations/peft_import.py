"""Import existing PEFT LoRA adapters as FLix features of a model.

Each adapter (a folder written by PEFT's ``save_pretrained``: ``adapter_config.json`` and
``adapter_model.safetensors``) becomes one feature. A batch then applies any set of the
adapters per example through one :class:`~flix_kernels.Routing` and the FLix kernels: the
multi-adapter mixed batch PEFT users ask for (huggingface/peft issues 804, 1670, 2283), and
the imported features keep training like any FLix feature.

Exact by construction: feature k's rank slice of every adapted layer holds the adapter's
``A`` in its first ``r`` rows and ``B * (c / s_k)`` in its first ``r`` columns, where ``c``
is PEFT's scale at that module (``lora_alpha / r`` or ``/ sqrt(r)`` with rsLoRA, after
``rank_pattern`` / ``alpha_pattern``) and ``s_k`` the FLix layer's scale of the feature.
Rows beyond ``r`` (padding to the feature's rank) and the slices of modules the adapter
does not target are zero in both ``A`` and ``B``: they add nothing, and as their gradients
vanish they stay zero in training, so each adapter keeps training in its own rank and
modules. Only the JSON config and safetensors tensors are read; nothing is unpickled, and
PEFT itself is not needed.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

import torch
import torch.nn as nn
from safetensors import safe_open

from .._io import read_json
from ..features import FeatureSpace
from ..model import flix_layers, inject
from ..nn import FLixLinear, linear_in_out

__all__ = ["from_peft_adapters"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."

# LoraConfig options whose adapters are not "B A x added to a linear layer" (or need a
# modified base model); value -> why, checked when the option is set to anything truthy.
UNSUPPORTED_LORA_OPTIONS = {
    "use_dora": "DoRA rescales the whole adapted weight by a learned magnitude vector, which is not a low-rank update",
    "lora_bias": "lora_bias adds a trainable bias to lora_B",
    "modules_to_save": "modules_to_save stores full copies of modules, which are not low-rank updates",
    "trainable_token_indices": "trainable tokens update embedding rows, which is not a low-rank update",
    "target_parameters": "target_parameters adapts raw nn.Parameters (e.g. fused MoE experts), not linear layers",
    "layer_replication": "layer_replication changes the model's layer structure",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies the update only after invocation tokens",
    "use_qalora": "QALoRA pools the input before lora_A",
    "velora_config": "VeLoRA changes how the adapter input is stored",
    "monteclora_config": "MonteCLoRA samples its adapter weights",
    "arrow_config": "Arrow routes between adapters on its own",
    "kasa_config": "KaSA truncates the base weights",
    "use_bdlora": "block-diagonal LoRA uses another weight layout",
}
# init_lora_weights values that change the base model's weights along with the adapter.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass
class _Adapter:
    key: object  # how the caller named it (for messages)
    path: str
    config: dict
    # module name (relative to the base model) -> (A (r, in), B (out, r), PEFT scale c), float64
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"adapter {self.key!r} ({self.path})"

    def max_rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


def _pattern_value(patterns, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a dotted suffix of the name."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


def _locate(key, path) -> tuple[str, str]:
    """(folder, safetensors file) of one adapter given as a folder or its safetensors file."""
    path = os.fspath(path)
    if os.path.isfile(path):
        folder, weights = os.path.dirname(path) or ".", path
        if not path.endswith(".safetensors"):
            raise ValueError(f"adapter {key!r}: {path!r} is not a .safetensors file; pass the adapter's folder")
    elif os.path.isdir(path):
        folder, weights = path, os.path.join(path, WEIGHTS_NAME)
    else:
        raise FileNotFoundError(f"adapter {key!r}: {path!r} is not a local folder or file (download Hub adapters "
                                "first, e.g. with huggingface_hub.snapshot_download)")
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, PICKLE_NAME)):
            raise NotImplementedError(
                f"adapter {key!r}: {folder!r} holds {PICKLE_NAME}, a pickle, and flix_kernels never unpickles. Convert "
                f"it once where you trust the file: PeftModel.from_pretrained(base_model, {folder!r}).save_pretrained("
                f"new_dir) writes {WEIGHTS_NAME} (or safetensors.torch.save_file(torch.load(bin_path, weights_only=True), "
                f"'{WEIGHTS_NAME}') next to {CONFIG_NAME})")
        raise FileNotFoundError(f"adapter {key!r}: no {WEIGHTS_NAME} in {folder!r}")
    return folder, weights


def _check_config(key, folder: str, cfg) -> None:
    where = f"adapter {key!r} ({folder})"
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: {CONFIG_NAME} must hold a JSON object")
    peft_type = str(cfg.get("peft_type", "")).rpartition(".")[2].upper()  # "LORA" or "PeftType.LORA"
    if peft_type != "LORA":
        raise NotImplementedError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported; only LoRA adapters "
                                  "can be imported as FLix features")
    if cfg.get("flix_space") is not None:
        raise ValueError(f"{where} is a FLix adapter saved through PEFT; load it with flix_kernels.load_flix_peft")
    for option, why in UNSUPPORTED_LORA_OPTIONS.items():
        if cfg.get(option):
            raise NotImplementedError(f"{where}: {option}={cfg[option]!r} is not supported ({why})")
    if cfg.get("bias", "none") != "none":
        raise NotImplementedError(f"{where}: bias={cfg['bias']!r} is not supported (it trains the base layers' biases, "
                                  "which are not low-rank updates); only bias='none' adapters can be imported")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise NotImplementedError(
            f"{where}: init_lora_weights={init!r} changes the base model's weights, so the adapter does not apply to the "
            "original base model; convert it to a plain LoRA first (PEFT's save_pretrained with "
            "path_initial_model_for_weight_conversion)")
    for name in ("r", "lora_alpha"):
        v = cfg.get(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{where}: {name} must be a positive number, got {v!r}")


# Why a tensor of an adapter file is not a plain linear LoRA weight: (key fragment, reason), most specific first.
_TENSOR_PROBLEMS = [
    ("lora_embedding_", "embedding LoRA (lora_embedding_A/B) is not supported; FLix adapts linear layers"),
    ("lora_magnitude_vector", "DoRA (lora_magnitude_vector) is not supported"),
    ("modules_to_save", "modules_to_save (full module copies) is not supported"),
    ("trainable_tokens", "trainable tokens are not supported"),
    (".lora_B.bias", "lora_bias is not supported"),
    (".bias", "trained biases (bias != 'none') are not supported"),
    (".base_layer.", "full weights of adapted modules (e.g. saved embedding layers) are not supported"),
    ("", "it is not a lora_A/lora_B weight of a linear layer"),
]


def _tensor_problem(names: list[str]) -> str:
    """The most specific problem among tensor keys that are not linear LoRA weights."""
    for fragment, why in _TENSOR_PROBLEMS:
        for name in names:
            if fragment in name:
                return f"tensor {name!r}: {why}"
    return ""


def _read_adapter(key, path) -> _Adapter:
    folder, weights = _locate(key, path)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"adapter {key!r}: no {CONFIG_NAME} in {folder!r}")
    try:
        cfg = read_json(cfg_path)
    except ValueError as e:
        raise ValueError(f"adapter {key!r}: {e}") from None
    _check_config(key, folder, cfg)
    ad = _Adapter(key, folder, cfg)
    try:
        f = safe_open(weights, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{ad.label}: {weights} is not a valid safetensors file ({type(e).__name__}: {e})") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with f:
        keys = {}
        for name in f.keys():
            short = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
            module, _, part = short.rpartition(".lora_")
            keys[name] = (module, part) if module and part in ("A.weight", "B.weight") else None
        bad = [name for name, v in keys.items() if v is None]
        if bad:
            raise NotImplementedError(f"{ad.label}: {_tensor_problem(bad)}")
        for name, (module, part) in keys.items():
            t = f.get_tensor(name)
            if t.dim() != 2:
                raise NotImplementedError(f"{ad.label}: tensor {name!r} has shape {tuple(t.shape)}; only LoRA of linear "
                                          "layers (2-D lora_A/lora_B) is supported, not convolution LoRA")
            if not t.dtype.is_floating_point:
                raise ValueError(f"{ad.label}: tensor {name!r} has dtype {t.dtype}, expected a floating-point dtype")
            parts.setdefault(module, {})[part[0]] = t.to(torch.float64)
    if not parts:
        raise ValueError(f"{ad.label}: {weights} holds no LoRA weights")
    use_rslora = bool(cfg.get("use_rslora", False))
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ValueError(f"{ad.label}: module {module!r} has no {missing}.weight")
        A, B = ab["A"], ab["B"]
        r = A.shape[0]
        if B.shape[1] != r:
            raise ValueError(f"{ad.label}: module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                             "disagree on the rank")
        r_cfg = _pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        if r_cfg != r:
            raise ValueError(f"{ad.label}: module {module!r} has rank {r} in {WEIGHTS_NAME} but {r_cfg} in "
                             f"{CONFIG_NAME} (r / rank_pattern)")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg["lora_alpha"]))
        ad.modules[module] = (A, B, alpha / (math.sqrt(r) if use_rslora else r))
    return ad


def _resolve_feature(space: FeatureSpace, key) -> int:
    """Global id of the feature ``key`` names: ``"group=value"``, ``(group, value)`` or an unambiguous value."""
    if isinstance(key, tuple):
        if len(key) != 2:
            raise ValueError(f"adapter key {key!r}: a tuple must be (group, value)")
        return space.index(*key)
    if not isinstance(key, str) or not key:
        raise ValueError(f"adapter key {key!r} must be 'group=value', (group, value) or a feature value")
    group, sep, value = key.partition("=")
    if sep and group in space.groups:
        return space.index(group, value)
    owners = [g for g, values in space.groups.items() if key in values]
    if len(owners) == 1:
        return space.index(owners[0], key)
    if not owners:
        raise ValueError(f"adapter key {key!r} names no feature of {space}; use 'group=value' with groups "
                         f"{space.group_names}")
    raise ValueError(f"adapter key {key!r} is ambiguous: it is a value of groups {owners}; write "
                     f"'{owners[0]}={key}' or ({owners[0]!r}, {key!r})")


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer FLix can adapt here (a FLix layer, nn.Linear, Conv1D), None for any other module."""
    if isinstance(module, FLixLinear):
        return module.in_features, module.out_features
    try:
        return linear_in_out(module)
    except TypeError:
        return None


def _check_module(model: nn.Module, ad: _Adapter, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        linear = [n for n, m in model.named_modules() if _in_out(m) is not None][:8]
        raise ValueError(f"{ad.label} adapts module {name!r}, which {type(model).__name__} does not have (its linear "
                         f"layers include {linear}); import into the same base model class the adapter was trained on"
                         ) from None
    dims = _in_out(module)
    if dims is None:
        raise NotImplementedError(f"{ad.label}: module {name!r} is a {type(module).__name__}; only LoRA of linear "
                                  "layers is supported")
    if A.shape[1] != dims[0] or B.shape[0] != dims[1]:
        raise ValueError(f"{ad.label}: module {name!r} is ({dims[0]} -> {dims[1]}) but the adapter has lora_A "
                         f"{tuple(A.shape)} and lora_B {tuple(B.shape)}")


def _common_or_max(values):
    values = list(values)
    return values[0] if all(v == values[0] for v in values) else max(values)


def from_peft_adapters(model: nn.Module, adapters: Mapping[object, str | os.PathLike], space: FeatureSpace | None = None,
                       *, group: str | None = "adapter", alpha: float | None = None, use_rslora: bool | None = None,
                       dropout: float | None = None, adapter_dtype: torch.dtype | None = None,
                       backend: str = "auto") -> FeatureSpace:
    """Turn PEFT LoRA adapters into FLix features of ``model``; returns the FeatureSpace.

    ``adapters`` maps a name to an adapter folder written by PEFT's ``save_pretrained`` (or
    its ``adapter_model.safetensors``). ``model`` is the plain base model the adapters were
    trained on; FLix layers are injected on the union of the adapters' target modules and
    only their ``lora_A`` / ``lora_B`` train afterwards. A model that already has FLix
    layers keeps them (with their alpha): pass their ``space``; every adapter module must be
    one of them, and the imported features' slices are overwritten everywhere.

    Without ``space``:

    * ``group="adapter"`` (default): one group holding every adapter, ranks zero-padded to the
      largest adapter rank (exact: zero rows add nothing). An example uses at most one of them:
      ``space.encode([{"adapter": "fr"}, {}])``.
    * ``group=None``: one group per adapter, named after it, with one value of the same name and
      the adapter's own rank, so an example can use any set of adapters:
      ``space.encode([{"fr": "fr", "qa": "qa"}])``.

    With ``space``, each key names its feature as ``"group=value"``, ``(group, value)`` or a
    value found in exactly one group; the adapter's rank at every module must be at most the
    feature's rank (zero-padded). Features no adapter names keep a fresh LoRA init (B = 0).

    ``alpha`` / ``use_rslora`` set the FLix layers' scale ``alpha / r_k`` (default: the
    adapters' ``lora_alpha`` if they share one, else the largest; rsLoRA if they all use it);
    PEFT's per-module scales are folded into B either way, so outputs match exactly. Where the
    FLix scale equals PEFT's (same alpha, rsLoRA and rank) the tensors are copied unchanged, so
    training continues in PEFT's parametrisation. ``dropout`` defaults to the largest ``lora_dropout``;
    ``adapter_dtype`` to float32 for float16/bfloat16 models (as PEFT upcasts) else the base dtype.

    Refused with ``NotImplementedError`` naming the adapter: non-LoRA PEFT types, DoRA,
    ``bias != "none"``, ``lora_bias``, ``modules_to_save``, trainable tokens, embedding or
    convolution LoRA, ``target_parameters``, base-mutating inits (PiSSA, OLoRA, CorDA,
    LoRA-GA, LoftQ), other variants (aLoRA, QALoRA, ...), and ``adapter_model.bin`` (a
    pickle: convert it to safetensors first, see the message). transformers' Conv1D
    (``fan_in_fan_out=True``, GPT-2) is supported.
    """
    if not isinstance(adapters, Mapping) or not adapters:
        raise ValueError("adapters must be a non-empty dict name -> adapter folder")
    read = [_read_adapter(key, path) for key, path in adapters.items()]

    # The feature of each adapter, and the space.
    if space is None:
        for ad in read:
            if not isinstance(ad.key, str) or not ad.key:
                raise ValueError(f"adapter names must be non-empty strings without a space=..., got {ad.key!r}")
        if group is None:
            space = FeatureSpace({ad.key: [ad.key] for ad in read}, {ad.key: ad.max_rank() for ad in read})
        else:
            space = FeatureSpace({group: [ad.key for ad in read]}, max(ad.max_rank() for ad in read))
    elif not isinstance(space, FeatureSpace):
        raise TypeError(f"space must be a FeatureSpace or None, got {type(space).__name__}")
    fids = [_resolve_feature(space, ad.key) for ad in read]
    for i, k in enumerate(fids):
        if k in fids[:i]:
            other = read[fids.index(k)].key
            g, v = space.feature_names[k]
            raise ValueError(f"adapters {other!r} and {read[i].key!r} both name feature {g}={v!r}")

    # Validate everything against the model before changing it.
    existing = flix_layers(model)
    if existing:
        if existing[0][1].space != space:
            raise ValueError("model already has FLix layers with another FeatureSpace ("
                             + space.describe_difference(existing[0][1].space) + "); pass space=<their space>")
        if alpha is not None or use_rslora is not None:
            raise ValueError("model already has FLix layers: their own alpha / use_rslora apply; leave alpha and "
                             "use_rslora unset")
    for ad, k in zip(read, fids):
        seen: dict[int, str] = {}
        for name, (A, B, _) in ad.modules.items():
            _check_module(model, ad, name, A, B)
            other = seen.setdefault(id(model.get_submodule(name)), name)
            if other != name:
                raise ValueError(f"{ad.label} adapts modules {other!r} and {name!r}, which are one shared layer of the "
                                 "model; FLix gives a shared layer one adapter")
            if existing and not isinstance(model.get_submodule(name), FLixLinear):
                raise ValueError(f"{ad.label} adapts module {name!r}, which is not one of the model's FLix layers; "
                                 "inject FLix layers there too, or import into the plain base model")
            if A.shape[0] > space.ranks[k]:
                g, v = space.feature_names[k]
                raise ValueError(f"{ad.label} has rank {A.shape[0]} at module {name!r} but feature {g}={v!r} has rank "
                                 f"{space.ranks[k]} in the space; give its group a rank >= {A.shape[0]}")
    targets = sorted({name for ad in read for name in ad.modules})

    if not existing:
        alpha = float(alpha) if alpha is not None else float(_common_or_max(ad.config["lora_alpha"] for ad in read))
        if use_rslora is None:
            use_rslora = all(bool(ad.config.get("use_rslora", False)) for ad in read)
        if dropout is None:
            dropout = max(float(ad.config.get("lora_dropout", 0.0) or 0.0) for ad in read)
        if adapter_dtype is None:
            dtypes = {model.get_submodule(n).weight.dtype for n in targets}
            adapter_dtype = torch.float32 if dtypes & {torch.float16, torch.bfloat16} else None
        pattern = "|".join(re.escape(n) for n in targets)
        inject(model, space, target_modules=f"(?:{pattern})", alpha=alpha, dropout=dropout, use_rslora=use_rslora,
               adapter_dtype=adapter_dtype, backend=backend)
        for _, layer in flix_layers(model):
            layer.train(layer.base_layer.training)  # new modules start in training mode (dropout on)

    offs = space.rank_offsets
    with torch.no_grad():
        for _, layer in flix_layers(model):
            for k in fids:
                layer.lora_A[offs[k]:offs[k + 1]].zero_()
                layer.lora_B[:, offs[k]:offs[k + 1]].zero_()
        for ad, k in zip(read, fids):
            rk = space.ranks[k]
            for name, (A, B, c) in ad.modules.items():
                layer = model.get_submodule(name)
                s = layer.alpha / (math.sqrt(rk) if layer.use_rslora else rk)
                r = A.shape[0]
                layer.lora_A[offs[k]:offs[k] + r] = A.to(layer.lora_A.dtype)
                layer.lora_B[:, offs[k]:offs[k] + r] = (B * (c / s)).to(layer.lora_B.dtype)
    return space
