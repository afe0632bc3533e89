#!/usr/bin/env bash
# Checks the GPU paths on a machine with a CUDA GPU, on a tiny run it builds itself (`bema-offline demo`), and prints
# one PASS or FAIL line per check; exits 1 if any check fails, 0 with a SKIP line when torch sees no CUDA GPU.
#
#   1. `bema-offline eval --device cuda` gives the CPU's numbers: float32 within a relative 1e-4, bfloat16 within 2e-2
#      (of the CPU's float32), and the same ranking.
#   2. `bema-average --device cuda` writes TRL's BEMACallback ops run on the GPU, bit for bit:
#      ema.mul_(1 - beta).add_(theta, alpha=beta), then ema + alpha * (theta - theta0), on CUDA float32 tensors.
#
# Usage: bash scripts/gpu_check.sh      (from a checkout with `pip install -e ".[eval]"` and a CUDA build of torch)
# Environment: GPU_CHECK_DEVICE (default cuda; cpu runs the same checks on the CPU, for the test suite),
# GPU_CHECK_WORKDIR (keep the run there and reuse it; default: a temporary folder, removed),
# GPU_CHECK_RTOL_FP32 / GPU_CHECK_RTOL_BF16 (the tolerances of check 1).
set -euo pipefail

DEVICE=${GPU_CHECK_DEVICE:-cuda}
RTOL_FP32=${GPU_CHECK_RTOL_FP32:-1e-4}
RTOL_BF16=${GPU_CHECK_RTOL_BF16:-2e-2}
where=$(python -c "
import torch
if '$DEVICE' == 'cpu':
    print('the CPU')
elif torch.cuda.is_available():
    print(torch.cuda.get_device_name())
else:
    print(f'SKIP: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda}); '
          'run this on a machine with a CUDA GPU')
")
if [[ $where == SKIP:* ]]; then
    echo "$where"
    exit 0
fi
if [[ -n ${GPU_CHECK_WORKDIR:-} ]]; then
    WORK=$GPU_CHECK_WORKDIR
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
fi
echo "device: $DEVICE ($where), work folder: $WORK"

# A tiny run: a base, checkpoints every 20 steps (fp32), its EMA and BEMA on the CPU, and its held-out text as JSONL
# (reused when GPU_CHECK_WORKDIR already holds them).
if [[ ! -f $WORK/heldout.jsonl ]]; then
    bema-offline demo --workdir "$WORK/demo" --steps 60 --save-every 20 --quiet
    python - "$WORK/heldout.jsonl" <<'EOF'
import json, sys
from bema_offline.train.demo import VOCAB, _heldout_windows
rows = ["".join(VOCAB[i] for i in window.tolist()) for window in _heldout_windows()]
open(sys.argv[1], "w").write("".join(json.dumps({"text": text}) + "\n" for text in rows))
EOF
fi

# Each check is one Python process: it runs the commands through the command line's own entry point (what
# `bema-offline ...` runs), then compares; torch and transformers are imported once per check.

# Check 1: evaluation on the device against the CPU.
check1=0
python - "$WORK" "$DEVICE" "$RTOL_FP32" "$RTOL_BF16" <<'EOF' || check1=1
import json, shutil, sys
from bema_offline.cli import _run, cli
work, device, rtol_fp32, rtol_bf16 = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
def evaluate(device, dtype):
    report = f"{work}/eval-{device}-{dtype}"
    shutil.rmtree(report, ignore_errors=True)
    try:
        _run(cli, ["eval", f"{work}/demo/averaged", "--data", f"{work}/heldout.jsonl", "--baselines", "--device", device,
                   "--dtype", dtype, "-o", report, "--quiet"])
    except SystemExit as e:
        if e.code:
            sys.exit(print(f"FAIL: eval --device {device} --dtype {dtype} exited with {e.code} (its error is above)") or 1)
    return {r["label"]: r["metrics"]["loss"] for r in json.load(open(f"{report}/eval.json"))["results"]}
cpu = evaluate("cpu", "float32")
failed = False
for dtype, rtol in [("float32", rtol_fp32), ("bfloat16", rtol_bf16)]:
    losses = evaluate(device, dtype)
    worst = max(abs(losses[label] - loss) / abs(loss) for label, loss in cpu.items())
    same_order = sorted(cpu, key=cpu.get) == sorted(losses, key=losses.get)
    ok = worst <= rtol and same_order
    failed |= not ok
    print(f"{'PASS' if ok else 'FAIL'}: eval --device {device} --dtype {dtype} vs --device cpu float32: largest relative "
          f"difference {worst:.2e} (tolerance {rtol:.0e}), ranking {'the same' if same_order else 'DIFFERENT'}; "
          + ", ".join(f"{label} {losses[label]:.6f}/{cpu[label]:.6f}" for label in cpu))
sys.exit(1 if failed else 0)
EOF

# Check 2: bema-average on the device against TRL's ops on the device.
check2=0
python - "$WORK" "$DEVICE" <<'EOF' || check2=1
import pathlib, shutil, sys
import torch
from safetensors.torch import load_file
from bema_offline.cli import _run, average_command
work, device = sys.argv[1], sys.argv[2]
shutil.rmtree(f"{work}/average-device", ignore_errors=True)
try:
    _run(average_command, [f"{work}/demo/run", "--base-model", f"{work}/demo/run/base", "--update-freq", "20",
                           "--save", "ema,bema", "--device", device, "-o", f"{work}/average-device", "--quiet"])
except SystemExit as e:
    if e.code:
        sys.exit(print(f"FAIL: bema-average --device {device} exited with {e.code} (its error is above)") or 1)
# update_freq 20 (the demo's save_steps), update_after 0: θ0 is the base, every checkpoint is an update step
steps = sorted(int(path.name.split("-")[1]) for path in pathlib.Path(f"{work}/demo/run").glob("checkpoint-*"))
lag, multiplier, ema_power, bias_power, min_ema_multiplier = 10.0, 1.0, 0.5, 0.2, 0.0  # TRL's defaults
theta0 = {name: t.to(device) for name, t in load_file(f"{work}/demo/run/base/model.safetensors").items()}
ema = {name: t.clone() for name, t in theta0.items()}
with torch.no_grad():
    for step in steps:  # TRL's BEMACallback._update_bema_weights, op for op
        beta = max((lag + multiplier * step) ** (-ema_power), min_ema_multiplier)
        alpha = (lag + multiplier * step) ** (-bias_power)
        theta = {name: t.to(device) for name, t in load_file(f"{work}/demo/run/checkpoint-{step}/model.safetensors").items()}
        for name in ema:
            ema[name].mul_(1 - beta).add_(theta[name], alpha=beta)
        bema = {name: ema[name] + alpha * (theta[name] - theta0[name]) for name in ema}
failed = False
for kind, expected in [("ema", ema), ("bema", bema)]:
    written = load_file(f"{work}/average-device/{kind}/model.safetensors")
    differ = [name for name in expected
              if not torch.equal(written[name].view(torch.int32), expected[name].cpu().view(torch.int32))]
    failed |= bool(differ) or set(written) != set(expected)
    print(f"{'FAIL' if differ else 'PASS'}: bema-average --device {device} {kind} vs TRL's ops on {device}: "
          f"{len(expected) - len(differ)} of {len(expected)} tensors equal bit for bit"
          + (f" (differ: {', '.join(differ[:5])})" if differ else ""))
sys.exit(1 if failed else 0)
EOF

if (( check1 || check2 )); then
    echo "FAIL: $(( check1 + check2 )) of 2 checks failed"
    exit 1
fi
echo "PASS: both checks"
