"""`bitblend export --format onnx` and the onnxruntime engine (`OnnxRun`).

One ONNX graph per task (RUN_DIR/onnx/<task>.onnx, plus <task>.int8.onnx): tasks of a
multi-task run take different inputs (text ids; or text + image patches + tabular
features through `inputs_embeds`), and `MultiTaskModel.forward` picks the path by the task
name, a Python string a traced graph cannot take as an input. A graph per task keeps each
graph static and its inputs exactly the tensors `collate` builds; the cost is the trunk's
weights stored once per task on disk (runs have few tasks).

Exporter: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`) with dynamic
batch and sequence axes; it handles the HF trunk's masks as traced ops. int8: ONNX
Runtime's `quantize_dynamic` (int8 weights, activations quantised at run time), the same
scheme as torch's `--precision int8`. Graph optimisation: ORT_ENABLE_ALL when a session
opens. Every export is checked against the torch fp32 outputs on the run's eval rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bitblend.config.schema import TaskConfig
from bitblend.data.modalities import POOLED_HEADS, EncodedSplit
from bitblend.data.table import Table
from bitblend.errors import BitblendError
from bitblend.numeric import sigmoid, softmax
from bitblend.runs.transformer import TransformerRun
from bitblend.serve import onnx_fusion

MANIFEST = "export.json"
# Bumped when the graphs an export writes change (2: fused BERT-family graphs): a manifest
# of another version is exported again rather than served as what this version writes.
EXPORTER = 2
OPSET = 17
FP32_TOLERANCE = 1e-2  # max |p_onnx - p_torch| an fp32 export may show
CHECK_ROWS = 64
# Every possible model input in one fixed order (collate's keys, minus labels).
INPUT_ORDER = ("input_ids", "attention_mask", "image", "image_mask", "tabular", "tabular_mask")
SEQ_INPUTS = ("input_ids", "attention_mask")
LABEL_HEADS = ("classification", "binary")  # heads whose eval accuracy the export records


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BitblendError(
            "--engine onnxruntime / export: needs onnxruntime and onnx; "
            "pip install 'bitblend[serve]'"
        ) from None
    return ort


class _TaskGraph(nn.Module):
    """`model(task, **inputs)` with positional tensor inputs, what the exporter traces."""

    def __init__(self, model: nn.Module, task: str, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """(batch, outputs) logits of the task's head."""
        return self.model(self.task, **dict(zip(self.names, inputs, strict=True)))


def _feeds(
    run: TransformerRun, cfg: TaskConfig, table: Table, batch_size: int | None = None
) -> tuple[np.ndarray, list[Any]]:
    """Length-sorted batches of a table as input dicts: (order, [(rows, batch dict), ...])."""
    split = run.encode(cfg, table, np.zeros(len(table), dtype=np.float32))
    return _split_feeds(run, cfg, split, batch_size)


def _split_feeds(
    run: TransformerRun, cfg: TaskConfig, split: EncodedSplit, batch_size: int | None = None
) -> tuple[np.ndarray, list[Any]]:
    """Length-sorted batches of an encoded split as input dicts."""
    spec = run.batch_spec(cfg)
    size = batch_size or spec.batch_size
    order = np.argsort(split.lengths, kind="stable")  # length buckets: little padding
    batches = []
    for s in range(0, len(order), size):
        idx = order[s : s + size]
        batch = spec.collate(split, idx)
        batch.pop("labels", None)
        batches.append((idx, batch))
    return order, batches


def to_probs(head: str, out: np.ndarray) -> np.ndarray:
    """Probabilities of raw outputs (values for regression), to compare engines."""
    if head == "classification":
        return softmax(out, axis=1)
    if head in ("binary", "multilabel"):
        return sigmoid(out)
    return out


