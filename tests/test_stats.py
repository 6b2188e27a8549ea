"""Statistics surgery (Non-local merging / TACT, arXiv 2410.12766): after the correction, the
merged model's per-channel moments at every corrected site equal the expert's on the data
they were measured on, per task, on any discoverable backbone."""

from __future__ import annotations

import copy
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from mergelab.context import RunContext
from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.surgery.blocks import block_tensor
from mergelab.surgery.stats import (
    SITE_PATHS,
    StatsSurgery,
    StatsSurgeryModel,
    _replayable,
    discover_sites,
    unlabeled_loader,
)
from mergelab.zoo.synthetic import synthetic_pool

ALL_SITES = ["attn", "ln2", "mlp_hidden", "block"]
CONF = Path(__file__).resolve().parents[1] / "mergelab" / "conf" / "surgery" / "stats.yaml"

# two open_clip backbones of different depth and width
SMALL = dict(width=32, layers=2, heads=2, patch_size=8)
OTHER = dict(width=48, layers=3, heads=3, patch_size=4)


def _pool(backbone: dict, n_tasks: int = 2, n_images: int = 14) -> ModelPool:
    # expert_noise large enough that the weight average is visibly biased
    return synthetic_pool(
        n_tasks=n_tasks, image_size=16, n_images=n_images, expert_noise=0.2, **backbone
    )


def _average(pool: ModelPool) -> dict[str, torch.Tensor]:
    return {
        k: torch.stack([pool.experts[t][k] for t in pool.tasks]).mean(0) for k in pool.pretrained
    }


def _merged(pool: ModelPool) -> MultiTaskModel:
    return MultiTaskModel(pool.encoder(_average(pool)), pool.heads)


