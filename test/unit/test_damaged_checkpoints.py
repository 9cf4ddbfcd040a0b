"""Property: a damaged demo checkpoint is refused before start, naming the culprit, or loads exactly.

Hypothesis damages one demo folder (bf16 / fp8 / GPTQ) at a time: truncation at a random
offset, a random byte of the header (the length prefix included) overwritten, a tensor
dropped, a tensor reshaped to another shape of the same size, a non-finite value in a scale.
The launcher's checks then run as for ``--plan`` (:func:`check_setup`). Either they raise
``EnhancedError`` whose message names the damaged file, its folder, the damaged tensor or the
weight it belongs to, or the plan loads to exactly the weights of the undamaged checkpoints.
Nothing else may happen: any other exception fails the test, and a case still running after
``HANG_S`` seconds fails it as a hang.
"""

from __future__ import annotations

import json
import math
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from checkpoint_damage import WEIGHTS_FILE, copy_checkpoint, edit_tensors, shipped_mapping, write_config
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from sglang.srt.enhanced.config import resolve_path
from sglang.srt.enhanced.errors import EnhancedError
from sglang.srt.enhanced.launch import build_parser, check_setup, explicit_dests, rewrite_model_alias
from sglang.srt.enhanced.mixed_precision.sglang_loader import load_enhanced_config, prepare_plan
from sglang.srt.enhanced.mixed_precision.weights import iter_plan_weights

HANG_S = 120
DAMAGES = ("truncate", "header_byte", "drop", "reshape", "non_finite")
SCALE_SUFFIXES = (".scales", ".weight_scale_inv")


@contextmanager
def hang_guard(seconds: int) -> Iterator[None]:
    def fail(signum, frame):  # noqa: ANN001 - signal handler signature
        raise TimeoutError(f"a damaged checkpoint case ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def preflight(config: Path, model: Path):
    """The launcher's checks for ``--plan`` / a start, in this process; returns the plan."""
    argv = rewrite_model_alias(["--config", str(config), "--model", str(model), "--host", "127.0.0.1", "--plan"])
    parser = build_parser()
    return check_setup(parser.parse_args(argv), explicit_dests(parser, argv), resolve_path(config))


def load_weights(config: Path, model: Path) -> dict[str, torch.Tensor]:
    plan, sources = prepare_plan(load_enhanced_config(config, model), torch.bfloat16)
    try:
        return {name: t.clone() for name, t in iter_plan_weights(plan, sources, dtype=torch.bfloat16, progress=False)}
    finally:
        for source in {id(s): s for s in sources.values()}.values():
            source.close()


@pytest.fixture(scope="module")
def demo(demo_checkpoints: dict[str, Path]) -> dict[str, Path]:
    return {k: v.resolve() for k, v in demo_checkpoints.items()}


@pytest.fixture(scope="module")
def reference(demo: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The weights the undamaged demo checkpoints load to."""
    config = write_config(tmp_path_factory.mktemp("reference"), shipped_mapping(demo))
    return load_weights(config, demo["bf16"])


def _stored(folder: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118


def _header_entry_at(file: Path, position: int, new_byte: int) -> list[str]:
    """The tensor whose header entry holds byte ``position`` of the file, and its name after the change."""
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    raw = file.read_bytes()[8 : 8 + n].decode()
    starts = sorted((raw.index(json.dumps(name) + ":"), name) for name in json.loads(raw))
    hit = [(start, name) for start, name in starts if start + 8 <= position][-1:]
    if not hit or hit[0][1] == "__metadata__":
        return []
    start, name = hit[0]
    at = position - 8 - start - 1  # index into the name when the byte lies inside it
    names = [name]
    if 0 <= at < len(name) and new_byte < 128:
        names.append(name[:at] + chr(new_byte) + name[at + 1 :])
    return names


def _culprits(folder: Path, tensors: list[str]) -> list[str]:
    """Names an error may give for damage to ``tensors`` (or, for none, to the file as a whole)."""
    names = [str(folder / WEIGHTS_FILE), str(folder)]
    for tensor in tensors:
        names += [tensor, tensor.rsplit(".", 1)[0] + ".weight"]
    return names


def _other_shape(shape: tuple[int, ...], pick: int) -> tuple[int, ...]:
    numel = math.prod(shape)
    options = [(numel,), (1, numel)] + [(d, numel // d) for d in range(2, numel) if numel % d == 0][:6]
    options = [s for s in options if s != shape]
    return options[pick % len(options)]


def damage(folder: Path, kind: str, data: st.DataObject) -> list[str]:
    """Damage ``folder``'s weights file in place; returns the names of the tensor hit (none: the whole file)."""
    file = folder / WEIGHTS_FILE
    stored = _stored(folder)
    names = sorted(stored)
    if kind == "truncate":
        size = file.stat().st_size
        file.write_bytes(file.read_bytes()[: data.draw(st.integers(0, size - 1), label="truncate to")])
        return []
    if kind == "header_byte":
        raw = bytearray(file.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        position = data.draw(st.integers(0, 8 + n - 1), label="header byte")
        new_byte = data.draw(st.integers(0, 255).filter(lambda b: b != raw[position]), label="new byte")
        hit = _header_entry_at(file, position, new_byte) if position >= 8 else []
        raw[position] = new_byte
        file.write_bytes(bytes(raw))
        return hit
    if kind == "drop":
        name = data.draw(st.sampled_from(names), label="dropped")
        edit_tensors(folder, lambda t: t.pop(name))
        return [name]
    if kind == "reshape":
        name = data.draw(st.sampled_from(names), label="reshaped")
        shape = _other_shape(stored[name][0], data.draw(st.integers(0, 7), label="shape choice"))
        edit_tensors(folder, lambda t: t.update({name: t[name].reshape(shape)}))
        return [name]
    scales = [n for n in names if n.endswith(SCALE_SUFFIXES)]
    name = data.draw(st.sampled_from(scales), label="poisoned")
    value = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]), label="value")
    index = data.draw(st.integers(0, math.prod(stored[name][0]) - 1), label="element")

    def poison(tensors: dict[str, torch.Tensor]) -> None:
        flat = tensors[name].reshape(-1)
        if flat.dtype.is_floating_point:
            flat[index] = value

    edit_tensors(folder, poison)
    return [name]


@settings(max_examples=30, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(precision=st.sampled_from(["bf16", "fp8", "int4"]), kind=st.sampled_from(DAMAGES), data=st.data())
def test_damaged_checkpoint_is_refused_or_loads_exactly(demo, reference, precision: str, kind: str,
                                                          data: st.DataObject) -> None:
    assume(not (kind == "non_finite" and precision == "bf16"))  # an unquantized checkpoint has no scales
    with tempfile.TemporaryDirectory() as tmp, hang_guard(HANG_S):
        work = Path(tmp)
        folder = copy_checkpoint(demo[precision], work / precision)
        hit = damage(folder, kind, data)
        paths = {**demo, precision: folder}
        config = write_config(work, shipped_mapping(paths))
        model = paths["bf16"]
        try:
            preflight(config, model)
        except EnhancedError as e:
            message = str(e)
            assert len(message) < 2000, message[:2000]
            assert any(c in message for c in _culprits(folder, hit)), (kind, hit, message)
            return
        loaded = load_weights(config, model)
        assert loaded.keys() == reference.keys()
        for name, want in reference.items():
            got = loaded[name]
            assert got.dtype == want.dtype and torch.equal(got, want), (kind, hit, name)
