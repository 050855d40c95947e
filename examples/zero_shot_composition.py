"""Zero-shot composition: do FLix's language and task adapters compose into pairs never trained?

A tiny Llama is pretrained on a generic objective over four synthetic "languages" (disjoint
vocabularies over the same symbols) and frozen. Adapters learn four sequence tasks on 12 of
the 16 (language, task) pairs; the other 4 (one per language and per task) are held out.
Shared LoRA, one LoRA per seen pair, FLix and FLix with feature dropout get the same budget;
the script reports exact match on seen and held-out pairs over several seeds and writes
results.json, results.md and curves.png. Same as ``flix-kernels demo``:

    python examples/zero_shot_composition.py --quick            # smoke run, about 4.5 min on 2 CPU cores
    python examples/zero_shot_composition.py --seeds 4 --out flix-demo
    python examples/zero_shot_composition.py --quick --set rank_language=8 --set rank_task=8
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from flix_kernels.cli import DEMO_QUICK, check_out_folder, device_arg, positive_arg
from flix_kernels.demo import DemoConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help=f"a short, undertrained smoke run: 2 seeds, fewer steps ({DEMO_QUICK}); "
                             "its accuracies are not the experiment's result")
    preset.add_argument("--smoke", action="store_true", help="a few seconds; the numbers mean nothing")
    parser.add_argument("--seeds", type=positive_arg(int), default=None, metavar="N",
                        help="number of seeds 0..N-1 (default: the preset's)")
    parser.add_argument("--out", default="flix-demo", metavar="DIR", help="output folder (default: ./flix-demo)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a DemoConfig field, e.g. --set rank_task=8 --set methods=lora,flix")
    args = parser.parse_args()
    cfg = DemoConfig.smoke() if args.smoke else DemoConfig.quick() if args.quick else DemoConfig.default()
    cfg.device = str(args.device)
    if args.seeds:
        cfg = cfg.with_seeds(args.seeds)
    names = [f.name for f in fields(DemoConfig)]
    for item in args.set:  # for the investigations in the findings: other ranks, dropout, pretraining
        key, _, value = item.partition("=")
        if key not in names:
            parser.error(f"argument --set: unknown DemoConfig field {key!r}; fields: {', '.join(names)}")
        old = getattr(cfg, key)
        try:
            if isinstance(old, tuple):
                new = tuple(type(old[0])(v) if old else v for v in value.split(","))
            else:
                new = type(old)(value) if old is not None else int(value)
        except ValueError:
            parser.error(f"argument --set: {key}={value!r} is not a valid {type(old).__name__}")
        setattr(cfg, key, new)
    check_out_folder(parser, Path(args.out))
    run(cfg, args.out, show_progress=True, console=True)


if __name__ == "__main__":
    main()
