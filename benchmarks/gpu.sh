#!/usr/bin/env bash
# The prepared GPU run: the training, probe and scale benchmarks on one CUDA GPU, in under 8 minutes, with
# every number in one JSON file.
#
#   bash benchmarks/gpu.sh                       # -> outputs/gpu/gpu.json (the logs in outputs/gpu/gpu_run/)
#   bash benchmarks/gpu.sh /some/where/gpu.json
#   DEVICE=cpu bash benchmarks/gpu.sh /tmp/smoke.json   # smoke test of every part on CPU, tiny sizes (~3 min)
#
# Parts, in this order (each under its own time limit, all together under TOTAL_LIMIT=460 s; a part that
# fails, times out or finds no time left is recorded with its exit status, and the others still run):
#   train_mfu       bench_train.py, GPT-2-small shape (124M, tied embeddings, batch 8 x 1024), bf16 autocast:
#                   our model in the bare loop, the nanoGPT-style model and ours under Lightning; tokens/s and
#                   MFU = tokens/s * 6 * n_params / peak bf16 FLOP/s of the detected GPU
#   train_bench     bench_train.py, the issue's bench shape, fp32: all four contenders (ratios)
#   train_e2e       bench_train.py --part e2e: the default job on the GPU (trainer=gpu, bf16) vs a bare loop
#   probe_cli       python -m residual_dynamics.probe on a random GPT-2-small-shaped model (built here, no
#                   hub) with the default probes, 32 prompts x 128 tokens: per-probe seconds from results.jsonl
#   scale           bench_scale.py --device cuda, when the file exists (rc 3: skipped, it has no --device)
#   probe_pass      bench_pretrained.py on the same GPT-2: the fused activation pass vs run_with_cache
#   train_compiled  train_mfu's bare loop with torch.compile (compilation in the warm-up steps)
# Environment: DEVICE (cuda), PYTHON (.venv/bin/python if present, else python), LIMIT_<PART> (seconds).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${1:-$REPO/outputs/gpu/gpu.json}"
DEVICE="${DEVICE:-cuda}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi
WORK="$(dirname "$OUT")/gpu_run"
rm -rf "$WORK"
mkdir -p "$WORK"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export RESIDUAL_DYNAMICS_CACHE="${RESIDUAL_DYNAMICS_CACHE:-$WORK/cache}"
STARTED=$SECONDS

if [[ "$DEVICE" == cpu ]]; then  # smoke sizes: every code path, a few steps
  TRAIN_BIG=(--shape tiny --steps 2 --rounds 1 --warmup 1 --precision fp32)
  TRAIN_BENCH=(--shape tiny --steps 2 --rounds 1 --warmup 1)
  E2E=(--e2e-steps 6 --e2e-warmup 2 --e2e-rounds 1 model=tiny data.seq_len=32 data.batch_size=4 tokenizer.vocab_size=512)
  GPT2=(2 64 4 128)      # layers, d_model, heads, positions of the probed model
  PROMPTS=(prompts.n=4 prompts.max_len=32 "probes.layer_horizon.ks=[1,2]")
  PASS=(--batch 4 --seq 32 --repeats 1 --n-random 16 --no-memory)
  COMPILE_PART=0
else
  TRAIN_BIG=(--shape gpt2-small --steps 20 --rounds 3 --warmup 5 --precision bf16)
  TRAIN_BENCH=(--shape bench --steps 20 --rounds 3 --warmup 5)
  E2E=(--e2e-steps 200 --e2e-warmup 20 --e2e-rounds 2 --precision bf16)
  GPT2=(12 768 12 1024)  # GPT-2 small
  PROMPTS=(prompts.n=32 prompts.max_len=128)
  PASS=(--batch 32 --seq 128 --repeats 3 --n-random 256)
  COMPILE_PART=1
fi

