"""torchrun + gloo on CPU: DDP and FSDP2 runs equal the one-process run of the same recipe,
checkpoints resume on another world size, a dead or stalled rank ends the job in bounded time.

Every run here is a real `torchrun -m bitblend train` (or `bitblend train --nproc`) of a
tiny-bert recipe without dropout, so one process and N processes compute the same global
batches; the tolerance is the issue's: weights within 1e-5 relative, losses within 1e-4.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bitblend.models.trunk import load_model
from tests.multiproc.conftest import (
    assert_same_weights,
    env,
    torchrun_cmd,
    train,
    train_losses,
    write_recipe,
)

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

ACCUM = {"train": {"grad_accum": 2}}  # global batch 16 = 8 x 2 micro-batches


@pytest.fixture(scope="module")
def reference(mp_dir: Path) -> Path:
    """The one-process run every distributed run must reproduce (checkpoints at 3 and 6)."""
    recipe = write_recipe(mp_dir / "single.yaml", **ACCUM)
    return train(recipe, mp_dir / "single", None)


@pytest.fixture(scope="module")
def fsdp2_run(mp_dir: Path) -> Path:
    """The same recipe on 2 FSDP2 ranks (raw torchrun), sharded checkpoints at 3 and 6."""
    recipe = write_recipe(mp_dir / "fsdp2.yaml", distributed={"strategy": "fsdp2"}, **ACCUM)
    return train(recipe, mp_dir / "fsdp2", 2)


def _check_equal(run: Path, ref: Path, first_step: int = 0, refitted: tuple[str, ...] = ()) -> None:
    a, b = train_losses(run), train_losses(ref)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a[first_step:], b[first_step:], strict=True)) < 1e-4
    assert_same_weights(run / "model", ref / "model", refitted=refitted)
    if refitted:  # train.head_refit ran in both, chose the same strength, fits as well
        r1, r2 = (json.loads((r / "summary.json").read_text())["head_refit"] for r in (run, ref))
        for t in refitted:
            assert r1[t]["C"] == r2[t]["C"]
            assert r1[t]["train_accuracy_after"] == pytest.approx(r2[t]["train_accuracy_after"])


def test_two_rank_ddp_equals_one_process(reference: Path, tmp_path: Path) -> None:
    """`bitblend train --nproc 2` (auto = ddp): same losses and final weights as 1 process."""
    recipe = write_recipe(tmp_path / "r.yaml", **ACCUM)
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "bitblend", "train", str(recipe), "--nproc", "2",
         "--out", str(out), "--quiet"],
        env=env(), capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_equal(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    dist = summary["distributed"]
    assert dist["strategy"] == "ddp" and dist["world_size"] == 2
    assert len(dist["peak_memory_bytes_per_rank"]) == 2
    assert summary["threads"] == 1  # 2 cores (or fewer in the affinity mask) / 2 local ranks
    assert summary["tokens"] == json.loads((reference / "summary.json").read_text())["tokens"]
    # Rank 0 alone wrote the run: one line per step, no duplicates.
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1


GPT = {"backbone": "tiny-gpt", "max_length": 48, "dropout": 0.0, "head_dropout": 0.0}
TWEETS = {"name": "tweets", "data": "election_tweets", "head": "causal_lm", "max_examples": 192}


@pytest.mark.parametrize("batches", ["homogeneous", "mixed"])
def test_two_rank_ddp_equals_one_process_for_a_causal_lm(batches: str, tmp_path: Path) -> None:
    """Token-level loss on tweets of ragged length (the ranks hold different numbers of
    labelled tokens): each rank divides its token sum by the step's count over all ranks,
    so 2 ranks == 1 process, with grad_accum 2 (no_sync) and in mixed batches."""
    sections: dict[str, Any] = {"model": GPT, "tasks": [TWEETS], **ACCUM}
    if batches == "mixed":
        bbc = {"name": "bbc", "data": "bbc_news", "max_examples": 192}
        sections["tasks"] = [TWEETS, bbc]
        sections["mixing"] = {"strategy": "weights", "weights": {"tweets": 0.7, "bbc": 0.3},
                              "batches": "mixed"}  # fmt: skip
    recipe = write_recipe(tmp_path / "r.yaml", **sections)
    one = train(recipe, tmp_path / "one", None)
    two = train(recipe, tmp_path / "two", 2)
    _check_equal(two, one)


def test_mixed_batches_with_uncertainty_balancing_under_ddp(tmp_path: Path) -> None:
    """Two tasks in every batch, split unevenly over the ranks (down to 0 examples of a
    task on a rank), balanced by learned uncertainty weights: 2 ranks == 1 process."""
    mixing = {"strategy": "weights", "weights": {"bbc": 0.85, "digits": 0.15},
              "batches": "mixed", "balancing": "uncertainty"}  # fmt: skip
    digits = {"name": "digits", "data": "digits", "max_examples": 192, "shortcut": True}
    tasks = [{"name": "bbc", "data": "bbc_news", "max_examples": 192}, digits]
    recipe = write_recipe(tmp_path / "r.yaml", tasks=tasks, mixing=mixing)
    one = train(recipe, tmp_path / "one", None)
    two = train(recipe, tmp_path / "two", 2)
    # An image task with a shortcut: its head and shortcut are refitted, rank 0's sent to all.
    _check_equal(two, one, refitted=("digits",))
    for run in (one, two):  # the learned weights moved, identically
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[5])
        assert last["task_weight"]["bbc"] != 1.0
    w1 = json.loads((one / "metrics.jsonl").read_text().splitlines()[5])["task_weight"]
    w2 = json.loads((two / "metrics.jsonl").read_text().splitlines()[5])["task_weight"]
    assert w1 == pytest.approx(w2, rel=1e-5)


def test_fsdp2_trains_saves_reloads(fsdp2_run: Path, reference: Path) -> None:
    """FSDP2 (fully_shard per block + root) equals 1 process; model/ is a plain directory."""
    _check_equal(fsdp2_run, reference)
    step = fsdp2_run / "checkpoints" / "step-3"
    assert (step / "dcp" / ".metadata").is_file() and (step / "trainer.pt").is_file()
    assert not list((fsdp2_run / "checkpoints").glob(".tmp-*"))
    model, _, meta = load_model(fsdp2_run / "model")  # eval / predict / merge read this
    assert meta["heads"][0]["task"] == "bbc" and sum(p.numel() for p in model.parameters())
    summary = json.loads((fsdp2_run / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    per_rank = summary["distributed"]["model_state_bytes_per_rank"]
    assert summary["distributed"]["strategy"] == "fsdp2"
    # weights + grads + Adam states are sharded: each rank holds about half
    assert max(per_rank) < 0.6 * ref["model_state_bytes"]


def _cut_at_step_3(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    shutil.rmtree(dest / "checkpoints" / "step-6")
    return dest


@pytest.mark.parametrize(
    ("source", "nproc", "strategy"),
    [("single", 2, "ddp"), ("fsdp2", 1, "fsdp2"), ("fsdp2", 4, "fsdp2")],
    ids=["ddp-1to2", "fsdp2-2to1", "fsdp2-2to4"],
)
def test_resume_on_another_world_size(
    source: str, nproc: int, strategy: str, reference: Path, fsdp2_run: Path, tmp_path: Path
) -> None:
    """A checkpoint written by N ranks resumes on M ranks and ends where 1 process ends."""
    run = _cut_at_step_3(reference if source == "single" else fsdp2_run, tmp_path / "run")
    train(run, run, nproc, "--resume", str(run), "--set", f"distributed.strategy={strategy}")
    _check_equal(run, reference, first_step=3)


def test_fsdp2_one_process_checkpoint_resumes_on_two(reference: Path, tmp_path: Path) -> None:
    """fsdp2 in one plain process (a group of one) writes a DCP checkpoint 2 ranks read."""
    recipe = write_recipe(tmp_path / "r.yaml", distributed={"strategy": "fsdp2"}, **ACCUM)
    run = train(recipe, tmp_path / "one", None, "--set", "train.steps=3")
    train(run, run, 2, "--resume", str(run), "--set", "train.steps=6")
    _check_equal(run, reference, first_step=3)


def test_a_dcp_checkpoint_is_refused_by_ddp_in_one_line(fsdp2_run: Path, tmp_path: Path) -> None:
    run = _cut_at_step_3(fsdp2_run, tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, "-m", "bitblend", "train", "--resume", str(run),
         "--set", "distributed.strategy=none"],
        env=env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "distributed.strategy=fsdp2" in err[0], proc.stderr[-2000:]


def _workers(parent: int) -> dict[int, int]:
    """{local rank: pid} of torchrun's worker processes."""
    out = {}
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"LOCAL_RANK="):
                out[int(item.split(b"=")[1])] = pid
    return out


