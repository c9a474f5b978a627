"""The training loop: setup -> loop -> step. Arithmetic formats live in the precision
object; this file calls its hooks and never names a dtype."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bitblend.config.load import dump_recipe
from bitblend.config.schema import Recipe
from bitblend.data.mixture import Mixture
from bitblend.errors import BitblendError
from bitblend.models.adapters import checkpoint_filter, save_model
from bitblend.models.backbones import count_parameters
from bitblend.optim.build import build_optimizer, build_schedule, param_roles
from bitblend.optim.lowbit import export_state, import_state
from bitblend.precision.recipes import build_precision
from bitblend.report.console import make_progress, metrics_table
from bitblend.report.sinks import JsonlSink, TensorBoardSink, truncate_jsonl
from bitblend.tasks.balancing import Balancer
from bitblend.train import checkpoint as ckpt
from bitblend.train import step as step_fn
from bitblend.train.cpu_heap import tune_cpu_heap
from bitblend.train.evaluate import evaluate_split
from bitblend.train.jacobian import make_aggregator
from bitblend.train.run_dir import write_json
from bitblend.train.setup import build_model, build_tasks, convert_model, load_data, pick_device

log = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this run: CUDA allocator peak on GPU, process peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class Trainer:
    """Trains a recipe into a run directory; `fit()` returns the summary."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        *,
        resume: bool = False,
        console: Console | None = None,
        show_progress: bool = True,
    ) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.resume = resume
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        cfg = recipe.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # Everything that can fail on bad input happens here, before anything is written.
        self.device = pick_device(cfg.device)
        self.cpu_heap = tune_cpu_heap() if cfg.cpu_heap and self.device.type == "cpu" else None
        self.precision = build_precision(recipe.precision, self.device, cfg.seed)
        datas = load_data(recipe)
        self.model, self.tokenizer, self.task_tokenizers = build_model(recipe, datas)
        self.tasks = build_tasks(
            recipe,
            datas,
            self.model,
            self.tokenizer,
            self.task_tokenizers,
            self.precision.forward_context,
            self.device,
        )
        convert_model(self.model, recipe, self.precision)
        # Roles (decay, new) come from the model's own weights, before the precision makes
        # fp32 stand-ins; optimizer_parameters keeps the order of the trainable parameters.
        roles = param_roles(self.model)
        params = self.precision.optimizer_parameters(self.model)
        state_bits = recipe.precision.state_bits
        self.optimizer = build_optimizer(params, recipe.optimizer, roles, state_bits)
        self.model_state_bytes = 0  # measured after the first step (gradients exist then)
        self.scheduler = build_schedule(self.optimizer, cfg.steps, recipe.schedule)
        mix = recipe.mixing
        # Mixed batches call the mixture once per micro-batch: its horizon is in those units.
        horizon = cfg.steps * (cfg.grad_accum if mix.batches == "mixed" else 1)
        self.mixture = Mixture(
            mix, [t.name for t in self.tasks], [len(t.train) for t in self.tasks], cfg.seed, horizon
        )
        self.balancer = Balancer(
            mix.balancing, [t.cfg.weight for t in self.tasks], mix.balancing_lr
        )
        self.aggregator = None
        if mix.balancing in ("upgrad", "pcgrad"):
            self.aggregator = make_aggregator(mix.balancing)
        self.step = 0
        self.skipped = 0
        self.tokens = 0
        self.train_time = 0.0
        self.task_steps = [0] * len(self.tasks)
        self.task_examples = [0] * len(self.tasks)
        # from_pretrained returns eval mode; a Trainer's model trains (dropout on) from here.
        self.model.train()

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that a bit-exact resume needs."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "optimizer": export_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "samplers": [t.sampler.state_dict() for t in self.tasks],
            "mixture": self.mixture.state_dict(),
            "balancer": self.balancer.state_dict(),
            "rng": rng,
            "trainer": {
                "step": self.step,
                "skipped": self.skipped,
                "tokens": self.tokens,
                "train_time": self.train_time,
                "task_steps": self.task_steps,
                "task_examples": self.task_examples,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (weights are loaded separately)."""
        self.precision.load_state_dict(state["precision"])
        import_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for task, s in zip(self.tasks, state["samplers"], strict=True):
            task.sampler.load_state_dict(s)
        self.mixture.load_state_dict(state["mixture"])
        self.balancer.load_state_dict(state["balancer"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        t = state["trainer"]
        self.step, self.skipped, self.tokens = int(t["step"]), int(t["skipped"]), int(t["tokens"])
        self.train_time = float(t["train_time"])
        self.task_steps = [int(x) for x in t["task_steps"]]
        self.task_examples = [int(x) for x in t["task_examples"]]

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint of the current step, pruning old ones."""
        root = self.run_dir / "checkpoints"
        keep = checkpoint_filter(self.model)  # adapter runs: not the frozen base
        path = ckpt.save_checkpoint(root, self.step, self.model, self.state_dict(), keep)
        ckpt.prune_checkpoints(root, self.recipe.train.keep_checkpoints)
        return path

    def restore_latest(self) -> int:
        """Load the newest complete checkpoint of the run directory; returns its step."""
        found = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        if not found:
            raise BitblendError(
                f"--resume {self.run_dir}: no complete checkpoint in {self.run_dir}/checkpoints"
            )
        _, path = found[-1]
        step, state = ckpt.load_checkpoint(path, self.model, checkpoint_filter(self.model))
        self.load_state_dict(state)
        if self.step != step:
            raise BitblendError(f"{path}: step {self.step} in state.json, {step} in its name")
        return step

    # -- one step ----------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step (grad_accum micro-batches); returns its metrics record."""
        cfg = self.recipe.train
        t0 = time.perf_counter()
        famo_before = dict(self.balancer.prev)  # FAMO compares each task's loss across steps
        if self.recipe.mixing.batches == "mixed":
            res = step_fn.mixed(
                self.model, self.precision, self.balancer, self.tasks, self.mixture.allocate,
                self.step, cfg.seed, cfg.batch_size, cfg.grad_accum, self.aggregator,
            )  # fmt: skip
        else:
            task_idx = self.mixture.task_at(self.step)
            res = step_fn.homogeneous(
                self.model, self.precision, self.balancer, self.tasks, task_idx,
                self.step, cfg.seed, cfg.grad_accum,
            )  # fmt: skip
        if self.balancer.method == "famo":
            self.balancer.famo_update(famo_before, res.losses)
        result = self.precision.optimizer_step(self.optimizer, cfg.max_grad_norm)
        if not self.model_state_bytes and result.stepped:
            self.model_state_bytes = self.precision.model_state_bytes(self.model, self.optimizer)
        lr = self.scheduler.get_last_lr()[0]
        if result.stepped:
            self.scheduler.step()  # a skipped step does not advance the schedule
            self.balancer.step()
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        for i, k in res.examples.items():
            self.task_steps[i] += 1
            self.task_examples[i] += k
        self.tokens += res.tokens
        elapsed = time.perf_counter() - t0
        self.train_time += elapsed
        names = [t.name for t in self.tasks]
        record: dict[str, Any] = {
            "step": self.step,
            "split": "train",
            "task": "+".join(names[i] for i in sorted(res.losses)),
            "loss": sum(res.losses[i] * res.examples[i] for i in res.losses)
            / max(1, sum(res.examples.values())),
            "lr": lr,
            "grad_norm": result.grad_norm,
            "loss_scale": result.loss_scale,
            "skipped": not result.stepped,
            "tokens": res.tokens,
            "tokens_per_s": res.tokens / elapsed,
        }
        if len(self.tasks) > 1:
            record["task_loss"] = {names[i]: v for i, v in res.losses.items()}
            record["mix_target"] = dict(zip(names, self.mixture.targets(), strict=True))
            record["mix_realised"] = dict(zip(names, self.mixture.realised(), strict=True))
            record["task_weight"] = dict(zip(names, self.balancer.task_weights(), strict=True))
        record["epochs"] = {t.name: t.sampler.epochs_completed for t in self.tasks}
        if not result.stepped:
            record["nonfinite_module"] = result.nonfinite_module
        self._diagnostics(record)
        return record

    def _diagnostics(self, record: dict[str, Any]) -> None:
        """Dynamic reweighting and gradient-conflict probes, when due (after the step)."""
        mix = self.recipe.mixing
        if mix.strategy == "dynamic" and self.step % mix.dynamic_every == 0:
            held = {
                i: evaluate_split(
                    self.model, t.name, t.eval, t.batch, t.loss, mix.dynamic_examples, self.step
                )["loss"]
                for i, t in enumerate(self.tasks)
            }
            self.mixture.observe(self.step, held)
            record["heldout_loss"] = {self.tasks[i].name: v for i, v in held.items()}
        if mix.grad_cosine_every and len(self.tasks) > 1 and self.step % mix.grad_cosine_every == 0:
            record["grad_cosine"] = step_fn.gradient_cosines(self.model, self.precision, self.tasks)

    # -- eval --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Per-task eval metrics and loss on each task's eval split."""
        limit = self.recipe.train.eval_max_examples
        return {
            t.name: evaluate_split(self.model, t.name, t.eval, t.batch, t.loss, limit)
            for t in self.tasks
        }

    # -- the run -----------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            step = self.restore_latest()
            truncate_jsonl(self.run_dir / "metrics.jsonl", step)
            self.console.print(f"resumed {self.run_dir} at step {step}")
        else:
            (self.run_dir / "recipe.yaml").write_text(dump_recipe(self.recipe))
            labels = {t.name: t.data.label_names for t in self.tasks if t.data.label_names}
            write_json(self.run_dir / "labels.json", labels)

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`, evaluating and checkpointing as the recipe asks."""
        cfg = self.recipe.train
        self._prepare_dir()
        sink = JsonlSink(self.run_dir / "metrics.jsonl")
        tb = TensorBoardSink(self.run_dir / "tb")
        desc = self.precision.describe()
        self.console.print(
            f"[bold]bitblend[/] {self.recipe.name}: {self.recipe.model.backbone} "
            f"({count_parameters(self.model) / 1e6:.1f}M params), precision {desc['recipe']} "
            f"(asked {desc['requested']}), {len(self.tasks)} task(s), {cfg.steps} steps on "
            f"{self.device}"
        )
        wall0 = time.perf_counter()
        evals: dict[str, dict[str, float]] = {}
        last_loss = "-"
        self.model.train()
        with make_progress(self.console, disable=not self.show_progress) as progress:
            bar = progress.add_task(
                "train", total=cfg.steps, completed=self.step, loss="-", tps="-"
            )
            while self.step < cfg.steps:
                record = self.train_step()
                if record["skipped"]:
                    log.warning(
                        "step %d skipped: non-finite gradients, first in %s (loss scale now %s)",
                        record["step"],
                        record.get("nonfinite_module") or "?",
                        record["loss_scale"],
                    )
                if self.step % cfg.log_every == 0 or record["skipped"]:
                    sink.write(record)
                    tb.write(record)
                last_loss = f"{record['loss']:.4f}"
                progress.update(
                    bar,
                    advance=1,
                    loss=last_loss,
                    tps=f"{record['tokens_per_s']:.0f}",
                )
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    evals = self._log_eval(sink, tb)
                if (
                    cfg.checkpoint_every
                    and self.step % cfg.checkpoint_every == 0
                    and self.step < cfg.steps
                ):
                    self.save_checkpoint()
        evals = self._log_eval(sink, tb)
        self.save_checkpoint()
        write_json(self.run_dir / "eval.json", {"step": self.step, "tasks": evals})
        save_model(  # models/adapters.py: model.save, plus adapter/ for LoRA runs
            self.model,
            self.run_dir / "model",
            self.tokenizer,
            self.task_tokenizers,
            extra={"precision": desc["recipe"], "max_length": self.recipe.model.max_length},
            adapter=self.recipe.model.adapter,
        )
        summary = self._summary(evals, time.perf_counter() - wall0)
        summary["mixture"] = self.mixture_summary()
        summary["tokenizers"] = self.tokenizer_report()
        write_json(self.run_dir / "summary.json", summary)
        sink.close()
        tb.close()
        try:  # report.html + plots/; a plotting problem must never fail a finished run
            from bitblend.report.html import write_report

            write_report([self.run_dir])
        except Exception as exc:
            log.warning("report.html not written for %s: %s", self.run_dir, exc)
        self.console.print(metrics_table(f"{self.recipe.name}: eval at step {self.step}", evals))
        self.console.print(
            f"{summary['tokens_per_s']:.0f} tokens/s, peak memory "
            f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB, {self.skipped} skipped step(s), "
            f"wall {summary['wall_time_s']:.0f}s -> {self.run_dir}"
        )
        return summary

    def tokenizer_report(self) -> dict[str, dict[str, float]]:
        """[UNK] rate on each own-vocabulary task's eval text: the backbone's vs its own."""
        from bitblend.data.wordpiece import unk_rate

        out = {}
        for t in self.tasks:
            own = self.task_tokenizers.get(t.name)
            if own is None or t.data.eval.text is None:
                continue
            texts = [str(x) for x in t.data.eval.text[:1000]]
            out[t.name] = {
                "backbone_unk_rate": unk_rate(self.tokenizer, texts),
                "own_unk_rate": unk_rate(own, texts),
                "own_vocab": len(own),
            }
            self.console.print(
                f"{t.name}: [UNK] rate {out[t.name]['backbone_unk_rate']:.1%} with the backbone's "
                f"tokenizer, {out[t.name]['own_unk_rate']:.2%} with its own WordPiece"
            )
        return out

    def mixture_summary(self) -> dict[str, Any]:
        """Target vs realised shares, examples and epochs per task (summary.json)."""
        names = [t.name for t in self.tasks]
        return {
            "strategy": self.recipe.mixing.strategy,
            "batches": self.recipe.mixing.batches,
            "balancing": self.recipe.mixing.balancing,
            "target": dict(zip(names, self.mixture.targets(), strict=True)),
            "realised": dict(zip(names, self.mixture.realised(), strict=True)),
            "examples": dict(zip(names, self.task_examples, strict=True)),
            "epochs": {t.name: t.sampler.epochs_completed for t in self.tasks},
            "synthetic": [t.name for t in self.tasks if t.data.synthetic],
        }

    def _log_eval(self, sink: JsonlSink, tb: TensorBoardSink) -> dict[str, dict[str, float]]:
        evals = self.evaluate()
        for name, metrics in evals.items():
            record = {"step": self.step, "split": "eval", "task": name, **metrics}
            sink.write(record)
            tb.write(record)
        return evals

    def _summary(self, evals: dict[str, dict[str, float]], wall: float) -> dict[str, Any]:
        # Achieved FLOP/s and MFU: model FLOPs of the real tokens processed (from the config,
        # once, here) against this machine's probed peak of the compute dtype (cached under
        # ~/.cache/bitblend; a first run probes for about a second). Never fails the run.
        from bitblend.estimate import run_performance

        examples = sum(self.task_examples)
        lm = sum(k for t, k in zip(self.tasks, self.task_examples, strict=True)
                 if t.cfg.head in ("masked_lm", "causal_lm"))  # fmt: skip
        perf: dict[str, Any] = {"flops_per_s": None, "mfu": None, "peak_flops_per_s": None}
        try:
            perf = run_performance(
                self.model, self.tokens, examples, round(self.tokens * lm / max(examples, 1)),
                self.train_time, self.device, self.precision.describe()["compute_dtype"],
            )  # fmt: skip
        except Exception as exc:  # a cost-model gap must not lose a finished run's summary
            log.warning("achieved FLOP/s not computed: %s", exc)
        return {
            **perf,
            "recipe": self.recipe.name,
            "steps": self.step,
            "skipped_steps": self.skipped,
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.train_time if self.train_time else 0.0,
            "train_time_s": self.train_time,
            "wall_time_s": wall,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            # weights + gradients + masters + Kahan buffers + optimizer states, at rest
            "model_state_bytes": self.model_state_bytes,
            "model_state_bytes_per_param": self.model_state_bytes
            / max(1, count_parameters(self.model)),
            "step_transient_bytes": self.precision.transient_bytes,
            "precision": self.precision.describe(),
            "parameters": count_parameters(self.model),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "cpu_heap": self.cpu_heap,
            "torch": torch.__version__,
            "task_steps": dict(zip([t.name for t in self.tasks], self.task_steps, strict=True)),
            "eval": evals,
        }
