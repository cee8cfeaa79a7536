"""Benchmark: every probe on random-weight models of real shapes, as time and memory relative to the model.

Models (random weights, built locally from their config classes, written with ``save_pretrained`` into a
temporary directory with an in-memory word-level tokenizer -- no hub -- and loaded through
``residual_dynamics.pretrained.loading.load_pretrained({"path": dir})`` as the probe CLI does):

    gpt2          GPT-2 small   12 layers, d_model 768,  12 heads
    gpt2-medium   GPT-2 medium  24 layers, d_model 1024, 16 heads
    gpt2-large    GPT-2 large   36 layers, d_model 1280, 20 heads
    gpt2-xl       GPT-2 XL      48 layers, d_model 1600, 25 heads
    pythia-160m   Pythia-160m   12 layers, d_model 768,  12 heads, GPT-NeoX: parallel blocks, rotary
    pythia-1b     Pythia-1b     16 layers, d_model 2048,  8 heads, GPT-NeoX: parallel blocks, rotary

For each model (in its own process, so that one model's memory never counts for the next) and each
probe of the default probe set (``ProbesConfig()``, the probes enabled by conf/probes/default.yaml, with
their default options and ``probes.max_memory``) it prints:

* ``x fwd``: the probe's wall time as a ratio to ONE bare forward of the Hugging Face model on the same
  tokens in the same process: the mean of the bare forwards timed right before and right after the
  probe (this machine's speed drifts by up to 30% over minutes, so the fastest bare forward of a whole
  run would flatter nothing and penalise every probe run at a slower moment; ``cpu_ratio_best`` in the
  JSON keeps that ratio too); ``cpu x fwd``: the same ratio of this process's CPU time, which other jobs on
  a shared machine inflate less (the time targets are judged on it);
* ``peak``: the peak resident memory (VmHWM of /proc/self/status, reset before every probe through
  /proc/self/clear_refs) minus the resident memory of the loaded model, i.e. what the probe adds.

``activation pass`` is residual_norms + activation_rates in their one shared forward (``run_probes``).
Targets (issue 11, at 32 x 128 tokens): every peak <= 2 GB above the model for every shape up to XL;
activation pass <= 1.1x a bare forward; layer_horizon <= 1.2 x (K + 1) bare forwards; cleanup <= 3.

    python benchmarks/bench_scale.py                                  # every model, 32 x 128 tokens
    python benchmarks/bench_scale.py --models gpt2,pythia-160m --batch 8 --tokens 64
    python benchmarks/bench_scale.py --models gpt2-xl --batch 4 --tokens 64 --probes cleanup,layer_horizon
    python benchmarks/bench_scale.py --models gpt2-medium --probes cleanup --compare-spill   # spill on vs off
    python benchmarks/bench_scale.py --models gpt2-xl --probes sublayer_ablation --ablation-layers 0,-1
    python benchmarks/bench_scale.py --device cuda --models gpt2,pythia-160m,gpt2-xl --json scale.json

``--device cuda``: wall times after a synchronize (the ``cpu x fwd`` column then repeats the wall ratio)
and peak CUDA memory allocated above the loaded model; ``--json`` is rewritten after every model.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "gpt2": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12)),
    "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16)),
    "gpt2-large": ("gpt2", dict(n_layer=36, n_embd=1280, n_head=20)),
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25)),
    "pythia-160m": ("neox", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)),
    "pythia-1b": ("neox", dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=8, intermediate_size=8192)),
}
DEFAULT_MODELS = "gpt2,gpt2-medium,gpt2-large,gpt2-xl,pythia-160m"
GPT2_VOCAB, NEOX_VOCAB = 50257, 50304


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS,
                        help=f"comma-separated, of {', '.join(SHAPES)}; NAME:BxT sets that model's batch and "
                             "tokens (e.g. gpt2-xl:4x64)")
    parser.add_argument("--batch", type=int, default=32, help="prompts (of every model without :BxT)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per prompt (of every model without :BxT)")
    parser.add_argument("--probes", default=None, help="comma-separated probe names (default: the default set)")
    parser.add_argument("--max-memory", default=None, help="probes.max_memory (default: the schema default)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda: then times are wall times after a synchronize, and memory is the peak "
                             "of torch.cuda.max_memory_allocated above the loaded model")
    parser.add_argument("--pass-only", action="store_true",
                        help="measure residual_norms + activation_rates only as their shared pass, not each alone")
    parser.add_argument("--ablation-layers", default=None,
                        help="sublayer_ablation on these layers only (comma-separated; negative counts from the "
                             "last layer, e.g. 0,-1): each ablated sublayer costs about one forward, 2 n_layers "
                             "in all (hours on GPT-2 XL here)")
    parser.add_argument("--compare-spill", action="store_true",
                        help="also run cleanup with probes.cleanup.spill=false (one forward per chunk of writers "
                             "when the activations exceed max_memory) next to the default (spilled) one")
    parser.add_argument("--default-heap", action="store_true",
                        help="leave glibc's dynamic mmap threshold alone instead of fixing it as the probe CLI "
                             "does (residual_dynamics.heap.bound_heap)")
    parser.add_argument("--rounds", type=int, default=1, help="bare forwards timed (best of) per model")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine torch's thread pool spins, which "
                             "inflates CPU time and wall time unevenly; 0 = torch's default)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one model in this process
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- memory


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _release() -> None:
    """Collect garbage and give freed heap back to the OS, so the next peak starts from the model."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


