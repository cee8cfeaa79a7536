"""Training throughput, side by side in one process.

    python benchmarks/bench_train.py                      # CPU: both parts, the issue's shapes
    python benchmarks/bench_train.py --part model --shape default
    python benchmarks/bench_train.py --part e2e --e2e-steps 200
    python benchmarks/bench_train.py --device cuda --precision bf16 --shape gpt2-small --part model \\
        --contenders bare_loop,nanogpt --json out.json          # + MFU (benchmarks/gpu.sh does this)

Part ``model``: the model and its training loop, on batches made in advance. Contenders:

* ``lightning``: our ``Transformer`` in ``LitTransformer`` under a Lightning Trainer (no logger, checkpoints
  or progress bar), with ``gradient_clip_val=1.0``;
* ``bare_loop``: our ``Transformer`` in a bare PyTorch loop: forward, backward, ``clip_grad_norm_(1.0)``,
  AdamW step (our parameter groups, ``build_optimizer``: fused on the CPU and CUDA);
* ``nanogpt``: :class:`NanoGPT`, a nanoGPT-style GPT written by hand in this file (pre-LN blocks with
  ``nn.LayerNorm``, a fused ``c_attn`` QKV projection, ``F.scaled_dot_product_attention(is_causal=True)``,
  an exact-GELU MLP, learned positions, an untied bias-free ``lm_head``): the same shape and parameter count
  as ours, in the same bare loop with AdamW of the same settings (decay on matrices only; fused on CUDA
  only, as nanoGPT does, so on the CPU our fused optimizer is part of the difference);
* ``transformer_lens``: a TransformerLens ``boot_native`` bridge of the same shape, the same bare loop.

Each contender runs ``--warmup`` untimed steps, then ``--rounds`` rounds of ``--steps`` timed steps; the
rounds are interleaved (A, B, C, A, B, C, ...) so machine noise hits all alike, and the median round is
reported. Targets: ours (bare loop) / nanoGPT-style >= 1.0x, Lightning overhead vs the bare loop <= 10%,
ours / TransformerLens >= 1.3x.

Part ``e2e``: the default training job end to end. ``residual_dynamics.training.train.train`` runs the
default config (``model=small``, the embedded corpus, batch 16 x 128 tokens, RichProgressBar, the real
``TokenDataModule``) with ``probes=off logger=none`` and validation / checkpoints moved beyond the window;
a timing callback measures whole steps -- data loading, forward, backward, clipping, optimizer, logging
and the progress bar -- from the end of step ``--e2e-warmup`` to the end of the last step. Against it: a
bare loop over the same model (same config, same AdamW groups and schedule, clipping) on the very same
batches made in advance. Rounds interleave the two. Target: job / bare loop >= 0.95x (steps/s).

``--json PATH`` writes every number of the run as one JSON object. On CUDA with ``--precision bf16`` it
also gives the model FLOP utilisation ``MFU = tokens/s * 6 * n_params / peak`` (``n_params``: every
parameter, embeddings included, tied ones once; ``peak``: the dense bf16 FLOP/s of the detected GPU from
:data:`PEAK_BF16`). ``--shape gpt2-small`` is the 124M GPT-2 small shape (12 x 768, 12 heads, 1024
positions, 50257 tokens, tied embeddings). ``--compile`` compiles the bare loops' loss function
(``torch.compile``; the compilation falls in the warm-up steps).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from residual_dynamics.training.model import ModelConfig, Transformer
from residual_dynamics.training.optim import OptimConfig, build_optimizer, build_scheduler

REPO = Path(__file__).resolve().parents[1]

# shape name -> (model fields, batch size, sequence length)
SHAPES: dict[str, tuple[dict, int, int]] = {
    # issue #2's benchmark shape (conf/model/bench.yaml)
    "bench": (dict(n_layers=4, d_model=256, n_heads=8, d_mlp=1024, n_ctx=256, d_vocab=8192), 16, 256),
    # the default job: conf/model/small.yaml, data batch 16 x 128, the BPE tokenizer's 4096 tokens
    "default": (dict(n_layers=4, d_model=128, n_heads=4, d_mlp=512, n_ctx=256, d_vocab=4096), 16, 128),
    # GPT-2 small, 124M parameters (tied embeddings), for the MFU measurement on a GPU
    "gpt2-small": (dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, n_ctx=1024, d_vocab=50257,
                        tied_embeddings=True), 8, 1024),
    # a few-second smoke test of every code path (gpu.sh --device cpu)
    "tiny": (dict(n_layers=2, d_model=64, n_heads=4, d_mlp=256, n_ctx=64, d_vocab=512), 4, 64),
}

#: Dense bf16 peak FLOP/s (no sparsity) by a substring of ``torch.cuda.get_device_name()``, first match wins.
PEAK_BF16: list[tuple[str, float]] = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A30", 165e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("RTX A6000", 155e12),
]


def peak_bf16_flops(device_name: str) -> Optional[float]:
    for key, flops in PEAK_BF16:
        if key in device_name:
            return flops
    return None


def make_batches(n: int, vocab: int, batch: int, seq_len: int, device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(device) for _ in range(n)]


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


# --------------------------------------------------------------------------- the nanoGPT-style model


class NanoAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoMLP(nn.Module):
    def __init__(self, d_model: int, d_mlp: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, d_mlp)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(d_mlp, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class NanoBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = NanoAttention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = NanoMLP(d_model, d_mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A GPT in the style of nanoGPT, written for this benchmark: the same shape as our ``Transformer``
    (``tied_embeddings`` ties ``lm_head`` to ``wte`` as GPT-2 small does), no dropout."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_mlp: int, n_ctx: int, d_vocab: int,
                 tied_embeddings: bool = False):
        super().__init__()
        self.wte = nn.Embedding(d_vocab, d_model)
        self.wpe = nn.Embedding(n_ctx, d_model)
        self.h = nn.ModuleList([NanoBlock(d_model, n_heads, d_mlp) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, d_vocab, bias=False)
        if tied_embeddings:
            self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


# --------------------------------------------------------------------------- part "model"


class BareLoop:
    """The loop Lightning runs, without Lightning: forward, backward, clip, AdamW step (and LR schedule)."""

    def __init__(self, loss_fn, params, optimizer, device, precision, scheduler=None, model=None):
        self.loss_fn, self.params, self.opt, self.scheduler = loss_fn, list(params), optimizer, scheduler
        self.device, self.precision, self.model = device, precision, model

    def run(self, data):
        for batch in data:
            with autocast(self.device, self.precision):
                loss = self.loss_fn(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
        sync(self.device)


COMPILE = False  # --compile: torch.compile the loss function of the bare loops


def _maybe_compiled(loss_fn):
    return torch.compile(loss_fn) if COMPILE else loss_fn


def ours_bare(shape: dict, device, precision) -> BareLoop:
    """Our model with our AdamW parameter groups."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**shape)).to(device)
    return BareLoop(_maybe_compiled(model.loss), model.parameters(), build_optimizer(model, OptimConfig()), device,
                    precision, model=model)


