"""Bad input makes ``launch_enhanced_server.py`` refuse to start: exit 2, the culprit on stderr.

Every case runs the launcher as a subprocess (all of them at once, a few at a time) on a
port that is polled for ``/health`` until the process ends, so "refused" also means
"never served". Every fault here, checkpoint faults included, is found before any SGLang
process starts (``test/unit/test_preflight.py`` runs the rest of them through ``--plan``).
"""

from __future__ import annotations

import os
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
from checkpoint_damage import WEIGHTS_FILE, copy_checkpoint, damaged_copy, shipped_mapping, write_config

from .server import REPO, free_port

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300
ABSENT_WEIGHT = "model.layers.1.mlp.experts.3.down_proj.weight"
BAD_SCALES_WEIGHT = "model.layers.1.mlp.experts.2.up_proj.weight"
SHARED_UP = "model.layers.0.mlp.shared_expert.up_proj"  # fp8 in the shipped mapping
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    served: bool
    port: int


@dataclass(frozen=True)
class Case:
    """How to make the bad input (in a work folder), what stderr must name, extra launcher arguments."""

    make: Callable[[Path, dict[str, Path]], tuple[Path, Path]]  # -> (config, --model folder)
    culprit: Callable[[Path, dict[str, Path]], str]
    extra: tuple[str, ...] = ()


def _unknown_precision(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    data = shipped_mapping(demo, weight_mapping={"model.layers.*.self_attn.*": "int3"})
    return write_config(work, data), demo["bf16"]


def _missing_folder(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    return write_config(work, shipped_mapping(demo, fp8_path=str(work / "no-such-fp8"))), demo["bf16"]


def _unmatched_rule(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    data = shipped_mapping(demo, weight_mapping={"model.layers.*.mlp.expert.*.down_proj.weight": "fp8"})
    return write_config(work, data), demo["bf16"]


def _copy_int4(work: Path, demo: dict[str, Path], edit: Callable[[dict], None]) -> Path:
    return damaged_copy(demo, "int4", work, edit)


def _weight_absent(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    prefix = ABSENT_WEIGHT.removesuffix(".weight")

    def drop(tensors: dict) -> None:
        for suffix in ("qweight", "qzeros", "scales", "g_idx"):
            del tensors[f"{prefix}.{suffix}"]

    int4 = _copy_int4(work, demo, drop)
    return write_config(work, shipped_mapping(demo, int4_path=str(int4))), demo["bf16"]


def _truncated_scales(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    name = BAD_SCALES_WEIGHT.removesuffix(".weight") + ".scales"

    def truncate(tensors: dict) -> None:
        tensors[name] = tensors[name][:, : tensors[name].shape[1] // 2].contiguous()

    int4 = _copy_int4(work, demo, truncate)
    return write_config(work, shipped_mapping(demo, int4_path=str(int4))), demo["bf16"]


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
    return write_config(work, shipped_mapping(demo)), demo["int4"]


def _shipped(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    return write_config(work, shipped_mapping(demo)), demo["bf16"]


def _fp8_scale_missing(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    fp8 = damaged_copy(demo, "fp8", work, lambda t: t.pop(f"{SHARED_UP}.weight_scale_inv"))
    return write_config(work, shipped_mapping(demo, fp8_path=str(fp8))), demo["bf16"]


def _gptq_scales_nan(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    name = BAD_SCALES_WEIGHT.removesuffix(".weight") + ".scales"
    int4 = _copy_int4(work, demo, lambda t: t[name].__setitem__((0, 0), float("nan")))
    return write_config(work, shipped_mapping(demo, int4_path=str(int4))), demo["bf16"]


def _int4_path_unquantized(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    return write_config(work, shipped_mapping(demo, int4_path=str(demo["bf16"]))), demo["bf16"]


def _truncated_file(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    int4 = copy_checkpoint(demo["int4"], work / "gptq-int4")
    file = int4 / WEIGHTS_FILE
    file.write_bytes(file.read_bytes()[:-4096])
    return write_config(work, shipped_mapping(demo, int4_path=str(int4))), demo["bf16"]


def _bf16_wrong_shape(work: Path, demo: dict[str, Path]) -> tuple[Path, Path]:
    model = damaged_copy(demo, "bf16", work, lambda t: t.update({Q_PROJ: t[Q_PROJ].reshape(32, -1)}))
    return write_config(work, shipped_mapping(demo, bf16_path=str(model))), model


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
    "fp8_weight_without_scale": Case(_fp8_scale_missing, lambda w, d: f"{SHARED_UP}.weight"),
    "gptq_scales_nan": Case(_gptq_scales_nan, lambda w, d: BAD_SCALES_WEIGHT),
    "int4_path_is_unquantized": Case(_int4_path_unquantized, lambda w, d: str(d["bf16"])),
    "truncated_safetensors": Case(_truncated_file, lambda w, d: str(w / "gptq-int4" / WEIGHTS_FILE)),
    "bf16_weight_of_wrong_shape": Case(_bf16_wrong_shape, lambda w, d: Q_PROJ),
    "negative_port": Case(_shipped, lambda w, d: "--port", extra=("--port", "-5")),
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


def run_launcher(config: Path, model: Path, work: Path, extra: tuple[str, ...] = ()) -> Outcome:
    """Run the launcher until it exits, polling its port; kill it (and report) if it outlives TIMEOUT_S."""
    port = free_port()
    out, err = work / "stdout.txt", work / "stderr.txt"
    argv = [sys.executable, str(REPO / "launch_enhanced_server.py"), "--config", str(config),
            "--model", str(model), "--port", str(port), "--host", "127.0.0.1", *extra]  # fmt: skip
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
        futures = {
            name: pool.submit(run_launcher, c, m, w, CASES[name].extra) for name, (c, m, w, _) in prepared.items()
        }
        return {name: (futures[name].result(), prepared[name][3]) for name in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_launcher_refuses_bad_input(outcomes, case: str) -> None:
    outcome, culprit = outcomes[case]
    assert outcome.returncode == 2, outcome.stderr[-4000:]
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.stderr[-4000:]
    assert not outcome.served
    assert not _listening(outcome.port)
    assert culprit in outcome.stderr, outcome.stderr[-4000:]
    # Refused before any SGLang process starts.
    assert outcome.stderr.rstrip().splitlines()[-1].startswith("error: ")
    assert "Load weight begin" not in outcome.stdout + outcome.stderr
