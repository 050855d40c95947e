"""FLix layers over quantized frozen bases (bitsandbytes 4-/8-bit, torchao) on CPU.

The base output must be the quantized module's own; the update and its gradients must match the
float64 oracle; a model over such bases trains, saves, loads, exports to PEFT and generates;
merging refuses. The libraries are the optional ``quant`` extra: each test skips without its own.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn as nn

import flix_kernels as fk
from conftest import random_feature_ids
from flix_kernels.quantized import quantized_kind, require
from flix_kernels.reference import flix_delta_reference
from _models import make_space, randomize_adapters, tiny_llama, token_ids

# bitsandbytes' CPU 4-bit path packs weights in blocks of 64 input features.
QUANT_LLAMA = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the libraries run on both
KINDS = ["bnb-nf4", "bnb-fp4", "bnb-nf4-single", "bnb-int8", "torchao-int8", "torchao-int4"]


def _bnb():
    return pytest.importorskip("bitsandbytes")


def quantize(linear: nn.Linear, kind: str, compute_dtype=torch.bfloat16) -> nn.Module:
    """``linear`` (float) as the quantized module ``kind`` on CPU, the way a loader builds it."""
    if kind.startswith("bnb-"):
        bnb = _bnb()
        if kind == "bnb-int8":
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=kind.split("-")[1][:3],
                                  compress_statistics=not kind.endswith("single"))
        q.load_state_dict({k: v.float() for k, v in linear.state_dict().items()})
        return q.to(DEVICE)  # quantizes
    tq = pytest.importorskip("torchao.quantization")
    config = tq.Int8WeightOnlyConfig() if kind == "torchao-int8" else tq.IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=tq.granularity.PerGroup(32))
    holder = nn.Sequential(linear.to(DEVICE, compute_dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.quantize_(holder, config)
    return holder[0]


def quantize_model(model: nn.Module, kind: str, compute_dtype=torch.bfloat16) -> nn.Module:
    """Every decoder linear of ``model`` quantized (the head stays), flagged as transformers flags
    a bitsandbytes-loaded model (PEFT reads the flags); on DEVICE."""
    model = model.to(DEVICE)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and ".layers." in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantize(m, kind, compute_dtype))
    if kind.startswith("bnb-"):
        model.is_loaded_in_8bit = kind == "bnb-int8"
        model.is_loaded_in_4bit = kind != "bnb-int8"
    return model.to(compute_dtype) if kind.startswith("torchao") else model


@pytest.mark.parametrize("kind", KINDS)
def test_layer_is_quantized_base_plus_oracle_update(seed, kind):
    """y = q(x) + the float64 oracle's update; dA, dB as the oracle's, dx = q's dx + the update's."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    space = make_space()
    q = quantize(nn.Linear(64, 48), kind)
    layer = fk.FLixLinear.from_linear(q, space)
    assert layer.base_layer is q and layer.quantized == quantized_kind(q) is not None
    assert layer.lora_A.dtype == (torch.float32 if kind.startswith("bnb") else torch.bfloat16)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / 8)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    ids = random_feature_ids(space, 5, gen)
    routing = fk.Routing(ids, space)
    dtype = torch.float16 if kind == "bnb-int8" else torch.bfloat16
    x = torch.randn(5, 7, 64, generator=gen).to(DEVICE, dtype).requires_grad_()
    gy = torch.randn(5, 7, 48, generator=gen).to(DEVICE, dtype)
    y = layer(x, routing)
    assert y.dtype == dtype
    gx, gA, gB = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), gy)

    xb = x.detach().clone().requires_grad_()
    base = q(xb)
    (gx_base,) = torch.autograd.grad(base, xb, gy)
    x64 = x.detach().cpu().double().requires_grad_()
    A64 = layer.lora_A.detach().cpu().double().requires_grad_()
    B64 = layer.lora_B.detach().cpu().double().requires_grad_()
    d64 = flix_delta_reference(x64, A64, B64, ids, space.rank_offsets, layer.scaling.cpu().double())
    g64 = torch.autograd.grad(d64, (x64, A64, B64), gy.cpu().double())
    y, gx, gA, gB, base, gx_base = (t.detach().cpu() for t in (y, gx, gA, gB, base, gx_base))
    tol = dict(rtol=2e-2, atol=2e-2 * float(d64.detach().abs().max()))
    torch.testing.assert_close(y.double(), base.detach().double() + d64.detach(), **tol)
    torch.testing.assert_close(gx.double(), gx_base.double() + g64[0], rtol=2e-2, atol=2e-2 * float(g64[0].abs().max()))
    for got, want in zip((gA, gB), g64[1:]):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    assert q.weight.grad is None


