"""The embedded benchmark's model zoos: built offline on first use, cached by config hash.

    data (8 tasks, fixed seeds) → pretrain a foundation θ0 CLIP-style (image–caption
    contrastive on the train splits, :mod:`mergelab.zoo.text`) → zero-shot heads from its text
    tower (one prompt per class) → one fully fine-tuned expert per task, head frozen.

One recipe, three regimes (``conf/model/embedded*.yaml``):

- ``embedded`` — local: one foundation, experts fine-tuned with small steps (the CLIP
  benchmark's regime);
- ``embedded-far`` — one foundation, experts that drift far from it (large steps);
- ``embedded-nonlocal`` — several foundations pretrained with different seeds, the tasks'
  experts split among them (the non-local merging paper's setting).

A zoo's regime is measured when it is built — experts, zero-shot, weight averaging, task-vector
norms and cosines — printed, stored in ``regime.json`` and carried into every results.json.

Cache layout (``<cache_dir>/zoo/``): ``foundation-<hash>/`` holds θ0, its text tower and its
zero-shot heads (keyed by backbone, data and pretraining only) and ``experts-<hash>/`` below it
(keyed by the fine-tuning recipe), so zoos that share a foundation or a recipe share files;
``<name>-<hash>/`` holds a zoo's config, build log and regime.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from mergelab.engine import Engine
from mergelab.errors import ConfigError
from mergelab.files import atomic_write
from mergelab.merge.ops import torch_threads
from mergelab.pool.base import ModelPool
from mergelab.pool.heads import ClassificationHead
from mergelab.pool.state import LazyStateDict, save_state_dict
from mergelab.pool.vit import build_openclip_vision
from mergelab.zoo import data as zdata
from mergelab.zoo.train import build_engine

# CLIP's normalisation constants, as for the real benchmark.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def to_tensor(x: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) → normalised float (N, 3, H, W)."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (t - mean) / std


def _log(msg: str) -> None:
    print(f"[mergelab zoo] {msg}", flush=True)


class Foundation:
    """One pretrained θ0 (with its text tower and zero-shot heads) and the experts fine-tuned
    from it, all cached under ``foundation-<hash>/``."""

    def __init__(self, zoo: EmbeddedZoo, seed: int):
        self.zoo = zoo
        self.seed = seed
        key = {
            "vision": zoo.vision,
            "embed_dim": zoo.embed_dim,
            "data": zoo.data_cfg,
            "data_version": zdata.DATA_VERSION,
            "pretrain": zoo.pretrain_cfg,
            "mixture": zoo.mixture,
            "seed": seed,
            "build_threads": zoo.build_threads,
        }
        if zoo.engine.precision != "32-true":  # a mixed-precision build gives another zoo
            key["precision"] = zoo.engine.precision
        self.key = key
        self.dir = zoo.cache / f"foundation-{config_hash(key)}"
        recipe = {
            "finetune": zoo.finetune_cfg,
            "logit_scale": zoo.logit_scale,
            "build_threads": zoo.build_threads,
        }
        self.experts_dir = self.dir / f"experts-{config_hash(recipe)}"
        self.name = f"seed{seed}"

    # ---------------------------------------------------------------- paths
    @property
    def theta0_path(self) -> Path:
        return self.dir / "pretrained.safetensors"

    def head_path(self, task: str) -> Path:
        return self.dir / f"zeroshot_{task}.safetensors"

    def expert_path(self, task: str) -> Path:
        return self.experts_dir / f"expert_{task}.safetensors"

    # ---------------------------------------------------------------- build
    def ensure_pretrained(self) -> bool:
        done = [self.theta0_path, self.dir / "logit_scale.json"]
        if all(p.exists() for p in done + [self.head_path(t) for t in self.zoo.mixture]):
            return False
        from mergelab.zoo.text import CaptionSet, TextTower
        from mergelab.zoo.train import CaptionPretrainer, batch_loader, fit

        z, c = self.zoo, self.zoo.pretrain_cfg
        torch.manual_seed(self.seed)
        enc = z.encoder_factory()
        classes = {t: zdata.TASKS[t].classes for t in z.mixture}
        captions = CaptionSet(z.mixture, classes, c["orientations"])
        text = TextTower(captions.vocab, z.embed_dim, c["text_width"])
        # Which pretraining images have a caption naming their class: a fixed subset, as
        # alt-texts are fixed per image (drawn once from the foundation's seed).
        g = torch.Generator().manual_seed(self.seed)
        xs, task_ids, labels = [], [], []
        for i, t in enumerate(z.mixture):
            x, y = z.splits(t)[:2]
            named = torch.rand(len(y), generator=g) < c["caption_rate"]
            if c["grayscale"]:
                # The foundation's "web" is not the tasks' domain: it sees these images
                # without colour (channels averaged), so colour is learned in fine-tuning.
                x = x.mean(dim=1, keepdim=True).expand_as(x).contiguous()
            xs.append(x)
            task_ids.append(torch.full((len(y),), i, dtype=torch.long))
            labels.append(torch.where(named, y, torch.full_like(y, -1)))
        module = CaptionPretrainer(
            enc,
            text,
            captions,
            c["orientations"],
            lr=c["lr"],
            weight_decay=c["weight_decay"],
            warmup=c["warmup"],
            steps=c["steps"],
        )
        data = (torch.cat(xs), torch.cat(task_ids), torch.cat(labels))
        # exactly build_threads threads, whatever the run's: CPU kernels split reductions by
        # thread count (the far zoo's experts differ by up to 0.022 between 1 and 2 threads)
        with torch_threads(z.build_threads):
            fit(
                module,
                batch_loader(data, c["batch_size"], self.seed),
                c["steps"],
                f"pretraining foundation {self.name} (image–caption, {len(z.mixture)} domains)",
                z.progress,
                z.engine,
            )
        save_state_dict(
            {k: v.detach().clone() for k, v in enc.state_dict().items()}, self.theta0_path
        )
        save_state_dict(text.state_dict(), self.dir / "text.safetensors")
        scale = float(module.logit_scale.detach().exp().clamp(max=100.0))
        atomic_write(self.dir / "logit_scale.json", json.dumps({"logit_scale": scale}))
        from mergelab.zoo.text import caption

        text.eval()
        with torch.no_grad():
            for t in z.mixture:  # zero-shot head: the prompt "<t> upright <class>" per class
                w = text([caption(t, 0, name) for name in classes[t]])
                save_state_dict({"weight": w}, self.head_path(t))
        atomic_write(self.dir / "config.json", json.dumps(self.key, indent=2, sort_keys=True))
        return True

    def ensure_expert(self, task: str) -> bool:
        if self.expert_path(task).exists():
            return False
        from mergelab.zoo.train import FrozenHeadFinetuner, batch_loader, fit

        z, c = self.zoo, self.zoo.finetune_cfg
        torch.manual_seed(self.seed * 1000 + 1 + z.mixture.index(task))
        enc = z.encoder_factory()
        enc.load_state_dict(dict(LazyStateDict(self.theta0_path).items()))
        xtr, ytr = z.splits(task)[:2]
        module = FrozenHeadFinetuner(
            enc,
            self.head(task),
            lr=c["lr"],
            weight_decay=c["weight_decay"],
            warmup=c["warmup"],
            steps=c["steps"],
        )
        with torch_threads(z.build_threads):
            fit(
                module,
                batch_loader((xtr, ytr), c["batch_size"], self.seed * 1000 + z.mixture.index(task)),
                c["steps"],
                f"fine-tuning expert {task!r} from {self.name}",
                z.progress,
                z.engine,
            )
        self.experts_dir.mkdir(parents=True, exist_ok=True)
        save_state_dict(
            {k: v.detach().clone() for k, v in enc.state_dict().items()}, self.expert_path(task)
        )
        return True

    # ---------------------------------------------------------------- load
    @property
    def logit_scale(self) -> float:
        """The heads' scale: the configured one, or (``null``) the temperature this foundation
        learned in pretraining — what CLIP's zero-shot heads use."""
        if self.zoo.logit_scale is not None:
            return self.zoo.logit_scale
        return json.loads((self.dir / "logit_scale.json").read_text())["logit_scale"]

    def head(self, task: str) -> ClassificationHead:
        w = LazyStateDict(self.head_path(task))["weight"]
        return ClassificationHead(self.logit_scale * w)

    def theta0(self) -> LazyStateDict:
        return LazyStateDict(self.theta0_path)

    def expert(self, task: str) -> LazyStateDict:
        return LazyStateDict(self.expert_path(task))


