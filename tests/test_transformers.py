"""transformers integration: feature_ids as a model input, FeatureCollator (padded and packed),
generate with beams, gradient checkpointing, Trainer, GPT-2's Conv1D and T5.

The oracle for every routed output is the same model with the example's feature set merged
into the base weights (:func:`flix_kernels.merge`), run on that example alone: a different
code path (a dense weight update, no routing) from the batched FLix layers.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import flix_kernels as fk  # noqa: E402
from _models import LLAMA_CONFIG, make_space, randomize_adapters  # noqa: E402

VOCAB = LLAMA_CONFIG["vocab_size"]
FEATURES = [{"language": "fr", "task": "qa"}, {"language": "sw"}, {"task": "mt"}, {}]


def tiny(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG))
    elif kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2))
    elif kind == "t5":
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=1))
    else:
        raise ValueError(kind)
    return model.eval()


def flix_model(kind: str, seed: int, dtype=torch.float64):
    """A tiny transformers model in ``dtype`` with FLix on every linear layer and random adapters;
    the untouched model is kept as ``model.flix_test_base`` (the oracle of no-feature examples)."""
    model = tiny(kind, seed).to(dtype)
    base = copy.deepcopy(model)
    space = make_space()
    fk.inject(model, space, target_modules="all-linear")
    with torch.no_grad():
        randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.3)
    object.__setattr__(model, "flix_test_base", base)  # not a submodule: stays out of parameters()
    return model, space


def merged_output(model, features, fn):
    """``fn(m)`` on the model with one feature set merged into its weights (the oracle); for an
    example without features, on the model before inject."""
    if not features:
        return fn(model.flix_test_base)
    fk.merge(model, features)
    try:
        return fn(model)
    finally:
        fk.unmerge(model)


def tokens(gen, *shape):
    return torch.randint(3, VOCAB, shape, generator=gen)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
def test_feature_ids_input_routes_each_example(kind, seed):
    model, space = flix_model(kind, seed)
    handle = fk.accept_feature_ids(model)
    gen = torch.Generator().manual_seed(seed)
    x = tokens(gen, len(FEATURES), 6)
    extra = {"decoder_input_ids": tokens(gen, len(FEATURES), 4)} if kind == "t5" else {}
    with torch.no_grad():
        got = model(input_ids=x, feature_ids=space.encode(FEATURES), **extra).logits
        for b, feats in enumerate(FEATURES):
            one = {k: v[b:b + 1] for k, v in extra.items()}
            want = merged_output(model, feats, lambda m: m(input_ids=x[b:b + 1], **one).logits)
            torch.testing.assert_close(got[b:b + 1], want, rtol=1e-9, atol=1e-9)
    # The routing lived for that forward only; without feature_ids nothing routes the model,
    # and the error names the input this model takes.
    assert all(layer._routing is None for _, layer in fk.flix_layers(model))
    with pytest.raises(RuntimeError, match="no routing.*pass feature_ids="), torch.no_grad():
        model(input_ids=x, **extra)
    with pytest.raises(ValueError, match="cu_seqlens was passed without feature_ids"), torch.no_grad():
        model(input_ids=x, cu_seqlens=torch.tensor([0, 6]), **extra)
    handle.remove()
    with pytest.raises(RuntimeError, match="no routing") as e, torch.no_grad():  # feature_ids is ignored again
        model(input_ids=x, feature_ids=space.encode(FEATURES), **extra)
    assert "feature_ids=" not in str(e.value)


def test_feature_ids_given_as_dicts_are_encoded_with_the_space(seed):
    model, space = flix_model("llama", seed)
    fk.accept_feature_ids(model)
    x = tokens(torch.Generator().manual_seed(seed), len(FEATURES), 5)
    with torch.no_grad():
        want = model(input_ids=x, feature_ids=space.encode(FEATURES)).logits
        got = model(input_ids=x, feature_ids=[dict(f) for f in FEATURES]).logits
        assert torch.equal(got, want)
        assert torch.equal(fk.generate(model, x, feature_ids=FEATURES, max_new_tokens=3, do_sample=False, pad_token_id=0),
                           fk.generate(model, x, feature_ids=space.encode(FEATURES), max_new_tokens=3, do_sample=False,
                                       pad_token_id=0))
        with pytest.raises(ValueError, match="example 1: unknown feature 'xx'"):
            model(input_ids=x, feature_ids=[{}, {"language": "xx"}, {}, {}])
        with pytest.raises(ValueError, match="feature_ids.*list of .*dicts.*example 1 is a list"):
            model(input_ids=x, feature_ids=[{}, [0, 1], {}, {}])
        with pytest.raises(ValueError, match=r"a list of one \{group: value\} dict per example; got a single dict"):
            model(input_ids=x, feature_ids={"language": "fr"})


@pytest.mark.parametrize("kind", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize("search", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)],
                         ids=["greedy", "beam3", "beam2x2"])
def test_generate_uses_each_examples_features_across_beams(kind, search, seed):
    model, space = flix_model(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = tokens(gen, len(FEATURES), 5)
    args = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, **search)
    got = fk.generate(model, prompts, feature_ids=space.encode(FEATURES), **args)
    per = search.get("num_return_sequences", 1)
    assert got.shape[0] == len(FEATURES) * per
    for b, feats in enumerate(FEATURES):
        want = merged_output(model, feats, lambda m: m.generate(prompts[b:b + 1], **args))
        torch.testing.assert_close(got[b * per:(b + 1) * per, :want.shape[1]], want, rtol=0, atol=0)
    assert all(layer._routing is None for _, layer in fk.flix_layers(model))  # nothing left routed


def test_generate_rejects_bad_arguments(seed):
    model, space = flix_model("llama", seed)
    prompts = tokens(torch.Generator().manual_seed(seed), 2, 3)
    ids = space.encode(FEATURES[:2])
    with pytest.raises(ValueError, match="exactly one of"):
        fk.generate(model, prompts, max_new_tokens=2)
    with pytest.raises(ValueError, match="exactly one of"):
        fk.generate(model, prompts, feature_ids=ids, routing=fk.Routing(ids, space), max_new_tokens=2)
    packed = fk.Routing(ids, space, cu_seqlens=[0, 2, 3])
    with pytest.raises(ValueError, match="packed"):
        fk.generate(model, prompts, routing=packed, max_new_tokens=2)
    with pytest.raises(ValueError, match="generate got 3 feature sets for 2 prompts"):
        fk.generate(model, prompts, feature_ids=space.encode(FEATURES[:3]), max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="generate got 3 examples in the routing for 2 prompts"):
        fk.generate(model, prompts, routing=fk.Routing(space.encode(FEATURES[:3]), space), max_new_tokens=2)
    assert all(layer._routing is None for _, layer in fk.flix_layers(model))


def test_generate_refuses_fewer_feature_sets_than_prompts_and_broadcasts_one(seed):
    """2 dicts for 4 prompts used to be stretched as if the extra prompts were beams (prompts 0-1
    got dict 0, 2-3 dict 1); one dict (or one routing row) is for every prompt."""
    model, space = flix_model("llama", seed)
    prompts = tokens(torch.Generator().manual_seed(seed), 4, 3)
    args = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match="generate got 2 feature sets for 4 prompts; pass one per prompt, or one"):
        fk.generate(model, prompts, feature_ids=FEATURES[:2], **args)
    with pytest.raises(ValueError, match="generate got 2 feature sets for 4 prompts"):
        fk.generate(model, input_ids=prompts, feature_ids=space.encode(FEATURES[:2]), **args)
    one = fk.generate(model, prompts, feature_ids=[FEATURES[1]], **args)
    each = fk.generate(model, prompts, feature_ids=[FEATURES[1]] * 4, **args)
    by_routing = fk.generate(model, prompts, routing=fk.Routing(space.encode([FEATURES[1]]), space), **args)
    assert torch.equal(one, each) and torch.equal(by_routing, each)


def test_routing_repeat_interleave(seed):
    space = make_space()
    r = fk.Routing(space.encode(FEATURES), space, feature_dropout=0.5, generator=torch.Generator().manual_seed(seed))
    rep = r.repeat_interleave(3)
    assert rep.num_examples == 3 * len(FEATURES) and rep.feature_dropout == 0.0
    for b in range(len(FEATURES)):  # the copies keep the original's dropout draw
        for j in range(3):
            assert rep.features_of(3 * b + j) == r.features_of(b)
    assert r.repeat_interleave(1) is r
    with pytest.raises(ValueError, match="positive int"):
        r.repeat_interleave(0)


def ragged_examples(gen, lengths):
    return [{"input_ids": tokens(gen, n).tolist(), "features": FEATURES[i % len(FEATURES)]}
            for i, n in enumerate(lengths)]


def test_collator_pads_and_encodes_features(seed):
    space = make_space()
    gen = torch.Generator().manual_seed(seed)
    examples = ragged_examples(gen, [3, 6, 1, 4])
    for ex in examples:
        ex["labels"] = list(ex["input_ids"])
    batch = fk.FeatureCollator(space, pad_token_id=2)(examples)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "feature_ids"}
    assert batch["input_ids"].shape == (4, 6)
    torch.testing.assert_close(batch["feature_ids"], space.encode([ex["features"] for ex in examples]))
    for b, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == ex["input_ids"] and (batch["input_ids"][b, n:] == 2).all()
        assert (batch["labels"][b, n:] == -100).all() and batch["attention_mask"][b].sum() == n
    left = fk.FeatureCollator(space, padding_side="left")(examples)
    assert left["input_ids"][2, -1].item() == examples[2]["input_ids"][0] and left["attention_mask"][2, :-1].sum() == 0
    # A user collator handles the model fields; FeatureCollator only adds feature_ids.
    custom = fk.FeatureCollator(space, collator=lambda rows: {"n": torch.tensor(len(rows))})(examples)
    assert custom["n"].item() == 4 and custom["feature_ids"].shape == (4, 2)


@pytest.mark.parametrize("field", ["labels", "attention_mask"])
def test_collator_rejects_token_fields_of_another_length(seed, field):
    """labels (and the other per-token fields) align with input_ids token by token in a causal LM:
    a length mismatch is a data bug, not something to pad."""
    space = make_space()
    examples = ragged_examples(torch.Generator().manual_seed(seed), [4, 6, 3])
    for ex in examples:
        ex[field] = [1] * len(ex["input_ids"])
    examples[1][field] = examples[1][field][:-2]
    with pytest.raises(ValueError, match=f"example 1: {field} has 4 tokens, input_ids 6"):
        fk.FeatureCollator(space)(examples)
    if field == "labels":  # packing uses input_ids and labels only
        with pytest.raises(ValueError, match=f"example 1: {field} has 4 tokens, input_ids 6"):
            fk.FeatureCollator(space, pack=True)(examples)


def test_collator_pads_seq2seq_labels_on_their_own(seed):
    """seq2seq=True: labels are decoder targets of their own length (T5), padded to the longest labels."""
    space = make_space()
    gen = torch.Generator().manual_seed(seed)
    examples = ragged_examples(gen, [4, 6, 3])
    for ex, n in zip(examples, [2, 5, 1]):
        ex["labels"] = tokens(gen, n).tolist()
    batch = fk.FeatureCollator(space, seq2seq=True)(examples)
    assert batch["input_ids"].shape == (3, 6) and batch["labels"].shape == (3, 5)
    for b, ex in enumerate(examples):
        n = len(ex["labels"])
        assert batch["labels"][b, :n].tolist() == ex["labels"] and (batch["labels"][b, n:] == -100).all()
    with pytest.raises(ValueError, match="seq2seq=True does not pack"):
        fk.FeatureCollator(space, seq2seq=True, pack=True)


def test_collator_errors_name_the_example(seed):
    space = make_space()
    examples = ragged_examples(torch.Generator().manual_seed(seed), [2, 2])
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        fk.FeatureCollator(space)([examples[0], {"input_ids": [1, 2]}])
    examples[1]["features"] = {"language": "xx"}
    with pytest.raises(ValueError, match="example 1"):
        fk.FeatureCollator(space)(examples)
    with pytest.raises(ValueError, match="example 0 has no tokens"):
        fk.FeatureCollator(space, pack=True)([{"input_ids": [], "features": {}}])


@pytest.mark.parametrize("boundaries", ["cu_seqlens", "position_ids"])
def test_packed_batch_equals_each_example_alone(boundaries, seed):
    """One packed row of ragged examples, each with its own features, against the examples run one by one."""
    model, space = flix_model("llama", seed)
    fk.accept_feature_ids(model)
    gen = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 7, 3, 4]
    examples = ragged_examples(gen, lengths)
    batch = fk.FeatureCollator(space, pack=True)(examples)
    assert batch["use_cache"] is False  # with a KV cache transformers would attend across the examples
    assert batch["input_ids"].shape == (1, sum(lengths)) and batch["cu_seqlens"].tolist() == [0, 5, 6, 13, 16, 20]
    assert (batch["labels"][0, batch["cu_seqlens"][:-1]] == -100).all()
    if boundaries == "position_ids":
        del batch["cu_seqlens"]  # read back from position_ids, as after transformers' flattening collator
    with torch.no_grad():
        out = model(**batch)
    cu = [0] + torch.tensor(lengths).cumsum(0).tolist()
    total, count = 0.0, 0
    for b, ex in enumerate(examples):
        x = torch.tensor(ex["input_ids"])[None]
        with torch.no_grad():
            want = merged_output(model, ex["features"], lambda m: m(input_ids=x).logits)
        torch.testing.assert_close(out.logits[:, cu[b]:cu[b + 1]], want, rtol=1e-9, atol=1e-9)
        logp = want[0, :-1].log_softmax(-1)
        total -= logp.gather(1, x[0, 1:, None]).sum().item()
        count += x.shape[1] - 1
    # The packed loss is the mean over every example's own next-token predictions.
    assert out.loss.item() == pytest.approx(total / count, rel=1e-6)  # transformers computes the loss in fp32


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_matches_plain_backward(use_reentrant, seed):
    """HF gradient checkpointing recomputes each layer in backward; with feature dropout the
    recomputation must replay the forward's own draw."""
    grads = []
    for checkpointing in (False, True):
        model, space = flix_model("llama", seed)
        model.train()
        fk.accept_feature_ids(model, feature_dropout=0.4, generator=torch.Generator().manual_seed(seed))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            if use_reentrant:
                model.enable_input_require_grads()  # reentrant checkpoint needs an input that requires grad
        gen = torch.Generator().manual_seed(seed + 2)
        x = tokens(gen, len(FEATURES), 6)
        for _ in range(2):  # two batches: the second must not reuse the first's routing
            loss = model(input_ids=x, labels=x, feature_ids=space.encode(FEATURES)).loss
            loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-9, atol=1e-12, msg=name)
    assert any(g.abs().sum() > 0 for n, g in grads[0].items() if "lora_B" in n)