def _session(path: Path, *, spin: bool = True) -> Any:
    """An ONNX Runtime CPU session. `spin=False` (serving): the intra-op threads sleep
    between runs instead of busy-waiting for the next one, which on a few cores took the
    CPU from the event loop and the HTTP work between forwards."""
    ort = _import_ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_session(
    sess: Any, run: TransformerRun, cfg: TaskConfig, table: Table, batch_size: int | None = None
) -> np.ndarray:
    split = run.encode(cfg, table, np.zeros(len(table), dtype=np.float32))
    return _run_split(sess, run, cfg, split, batch_size)


def _run_split(
    sess: Any, run: TransformerRun, cfg: TaskConfig, split: EncodedSplit,
    batch_size: int | None = None,
) -> np.ndarray:  # fmt: skip
    names = [i.name for i in sess.get_inputs()]
    out = np.zeros((len(split), run.model.specs[cfg.name].num_outputs), dtype=np.float32)
    _, batches = _split_feeds(run, cfg, split, batch_size)
    for idx, batch in batches:
        feeds = {n: batch[n].cpu().numpy() for n in names if n in batch}
        for i in sess.get_inputs():
            if i.name not in feeds:  # a modality the rows lack: present but fully masked
                feeds[i.name] = _absent(i, len(idx))
        out[idx] = sess.run(None, feeds)[0]
    return out


def _absent(spec: Any, rows: int) -> np.ndarray:
    """Zeros for a graph input the rows do not have (image/tabular and their masks).

    Torch leaves a missing modality's tokens out; the graph has fixed inputs, so they come
    as zeros under an all-zero mask: masked keys get no attention weight and mean pooling
    skips them, so the text tokens' outputs are the same.
    """
    shape = [rows, *(d if isinstance(d, int) else 1 for d in spec.shape[1:])]
    dtype = np.int64 if "int64" in spec.type else np.float32
    return np.zeros(shape, dtype=dtype)


def _export_task(
    run: TransformerRun, cfg: TaskConfig, sample: Table, path: Path, *, fuse: bool = True
) -> tuple[list[str], dict[str, int]]:
    """Trace one task's forward into `path` (BERT-family trunks fused, serve/onnx_fusion.py,
    unless `fuse` is False); returns its input names and the fused ops' counts."""
    _, batches = _feeds(run, cfg, sample)
    batch = batches[0][1]
    names = [n for n in INPUT_ORDER if n in batch]
    axes = {n: ({0: "batch", 1: "seq"} if n in SEQ_INPUTS else {0: "batch"}) for n in names}
    graph = _TaskGraph(run.model, cfg.name, names).eval()
    backbone = run.model.backbone
    fuse = fuse and onnx_fusion.fusable(backbone)
    attention = onnx_fusion.eager_attention(backbone) if fuse else contextlib.nullcontext()
    # The tracer warns about Python bools in the HF mask code (constant for any shape here:
    # the mask always spans the sequence) and about index ops; the export check below is
    # the real test, so keep the console to one line per graph.
    with torch.no_grad(), warnings.catch_warnings(), attention:
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, tuple(batch[n] for n in names), str(path), input_names=names,
            output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
            opset_version=OPSET, dynamo=False,
        )  # fmt: skip
    if not fuse:
        return names, {}
    try:
        return names, onnx_fusion.fuse(path, backbone)
    except Exception as exc:  # any optimizer failure: the plain traced graph serves
        # The optimizer writes `path` only after it has fused, so the traced graph is intact.
        warnings.warn(f"export: ONNX Runtime's fusion failed ({exc}); unfused graph", stacklevel=2)
        return names, {}


def _quantize(src: Path, dst: Path) -> None:
    _import_ort()
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a pre-processing hint on the root
    try:
        # DefaultTensorType: shape inference cannot type the outputs of the fused
        # com.microsoft ops (Attention, SkipLayerNormalization); they are all float.
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
            extra_options={"DefaultTensorType": TensorProto.FLOAT},
        )  # fmt: skip
    finally:
        root.setLevel(level)


def label_accuracy(head: str, out: np.ndarray, targets: np.ndarray) -> float:
    """Accuracy of raw outputs (n, outputs) of a classification or binary head."""
    if head == "binary":
        return float(np.mean((out[:, 0] > 0) == (np.asarray(targets) > 0.5)))
    return float(np.mean(out.argmax(1) == np.asarray(targets)))


