"""One end-to-end number: a training step of a small Llama-style model with FLix on every linear
layer (W frozen), per backend, against the per-feature loop and PEFT's single LoRA.

The model is built from a ``transformers`` LlamaConfig (no download): on CUDA about 110M
parameters (hidden 768, 12 layers, tied embeddings), batch 8 x 512 tokens, bf16; on a CPU a
2-layer, 128-wide model so the run stays short. Features: 2 groups of 32 (a language and a task
per example), rank 16, so PEFT's adapter has rank 32. The FLix variants and the loop share the
same random adapters, and their first losses must agree before anything is timed.
"""

from __future__ import annotations

import copy
import statistics
import time
import types

import torch

from ..features import FeatureSpace
from ..model import flix_layers, inject, set_routing
from ..routing import Routing
from .variants import loop_linear

RANK, PER_GROUP = 16, 32


# (size, on a GPU) -> (hidden, intermediate, layers, heads, vocab, batch, seq_len, warm-up, steps, quick steps).
# "110M": host-bound on a GPU; "slice": two Llama-7B-wide layers, GPU-bound. On a CPU, small stand-ins.
_SIZES = {
    ("110M", True): (768, 2048, 12, 12, 32000, 8, 512, 2, 10, 4),
    ("110M", False): (128, 256, 2, 4, 512, 4, 64, 1, 8, 3),
    ("slice", True): (4096, 11008, 2, 32, 32000, 8, 1024, 2, 6, 3),
    ("slice", False): (256, 688, 1, 4, 512, 2, 64, 1, 2, 2),
}


def _configs(cuda: bool, quick: bool, size: str = "110M") -> dict:
    hidden, inter, layers, heads, vocab, batch, seq_len, warmup, steps, quick_steps = _SIZES[(size, cuda)]
    model = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                 num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=1024 if cuda else 128)
    return {"model": model, "batch": batch, "seq_len": seq_len, "warmup": warmup,
            "steps": quick_steps if quick else steps}


def _loop_forward(self, x, routing=None):
    """FLixLinear.forward through the per-feature loop (same parameters, same routing): the base
    module's own output (a quantized one included) plus the loop's update in the adapters' dtype."""
    routing = self._resolve_routing(routing)
    d = loop_linear(x.to(self.lora_A.dtype), None, None, self.lora_A, self.lora_B, routing, self.scaling)
    return self.base_layer(x) + d.to(x.dtype)