def test_trainer_trains_with_the_collator(tmp_path, seed):
    pytest.importorskip("accelerate")
    model, space = flix_model("llama", seed, dtype=torch.float32)
    fk.accept_feature_ids(model, feature_dropout=0.1)
    gen = torch.Generator().manual_seed(seed)
    data = ragged_examples(gen, [4, 6, 3, 5, 6, 2, 7, 4])
    for ex in data:
        ex["labels"] = list(ex["input_ids"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
        disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=fk.FeatureCollator(space))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == ("lora_" in n), n  # only the FLix parameters train


def test_gpt2_conv1d_layers_merge_and_export(tmp_path, seed):
    peft = pytest.importorskip("peft")
    base = tiny("gpt2", seed)
    model = copy.deepcopy(base)
    space = make_space()
    names = fk.inject(model, space, target_modules="all-linear")
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}  # every Conv1D, not the head
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    with torch.no_grad():
        randomize_adapters(model, torch.Generator().manual_seed(seed), b_scale=0.3)
    feats = {"language": "sw", "task": "qa"}
    x = tokens(torch.Generator().manual_seed(seed), 2, 5)
    with torch.no_grad(), fk.use_routing(model, fk.Routing(space.encode([feats] * 2), space)):
        routed = model(x).logits
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, fk.FLixLinear)}
    with torch.no_grad():
        merged = merged_output(model, feats, lambda m: m(x).logits)
    torch.testing.assert_close(merged, routed, rtol=1e-4, atol=1e-5)
    for n, m in model.named_modules():
        if isinstance(m, fk.FLixLinear):
            torch.testing.assert_close(m.weight, weights[n], rtol=0, atol=1e-6)
    out = fk.export_peft(model, feats, str(tmp_path / "peft"))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, routed, rtol=1e-4, atol=1e-5)


