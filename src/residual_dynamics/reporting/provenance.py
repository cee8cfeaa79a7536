"""Checkpoint provenance: which weights were probed, and a warning when two revisions serve the same ones.

Released checkpoint series are known to serve wrong weights: EleutherAI/pythia issue 205 reports that 86
of pythia-2.8b's 154 ``step<N>`` branches serve final-era weights. A training-dynamics curve over such
revisions silently repeats one point. So every probed model gets

* a *weight fingerprint* (:func:`weight_fingerprint`): a SHA-256 over a few fixed tensors -- the token
  embedding, every parameter of the first and of the last block, and the final norm -- each hashed as its
  name, its shape and its values in float32 (little-endian bytes). Two models with these tensors equal
  get the same fingerprint; any change to them changes it. It is computed on the probed
  ``TransformerBridge`` (a training checkpoint's bridge and a pretrained model's alike), so it describes
  what the probes saw. A model loaded in bfloat16 hashes its bfloat16 values (widened to float32): the
  fingerprint identifies weights as loaded, dtype included;
* the hub *commit* of the revision when there is one (:func:`hub_commit`: the Hugging Face cache keeps a
  snapshot as ``.../snapshots/<commit>/``, online and offline alike);
* a *registry* per multirun (:func:`register_fingerprint`): every job of one sweep appends its
  fingerprint to ``<sweep dir>/weight_fingerprints.jsonl`` under an exclusive file lock and learns which
  earlier jobs of the sweep probed identical weights under another name (revision, path or file).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

REGISTRY_FILE = "weight_fingerprints.jsonl"
PYTHIA_205 = "https://github.com/EleutherAI/pythia/issues/205"
_COMMIT = re.compile(r"[0-9a-f]{40}")
_WRAPPERS = re.compile(r"(^|\.)_?original_component(?=\.|$)")


def _clean(name: str) -> str:
    """A parameter name without TransformerLens' ``_original_component`` wrapper levels."""
    return _WRAPPERS.sub("", name).lstrip(".")


def fingerprint_parts(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The (label, module) pairs hashed by :func:`weight_fingerprint`: ``embed``, ``blocks.0``,
    ``blocks.<last>`` and ``ln_final`` when the model has one. ``model`` is a ``TransformerBridge`` or any
    module with ``embed`` and ``blocks`` (our ``Transformer``)."""
    blocks = getattr(model, "blocks", None)
    embed = getattr(model, "embed", None)
    if blocks is None or embed is None or len(blocks) == 0:
        raise TypeError(f"{type(model).__name__} has no embed / blocks to fingerprint")
    parts = [("embed", embed), ("blocks.0", blocks[0])]
    if len(blocks) > 1:
        parts.append((f"blocks.{len(blocks) - 1}", blocks[len(blocks) - 1]))
    ln_final = getattr(model, "ln_final", None)
    if isinstance(ln_final, torch.nn.Module):
        parts.append(("ln_final", ln_final))
    return parts


@torch.no_grad()
def weight_fingerprint(model: torch.nn.Module) -> str:
    """Hex SHA-256 over the tensors of :func:`fingerprint_parts`, in order; within a part the parameters
    sorted by name. Each parameter contributes ``"<part>/<name>:<shape>\\n"`` and its float32 values.
    One tensor at a time is copied to the host, so memory stays bounded by the largest tensor."""
    digest = hashlib.sha256()
    for label, module in fingerprint_parts(model):
        params = sorted((_clean(name), param) for name, param in module.named_parameters())
        for name, param in params:
            digest.update(f"{label}/{name}:{tuple(param.shape)}\n".encode())
            values = param.detach().to(device="cpu", dtype=torch.float32).contiguous()
            digest.update(values.numpy().astype("<f4", copy=False))  # a buffer: hashed without a copy
    return digest.hexdigest()


def hub_commit(model_dir: Optional[str | os.PathLike]) -> Optional[str]:
    """The commit hash of a Hugging Face cache snapshot directory (``.../snapshots/<40 hex digits>``), else
    None. ``huggingface_hub.snapshot_download`` returns such a directory, online and offline."""
    if model_dir is None:
        return None
    path = Path(model_dir)
    if path.parent.name == "snapshots" and _COMMIT.fullmatch(path.name):
        return path.name
    return None


def model_label(info: Any) -> str:
    """What names the probed weights in a warning: ``<hub id>@<revision or main>``, else the directory."""
    if getattr(info, "source", None) == "hub":
        return f"{info.hub_name}@{info.revision or 'main'}"
    return str(info.model_dir)


def read_registry(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a killed job
            continue
    return entries


def register_fingerprint(registry: str | os.PathLike, entry: Mapping[str, Any]) -> list[dict]:
    """Append ``entry`` (with ``weights_sha256`` and ``label``, optionally ``commit`` and ``job``) to the
    sweep's registry file and return the earlier entries with the same fingerprint and another label.

    Reading and appending happen under one exclusive lock (``filelock``, a ``<registry>.lock`` beside it),
    so concurrent jobs of a parallel launcher each see every job that registered before them."""
    from filelock import FileLock

    path = Path(registry)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        earlier = read_registry(path)
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(entry), sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    return [other for other in earlier
            if other.get("weights_sha256") == entry["weights_sha256"] and other.get("label") != entry["label"]]


def identical_weights_message(entry: Mapping[str, Any], others: Iterable[Mapping[str, Any]]) -> Optional[str]:
    """A warning for ``entry`` sharing its weights with ``others`` (from :func:`register_fingerprint`), or
    None when every one of them is the very same hub commit (two names of one snapshot, e.g. a branch and
    a tag)."""
    others = [other for other in others
              if not (entry.get("commit") and other.get("commit") == entry.get("commit"))]
    if not others:
        return None
    names = ", ".join(f"{other['label']}" + (f" (job {other['job']})" if other.get("job") else "") for other in others)
    return (f"identical weights: {entry['label']} has the weight fingerprint {entry['weights_sha256'][:16]} of "
            f"{names}, probed earlier in this multirun. Released checkpoint series are known to serve wrong "
            f"weights ({PYTHIA_205}: 86 of pythia-2.8b's 154 step branches serve final-era weights); check "
            f"the revisions before reading a curve over them.")