def _site_moments(
    encoder: nn.Module, names: list[str], run
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (mean, population std) over all tokens and images at each named module,
    seen by a hook registered now (so after any persistent surgery hook)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        encoder.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen.__setitem__(n, block_tensor(o).detach().double())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    out = []
    for n in names:
        x = seen[n].reshape(-1, seen[n].shape[-1])
        out.append((x.mean(0), x.std(0, unbiased=False)))
    return out


def _images(pool: ModelPool, task: str, num_samples: int | None, seed: int) -> torch.Tensor:
    return torch.cat(list(unlabeled_loader(pool.test_sets[task], num_samples, 1000, seed)))


@pytest.mark.parametrize(
    "backbone,sites,num_samples",
    [(SMALL, ["block"], None), (SMALL, ALL_SITES, 12), (OTHER, ALL_SITES, None)],
    ids=["small-block", "small-all-subset", "other-all"],
)
def test_corrected_moments_equal_expert_moments(tmp_path, backbone, sites, num_samples):
    pool = _pool(backbone)
    merged = _merged(pool)
    ctx = RunContext(out_dir=tmp_path, seed=3)
    # odd batch size: moments must be accumulated across uneven batches
    surgery = StatsSurgery(sites=sites, num_samples=num_samples, batch_size=7, eps=1e-12)
    out = surgery.apply(merged, pool, ctx)

    assert isinstance(out, StatsSurgeryModel)
    assert len(out.sites) == backbone["layers"] * len(sites)  # depth read from the model
    names = [s.name for s in out.sites]
    for task in pool.tasks:
        x = _images(pool, task, num_samples, ctx.seed)
        got = _site_moments(out.encoder, names, partial(out.features, x, task))
        expert = pool.expert_encoder(task)
        want = _site_moments(expert, names, partial(expert, x))
        before = _site_moments(merged.encoder, names, partial(merged.encoder, x))
        gap = max((b[1] - w[1]).abs().max().item() for b, w in zip(before, want))
        assert gap > 1e-2, "the merged model should start with different moments"
        for name, (gm, gs), (wm, ws) in zip(names, got, want):
            assert torch.allclose(gm, wm, atol=1e-4, rtol=1e-4), f"{task} {name}: mean"
            assert torch.allclose(gs, ws, atol=1e-4, rtol=1e-4), f"{task} {name}: std"


def test_site_channels_follow_the_model():
    pool = _pool(OTHER)
    out = StatsSurgery(sites=ALL_SITES, num_samples=4, batch_size=4, save_stats=False).apply(
        _merged(pool), pool, RunContext(out_dir=Path("unused"))
    )
    width = OTHER["width"]
    expected = {"attn": width, "ln2": width, "mlp_hidden": 4 * width, "block": width}
    assert [s.kind for s in out.sites] == ALL_SITES * OTHER["layers"]  # forward order
    for site, corr in zip(out.sites, out.corrections):
        assert corr.mu_expert.shape == (len(pool.tasks), expected[site.kind])


def test_merged_equal_to_expert_is_left_unchanged(tmp_path):
    # known answer: when the "merged" model IS the expert, every correction is the identity
    pool = _pool(SMALL, n_tasks=1)
    task = pool.tasks[0]
    model = MultiTaskModel(pool.expert_encoder(task), pool.heads)
    out = StatsSurgery(sites=ALL_SITES, num_samples=None, batch_size=8, eps=1e-12).apply(
        model, pool, RunContext(out_dir=tmp_path)
    )
    x = _images(pool, task, None, 0)
    with torch.no_grad():
        assert torch.allclose(out.features(x, task), pool.expert_encoder(task)(x), atol=1e-4)


def test_routing_is_per_task_and_input_model_is_untouched(tmp_path):
    pool = _pool(SMALL, n_tasks=2)
    merged = _merged(pool)
    x = _images(pool, "task0", 6, 0)
    with torch.no_grad():
        plain = merged.encoder(x).clone()
    out = StatsSurgery(num_samples=None, batch_size=8).apply(
        merged, pool, RunContext(out_dir=tmp_path)
    )
    with torch.no_grad():
        f0, f1 = out.features(x, "task0"), out.features(x, "task1")
        assert not torch.allclose(f0, f1, atol=1e-3)  # each task gets its own statistics
        # the input model shares the encoder but is unchanged: hooks act only when routed
        assert torch.allclose(merged.encoder(x), plain)
        assert torch.equal(out(x, "task1"), out.heads["task1"](f1))
        # a deep copy carries working hooks bound to the copy
        twin = copy.deepcopy(out)
        assert torch.allclose(twin.features(x, "task0"), f0)
        twin.corrections[-1].mu_expert.add_(1.0)
        assert torch.allclose(out.features(x, "task0"), f0)
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        out.features(x, "nope")


def test_correction_formula_known_answer():
    pool = _pool(SMALL, n_tasks=1)
    enc = pool.pretrained_encoder()
    sites = discover_sites(enc, ["block"])
    model = StatsSurgeryModel(enc, pool.heads, sites, [SMALL["width"]] * len(sites), eps=1e-5)
    last = len(sites) - 1
    c = SMALL["width"]
    model.set_stats(
        "task0",
        last,
        mu_merged=torch.full((c,), 1.0),
        sigma_merged=torch.full((c,), 2.0),
        mu_expert=torch.full((c,), 3.0),
        sigma_expert=torch.full((c,), 4.0),
    )
    x = _images(pool, "task0", 3, 0)
    name = sites[last].name
    ((mean, std),) = _site_moments(enc, [name], lambda: enc(x))  # no task routed: untouched
    ((got_mean, got_std),) = _site_moments(enc, [name], lambda: model.features(x, "task0"))
    # (x − 1) / 2 · 4 + 3 = 2x + 1 elementwise, so mean → 2·mean + 1 and std → 2·std
    assert torch.allclose(got_mean, 2 * mean + 1, atol=1e-4)
    assert torch.allclose(got_std, 2 * std, atol=1e-4)


def test_statistics_are_saved(tmp_path):
    from safetensors import safe_open

    pool = _pool(SMALL)
    out = StatsSurgery(
        sites=["ln2", "block"], num_samples=8, batch_size=8, stats_file="s.safetensors"
    ).apply(_merged(pool), pool, RunContext(out_dir=tmp_path))
    path = tmp_path / "s.safetensors"
    assert path.is_file()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["tasks"]) == pool.tasks
        assert [s[0] for s in json.loads(meta["sites"])] == ["ln2", "block"] * SMALL["layers"]
        for ti, task in enumerate(pool.tasks):
            for site, corr in zip(out.sites, out.corrections):
                for stat in ("mu_merged", "sigma_merged", "mu_expert", "sigma_expert"):
                    assert torch.equal(
                        f.get_tensor(f"{task}/{site.name}/{stat}"), getattr(corr, stat)[ti]
                    )


