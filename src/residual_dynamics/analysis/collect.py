"""Runs -> one tidy table: one row per measurement, joined with the run's flattened config.

Three routes, one builder. Each route turns a run into a :class:`RunData` (its nested config, its
results-file style rows ``{"step", "probe", "name", "layer", "head", "value", ...}`` and what is wrong
with it); :func:`build_frame` turns RunData into the tables, whatever the route:

* files  -- run directories (``results.jsonl`` + ``.hydra/config.yaml``), found recursively under the
  inputs (:func:`runs_from_dirs`);
* W&B offline -- ``<run_dir>/wandb/offline-run-*/run-<id>.wandb`` transaction logs (:func:`runs_from_wandb_offline`);
* W&B API -- ``wandb.Api().runs(...)`` objects with ``config``, ``scan_history()``, ``name``, ``group``,
  ``job_type`` (:func:`runs_from_wandb_api`).

W&B history keys ``probe/<name>[/L<layer>[H<head>]]`` (or ``<probe family>/<name>/...``) are parsed back
into (probe, name, layer, head). Runs that failed or are incomplete (no results, empty results, fewer steps
than ``trainer.max_steps``, no config) are kept in the runs table with their status and reason, never
dropped silently.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import pandas as pd

from residual_dynamics.errors import DataError
from residual_dynamics.reporting import wandb_log

RESULTS_FILE = "results.jsonl"
CONFIG_FILE = Path(".hydra") / "config.yaml"
STEP_KEYS = ("trainer/global_step", "step")
MEASUREMENT_COLUMNS = ["run", "step", "tokens", "probe", "name", "layer", "head", "value"]
META_COLUMNS = ["job_type", "group", "model", "run_dir", "source", "status"]
SKIP_DIRS = {"wandb", "analysis", "checkpoints", "figures", ".hydra", "csv", "__pycache__"}
_NAME_TO_PROBE = [
    (re.compile(r"^(growth_rate|resid_norm)(/|$)"), "residual_norms"),
    (re.compile(r"^(W_|b_|ln\w*_gain)"), "weight_norms"),
    (re.compile(r"^(mlp_act_rate|mlp_out_norm)(/|$)"), "activation_rates"),
    (re.compile(r"^horizon(/|$)"), "layer_horizon"),
    (re.compile(r"^cleanup(/|$)"), "cleanup"),
]
_LAYER_HEAD = re.compile(r"^(?:L(\d+)(?:H(\d+))?|H(\d+))$")
_PLAIN_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


@dataclass
class RunData:
    """One run as read by a route, before the table is built."""

    run: str
    run_dir: str
    source: str                                  # files | wandb
    config: Optional[dict] = None                # nested, as composed by Hydra
    rows: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # why it cannot be used
    notes: list[str] = field(default_factory=list)      # worth knowing, not disqualifying
    job_type: Optional[str] = None               # W&B metadata (else logger.job_type of the config)
    group: Optional[str] = None
    overrides: Optional[list[str]] = None


@dataclass
class Collection:
    """The tidy table (one row per measurement) and the runs table (one row per run, with its status)."""

    tidy: pd.DataFrame
    runs: pd.DataFrame

    @property
    def usable(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] == "ok"]

    @property
    def problems(self) -> pd.DataFrame:
        return self.runs[self.runs["status"] != "ok"]


# --------------------------------------------------------------------------- shared helpers


def run_id(run_dir: str | Path) -> str:
    """A run's name in the tables: ``<sweep>/<job number>`` for a multirun job (dir ``3_model.n_heads=2,...``
    of the sweep dir), else the run directory's name. The full path is in the ``run_dir`` column."""
    path = Path(str(run_dir))
    m = re.match(r"^(\d+)(_|$)", path.name)
    if m and path.parent.name:
        return f"{path.parent.name}/{m.group(1)}"
    return path.name


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"model.n_heads": 4, ...}``; lists become JSON strings (one cell each)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(list(value))
        else:
            out[name] = value
    return out