def test_adapter_dtype_is_the_callers(seed):
    q = quantize(nn.Linear(64, 32), "bnb-nf4")
    layer = fk.FLixLinear.from_linear(q, make_space(), adapter_dtype=torch.bfloat16)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    x = torch.randn(2, 64, dtype=torch.bfloat16, device=DEVICE)
    assert layer(x, fk.Routing([[0, 3], [1, -1]], layer.space)).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_merge_refuses_and_unload_gives_back_the_quantized_module(seed, kind):
    model = quantize_model(tiny_llama(seed, **QUANT_LLAMA), kind)
    q_proj = model.model.layers[0].self_attn.q_proj
    space = make_space()
    fk.inject(model, space, target_modules=["q_proj", "v_proj"])
    with pytest.raises(RuntimeError, match="quantized base layer .*refused"):
        fk.merge(model, {"language": "en"})
    with pytest.raises(RuntimeError, match="quantized base layer"):
        fk.merge_and_unload(model, {"language": "en"})
    assert all(layer.merged is None for _, layer in fk.flix_layers(model))  # nothing half-merged
    fk.unload(model)
    assert model.model.layers[0].self_attn.q_proj is q_proj


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"flix_kernels\[quant\]"):
        require("bitsandbytes")


def _train(model, space, gen, steps=3, checkpointing=False):
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_ids(4, 9, gen).to(DEVICE)
    routing = fk.Routing(random_feature_ids(space, 4, gen, p_absent=0.0), space)
    losses = []
    for _ in range(steps):
        with fk.use_routing(model, routing):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _storage(t: torch.Tensor) -> list[torch.Tensor]:
    """Copies of what a (possibly torchao tensor-subclass) weight stores."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [getattr(t, n).detach().clone() for n in names]
    return [t.detach().clone()]


def _same_history(model, space, kind):
    """bitsandbytes' CPU layers keep state from their first calls (a training-mode call before the
    first inference one picks another inference kernel, which rounds differently): give a fresh
    copy the trained model's history, one training forward and backward without a step."""
    if not kind.startswith("bnb-"):
        return
    ids = token_ids(1, 3, torch.Generator().manual_seed(0)).to(DEVICE)
    model.train()
    ctx = fk.use_routing(model, fk.Routing([[0, 3]], space)) if space is not None else torch.enable_grad()
    with ctx:
        out = model(input_ids=ids, labels=ids)
    if out.loss.requires_grad:
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_model_trains_saves_loads_and_exports(seed, kind, tmp_path):
    """Train a few steps over the quantized base (base untouched, loss falls), save the adapters,
    load them onto a freshly quantized copy (same outputs), export a feature set to PEFT and
    load it onto the same quantized base (same outputs as FLix with that set)."""
    peft = pytest.importorskip("peft")
    gen = torch.Generator().manual_seed(seed)
    space = make_space()
    model = quantize_model(tiny_llama(seed, **QUANT_LLAMA), kind)
    storage = {n: _storage(p) for n, p in model.named_parameters()}
    fk.inject(model, space, target_modules="all-linear")
    losses = _train(model, space, gen)
    assert losses[-1] < losses[0]
    for name, layer in fk.flix_layers(model):
        assert all(map(torch.equal, _storage(layer.base_layer.weight), storage[name + ".weight"]))
    model.eval()
    fk.save_adapters(model, str(tmp_path / "flix"))

    fresh = quantize_model(tiny_llama(seed, **QUANT_LLAMA), kind)
    fk.load_adapters(fresh, str(tmp_path / "flix"))
    assert all(layer.quantized for _, layer in fk.flix_layers(fresh))
    ids = token_ids(2, 6, gen).to(DEVICE)
    routing = fk.Routing(space.encode([{"language": "fr", "task": "qa"}] * 2), space)
    with torch.no_grad(), fk.use_routing(model, routing):
        want = model(input_ids=ids).logits
    _same_history(fresh, space, kind)
    with torch.no_grad(), fk.use_routing(fresh, routing):
        assert torch.equal(fresh(input_ids=ids).logits, want)

    fk.export_peft(model, {"language": "fr", "task": "qa"}, str(tmp_path / "peft"))
    plain = quantize_model(tiny_llama(seed, **QUANT_LLAMA), kind)
    _same_history(plain, None, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(plain, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    tol = 1e-3 if want.dtype == torch.float32 else 2e-2  # the torchao model runs in bfloat16
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_state_dict_names_over_nf4(seed):
    """An injected 4-bit model's state dict has the plain quantized model's names for the base
    (bitsandbytes' quant-state entries included, same tensors) plus the adapters. (Loading a
    4-bit state dict goes through transformers' quantizer, not ``load_state_dict``, with or
    without FLix.)"""
    model = quantize_model(tiny_llama(seed, **QUANT_LLAMA), "bnb-nf4")
    plain = model.state_dict()
    fk.inject(model, make_space(), target_modules=["q_proj", "down_proj"])
    sd = model.state_dict()
    assert {k for k in sd if not k.endswith(("lora_A", "lora_B"))} == set(plain)
    assert any(k.endswith("q_proj.weight.absmax") for k in sd)
    for k, v in plain.items():
        assert sd[k] is v or torch.equal(sd[k], v), k


def test_gradient_checkpointing_and_generate_over_nf4(seed):
    """Checkpointed training gives the same gradients; generate routes every example with its own
    features (each row as generated alone)."""
    gen = torch.Generator().manual_seed(seed)
    space = make_space()
    grads = []
    for checkpointing in (False, True):
        model = quantize_model(tiny_llama(seed, **QUANT_LLAMA), "bnb-nf4")
        fk.inject(model, space, target_modules="all-linear")
        randomize_adapters(model, torch.Generator().manual_seed(seed), b_scale=0.1)
        _train(model, space, torch.Generator().manual_seed(seed), steps=1, checkpointing=checkpointing)
        grads.append({n: layer.lora_A.detach().clone() for n, layer in fk.flix_layers(model)})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-5)

    model.eval()
    prompts = token_ids(2, 4, gen).to(DEVICE)
    features = [{"language": "en", "task": "mt"}, {"language": "sw"}]
    out = fk.generate(model, input_ids=prompts, feature_ids=features, max_new_tokens=4, do_sample=False)
    for i in range(2):
        alone = fk.generate(model, input_ids=prompts[i:i + 1], feature_ids=features[i:i + 1], max_new_tokens=4,
                            do_sample=False)
        assert torch.equal(out[i], alone[0])


@pytest.mark.parametrize("kind", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_a_model_loaded_by_transformers_quantizer(seed, kind, tmp_path):
    """``from_pretrained(..., quantization_config=...)``, as users load a QLoRA base: every decoder
    linear becomes a FLix layer over the loader's quantized module, and a routed example equals the
    quantized model plus the float64 oracle's update, layer by layer (checked on q_proj)."""
    transformers = pytest.importorskip("transformers")
    tiny_llama(seed, **QUANT_LLAMA).save_pretrained(tmp_path)
    if kind == "torchao-int8":
        tq = pytest.importorskip("torchao.quantization")
        config = transformers.TorchAoConfig(tq.Int8WeightOnlyConfig())
    else:
        _bnb()
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=kind == "bnb-nf4", load_in_8bit=kind == "bnb-int8", bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config,
                                                                  device_map=str(DEVICE), dtype=torch.bfloat16)
    q = model.model.layers[0].self_attn.q_proj
    space = make_space()
    names = fk.inject(model, space, target_modules="all-linear")
    assert len(names) == 14 and all(layer.quantized for _, layer in fk.flix_layers(model))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer is q
    randomize_adapters(model, torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    ids = random_feature_ids(space, 3, gen)
    x = torch.randn(3, 5, 64, generator=gen).to(DEVICE, torch.bfloat16)
    with torch.no_grad():
        got = layer(x, fk.Routing(ids, space)).cpu().double()
        want = q(x).cpu().double() + flix_delta_reference(x.cpu().double(), layer.lora_A.cpu().double(),
                                                          layer.lora_B.cpu().double(), ids, space.rank_offsets,
                                                          layer.scaling.cpu().double())
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    fk.accept_feature_ids(model, feature_dropout=0.3, generator=torch.Generator().manual_seed(seed))
    tokens = token_ids(3, 6, gen).to(DEVICE)
    model.train()
    loss = model(input_ids=tokens, labels=tokens, feature_ids=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and layer.lora_B.grad.abs().sum() > 0
