"""The embedded benchmark's model zoo: built offline on first use, cached by config hash.

    data (8 tasks, fixed seeds) → pretrain θ0 on the generic mixture (train splits, pretext
    labels only) → zero-shot-style heads (class prototypes of θ0's features, like CLIP text
    prototypes) → one fully fine-tuned expert per task with its head frozen.

Everything lands in ``<cache_dir>/zoo/<hash>/`` as safetensors + json; experts are returned
as lazy state dicts so merges stream over parameters.
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

from mergelab.errors import ConfigError
from mergelab.pool.base import ModelPool
from mergelab.pool.heads import ClassificationHead
from mergelab.pool.state import LazyStateDict, save_state_dict
from mergelab.pool.vit import build_openclip_vision
from mergelab.zoo import data as zdata

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


class EmbeddedZoo:
    """Builds (once) and loads the embedded benchmark for a given config."""

    def __init__(
        self,
        cache_dir: str | Path,
        name: str,
        vision: dict,
        embed_dim: int,
        data: dict,
        pretrain: dict,
        finetune: dict,
        logit_scale: float,
        mixture: list[str],
        seed: int,
        progress: bool = True,
    ):
        self.name = name
        self.vision = dict(vision)
        self.embed_dim = embed_dim
        self.data_cfg = dict(data)
        self.pretrain_cfg = dict(pretrain)
        self.finetune_cfg = dict(finetune)
        self.logit_scale = logit_scale
        self.mixture = list(mixture)
        self.seed = seed
        self.progress = progress
        unknown = [t for t in self.mixture if t not in zdata.TASKS]
        if unknown:
            raise ConfigError(
                f"unknown embedded task {unknown[0]!r} in the pretraining mixture; valid: {', '.join(zdata.TASKS)}"
            )
        # θ0 depends only on the backbone, data and pretraining; heads and experts also on the
        # fine-tuning recipe. Two cache levels, so changing the recipe never re-pretrains.
        base_key = {
            "vision": self.vision,
            "embed_dim": embed_dim,
            "data": self.data_cfg,
            "data_version": zdata.DATA_VERSION,
            "pretrain": self.pretrain_cfg,
            "mixture": self.mixture,
            "seed": seed,
        }
        expert_key = {"finetune": self.finetune_cfg, "logit_scale": logit_scale}
        self.key = {**base_key, **expert_key}
        self.base = Path(cache_dir).expanduser() / "zoo" / config_hash(base_key)
        self.root = self.base / f"experts-{config_hash(expert_key)}"
        self._splits: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ pieces
    def encoder_factory(self):
        return build_openclip_vision(self.embed_dim, **self.vision)

    def splits(self, task: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x_train, y_train, x_test, y_test) as normalised tensors; cached as npz."""
        if task not in self._splits:
            d = self.data_cfg
            path = (
                self.base.parent.parent
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
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npz")
                np.savez_compressed(
                    tmp, x_train=arrs[0], y_train=arrs[1], x_test=arrs[2], y_test=arrs[3]
                )
                tmp.replace(path)
            xtr, ytr, xte, yte = arrs
            self._splits[task] = (
                to_tensor(xtr),
                torch.from_numpy(ytr).long(),
                to_tensor(xte),
                torch.from_numpy(yte).long(),
            )
        return self._splits[task]

    def _pretrain(self) -> dict[str, Tensor]:
        from mergelab.zoo.train import PretextPretrainer, batch_loader, fit

        c = self.pretrain_cfg
        torch.manual_seed(self.seed)
        enc = self.encoder_factory()
        xs, ds = [], []
        for i, t in enumerate(self.mixture):
            x = self.splits(t)[0]
            xs.append(x)
            ds.append(torch.full((len(x),), i, dtype=torch.long))
        module = PretextPretrainer(
            enc,
            self.embed_dim,
            len(self.mixture),
            lr=c["lr"],
            weight_decay=c["weight_decay"],
            warmup=c["warmup"],
            steps=c["steps"],
        )
        loader = batch_loader((torch.cat(xs), torch.cat(ds)), c["batch_size"], self.seed)
        fit(
            module,
            loader,
            c["steps"],
            f"pretraining θ0 on the {len(self.mixture)}-domain mixture (train splits)",
            self.progress,
        )
        return {k: v.detach().clone() for k, v in enc.state_dict().items()}

    @torch.no_grad()
    def _head(self, task: str, theta0: dict[str, Tensor]) -> ClassificationHead:
        """Zero-shot-style head: normalised class means of θ0's normalised train features,
        scaled by the logit scale — the analogue of CLIP's text-prototype heads."""
        enc = self.encoder_factory()
        enc.load_state_dict(theta0)
        enc.eval()
        xtr, ytr, _, _ = self.splits(task)
        feats = torch.cat([enc(xtr[i : i + 512]) for i in range(0, len(xtr), 512)])
        feats = feats / feats.norm(dim=-1, keepdim=True)
        n_cls = len(zdata.TASKS[task].classes)
        protos = torch.stack([feats[ytr == c].mean(0) for c in range(n_cls)])
        protos = protos / protos.norm(dim=-1, keepdim=True)
        return ClassificationHead(self.logit_scale * protos)

    def _finetune(
        self, task: str, theta0: dict[str, Tensor], head: ClassificationHead
    ) -> dict[str, Tensor]:
        from mergelab.zoo.train import FrozenHeadFinetuner, batch_loader, fit

        c = self.finetune_cfg
        torch.manual_seed(
            self.seed + 1 + self.mixture.index(task) if task in self.mixture else self.seed + 1
        )
        enc = self.encoder_factory()
        enc.load_state_dict(theta0)
        xtr, ytr, _, _ = self.splits(task)
        module = FrozenHeadFinetuner(
            enc,
            head,
            lr=c["lr"],
            weight_decay=c["weight_decay"],
            warmup=c["warmup"],
            steps=c["steps"],
        )
        fit(
            module,
            batch_loader((xtr, ytr), c["batch_size"], self.seed),
            c["steps"],
            f"fine-tuning expert {task!r}",
            self.progress,
        )
        return {k: v.detach().clone() for k, v in enc.state_dict().items()}

    # ------------------------------------------------------------------ build / load
    def ensure(self, tasks: list[str]) -> None:
        """Build whatever of θ0, heads and the requested experts is not cached yet."""
        t_start = time.time()
        built = False
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "config.json").write_text(json.dumps(self.key, indent=2, sort_keys=True))
        p0 = self.base / "pretrained.safetensors"
        if not p0.exists():
            save_state_dict(self._pretrain(), p0)
            built = True
        theta0 = None
        for task in tasks:
            ph, pe = (
                self.root / f"head_{task}.safetensors",
                self.root / f"expert_{task}.safetensors",
            )
            if ph.exists() and pe.exists():
                continue
            theta0 = theta0 or dict(LazyStateDict(p0).items())
            if not ph.exists():
                head = self._head(task, theta0)
                save_state_dict({"weight": head.weight}, ph)
            head = self.load_head(task)
            save_state_dict(self._finetune(task, theta0, head), pe)
            built = True
        if built:
            secs = time.time() - t_start
            log = self.root / "build_log.json"
            prev = json.loads(log.read_text()) if log.exists() else []
            prev.append({"tasks": tasks, "seconds": round(secs, 1)})
            log.write_text(json.dumps(prev, indent=2))
            print(f"[mergelab zoo] built in {secs:.0f}s → {self.root}", flush=True)

    def load_head(self, task: str) -> ClassificationHead:
        w = LazyStateDict(self.root / f"head_{task}.safetensors")["weight"]
        return ClassificationHead(w)

    def pool(self, tasks: list[str]) -> ModelPool:
        self.ensure(tasks)
        return ModelPool(
            family="embedded",
            backbone=self.name,
            tasks=list(tasks),
            encoder_factory=self.encoder_factory,
            pretrained=LazyStateDict(self.base / "pretrained.safetensors"),
            experts={t: LazyStateDict(self.root / f"expert_{t}.safetensors") for t in tasks},
            heads={t: self.load_head(t) for t in tasks},
            test_sets={t: TensorDataset(self.splits(t)[2], self.splits(t)[3]) for t in tasks},
            meta={"zoo_dir": str(self.root), "zoo_config": self.key},
        )


def embedded_pool(tasks: list[str], cache_dir: str, **cfg: Any) -> ModelPool:
    """Hydra entry point (``model=embedded``): the embedded benchmark's pool for ``tasks``."""
    unknown = [t for t in tasks if t not in zdata.TASKS]
    if unknown:
        raise ConfigError(
            f"task {unknown[0]!r} is not part of the embedded benchmark; valid tasks: {', '.join(zdata.TASKS)}"
        )
    cfg = dict(cfg)
    cfg.pop("family", None)
    return EmbeddedZoo(cache_dir=cache_dir, **cfg).pool(list(tasks))