def test_unknown_site_is_a_clear_error():
    valid = ", ".join(sorted(SITE_PATHS))
    with pytest.raises(
        ConfigError, match=f"unknown stats surgery site 'mlp'; valid sites: {valid}"
    ):
        StatsSurgery(sites=["block", "mlp"])
    with pytest.raises(ConfigError, match="at least one site"):
        StatsSurgery(sites=[])
    with pytest.raises(ConfigError, match="eps must be > 0"):
        StatsSurgery(eps=0.0)
    with pytest.raises(ConfigError, match="num_samples"):
        StatsSurgery(num_samples=0)


def test_site_missing_from_block_is_a_clear_error():
    class Plain(nn.Module):  # a block with a LayerNorm but no attention submodule
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.layers = nn.ModuleList([Plain()])

    with pytest.raises(ConfigError, match="site 'attn'.*attn, self_attn"):
        discover_sites(Enc(), ["attn"])


def test_yaml_instantiates_and_runs(tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF)
    assert cfg.sites == ["block"]
    surgery = instantiate(cfg, num_samples=6, batch_size=4)
    assert isinstance(surgery, StatsSurgery) and surgery.name == "stats"
    pool = _pool(SMALL)
    out = surgery.apply(_merged(pool), pool, RunContext(out_dir=tmp_path))
    assert (tmp_path / cfg.stats_file).is_file()
    x = _images(pool, "task1", 6, 0)
    assert torch.isfinite(out(x, "task1")).all()


