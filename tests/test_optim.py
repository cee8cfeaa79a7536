"""Exact membership of every optimizer group for each flag setting, and the LR schedule's shape."""

import math

import pytest
import torch

from residual_dynamics.errors import ConfigError
from residual_dynamics.training.model import ModelConfig, Transformer
from residual_dynamics.training.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor, param_groups


def _names(model, groups):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: (sorted(by_id[id(p)] for p in g["params"]), g["weight_decay"]) for g in groups}


def _expected(norm, attn_only, act_fn, pos, tied, n_layers=2):
    """Written out by hand from the architecture, not derived from the grouping code."""
    mats, norms, biases = [], [], []
    for l in range(n_layers):
        b = f"blocks.{l}"
        mats += [f"{b}.attn.qkv.weight", f"{b}.attn.o.weight"]
        biases += [f"{b}.attn.qkv.bias", f"{b}.attn.o.bias"]
        lns = ["ln1"] if attn_only else ["ln1", "ln2"]
        if norm in ("LN", "RMS"):
            norms += [f"{b}.{ln}.weight" for ln in lns]
        if norm == "LN":
            norms += [f"{b}.{ln}.bias" for ln in lns]
        if not attn_only:
            mats += [f"{b}.mlp.w_in.weight", f"{b}.mlp.w_out.weight"]
            biases += [f"{b}.mlp.w_in.bias", f"{b}.mlp.w_out.bias"]
            if act_fn == "solu_ln":
                norms += [f"{b}.mlp.ln.weight", f"{b}.mlp.ln.bias"]
    if norm in ("LN", "RMS"):
        norms.append("ln_final.weight")
    if norm == "LN":
        norms.append("ln_final.bias")
    if not tied:
        mats.append("unembed.weight")
    embeds = ["embed.weight"] + (["pos_embed.weight"] if pos == "learned" else [])
    return sorted(mats), sorted(embeds), sorted(norms), sorted(biases)


CASES = [
    ("LN", False, "gelu", "learned", False),
    ("LN", False, "solu_ln", "learned", True),
    ("RMS", False, "silu", "rotary", False),
    ("LNPre", True, "gelu", "learned", False),
    ("none", False, "relu", "rotary", True),
]


@pytest.mark.parametrize("decay_norm", [False, True])
@pytest.mark.parametrize("decay_emb", [False, True])
@pytest.mark.parametrize("norm,attn_only,act,pos,tied", CASES)
def test_group_membership(norm, attn_only, act, pos, tied, decay_norm, decay_emb):
    model = Transformer(ModelConfig(n_layers=2, d_model=16, n_heads=2, n_ctx=8, d_vocab=20, act_fn=act,
                                    normalization_type=norm, attn_only=attn_only, positional_embedding=pos,
                                    tied_embeddings=tied))
    cfg = OptimConfig(weight_decay=0.1, decay_norm_params=decay_norm, decay_embeddings=decay_emb)
    got = _names(model, param_groups(model, cfg))
    mats, embeds, norms, biases = _expected(norm, attn_only, act, pos, tied)
    assert got["matrices"] == (mats, 0.1)
    assert got["embeddings"] == (embeds, 0.1 if decay_emb else 0.0)
    assert got["biases"] == (biases, 0.0)
    if norms:
        assert got["norms"] == (norms, 0.1 if decay_norm else 0.0)
    else:
        assert "norms" not in got
    # every parameter exactly once
    total = sum(len(v[0]) for v in got.values())
    assert total == len(list(model.parameters()))


def test_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg, 110) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, cfg, 110) == pytest.approx(0.1)
    model = Transformer(ModelConfig(n_layers=1, d_model=8, n_heads=2, n_ctx=4, d_vocab=10))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 110)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[19] < 1.0


def test_decay_actually_applies_only_to_decayed_groups():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, d_model=8, n_heads=2, n_ctx=4, d_vocab=10))
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0)
    opt = build_optimizer(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: only weight decay can move a parameter
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"blocks.0.attn.qkv.weight", "blocks.0.attn.o.weight", "blocks.0.mlp.w_in.weight",
                     "blocks.0.mlp.w_out.weight", "unembed.weight"}


def test_fused_adamw_takes_the_written_out_adamw_steps():
    # The optimizer is fused on the CPU (one kernel for every update) and its steps are AdamW's, written
    # out here in float64: decoupled decay p -= lr wd p, then p -= lr m_hat / (sqrt(v_hat) + eps).
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, d_model=8, n_heads=2, n_ctx=4, d_vocab=10))
    cfg = OptimConfig(lr=0.01, weight_decay=0.5, warmup_steps=0, decay_norm_params=True)
    opt = build_optimizer(model, cfg)
    assert opt.defaults["fused"] is True
    decay = {id(p): group["weight_decay"] for group in opt.param_groups for p in group["params"]}
    params = list(model.parameters())
    ref = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    (b1, b2), eps, lr = cfg.betas, cfg.eps, cfg.lr
    for t in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.double()
            ref[i] -= lr * decay[id(p)] * ref[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            ref[i] -= lr * (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + eps)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("field,value", [("lr", 0.0), ("betas", [0.9]), ("weight_decay", -1),
                                         ("min_lr_ratio", 2.0), ("warmup_steps", -1), ("grad_clip", -1.0)])
def test_bad_optim_config(field, value):
    # unknown keys and wrong types are rejected by the structured config (tests/test_spec.py)
    with pytest.raises(ConfigError, match=f"optim.{field}"):
        OptimConfig(**{field: value}).validate()
