"""The training example (examples/train_gpt.py) on CPU: it trains, mHC through the
custom ops matches mHC through the reference, and DDP and FSDP2 over two gloo
processes match one process with the same global batch."""

import json
import pathlib
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_gpt.py"
TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "32", "--steps", "3",
        "--data-bytes", "200000", "--device", "cpu"]  # fmt: skip


def _run(cmd, tries=1):
    for _ in range(tries):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if res.returncode == 0 or "Signal 6 (SIGABRT)" not in res.stderr:
            break
    assert res.returncode == 0, f"stdout: {res.stdout[-1000:]}\nstderr: {res.stderr[-3000:]}"
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1])


def test_mhc_ops_match_reference_in_training():
    ours = _run([sys.executable, str(EXAMPLE), "--residual", "mhc", "--batch", "2", *TINY])
    ref = _run([sys.executable, str(EXAMPLE), "--residual", "mhc-reference", "--batch", "2", *TINY])
    assert ours["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-6)
    plain = _run([sys.executable, str(EXAMPLE), "--residual", "plain", "--batch", "2", *TINY])
    assert 0 < plain["final_loss"] < 6


def test_compiled_training_matches_eager():
    """--compile: torch.compile traces the custom ops (fullgraph-able) and trains alike."""
    eager = _run([sys.executable, str(EXAMPLE), "--residual", "mhc", "--batch", "2", *TINY])
    compiled = _run(
        [sys.executable, str(EXAMPLE), "--residual", "mhc", "--batch", "2", "--compile", "default",
         *TINY]
    )  # fmt: skip
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-5)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_processes_match_one(mode):
    one = _run([sys.executable, str(EXAMPLE), "--residual", "mhc", "--batch", "4", *TINY])
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    # Two tries: on a loaded 2-core CI machine a gloo rank has once aborted in
    # torch's own code ("terminate called without an active exception"); a second
    # abort, any other failure or a loss mismatch still fails.
    two = _run(
        [*torchrun, str(EXAMPLE), "--residual", "mhc", "--batch", "2", "--dist", mode, *TINY],
        tries=2,
    )
    assert two["world"] == 2
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)
