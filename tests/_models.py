"""Tiny models and adapter helpers shared by test_model.py, test_serialization.py and test_peft_export.py.

Everything is built from configs (no download) and small enough for CPU tests.
"""

from __future__ import annotations

from typing import Mapping

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flix_kernels as fk
from conftest import random_feature_ids

LLAMA_CONFIG = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=48)


def make_space(rank: int | Mapping[str, int] | None = None,
               languages=("en", "fr", "sw"), tasks=("qa", "mt")) -> fk.FeatureSpace:
    """Two groups with different ranks by default (language 4, task 2)."""
    return fk.FeatureSpace({"language": list(languages), "task": list(tasks)},
                           rank if rank is not None else {"language": 4, "task": 2})


def tiny_llama(seed: int, **overrides):
    """A random LlamaForCausalLM (eval mode) from a config; same seed, same weights."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA_CONFIG, **overrides}))
    return model.eval()


def token_ids(batch: int, length: int, gen: torch.Generator, vocab: int = LLAMA_CONFIG["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=gen)


class MLP(nn.Module):
    """``fc3(gelu(fc2(tanh(fc1(x)))))``: three named nn.Linear layers and nonlinearities between them."""

    def __init__(self, dims=(12, 20, 16, 7), dtype=torch.float32):
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1], dtype=dtype)
        self.fc2 = nn.Linear(dims[1], dims[2], dtype=dtype)
        self.fc3 = nn.Linear(dims[2], dims[3], dtype=dtype)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.tanh(self.fc1(x)))))


def tiny_mlp(seed: int, dims=(12, 20, 16, 7), dtype=torch.float32) -> MLP:
    torch.manual_seed(seed)
    return MLP(dims, dtype)


@torch.no_grad()
def randomize_adapters(model: nn.Module, gen: torch.Generator, b_scale: float = 1.0) -> None:
    """Random lora_A (entries ~ 1/sqrt(in)) and nonzero random lora_B (entries ~ b_scale) everywhere."""
    layers = fk.flix_layers(model)
    assert layers, "model has no FLix layers"
    for _, layer in layers:
        A = torch.randn(layer.lora_A.shape, generator=gen, dtype=torch.float64) / layer.in_features ** 0.5
        B = torch.randn(layer.lora_B.shape, generator=gen, dtype=torch.float64) * b_scale
        layer.lora_A.copy_(A.to(layer.lora_A.dtype))
        layer.lora_B.copy_(B.to(layer.lora_B.dtype))


def uniform_routing(space: fk.FeatureSpace, features: Mapping[str, str], batch: int) -> fk.Routing:
    """Every example uses exactly the feature set ``features``."""
    return fk.Routing(space.encode([dict(features)] * batch), space)


def mixed_routing(space: fk.FeatureSpace, batch: int, gen: torch.Generator, p_absent: float = 0.25) -> fk.Routing:
    return fk.Routing(random_feature_ids(space, batch, gen, p_absent=p_absent), space)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every FLix layer's lora_A / lora_B, by ``<layer>.lora_A`` name."""
    out = {}
    for name, layer in fk.flix_layers(model):
        out[f"{name}.lora_A"] = layer.lora_A.detach().clone()
        out[f"{name}.lora_B"] = layer.lora_B.detach().clone()
    return out


def train_steps(model: nn.Module, routing: fk.Routing, ids: torch.Tensor, opt, steps: int = 4) -> list[float]:
    """``steps`` optimizer steps of the causal-LM loss on ``ids`` under ``routing``; the losses."""
    losses = []
    for _ in range(steps):
        with fk.use_routing(model, routing):
            loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses
