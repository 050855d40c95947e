"""Zero-shot composition: do FLix's language and task adapters compose into pairs never trained?

A tiny Llama is pretrained on a generic objective over four synthetic "languages" (disjoint
vocabularies over the same symbols) and frozen. Adapters learn four sequence tasks on 12 of
the 16 (language, task) pairs; the other 4 (one per language and per task) are held out.
Shared LoRA, one LoRA per seen pair, FLix and FLix with feature dropout get the same budget;
the script reports exact match on seen and held-out pairs over several seeds and writes
results.json, results.md and curves.png. Same as ``flix-kernels demo``:

    python examples/zero_shot_composition.py --quick            # about 4 minutes on 2 CPU cores
    python examples/zero_shot_composition.py --seeds 4 --out flix-demo
    python examples/zero_shot_composition.py --quick --set rank_language=8 --set rank_task=8
"""

from __future__ import annotations

import argparse

from flix_kernels.demo import DemoConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, shorter training")
    parser.add_argument("--smoke", action="store_true", help="a few seconds; the numbers mean nothing")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: preset's)")
    parser.add_argument("--out", default="flix-demo", help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a DemoConfig field, e.g. --set rank_task=8 --set methods=lora,flix")
    args = parser.parse_args()
    cfg = DemoConfig.smoke() if args.smoke else DemoConfig.quick() if args.quick else DemoConfig.default()
    cfg.device = args.device
    if args.seeds:
        cfg = cfg.with_seeds(args.seeds)
    for item in args.set:  # for the investigations in the findings: other ranks, dropout, pretraining
        key, _, value = item.partition("=")
        if not hasattr(cfg, key):
            parser.error(f"unknown DemoConfig field {key!r}")
        old = getattr(cfg, key)
        if isinstance(old, tuple):
            new = tuple(type(old[0])(v) if old else v for v in value.split(","))
        else:
            new = type(old)(value) if old is not None else int(value)
        setattr(cfg, key, new)
    run(cfg, args.out, show_progress=True, console=True)


if __name__ == "__main__":
    main()
