"""Bad input makes ``launch_enhanced_server.py`` refuse to start: non-zero exit, the culprit on stderr.

Every case runs the launcher as a subprocess (all of them at once, a few at a time) on a
port that is polled for ``/health`` until the process ends, so "refused" also means
"never served". Configuration faults are found before any SGLang process starts; a
GPTQ checkpoint whose scales do not fit its weights is found when the scheduler decodes
it, and the server must still exit non-zero.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from safetensors.torch import load_file, save_file

from .server import REPO, free_port

pytestmark = pytest.mark.e2e

SHIPPED = REPO / "mixed_precision_config.yaml"
TIMEOUT_S = 300
ABSENT_WEIGHT = "model.layers.1.mlp.experts.3.down_proj.weight"
BAD_SCALES_WEIGHT = "model.layers.1.mlp.experts.2.up_proj.weight"


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    served: bool
    port: int


@dataclass(frozen=True)
class Case:
    """How to make the bad input (in a work folder) and what stderr must name."""

    make: Callable[[Path, dict[str, Path]], tuple[Path, Path]]  # -> (config, --model folder)
    culprit: Callable[[Path, dict[str, Path]], str]


def _shipped_mapping(demo: dict[str, Path], **changes: object) -> dict:
    data = yaml.safe_load(SHIPPED.read_text())
    mp = data["mixed_precision"]
    mp.update({f"{p}_path": str(path) for p, path in demo.items()})
    for key, value in changes.items():
        if key == "weight_mapping":
            mp["weight_mapping"] = {**mp["weight_mapping"], **value}
        else:
            mp[key] = value
    return data


def _config(work: Path, data: dict) -> Path:
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _unknown_precision(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    data = _shipped_mapping(demo, weight_mapping={"model.layers.*.self_attn.*": "int3"})
    return _config(work, data), demo["bf16"]


def _missing_folder(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    return _config(work, _shipped_mapping(demo, fp8_path=str(work / "no-such-fp8"))), demo["bf16"]


def _unmatched_rule(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    data = _shipped_mapping(demo, weight_mapping={"model.layers.*.mlp.expert.*.down_proj.weight": "fp8"})
    return _config(work, data), demo["bf16"]


def _copy_int4(work: Path, demo: dict[str, Path], edit: Callable[[dict], None]) -> Path:
    int4 = work / "gptq-int4"
    shutil.copytree(demo["int4"], int4)
    tensors = load_file(str(int4 / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(int4 / "model.safetensors"), metadata={"format": "pt"})
    return int4


def _weight_absent(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    prefix = ABSENT_WEIGHT.removesuffix(".weight")

    def drop(tensors: dict) -> None:
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            del tensors[f"{prefix}.{suffix}"]

    int4 = _copy_int4(work, demo, drop)
    return _config(work, _shipped_mapping(demo, int4_path=str(int4))), demo["bf16"]


def _truncated_scales(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    name = BAD_SCALES_WEIGHT.removesuffix(".weight") + ".scales"

    def truncate(tensors: dict) -> None:
        tensors[name] = tensors[name][:, : tensors[name].shape[1] // 2].contiguous()

    int4 = _copy_int4(work, demo, truncate)
    return _config(work, _shipped_mapping(demo, int4_path=str(int4))), demo["bf16"]


def _yaml_syntax(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    path = work / "config.yaml"
    path.write_text(
        "mixed_precision:\n"
        f"  bf16_path: {demo['bf16']}\n"
        "  weight_mapping:\n"
        '    "model.layers.*.self_attn.*": [bf16\n'
        "inference:\n"
        "  dtype: bfloat16\n"
    )
    return path, demo["bf16"]


def _quantized_model(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    return _config(work, _shipped_mapping(demo)), demo["int4"]


CASES = {
    "unknown_precision": Case(
        _unknown_precision, lambda w, d: 'mixed_precision.weight_mapping["model.layers.*.self_attn.*"]'
    ),
    "missing_folder": Case(_missing_folder, lambda w, d: str(w / "no-such-fp8")),
    "rule_matches_no_weight": Case(
        _unmatched_rule, lambda w, d: 'weight_mapping["model.layers.*.mlp.expert.*.down_proj.weight"]'
    ),
    "weight_absent_from_its_source": Case(_weight_absent, lambda w, d: ABSENT_WEIGHT),
    "yaml_syntax_error": Case(_yaml_syntax, lambda w, d: f"{w / 'config.yaml'}:5:"),
    "model_is_quantized": Case(_quantized_model, lambda w, d: str(d["int4"].resolve() / "config.json")),
    "gptq_scales_truncated": Case(_truncated_scales, lambda w, d: BAD_SCALES_WEIGHT),
}


def _serves(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_launcher(config: Path, model: Path, work: Path) -> Outcome:
    """Run the launcher until it exits, polling its port; kill it (and report) if it outlives TIMEOUT_S."""
    port = free_port()
    out, err = work / "stdout.txt", work / "stderr.txt"
    argv = [sys.executable, str(REPO / "launch_enhanced_server.py"), "--config", str(config),
            "--model", str(model), "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
    served = False
    with open(out, "w") as fout, open(err, "w") as ferr:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=fout, stderr=ferr, start_new_session=True)
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                served = served or _serves(port)
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                served = True  # still running after the timeout counts as serving
    return Outcome(proc.returncode, out.read_text(), err.read_text(), served, port)


@pytest.fixture(scope="module")
def outcomes(demo_checkpoints, tmp_path_factory) -> dict[str, tuple[Outcome, str]]:
    """Every case's launcher run and the culprit its stderr must name."""
    prepared = {}
    for name, case in CASES.items():
        work = tmp_path_factory.mktemp(name)
        config, model = case.make(work, demo_checkpoints)
        prepared[name] = (config, model, work, case.culprit(work, demo_checkpoints))
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(run_launcher, c, m, w) for name, (c, m, w, _) in prepared.items()}
        return {name: (futures[name].result(), prepared[name][3]) for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_launcher_refuses_bad_input(outcomes, case: str) -> None:
    outcome, culprit = outcomes[case]
    assert outcome.returncode != 0, outcome.stderr[-4000:]
    assert not outcome.served
    assert not _listening(outcome.port)
    assert culprit in outcome.stderr, outcome.stderr[-4000:]
    # Refused before any SGLang process starts.
    assert outcome.stderr.rstrip().splitlines()[-1].startswith("error: ")
    assert "Load weight begin" not in outcome.stdout + outcome.stderr