def run_e2e(device: torch.device, dtype, backends: list[str], *, quick: bool, timer=None, size: str = "110M") -> dict:
    """The training step of the ``size`` model ("110M": host-bound on a GPU; "slice": two
    Llama-7B-wide layers, 8 x 1024 tokens, GPU-bound) per backend, against PEFT LoRA of the same
    active rank and the per-feature loop, whose first loss every FLix variant must match."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return {"skipped": "transformers is not installed (pip install transformers)"}
    cuda = device.type == "cuda"
    cfg = _configs(cuda, quick, size)
    torch.manual_seed(0)
    config = LlamaConfig(**cfg["model"], tie_word_embeddings=True)
    base = LlamaForCausalLM(config).to(device, dtype)
    base.requires_grad_(False)
    params = sum(p.numel() for p in base.parameters())
    space = FeatureSpace({"language": [f"l{i}" for i in range(PER_GROUP)],
                          "task": [f"t{i}" for i in range(PER_GROUP)]}, RANK)
    gen = torch.Generator().manual_seed(0)
    B, L = cfg["batch"], cfg["seq_len"]
    tokens = torch.randint(0, config.vocab_size, (B, L), generator=gen).to(device)
    ids = torch.stack([torch.randint(0, PER_GROUP, (B,), generator=gen),
                       torch.randint(PER_GROUP, 2 * PER_GROUP, (B,), generator=gen)], 1)
    routing = Routing(ids, space).to(device)

    flix = copy.deepcopy(base)
    inject(flix, space, target_modules="all-linear", init="gaussian", backend="torch")
    init_gen = torch.Generator(device).manual_seed(1)
    with torch.no_grad():  # non-zero B, so the adapters change the output and the loss check means something
        for _, layer in flix_layers(flix):
            layer.lora_B.normal_(0.0, 0.02, generator=init_gen)
    models = {}
    for b in backends:
        m = copy.deepcopy(flix)
        for _, layer in flix_layers(m):
            layer.backend = b
        models[f"ours: {b}"] = m
    loop = copy.deepcopy(flix)
    for _, layer in flix_layers(loop):
        layer.forward = types.MethodType(_loop_forward, layer)
    models["torch loop"] = loop
    skipped = {}
    try:
        from peft import LoraConfig, get_peft_model

        pcfg = LoraConfig(r=2 * RANK, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
        models["PEFT LoRA (r=active rank)"] = get_peft_model(copy.deepcopy(base), pcfg, autocast_adapter_dtype=False)
    except ImportError:
        skipped["PEFT LoRA (r=active rank)"] = "peft is not installed"
    del base

    def loss_of(model):
        if flix_layers(model):
            set_routing(model, routing)
        return model(input_ids=tokens, labels=tokens).loss

    with torch.no_grad():
        ref = loss_of(models["torch loop"]).item()
        first = {name: loss_of(m).item() for name, m in models.items()}
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    failures = [f"e2e {name}: first loss {v:.5f} vs the loop's {ref:.5f}" for name, v in first.items()
                if name.startswith("ours") and not abs(v - ref) <= tol * abs(ref)]
    rows = {}
    for name, model in models.items():
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        def step():
            loss = loss_of(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        try:
            for _ in range(cfg["warmup"]):
                step()
            _sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(cfg["steps"]):
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            # the spread between the slowest and the fastest identical step, relative to the fastest
            rows[name] = {"step_ms": med * 1e3, "step_ms_min": min(times) * 1e3,
                          "spread": (max(times) - min(times)) / min(times), "tokens_per_s": B * L / med,
                          "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
                          "trainable_params": sum(p.numel() for p in trainable), "first_loss": first[name]}
        except Exception as e:  # noqa: BLE001
            rows[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            if name.startswith("ours"):
                failures.append(f"e2e {name}: {rows[name]['error']}")
        del opt
        models[name] = None
        if cuda:
            torch.cuda.empty_cache()
    return {"model": {**cfg["model"], "parameters": params, "tied_embeddings": True}, "batch": B, "seq_len": L,
            "size": size,
            "dtype": str(dtype).replace("torch.", ""), "features": f"2 groups x {PER_GROUP}, rank {RANK}",
            "steps_timed": cfg["steps"], "rows": rows, "skipped": skipped, "failures": failures}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the overhead mode's host-bound step (bench --overhead) ------------------------------------
HOST_STEP_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=256, max_position_embeddings=64)
# (features per group, rank): a small space, so the step measures the layers' host path rather
# than an optimizer over many adapters, and the suite's 64-feature space beside it.
HOST_STEP_SPACES = {"2 groups x 4, rank 8": (4, 8), "2 groups x 32, rank 16": (32, 16)}


def run_host_step(device: torch.device, dtype, *, batch: int = 8, seq_len: int = 16, steps: int = 15) -> dict:
    """A training step (forward, backward, AdamW) of a tiny Llama with FLix on every linear layer
    (backend "torch") against PEFT LoRA of the same active rank, steps interleaved so both see the
    same load; the FLix model's first loss is checked against the per-feature loop's."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        return {"skipped": f"needs transformers and peft ({e})"}
    config = LlamaConfig(**HOST_STEP_MODEL, tie_word_embeddings=True)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len), generator=gen).to(device)
    out = {"model": HOST_STEP_MODEL, "batch": batch, "seq_len": seq_len, "dtype": str(dtype).replace("torch.", ""),
           "steps_timed": steps, "spaces": {}, "failures": []}
    for label, (per_group, rank) in HOST_STEP_SPACES.items():
        torch.manual_seed(0)
        base = LlamaForCausalLM(config).to(device, dtype).requires_grad_(False)
        space = FeatureSpace({"language": [f"l{i}" for i in range(per_group)],
                              "task": [f"t{i}" for i in range(per_group)]}, rank)
        ids = torch.stack([torch.randint(0, per_group, (batch,), generator=gen),
                           torch.randint(per_group, 2 * per_group, (batch,), generator=gen)], 1)
        routing = Routing(ids, space).to(device)
        flix = copy.deepcopy(base)
        inject(flix, space, target_modules="all-linear", init="gaussian", backend="torch")
        with torch.no_grad():
            for _, layer in flix_layers(flix):
                layer.lora_B.normal_(0.0, 0.02, generator=torch.Generator(device).manual_seed(1))
        set_routing(flix, routing)
        loop = copy.deepcopy(flix)
        for _, layer in flix_layers(loop):
            layer.forward = types.MethodType(_loop_forward, layer)
        set_routing(loop, routing)
        with torch.no_grad():
            got, want = (m(input_ids=tokens, labels=tokens).loss.item() for m in (flix, loop))
        if not abs(got - want) <= (1e-4 if dtype == torch.float32 else 2e-2) * abs(want):
            out["failures"].append(f"host step {label}: first loss {got:.6f} vs the loop's {want:.6f}")
            continue
        peft = get_peft_model(base, LoraConfig(r=2 * rank, lora_alpha=16, target_modules="all-linear",
                                               lora_dropout=0.0), autocast_adapter_dtype=False)
        models = {"ours: torch": flix, f"PEFT LoRA (r={2 * rank})": peft}
        step_fns = {name: _train_step(m, tokens) for name, m in models.items()}
        times = {name: [] for name in models}
        for i in range(2 + steps):  # two warm-up steps each, then interleaved
            for name, step in step_fns.items():
                t0 = time.perf_counter()
                step()
                _sync(device)
                if i >= 2:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        rows = {name: {"step_ms": statistics.median(t), "step_ms_p20": statistics.quantiles(t, n=5)[0],
                       "step_ms_p80": statistics.quantiles(t, n=5)[3],
                       "trainable_params": sum(p.numel() for p in models[name].parameters() if p.requires_grad)}
                for name, t in times.items()}
        ours, theirs = rows["ours: torch"]["step_ms"], rows[f"PEFT LoRA (r={2 * rank})"]["step_ms"]
        out["spaces"][label] = {"rows": rows, "ratio_vs_peft": ours / theirs}
    return out


def _train_step(model, tokens):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