def _start_long_run(tmp_path: Path, timeout_s: float) -> tuple[subprocess.Popen[str], Path]:
    recipe = write_recipe(
        tmp_path / "r.yaml",
        train={"steps": 100000, "checkpoint_every": 0},
        distributed={"timeout_s": timeout_s},
    )
    out = tmp_path / "run"
    cmd = torchrun_cmd(2, "train", str(recipe), "--out", str(out), "--quiet")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never started training"
        time.sleep(0.5)
    return proc, out


def test_a_killed_rank_ends_the_job_nonzero_in_bounded_time(tmp_path: Path) -> None:
    proc, _ = _start_long_run(tmp_path, timeout_s=30)
    try:
        workers = _workers(proc.pid)
        os.kill(workers[1], signal.SIGKILL)
        t0 = time.monotonic()
        output, _ = proc.communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert elapsed < 60, elapsed
    # torchrun's failure summary names the dead worker
    assert "local_rank: 1" in output or "rank: 1" in output, output[-3000:]


def test_a_stalled_rank_makes_the_others_exit_after_the_timeout(tmp_path: Path) -> None:
    """A rank that stops answering (SIGSTOP) is waited for distributed.timeout_s, no more:
    rank 0 then exits 1 with one line naming itself and the timeout."""
    proc, _ = _start_long_run(tmp_path, timeout_s=10)
    workers = _workers(proc.pid)
    try:
        os.kill(workers[1], signal.SIGSTOP)
        t0 = time.monotonic()
        output, _ = proc.communicate(timeout=180)
        elapsed = time.monotonic() - t0
    finally:
        for pid in workers.values():
            try:
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert 8 < elapsed < 150, elapsed
    assert "bitblend: error: rank 0 of 2: a collective failed" in output, output[-3000:]
    assert "distributed.timeout_s (10s)" in output


