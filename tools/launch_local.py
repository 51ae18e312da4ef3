"""Launches N JAX processes of one command on this machine: the local form of a multi-host job.

    python tools/launch_local.py --processes 2 --devices-per-process 4 -- \\
        python -m experiments.sft_arith --workdir runs/sft_2p --config.steps=20

Process i runs the command with the environment a multi-GPU cluster gives each host (README, "Running on a mesh"):

    JAXPOST_COORDINATOR=localhost:PORT JAXPOST_NUM_PROCESSES=N JAXPOST_PROCESS_ID=i

and `jaxpost.cli` calls `jax.distributed.initialize` with them before JAX starts, so the N processes form one global
mesh of N x K devices (process 0 holds the first K). With `--devices-per-process K` every process gets K emulated CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=K`, `JAX_PLATFORMS=cpu`; cross-process collectives go
through gloo, jax's default on CPU). `--processes 1` sets no JAXPOST_* variable: the plain single-process command.

The PORT is a free one unless `--port` names it. Output lines are prefixed `[pI]`; when one process fails the others
(which would wait forever in a collective) are stopped after `--grace` seconds. The exit code is the worst of the
processes' (the first non-zero one).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

ENV_COORDINATOR = "JAXPOST_COORDINATOR"
ENV_NUM_PROCESSES = "JAXPOST_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXPOST_PROCESS_ID"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(i: int, n: int, port: int, devices_per_process: int | None, base: dict | None = None) -> dict:
    """The environment of process `i` of `n`."""
    env = dict(os.environ if base is None else base)
    if n > 1:
        env.update({ENV_COORDINATOR: f"localhost:{port}", ENV_NUM_PROCESSES: str(n), ENV_PROCESS_ID: str(i)})
    if devices_per_process is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
        env["JAX_PLATFORMS"] = "cpu"
    return env


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(prefix + line.decode(errors="replace"))
        out.flush()
    stream.close()


def launch(command: list[str], *, processes: int, devices_per_process: int | None = None, port: int | None = None,
           grace: float = 10.0, timeout: float | None = None, out=None, cwd: str | None = None) -> int:
    """Runs `command` as `processes` JAX processes (module docstring); returns the worst exit code (124 when
    `timeout` seconds passed first)."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if not command:
        raise ValueError("no command to launch")
    out = sys.stdout if out is None else out
    port = free_port() if port is None else port
    procs, pumps = [], []
    for i in range(processes):
        env = process_env(i, processes, port, devices_per_process)
        shown = " ".join(f"{k}={env[k]}" for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID) if k in env)
        out.write(f"[p{i}] $ {shown + ' ' if shown else ''}{shlex.join(command)}\n")
        p = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    failed_at, timed_out = None, False
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if (failed_at is not None and now - failed_at > grace) or (deadline is not None and now > deadline):
            timed_out = failed_at is None
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    codes = [p.wait() for p in procs]
    for t in pumps:
        t.join(timeout=5)
    if timed_out:
        return 124
    return next((c for c in codes if c != 0), 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="%(prog)s [options] -- command [args...]")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="emulated CPU devices per process (unset: the platform's own devices)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the other processes get after one fails before they are killed")
    parser.add_argument("--timeout", type=float, default=None, help="kill every process after this many seconds")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    t0 = time.perf_counter()
    code = launch(command, processes=args.processes, devices_per_process=args.devices_per_process, port=args.port,
                  grace=args.grace, timeout=args.timeout)
    print(f"launch_local: {args.processes} process(es) finished with exit code {code} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