def test_gpt2_adapters_save_and_load_into_a_fresh_model(tmp_path, seed):
    model, space = flix_model("gpt2", seed)
    fk.save_adapters(model, str(tmp_path / "a"))
    fresh = tiny("gpt2", seed).double()
    names = fk.load_adapters(fresh, str(tmp_path / "a"))  # injects the Conv1D layers, then loads
    assert sorted(names) == sorted(n for n, _ in fk.flix_layers(model))
    x = tokens(torch.Generator().manual_seed(seed), len(FEATURES), 4)
    ids = space.encode(FEATURES)
    with torch.no_grad():
        with fk.use_routing(model, fk.Routing(ids, space)):
            want = model(x).logits
        with fk.use_routing(fresh, fk.Routing(ids, space)):
            got = fresh(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _outputs(model, x, routing=None):
    with torch.no_grad():
        if routing is None:
            return model(input_ids=x).logits
        with fk.use_routing(model, routing):
            return model(input_ids=x).logits


def test_save_pretrained_of_an_injected_model_loads_as_the_plain_model(tmp_path, seed):
    """save_pretrained keeps the plain names: plain from_pretrained gets the base weights (the
    adapters are unexpected keys), and the same checkpoint restores an injected model, adapters too."""
    model, space = flix_model("llama", seed, dtype=torch.float32)
    base = model.flix_test_base
    model.save_pretrained(tmp_path / "ckpt")
    plain, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", output_loading_info=True)
    plain.eval()
    adapters = {k for k in model.state_dict() if k.endswith((".lora_A", ".lora_B"))}
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == adapters
    assert not any(isinstance(m, fk.FLixLinear) for m in plain.modules())
    x = tokens(torch.Generator().manual_seed(seed), len(FEATURES), 6)
    assert torch.equal(_outputs(plain, x), _outputs(base, x))

    # the checkpoint into a freshly injected model (what resuming a Trainer checkpoint does)
    fresh = tiny("llama", seed + 1)
    fk.inject(fresh, space, target_modules="all-linear")
    from safetensors.torch import load_file
    result = fresh.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"), strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    routing = fk.Routing(space.encode(FEATURES), space)
    assert torch.equal(_outputs(fresh, x, routing), _outputs(model, x, routing))


def test_trainer_checkpoint_resumes_into_an_injected_model_and_loads_as_plain(tmp_path, seed):
    pytest.importorskip("accelerate")
    model, space = flix_model("llama", seed, dtype=torch.float32)
    fk.accept_feature_ids(model)
    data = ragged_examples(torch.Generator().manual_seed(seed), [4, 6, 3, 5])
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
        disable_tqdm=True)
    for ex in data:
        ex["labels"] = list(ex["input_ids"])
    transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=fk.FeatureCollator(space)).train()
    ckpt = tmp_path / "checkpoint-2"
    x = tokens(torch.Generator().manual_seed(seed + 3), len(FEATURES), 6)
    routing = fk.Routing(space.encode(FEATURES), space)
    plain = transformers.LlamaForCausalLM.from_pretrained(ckpt).eval()
    assert torch.equal(_outputs(plain, x), _outputs(model.flix_test_base, x))  # the base never trained
    resumed = tiny("llama", seed + 1)
    fk.inject(resumed, space, target_modules="all-linear")
    fk.accept_feature_ids(resumed)
    trainer = transformers.Trainer(model=resumed, args=args, train_dataset=data, data_collator=fk.FeatureCollator(space))
    trainer.train(resume_from_checkpoint=str(ckpt))  # loads the checkpoint; max_steps is reached, no step runs
    model.eval()
    resumed.eval()
    assert torch.equal(_outputs(resumed, x, routing), _outputs(model, x, routing))


