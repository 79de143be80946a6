"""Run compared configurations interleaved: each in its own process (benchmarks/worker.py), all
loaded at once and stepped in turn, A B C A B C ..., so that a noisy neighbour slows every
configuration alike. Only one process computes at a time; the others wait on a pipe.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")


class WorkerError(RuntimeError):
    pass


class Worker:
    def __init__(self, name: str, spec: dict):
        self.name, self.spec = name, spec
        self.stderr = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up and block
        env = {**os.environ, **spec.get("env", {})}  # e.g. OMP_WAIT_POLICY for one configuration
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
            env=env,
        )
        self.times: list[float] = []
        self.info: dict = {}

    def _read(self) -> str:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return line[2:].strip()
        code = self.proc.wait()
        self.stderr.seek(0)
        err = self.stderr.read()[-3000:]
        raise WorkerError(f"{self.name} ({self.spec}) exited with {code}:\n{err}")

    def ready(self) -> None:
        msg = self._read()
        self.info.update(json.loads(msg.removeprefix("ready ")))

    def step(self) -> None:
        self.proc.stdin.write("step\n")
        self.times.append(float(self._read()))

    def quit(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.info.update(json.loads(self._read().removeprefix("done ")))
        self.proc.wait()
        return self.result()

    def result(self) -> dict:
        t = self.times
        return {
            "name": self.name,
            "spec": self.spec,
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "times_s": t,
            **self.info,
        }


def run_group(specs: dict[str, dict], steps: int, log=print) -> dict[str, dict]:
    """Load every configuration (one process each), then `steps` interleaved rounds.
    -> {name: result}. A configuration that fails is reported with an 'error' and the rest go on."""
    workers = {name: Worker(name, spec) for name, spec in specs.items()}
    results: dict[str, dict] = {}
    for name, w in list(workers.items()):
        try:
            w.ready()
        except WorkerError as e:
            results[name] = {"name": name, "spec": w.spec, "error": str(e)}
            del workers[name]
    for r in range(steps):
        for w in workers.values():
            w.step()
        log(f"  round {r + 1}/{steps}: " + ", ".join(f"{n} {w.times[-1]:.3f}s" for n, w in workers.items()))
    for name, w in workers.items():
        results[name] = w.quit()
    return {name: results[name] for name in specs}


def machine() -> dict:
    import importlib.metadata as md

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "transformers", "executorch", "zotune"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        **versions,
    }


def machine_line(m: dict) -> str:
    la = "/".join(f"{x:.2f}" for x in m["load_average"])
    return (
        f"{m['cores']} cores ({m['cpu'] or platform.machine()}), load average {la}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"executorch {m['executorch']}, zotune {m['zotune']}"
    )


def fmt_time(r: dict) -> str:
    if "error" in r:
        return "failed"
    return f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})"
