"""The run: pool → align (optional) → merge → surgery (optional) → evaluate → report. Nothing else."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mergelab.align.base import Alignment
from mergelab.analysis.bias import measure_bias, plot_bias, plot_projection
from mergelab.analysis.geometry import cached_geometry, write_geometry
from mergelab.analysis.geometry import summary as geometry_summary
from mergelab.context import RunContext
from mergelab.errors import ConfigError, MergelabError
from mergelab.eval import report
from mergelab.eval.baselines import baselines
from mergelab.eval.evaluator import evaluate
from mergelab.eval.provenance import provenance
from mergelab.merge.base import AdaptiveMerge, MergeMethod
from mergelab.merge.conditional import TaskConditionalMerge
from mergelab.pool.base import MultiTaskModel
from mergelab.surgery.base import Surgery

log = logging.getLogger(__name__)


def _choice(cfg: DictConfig, group: str) -> str:
    """The name the user chose for a config group (``merge=ties`` → "ties")."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices[group])
    except Exception:  # noqa: BLE001 — outside a Hydra app (tests composing configs)
        return str(cfg[group].get("name", cfg[group].get("_target_", "?")).rsplit(".", 1)[-1])


def _label(cfg: DictConfig, group: str) -> str:
    """The choice plus the user's overrides inside the group, e.g. "ties (k=0.1)", so that
    sweeps over a method's hyperparameters give distinguishable rows."""
    name = _choice(cfg, group)
    try:
        from hydra.core.hydra_config import HydraConfig

        own = [
            o.split(".", 1)[1]
            for o in HydraConfig.get().overrides.task
            if o.startswith(f"{group}.")
        ]
    except Exception:  # noqa: BLE001 — outside a Hydra app
        own = []
    return f"{name} ({', '.join(own)})" if own else name


def _loggers(cfg: DictConfig) -> list:
    out = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        lg = build(lcfg)
        if lg is not None:
            out.append(lg)
        else:
            log.warning("logger %r is unavailable; continuing without it", name)
    return out