def _train_with_dropout_generator(tmp_path, seed, space, data, max_steps, resume=None):
    model = tiny("llama", seed)
    fk.inject(model, space, target_modules="all-linear")
    with torch.no_grad():
        randomize_adapters(model, torch.Generator().manual_seed(seed + 1), b_scale=0.3)
    fk.accept_feature_ids(model, feature_dropout=0.5, generator=torch.Generator().manual_seed(seed + 7))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2, learning_rate=1e-2,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
        disable_tqdm=True, seed=seed, data_seed=seed)
    model.train()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=fk.FeatureCollator(space))
    trainer.train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_resume_with_a_dropout_generator_is_bit_identical(tmp_path, seed):
    """accept_feature_ids(generator=...): the generator's state travels in the model's state dict,
    so a run resumed from a Trainer checkpoint draws the feature dropout of the unbroken run."""
    pytest.importorskip("accelerate")
    space = make_space()
    data = ragged_examples(torch.Generator().manual_seed(seed), [4, 6, 3, 5, 2, 7, 4, 3])
    for ex in data:
        ex["labels"] = list(ex["input_ids"])
    unbroken = _train_with_dropout_generator(tmp_path / "a", seed, space, data, max_steps=4)  # saves checkpoint-2
    resumed = _train_with_dropout_generator(tmp_path / "c", seed, space, data, max_steps=4,
                                            resume=str(tmp_path / "a" / "checkpoint-2"))
    assert unbroken.keys() == resumed.keys()
    for name in unbroken:
        assert torch.equal(unbroken[name], resumed[name]), name