class Memory:
    """The memory a probe adds: RSS above the loaded model on the CPU (VmHWM after a reset), allocated
    CUDA memory above it on a GPU (torch.cuda.max_memory_allocated after reset_peak_memory_stats)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def current(self) -> int:
        return self.torch.cuda.memory_allocated() if self.cuda else _status("VmRSS")

    def reset(self) -> None:
        _release()
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak()

    def peak(self) -> int:
        self.sync()
        return self.torch.cuda.max_memory_allocated() if self.cuda else _status("VmHWM")


# --------------------------------------------------------------------------- one model


def _tokenizer(vocab_size: int):
    """A word-level tokenizer over ``vocab_size`` tokens, built in memory (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", bos_token="t1", eos_token="t2",
                                   pad_token="t3")


def build(name: str, directory: Path) -> tuple[int, int]:
    """Write the random model ``name`` with ``save_pretrained`` (and its tokenizer) into ``directory``;
    returns (vocabulary size, parameters)."""
    import torch
    import transformers

    family, shape = SHAPES[name]
    if family == "gpt2":
        config = transformers.GPT2Config(**shape, vocab_size=GPT2_VOCAB, n_positions=1024)
        cls, vocab = transformers.GPT2LMHeadModel, GPT2_VOCAB
    else:
        config = transformers.GPTNeoXConfig(**shape, vocab_size=NEOX_VOCAB, max_position_embeddings=2048,
                                            use_parallel_residual=True)
        cls, vocab = transformers.GPTNeoXForCausalLM, NEOX_VOCAB
    torch.manual_seed(0)
    from transformers.initialization import no_init_weights

    with no_init_weights():  # the weights are drawn below, much faster than the per-module init
        model = cls(config)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.02 * torch.randn_like(param) if ("ln" in key or "norm" in key)
                            else 0.02 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.02)
    model.tie_weights()  # GPT-2 ties its unembedding to the embedding (config.tie_word_embeddings)
    params = model.num_parameters()
    model.save_pretrained(directory)
    _tokenizer(vocab).save_pretrained(directory)
    return vocab, params


