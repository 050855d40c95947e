"""Liger-Kernel alongside FLix: ``apply_liger_kernel_to_llama`` then ``fk.inject`` trains with the
loss and gradients of the model without Liger; a FLix output head under Liger's fused linear
cross-entropy (which reads the head's weight and never calls it) is refused.

On CPU the Triton interpreter runs Liger's RoPE and fused linear cross-entropy kernels; its
RMSNorm and SwiGLU kernels call ``.to`` on float arguments, which the interpreter passes as
Python floats, so those two are checked on a GPU only.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("liger_kernel")
from liger_kernel.transformers import apply_liger_kernel_to_llama  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

import flix_kernels as fk  # noqa: E402
from _models import make_space, randomize_adapters, tiny_llama, token_ids  # noqa: E402

ON_GPU = torch.cuda.is_available()
FEATURES = [{"language": "fr", "task": "qa"}, {"language": "sw"}, {"task": "mt"}, {}]


@pytest.fixture
def restore_liger_patches(monkeypatch):
    """apply_liger_kernel_to_llama also replaces module globals (RoPE, RMSNorm, MLP classes, the
    class forward): put them back after the test."""
    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)


def _liger(model, **kw):
    kernels = dict(rope=True, fused_linear_cross_entropy=True, rms_norm=ON_GPU, swiglu=ON_GPU)
    apply_liger_kernel_to_llama(model=model, **{**kernels, **kw})
    return model


def _step(model, space, ids):
    """Loss and the FLix gradients of one training forward/backward, routed from feature_ids."""
    loss = model(input_ids=ids, labels=ids, feature_ids=space.encode(FEATURES)).loss
    loss.backward()
    grads = {f"{n}.{p}": getattr(layer, p).grad.clone()
             for n, layer in fk.flix_layers(model) for p in ("lora_A", "lora_B")}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("order", ["liger_then_inject", "inject_then_liger"])
def test_liger_model_trains_like_the_plain_one(seed, order, restore_liger_patches):
    space = make_space()
    device = "cuda" if ON_GPU else "cpu"
    ids = token_ids(len(FEATURES), 7, torch.Generator().manual_seed(seed)).to(device)

    def flix(model):
        fk.inject(model, space, target_modules="all-linear")
        randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.3)
        fk.accept_feature_ids(model)
        return model

    plain = tiny_llama(seed).to(device).train()
    liger = copy.deepcopy(plain)
    # The reference first: Liger's RoPE patch is global to transformers' Llama module.
    want_loss, want = _step(flix(plain), space, ids)
    liger = flix(_liger(liger)) if order == "liger_then_inject" else _liger(flix(liger))
    assert "liger_kernel" in liger.forward.__func__.__module__
    got_loss, got = _step(liger, space, ids)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert all(g.abs().sum() > 0 for g in got.values())

    opt = torch.optim.AdamW([p for p in liger.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = liger(input_ids=ids, labels=ids, feature_ids=space.encode(FEATURES)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_flix_head_under_fused_linear_cross_entropy_is_refused(seed, restore_liger_patches):
    space = make_space()
    model = _liger(tiny_llama(seed))
    with pytest.raises(ValueError, match="fused linear cross-entropy"):
        fk.inject(model, space, target_modules=["q_proj", "lm_head"])
    assert not fk.flix_layers(model)  # refused before any layer changed
    fk.inject(model, space, target_modules="all-linear")  # the head is not a target: fine

    other = tiny_llama(seed)
    fk.inject(other, space, target_modules=["q_proj", "lm_head"])
    _liger(other)  # Liger after inject: refused as soon as the model is routed
    with pytest.raises(ValueError, match="fused_linear_cross_entropy=False"):
        fk.accept_feature_ids(other)
    with pytest.raises(ValueError, match="output head"):
        fk.set_routing(other, fk.Routing(space.encode(FEATURES), space))
    with pytest.raises(ValueError, match="output head"):
        with fk.use_routing(other, fk.Routing(space.encode(FEATURES), space)):
            pass
