"""Benchmark: the targeted-hook probe pass against ``run_with_cache`` on SmolLM2-135M-Instruct.

    python benchmarks/bench_pretrained.py                       # CPU, 32 prompts x 128 tokens, 3 repeats,
                                                                # n_random 256 (default config) and 1 (~none)
    python benchmarks/bench_pretrained.py --n-random 256        # the default config only, quicker
    python benchmarks/bench_pretrained.py --device cuda --repeats 5
    python benchmarks/bench_pretrained.py --model-dir /dir/of/a/save_pretrained/model --batch 8

Needs the converted SmolLM2 directory (``python -m residual_dynamics.fetch_smollm2``, default
``$RESIDUAL_DYNAMICS_CACHE`` or ``~/.cache/residual-dynamics``/smollm2-135m-instruct); any other Hugging
Face causal LM directory works through ``--model-dir``.

Contenders, all in this one process on the same bridge and the same batch:

(A) ``probes``: what ``python -m residual_dynamics.probe`` runs for these two probes --
    ``run_probes(bridge, tokens, {"residual_norms": Options(), "activation_rates": Options(n_random=R)})``: targeted
    hooks that reduce each activation to a few numbers inside the forward. ``run_probes`` fuses the two
    probes into ONE hooked forward that stops after the last block (``probes/forward.py``:
    ``run_activation_passes``), so no ln_final, unembedding or logits are computed.
(B) ``cache``:  ``bridge.run_with_cache(tokens)`` with the full cache, then the same statistics
    (mean residual norms of resid_pre/mid/post, attn_out, mlp_out; the resid_post growth fit; MLP
    activation rates on tokens) computed from the cache, plus the very same random-input part as (A)
    (R normalized Gaussian inputs through ``mlp(ln2(x))`` of every block), so both do the same work.
The statistics of (B) are checked against those of (A) before anything is timed.

Batch: the default prompt set, concatenated (``"\\n\\n"`` between texts) and repeated until there are
enough tokens, cut into ``--batch`` rows of exactly ``--seq`` real tokens (BOS first when the model
prepends one); the attention mask is all ones and is passed to both contenders (as the CLI does).

Wall time: median of ``--repeats`` interleaved runs (A, B, A, B, ...) after one warm-up run of each;
the process CPU time of the same runs is shown too. On CPU torch runs 1 thread by default
(``--threads``): with other jobs on the cores, 2+ OpenMP threads wait on each other and single runs
swing by several times; one thread gives repeatable runs, and the ratios are what the targets judge.

Peak memory, relative to what is allocated before the call (weights and inputs excluded):
* CUDA: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() - memory_allocated()``
  measured before the call.
* CPU: one extra run of each contender under ``torch.profiler.profile(activities=[CPU],
  profile_memory=True)``. The profiler records every allocation and free of PyTorch's CPU allocator
  (``[memory]`` events, +bytes / -bytes); the peak is the maximum of their running sum in time order.
  This counts tensor bytes exactly (no glibc or page-cache effects, unlike RSS). Frees of blocks
  allocated before the profile starts are not reported (PyTorch warns about them), so the figure is an
  upper bound of the true peak over the baseline -- never an underestimate.

Targets: A at least 1.3x faster than B (wall time), and A's peak memory at most 0.3x B's.

Measured (2-core shared CPU VM, 1 thread, float32, 32 x 128 tokens; wall / peak over baseline):
    n_random=256:  A 11.75 s / 0.307 GiB   B 17.17 s / 7.281 GiB
    n_random=1:    A 11.46 s / 0.307 GiB   B 17.42 s / 7.281 GiB
    -> speed B/A 1.46x and 1.52x (target 1.3x: met); memory A/B 0.042 (target 0.3: met).
A is one hooked forward through the 30 blocks, stopped before ln_final (no unembedding, no
[32, 128, 49152] logits); B is one full forward plus first-touching its 7.3 GiB cache. Before the fusion
A ran two full forwards (residual_norms and activation_rates' token pass each called ``run_with_hooks``,
each with ln_final + unembed + logits, 0.75 GiB of A's then 0.94 GiB peak) and measured 0.95x / 0.93x
(MISSED), memory 0.128. The random-input part is negligible here (n_random 256 vs 1: 0.3 s).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from residual_dynamics.pretrained.loading import default_cache_dir, load_pretrained
from residual_dynamics.probes.activation_rates import normalized_gaussian_inputs
from residual_dynamics.probes.common import position_mask
from residual_dynamics.probes.registry import PROBES, run_probes
from residual_dynamics.probes.residual_norms import HOOK_KINDS, log_linear_fit
from residual_dynamics.pretrained.prompts import load_prompts

REPO = Path(__file__).resolve().parents[1]
SPEED_TARGET = 1.3  # B time / A time >= this
MEMORY_TARGET = 0.3  # A peak / B peak <= this
A = "A  probes (run_probes)"
B = "B  run_with_cache + stats"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="Hugging Face model directory (default: the converted SmolLM2 in the cache)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=32, help="prompts (rows)")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row, all real")
    parser.add_argument("--n-random", default="256,1",
                        help="comma-separated n_random values of activation_rates; one table per value "
                             "(256 = the default config; 1 = practically without the random-input part)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each contender, after a warm-up")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, steadier on a shared machine; 0 = torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    return parser.parse_args()


# --------------------------------------------------------------------------- batch


def benchmark_batch(tokenizer, batch: int, seq: int, prepend_bos: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[batch, seq] tokens of the default prompts, concatenated and repeated; an all-ones mask."""
    stream = tokenizer("\n\n".join(load_prompts()), add_special_tokens=False)["input_ids"]
    body = seq - int(prepend_bos)
    needed = batch * body
    repeated = (stream * math.ceil(needed / len(stream)))[:needed]
    rows = torch.tensor(repeated, dtype=torch.long).view(batch, body)
    if prepend_bos:
        rows = torch.cat([torch.full((batch, 1), tokenizer.bos_token_id, dtype=torch.long), rows], dim=1)
    return rows, torch.ones_like(rows)


