"""The training loop: setup -> loop -> step. Arithmetic formats live in the precision
object; this file calls its hooks and never names a dtype."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bitblend.config.schema import Recipe
from bitblend.data.epochs import resolve_epochs
from bitblend.data.mixture import Mixture
from bitblend.data.stream_loader import data_errors, pop_data_wait
from bitblend.errors import BitblendError
from bitblend.fsutil import crash_point, disk_error, is_disk_error
from bitblend.models.adapters import checkpoint_filter, save_model
from bitblend.models.backbones import count_parameters
from bitblend.models.llama import TOKENIZER_DIR
from bitblend.optim.build import build_optimizer, build_schedule, param_roles
from bitblend.optim.lowbit import export_state, import_state
from bitblend.precision.health import NonFiniteSteps
from bitblend.precision.recipes import build_precision, slow_bf16_warning, with_state_bits
from bitblend.precision.state_bits import resolve_state_bits
from bitblend.report.console import metrics_table
from bitblend.report.progress import ProgressReporter, run_footer
from bitblend.report.sinks import JsonlSink, TensorBoardSink
from bitblend.tasks.balancing import Balancer
from bitblend.taskspec import load_data
from bitblend.train import checkpoint as ckpt
from bitblend.train import distributed
from bitblend.train import step as step_fn
from bitblend.train.baselines import run_baselines
from bitblend.train.compile import compile_blocks, compile_decision
from bitblend.train.cpu_heap import release_free_pages, tune_cpu_heap
from bitblend.train.evaluate import evaluate_split
from bitblend.train.head_refit import run_head_refit
from bitblend.train.jacobian import make_aggregator
from bitblend.train.prepare import prepare_run_dir
from bitblend.train.resume import (
    FINAL_EVAL,
    Checkpointer,
    Restored,
    TrainingStopped,
    resume_hint,
    signal_name,
    stop_requested,
)
from bitblend.train.run_dir import write_json
from bitblend.train.samples import write_samples
from bitblend.train.setup import build_model, build_tasks, convert_model, pick_device
from bitblend.train.summary import (
    mixture_summary,
    peak_memory_bytes,
    run_summary,
    tokenizer_report,
)

log = logging.getLogger(__name__)


def _untimed(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "seconds"}


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
        overrides: list[str] | None = None,
        changed: dict[str, list[Any]] | None = None,
    ) -> None:
        self.recipe = recipe
        # recipe_history.jsonl: the --set overrides of this start/resume and, on resume,
        # {key: [old, new]} for what they changed (config/resume.py allows only safe keys).
        self.overrides = list(overrides or [])
        self.changed = dict(changed or {})
        self.run_dir = run_dir
        self.resume = resume
        self.console = console or Console(stderr=True)
        self.show_progress = show_progress
        cfg = recipe.train
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        # Everything that can fail on bad input happens here, before anything is written.
        self.device = pick_device(cfg.device)
        # precision.state_bits auto: 8 on CUDA, 32 elsewhere; recipe.yaml records the width
        recipe = self.recipe = with_state_bits(recipe, self.device.type)
        # -- distributed hook: torchrun process group, this rank's device, threads per rank
        self.dist = distributed.setup(recipe, self.device)
        self.device = self.dist.device_for(self.device)
        if not self.dist.main:  # rank 0 alone prints
            self.console, self.show_progress = Console(quiet=True), False
        self.cpu_heap = tune_cpu_heap() if cfg.cpu_heap and self.device.type == "cpu" else None
        self.precision = build_precision(recipe.precision, self.device, cfg.seed)
        # Steps skipped in a row for non-finite gradients: a run that cannot recover stops.
        self.nonfinite = NonFiniteSteps(
            self.precision.describe()["recipe"], recipe.precision.stuck_steps
        )
        datas = load_data(recipe)
        self.model, self.tokenizer, self.task_tokenizers = build_model(
            recipe, datas, run_dir / TOKENIZER_DIR if resume else None
        )
        self.tasks = build_tasks(
            recipe,
            datas,
            self.model,
            self.tokenizer,
            self.task_tokenizers,
            self.precision.forward_context,
            self.device,
        )
        # -- epochs hook (data/epochs.py): train.epochs becomes train.steps now that the
        # data sizes are known; recipe.yaml records the steps, and a resume reuses them.
        self.epochs_asked = recipe.train.epochs
        recipe = self.recipe = resolve_epochs(recipe, [len(t.train) for t in self.tasks])
        cfg = recipe.train
        self.compiled, self.compile_reason = compile_decision(
            recipe, self.model.backbone, self.device.type, self.dist.world_size,
            self.precision.name,
        )  # fmt: skip
        convert_model(self.model, recipe, self.precision, self.compiled)
        # Roles (decay, new) come from the model's own weights, before the precision makes
        # fp32 stand-ins; optimizer_parameters keeps the order of the trainable parameters.
        roles = param_roles(self.model, self.model.is_new_parameter)
        # -- distributed hook: each rank takes its slice of every global batch; the step
        # calls `fwd` (DDP around the model, or the model FSDP2 sharded in place).
        for t in self.tasks:
            t.sampler.set_rank(self.dist.rank, self.dist.world_size)
        # -- compile hook (train/compile.py): blocks compiled in place, before DDP / FSDP2
        # wrap them (torchtitan's order), after the precision's conversion.
        if self.compiled:
            compile_blocks(self.model.backbone)
        self.fwd = self.dist.wrap(self.model, self.precision)
        self._datas = datas if self.dist.sharded else None  # to rebuild model/ on rank 0
        params = self.precision.optimizer_parameters(self.model)
        state_bits = resolve_state_bits(recipe.precision.state_bits, self.device.type)
        self.optimizer = build_optimizer(params, recipe.optimizer, roles, state_bits)
        self.model_state_bytes = 0  # measured after the first step (gradients exist then)
        self.rank_state_bytes = 0  # this rank's share of it (FSDP2 shards)
        self._plan(cfg.steps)
        mix = recipe.mixing
        self.balancer = Balancer(
            mix.balancing, [t.cfg.weight for t in self.tasks], mix.balancing_lr
        )
        self.aggregator = None
        if mix.balancing in ("upgrad", "pcgrad"):
            self.aggregator = make_aggregator(mix.balancing)
        self._open_sinks: list[Any] = []
        self.step = 0
        self.skipped = 0
        self.tokens = 0
        self.train_time = 0.0
        self.task_steps = [0] * len(self.tasks)
        self.task_examples = [0] * len(self.tasks)
        # What the end-of-run head refit did per task (train/head_refit.py); in the final
        # checkpoint, so a finished run resumed reports it again.
        self.head_refit: dict[str, Any] | None = None
        # from_pretrained returns eval mode; a Trainer's model trains (dropout on) from here.
        self.model.train()
        self.checkpoints = Checkpointer(run_dir, cfg.keep_checkpoints, self._notice)
        self.restored: Restored | None = None  # set by a resume: the checkpoint it loaded

    def _plan(self, steps: int) -> None:
        """LR schedule and mixture planned over `steps`: the run's horizon. It is fixed when
        the run starts and kept in its checkpoints; `--resume --set train.steps=N` moves
        only where the run stops, so the learning rate continues without a jump."""
        cfg, mix = self.recipe.train, self.recipe.mixing
        self.plan_steps = steps
        self.scheduler = build_schedule(self.optimizer, steps, self.recipe.schedule)
        # Mixed batches call the mixture once per micro-batch: its horizon is in those units.
        horizon = steps * (cfg.grad_accum if mix.batches == "mixed" else 1)
        self.mixture = Mixture(
            mix, [t.name for t in self.tasks], [len(t.train) for t in self.tasks], cfg.seed, horizon
        )

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything besides the weights that a bit-exact resume needs."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rng = self.dist.with_rank_rngs(rng)  # distributed hook: dropout draws differ per rank
        return {
            "optimizer": export_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "precision": self.precision.state_dict(),
            "samplers": [t.sampler.state_dict() for t in self.tasks],
            "mixture": self.mixture.state_dict(),
            "balancer": self.balancer.state_dict(),
            "nonfinite": self.nonfinite.state_dict(),
            "rng": rng,
            "trainer": {
                "step": self.step,
                "skipped": self.skipped,
                "tokens": self.tokens,
                "train_time": self.train_time,
                "task_steps": self.task_steps,
                "task_examples": self.task_examples,
                "plan_steps": self.plan_steps,
                "head_refit": self.head_refit,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (weights are loaded separately)."""
        # The horizon the run was planned with (checkpoints older than plan_steps: the
        # train.steps recipe.yaml held before this resume's --set); rebuilt before the
        # optimizer state is imported, since building a schedule sets the groups' lr.
        before = self.changed.get("train.steps", [self.recipe.train.steps])[0]
        plan = int(state["trainer"].get("plan_steps", before))
        if plan != self.plan_steps:
            self._plan(plan)
        self.precision.load_state_dict(state["precision"])
        if state["optimizer"] is not None:  # None: FSDP2 loaded it sharded (train/dcp.py)
            import_state(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for task, s in zip(self.tasks, state["samplers"], strict=True):
            task.sampler.load_state_dict(s)
        self.mixture.load_state_dict(state["mixture"])
        self.balancer.load_state_dict(state["balancer"])
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        torch.set_rng_state(self.dist.own_rng(state["rng"]))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        t = state["trainer"]
        self.step, self.skipped, self.tokens = int(t["step"]), int(t["skipped"]), int(t["tokens"])
        self.train_time = float(t["train_time"])
        self.task_steps = [int(x) for x in t["task_steps"]]
        self.task_examples = [int(x) for x in t["task_examples"]]
        self.head_refit = t.get("head_refit")

    # -- checkpoints, resume, stopping (recovery rules: train/resume.py) ------------------
    def save_checkpoint(self, final_eval: dict[str, Any] | None = None) -> Path:
        """Atomic, checksummed checkpoint of the current step, pruning old ones.

        The final checkpoint also holds the final evaluation, so resuming a finished run
        (or one killed after its last checkpoint) reuses it instead of logging it twice.
        """
        state = self.state_dict()  # every rank: it gathers the per-rank RNG states
        if final_eval is not None:
            state[FINAL_EVAL] = final_eval
        root = self.run_dir / "checkpoints"
        if self.dist.sharded:  # distributed hook: FSDP2 writes through DCP, every rank
            from bitblend.train import dcp

            path = dcp.save_sharded(self.dist, root, self.step, self.model, self.optimizer, state)
            if self.dist.main:
                ckpt.prune_checkpoints(root, self.recipe.train.keep_checkpoints, self.step)
        else:  # one process or DDP (identical weights on every rank): rank 0 writes
            path = root / f"step-{self.step}"
            if self.dist.main:
                path = self.checkpoints.save(
                    self.step, self.model, state, checkpoint_filter(self.model)
                )
        self.dist.barrier()
        return path

    def restore_latest(self) -> int:
        """Load the newest intact checkpoint (0 when the run has none yet); returns its step."""
        from bitblend.train import dcp  # distributed hook: a DCP checkpoint or a plain one

        found = ckpt.list_checkpoints(self.run_dir / "checkpoints")
        if found:
            dcp.check_format(found[-1][1], self.dist.sharded)
        if self.dist.sharded:
            if not found:
                return 0
            step, state = dcp.load_sharded(found[-1][1], self.model, self.optimizer)
            final_eval = state.pop(FINAL_EVAL, None)
            self.load_state_dict(state)
            self.restored = Restored(step, final_eval)
            return step
        # Rank 0 alone cleans up after a crash; the others wait, then read the same files.
        if not self.dist.main:
            self.dist.barrier()
        self.restored = self.checkpoints.restore(
            self.model,
            self.load_state_dict,
            clean=self.dist.main,
            tensors=checkpoint_filter(self.model),
        )
        if self.dist.main:
            self.dist.barrier()
        return self.restored.step if self.restored else 0

    def _notice(self, message: str) -> None:
        # stderr, one line each: what recovery did (skipped a checkpoint, dropped a torn line)
        print(f"bitblend: {message}", file=sys.stderr, flush=True)

    def _stop_if_asked(self) -> None:
        """On SIGTERM: checkpoint this step (unless saved already), then stop with a hint."""
        signum = stop_requested()
        if signum is None:
            return
        if self.step and self.checkpoints.last_good != self.step:
            self.save_checkpoint()
        saved = f"checkpoint step-{self.step} saved" if self.step else "no step taken yet"
        raise TrainingStopped(
            f"stopped by {signal_name(signum)} at step {self.step} ({saved}); "
            f"resume with: {resume_hint(self.run_dir)}",
            128 + signum,
        )

    # -- one step ----------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """One optimizer step (grad_accum micro-batches); returns its metrics record."""
        cfg = self.recipe.train
        self.model.take_audio_seconds()  # drop eval's front-end time: only the step's counts
        t0 = time.perf_counter()
        famo_before = dict(self.balancer.prev)  # FAMO compares each task's loss across steps
        mixed = self.recipe.mixing.batches == "mixed"
        fwd = self.dist.step_module(self.fwd, self.model, mixed)  # distributed hook
        if mixed:
            res = step_fn.mixed(
                fwd, self.precision, self.balancer, self.tasks, self.mixture.allocate,
                self.step, cfg.seed, cfg.batch_size, cfg.grad_accum, self.aggregator,
                count=self.dist.sum_counts,
            )  # fmt: skip
        else:
            task_idx = self.mixture.task_at(self.step)
            res = step_fn.homogeneous(
                fwd, self.precision, self.balancer, self.tasks, task_idx,
                self.step, cfg.seed, cfg.grad_accum, count=self.dist.sum_counts,
            )  # fmt: skip
        # -- distributed hook: losses, examples and tokens of all ranks; balancers decide
        # from them and average their own gradients, so every rank holds the same weights.
        self.dist.sync_grads(self.model, mixed)
        res = self.dist.reduce_step(res, len(self.tasks))
        self.balancer.prev = self.dist.mean_dict(self.balancer.prev, len(self.tasks))
        self.dist.average_grads([self.balancer.log_vars])
        if self.balancer.method == "famo":
            self.balancer.famo_update(famo_before, res.losses)
        result = self.precision.optimizer_step(self.optimizer, cfg.max_grad_norm)
        if not self.model_state_bytes and result.stepped:
            self.model_state_bytes = self.precision.model_state_bytes(self.model, self.optimizer)
            self.rank_state_bytes = self.dist.local_state_bytes(self.model, self.optimizer)
        lr = self.scheduler.get_last_lr()[0]
        if result.stepped:
            self.scheduler.step()  # a skipped step does not advance the schedule
            self.balancer.step()
        else:
            self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.nonfinite.observe(self.step, result.stepped, result.nonfinite_module)
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
            "step_time_s": elapsed,
            # seconds of this step spent waiting for streamed rows (data/stream_loader.py)
            "data_wait": pop_data_wait([t.sampler for t in self.tasks]),
        }
        audio_s = self.model.take_audio_seconds()
        if audio_s is not None:  # log-mel front end's share of the step (issue #20: < 10%)
            record["audio_feature_s"] = audio_s
            record["audio_feature_frac"] = audio_s / elapsed
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
            held = self.dist.mean_dict(held, len(self.tasks))  # identical on every rank
            self.mixture.observe(self.step, held)
            record["heldout_loss"] = {self.tasks[i].name: v for i, v in held.items()}
        if mix.grad_cosine_every and len(self.tasks) > 1 and self.step % mix.grad_cosine_every == 0:
            record["grad_cosine"] = step_fn.gradient_cosines(self.model, self.precision, self.tasks)

    # -- eval --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, dict[str, float]]:
        """Per-task eval metrics and loss on each task's eval split."""
        limit = self.recipe.train.eval_max_examples
        # CPU: the steps' free pages go back before, the evaluation's after, so the two
        # phases' heap layouts do not stack in RSS (train/cpu_heap.py)
        if self.cpu_heap:
            release_free_pages()
        try:
            return {
                t.name: evaluate_split(self.model, t.name, t.eval, t.batch, t.loss, limit)
                for t in self.tasks
            }
        finally:
            if self.cpu_heap:
                release_free_pages()

    # -- the run -----------------------------------------------------------------------
    def _prepare_dir(self) -> None:
        prepare_run_dir(self)  # train/prepare.py: create, or restore and record a resume

    def fit(self) -> dict[str, Any]:
        """Train to `train.steps`, evaluating and checkpointing as the recipe asks.

        A full or read-only disk anywhere in the run is one line (BitblendError)."""
        try:
            return self._fit()
        except OSError as exc:
            if is_disk_error(exc):
                where = Path(exc.filename) if exc.filename else self.run_dir
                raise disk_error(exc, "run output", where) from None
            raise
        finally:
            for s in self._open_sinks:  # on failure: keep the first error, not a close's
                with contextlib.suppress(OSError, BitblendError):
                    s.close()

    def _fit(self) -> dict[str, Any]:
        cfg = self.recipe.train
        self._prepare_dir()
        main = self.dist.main  # distributed hook: rank 0 alone writes the run directory
        purge = self.step + 1 if self.resume else None  # TensorBoard: each step shows once
        sink: Any = JsonlSink(self.run_dir / "metrics.jsonl") if main else distributed.NullSink()
        tb: Any = (
            TensorBoardSink(self.run_dir / "tb", purge_step=purge)
            if main
            else distributed.NullSink()
        )
        self._open_sinks = [sink, tb]
        desc = self.precision.describe()
        self.console.print(
            f"[bold]bitblend[/] {self.recipe.name}: {self.recipe.model.backbone} "
            f"({count_parameters(self.model) / 1e6:.1f}M params), precision {desc['recipe']} "
            f"(asked {desc['requested']}), {len(self.tasks)} task(s), {cfg.steps} steps on "
            f"{self.device}; torch.compile {self.compile_reason}"
        )
        # here, not at setup: a recipe refused on bad input prints its one-line error alone
        slow = slow_bf16_warning(self.precision.name, self.device)
        if slow and main:
            log.warning(slow)
        wall0 = time.perf_counter()
        evals: dict[str, dict[str, float]] = {}
        self.model.train()
        # -- progress hook (report/progress.py): bar on a terminal, plain lines in logs;
        # it also counts this segment's tokens and seconds for the summary.
        self.progress = ProgressReporter(
            self.console, cfg.steps, self.step, enabled=self.show_progress,
            every=cfg.progress_every, seconds=cfg.progress_seconds,
        )  # fmt: skip
        with self.progress as progress:
            self._stop_if_asked()  # a SIGTERM during setup: stop before the first step
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
                self.nonfinite.check()  # after the step's row is logged: it names the step
                progress.step(record, record["step_time_s"])
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    evals = self._log_eval(sink, tb)
                if (
                    cfg.checkpoint_every
                    and self.step % cfg.checkpoint_every == 0
                    and self.step < cfg.steps
                ):
                    self.save_checkpoint()
                self._stop_if_asked()
        if (
            self.restored
            and self.restored.final_eval is not None
            and (self.step == self.restored.step)
        ):  # a finished run resumed: its final eval and checkpoint exist already
            evals = self.restored.final_eval
        else:
            self._refit_heads()
            evals = self._log_eval(sink, tb)
            self.save_checkpoint(final_eval=evals)
        crash_point("run:after-final-checkpoint")
        self._stop_if_asked()
        # -- distributed hook: model/ from the whole weights (FSDP2 gathers them on rank 0),
        # per-rank peak memory and model state; then rank 0 alone writes the rest.
        plain = self._plain_model()
        ranks = self.dist.gather(
            {"peak_memory_bytes": peak_memory_bytes(self.device),
             "model_state_bytes": self.rank_state_bytes}
        )  # fmt: skip
        if plain is None:
            return {"rank": self.dist.rank, "steps": self.step}
        # Each task's simple scikit-learn model on the same rows (train/baselines.py).
        base = (
            run_baselines(self.tasks, cfg.eval_max_examples, cfg.seed)
            if cfg.baselines == "auto"
            else None
        )
        # eval.json holds results only (a resumed or repeated run writes the same file);
        # the baselines' fitting times go to summary.json beside the wall time.
        extra = {"baselines": {n: _untimed(r) for n, r in base["tasks"].items()}} if base else {}
        write_json(self.run_dir / "eval.json", {"step": self.step, "tasks": evals, **extra})
        save_model(  # models/adapters.py: model.save, plus adapter/ for LoRA runs
            plain,
            self.run_dir / "model",
            self.tokenizer,
            self.task_tokenizers,
            extra={"precision": desc["recipe"], "max_length": self.recipe.model.max_length},
            adapter=self.recipe.model.adapter,
        )
        summary = run_summary(self, evals, time.perf_counter() - wall0)
        if self.progress.start:  # resumed: this process's steps, their tokens and time
            summary["segment"] = self.progress.segment()
        if self.epochs_asked is not None:
            summary["epochs_asked"] = self.epochs_asked
        if base:
            summary["baselines"] = {
                **base,
                "share_of_wall": base["seconds"] / summary["wall_time_s"],
            }
        if self.head_refit:
            summary["head_refit"] = self.head_refit
        summary["mixture"] = mixture_summary(self)
        summary["tokenizers"] = tokenizer_report(self)
        summary["data_errors"] = data_errors(self.tasks)  # rows skipped (data_errors: skip)
        summary["distributed"] = {
            **self.dist.describe(),
            "peak_memory_bytes_per_rank": [r["peak_memory_bytes"] for r in ranks],
            "model_state_bytes_per_rank": [r["model_state_bytes"] for r in ranks],
        }
        write_json(self.run_dir / "summary.json", summary)
        sink.close()
        tb.close()
        try:  # greedy samples of causal_lm tasks (samples.json, for the report)
            write_samples(self.run_dir, self.tasks, self.step)
        except Exception as exc:  # like the report: never fail a finished run
            log.warning("samples.json not written for %s: %s", self.run_dir, exc)
        try:  # report.html + plots/; a plotting problem must never fail a finished run
            from bitblend.report.html import write_report

            write_report([self.run_dir])
        except Exception as exc:
            log.warning("report.html not written for %s: %s", self.run_dir, exc)
        self.console.print(
            metrics_table(
                f"{self.recipe.name}: eval at step {self.step}", evals, extra.get("baselines")
            )
        )
        self.console.print(
            f"{summary['tokens_per_s']:.0f} tokens/s, peak memory "
            f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB, {self.skipped} skipped step(s), "
            f"wall {summary['wall_time_s']:.0f}s -> {self.run_dir}"
        )
        footer = run_footer(summary)  # MFU and its probe, a resumed segment, epochs per task
        if footer:
            self.console.print(footer, markup=False, highlight=False)
        return summary

    def _refit_heads(self) -> None:
        """train.head_refit: refit eligible heads on the final trunk (train/head_refit.py)."""
        self.head_refit = run_head_refit(
            self.model, self.tasks, self.recipe.train, self.dist, self.console
        )

    def _plain_model(self) -> Any:
        """The unwrapped model to save on rank 0 (None elsewhere); FSDP2 gathers a replica."""
        if not self.dist.sharded:
            return self.model if self.dist.main else None
        from bitblend.train import dcp

        def build() -> Any:
            assert self._datas is not None
            model = build_model(self.recipe, self._datas)[0]
            convert_model(model, self.recipe, build_precision(self.recipe.precision, self.device))
            return model

        return dcp.gather_replica(self.dist, self.model, build)

    def _log_eval(self, sink: JsonlSink, tb: TensorBoardSink) -> dict[str, dict[str, float]]:
        evals = self.evaluate()
        for name, metrics in evals.items():
            record = {"step": self.step, "split": "eval", "task": name, **metrics}
            sink.write(record)
            tb.write(record)
        progress = getattr(self, "progress", None)
        if progress is not None:
            progress.evaluated(self.step, evals)
        return evals
