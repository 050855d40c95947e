"""torch.compile of a transformers model with FLix layers routed by ``accept_feature_ids``.

The routing is built by the model's forward hook, which runs eagerly; the layers read its
prebuilt slot tables inside one graph. Asserted: no graph break anywhere in the compiled model
(so none in the decoder layers), no recompile across batches whose feature sets (and so slot
counts) change, and the loss and gradients of eager execution. Then ``Trainer(torch_compile=True)``.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from torch._dynamo.utils import counters  # noqa: E402

import flix_kernels as fk  # noqa: E402
from _models import make_space, randomize_adapters, tiny_llama, token_ids  # noqa: E402
from conftest import LONG_TESTS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Batches of 4 whose feature sets differ: all groups, absent groups (fewer slots), no feature.
BATCHES = [
    [{"language": "en", "task": "qa"}, {"language": "fr", "task": "mt"}, {"language": "sw", "task": "qa"},
     {"language": "en", "task": "mt"}],
    [{"language": "sw"}, {"task": "mt"}, {"language": "fr", "task": "qa"}, {}],
    [{"task": "qa"}, {"task": "mt"}, {}, {"task": "qa"}],
    [{}, {}, {}, {}],
]


def _graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def _model(seed, backend, device=DEVICE):
    model = tiny_llama(seed).to(device)
    space = make_space()
    fk.inject(model, space, target_modules="all-linear", backend=backend)
    randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.3)
    return model.train(), space


# The Triton backend compiled into a whole model: in Triton's interpreter on a CPU (about 30 s) only
# in the long mode; test_kernel_backends.py compiles one Triton layer (aot_eager and inductor) always.
INTERPRETED = pytest.mark.skipif(DEVICE.type == "cpu" and not LONG_TESTS,
                                 reason="the Triton interpreter's whole-model compile runs with FLIX_LONG_TESTS=1")


@pytest.mark.parametrize("backend,compiler", [("auto", "aot_eager"), ("auto", "inductor"),
                                              pytest.param("triton", "aot_eager", marks=INTERPRETED)])
def test_compiled_model_has_no_graph_break_and_no_recompile_across_feature_sets(seed, backend, compiler):
    torch._dynamo.reset()
    counters.clear()
    model, space = _model(seed, backend)
    eager = copy.deepcopy(model)
    fk.accept_feature_ids(model)
    fk.accept_feature_ids(eager)
    compiled = torch.compile(model, backend=compiler)
    gen = torch.Generator().manual_seed(seed)
    for step, features in enumerate(BATCHES):
        ids = token_ids(4, 6, gen).to(DEVICE)
        fids = space.encode(features)
        ctx = torch._dynamo.config.patch(error_on_recompile=True) if step else contextlib.nullcontext()
        with ctx:
            got = compiled(input_ids=ids, labels=ids, feature_ids=fids).loss
        got.backward()
        want = eager(input_ids=ids, labels=ids, feature_ids=fids).loss
        want.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(fk.flix_layers(model), (layer for _, layer in fk.flix_layers(eager))):
            for pa, pb in ((a.lora_A, b.lora_A), (a.lora_B, b.lora_B)):
                torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        model.zero_grad(), eager.zero_grad()
    assert _graph_breaks() == 0, dict(counters["graph_break"])


def test_trainer_torch_compile_trains_without_graph_breaks_or_recompiles(tmp_path, seed):
    pytest.importorskip("accelerate")
    torch._dynamo.reset()
    counters.clear()
    model, space = _model(seed, "auto", torch.device("cpu"))  # use_cpu=True below
    fk.accept_feature_ids(model)
    gen = torch.Generator().manual_seed(seed)
    data = [{"input_ids": token_ids(1, 8, gen)[0].tolist(), "features": f} for batch in BATCHES for f in batch]
    for ex in data:
        ex["labels"] = list(ex["input_ids"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=len(BATCHES), per_device_train_batch_size=4, learning_rate=1e-2,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True, torch_compile=True, torch_compile_backend="aot_eager")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=fk.FeatureCollator(space))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    # One graph for the four batches and their four kinds of feature sets: no break, no recompile.
    assert counters["stats"]["unique_graphs"] == 1, {k: dict(v) for k, v in counters.items()}
    assert _graph_breaks() == 0, dict(counters["graph_break"])
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in before)