def nanogpt_bare(shape: dict, device, precision) -> BareLoop:
    """The nanoGPT-style model; AdamW with our settings: decay 0.1 on matrices (and embeddings, as nanoGPT),
    fused on CUDA only (nanoGPT's ``configure_optimizers`` rule; ours is fused on the CPU too)."""
    torch.manual_seed(0)
    model = NanoGPT(**shape).to(device)
    cfg = OptimConfig()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas),
                                  eps=cfg.eps, fused=True if torch.device(device).type == "cuda" else None)
    return BareLoop(_maybe_compiled(model.loss), model.parameters(), optimizer, device, precision, model=model)


def transformer_lens_bare(shape: dict, device, precision) -> BareLoop:
    """A TransformerLens ``boot_native`` bridge of the same shape, trained by the same loop."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources.native  # noqa: F401

    cfg = TransformerBridgeConfig(d_model=shape["d_model"], d_head=shape["d_model"] // shape["n_heads"],
                                  n_heads=shape["n_heads"], n_layers=shape["n_layers"], n_ctx=shape["n_ctx"],
                                  d_vocab=shape["d_vocab"], d_mlp=shape["d_mlp"], act_fn="gelu",
                                  normalization_type="LN", seed=0)
    bridge = TransformerBridge.boot_native(cfg, device=device)
    bridge.train()

    def loss(batch):
        logits = bridge(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    optimizer = torch.optim.AdamW(bridge.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    return BareLoop(loss, bridge.parameters(), optimizer, device, precision)


class LightningRun:
    """Our model in LitTransformer under a Lightning Trainer (no logger, checkpoints or progress bar)."""

    def __init__(self, shape: dict, device, precision):
        import lightning as L

        from residual_dynamics.training.lit import LitTransformer

        torch.manual_seed(0)
        self.lit = LitTransformer(ModelConfig(**shape), OptimConfig(), max_steps=10**9)
        self.model = self.lit.model
        self.L, self.device, self.precision = L, device, precision

    def run(self, data):
        accelerator = "gpu" if torch.device(self.device).type == "cuda" else "cpu"
        trainer = self.L.Trainer(
            accelerator=accelerator, devices=1, max_steps=len(data), logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
            precision="bf16-mixed" if self.precision == "bf16" else "32-true", limit_val_batches=0,
        )
        self.lit.max_steps = len(data)
        # a fresh Trainer per round restarts the step counter; the model and its weights carry on
        trainer.fit(self.lit, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
        sync(self.device)


CONTENDERS: dict[str, Callable] = {"lightning": LightningRun, "bare_loop": ours_bare, "nanogpt": nanogpt_bare,
                                   "transformer_lens": transformer_lens_bare}


def interleaved(runners: dict[str, Callable[[int], Any]], rounds: int) -> dict[str, list]:
    """{name: [what each round returned]}, the rounds interleaved across the contenders."""
    times: dict[str, list] = {name: [] for name in runners}
    for r in range(rounds):
        for name, run_round in runners.items():
            times[name].append(run_round(r))
    return times


def model_part(args) -> dict:
    shape, batch, seq_len = SHAPES[args.shape]
    names = args.contenders.split(",")
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"--contenders: unknown {sorted(unknown)}; choose from {list(CONTENDERS)}")
    runners = {name: CONTENDERS[name](shape, args.device, args.precision) for name in names}
    for runner in runners.values():  # warmup
        runner.run(make_batches(args.warmup, shape["d_vocab"], batch, seq_len, args.device, seed=1))

    def timed(runner):
        def run_round(r):
            data = make_batches(args.steps, shape["d_vocab"], batch, seq_len, args.device, seed=100 + r)
            sync(args.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            runner.run(data)
            return time.perf_counter() - start, time.process_time() - cpu_start
        return run_round

    rounds = interleaved({name: timed(runner) for name, runner in runners.items()}, args.rounds)
    times = {name: [wall for wall, _ in values] for name, values in rounds.items()}
    cpu_times = {name: [cpu for _, cpu in values] for name, values in rounds.items()}
    tokens = args.steps * batch * seq_len
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    tps_cpu = {name: tokens / statistics.median(t) for name, t in cpu_times.items()}
    on_cpu = torch.device(args.device).type == "cpu"
    print(f"[model] device={args.device} precision={args.precision} shape={args.shape} {shape} batch={batch}x"
          f"{seq_len} steps/round={args.steps} rounds={args.rounds} threads={torch.get_num_threads()}")
    for name, value in tps.items():
        print(f"  {name:17s} {value:10.0f} tokens/s" + (f"   ({tps_cpu[name]:.0f} per CPU second)" if on_cpu else ""))
    out: dict = {"shape": args.shape, "model": shape, "batch": batch, "seq_len": seq_len, "steps": args.steps,
                 "rounds": args.rounds, "tokens_per_s": tps, "round_seconds": times}
    if on_cpu:
        out.update(tokens_per_cpu_s=tps_cpu, round_cpu_seconds=cpu_times)
    ratios = {}
    if "bare_loop" in tps and "nanogpt" in tps:
        ratios["ours_over_nanogpt"] = tps["bare_loop"] / tps["nanogpt"]
        paired = statistics.median(b / a for a, b in zip(times["bare_loop"], times["nanogpt"]))
        ratios["ours_over_nanogpt_paired"] = paired
        ratios["ours_over_nanogpt_best"] = min(times["nanogpt"]) / min(times["bare_loop"])
        line = (f"ours (bare loop) / nanoGPT-style: {ratios['ours_over_nanogpt']:.3f}x (median of paired rounds "
                f"{paired:.3f}x; best rounds {ratios['ours_over_nanogpt_best']:.3f}x")
        if on_cpu:
            ratios["ours_over_nanogpt_cpu_time"] = tps_cpu["bare_loop"] / tps_cpu["nanogpt"]
            line += f"; by CPU time {ratios['ours_over_nanogpt_cpu_time']:.3f}x"
        print(line + ")  (target >= 1.0x)")
    if "bare_loop" in tps and "lightning" in tps:
        ratios["lightning_overhead"] = tps["bare_loop"] / tps["lightning"] - 1
        print(f"Lightning overhead vs bare loop: {100 * ratios['lightning_overhead']:+.1f}%  (target <= +10%)")
    if "transformer_lens" in tps:
        for name in ("lightning", "bare_loop"):
            if name in tps:
                ratios[f"{name}_over_transformer_lens"] = tps[name] / tps["transformer_lens"]
                print(f"ours ({name}) / TransformerLens: {ratios[f'{name}_over_transformer_lens']:.2f}x"
                      f"{'  (target >= 1.3x)' if name == 'lightning' else ''}")
    out["ratios"] = ratios
    model = next((runner.model for runner in runners.values() if getattr(runner, "model", None) is not None), None)
    if model is not None:
        out["n_params"] = n_params(model)
    if torch.device(args.device).type == "cuda":
        name = torch.cuda.get_device_name(torch.device(args.device))
        peak = peak_bf16_flops(name) if args.precision == "bf16" else None
        out.update(gpu=name, peak_bf16_flops=peak)
        if peak is not None and "n_params" in out:
            out["mfu"] = {contender: value * 6 * out["n_params"] / peak for contender, value in tps.items()
                          if contender in ("bare_loop", "lightning", "nanogpt")}
            for contender, mfu in out["mfu"].items():
                print(f"MFU {contender}: {100 * mfu:.1f}%  ({out['n_params'] / 1e6:.1f}M parameters, {name}, "
                      f"peak bf16 {peak / 1e12:.0f} TFLOP/s)")
    return out


# --------------------------------------------------------------------------- part "e2e"


class StepTimer:
    """A Lightning callback: the wall time from the end of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int):
        import lightning as L

        class _Timer(L.Callback):
            def on_train_batch_end(cb, trainer, *args):
                sync(trainer.strategy.root_device)
                if trainer.global_step == warmup:
                    self.start, self.cpu_start = time.perf_counter(), time.process_time()
                    self.start_step = trainer.global_step
                self.end, self.cpu_end, self.end_step = time.perf_counter(), time.process_time(), trainer.global_step

        self.callback = _Timer()
        self.start = self.end = self.cpu_start = self.cpu_end = None
        self.start_step = self.end_step = 0

    @property
    def rates(self) -> tuple[float, float]:
        """(steps per second, steps per CPU second of this process)."""
        steps = self.end_step - self.start_step
        return steps / (self.end - self.start), steps / (self.cpu_end - self.cpu_start)