# --------------------------------------------------------------------------- contenders


def contender_a(bridge, tokens, mask, n_random: int) -> dict[str, torch.Tensor]:
    """(A) the probe library, exactly as the CLI calls it."""
    probes = {"residual_norms": PROBES["residual_norms"].Options(),
              "activation_rates": PROBES["activation_rates"].Options(n_random=n_random)}
    with torch.no_grad():
        results = run_probes(bridge, tokens, probes, attention_mask=mask)
    norms, rates = results["residual_norms"], results["activation_rates"]
    return {**{f"norm/{k}": v for k, v in norms.norms.items()}, "log_slope": norms.log_slope,
            "token_rate": rates.token_rate, "random_rate": rates.random_rate,
            "random_out_norm": rates.random_out_norm}


def random_input_stats(bridge, n_random: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The random-input part of activation_rates, verbatim: rates of mlp.hook_pre > 0 and mean
    ||mlp(ln2(x))|| on ``n_random`` normalized Gaussian inputs, per layer."""
    count = int(bridge.cfg.n_layers)
    rates: list[Optional[torch.Tensor]] = [None] * count

    def hook(layer):
        def measure(pre, hook):
            rates[layer] = (pre > 0).sum() / pre.numel()

        return measure

    blocks = [bridge.blocks[layer] for layer in range(count)]
    reference = next(blocks[0].mlp.parameters())
    x = normalized_gaussian_inputs(n_random, int(bridge.cfg.d_model), seed)
    x = x.to(device=reference.device, dtype=reference.dtype)[None]
    out_norms = []
    hooks = [(f"blocks.{layer}.mlp.hook_pre", hook(layer)) for layer in range(count)]
    with bridge.hooks(fwd_hooks=hooks):
        for block in blocks:
            out = block.mlp(block.ln2(x))
            out_norms.append(torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32).mean())
    return torch.stack(rates).float().cpu(), torch.stack(out_norms).float().cpu()


def contender_b(bridge, tokens, mask, n_random: int) -> dict[str, torch.Tensor]:
    """(B) the full activation cache of one forward, then the same statistics from it."""
    count = int(bridge.cfg.n_layers)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens, attention_mask=mask)
        real = position_mask(tokens, mask).to(logits.device)
        n_real = real.sum()
        available = set(cache.keys())
        out: dict[str, torch.Tensor] = {}
        for kind in HOOK_KINDS:
            names = [f"blocks.{layer}.hook_{kind}" for layer in range(count)]
            if not all(name in available for name in names):
                continue
            sums = [torch.where(real, torch.linalg.vector_norm(cache[name], dim=-1, dtype=torch.float32), 0.0).sum()
                    for name in names]
            out[f"norm/{kind}"] = (torch.stack(sums) / n_real).float().cpu()
        out["log_slope"] = torch.tensor(log_linear_fit(out["norm/resid_post"])[0], dtype=torch.float32)
        rates = [((cache[f"blocks.{layer}.mlp.hook_pre"] > 0) & real[..., None]).sum()
                 / (n_real * cache[f"blocks.{layer}.mlp.hook_pre"].shape[-1]) for layer in range(count)]
        out["token_rate"] = torch.stack(rates).float().cpu()
        del logits, cache
        out["random_rate"], out["random_out_norm"] = random_input_stats(bridge, n_random)
    return out


def check_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest relative difference between the statistics of A and B (they must agree)."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = 0.0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
        worst = max(worst, float(((a[key] - b[key]).abs() / b[key].abs().clamp_min(1e-12)).max()))
    return worst


# --------------------------------------------------------------------------- measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    gc.collect()
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call above what was allocated before it (see the module doc)."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if args.threads > 0 and device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device")
    model_dir = args.model_dir or default_cache_dir() / "smollm2-135m-instruct"
    if not (model_dir / "config.json").is_file():
        sys.exit(f"error: no model at {model_dir}; run `python -m residual_dynamics.fetch_smollm2` "
                 f"or pass --model-dir")
    prepend = False if args.model_dir is None else "auto"  # conf/pretrained/smollm2_offline.yaml: false
    bridge, tokenizer, info = load_pretrained({"name": model_dir.name, "path": str(model_dir),
                                               "device": args.device, "dtype": args.dtype,
                                               "prepend_bos": prepend})
    tokens, mask = benchmark_batch(tokenizer, args.batch, args.seq, info.prepend_bos)
    tokens, mask = tokens.to(device), mask.to(device)
    n_randoms = [int(v) for v in args.n_random.split(",")]

    print(f"model   : {info.name} ({info.architecture}, {info.n_layers} layers, d_model {info.d_model}, "
          f"{info.dtype}) from {info.model_dir}")
    print(f"batch   : {tuple(tokens.shape)} tokens, all real, prepend_bos={info.prepend_bos}")
    print(f"device  : {device}  torch {torch.__version__}  threads {torch.get_num_threads()}")
    print(f"timing  : median of {args.repeats} interleaved runs after 1 warm-up each\n")

    summary = []
    for n_random in n_randoms:
        contenders = {
            A: lambda: contender_a(bridge, tokens, mask, n_random),
            B: lambda: contender_b(bridge, tokens, mask, n_random),
        }
        reference = contenders[A]()  # the first run of each contender is its warm-up
        worst = check_same(contenders[B](), reference)
        wall = {name: [] for name in contenders}
        cpu = {name: [] for name in contenders}
        for _ in range(args.repeats):
            for name, fn in contenders.items():
                w, c = timed(fn, device)
                wall[name].append(w)
                cpu[name].append(c)
        peak = {name: (None if args.no_memory else peak_bytes(fn, device)) for name, fn in contenders.items()}

        print(f"--- activation_rates n_random={n_random}   (statistics of B agree with A: "
              f"max rel diff {worst:.1e})")
        print(f"{'contender':<39} {'wall median':>11} {'wall runs':>22} {'CPU median':>10} {'peak memory':>12}")
        for name in contenders:
            runs = " ".join(f"{t:.2f}" for t in wall[name])
            mem = "-" if peak[name] is None else gib(peak[name])
            print(f"{name:<39} {statistics.median(wall[name]):>10.2f}s {runs:>22} "
                  f"{statistics.median(cpu[name]):>9.2f}s {mem:>12}")
        speedup = statistics.median(wall[B]) / statistics.median(wall[A])
        cpu_speedup = statistics.median(cpu[B]) / statistics.median(cpu[A])
        verdict = "MET" if speedup >= SPEED_TARGET else "MISSED"
        line = f"speed  B/A = {speedup:5.2f}x (CPU time {cpu_speedup:.2f}x)  target >= {SPEED_TARGET}x: {verdict}"
        if peak[A] is not None:
            ratio = peak[A] / peak[B]
            met = "MET" if ratio <= MEMORY_TARGET else "MISSED"
            line += f"   memory A/B = {ratio:.3f}  target <= {MEMORY_TARGET}: {met}"
        print(line)
        summary.append(f"n_random={n_random:<4} {line}")
        print()
    print("summary:\n  " + "\n  ".join(summary))


if __name__ == "__main__":
    main()
