"""The start script's install commands, as it runs them (``--install-plan`` prints them, runs nothing).

The GPU branch is forced with ``SGLANG_ENHANCED_EXTRA=gpu``. Pins are checked against SGLang 0.4.7's
own package metadata; ``test/install/gpu_install_dry_run.py`` resolves these commands for real.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from importlib.metadata import requires
from pathlib import Path

import pytest
from readme_blocks import code_block

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "start_enhanced_server.sh"
CONSTRAINTS = ROOT / "constraints-gpu.txt"
# What SGLang 0.4.7 was released with. triton comes with torch 2.7.1; SGLang leaves compressed-tensors
# open, and its newest releases do not import beside transformers 4.52.3.
RELEASE_PINS = {
    "torch": "2.7.1", "torchvision": "0.22.1", "torchaudio": "2.7.1", "triton": "3.3.1",
    "sgl-kernel": "0.1.7", "flashinfer-python": "0.2.6.post1", "transformers": "4.52.3",
    "compressed-tensors": "0.10.1",
}  # fmt: skip
NOT_FROM_SGLANG = ("triton", "compressed-tensors")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if "==" in line:
            name, version = (part.strip() for part in line.split("=="))
            out[canonical(name.split("[", 1)[0])] = version
    return out


def plan(tmp_path: Path, **env: str) -> list[list[str]]:
    """The plan's commands, split into words; ``env`` entries replace the environment's (``""`` unsets)."""
    venv = tmp_path / "venv"
    full = {**os.environ, "SGLANG_ENHANCED_VENV": str(venv), **env}
    result = subprocess.run(
        [str(SCRIPT), "--install-plan"],
        env={k: v for k, v in full.items() if v != ""},
        capture_output=True, text=True, check=True,
    )
    assert not venv.exists()  # printed, not run
    return [shlex.split(line) for line in result.stdout.splitlines()]


def pip_args(cmd: list[str], venv: Path) -> list[str]:
    assert cmd[:3] == [str(venv / "bin" / "python"), "-m", "pip"], cmd
    return cmd[3:]


def option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_gpu_extra_and_constraints_name_sglang_0_4_7_release_pins():
    sglang_srt = [r for r in requires("sglang") if re.search(r'extra == "(srt|runtime-common)"', r)]
    from_sglang = pins(sglang_srt)
    constraints = pins(CONSTRAINTS.read_text().splitlines())
    tomllib = pytest.importorskip("tomllib")
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert "sglang[srt]==0.4.7" in gpu_extra
    assert constraints == RELEASE_PINS
    assert {k: v for k, v in pins(gpu_extra).items() if k != "sglang"} == RELEASE_PINS
    for name, version in RELEASE_PINS.items():
        if name not in NOT_FROM_SGLANG:
            assert from_sglang[name] == version, name


def test_gpu_branch_installs_torch_first_then_builds_flashinfer_against_it(tmp_path):
    venv = tmp_path / "venv"
    cmds = plan(tmp_path, SGLANG_ENHANCED_EXTRA="gpu", PYTHON="python3")
    assert cmds[0] == ["python3", "-m", "venv", str(venv)]
    assert pip_args(cmds[1], venv) == ["install", "-q", "--upgrade", "pip"]
    torch_step, tools_step, flashinfer_step, last = (pip_args(c, venv) for c in cmds[2:])
    assert len(cmds) == 6
    for args in (torch_step, tools_step, flashinfer_step, last):
        assert option(args, "-c") == str(CONSTRAINTS)
    assert torch_step[0] == "install" and {"torch==2.7.1", "torchvision==0.22.1", "torchaudio==2.7.1"} <= set(
        torch_step
    )
    assert "--index-url" not in torch_step
    assert tools_step[0] == "install" and {"setuptools>=77", "packaging>=24", "wheel"} <= set(tools_step)
    assert flashinfer_step[0] == "wheel" and flashinfer_step[-1] == "flashinfer-python==0.2.6.post1"
    assert {"--no-build-isolation", "--no-deps"} <= set(flashinfer_step)
    wheels = option(flashinfer_step, "-w")
    assert last[0] == "install" and last[-1] == f"{ROOT}[gpu,test]"
    assert option(last, "--find-links") == wheels and "--no-build-isolation" not in last


def test_torch_index_for_another_cuda_goes_to_the_torch_step_only(tmp_path):
    url = "https://example.invalid/whl/cu128"
    cmds = plan(tmp_path, SGLANG_ENHANCED_EXTRA="gpu", SGLANG_ENHANCED_TORCH_INDEX_URL=url)
    with_index = [c for c in cmds if "--index-url" in c]
    assert len(with_index) == 1 and "torch==2.7.1" in with_index[0] and option(with_index[0], "--index-url") == url


def test_cpu_branch_and_the_choice(tmp_path):
    venv = tmp_path / "venv"
    cmds = plan(tmp_path, SGLANG_ENHANCED_EXTRA="cpu")
    assert [pip_args(c, venv) for c in cmds[1:]] == [
        ["install", "-q", "--upgrade", "pip"],
        ["install", "-q", f"{ROOT}[cpu,test]"],
    ]
    # No SGLANG_ENHANCED_EXTRA: the GPU install where nvidia-smi lists a GPU, else the CPU one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    no_gpu = plan(tmp_path, SGLANG_ENHANCED_EXTRA="", PATH="/usr/bin:/bin")
    assert no_gpu[-1][-1] == f"{ROOT}[cpu,test]"
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = -L ] && echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n')
    smi.chmod(0o755)
    with_gpu = plan(tmp_path, SGLANG_ENHANCED_EXTRA="", PATH=f"{bin_dir}:/usr/bin:/bin")
    assert with_gpu[-1][-1] == f"{ROOT}[gpu,test]"


def test_unknown_extra_is_refused_by_name(tmp_path):
    result = subprocess.run([str(SCRIPT), "--install-plan"], env={**os.environ, "SGLANG_ENHANCED_EXTRA": "rocm"},
                            capture_output=True, text=True)
    assert result.returncode == 2 and "SGLANG_ENHANCED_EXTRA must be gpu or cpu, not 'rocm'" in result.stderr


def test_readme_gpu_lines_are_the_start_scripts(tmp_path):
    """The README's manual GPU install is the plan with the repository as ``.`` and ``.venv``."""
    written = [shlex.split(line) for line in code_block("### A CUDA machine", "bash").splitlines()]
    venv = ROOT / ".venv"
    planned = subprocess.run(
        [str(SCRIPT), "--install-plan"],
        env={**os.environ, "SGLANG_ENHANCED_EXTRA": "gpu", "SGLANG_ENHANCED_VENV": str(venv), "PYTHON": "python3"},
        capture_output=True, text=True, check=True,
    ).stdout

    def relative(word: str) -> str:
        return word.replace(str(venv), ".venv").replace(f"{ROOT}/", "").replace(f"{ROOT}[", ".[")

    expected = [[relative(w) for w in shlex.split(line) if w != "-q"] for line in planned.splitlines()]
    assert written == expected
