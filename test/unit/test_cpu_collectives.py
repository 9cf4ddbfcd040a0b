"""CPU mode's tensor-parallel collectives: two real processes, SGLang's own groups, gloo.

The script below runs SGLang's ``init_distributed_environment`` / ``initialize_model_parallel``
in two spawned processes (the installed ``.pth`` wires CPU mode in, as in a server's
scheduler processes) and compares the TP group's all-reduce, all-gather and broadcast
with sums and concatenations computed by hand. With SGLang's own methods put back, the
all-reduce asks for ``intel_extension_for_pytorch`` and the all-gather for a CUDA-only op.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU mode is off where CUDA is available")

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    import torch.multiprocessing as mp

    def worker(rank, port, out):
        from sglang.srt.distributed import parallel_state as ps
        from sglang.srt.distributed import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce

        ps.init_distributed_environment(world_size=2, rank=rank, local_rank=rank, backend="gloo",
                                        distributed_init_method=f"tcp://127.0.0.1:{port}")
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
        group = ps.get_tp_group()
        result = {"all_reduce": ps.GroupCoordinator.all_reduce.__module__,
                  "all_gather_into_tensor": ps.GroupCoordinator.all_gather_into_tensor.__module__}
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.tensor([[1.0, -2.0, 3.5], [0.25, 8.0, -0.5]], dtype=dtype) * (rank + 1)
            reduced = tensor_model_parallel_all_reduce(x)
            gathered = tensor_model_parallel_all_gather(torch.full((2, 2), float(rank + 1), dtype=dtype), dim=-1)
            sent = group.broadcast(torch.full((3,), float(rank + 5), dtype=dtype), src=0)
            result[str(dtype)] = [reduced.float().tolist(), gathered.float().tolist(), sent.float().tolist()]
        from sglang.srt.enhanced.cpu_mode.collectives import restore_collectives

        restore_collectives()
        for name, call in (("stock_all_reduce", lambda: tensor_model_parallel_all_reduce(torch.ones(2))),
                           ("stock_all_gather", lambda: tensor_model_parallel_all_gather(torch.ones(2)))):
            try:
                call()
                result[name] = None
            except Exception as e:  # what SGLang's own CPU path raises without ipex
                result[name] = f"{type(e).__name__}: {e}"
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()

    if __name__ == "__main__":
        mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    work: Path = tmp_path_factory.mktemp("collectives")
    script, out = work / "worker.py", work / "result.json"
    script.write_text(WORKER)
    run = subprocess.run([sys.executable, str(script), str(_free_port()), str(out)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


def test_cpu_mode_replaces_all_reduce_and_all_gather(result) -> None:
    assert result["all_reduce"] == "sglang.srt.enhanced.cpu_mode.collectives"
    assert result["all_gather_into_tensor"] == "sglang.srt.enhanced.cpu_mode.collectives"


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_collectives_of_the_tp_group(result, dtype: str) -> None:
    reduced, gathered, sent = result[dtype]
    base = [[1.0, -2.0, 3.5], [0.25, 8.0, -0.5]]
    assert reduced == [[v * 3 for v in row] for row in base]  # rank 0 sends x, rank 1 sends 2x
    assert gathered == [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]  # concatenated along the last dim
    assert sent == [5.0, 5.0, 5.0]


def test_sglang_own_cpu_path_needs_what_is_not_installed(result) -> None:
    assert "intel_extension_for_pytorch" in result["stock_all_reduce"]
    assert result["stock_all_gather"] is not None


def test_routing_stands_aside_where_ipex_is_installed(monkeypatch) -> None:
    import importlib.util

    from sglang.srt.distributed.parallel_state import GroupCoordinator
    from sglang.srt.enhanced.cpu_mode import collectives

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "intel_extension_for_pytorch" else real_find_spec(name, *a))
    before = GroupCoordinator.all_reduce
    collectives.restore_collectives()
    try:
        assert collectives.route_collectives_to_gloo() is False
        assert GroupCoordinator.all_reduce.__module__ == "sglang.srt.distributed.parallel_state"
    finally:
        monkeypatch.undo()
        collectives.route_collectives_to_gloo()
    assert GroupCoordinator.all_reduce is before