def _resolve_plain(flat: dict[str, Any]) -> dict[str, Any]:
    """Resolve ``${a.b}`` references between leaves; resolver calls (``${now:..}``, ``${hydra:..}``,
    ``${oc.env:..}``) stay as written: they cannot be re-evaluated after the run."""
    out = dict(flat)
    for key, value in flat.items():
        seen = 0
        while isinstance(value, str) and (m := _PLAIN_INTERPOLATION.match(value)) and seen < 10:
            value = out.get(m.group(1), value)
            seen += 1
        out[key] = value
    return out


def _parse_by_family(parts: list[str], probe: Optional[str]):
    rest = list(parts)
    layer = head = None
    m = _LAYER_HEAD.match(rest[-1])
    if m and len(rest) > 1:
        rest = rest[:-1]
        if m.group(3) is not None:
            head = int(m.group(3))
        else:
            layer = int(m.group(1))
            head = int(m.group(2)) if m.group(2) is not None else None
    name = "/".join(rest)
    if probe is None:
        probe = next((p for pattern, p in _NAME_TO_PROBE if pattern.search(name)), None)
        if probe is None:
            return None
    return probe, name, layer, head


def parse_metric_key(key: str) -> Optional[tuple[str, str, Optional[int], Optional[int]]]:
    """A W&B key -> (probe, name, layer, head), or None when it is not a probe scalar.

    Today's keys are ``<name>[/L<layer>[H<head>]]`` whose first component is the probe family
    (``resid_norm/resid_post/L03``, ``W_OV/L02H05``, ``growth_rate``; parsed by
    :func:`residual_dynamics.reporting.results.parse_metric_key` where it exists); older runs logged
    ``probe/<name>[/L..]``, which is read too.
    ``train/loss``, ``trainer/global_step``, ``<family>/vs_layer_table`` -> None."""
    parts = key.split("/")
    if parts[0] == "probe" and len(parts) > 1:
        return _parse_by_family(parts[1:], None)
    if len(parts) > 1 and parts[1].startswith("vs_layer"):
        return None
    try:
        from residual_dynamics.reporting.results import parse_metric_key as canonical
    except ImportError:  # pragma: no cover - the reporting module moved
        canonical = None
    if canonical is not None:
        return canonical(key)
    return _parse_by_family(parts, None)