TOTAL_LIMIT="${TOTAL_LIMIT:-460}"  # seconds for all parts: the whole script stays under 8 minutes
declare -A RC SECS
run_part() {  # run_part NAME LIMIT_SECONDS command... ; stdout+stderr -> $WORK/NAME.log
  local name=$1 limit=$2; shift 2
  local var="LIMIT_${name^^}"
  limit=${!var:-$limit}
  local left=$((TOTAL_LIMIT - (SECONDS - STARTED)))
  if (( left < 15 )); then  # out of time: recorded as skipped
    echo "skipped: ${left}s left of TOTAL_LIMIT=${TOTAL_LIMIT}s" >"$WORK/$name.log"
    RC[$name]=3; SECS[$name]=0
    echo "== $name skipped (time budget spent)" >&2
    return
  fi
  (( limit > left )) && limit=$left
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  RC[$name]=$?
  SECS[$name]=$((SECONDS - t0))
  echo "   rc=${RC[$name]} in ${SECS[$name]}s ($((SECONDS - STARTED))s so far)" >&2
  tail -n 4 "$WORK/$name.log" >&2
}

"$PYTHON" - "$DEVICE" >"$WORK/device.json" <<'PY'
import json, sys, torch
device = sys.argv[1]
info = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.sh: DEVICE=cuda but torch sees no CUDA device (use DEVICE=cpu for a smoke test)")
    props = torch.cuda.get_device_properties(0)
    info.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
print(json.dumps(info))
PY
[[ $? -eq 0 ]] || exit 1

# --- training -------------------------------------------------------------------------------------------
run_part train_mfu 150 "$PYTHON" benchmarks/bench_train.py --part model --device "$DEVICE" "${TRAIN_BIG[@]}" \
  --contenders bare_loop,nanogpt,lightning --json "$WORK/train_mfu.json"
run_part train_bench 60 "$PYTHON" benchmarks/bench_train.py --part model --device "$DEVICE" "${TRAIN_BENCH[@]}" \
  --json "$WORK/train_bench.json"
run_part train_e2e 150 "$PYTHON" benchmarks/bench_train.py --part e2e --device "$DEVICE" "${E2E[@]}" \
  --json "$WORK/train_e2e.json"

# --- probes on a random GPT-2-small-shaped model (built here: the machine has no hub) ----------------------
MODEL_DIR="$WORK/gpt2-random"
"$PYTHON" - "$MODEL_DIR" "${GPT2[@]}" <<'PY'
import sys, torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from residual_dynamics.pretrained.prompts import load_prompts