@contextmanager
def _finalizing(loggers: list) -> Iterator[None]:
    """Close every logger whatever happens (a failed run is marked failed, e.g. in W&B)."""
    status = "failed"
    try:
        yield
        status = "success"
    finally:
        for lg in loggers:
            try:
                lg.finalize(status)
            except Exception as e:  # noqa: BLE001 — closing a logger must not mask the run's error
                log.warning("could not finalize logger %s: %s", type(lg).__name__, e)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets our own errors through: Hydra wraps exceptions
    raised inside a ``_target_`` in InstantiationException, which would turn a clear
    "file X is missing" into a traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, MergelabError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def run(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run one experiment and return its results dict (also written to ``out_dir``)."""
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    L.seed_everything(int(cfg.seed), verbose=False)
    tasks = list(cfg.tasks.names)
    if not tasks:
        raise ConfigError("tasks.names is empty; expected at least one task")

    # Instantiate every component before any expensive work, so bad names fail fast.
    method = build(cfg.merge)
    if not isinstance(method, (MergeMethod, AdaptiveMerge)):
        raise ConfigError(f"merge config builds {type(method).__name__}, expected a merge method")
    surgery = build(cfg.surgery)
    if not isinstance(surgery, Surgery):
        raise ConfigError(f"surgery config builds {type(surgery).__name__}, expected a Surgery")
    aligner = build(cfg.align) if cfg.get("align") is not None else None
    if aligner is not None and not isinstance(aligner, Alignment):
        raise ConfigError(f"align config builds {type(aligner).__name__}, expected an Alignment")
    loggers = _loggers(cfg)
    with _finalizing(loggers):
        ctx = RunContext(
            out_dir=out_dir,
            trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
            loggers=loggers,
            seed=int(cfg.seed),
            rank=int(cfg.rank),
            eval_batch_size=int(cfg.eval.batch_size),
            num_workers=int(cfg.eval.num_workers),
        )
        # Under DDP every process runs this function; start them all now, so that every pass
        # below runs in lockstep. Rank 0 alone writes files (`writer`).
        engine = ctx.engine
        engine.start()
        writer = engine.is_global_zero

        t = time.time()
        with engine.rank_zero_first():  # a zoo or a converted checkpoint is built once
            pool = build(
                cfg.model,
                tasks=tasks,
                cache_dir=cfg.paths.cache_dir,
                engine=engine,  # the embedded zoo is built on this rank's device alone
                _convert_="all",
            )
        timings["pool_s"] = time.time() - t

        if aligner is not None:  # permute experts (and bases) into one basis before any merge
            t = time.time()
            pool = aligner.align(pool, ctx)
            timings["align_s"] = time.time() - t

        t = time.time()
        if isinstance(method, AdaptiveMerge):
            merged = method.fit(pool, ctx)
        else:
            merged = method.merge(pool.pretrained, pool.experts)
        timings["merge_s"] = time.time() - t
        # A task-conditional merge (TALL masks, EMR) gives an encoder that switches to task t's
        # weights for task t's batches; everything below routes per task through it.
        model = MultiTaskModel(pool.encoder(merged, "merged model"), pool.heads)
        storage = merged.storage() if isinstance(merged, TaskConditionalMerge) else None

        analysis = cfg.get("analysis") or {}
        bias_before = None
        if analysis.get("bias", False):
            t = time.time()
            expert_reprs: dict = {}  # shared by the before/after calls: each expert runs once
            bias_before = measure_bias(model, pool, ctx, int(analysis.max_images), expert_reprs)
            timings["bias_s"] = time.time() - t

        t = time.time()
        model = surgery.apply(model, pool, ctx)
        timings["surgery_s"] = time.time() - t

        bias = None
        if bias_before is not None:
            t = time.time()
            after = (
                bias_before
                if surgery.identity
                else measure_bias(model, pool, ctx, int(analysis.max_images), expert_reprs)
            )
            bias = {"before": bias_before, "after": after}
            if writer:
                plot_bias(
                    bias_before, None if after is bias_before else after, out_dir / "bias.png"
                )
            plot_projection(
                model,
                pool,
                tasks[: int(analysis.projection_tasks)],
                out_dir / "projection.png",
                int(analysis.max_images),
                int(cfg.seed),
                ctx=ctx,
            )
            timings["bias_s"] += time.time() - t

        t = time.time()
        merged_acc = evaluate(model, pool.test_sets, pool.heads, ctx, tasks)
        timings["eval_s"] = time.time() - t

        t = time.time()
        base = baselines(pool, ctx, cfg.paths.cache_dir)
        timings["baselines_s"] = time.time() - t

        geometry = None
        if writer and analysis.get("task_vectors", True):  # the pool's regime: τt norms, cosines
            t = time.time()
            geometry = cached_geometry(pool, cfg.paths.cache_dir)
            write_geometry(geometry, out_dir, f"{pool.family}/{pool.backbone} task vectors")
            timings["geometry_s"] = time.time() - t

        merge_name, surgery_name = _choice(cfg, "merge"), _choice(cfg, "surgery")
        label = _label(cfg, "merge")
        if aligner is not None and aligner.name != "none":
            label = f"{_label(cfg, 'align')} + {label}"
        if surgery_name != "none":
            label += f" + surgery {_label(cfg, 'surgery')}"
            if surgery.rank is not None:
                label += f" (rank {surgery.rank})"
        rows = {
            "pretrained": base["pretrained"],
            "individual experts": base["experts"],
            label: merged_acc,
        }
        for suffix, row in surgery.extra_rows(model).items():  # e.g. online surgery's
            rows[f"{label} [{suffix}]"] = row
        table = report.build_rows(tasks, rows)
        timings["total_s"] = time.time() - t_start
        results: dict[str, Any] = {
            "family": pool.family,
            "backbone": pool.backbone,
            "merge": merge_name,
            "align": aligner.report if aligner is not None else None,
            "surgery": surgery_name,
            "rank": surgery.rank,  # as used (None: the kind has no rank)
            "label": label,
            "tasks": tasks,
            "accuracy": merged_acc,
            "avg": report.average(merged_acc),
            "normalized": report.normalized(merged_acc, base["experts"]),
            "baselines": base,
            "table": table,
            "timings": {k: round(v, 2) for k, v in timings.items()},
            "config": OmegaConf.to_container(cfg, resolve=True),
            "pool_meta": pool.meta,
            "task_vectors": geometry_summary(geometry) if geometry is not None else None,
            "provenance": provenance(ctx),
            "representation_bias": bias,
            "merge_storage": storage,  # task-conditional merges: bytes shared / per task
        }
        if writer:
            report.write_results(out_dir, results)
            report.print_table(f"mergelab · {pool.family}/{pool.backbone} · {label}", tasks, table)
            images = {
                p.stem: p for p in sorted(out_dir.glob("*.png"))
            }  # bias, projection, coefficients
            report.log_to_loggers(loggers, results, results["config"], images)
            log.info("results written to %s", out_dir)
        return results