def _finite_or_none(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _table_refs(row: Mapping[str, Any]) -> dict[str, str]:
    """{history key: file path} of the W&B tables in a history row (``{"_type": "table-file", "path": ...}``,
    nested as the API returns it or flattened to ``<key>/_type``, ``<key>/path`` as the offline log stores it)."""
    refs = {}
    for key, value in row.items():
        if isinstance(value, Mapping) and value.get("_type") == "table-file" and value.get("path"):
            refs[key] = str(value["path"])
        elif key.endswith("/_type") and value == "table-file":
            base = key[: -len("/_type")]
            if row.get(base + "/path"):
                refs[base] = str(row[base + "/path"])
    return refs


def rows_from_history(history: Iterable[Mapping[str, Any]], meta: Mapping[str, Any],
                      load_table: Optional[Callable[[str], Optional[Mapping[str, Any]]]] = None
                      ) -> tuple[list[dict], list[str]]:
    """W&B history rows -> results-file rows (the same dicts ``results.jsonl`` holds). Scalars come from the
    probe keys; per-layer / per-head records from the ``<family>/vs_layer`` tables (columns name, layer, head,
    value), read through ``load_table(path)``. Later rows of the same (step, metric) win (a resumed run
    re-logs the steps after its checkpoint)."""
    notes: set[str] = set()
    out: dict[tuple, dict] = {}

    def put(step, probe, name, layer, head, value, tokens=None):
        record = {"step": int(step), "probe": probe, "name": name, "layer": layer, "head": head,
                  "value": _finite_or_none(value), **meta}
        if tokens is not None:
            record["tokens"] = tokens
        out[(int(step), probe, name, layer, head)] = record

    for row in history:
        step = next((row[k] for k in STEP_KEYS if row.get(k) is not None), None)
        if step is None:
            if any(parse_metric_key(k) for k in row):
                notes.add("history rows without trainer/global_step were skipped")
            continue
        tokens = row.get("tokens")
        for key, value in row.items():
            if isinstance(value, (Mapping, list, str, bool)) or (value is not None and not isinstance(value, (int, float))):
                continue
            parsed = parse_metric_key(key)
            if parsed is not None:
                put(step, *parsed, value, tokens)
        for key, path in _table_refs(row).items():
            if load_table is None:
                notes.add("W&B tables were not read (no way to fetch their files)")
                continue
            table = load_table(path)
            if table is None:
                notes.add(f"W&B table file {path} is missing")
                continue
            columns = list(table.get("columns", []))
            if not {"name", "value"} <= set(columns):
                continue
            for data in table.get("data", []):
                cell = dict(zip(columns, data))
                parsed = parse_metric_key(str(cell["name"]))
                if parsed is None:
                    continue
                layer = None if cell.get("layer") is None else int(cell["layer"])
                head = None if cell.get("head") is None else int(cell["head"])
                put(step, parsed[0], str(cell["name"]), layer, head, cell["value"], tokens)
    return list(out.values()), sorted(notes)


# --------------------------------------------------------------------------- files route


def find_run_dirs(inputs: Sequence[str | Path]) -> list[Path]:
    """Every directory below ``inputs`` holding a results.jsonl and/or a .hydra/config.yaml (not looking
    inside a run directory, nor into wandb/, analysis/, checkpoints/ folders)."""
    found: list[Path] = []
    for item in inputs:
        root = Path(item).expanduser()
        if not root.exists():
            raise DataError(f"inputs: {root} does not exist")
        if not root.is_dir():
            raise DataError(f"inputs: {root} is not a directory (give a run or multirun directory)")
        stack = [root]
        while stack:
            path = stack.pop()
            if (path / RESULTS_FILE).exists() or (path / CONFIG_FILE).exists():
                found.append(path.resolve())
                continue
            try:
                children = sorted((c for c in path.iterdir() if c.is_dir() and c.name not in SKIP_DIRS),
                                  reverse=True)
            except OSError:
                continue
            stack.extend(children)
    unique = list(dict.fromkeys(found))
    return sorted(unique, key=_natural_key)


def _natural_key(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def read_results(path: Path) -> tuple[list[dict], list[str], list[str]]:
    """``results.jsonl`` -> (rows, problems, notes). A torn last line (crash mid-write) is skipped with a
    note; a bad line before the end is a problem (the file is corrupt)."""
    rows: list[dict] = []
    problems: list[str] = []
    notes: list[str] = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                notes.append(f"skipped a torn last line ({number}) of {RESULTS_FILE}")
                break
            problems.append(f"{RESULTS_FILE} line {number} is not valid JSON")
            break
        if not isinstance(row, dict) or not {"step", "name", "value"} <= row.keys():
            problems.append(f"{RESULTS_FILE} line {number} lacks step/name/value")
            break
        rows.append(row)
    return rows, problems, notes


def read_config(run_dir: Path) -> Optional[dict]:
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return None
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as YAML ({exc})") from None


def load_run_dir(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    data = RunData(run=run_id(run_dir), run_dir=str(run_dir), source="files")
    try:
        data.config = read_config(run_dir)
    except DataError as exc:
        data.problems.append(str(exc))
    if data.config is None and not data.problems:
        data.problems.append(f"missing {CONFIG_FILE} (the run's config)")
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.exists():
        from omegaconf import OmegaConf

        try:
            data.overrides = [str(o) for o in OmegaConf.load(overrides)]
        except Exception:
            pass
    results = run_dir / RESULTS_FILE
    if not results.exists():
        data.problems.append(f"no {RESULTS_FILE} (the run failed before its first probe, or is not a run)")
    else:
        rows, problems, notes = read_results(results)
        data.rows, data.problems, data.notes = rows, data.problems + problems, data.notes + notes
        if not rows and not problems:
            data.problems.append(f"{RESULTS_FILE} is empty")
    return data


def runs_from_dirs(inputs: Sequence[str | Path], progress: bool = False) -> list[RunData]:
    dirs = find_run_dirs(inputs)
    if not dirs:
        raise DataError(f"no runs under {', '.join(map(str, inputs))}: no directory there holds a "
                        f"{RESULTS_FILE} or a {CONFIG_FILE}")
    return [load_run_dir(d) for d in _progress(dirs, "reading runs", progress)] + _missing_jobs(inputs, dirs)


def _missing_jobs(inputs: Sequence[str | Path], dirs: Sequence[Path]) -> list[RunData]:
    """Jobs a multirun planned (its multirun.yaml sweeper params) but that left no directory."""
    from omegaconf import OmegaConf

    out = []
    for item in inputs:
        path = Path(item).expanduser() / "multirun.yaml"
        if not path.exists():
            continue
        try:
            params = OmegaConf.to_container(OmegaConf.load(path), resolve=False)["hydra"]["sweeper"]["params"] or {}
            planned = math.prod(len(str(v).split(",")) for v in params.values())
        except Exception:
            continue
        sweep = path.parent.resolve()
        nums = {int(m.group(1)) for d in dirs if d.parent == sweep and (m := re.match(r"^(\d+)", d.name))}
        for num in range(planned):
            if num not in nums:
                out.append(RunData(run=f"{sweep.name}/{num}", run_dir=str(sweep / str(num)), source="files",
                                   problems=[f"job {num} of the multirun left no directory"]))
    return out


# --------------------------------------------------------------------------- W&B offline route


def _wandb_records(path: Path):
    """The records of a W&B transaction log; a file that is not one is a DataError naming it."""
    if not wandb_log.is_transaction_log(path):
        raise DataError(f"{path} is not a W&B transaction log")
    return wandb_log.records(path)


def read_wandb_offline(run_path: Path) -> dict[str, Any]:
    """One offline run directory -> {"config", "history", "group", "job_type", "id", "name", "exit_code"}."""
    files = sorted(Path(run_path).glob("run-*.wandb"))
    if not files:
        raise DataError(f"{run_path}: no run-*.wandb file")
    info: dict[str, Any] = {"config": {}, "history": [], "group": None, "job_type": None, "id": None,
                            "name": None, "exit_code": None, "files": Path(run_path) / "files"}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            info.update(group=run.run_group or None, job_type=run.job_type or None, id=run.run_id,
                        name=run.display_name or None)
            for item in run.config.update:
                info["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                info["config"][key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    row[key] = json.loads(item.value_json)
                except json.JSONDecodeError:
                    continue
            info["history"].append(row)
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
    info["config"] = {k: v for k, v in info["config"].items() if k and not k.startswith("_wandb")}
    return info


def find_wandb_offline(inputs: Sequence[str | Path]) -> dict[Path, list[Path]]:
    """{run directory: its offline-run-* directories, oldest first} below ``inputs``."""
    out: dict[Path, list[Path]] = {}
    for item in inputs:
        root = Path(item).expanduser()
        if not root.is_dir():
            raise DataError(f"inputs: {root} is not a directory")
        for path in sorted(root.rglob("offline-run-*")):
            if not path.is_dir() or "analysis" in path.relative_to(root).parts:
                continue
            run_dir = path.parent.parent if path.parent.name == "wandb" else path.parent
            out.setdefault(run_dir.resolve(), []).append(path)
    return out


def _json_file(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _wandb_rundata(run_dir: str, config: dict, history: Iterable[Mapping[str, Any]], *, group, job_type,
                   name: Optional[str], problems: Sequence[str] = (), load_table=None) -> RunData:
    model = (config.get("model") or {}).get("name") if isinstance(config.get("model"), Mapping) else None
    meta = {"run": config.get("run_name") or name, "model": model}
    rows, notes = rows_from_history(history, meta, load_table)
    data = RunData(run=run_id(run_dir), run_dir=run_dir, source="wandb", config=config or None, rows=rows,
                   notes=notes, problems=list(problems), job_type=job_type, group=group)
    if not config:
        data.problems.append("the W&B run has no config")
    if not rows and not data.problems:
        data.problems.append("the W&B run logged no probe scalars")
    return data


def runs_from_wandb_offline(inputs: Sequence[str | Path], progress: bool = False) -> list[RunData]:
    found = find_wandb_offline(inputs)
    if not found:
        raise DataError(f"no W&B offline runs (wandb/offline-run-*) under {', '.join(map(str, inputs))}")
    out = []
    for run_dir, paths in _progress(list(found.items()), "reading W&B offline runs", progress):
        config: dict = {}
        history: list[dict] = []
        problems: list[str] = []
        group = job_type = name = None
        file_dirs: list[Path] = []
        for path in paths:  # a resumed run: several offline dirs, later ones win
            info = read_wandb_offline(path)
            config.update(info["config"])
            history.extend(info["history"])
            file_dirs.append(info["files"])
            group, job_type, name = info["group"] or group, info["job_type"] or job_type, info["name"] or name
            exit_code = info["exit_code"]
        if exit_code not in (None, 0):
            problems.append(f"the W&B run exited with code {exit_code}")
        if job_type == "analysis":
            continue
        def load_table(rel: str, dirs=tuple(file_dirs)):
            for files in reversed(dirs):
                if (files / rel).exists():
                    return _json_file(files / rel)
            return None

        out.append(_wandb_rundata(str(run_dir), config, history, group=group, job_type=job_type, name=name,
                                  problems=problems, load_table=load_table))
    return out


# --------------------------------------------------------------------------- W&B API route


def runs_from_wandb_api(api_runs: Iterable[Any], progress: bool = False) -> list[RunData]:
    """Objects with wandb.apis.public.Run's attributes (``config``, ``scan_history()`` or ``history()``,
    ``name``, ``group``, ``job_type``, ``state``) -> RunData. Analysis runs are skipped."""
    out = []
    for run in _progress(list(api_runs), "reading W&B runs", progress):
        if getattr(run, "job_type", None) == "analysis":
            continue
        config = {k: v for k, v in dict(run.config or {}).items() if not str(k).startswith("_")}
        if hasattr(run, "scan_history"):
            history = list(run.scan_history())
        else:
            history = list(run.history(pandas=False))
        paths = config.get("paths") if isinstance(config.get("paths"), Mapping) else {}
        run_dir = paths.get("run_dir") or f"wandb:{getattr(run, 'path', None) or run.name}"
        problems = []
        state = getattr(run, "state", None)
        if state in ("crashed", "failed", "killed"):
            problems.append(f"the W&B run is {state}")
        out.append(_wandb_rundata(str(run_dir), config, history, group=getattr(run, "group", None),
                                  job_type=getattr(run, "job_type", None), name=getattr(run, "name", None),
                                  problems=problems, load_table=_api_table_loader(run)))
    return out


def _api_table_loader(run):
    """Fetch a table file of an API run (``run.file(path).download``) into a temporary folder."""
    if not hasattr(run, "file"):
        return None
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="rd_wandb_tables_"))

    def load(rel: str):
        target = root / rel
        if not target.exists():
            try:
                run.file(rel).download(root=str(root), replace=True, exist_ok=True)
            except Exception:
                return None
        return _json_file(target)

    return load


def api_runs(project: str, entity: Optional[str] = None, group: Optional[str] = None):
    """Runs of a W&B project (online; needs credentials), filtered by group."""
    import wandb

    path = f"{entity}/{project}" if entity else project
    filters = {"group": group} if group else {}
    return wandb.Api(timeout=60).runs(path, filters=filters)


# --------------------------------------------------------------------------- the builder


def _status(data: RunData, flat: Optional[dict]) -> tuple[str, str]:
    if data.problems:
        no_config = any("config" in p for p in data.problems) and data.config is None
        return ("no_config" if no_config and data.rows else "failed"), "; ".join(data.problems)
    job_type = data.job_type or (flat or {}).get("logger.job_type")
    max_steps = (flat or {}).get("trainer.max_steps")
    last = max(int(r["step"]) for r in data.rows)
    if job_type != "pretrained" and isinstance(max_steps, (int, float)) and not isinstance(max_steps, bool):
        at_end = (flat or {}).get("probes.schedule.at_end", True)
        every = (flat or {}).get("probes.schedule.every")
        short = last < max_steps if at_end is not False else (
            isinstance(every, int) and last + every <= max_steps)
        if short:
            return "incomplete", f"last probe step {last} < trainer.max_steps={int(max_steps)}"
    return "ok", "; ".join(data.notes)


def _tokens_per_step(flat: Mapping[str, Any], job_type: Optional[str]) -> Optional[float]:
    if job_type == "pretrained":
        return None
    bs, seq = flat.get("data.batch_size"), flat.get("data.seq_len")
    if isinstance(bs, (int, float)) and isinstance(seq, (int, float)):
        return float(bs) * float(seq)
    return None


def build_frame(runs: Sequence[RunData]) -> Collection:
    """RunData of any route -> :class:`Collection` (the tidy and runs tables). The one place both are built."""
    if not runs:
        raise DataError("no runs to analyse")
    counts = Counter(data.run for data in runs)
    records: list[tuple] = []
    run_rows = []
    per_step: dict[str, Optional[float]] = {}
    for data in runs:
        run = data.run if counts[data.run] == 1 else data.run_dir  # two inputs with the same sweep/job names
        flat = _resolve_plain(flatten(data.config)) if data.config else {}
        if data.rows and data.rows[0].get("run") and isinstance(flat.get("run_name"), str) \
                and flat["run_name"].startswith("${"):
            flat["run_name"] = data.rows[0]["run"]  # ${now:...}: the value the run resolved is in its rows
        if flat:
            flat["paths.run_dir"] = data.run_dir
        job_type = data.job_type or flat.get("logger.job_type")
        group = data.group or flat.get("logger.group")
        status, reason = _status(data, flat) if data.rows or data.problems else ("failed", "no results")
        model = next((r.get("model") for r in data.rows if r.get("model")), None) or flat.get("model.name")
        steps = [int(r["step"]) for r in data.rows]
        run_rows.append({"run": run, "job_type": job_type, "group": group, "model": model, "run_dir": data.run_dir,
                         "source": data.source, "status": status, "reason": reason, "n_rows": len(data.rows),
                         "first_step": min(steps) if steps else None, "last_step": max(steps) if steps else None,
                         "overrides": " ".join(data.overrides) if data.overrides else None, **flat})
        per_step[run] = _tokens_per_step(flat, job_type)
        for r in data.rows:
            records.append((run, r["step"], r.get("tokens"), r.get("probe"), r["name"], r.get("layer"),
                            r.get("head"), r.get("value")))
    runs_table = pd.DataFrame(run_rows)
    tidy = pd.DataFrame.from_records(records, columns=MEASUREMENT_COLUMNS)
    tidy["step"] = tidy["step"].astype("int64")
    tokens = pd.to_numeric(tidy["tokens"], errors="coerce").astype("float64")
    rate = tidy["run"].map(per_step).astype("float64")
    tidy["tokens"] = tokens.fillna(tidy["step"].astype("float64") * rate)
    tidy["layer"] = pd.array(tidy["layer"], dtype="Int64")
    tidy["head"] = pd.array(tidy["head"], dtype="Int64")
    tidy["value"] = pd.to_numeric(tidy["value"], errors="coerce").astype("float64")
    tidy["probe"] = tidy["probe"].astype(object).where(tidy["probe"].notna(), None)
    joined = tidy.merge(runs_table.drop(columns=["reason", "n_rows", "first_step", "last_step", "overrides"]),
                        on="run", how="left", validate="many_to_one")
    return Collection(tidy=joined, runs=runs_table)


def collect(inputs: Sequence[str | Path] = (), source: str = "files", *, wandb_project: str = "residual-dynamics",
            wandb_entity: Optional[str] = None, wandb_group: Optional[str] = None, online: bool = False,
            progress: bool = False) -> Collection:
    """Read runs (``source`` files | wandb) and build the tables."""
    if source == "files":
        runs = runs_from_dirs(inputs, progress)
    elif source == "wandb" and online:
        runs = runs_from_wandb_api(api_runs(wandb_project, wandb_entity, wandb_group), progress)
        if not runs:
            raise DataError(f"no W&B runs in {wandb_entity or ''}/{wandb_project}"
                            + (f" group {wandb_group}" if wandb_group else ""))
    elif source == "wandb":
        runs = runs_from_wandb_offline(inputs, progress)
    else:
        raise DataError(f"source: unknown source {source!r}")
    return build_frame(runs)


def parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns with mixed types (a config field that is a string in one run and a number in another)
    become strings, so pyarrow can write them."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype == object:
            kinds = {type(v) for v in out[column] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(kinds) > 1:
                out[column] = out[column].map(lambda v: None if v is None else str(v))
    return out


def _progress(items: Sequence[Any], description: str, enabled: bool):
    if not enabled or len(items) < 2:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)