PRETRAIN_KEYS = (
    "steps",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup",
    "caption_rate",
    "orientations",
    "grayscale",
    "text_width",
)
FINETUNE_KEYS = ("steps", "batch_size", "lr", "weight_decay", "warmup")


def _recipe(what: str, cfg: dict, keys: tuple[str, ...]) -> dict:
    """The ``pretrain`` / ``finetune`` recipe, every key present and no unknown one (each is
    part of the zoo's cache key, so a silently ignored or defaulted key would be a lie)."""
    cfg = dict(cfg)
    problems = [f"missing {k}" for k in keys if k not in cfg]
    problems += [f"unknown {k}" for k in cfg if k not in keys]
    if problems:
        raise ConfigError(
            f"embedded zoo {what} recipe: {', '.join(problems)} "
            f"(expected exactly: {', '.join(keys)})"
        )
    return cfg


class EmbeddedZoo:
    """Builds (once) and loads an embedded zoo for a given config.

    ``foundations``: the seeds of the foundations to pretrain; ``None`` → one, ``seed``
    (a local or far zoo). With several, task ``i`` of ``mixture`` is fine-tuned from
    foundation ``i mod len(foundations)`` (a non-local zoo), and merges use the average of the
    foundations as their one reference θ0 (aligned first when an ``align`` method runs).
    ``regime_targets``: the properties the zoo is meant to have, checked and printed (a
    description of the instrument, never a gate).
    ``build_threads``: torch's thread count while the foundations and experts train (kernels
    split reductions by thread count, so it changes the weights; part of the cache key).
    ``engine``: the run's engine; a missing zoo is built and measured on this process's device
    in its precision (the CPU in fp32 without one), and a precision other than fp32 keys
    another zoo.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        name: str,
        vision: dict,
        embed_dim: int,
        data: dict,
        pretrain: dict,
        finetune: dict,
        logit_scale: float | None,
        mixture: list[str],
        seed: int,
        foundations: list[int] | None = None,
        regime_targets: dict | None = None,
        progress: bool = True,
        engine: Engine | None = None,
        build_threads: int = 2,
    ):
        self.name = name
        self.engine = build_engine(engine)
        self.vision = dict(vision)
        self.embed_dim = embed_dim
        self.data_cfg = dict(data)
        self.pretrain_cfg = _recipe("pretrain", pretrain, PRETRAIN_KEYS)
        self.finetune_cfg = _recipe("finetune", finetune, FINETUNE_KEYS)
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        self.mixture = list(mixture)
        self.progress = progress
        if (
            isinstance(build_threads, bool)
            or not isinstance(build_threads, int)
            or build_threads < 1
        ):
            raise ConfigError(
                f"model.build_threads must be a positive integer (torch threads while the zoo "
                f"trains), got {build_threads!r}"
            )
        self.build_threads = build_threads
        self.regime_targets = dict(regime_targets) if regime_targets else None
        unknown = [t for t in self.mixture if t not in zdata.TASKS]
        if unknown:
            raise ConfigError(
                f"unknown embedded task {unknown[0]!r} in the pretraining mixture; valid: {', '.join(zdata.TASKS)}"
            )
        seeds = [int(seed)] if foundations is None else [int(s) for s in foundations]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError(f"foundations must be distinct seeds, got {foundations}")
        self.cache = Path(cache_dir).expanduser() / "zoo"
        self.foundations = [Foundation(self, s) for s in seeds]
        self.key = {
            "foundations": [f.key for f in self.foundations],
            "finetune": self.finetune_cfg,
            "logit_scale": self.logit_scale,
        }
        self.root = self.cache / f"{name}-{config_hash(self.key)}"
        self._splits: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    @property
    def nonlocal_(self) -> bool:
        return len(self.foundations) > 1

    def foundation_of(self, task: str) -> Foundation:
        if task not in self.mixture:
            raise ConfigError(
                f"task {task!r} is not in the zoo's pretraining mixture {self.mixture}"
            )
        return self.foundations[self.mixture.index(task) % len(self.foundations)]

    # ------------------------------------------------------------------ pieces
    def encoder_factory(self):
        return build_openclip_vision(self.embed_dim, **self.vision)

    def splits(self, task: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_train, y_train, x_test, y_test) as normalised tensors; cached as npz."""
        if task not in self._splits:
            d = self.data_cfg
            path = (
                self.cache.parent
                / "data"
                / config_hash({"task": task, "version": zdata.DATA_VERSION, **d})
                / f"{task}.npz"
            )
            if path.exists():
                z = np.load(path)
                arrs = [z[k] for k in ("x_train", "y_train", "x_test", "y_test")]
            else:
                arrs = list(
                    zdata.build_task(task, d["image_size"], d["n_train"], d["n_test"], d["seed"])
                )
                atomic_write(
                    path,
                    lambda f: np.savez_compressed(
                        f, x_train=arrs[0], y_train=arrs[1], x_test=arrs[2], y_test=arrs[3]
                    ),
                )
            xtr, ytr, xte, yte = arrs
            self._splits[task] = (
                to_tensor(xtr),
                torch.from_numpy(ytr).long(),
                to_tensor(xte),
                torch.from_numpy(yte).long(),
            )
        return self._splits[task]

    # ------------------------------------------------------------------ build / load
    def ensure(self, tasks: list[str]) -> None:
        """Build whatever of the foundations, heads and requested experts is not cached."""
        t_start = time.time()
        built = False
        for f in {id(self.foundation_of(t)): self.foundation_of(t) for t in tasks}.values():
            built |= f.ensure_pretrained()
        for task in tasks:
            built |= self.foundation_of(task).ensure_expert(task)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / "config.json", json.dumps(self.key, indent=2, sort_keys=True))
        if built:
            secs = time.time() - t_start
            log = self.root / "build_log.json"
            prev = json.loads(log.read_text()) if log.exists() else []
            prev.append({"tasks": tasks, "seconds": round(secs, 1)})
            atomic_write(log, json.dumps(prev, indent=2))
            _log(f"built in {secs:.0f}s → {self.root}")

    def pool(self, tasks: list[str]) -> ModelPool:
        self.ensure(tasks)
        bases = {f.name: f.theta0() for f in self.foundations}
        if self.nonlocal_:
            # The one reference θ0 merges use: the average of the foundations (the non-local
            # paper aligns the bases, then averages them; `align=` re-does this after aligning).
            pretrained: Any = _average(list(bases.values()))
        else:
            pretrained = bases[self.foundations[0].name]
        pool = ModelPool(
            family="embedded",
            backbone=self.name,
            tasks=list(tasks),
            encoder_factory=self.encoder_factory,
            pretrained=pretrained,
            experts={t: self.foundation_of(t).expert(t) for t in tasks},
            heads={t: self.foundation_of(t).head(t) for t in tasks},
            test_sets={t: TensorDataset(self.splits(t)[2], self.splits(t)[3]) for t in tasks},
            meta={"zoo_dir": str(self.root), "zoo_config": self.key},
            bases=bases if self.nonlocal_ else {},
            expert_base={t: self.foundation_of(t).name for t in tasks} if self.nonlocal_ else {},
        )
        pool.meta["regime"] = self.regime(pool)
        return pool

    def regime(self, pool: ModelPool) -> dict:
        """The zoo's regime properties on ``pool.tasks``, measured once and cached."""
        from mergelab.zoo.regime import measure_regime, print_regime

        path = self.root / "regime.json"
        saved = json.loads(path.read_text()) if path.exists() else {}
        key = ",".join(pool.tasks)
        if key not in saved:
            saved[key] = measure_regime(pool, self.cache.parent, self.regime_targets, self.engine)
            atomic_write(path, json.dumps(saved, indent=2))
            print_regime(self.name, saved[key])
        return saved[key]


def _average(states: list) -> dict[str, Tensor]:
    out = {}
    for k in states[0].keys():
        vals = [s[k] for s in states]
        out[k] = (
            torch.stack([v.float() for v in vals]).mean(0).to(vals[0].dtype)
            if vals[0].is_floating_point()
            else vals[0]
        )
    return out


def embedded_pool(
    tasks: list[str], cache_dir: str, engine: Engine | None = None, **cfg: Any
) -> ModelPool:
    """Hydra entry point (``model=embedded*``): the embedded benchmark's pool for ``tasks``,
    built (if not cached) through ``engine`` on this process (CPU fp32 without one)."""
    unknown = [t for t in tasks if t not in zdata.TASKS]
    if unknown:
        raise ConfigError(
            f"task {unknown[0]!r} is not part of the embedded benchmark; valid tasks: {', '.join(zdata.TASKS)}"
        )
    cfg = dict(cfg)
    cfg.pop("family", None)
    return EmbeddedZoo(cache_dir=cache_dir, engine=engine, **cfg).pool(list(tasks))
