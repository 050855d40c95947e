"""The README's integration snippets (blocks after a ``<!-- readme-test: NAME -->`` line) run as
written, each in a fresh interpreter (Liger patches transformers' module globals); its API tables
name real functions with their real signatures."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", re.S)
SNIPPETS = dict(_BLOCK.findall(README.read_text()))
NEEDS = {"quantized": ["transformers", "bitsandbytes", "peft"], "compile": ["transformers"],
         "liger": ["transformers", "liger_kernel"]}


def test_the_readme_has_its_snippets():
    assert set(SNIPPETS) == set(NEEDS)


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_readme_snippet_runs_as_written(name, tmp_path):
    for module in NEEDS[name]:
        pytest.importorskip(module)
    script = tmp_path / f"{name}.py"
    script.write_text(SNIPPETS[name])
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # Liger's kernels on CPU tensors
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]



# -- the API tables ------------------------------------------------------------------------------
# Every table row whose first cell is a backticked call (`name(args)`, several joined by " / ") is
# checked against the code: the name resolves in flix_kernels, and the documented parameters
# (names, order, the "*" keyword-only marker, defaults) are inspect.signature's. A trailing "..."
# leaves the rest unlisted; "-> ..." after the call is its result, not checked. Backticked
# `Class.method(args)` calls of our classes in the description cell are checked the same way.
_ROW = re.compile(r"^\|\s*(`.+?)\s*\|(.*)\|\s*$", re.M)
_CODE = re.compile(r"`([^`]+)`")
_NAME = re.compile(r"[A-Za-z_][\w.]*\(")
_EMPTY = inspect.Parameter.empty
_KINDS = {inspect.Parameter.POSITIONAL_ONLY: "pos", inspect.Parameter.POSITIONAL_OR_KEYWORD: "pos",
          inspect.Parameter.KEYWORD_ONLY: "kw", inspect.Parameter.VAR_POSITIONAL: "*args",
          inspect.Parameter.VAR_KEYWORD: "**kw"}


class _Call:
    """``name(args)`` parsed from a backticked span, optionally followed by ``-> result``."""

    def __init__(self, name: str, args: str):
        self.name, self.args = name, args

    @classmethod
    def parse(cls, code: str) -> "_Call | None":
        code = code.strip()
        head = _NAME.match(code)
        if head is None:
            return None
        depth = 0
        for i in range(head.end() - 1, len(code)):  # the parenthesis that closes the arguments
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            if depth == 0:
                tail = code[i + 1:].strip()
                return cls(head.group(0)[:-1], code[head.end():i]) if not tail or tail.startswith("->") else None
        return None


def _api_rows() -> list[tuple[str, str]]:
    """``(first cell, the rest)`` of every table row whose first cell starts with a backtick."""
    return [(first.strip(), rest) for first, rest in _ROW.findall(README.read_text())]


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated parts (commas inside brackets or quotes do not split)."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return parts + [cur.strip()] if cur.strip() else parts


def _resolve(name: str, context: str | None = None):
    """``name`` in flix_kernels: ``X`` (``fk.X``), ``flix_kernels.mod.X``, ``Class.method``; an
    unqualified name flix_kernels lacks is looked up beside ``context`` (the cell's previous call,
    as in `flix_kernels.reference.flix_delta_reference(...)` / `flix_linear_reference(...)`)."""
    import flix_kernels

    parts = name.split(".")
    if parts[0] == "flix_kernels":
        parts = parts[1:]
    elif not hasattr(flix_kernels, parts[0]) and context is not None and "." in context:
        return _resolve(context.rsplit(".", 1)[0] + "." + name)
    obj, path = flix_kernels, "flix_kernels"
    for part in parts:
        if not hasattr(obj, part) and inspect.ismodule(obj):  # a submodule not imported yet
            try:
                importlib.import_module(f"{path}.{part}")
            except ImportError:
                pass
        if not hasattr(obj, part):
            raise LookupError(f"`{name}`: {path} has no attribute {part!r}")
        obj, path = getattr(obj, part), f"{path}.{part}"
    return obj


def _documented(args: str) -> list[tuple[str, str, str | None]]:
    """``(kind, name, default or None)`` per documented parameter; kind as in _KINDS, or "..."."""
    out, keyword_only = [], False
    for part in _split_args(args):
        if part == "*":
            keyword_only = True
        elif part == "...":
            out.append(("...", "...", None))
        elif part.startswith("**"):
            out.append(("**kw", part[2:], None))
        elif part.startswith("*"):
            keyword_only = True
            out.append(("*args", part[1:], None))
        else:
            name, _, default = part.partition("=")
            out.append(("kw" if keyword_only else "pos", name.strip(), default.strip() or None))
    return out


def _actual(obj) -> list[tuple[str, str, object]]:
    params = list(inspect.signature(obj).parameters.values())
    if params and params[0].name == "self" and inspect.isfunction(obj):  # a method read off its class
        params = params[1:]
    return [(_KINDS[p.kind], p.name, p.default) for p in params]


def _same_default(documented: str | None, actual) -> bool:
    if documented is None or actual is _EMPTY:
        return documented is None and actual is _EMPTY
    try:
        value = ast.literal_eval(documented)
    except (ValueError, SyntaxError):  # not a literal (a dtype, say): as the code's repr reads
        return documented == repr(actual)
    return value == actual and isinstance(value, bool) == isinstance(actual, bool)


def _show(params) -> str:
    marks = {"*args": "*", "**kw": "**"}
    return ", ".join(f"{marks.get(k, '')}{n}{'' if d is _EMPTY else '=' + repr(d)}"
                     f"{' (keyword-only)' if k == 'kw' else ''}" for k, n, d in params)


def _signature_problems(call: str, context: str | None = None) -> list[str]:
    """What the documented call gets wrong about the code's signature (empty when nothing)."""
    parsed = _Call.parse(call)
    name, args = parsed.name, parsed.args
    try:
        obj = _resolve(name, context)
    except LookupError as exc:
        return [str(exc)]
    doc, real = _documented(args), _actual(obj)
    more = bool(doc) and doc[-1][0] == "..."
    listed = doc[:-1] if more else doc
    got = real[:len(listed)] if more else real
    problems = []
    if any(kind == "..." for kind, _, _ in listed):
        problems.append("'...' must come last")
    if more and len(real) <= len(listed):
        problems.append("'...' says more parameters follow, but the code has none")
    if [(k, n) for k, n, _ in listed] != [(k, n) for k, n, _ in got]:
        problems.append(f"the code's parameters are ({_show(real)})")
    else:
        problems += [f"{n}: documented default {d or '(none)'}, the code's is {'(none)' if a is _EMPTY else repr(a)}"
                     for (_, n, d), (_, _, a) in zip(listed, got) if not _same_default(d, a)]
    return [f"`{call}`: {p}" for p in problems]