@contextlib.contextmanager
def trainer_with(callback):
    """Every ``lightning.Trainer`` built inside gets ``callback`` added (the job builds its own Trainer)."""
    import lightning as L

    original = L.Trainer

    class Trainer(original):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=[*(callbacks or []), callback], **kwargs)

    L.Trainer = Trainer
    try:
        yield
    finally:
        L.Trainer = original


def e2e_part(args) -> dict:
    from hydra import compose, initialize_config_dir

    from residual_dynamics.data.datamodule import RandomWindowBatches, TokenDataModule
    from residual_dynamics.spec import parse_train
    from residual_dynamics.training.train import train

    steps, warmup = args.e2e_steps, args.e2e_warmup
    tmp = tempfile.mkdtemp(prefix="bench_train_e2e_")  # the runs' directories, removed at the end
    out_of_window = steps + 10**6  # validation and checkpoints never fall inside the run
    overrides = ["probes=off", "logger=none", f"trainer.max_steps={steps}", f"trainer.val_every={out_of_window}",
                 f"trainer.ckpt_every={out_of_window}", "run_name=bench"]
    if torch.device(args.device).type == "cuda":  # the bare loop is not compiled, so neither is the job
        overrides += ["trainer=gpu", "trainer.compile=false",
                      f"trainer.precision={'bf16-mixed' if args.precision == 'bf16' else '32-true'}"]
    overrides += args.overrides

    def spec_for(round_index: int):
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"paths.run_dir={tmp}/run{round_index}"])
        return parse_train(cfg)

    spec = spec_for(0)
    data = TokenDataModule(spec.data, spec.tokenizer, spec.cache_dir, seed=spec.seed)
    data.setup("fit")  # builds (once) and loads the cached corpus, tokenizer and shards
    model_cfg = dataclasses.replace(spec.model, d_vocab=spec.model.d_vocab or data.vocab_size)
    windows = RandomWindowBatches(data.shards.path("train"), data.shards.dtype, spec.data.seq_len,
                                  spec.data.batch_size, spec.seed)
    device = torch.device(args.device)
    batches = [windows.batch(step).to(device) for step in range(steps)]  # the job's own batches, in advance

    def bare_round(_r: int) -> float:
        torch.manual_seed(spec.seed)
        model = Transformer(model_cfg).to(device)
        optimizer = build_optimizer(model, spec.optim)
        loop = BareLoop(model.loss, model.parameters(), optimizer, device, args.precision,
                        scheduler=build_scheduler(optimizer, spec.optim, steps))
        loop.run(batches[:warmup])
        start, cpu_start = time.perf_counter(), time.process_time()
        loop.run(batches[warmup:])
        return (steps - warmup) / (time.perf_counter() - start), (steps - warmup) / (time.process_time() - cpu_start)

    def job_round(r: int) -> tuple[float, float]:
        timer = StepTimer(warmup)
        with trainer_with(timer.callback), contextlib.redirect_stdout(sys.stderr):
            train(spec_for(r))
        return timer.rates

    try:
        rounds = interleaved({"job": job_round, "bare_loop": bare_round}, args.e2e_rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rates = {name: [wall for wall, _ in values] for name, values in rounds.items()}
    cpu_rates = {name: [cpu for _, cpu in values] for name, values in rounds.items()}
    rate = {name: statistics.median(values) for name, values in rates.items()}
    cpu_rate = {name: statistics.median(values) for name, values in cpu_rates.items()}
    ratio = rate["job"] / rate["bare_loop"]
    paired = statistics.median(a / b for a, b in zip(rates["job"], rates["bare_loop"]))
    on_cpu = device.type == "cpu"
    print(f"[e2e] the default job ({' '.join(overrides)}), model {model_cfg.n_layers}x{model_cfg.d_model} "
          f"vocab {model_cfg.d_vocab}, batch {spec.data.batch_size}x{spec.data.seq_len}, {steps} steps (timed "
          f"after {warmup}), rounds={args.e2e_rounds}, device={args.device}, threads={torch.get_num_threads()}")
    for name, label in (("job", "default job"), ("bare_loop", "bare loop")):
        print(f"  {label:12s} {rate[name]:7.2f} it/s   rounds {[round(v, 2) for v in rates[name]]}"
              + (f"   ({cpu_rate[name]:.2f} per CPU second)" if on_cpu else ""))
    line = f"default job / bare loop: {ratio:.3f}x (median of paired rounds {paired:.3f}x"
    if on_cpu:
        line += f"; by CPU time {cpu_rate['job'] / cpu_rate['bare_loop']:.3f}x"
    print(line + ")  (target >= 0.95x)")
    out = {"steps": steps, "warmup": warmup, "rounds": args.e2e_rounds, "overrides": overrides, "it_per_s": rate,
           "round_it_per_s": rates, "job_over_bare_loop": ratio, "job_over_bare_loop_paired": paired}
    if on_cpu:
        out.update(it_per_cpu_s=cpu_rate, round_it_per_cpu_s=cpu_rates,
                   job_over_bare_loop_cpu_time=cpu_rate["job"] / cpu_rate["bare_loop"])
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["model", "e2e", "all"], default="all")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--shape", choices=list(SHAPES), default="bench", help="shape of part model")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, of part model")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round (part model)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (part model)")
    parser.add_argument("--e2e-rounds", type=int, default=3, help="interleaved rounds (part e2e)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (part model)")
    parser.add_argument("--e2e-steps", type=int, default=200, help="steps of each default-job run (part e2e)")
    parser.add_argument("--e2e-warmup", type=int, default=20, help="untimed first steps (part e2e)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the bare loops' loss (part model)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the default job (part e2e)")
    args = parser.parse_args(argv)
    if args.e2e_warmup >= args.e2e_steps:
        parser.error("--e2e-warmup must be below --e2e-steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    global COMPILE
    COMPILE = args.compile
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "disabled")

    results: dict = {"device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "compile": args.compile}
    if args.part in ("model", "all"):
        results["model"] = model_part(args)
    if args.part in ("e2e", "all"):
        results["e2e"] = e2e_part(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
        os.replace(tmp, args.json)
    return results


if __name__ == "__main__":
    main()