out, n_layer, n_embd, n_head, n_positions = sys.argv[1], *map(int, sys.argv[2:])
core = Tokenizer(models.BPE())
core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
core.decoder = decoders.ByteLevel()
core.train_from_iterator(load_prompts(), trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
torch.manual_seed(0)
config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=50257,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
GPT2LMHeadModel(config).save_pretrained(out)
tokenizer.save_pretrained(out)
PY
run_part probe_cli 150 "$PYTHON" -m residual_dynamics.probe model=local "model.path=$MODEL_DIR" model.name=gpt2-random \
  "model.device=$DEVICE" logger=none "${PROMPTS[@]}" "paths.output_root=$WORK/probe" run_name=gpt2-random

# --- scale (benchmarks/bench_scale.py, when present) -------------------------------------------------------
if [[ -f benchmarks/bench_scale.py ]]; then
  SCALE_HELP="$("$PYTHON" benchmarks/bench_scale.py --help 2>/dev/null)"
  SCALE_ARGS=()
  [[ "$SCALE_HELP" == *--json* ]] && SCALE_ARGS+=(--json "$WORK/scale.json")
  [[ "$DEVICE" == cpu && "$SCALE_HELP" == *--models* ]] && SCALE_ARGS+=(--models gpt2 --batch 2 --tokens 16 --rounds 1)
  [[ "$DEVICE" != cpu && "$SCALE_HELP" == *--models* ]] && SCALE_ARGS+=(--models gpt2,pythia-160m,gpt2-xl --rounds 3)
  if [[ "$SCALE_HELP" == *--device* ]]; then
    run_part scale 240 "$PYTHON" benchmarks/bench_scale.py --device "$DEVICE" ${SCALE_ARGS[@]+"${SCALE_ARGS[@]}"}
  elif [[ "$DEVICE" == cpu ]]; then
    run_part scale 240 "$PYTHON" benchmarks/bench_scale.py ${SCALE_ARGS[@]+"${SCALE_ARGS[@]}"}
  else  # it would run on the CPU: not what this script is for
    echo "bench_scale.py has no --device option: skipped on $DEVICE" >"$WORK/scale.log"
    RC[scale]=3; SECS[scale]=0
  fi
fi

run_part probe_pass 90 "$PYTHON" benchmarks/bench_pretrained.py --model-dir "$MODEL_DIR" --device "$DEVICE" "${PASS[@]}"
if [[ $COMPILE_PART == 1 ]]; then  # last: torch.compile takes a minute, and only adds the compiled MFU
  run_part train_compiled 120 "$PYTHON" benchmarks/bench_train.py --part model --device "$DEVICE" "${TRAIN_BIG[@]}" \
    --contenders bare_loop --compile --json "$WORK/train_compiled.json"
fi

# --- one JSON ----------------------------------------------------------------------------------------------
STATUS=""
for name in "${!RC[@]}"; do STATUS+="$name=${RC[$name]}:${SECS[$name]} "; done
"$PYTHON" - "$WORK" "$OUT" "$((SECONDS - STARTED))" "$STATUS" <<'PY'
import json, os, sys
from pathlib import Path

work, out, seconds, status = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split()
result = {"device": json.loads((work / "device.json").read_text()), "total_seconds": seconds, "parts": {}}
for item in status:
    name, rest = item.split("=", 1)
    rc, secs = rest.split(":")
    part = {"rc": int(rc), "seconds": int(secs), "timed_out": int(rc) in (124, 137)}
    data = work / f"{name}.json"
    if data.is_file():
        part["results"] = json.loads(data.read_text())
    log = work / f"{name}.log"
    if log.is_file():
        part["log_tail"] = log.read_text(errors="replace")[-3000:]
    result["parts"][name] = part
rows = []
probe_results = work / "probe" / "gpt2-random" / "results.jsonl"
if probe_results.is_file():
    rows = [json.loads(line) for line in probe_results.read_text().splitlines() if line.strip()]
if rows and "probe_cli" in result["parts"]:
    seconds_by_probe = {}
    for row in rows:
        if row.get("probe_seconds") is not None:
            seconds_by_probe[row["probe"]] = row["probe_seconds"]
    result["parts"]["probe_cli"]["probe_seconds"] = seconds_by_probe
    result["parts"]["probe_cli"]["weights_sha256"] = rows[0].get("weights_sha256")
mfu = result["parts"].get("train_mfu", {}).get("results", {}).get("model", {})
result["summary"] = {
    "gpu": result["device"].get("name"),
    "mfu_bf16_124M": mfu.get("mfu"),
    "mfu_bf16_124M_compiled": result["parts"].get("train_compiled", {}).get("results", {}).get("model", {}).get("mfu"),
    "ours_over_nanogpt_124M_bf16": mfu.get("ratios", {}).get("ours_over_nanogpt"),
    "e2e_job_over_bare_loop": result["parts"].get("train_e2e", {}).get("results", {}).get("e2e", {}).get("job_over_bare_loop"),
    "failed_parts": sorted(name for name, part in result["parts"].items() if part["rc"] != 0),
}
out.parent.mkdir(parents=True, exist_ok=True)
tmp = out.with_suffix(out.suffix + ".tmp")
tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
os.replace(tmp, out)
print(json.dumps(result["summary"], indent=2))
print(f"wrote {out} in {seconds} s")
PY