def _eval_accuracy(
    run: TransformerRun, cfg: TaskConfig, table: Table, targets: np.ndarray, int8: Path
) -> dict[str, Any]:
    """Accuracy on the whole eval split of torch fp32 and of the int8 graph."""
    head = run.head(cfg.name)
    fp32 = label_accuracy(head, run.outputs(cfg.name, table), targets)
    got = label_accuracy(head, _run_session(_session(int8), run, cfg, table), targets)
    return {"eval_rows": len(table), "fp32_eval_accuracy": fp32, "int8_eval_accuracy": got}


def _check(
    run: TransformerRun, cfg: TaskConfig, sample: Table, ref: np.ndarray, path: Path
) -> dict[str, float]:
    """The graph at `path` against torch's outputs `ref` on `sample`: max probability
    difference and label agreement. Batches of the run's eval size and of 1 row: shapes
    other than the traced one's, so a batch or sequence axis frozen at export shows here."""
    head = run.head(cfg.name)
    sess = _session(path)
    got = _run_session(sess, run, cfg, sample)
    single = _run_session(sess, run, cfg, sample.take(np.arange(min(8, len(sample)))), 1)
    got_single = got[: len(single)]  # same rows, batched differently
    diff_b = float(np.max(np.abs(to_probs(head, single) - to_probs(head, got_single))))
    diff = max(diff_b, float(np.max(np.abs(to_probs(head, got) - to_probs(head, ref)))))
    agree = (
        float(np.mean(got.argmax(1) == ref.argmax(1)))
        if got.shape[1] > 1
        else float(np.mean((got[:, 0] > 0) == (ref[:, 0] > 0)))
    )
    return {"max_prob_diff": diff, "label_agreement": agree}


def export_onnx(
    run: TransformerRun, out_dir: Path, *, int8: bool = False, check_rows: int = CHECK_ROWS
) -> dict[str, Any]:
    """Export every pooled task of an fp32-loaded run to `out_dir`, check each graph against
    torch and write the manifest; returns it (per task: files, inputs, max prob diffs)."""
    _import_ort()
    if run.serving != "fp32":
        raise BitblendError("export: load the run in fp32 (the graph is exported from it)")
    audio = [n for n, spec in run.model.specs.items() if "audio" in spec.modalities]
    if audio:  # the log-mel front end (torch.stft) is not in the exported graphs' inputs
        raise BitblendError(
            f"export: task {audio[0]} has audio input, which the ONNX export does not cover "
            "yet; serve the run with --engine torch"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, Any] = {}
    for cfg in run.tasks:
        head = run.head(cfg.name)
        if head not in POOLED_HEADS:
            continue
        table, targets = run.eval_split(cfg.name)
        sample = table.take(np.arange(min(len(table), check_rows)))
        ref = run.outputs(cfg.name, sample)
        fp32 = out_dir / f"{cfg.name}.onnx"
        names, fused = _export_task(run, cfg, sample, fp32)
        fp32_check = _check(run, cfg, sample, ref, fp32)
        if fused and fp32_check["max_prob_diff"] > FP32_TOLERANCE:
            # The fusion matched a pattern it should not have: the unfused graph instead.
            names, fused = _export_task(run, cfg, sample, fp32, fuse=False)
            fp32_check = _check(run, cfg, sample, ref, fp32)
        if fp32_check["max_prob_diff"] > FP32_TOLERANCE:
            raise BitblendError(
                f"export: task {cfg.name}: the fp32 ONNX graph differs from torch by "
                f"{fp32_check['max_prob_diff']:.3g} in probability (> {FP32_TOLERANCE}); "
                "not written as valid"
            )
        entry: dict[str, Any] = {"head": head, "inputs": names, "fp32": fp32.name,
                                 "fused": fused, "check_rows": len(sample)}  # fmt: skip
        checks = {"fp32": fp32_check}
        if int8:
            path = out_dir / f"{cfg.name}.int8.onnx"
            _quantize(fp32, path)
            entry["int8"] = path.name
            checks["int8"] = _check(run, cfg, sample, ref, path)
            if head in LABEL_HEADS:  # whether int8 may be the default engine (serve/server.py)
                entry |= _eval_accuracy(run, cfg, table, targets, path)
        for kind, check in checks.items():
            entry[f"{kind}_max_prob_diff"] = check["max_prob_diff"]
            entry[f"{kind}_label_agreement"] = check["label_agreement"]
        tasks[cfg.name] = entry
    if not tasks:
        raise BitblendError(
            "export: the run has no classification/binary/multilabel/regression task"
        )
    manifest = {"format": 1, "exporter": EXPORTER, "opset": OPSET, "torch": torch.__version__,
                "model": model_fingerprint(run.run_dir), "tasks": tasks}  # fmt: skip
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def model_fingerprint(run_dir: Path) -> dict[str, list[int]]:
    """Size and mtime of each file of RUN_DIR/model: an export made from other weights (the
    run trained further, or a model copied in) does not match."""
    model = run_dir / "model"
    files = sorted(p for p in model.iterdir() if p.is_file()) if model.is_dir() else []
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def ensure_export(run: TransformerRun, int8: bool) -> dict[str, Any]:
    """RUN_DIR/onnx's manifest, exporting first when it or a needed graph is missing, or
    when it was written by another exporter version or from other weights."""
    out_dir = run.run_dir / "onnx"
    path = out_dir / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        kind = "int8" if int8 else "fp32"
        current = manifest.get("exporter") == EXPORTER and manifest.get(
            "model"
        ) == model_fingerprint(run.run_dir)
        if current and all(
            kind in e and (out_dir / e[kind]).is_file() for e in manifest["tasks"].values()
        ):
            return manifest
    return export_onnx(run, out_dir, int8=int8)