def run_model(args: argparse.Namespace) -> list[dict]:
    """Build, load and measure one model (``args.child``) in this process."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from residual_dynamics.heap import bound_heap

    if not args.default_heap:
        bound_heap()  # as the probe CLI does before loading a model
    from residual_dynamics.pretrained.loading import load_pretrained
    from residual_dynamics.probes.arch import Arch
    from residual_dynamics.probes.forward import drop_kept_patterns
    from residual_dynamics.probes.registry import PROBES, run_probes
    from residual_dynamics.spec import ProbesConfig

    name = args.child
    with tempfile.TemporaryDirectory(prefix=f"bench_scale_{name}_") as tmp:
        started = time.perf_counter()
        vocab, params = build(name, Path(tmp))
        _release()
        build_s = time.perf_counter() - started
        bridge, _, info = load_pretrained({"path": tmp, "device": args.device, "name": name})
    _release()
    memory = Memory(args.device)
    hf_model = bridge.original_model
    arch = Arch.of(bridge)
    config = ProbesConfig() if args.max_memory is None else ProbesConfig(max_memory=args.max_memory)
    options = config.enabled()
    wanted = list(options) if args.probes is None else args.probes.split(",")
    unknown = [probe for probe in wanted if probe not in PROBES]
    if unknown:
        raise SystemExit(f"unknown probes {unknown}; probes: {list(PROBES)}")
    options = {probe: options.get(probe) or PROBES[probe].Options() for probe in wanted}
    if args.ablation_layers and "sublayer_ablation" in options:
        layers = sorted({int(x) % arch.n_layers for x in args.ablation_layers.split(",")})
        options["sublayer_ablation"] = dataclasses.replace(options["sublayer_ablation"], layers=layers)
    tokens = torch.randint(0, vocab, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(args.device)

    def bare() -> tuple[float, float]:
        """(wall, CPU) seconds of one bare forward of the Hugging Face model. Its attention modules are the
        bridge's, which keep their last patterns: dropped afterwards (as every probe run does first), so
        that they count neither in the model's memory nor as memory a probe frees."""
        with torch.no_grad():
            timing = _timed_result(lambda: (hf_model(tokens), memory.sync()) and None)[0]
        drop_kept_patterns(bridge)
        return timing

    with torch.no_grad():
        hf_model(tokens)  # warm-up
    drop_kept_patterns(bridge)
    memory.reset()
    model_rss = memory.current()
    memory.reset()
    bares = [bare() for _ in range(max(1, args.rounds))]
    bare_peak = memory.peak() - model_rss

    rows, units = [], []  # units: (wall, CPU) of the bare forwards right before and after each probe
    runs = {}
    if "residual_norms" in options and "activation_rates" in options:
        runs["activation pass"] = {probe: options[probe] for probe in ("residual_norms", "activation_rates")}
    singles = [probe for probe in options
               if not (args.pass_only and "activation pass" in runs and probe in runs["activation pass"])]
    runs.update({probe: {probe: options[probe]} for probe in singles})
    if args.compare_spill and "cleanup" in options:
        runs["cleanup, no spill"] = {"cleanup": dataclasses.replace(options["cleanup"], spill=False)}
    for label, probes in runs.items():
        before = bare()  # the bare forwards right before and right after a probe are its unit
        bares.append(before)
        memory.reset()
        with torch.no_grad():
            (seconds, cpu), results = _timed_result(lambda: (run_probes(bridge, tokens, probes, arch=arch),
                                                             memory.sync())[0])
        peak = memory.peak() - model_rss
        result = results[next(iter(probes))] if len(probes) == 1 else None
        chunks = getattr(result, "plan", None)
        ks = getattr(result, "ks", None)
        ablated = getattr(result, "kinds", None)  # sublayer_ablation: the sublayers it ablated
        rows.append(dict(model=name, params=params, tokens=f"{args.batch}x{args.tokens}", probe=label,
                         seconds=seconds, cpu_seconds=cpu, peak_bytes=peak, note=getattr(result, "note", None),
                         plan=None if chunks is None else repr(chunks), k=None if ks is None else len(ks),
                         sublayers=None if ablated is None else len(ablated)))
        del results, result
        units.append(before)
    after = bare()
    bares.append(after)
    units = [(before, later) for before, later in zip(units, units[1:] + [after])]
    bare_s, bare_cpu = min(wall for wall, _ in bares), min(cpu for _, cpu in bares)
    for row, (before, later) in zip(rows, units):
        unit_s, unit_cpu = (before[0] + later[0]) / 2, (before[1] + later[1]) / 2
        row.update(ratio=row["seconds"] / unit_s, bare_s=bare_s, unit_s=unit_s, device=args.device,
                   # on a GPU the host CPU time says nothing of the work: the wall-time ratio stands in
                   cpu_ratio=row["cpu_seconds"] / unit_cpu if args.device == "cpu" else row["seconds"] / unit_s,
                   cpu_ratio_best=row["cpu_seconds"] / bare_cpu if args.device == "cpu" else row["seconds"] / bare_s,
                   bare_cpu_s=bare_cpu, unit_cpu_s=unit_cpu, bare_peak_bytes=bare_peak, model_rss=model_rss,
                   build_s=build_s,
                   parallel=arch.parallel, layers=info.n_layers, d_model=info.d_model, threads=torch.get_num_threads())
    return rows


