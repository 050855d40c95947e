"""File what a GPU verify run brought back under ``benchmarks/results/<device>/<commit>/``.

    python benchmarks/gpu_import.py FOLDER_OR_ARCHIVE [--results benchmarks/results] [--commit SHA] [--force]

FOLDER_OR_ARCHIVE: the folder the device tool copied ``$OUT`` into (it holds ``verify.tar.gz``),
or the archive itself. Everything is checked before anything is written (regular files with
relative paths only, a summary that names its device and commit); the folder appears whole or
not at all (written beside its place, then renamed). It holds the archive's tree (``logs/``,
``results/<step>/`` of every bench run), ``results.json`` (device, versions, commit, date, every
part and step, the targets' verdicts, the decisions) and ``results.md`` (the same as tables).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import uuid
from pathlib import Path

ARCHIVE = "verify.tar.gz"
MAX_BYTES = 256 << 20  # unpacked, all files together


class ImportRefused(Exception):
    pass


def device_slug(name: str, dry_run: bool) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``; a dry run files under ``"dry-run"``."""
    if dry_run:
        return "dry-run"
    m = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-") or "unknown").lower()


def read_archive(src: Path) -> tuple[tarfile.TarFile, dict]:
    """The opened archive and its summary, after checking every member."""
    path = src / ARCHIVE if src.is_dir() else src
    if not path.is_file():
        raise ImportRefused(f"{path}: no such archive (expected {ARCHIVE} from gpu_run.sh verify)")
    try:
        tar = tarfile.open(path, "r:gz")
        members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImportRefused(f"{path}: not a readable gzip tar archive ({exc})") from exc
    total = 0
    for m in members:
        parts = Path(m.name).parts
        if not m.isfile() or m.name.startswith("/") or ".." in parts or not parts:
            raise ImportRefused(f"{path}: member {m.name!r} is not a regular file with a relative path inside the "
                                "archive")
        total += m.size
    if total > MAX_BYTES:
        raise ImportRefused(f"{path}: {total} bytes unpacked, over the {MAX_BYTES} allowed")
    try:
        summary = json.load(tar.extractfile("summary.json"))
    except (KeyError, ValueError) as exc:
        raise ImportRefused(f"{path}: no readable summary.json in the archive ({exc})") from exc
    for key in ("dry_run", "provenance", "parts", "decisions"):
        if key not in summary:
            raise ImportRefused(f"{path}: summary.json has no {key!r}")
    return tar, summary


def results_record(summary: dict, commit: str) -> dict:
    """``results.json``: the layout every recorded run has (device, versions, commit, date) and
    the verify run's parts, targets and decisions."""
    p = summary["provenance"]
    versions = {k: p.get(k) for k in ("python", "torch", "cuda", "triton", "transformers", "peft", "numpy")}
    targets = {f"{s['step']}: {name}": t for part in summary["parts"] for s in part["steps"]
               for name, t in s.get("targets", {}).items()}
    return {"device": p["device"], "versions": versions, "commit": commit, "date": p["date"],
            "dry_run": summary["dry_run"], "seconds": summary.get("seconds"), "parts": summary["parts"],
            "targets": targets, "decisions": summary["decisions"]}


def import_run(src: Path, results: Path, commit: str | None = None, force: bool = False) -> Path:
    """Unpack ``src`` into ``results/<device>/<commit>/`` and return that folder."""
    tar, summary = read_archive(src)
    with tar:
        commit = commit or summary["provenance"].get("commit") or "unknown"
        if commit == "unknown" or not re.fullmatch(r"[0-9a-fA-F]{7,40}", commit):
            raise ImportRefused(f"the run does not name its commit ({commit!r}): pass --commit (the commit that was "
                                "sent, `FLIX_COMMIT=... bash benchmarks/gpu_run.sh verify` records it)")
        device = device_slug(summary["provenance"]["device"]["name"], summary["dry_run"])
        dest = results / device / commit[:12]
        if dest.exists() and not force:
            raise ImportRefused(f"{dest} exists (--force replaces it)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = dest.parent / f".import-{uuid.uuid4().hex}"
        try:
            staging.mkdir()
            for m in tar.getmembers():
                target = staging / m.name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(m) as f_in, open(target, "wb") as f_out:
                    shutil.copyfileobj(f_in, f_out)
            (staging / "results.json").write_text(json.dumps(results_record(summary, commit), indent=1) + "\n")
            md = (staging / "summary.md").read_text() if (staging / "summary.md").exists() else ""
            (staging / "results.md").write_text(md or f"# GPU verify, commit {commit}\n")
            if dest.exists():
                old = dest.parent / f".replaced-{uuid.uuid4().hex}"
                dest.rename(old)
                staging.rename(dest)
                shutil.rmtree(old)
            else:
                staging.rename(dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path, help=f"the folder that holds {ARCHIVE}, or the archive")
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results",
                    help="the results tree (default: benchmarks/results)")
    ap.add_argument("--commit", default=None, help="the commit the run measured, where the run could not tell")
    ap.add_argument("--force", action="store_true", help="replace an earlier import of the same device and commit")
    args = ap.parse_args(argv)
    try:
        dest = import_run(args.src, args.results, args.commit, args.force)
    except ImportRefused as exc:
        print(f"gpu_import: {exc}", file=sys.stderr)
        return 2
    print(f"imported into {dest}")
    print((dest / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