def test_low_bit_states_under_ddp_train_like_one_process(tmp_path: Path) -> None:
    """8-bit optimizer states (bitsandbytes) on identical replicas: 2 ranks == 1 process."""
    recipe = write_recipe(tmp_path / "r.yaml", precision={"state_bits": 8})
    one = train(recipe, tmp_path / "one", None)
    two = train(recipe, tmp_path / "two", 2)
    _check_equal(two, one)


def test_a_restarted_round_forms_its_group_when_one_rank_is_late(tmp_path: Path) -> None:
    """torchrun keeps one store across restart rounds; the dead round's gloo addresses must
    not reach the new round (deterministic: rank 0 arrives 2 s after rank 1)."""
    script = Path(__file__).with_name("elastic_round.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", str(script)]  # fmt: skip
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert output.count("round 1 ok") == 2, output[-3000:]


def test_torchrun_restart_resumes_from_the_latest_checkpoint(tmp_path: Path) -> None:
    """torchrun --max-restarts: a worker killed after checkpoint step-2 is restarted with
    its peers, and they continue the same run directory from its checkpoint to the end."""
    # A round whose process group cannot form fails within timeout_s, not the default 300 s.
    # 60 s, not 20: once, in a CI run on a 2-core machine shared with two training jobs, a
    # rank aborted (SIGABRT from gloo) mid-run; suspected: a collective waited past 20 s
    # behind its peer's fsynced checkpoint (one every 2 steps). Not reproduced idle.
    recipe = write_recipe(
        tmp_path / "r.yaml",
        train={"steps": 40, "checkpoint_every": 2, "keep_checkpoints": 0},
        distributed={"timeout_s": 60},
    )
    out = tmp_path / "run"
    cmd = torchrun_cmd(2, "train", str(recipe), "--out", str(out), "--quiet")
    # One restart, no spare: the restarted round must form its process group the first
    # time (it once read the dead round's gloo addresses from torchrun's shared store).
    cmd.insert(cmd.index("--standalone"), "--max-restarts=1")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-2" / "state.json").is_file():
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        os.kill(_workers(proc.pid)[1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "resumed" in output
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps if s <= 40]
    assert sorted(set(train_steps)) == list(range(1, 41))
    assert json.loads((out / "summary.json").read_text())["steps"] == 40


def test_fsdp2_bf16_mixed_trains_close_to_one_process(tmp_path: Path) -> None:
    """bf16-mixed under fsdp2 (bf16 all-gather, fp32 reduce, fp32 units for norms and heads)
    follows the 1-process bf16-mixed run to bf16 rounding, and model/ stays fp32."""
    from safetensors.torch import load_file

    recipe = write_recipe(tmp_path / "r.yaml", precision={"recipe": "bf16-mixed"})
    one = train(recipe, tmp_path / "one", None)
    two = train(recipe, tmp_path / "two", 2, "--set", "distributed.strategy=fsdp2")
    a, b = train_losses(one), train_losses(two)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-2
    wa, wb = (
        load_file(str(one / "model/model.safetensors")),
        load_file(str(two / "model/model.safetensors")),
    )
    assert {str(t.dtype) for t in wb.values()} == {"torch.float32"}
    diff = sum(float((wa[k] - wb[k]).norm() ** 2) for k in wa) ** 0.5
    assert diff < 1e-2 * sum(float(wa[k].norm() ** 2) for k in wa) ** 0.5
    summary = json.loads((two / "summary.json").read_text())
    assert summary["precision"]["recipe"] == "bf16-mixed"
    assert summary["distributed"]["strategy"] == "fsdp2"


def test_streamed_task_on_two_ranks_reads_the_one_process_rows(tmp_path: Path) -> None:
    """A streamed causal-LM task (data/streaming.py) under DDP: each rank reads its rows
    r, r+2, ... through a DataLoader worker, and together they train the one-process run's
    rows: the same tokens every step, and the same losses."""
    from tests.streaming_corpus import write_corpus

    data = tmp_path / "shards"
    write_corpus(data)
    task = {"name": "lm", "data": str(data), "head": "causal_lm", "streaming": True,
            "stream_eval_rows": 8, "shuffle_buffer": 16}  # fmt: skip
    recipe = write_recipe(
        tmp_path / "s.yaml", tasks=[task], model={"backbone": "tiny-gpt"},
        train={"grad_accum": 2, "checkpoint_every": 0}, schedule={"name": "constant"},
    )  # fmt: skip
    one, two = train(recipe, tmp_path / "one", None), train(recipe, tmp_path / "two", 2)

    def steps(run: Path) -> list[tuple[int, float]]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["tokens"], r["loss"]) for r in rows if r["split"] == "train"]

    a, b = steps(one), steps(two)
    assert [t for t, _ in a] == [t for t, _ in b] and len(a) == 6
    # Token-level losses: DDP averages the ranks' per-token means (train/step.py), so they
    # match the one-process mean closely, not bit for bit.
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True)) < 1e-3