def _hf_pool(n_tasks: int = 2) -> ModelPool:
    """A tiny Hugging Face CLIP vision pool: a second block layout (self_attn, layer_norm2,
    mlp.fc1, tuple-returning attention)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )

    class HFEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            hf = transformers.CLIPVisionModel(cfg)
            # transformers < 5 nests the tower in .vision_model; 5.x flattened it
            self.vision_model = getattr(hf, "vision_model", hf)

        def forward(self, x):
            return self.vision_model(pixel_values=x).pooler_output

    torch.manual_seed(0)
    theta0 = {k: v.clone() for k, v in HFEncoder().state_dict().items()}
    g = torch.Generator().manual_seed(1)
    tasks = [f"t{i}" for i in range(n_tasks)]
    experts = {
        t: {
            k: v + 0.2 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
            for k, v in theta0.items()
        }
        for t in tasks
    }
    from torch.utils.data import TensorDataset

    from mergelab.pool.heads import ClassificationHead

    return ModelPool(
        family="synthetic-hf",
        backbone="hf-clip-tiny",
        tasks=tasks,
        encoder_factory=HFEncoder,
        pretrained=theta0,
        experts=experts,
        heads={t: ClassificationHead(torch.randn(3, 24, generator=g)) for t in tasks},
        test_sets={
            t: TensorDataset(torch.randn(10, 3, 16, 16, generator=g), torch.zeros(10))
            for t in tasks
        },
    )


def test_hf_clip_backbone(tmp_path):
    pool = _hf_pool()
    merged = _merged(pool)
    out = StatsSurgery(sites=ALL_SITES, num_samples=None, batch_size=4, eps=1e-12).apply(
        merged, pool, RunContext(out_dir=tmp_path)
    )
    names = [s.name for s in out.sites]
    assert names[:4] == [
        "vision_model.encoder.layers.0.self_attn",
        "vision_model.encoder.layers.0.layer_norm2",
        "vision_model.encoder.layers.0.mlp.fc1",
        "vision_model.encoder.layers.0",
    ]
    for task in pool.tasks:
        x = _images(pool, task, None, 0)
        got = _site_moments(out.encoder, names, partial(out.features, x, task))
        expert = pool.expert_encoder(task)
        want = _site_moments(expert, names, partial(expert, x))
        for (gm, gs), (wm, ws) in zip(got, want):
            assert torch.allclose(gm, wm, atol=1e-4) and torch.allclose(
                gs, ws, atol=1e-4, rtol=1e-4
            )


def test_saved_statistics_reload_without_measuring(tmp_path):
    pool = _pool(SMALL)
    sites = ["attn", "block"]
    out = StatsSurgery(sites=sites, num_samples=8, batch_size=8).apply(
        _merged(pool), pool, RunContext(out_dir=tmp_path)
    )
    path = tmp_path / "stats_surgery.safetensors"
    reloaded = StatsSurgery(sites=sites, load_from=str(path)).apply(
        _merged(pool), pool, RunContext(out_dir=tmp_path / "second")
    )
    x = _images(pool, "task1", 5, 0)
    with torch.no_grad():
        assert torch.allclose(reloaded.features(x, "task1"), out.features(x, "task1"), atol=1e-6)
    with pytest.raises(CheckpointError, match="do not match"):
        StatsSurgery(sites=["block"], load_from=str(path)).apply(
            _merged(pool), pool, RunContext(out_dir=tmp_path)
        )
    other = _pool(OTHER)
    with pytest.raises(CheckpointError, match="measured on backbone"):
        StatsSurgery(sites=sites, load_from=str(path)).apply(
            _merged(other), other, RunContext(out_dir=tmp_path)
        )
    with pytest.raises(CheckpointError, match="file not found"):
        StatsSurgery(load_from=str(tmp_path / "nope.safetensors"))


@pytest.mark.parametrize(
    "make,sites",
    [
        (lambda: _pool(OTHER, n_images=8), ALL_SITES),
        (lambda: _pool(OTHER, n_images=8), ["block"]),
        (lambda: _pool(OTHER, n_images=8), ["attn", "mlp_hidden"]),  # no block site
        (lambda: _hf_pool(), ALL_SITES),
    ],
    ids=["open_clip-all", "open_clip-block", "open_clip-inner", "hf-all"],
)
def test_block_replay_gives_the_full_forward_statistics(tmp_path, make, sites):
    pool = make()
    merged = _merged(pool)
    x = _images(pool, pool.tasks[0], 4, 0)
    with torch.no_grad():
        # the fast path is really taken
        assert _replayable(merged.encoder, discover_sites(merged.encoder, sites), x)

    def run(replay: bool) -> StatsSurgeryModel:
        surgery = StatsSurgery(sites, num_samples=None, batch_size=6, replay=replay)
        return surgery.apply(merged, pool, RunContext(out_dir=tmp_path, seed=1))

    fast, slow = run(True), run(False)
    for (k, a), b in zip(fast.stats_state().items(), slow.stats_state().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), k


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(self.ln_2(x))


class _NotAChain(nn.Module):
    """Blocks whose inputs are not the previous block's output (the stream is rescaled in
    between): calibration must fall back to full forward passes and still be exact."""

    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_Block(width) for _ in range(depth))

    def forward(self, x):
        for block in self.transformer.resblocks:
            x = block(2.0 * x)
        return x.mean(1)


def test_encoder_that_is_not_a_chain_falls_back_and_is_exact(tmp_path):
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    theta0 = _NotAChain().state_dict()
    g = torch.Generator().manual_seed(2)
    experts = {
        t: {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
        for t in ("a", "b")
    }
    pool = ModelPool(
        family="toy",
        backbone="not-a-chain",
        tasks=["a", "b"],
        encoder_factory=_NotAChain,
        pretrained=theta0,
        experts=experts,
        heads={t: nn.Identity() for t in experts},
        test_sets={t: TensorDataset(torch.randn(9, 5, 8, generator=g)) for t in experts},
    )
    merged = _merged(pool)
    sites = discover_sites(merged.encoder, ["ln2", "block"])
    x = _images(pool, "a", None, 0)
    with torch.no_grad():
        assert not _replayable(merged.encoder, sites, x)
    out = StatsSurgery(["ln2", "block"], num_samples=None, batch_size=4, eps=1e-12).apply(
        merged, pool, RunContext(out_dir=tmp_path)
    )
    names = [s.name for s in out.sites]
    for task in pool.tasks:
        x = _images(pool, task, None, 0)
        got = _site_moments(out.encoder, names, partial(out.features, x, task))
        expert = pool.expert_encoder(task)
        want = _site_moments(expert, names, partial(expert, x))
        for (gm, gs), (wm, ws) in zip(got, want):
            assert torch.allclose(gm, wm, atol=1e-4) and torch.allclose(gs, ws, atol=1e-4)