def test_dropout_generator_state_is_in_the_state_dict_until_removed(seed):
    model, space = flix_model("llama", seed)
    gen = torch.Generator().manual_seed(seed)
    handle = fk.accept_feature_ids(model, feature_dropout=0.5, generator=gen)
    key = handle.GENERATOR_STATE
    torch.rand(5, generator=gen)
    state = model.state_dict()
    assert torch.equal(state[key], gen.get_state())  # the state now, not when accept_feature_ids was called
    expected = torch.rand(5, generator=gen)
    torch.rand(7, generator=gen)
    model.load_state_dict(state)
    assert torch.equal(torch.rand(5, generator=gen), expected)
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        fk.accept_feature_ids(model, feature_dropout=0.5, generator="seed")
    handle.remove()
    assert key not in model.state_dict()
    fk.accept_feature_ids(model, feature_dropout=0.5)
    assert key not in model.state_dict()  # no generator of its own: torch's, which checkpoints already carry


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_and_unload_and_unload_of_transformers_models(kind, seed):
    model, space = flix_model(kind, seed)
    base = model.flix_test_base
    kept = copy.deepcopy(model)
    fk.accept_feature_ids(kept)
    feats = {"language": "sw", "task": "qa"}
    x = tokens(torch.Generator().manual_seed(seed), 2, 5)
    routing = fk.Routing(space.encode([feats] * 2), space)
    routed = _outputs(model, x, routing)
    fk.merge_and_unload(model, feats)
    assert not fk.flix_layers(model)
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    torch.testing.assert_close(_outputs(model, x), routed, rtol=1e-9, atol=1e-9)
    fk.unload(kept)  # also removes the feature_ids hooks (they would route the dropped layers)
    assert torch.equal(_outputs(kept, x), _outputs(base, x))
    assert kept._flix_feature_inputs is None and not kept._forward_pre_hooks and not kept._forward_hooks
