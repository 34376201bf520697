#!/usr/bin/env bash
# The GPU check: one 80 GB GPU, under 8 minutes, from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# 1. the device-aware tests (every test that takes the `device` fixture, which yields "cuda" on a
#    GPU machine) without the slow ones;
# 2. benchmarks/scale.py --run of the Llama-3.2-1B shape in bf16: replacement fit, 20 tuning steps
#    of 4 x 2,048 tokens, calibration, a 2,048-token evaluation, 64 generated tokens against dense;
# 3. benchmarks/scale.py --speed of the Llama-3.1-8B shape: prefill of 2,048 tokens, batch-1 and
#    batch-8 decode of 64 tokens at 0 / 25 / 40 / 60 % synthetic routing, against HF dense and the
#    ideal speedup (median of 2 repetitions after a warm-up: the time budget).
#
# Each step runs under its own timeout and a failing step does not stop the next. One summary,
# gpu_check.json (pass/fail per step, the numbers, the issue's targets), goes to $OUT when it is set
# (the device machine's output folder), else to runs/, beside the steps' reports and gpu_check.log.
# Nothing is installed: skipgpt is imported from this tree (PYTHONPATH), and what the machine lacks
# is printed first. `pip install -e . --no-deps` is tried only if that import fails anyway.
#
# Environment: PYTHON (default python3), GPU_CHECK_DEVICE (cuda), GPU_CHECK_RUN_ARGS and
# GPU_CHECK_SPEED_ARGS (the scale.py arguments of steps 2 and 3). A dry run of the plumbing on a CPU:
#   PYTHON=.venv/bin/python GPU_CHECK_DEVICE=cpu GPU_CHECK_RUN_ARGS="--shape tiny --steps 2 --tune-seq 64" \
#   GPU_CHECK_SPEED_ARGS="--shape tiny --prompt 64 --new-tokens 8 --reps 1" bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
RUN_ARGS="${GPU_CHECK_RUN_ARGS:---shape llama-3.2-1b --steps 20 --tune-batch 4 --tune-seq 2048 --calibrate}"
SPEED_ARGS="${GPU_CHECK_SPEED_ARGS:---shape llama-3.1-8b --reps 2}"
DEST="${OUT:-runs}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
LOG="$DEST/gpu_check.log"
STEPS="$DEST/gpu_check_steps.tsv"  # name, exit code, seconds, report stem: read by the summary
: > "$LOG"
: > "$STEPS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# step NAME TIMEOUT_S REPORT_STEM COMMAND...: run with a timeout, log, record exit code and time.
step() {
    local name="$1" limit="$2" stem="$3"
    shift 3
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$stem" >> "$STEPS"
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
}

