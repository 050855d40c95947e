"""The quantized-base mode: a FLix training step over a full-precision base and over a 4-bit NF4
base (bitsandbytes ``Linear4bit``, double quantization), against PEFT LoRA over the same NF4 base.

The model is the end-to-end step's (:mod:`.e2e`; on a GPU also a 1.1B-parameter one). Every decoder
linear is quantized, the output head and embeddings are not (as transformers' BitsAndBytesConfig
leaves them). Adapters are float32 in all three, PEFT's default over a 4-bit base. Before timing,
the FLix step over NF4 must give the first loss of the per-feature loop over the same quantized
layers. Reported per variant: the model's stored bytes (its state dict: the base's quantized
weights with their quantization state, and the adapters), the peak GPU memory of a step (CUDA
only), the median step and the part of it AdamW takes.
"""

from __future__ import annotations

import copy
import statistics
import time
import types

import torch
import torch.nn as nn

from ..features import FeatureSpace
from ..model import flix_layers, inject, set_routing
from ..routing import Routing
from ..quantized import require
from .e2e import PER_GROUP, RANK, _configs, _loop_forward, _sync

# On a GPU beside the e2e model: a 1.1B-parameter Llama (hidden 2048, 16 layers), 4 x 512 tokens.
_LARGE = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=1024)


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """Every decoder ``nn.Linear`` of ``model`` (not the head) as a bitsandbytes NF4 ``Linear4bit``
    with double quantization, on the model's device; flagged as transformers flags a 4-bit model."""
    bnb = require("bitsandbytes")
    device = next(model.parameters()).device
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and ".layers." in name:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=m.bias is not None, compute_dtype=compute_dtype,
                                  quant_type="nf4", compress_statistics=True)
            q.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to(device))  # quantizes
    model.is_loaded_in_4bit = True
    return model


def stored_mib(model: nn.Module) -> dict[str, float]:
    """MiB of ``model``'s state dict, each storage once (tied weights), quantization state
    included: ``{"base": ..., "adapters": ...}`` (adapters: the ``lora_`` entries)."""
    seen, total = set(), {"base": 0, "adapters": 0}
    for k, v in model.state_dict().items():
        if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in seen:
            seen.add(v.untyped_storage().data_ptr())
            total["adapters" if "lora_" in k else "base"] += v.untyped_storage().nbytes()
    return {k: v / 2**20 for k, v in total.items()}


def run_quantized(device: torch.device, dtype, *, quick: bool) -> dict:
    try:
        require("bitsandbytes")
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return {"skipped": f"needs bitsandbytes, transformers and peft: {e}"}
    cuda = device.type == "cuda"
    cfg = _configs(cuda, quick)
    sizes = {"e2e": (cfg["model"], cfg["batch"], cfg["seq_len"])}
    if cuda and not quick:
        sizes["1.1B"] = (_LARGE, 4, 512)
    out = {"dtype": str(dtype).replace("torch.", ""), "features": f"2 groups x {PER_GROUP}, rank {RANK}",
           "adapter_dtype": "float32", "steps_timed": cfg["steps"], "models": {}, "failures": []}
    space = FeatureSpace({"language": [f"l{i}" for i in range(PER_GROUP)],
                          "task": [f"t{i}" for i in range(PER_GROUP)]}, RANK)
    for label, (model_cfg, B, L) in sizes.items():
        out["models"][label] = _run_size(device, dtype, space, LlamaConfig(**model_cfg, tie_word_embeddings=True), B, L,
                                         cfg, LoraConfig, get_peft_model, LlamaForCausalLM, out["failures"], label)
    return out