def _ours(name: str) -> bool:
    try:
        _resolve(name)
        return True
    except LookupError:
        return False


def test_the_readme_api_tables_match_the_code():
    problems, checked = [], 0
    for first, rest in _api_rows():
        context = None
        for code in _CODE.findall(first):
            call = _Call.parse(code)
            if call:
                problems += _signature_problems(code.strip(), context)
                context, checked = call.name, checked + 1
            else:  # a module or class named without a call (`flix_kernels.ofa`)
                try:
                    _resolve(code.strip(), context)
                except LookupError as exc:
                    problems.append(str(exc))
                context = code.strip()
        for code in _CODE.findall(rest):  # our Class.method(...) in the description
            call = _Call.parse(code)
            if call and "." in call.name and call.name[0].isupper() and _ours(call.name.split(".")[0]):
                problems += _signature_problems(code)
                checked += 1
    assert not problems, "README API rows that disagree with the code:\n" + "\n".join(problems)
    assert checked >= 40, f"only {checked} documented calls found: has the tables' layout changed?"
    assert any(first.startswith("`ofa.initialize(") for first, _ in _api_rows()), "the OFA section's table is gone"


def test_the_readme_featurespace_row_names_only_real_attributes():
    """The FeatureSpace row lists attributes and methods rather than one signature: each exists
    (on an instance: some are set in __init__), and each written as a call has that signature."""
    import flix_kernels as fk

    (row,) = [rest for first, rest in _api_rows() if first.startswith("`FeatureSpace(")]
    space = fk.FeatureSpace({"language": ["en", "fr"], "task": ["qa"]}, {"language": 2, "task": 1})
    named, problems = [], []
    for code in _CODE.findall(row):
        name = re.match(r"[A-Za-z_]\w*", code)
        if name is None:
            continue
        named.append(name.group(0))
        if not hasattr(space, name.group(0)):
            problems.append(f"`{code}`: FeatureSpace has no attribute {name.group(0)!r}")
        elif _Call.parse(code):
            problems += _signature_problems(f"FeatureSpace.{code}")
    assert not problems, "\n".join(problems)
    assert {"ranks", "group_ranks", "rank_offsets"} <= set(named), f"the row names {named}"


def test_the_api_table_check_catches_each_kind_of_drift():
    """The checker itself: a wrong name, a missing or extra parameter, a wrong order, a missing
    keyword-only marker, a wrong or missing default, a wrong method signature are all reported."""
    good = 'flix_delta(x, lora_A, lora_B, routing, *, scaling, dropout_p=0.0, backend="auto", generator=None, space=None)'
    assert _signature_problems(good) == []
    assert _signature_problems("flix_kernels.ofa.factorize(weight, k) -> (coords, primitive)") == []
    assert _signature_problems("FLixLinear.from_linear(linear, space, *, alpha=8.0, ...)") == []
    assert _signature_problems("FLixLinear.from_linear(linear, ...)") == []
    assert _signature_problems("flix_linear_reference(x, weight, bias, lora_A, lora_B, feature_ids, rank_offsets, "
                               "scaling, **kw)", context="flix_kernels.reference.flix_delta_reference") == []
    wrong = {
        "flix_delt(x)": "has no attribute 'flix_delt'",
        'flix_delta(x, lora_A, lora_B, routing, *, scaling, dropout_p=0.0, backend="auto")': "the code's parameters",
        'flix_delta(x, lora_B, lora_A, routing, *, scaling, dropout_p=0.0, backend="auto", generator=None, space=None)':
            "the code's parameters",
        'flix_delta(x, lora_A, lora_B, routing, scaling, dropout_p=0.0, backend="auto", generator=None, space=None)':
            "the code's parameters",
        'flix_delta(x, lora_A, lora_B, routing, *, scaling, dropout_p=0.1, backend="auto", generator=None, space=None)':
            "dropout_p: documented default 0.1, the code's is 0.0",
        'flix_delta(x, lora_A, lora_B, routing, *, scaling, dropout_p, backend="auto", generator=None, space=None)':
            "dropout_p: documented default \\(none\\)",
        "FLixLinear.from_linear(linear, space, *, alpha, ...)": "alpha: documented default \\(none\\)",
        "ofa.factorize(weight, k, ...)": "'...' says more parameters follow",
    }
    for call, match in wrong.items():
        problems = _signature_problems(call)
        assert problems and re.search(match, problems[0]), (call, problems)
