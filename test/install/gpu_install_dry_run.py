"""Resolve the start script's GPU install in a fresh environment (downloads a few GB; not a pytest file).

Runs, in a new virtual environment, exactly the commands that ``start_enhanced_server.sh --install-plan``
prints for a GPU machine (``SGLANG_ENHANCED_EXTRA=gpu``): each step for real except the last, the one
that resolves the whole set (sglang-enhanced[gpu,test] with everything it pulls in), which runs with
``--dry-run --report``. Prints the versions that resolve and checks them against constraints-gpu.txt.
Needs no GPU; flashinfer's build step needs nvcc on PATH (any CUDA version: it only reads it).

    python3 test/install/gpu_install_dry_run.py [--python PYTHON] [--python-version 3.10 3.12]

``--python-version`` repeats the resolving step for other Pythons (pip's ``--python-version`` with
``--only-binary=:all:``): every package of the set must then have a wheel for that Python.
``--import-check`` then runs the last step for real and imports SGLang's server modules and ours
(no GPU needed; sgl_kernel itself needs the NVIDIA driver and is not imported).
The pip configuration of this machine is ignored (``PIP_CONFIG_FILE=/dev/null``, no ``PIP_*``
variables) so that the packages come from the package index as on a fresh machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints-gpu.txt"
SHOWN = ("torch", "torchvision", "torchaudio", "triton", "sgl-kernel", "flashinfer-python", "transformers",
         "sglang", "sglang-enhanced")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    pins["sglang"] = "0.4.7"
    return pins


def fresh_machine_env(venv: Path, python: str, keep_pip_config: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    if not keep_pip_config:
        env["PIP_CONFIG_FILE"] = os.devnull
    env.update(SGLANG_ENHANCED_VENV=str(venv), SGLANG_ENHANCED_EXTRA="gpu", PYTHON=python)
    return env


def run(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    start = time.monotonic()
    subprocess.run(cmd, env=env, check=True)
    print(f"  ({time.monotonic() - start:.0f} s)", flush=True)


def resolved(report: Path) -> dict[str, dict]:
    """name -> the report's metadata of each distribution the dry run would install."""
    data = json.loads(report.read_text())
    return {canonical(item["metadata"]["name"]): item["metadata"] for item in data["install"]}


def installed(venv: Path, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                         env=env, check=True, capture_output=True, text=True).stdout
    return {canonical(d["name"]): d["version"] for d in json.loads(out)}


def torch_requirement(metadata: dict) -> str:
    reqs = [r for r in metadata.get("requires_dist", []) if re.match(r"torch\b(?![-_\w])", r)]
    return ", ".join(reqs) or "(none)"


def print_table(title: str, plan: dict[str, dict], present: dict[str, str], pins: dict[str, str]) -> bool:
    print(f"\n{title}")
    print(f"  {'package':<18} {'version':<16} {'pinned':<14} where")
    ok = True
    for name in SHOWN:
        if name in plan:
            version, where = plan[name]["version"], "resolved by the dry run"
        elif name in present:
            version, where = present[name], "installed by an earlier step"
        else:
            version, where = "-", "MISSING"
        pin = pins.get(name, "")
        good = version != "-" and (not pin or version.split("+")[0] == pin)
        ok &= good
        print(f"  {name:<18} {version:<16} {pin or '-':<14} {where}{'' if good else '   <-- NOT THE PIN'}")
    if "flashinfer-python" in plan:
        print(f"  flashinfer-python's torch requirement: {torch_requirement(plan['flashinfer-python'])}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable, help="the Python that creates the environment")
    parser.add_argument("--python-version", nargs="*", default=[], help="also resolve for these Pythons")
    parser.add_argument("--workdir", type=Path, help="where the environment goes (default: a new temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the environment afterwards")
    parser.add_argument("--keep-pip-config", action="store_true", help="use this machine's pip configuration")
    parser.add_argument("--import-check", action="store_true",
                        help="then install for real and import SGLang's server modules and ours")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-install-"))
    venv = work / "venv"
    env = fresh_machine_env(venv, args.python, args.keep_pip_config)
    plan_text = subprocess.run([str(ROOT / "start_enhanced_server.sh"), "--install-plan"], env=env, check=True,
                               capture_output=True, text=True).stdout
    commands = [shlex.split(line) for line in plan_text.splitlines() if line.strip()]
    print(f"python: {subprocess.check_output([args.python, '-VV'], text=True).strip()}")
    print("start_enhanced_server.sh --install-plan (SGLANG_ENHANCED_EXTRA=gpu):")
    print("".join(f"  {line}\n" for line in plan_text.splitlines()))
    pins = pinned_versions()
    try:
        for cmd in commands[:-1]:
            run(cmd, env)
        report = work / "report.json"
        run(commands[-1] + ["--dry-run", "--report", str(report)], env)
        present = installed(venv, env)
        plan = resolved(report)
        ok = print_table(f"resolved set, {args.python}", plan, present, pins)
        if "torch" in plan:
            print("  torch would be reinstalled by the last step: the pins do not hold it")
            ok = False
        for version in args.python_version:
            ok &= other_python(commands[-1], version, work, venv, env, pins)
        if args.import_check and ok:
            ok &= import_check(commands[-1], venv, env)
        print("\nOK: the GPU install resolves at SGLang 0.4.7's pins" if ok else "\nFAILED")
        return 0 if ok else 1
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def other_python(last: list[str], version: str, work: Path, venv: Path, env: dict[str, str],
                 pins: dict[str, str]) -> bool:
    """The resolving step for another Python: wheels only, our package as a wheel built here."""
    ours = work / "ours"
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(ours), str(ROOT)],
                   env=env, check=True)
    cmd = [f"sglang-enhanced{a[len(str(ROOT)):]}" if a.startswith(str(ROOT) + "[") else a for a in last]
    report = work / f"report-{version}.json"
    run(cmd + ["--find-links", str(ours), "--dry-run", "--ignore-installed", "--only-binary", ":all:",
               "--python-version", version, "--report", str(report)], env)
    return print_table(f"resolved set, Python {version} (wheels only, nothing installed)", resolved(report), {}, pins)


IMPORTS = """
import torch, triton, flashinfer, transformers, compressed_tensors
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"flashinfer {flashinfer.__version__}, transformers {transformers.__version__}, "
      f"compressed-tensors {compressed_tensors.__version__}")
import sglang.srt.entrypoints.http_server, sglang.srt.layers.quantization, sglang.srt.managers.scheduler
import sglang.srt.model_executor.model_runner
from sglang.srt.model_loader.enhanced_mixed_precision_loader import MixedPrecisionModelLoader
print("  imported: SGLang's HTTP server, scheduler, model runner, quantization layers; our loader")
"""


def import_check(last: list[str], venv: Path, env: dict[str, str]) -> bool:
    """The resolving step for real, then the imports a server start makes first."""
    run(last, env)
    print("\nimport check")
    result = subprocess.run([str(venv / "bin" / "python"), "-W", "ignore", "-c", IMPORTS], env=env,
                            capture_output=True, text=True)
    print(result.stdout, end="")
    if result.returncode != 0:
        print("  import failed:\n" + result.stderr[-3000:])
    return result.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
