"""The time a preemption costs: run an experiment, send it SIGTERM (or SIGKILL, for comparison) once `--at` steps are
logged, run the same command again, and report the seconds from the signal to the exit, from the restart to the
first new step, and the steps done twice.

    python tools/bench_preemption.py --workdir runs/preempt --at 25 -- --config.steps=60 \
        --config.train.checkpoint_every=10
    python tools/bench_preemption.py --workdir runs/preempt_kill --at 25 --signal KILL -- --config.steps=60 \
        --config.train.checkpoint_every=10

Arguments after `--` go to the experiment (default `experiments.sft_arith`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(path: str) -> list[int]:
    try:
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["step"] for r in lines if "loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--experiment", default="experiments.sft_arith")
    parser.add_argument("--at", type=int, default=20, help="send the signal once this many steps are logged")
    parser.add_argument("--signal", default="TERM", choices=("TERM", "INT", "KILL"))
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    shutil.rmtree(args.workdir, ignore_errors=True)
    metrics = os.path.join(args.workdir, "metrics.jsonl")
    cmd = [sys.executable, "-m", args.experiment, f"--workdir={args.workdir}", *extra]

    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(_steps(metrics)) < args.at:
        if proc.poll() is not None:
            raise SystemExit(f"the run ended (status {proc.returncode}) before step {args.at}")
        time.sleep(0.02)
    first_run_to_step = time.perf_counter() - t_start
    t_signal = time.perf_counter()
    proc.send_signal(getattr(signal, f"SIG{args.signal}"))
    status = proc.wait()
    exit_s = time.perf_counter() - t_signal
    logged = max(_steps(metrics))

    ckdir = os.path.join(args.workdir, "checkpoints")
    saved = max((int(d) for d in os.listdir(ckdir) if d.isdigit()), default=0) if os.path.isdir(ckdir) else 0
    t_restart = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cut = saved == logged  # the log is cut back to the checkpoint's step when the run resumes
    while proc.poll() is None:
        steps = _steps(metrics)
        cut = cut or not steps or max(steps) <= saved  # (the file is replaced atomically)
        if cut and steps and max(steps) > saved:
            break
        time.sleep(0.02)
    restart_to_step = time.perf_counter() - t_restart
    proc.wait()
    results = json.load(open(os.path.join(args.workdir, "results.json")))
    resumed = results["resumed_from_step"]
    report = {"signal": f"SIG{args.signal}", "exit_status": status, "steps_logged_at_signal": logged,
              "resumed_from_step": resumed, "steps_redone": logged - resumed, "signal_to_exit_s": round(exit_s, 2),
              "restart_to_first_new_step_s": round(restart_to_step, 2),
              "fresh_start_to_step_at_s": round(first_run_to_step, 2),
              "step_time_s": round(results["train_time_s"] / max(1, results["steps"] - resumed), 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