@dataclass
class OnnxRun:
    """A transformer run answered by ONNX Runtime sessions (one per task); tokenising,
    padding and everything but the forward are the torch run's own."""

    base: TransformerRun
    sessions: dict[str, Any]
    int8: bool
    run_dir: Path

    @classmethod
    def open(cls, run: TransformerRun, int8: bool = False) -> OnnxRun:
        """Open (exporting first if needed) RUN_DIR/onnx's graphs of an fp32-loaded run."""
        manifest = ensure_export(run, int8)
        kind = "int8" if int8 else "fp32"
        out_dir = run.run_dir / "onnx"
        sessions = {
            t: _session(out_dir / e[kind], spin=False) for t, e in manifest["tasks"].items()
        }
        return cls(run, sessions, int8, run.run_dir)

    @property
    def tasks(self) -> list[TaskConfig]:
        """The run's tasks."""
        return self.base.tasks

    def task(self, name: str | None) -> tuple[int, TaskConfig]:
        """The task called `name`, or the only task."""
        return self.base.task(name)

    def head(self, task: str) -> str:
        """The head of `task`."""
        return self.base.head(task)

    def label_names(self, task: str) -> list[str]:
        """Class names of `task` in output order."""
        return self.base.label_names(task)

    def eval_split(self, task: str) -> tuple[Table, np.ndarray]:
        """The run's held-out table of `task` and its targets."""
        return self.base.eval_split(task)

    def outputs(self, task: str, table: Table) -> np.ndarray:
        """Logits (n, outputs) from the task's ONNX graph, in the table's order."""
        if task not in self.sessions:
            raise BitblendError(f"task {task}: no ONNX graph (its head is not exported)")
        _, cfg = self.task(task)
        return _run_session(self.sessions[task], self.base, cfg, table)

    def outputs_encoded(self, task: str, split: EncodedSplit) -> np.ndarray:
        """Logits (n, outputs) of rows the base run has already encoded (the server
        tokenises a batch once, for its length buckets and the forward)."""
        if task not in self.sessions:
            raise BitblendError(f"task {task}: no ONNX graph (its head is not exported)")
        _, cfg = self.task(task)
        return _run_split(self.sessions[task], self.base, cfg, split)
