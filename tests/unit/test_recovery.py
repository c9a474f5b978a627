"""Recovery rules: corruption -> fallback, stale files, pruning, lock, torn metrics, disk full,
allow-listed optimizer state classes, umask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bitblend.errors import BitblendError
from bitblend.optim.lowbit import import_state
from bitblend.report.sinks import JsonlSink, TensorBoardSink, truncate_jsonl
from bitblend.train import checkpoint as ckpt
from bitblend.train.lock import RunLock
from bitblend.train.resume import Checkpointer
from tests.small_disk import SmallDisk, small_disk_fixture  # noqa: F401 (a fixture)

FILES = (ckpt.MODEL_FILE, ckpt.STATE_FILE, ckpt.META_FILE)


class Net(nn.Module):
    """A small model whose weights say which seed made them."""

    def __init__(self, seed: int, width: int = 4) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(width, width)


def save_three(root: Path) -> None:
    """step-1..3 of three different models, each with state {"v": step}."""
    for s in (1, 2, 3):
        ckpt.save_checkpoint(root, s, Net(s), {"v": s, "t": torch.full((3,), float(s))})


def damage(path: Path, how: str) -> None:
    """Damage one checkpoint file the ways disks and crashes do."""
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "zero":
        path.write_bytes(bytes(len(raw)))
    elif how == "flip":  # one bit, deep inside the data (past any header)
        i = len(raw) - 7
        path.write_bytes(raw[:i] + bytes([raw[i] ^ 0x10]) + raw[i + 1 :])
    elif how == "delete":
        path.unlink()


def restore(root: Path) -> tuple[Any, Net, dict[str, Any], list[str]]:
    notes: list[str] = []
    loaded: dict[str, Any] = {}
    model = Net(99)
    got = Checkpointer(root.parent, keep=0, notice=notes.append).restore(model, loaded.update)
    return got, model, loaded, notes


@pytest.mark.parametrize("how", ["truncate", "zero", "flip", "delete"])
@pytest.mark.parametrize("name", FILES)
def test_damaged_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, name: str, how: str
) -> None:
    root = tmp_path / "checkpoints"
    save_three(root)
    damage(root / "step-3" / name, how)
    got, model, loaded, notes = restore(root)
    assert got is not None and got.step == 2
    assert loaded["v"] == 2 and torch.equal(loaded["t"], torch.full((3,), 2.0))
    assert torch.equal(model.lin.weight, Net(2).lin.weight)
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert notes[0].startswith("skipping checkpoint step-3: ")
    assert notes[1] == "resuming from step-2, the newest intact checkpoint"


def test_a_flipped_byte_is_caught_by_the_checksum_alone(tmp_path: Path) -> None:
    """A flip inside tensor data leaves a valid safetensors file: only SHA-256 sees it."""
    root = tmp_path / "checkpoints"
    save_three(root)
    f = root / "step-3" / ckpt.MODEL_FILE
    damage(f, "flip")
    from safetensors.torch import load_file

    load_file(str(f))  # still parses: without the checksum this would resume silently
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"model\.safetensors fails its SHA-256"):
        ckpt.verify_checkpoint(root / "step-3")


def test_a_changed_number_in_state_json_is_caught(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_three(root)
    meta = root / "step-3" / ckpt.META_FILE
    meta.write_text(meta.read_text().replace('"v", 3', '"v", 4').replace('"v",3', '"v",4'))
    assert '"v", 4' in meta.read_text() or '"v",4' in meta.read_text()
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"state\.json fails its SHA-256"):
        ckpt.verify_checkpoint(root / "step-3")


def test_nothing_intact_is_one_line_naming_every_step(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_three(root)
    damage(root / "step-3" / ckpt.STATE_FILE, "flip")
    damage(root / "step-2" / ckpt.MODEL_FILE, "truncate")
    damage(root / "step-1" / ckpt.META_FILE, "delete")
    with pytest.raises(BitblendError) as err:
        restore(root)
    msg = str(err.value)
    assert "\n" not in msg and "no intact checkpoint" in msg
    assert msg.index("step-3:") < msg.index("step-2:") < msg.index("step-1:")


def test_no_checkpoint_at_all_is_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    got, _, loaded, _ = restore(tmp_path / "checkpoints")
    assert got is None and loaded == {}


def test_stale_files_are_cleaned_and_an_interrupted_replacement_restored(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_three(root)
    (root / ".tmp-step-4-abc").mkdir()  # a save killed half way
    (root / ".tmp-step-4-abc" / ckpt.MODEL_FILE).write_bytes(b"x")
    (root / ".del-step-0-xyz" / "step-0").mkdir(parents=True)  # a prune killed half way
    # A re-save of step-3 killed between its two renames: the old one is aside, no step-3.
    (root / ".old-step-3-q").mkdir()
    os.rename(root / "step-3", root / ".old-step-3-q" / "step-3")
    (tmp_path / ".tmp-eval.json-k").write_text("{")  # a write_json killed half way
    got, model, _, notes = restore(root)
    assert got is not None and got.step == 3  # put back, and intact
    assert torch.equal(model.lin.weight, Net(3).lin.weight)
    assert sorted(p.name for p in root.iterdir()) == ["step-1", "step-2", "step-3"]
    assert not (tmp_path / ".tmp-eval.json-k").exists()
    assert any("restored step-3" in n for n in notes)


def test_resaving_a_step_replaces_it_atomically(tmp_path: Path, monkeypatch: Any) -> None:
    """Killed right after the old step-N went aside: cleanup gives back the old one."""
    root = tmp_path / "checkpoints"
    ckpt.save_checkpoint(root, 5, Net(1), {"v": 1})
    real_rename = os.rename
    calls: list[str] = []

    def rename(src: Any, dst: Any) -> None:
        calls.append(Path(src).name)
        if Path(src).name.startswith(".tmp-step-5"):
            raise KeyboardInterrupt  # "killed" between the two renames
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 5, Net(2), {"v": 2})
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    assert calls[0] == "step-5" and not (root / "step-5").exists()
    ckpt.clean_stale(root)
    model = Net(0)
    assert ckpt.load_checkpoint(root / "step-5", model)[1] == {"v": 1}
    assert torch.equal(model.lin.weight, Net(1).lin.weight)


def test_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, Net(0), {})
        from bitblend.train.run_dir import write_json

        write_json(tmp_path / "eval.json", {"a": 1})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    for f in path.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name
    assert (tmp_path / "eval.json").stat().st_mode & 0o777 == 0o644


# -- pruning -------------------------------------------------------------------------------
def test_pruning_keeps_the_last_intact_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_three(root)
    damage(root / "step-3" / ckpt.MODEL_FILE, "zero")
    ckpt.prune_checkpoints(root, keep=1)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [2, 3]


def test_prune_before_save_makes_room_on_a_small_disk(small_disk: SmallDisk) -> None:
    """keep=2 on a disk with room for 2.5 checkpoints: the third save prunes first."""
    root = small_disk.path / "checkpoints"
    small_disk.resize("2600k")  # one checkpoint of Net(_, 512) is ~1.05 MB
    saver = Checkpointer(small_disk.path, keep=2, notice=print)
    for step in (1, 2, 3, 4):
        saver.save(step, Net(step, 512), {"v": step})
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4]
    # Without pruning first, the third save does not fit.
    for p in root.iterdir():
        p.rename(root / p.name.replace("step-", "old-"))
    with pytest.raises(BitblendError, match="no space left on device"):
        for step in (1, 2):
            ckpt.save_checkpoint(root, step, Net(step, 512), {"v": step})


# -- disk full and read-only ---------------------------------------------------------------
def test_disk_full_checkpoint_is_one_line_and_keeps_the_previous(small_disk: SmallDisk) -> None:
    root = small_disk.path / "checkpoints"
    small_disk.resize("1600k")
    ckpt.save_checkpoint(root, 1, Net(1, 512), {"v": 1})
    with pytest.raises(BitblendError) as err:
        ckpt.save_checkpoint(root, 2, Net(2, 512), {"v": 2})
    msg = str(err.value)
    assert "\n" not in msg
    assert "could not write checkpoint step-2: no space left on device (needs about 1.1 MB" in msg
    assert sorted(p.name for p in root.iterdir()) == ["step-1"]  # nothing half-written left
    assert ckpt.verify_checkpoint(root / "step-1") == 1
    small_disk.resize("4m")  # space freed: the same save now works
    ckpt.save_checkpoint(root, 2, Net(2, 512), {"v": 2})
    assert ckpt.verify_checkpoint(root / "step-2") == 2


def test_disk_full_metrics_and_tensorboard_are_one_line(small_disk: SmallDisk) -> None:
    small_disk.resize("64k")
    sink = JsonlSink(small_disk.path / "metrics.jsonl")
    tb = TensorBoardSink(small_disk.path / "tb")
    with pytest.raises(BitblendError, match=r"metrics.jsonl: could not write metrics: no space"):
        for step in range(2000):
            sink.write({"step": step, "loss": 1.0, "note": "x" * 100})
    if not tb.enabled:
        pytest.skip("tensorboard not installed")
    with pytest.raises(BitblendError, match=r"tb: could not write TensorBoard events: no space"):
        for step in range(2000):
            tb.write({"step": step, "loss": 1.0})
        tb.close()


def test_read_only_run_directory_is_one_line(small_disk: SmallDisk) -> None:
    run = small_disk.path / "run"
    run.mkdir()
    small_disk.read_only()
    lock = RunLock(run, "--resume")
    with pytest.raises(BitblendError, match=r"could not write the run's lock file.*read-only"):
        lock.__enter__()
    with pytest.raises(BitblendError, match=r"could not write checkpoint step-1: read-only"):
        ckpt.save_checkpoint(run / "checkpoints", 1, Net(0), {})


# -- metrics.jsonl on resume ---------------------------------------------------------------
def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_truncate_drops_a_torn_last_line_with_a_notice(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "split": "train"} for s in (1, 2, 3)] + [{"step": 2, "split": "eval"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4, "spl')
    notes: list[str] = []
    truncate_jsonl(path, 3, notice=notes.append)
    assert rows(path) == lines
    assert notes == ["metrics.jsonl: dropped line 5, cut short by a crash"]
    truncate_jsonl(path, 2, keep_eval_at_last=False)
    assert rows(path) == lines[:2]


def test_truncate_refuses_a_broken_line_in_the_middle(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(BitblendError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        truncate_jsonl(path, 2)


# -- one writer per run --------------------------------------------------------------------
HOLD = """
import sys, time
from pathlib import Path
from bitblend.train.lock import RunLock
with RunLock(Path(sys.argv[1]), "--out"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_writer_gets_one_line_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(BitblendError) as err, RunLock(run, "--out"):
            pass
        msg = str(err.value)
        assert f"(pid {holder.pid})" in msg and "\n" not in msg
        assert msg.startswith(f"--out {run}: another bitblend train")
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
    with RunLock(run, "--out"):  # released: now it can be taken
        assert (run / ".bitblend.lock").read_text().split()[0] == str(os.getpid())
    assert not run.exists()  # created by the lock, nothing written: removed again


# -- security ------------------------------------------------------------------------------
def test_state_class_outside_the_allow_list_is_refused_unimported(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A state.json naming a module (with valid checksums: a crafted run) imports nothing."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\nclass Thing: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = Net(0)
    opt = torch.optim.AdamW(model.parameters())
    sd = opt.state_dict()
    crafted = {"__torchao_state__": "evil_mod.Thing", "tensors": {}, "ctx": []}
    sd["state"] = {0: {"exp_avg": crafted}}
    root = tmp_path / "run" / "checkpoints"
    ckpt.save_checkpoint(root, 1, model, {"optimizer": sd})
    with pytest.raises(BitblendError) as err:
        Checkpointer(root.parent, 0, print).restore(
            Net(1), lambda st: import_state(opt, st["optimizer"])
        )
    msg = str(err.value)
    assert "step-1: optimizer state class 'evil_mod.Thing' is not one bitblend saves" in msg
    assert not marker.exists() and "evil_mod" not in sys.modules


def test_ctx_dtype_must_be_a_dtype() -> None:
    from bitblend.optim.lowbit import _decode_ctx

    assert _decode_ctx({"dtype": "bfloat16"}) is torch.bfloat16
    with pytest.raises(BitblendError, match="'load' is not a dtype"):
        _decode_ctx({"dtype": "load"})