environment() {
    "$PY" - "$DEVICE" <<'EOF'
import importlib, sys
device = sys.argv[1]
needed = ["torch", "transformers", "accelerate", "peft", "safetensors", "tqdm", "numpy", "pytest"]
missing = [m for m in needed if importlib.util.find_spec(m) is None]
for m in needed:
    if m not in missing:
        print(f"{m} {getattr(importlib.import_module(m), '__version__', '?')}")
if missing:
    print("MISSING (install them, or carry their wheels with the tree): " + ", ".join(missing))
import torch
if device == "cuda" and not torch.cuda.is_available():
    print("MISSING: a CUDA device (torch.cuda.is_available() is False)")
    sys.exit(1)
if device == "cuda":
    print(f"GPU: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
try:
    import skipgpt
    print(f"skipgpt {skipgpt.__version__} from {skipgpt.__file__}")
except ImportError as e:
    print(f"skipgpt does not import: {e}")
    sys.exit(2)
sys.exit(1 if missing else 0)
EOF
}

device_tests() {
    "$PY" - "$DEST/gpu_check_tests.json" <<'EOF'
"""pytest over tests/, keeping only the tests that request the `device` fixture."""
import json, sys
import pytest

class DeviceTests:
    def __init__(self):
        self.selected, self.outcomes = 0, {}

    def pytest_collection_modifyitems(self, config, items):
        keep = [item for item in items if "device" in getattr(item, "fixturenames", ())]
        kept = {id(item) for item in keep}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep
        self.selected = len(keep)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            failed_outside_call = report.when != "call" and report.outcome == "failed"
            self.outcomes[report.nodeid] = "error" if failed_outside_call else report.outcome

plugin = DeviceTests()
code = pytest.main(["-q", "tests", "-m", "not slow", "-p", "no:cacheprovider", "--continue-on-collection-errors"],
                   plugins=[plugin])
counts = {k: sum(v == k for v in plugin.outcomes.values()) for k in ("passed", "failed", "skipped", "error")}
with open(sys.argv[1], "w") as f:
    json.dump({"exit_code": int(code), "selected": plugin.selected, **counts,
               "not_passed": sorted(k for k, v in plugin.outcomes.items() if v != "passed")}, f, indent=2)
print(f"device tests: {plugin.selected} selected, {counts}")
sys.exit(0 if plugin.selected and counts["failed"] == counts["error"] == 0 and int(code) in (0, 5) else 1)
EOF
}

export PY DEVICE DEST
export -f environment device_tests  # `timeout` runs programs: the functions run in a child bash
step environment 45 "" bash -c environment
if ! "$PY" -c "import skipgpt" 2>/dev/null; then
    echo "skipgpt is not importable from this tree; trying pip install -e . --no-deps" | tee -a "$LOG"
    "$PY" -m pip install -q -e . --no-deps 2>&1 | tee -a "$LOG"
fi
step device_tests 120 "" bash -c device_tests
# shellcheck disable=SC2086  # the argument strings split into arguments on purpose
step run_1b 140 "$DEST/scale_run" "$PY" benchmarks/scale.py --run --device "$DEVICE" $RUN_ARGS --out "$DEST/scale_run"
# shellcheck disable=SC2086
step speed_8b 150 "$DEST/scale_speed" "$PY" benchmarks/scale.py --speed --device "$DEVICE" $SPEED_ARGS --out "$DEST/scale_speed"

"$PY" - "$STEPS" "$DEST" <<'EOF' | tee -a "$LOG"
"""One JSON over the steps: exit codes, times, the numbers that matter and the issue's targets."""
import csv, json, sys
from pathlib import Path

steps_file, dest = Path(sys.argv[1]), Path(sys.argv[2])

def load(path):
    return json.loads(path.read_text()) if path.is_file() else None

def run_summary(r):
    return {"shape": r["shape"], "device": r["device"], "fit_s": r["fit_s"], "tune_step_s_median": r["tune_step_s_median"],
            "calibration": r.get("calibration"), "eval_s": r["eval"]["seconds"], "eval_sparsity": r["eval"]["sparsity"],
            "activations": r["activations"], "peak_rss": r["rss_target"]["peak_rss"],
            "phases": {k: {"seconds": v["seconds"], "device_peak": v["device_peak"]} for k, v in r["phases"].items()},
            "speed": [{k: row[k] for k in ("config", "batch", "prefill_speedup", "prefill_efficiency",
                                            "decode_speedup", "decode_efficiency")} for row in r["speed"]]}

def speed_summary(r):
    return {"shape": r["shape"], "device": r["device"],
            "rows": [{k: row[k] for k in ("config", "batch", "prompt", "prefill_speedup", "prefill_ideal", "prefill_efficiency",
                                          "decode_speedup", "decode_ideal", "decode_efficiency", "peak_mib")} for row in r["rows"]]}

steps, targets = [], []
for name, rc, seconds, stem in csv.reader(steps_file.open(), delimiter="\t"):
    entry = {"step": name, "exit_code": int(rc), "seconds": int(seconds), "status": "pass" if rc == "0" else
             ("timeout" if rc in ("124", "137") else "fail")}
    if name == "device_tests":
        entry["tests"] = load(dest / "gpu_check_tests.json")
    report = load(Path(stem + ".json")) if stem else None
    if report is not None and name == "run_1b":
        entry["result"] = run_summary(report)
        ratio = report["activations"]["ratio"]
        if ratio is not None:
            targets.append({"target": "activation formula within 10 % of the saved tensors (the run step)",
                            "value": round(ratio, 3), "holds": abs(ratio - 1) <= 0.10})
    if report is not None and name == "speed_8b":
        entry["result"] = speed_summary(report)
        targets += report["targets"]
    steps.append(entry)

summary = {"ok": all(s["status"] == "pass" for s in steps), "targets_hold": all(t["holds"] for t in targets) if targets else None,
           "steps": steps, "targets": targets}
(dest / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
for s in steps:
    print(f"{s['step']}: {s['status']} ({s['seconds']} s)")
for t in targets:
    print(f"target {t['target']}: {t['value']} -> {'holds' if t['holds'] else 'DOES NOT HOLD'}")
print(f"wrote {dest / 'gpu_check.json'}")
EOF
rm -f "$STEPS"