def _timed_result(fn):
    """((wall seconds, CPU seconds of this process), fn())."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall, time.process_time() - cpu), result


# --------------------------------------------------------------------------- driver


def target(row: dict) -> str:
    """The issue-11 time target of a row and whether it is met (on the CPU-time ratio, which other jobs
    on a shared machine inflate less than the wall-time one)."""
    probe, ratio = row["probe"], row["cpu_ratio"]
    if probe == "activation pass":
        limit = 1.1
    elif probe == "layer_horizon" and row["k"]:
        limit = 1.2 * (row["k"] + 1)
    elif probe.startswith("cleanup"):
        limit = 3.0
    else:
        return ""
    return f"<= {limit:.1f}x {'ok' if ratio <= limit else 'MISSED'}"


def print_table(rows: list[dict]) -> None:
    gb = 1e9
    print(f"{'model':<12} {'tokens':>7} {'probe':<18} {'wall s':>8} {'x fwd':>6} {'cpu x fwd':>9} {'peak GB':>8}  "
          f"{'time target':<16} {'peak <= 2 GB'}")
    for row in rows:
        note = f"  note: {row['note']}" if row["note"] else ""
        if row.get("sublayers"):
            note += f"  ({row['sublayers']} sublayers ablated)"
        mem = "ok" if row["peak_bytes"] <= 2 * gb else "MISSED"
        print(f"{row['model']:<12} {row['tokens']:>7} {row['probe']:<18} {row['seconds']:>8.2f} {row['ratio']:>6.2f} "
              f"{row['cpu_ratio']:>9.2f} {row['peak_bytes'] / gb:>8.2f}  {target(row):<16} {mem}{note}")
    seen = {}
    for row in rows:
        seen.setdefault(row["model"], row)
    print()
    for model, row in seen.items():
        print(f"{model}: {row['params'] / 1e6:.0f}M parameters, {row['layers']} layers, d_model {row['d_model']}"
              f"{', parallel blocks' if row['parallel'] else ''}; loaded model {row['model_rss'] / gb:.2f} GB RSS; "
              f"one bare HF forward {row['bare_s']:.2f} s wall / {row['bare_cpu_s']:.2f} s CPU "
              f"({row['threads']} thread(s)), peak +{row['bare_peak_bytes'] / gb:.2f} GB; built in {row['build_s']:.0f} s")
    for row in rows:
        if row["plan"]:
            print(f"  {row['model']} {row['probe']}: {row['plan']}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print("ROWS " + json.dumps(run_model(args)), flush=True)
        return
    models = []
    for entry in (entry for entry in args.models.split(",") if entry):
        model, _, size = entry.partition(":")
        batch, _, tokens = size.partition("x") if size else (str(args.batch), "", str(args.tokens))
        if model not in SHAPES or not (batch.isdigit() and tokens.isdigit()):
            raise SystemExit(f"bad model {entry!r}: NAME or NAME:BxT with NAME in {list(SHAPES)}")
        models.append((model, batch, tokens))
    rows = []
    for model, batch, tokens in models:
        command = [sys.executable, __file__, "--child", model, "--batch", batch, "--tokens", tokens,
                   "--rounds", str(args.rounds), "--threads", str(args.threads), "--device", args.device]
        command += ["--probes", args.probes] if args.probes else []
        command += ["--max-memory", args.max_memory] if args.max_memory else []
        command += ["--compare-spill"] if args.compare_spill else []
        command += ["--ablation-layers", args.ablation_layers] if args.ablation_layers else []
        command += ["--pass-only"] if args.pass_only else []
        command += ["--default-heap"] if args.default_heap else []
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        lines = [line for line in done.stdout.splitlines() if line.startswith("ROWS ")]
        if done.returncode != 0 or not lines:
            print(f"{model}: failed (exit {done.returncode}) after {time.perf_counter() - started:.0f} s\n"
                  f"{done.stderr[-3000:]}", file=sys.stderr)
            continue
        rows += json.loads(lines[-1][5:])
        print(f"{model}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if args.json:  # after every model, so that a run cut short keeps what it measured
            partial = Path(f"{args.json}.part")
            partial.write_text(json.dumps(rows, indent=1))
            os.replace(partial, args.json)
    print_table(rows)


if __name__ == "__main__":
    main()