def _run_size(device, dtype, space, config, B, L, cfg, LoraConfig, get_peft_model, LlamaForCausalLM, failures,
              label) -> dict:
    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (B, L), generator=gen).to(device)
    ids = torch.stack([torch.randint(0, PER_GROUP, (B,), generator=gen),
                       torch.randint(PER_GROUP, 2 * PER_GROUP, (B,), generator=gen)], 1)
    routing = Routing(ids, space).to(device)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(device, dtype).requires_grad_(False)
    params = sum(p.numel() for p in base.parameters())

    def flix(model):
        inject(model, space, target_modules="all-linear", init="gaussian", adapter_dtype=torch.float32)
        init_gen = torch.Generator(device).manual_seed(1)
        with torch.no_grad():  # non-zero B: the loss check below means something
            for _, layer in flix_layers(model):
                layer.lora_B.normal_(0.0, 0.02, generator=init_gen)
        set_routing(model, routing)
        return model

    nf4 = quantize_nf4(copy.deepcopy(base), dtype)
    models = {f"FLix over {str(dtype).replace('torch.', '')} base": flix(copy.deepcopy(base)),
              "FLix over NF4 base": flix(copy.deepcopy(nf4))}
    loop = copy.deepcopy(models["FLix over NF4 base"])
    for _, layer in flix_layers(loop):
        layer.forward = types.MethodType(_loop_forward, layer)
    models["PEFT LoRA over NF4 base (r=active rank)"] = get_peft_model(
        nf4, LoraConfig(r=2 * RANK, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    del base

    with torch.no_grad():
        want = loop(input_ids=tokens, labels=tokens).loss.item()
        got = models["FLix over NF4 base"](input_ids=tokens, labels=tokens).loss.item()
    del loop
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if not abs(got - want) <= tol * abs(want):
        failures.append(f"quantized {label}: FLix over NF4 first loss {got:.6f} vs the loop's {want:.6f}")
        return {"failures": failures}

    stored = {name: stored_mib(m) for name, m in models.items()}
    steps = {name: _step(m, tokens) for name, m in models.items()}
    times = {name: [] for name in models}
    optimizer = {name: [] for name in models}
    peak = {}
    for name, step in steps.items():  # warm-up, and on a GPU each step's peak memory alone
        for _ in range(cfg["warmup"] + 1):
            step()
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            step()
            _sync(device)
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**20
    for _ in range(cfg["steps"]):  # interleaved, so that every variant sees the same host load
        for name, step in steps.items():
            t0 = time.perf_counter()
            optimizer[name].append(step())
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    rows = {}
    for name, t in times.items():
        rows[name] = {"step_ms": statistics.median(t), "step_ms_min": min(t), "step_ms_max": max(t),
                      "optimizer_ms": statistics.median(optimizer[name]),
                      "base_mib": stored[name]["base"], "adapters_mib": stored[name]["adapters"],
                      "peak_mem_mib": peak.get(name),
                      "trainable_params": sum(p.numel() for p in models[name].parameters() if p.requires_grad)}
    return {"model": {**{k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                         "vocab_size")}, "parameters": params},
            "batch": B, "seq_len": L, "first_loss_nf4": got, "first_loss_loop": want, "rows": rows}


def _step(model, tokens):
    """A training step; it returns how long its optimizer step took (ms), part of the step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = tokens.device

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        _sync(device)
        t0 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    return step


def markdown_lines(record: dict) -> list[str]:
    """The quantized-base section of results.md."""
    lines = ["## Quantized base: a training step over a 4-bit NF4 base (bitsandbytes, double quantization)", "",
             f"{record['dtype']} compute, {record['features']}, {record['adapter_dtype']} adapters on every decoder "
             "linear; FLix over NF4 checked against the per-feature loop over the same layers first. Base and "
             "adapters: MiB of the model's state dict (quantization state included). FLix holds every feature's "
             "adapters and AdamW steps them all; PEFT one LoRA of the active rank. Peak: GPU memory of one step "
             "(CUDA only).", ""]
    for label, m in record["models"].items():
        if "rows" not in m:
            continue
        mm = m["model"]
        lines += [f"{label}: {mm['parameters'] / 1e6:.1f}M parameters (hidden {mm['hidden_size']}, "
                  f"{mm['num_hidden_layers']} layers), {m['batch']} x {m['seq_len']} tokens", "",
                  "| variant | step | min..max | of which AdamW | base | adapters | peak memory | trainable |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in m["rows"].items():
            peak = "" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f} MiB"
            lines.append(f"| {name} | {r['step_ms']:.1f} ms | {r['step_ms_min']:.1f}..{r['step_ms_max']:.1f} | "
                         f"{r['optimizer_ms']:.1f} ms | {r['base_mib']:.2f} MiB | {r['adapters_mib']:.2f} MiB | {peak} | "
                         f"{r['trainable_params']:,} |")
        lines.append("")
    return lines
