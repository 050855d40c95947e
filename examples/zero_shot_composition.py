"""Zero-shot composition: do FLix's language and task adapters compose into pairs never trained?

Same as ``flix-kernels demo``, with ``--set`` to change any DemoConfig field, pretraining
included. By default the numbers benchmark: numbers 0..99 and their words (num2words) in six
real languages of four families, tasks spell / read / next / ordinal; a tiny Llama pretrained
from scratch on the languages' text and frozen; adapters on 18 of the 24 (language, task)
pairs; the other 6 (one per language and per task) are held out. Shared LoRA, one LoRA per
seen pair, FLix and FLix with feature dropout get the same budget; the script reports exact
match on seen and held-out pairs over several seeds and writes results.json, results.md and
curves.png. ``--data synthetic`` runs the synthetic benchmark instead.

    python examples/zero_shot_composition.py --quick            # smoke run of the pipeline
    python examples/zero_shot_composition.py --seeds 4 --out flix-demo
    python examples/zero_shot_composition.py --quick --set pretrain_aligned=0 --set methods=lora+flix
"""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from flix_kernels.cli import DEMO_QUICK, check_out_folder, device_arg, positive_arg
from flix_kernels.demo import DemoConfig, check_variants, parse_variant, run
from flix_kernels.demo.experiment import DATA


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help=f"a short, undertrained smoke run: 2 seeds, fewer steps ({DEMO_QUICK}); "
                             "its accuracies are not the experiment's result")
    preset.add_argument("--smoke", action="store_true", help="a few seconds; the numbers mean nothing")
    parser.add_argument("--data", choices=tuple(DATA), default=DemoConfig.data, help="the benchmark (default: numbers)")
    parser.add_argument("--seeds", type=positive_arg(int), default=None, metavar="N",
                        help="number of seeds 0..N-1 (default: the preset's)")
    parser.add_argument("--out", default="flix-demo", metavar="DIR", help="output folder (default: ./flix-demo)")
    parser.add_argument("--device", type=device_arg, default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="change a DemoConfig field, e.g. --set rank_task=8 --set methods=lora+flix")
    args = parser.parse_args()
    preset = DemoConfig.smoke if args.smoke else DemoConfig.quick if args.quick else DemoConfig.default
    cfg = preset(data=args.data)
    cfg.device = str(args.device)
    if args.seeds:
        cfg = cfg.with_seeds(args.seeds)
    settable = tuple(f.name for f in fields(DemoConfig) if f.name not in ("preset", "data", "device", "method_lr"))
    try:
        for item in args.set:  # for the investigations in the findings: other ranks, dropout, pretraining
            cfg = replace(cfg, **parse_variant(item, allowed=settable))
        check_variants(cfg)
    except ValueError as e:
        parser.error(f"argument --set: {e}")
    check_out_folder(parser, Path(args.out))
    run(cfg, args.out, show_progress=True, console=True)


if __name__ == "__main__":
    main()
