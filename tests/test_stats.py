"""Statistics surgery (Non-local merging / TACT, arXiv 2410.12766) and REPAIR (arXiv
2211.08403): statistics equal an independent computation at all four sites; after the
correction the merged model's per-channel moments at every corrected site equal the target
(the task's expert, or REPAIR's expert average on the pooled data), site by site; REPAIR
shares one set of statistics; hand-computed known answers; on any discoverable backbone."""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from mergelab.context import RunContext
from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.base import ModelPool, MultiTaskModel
from mergelab.surgery.blocks import block_tensor, discover_blocks
from mergelab.surgery.correction.calibrate import replayable
from mergelab.surgery.correction.model import CorrectedModel
from mergelab.surgery.correction.sites import (
    PAPER_SITES,
    SITE_PATHS,
    discover_sites,
    trace_sites,
)
from mergelab.surgery.repair import SHARED, RepairSurgery
from mergelab.surgery.stats import StatsSurgery
from mergelab.surgery.unlabeled import unlabeled_loader
from mergelab.zoo.synthetic import synthetic_pool

ALL_SITES = list(PAPER_SITES)
CONF = Path(__file__).resolve().parents[1] / "mergelab" / "conf" / "surgery"
STATS = ("mu_merged", "sigma_merged", "mu_expert", "sigma_expert")

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


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, population std) over every leading dim."""
    x = x.double().reshape(-1, x.shape[-1])
    return x.mean(0), x.std(0, unbiased=False)


def _site_moments(
    encoder: nn.Module, names: list[str], run
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel moments at each named module over every call during ``run()``, seen by a
    hook registered now (so after any persistent surgery hook)."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [
        encoder.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen[n].append(block_tensor(o).detach())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return [_moments(torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[n]])) for n in names]


def _images(pool: ModelPool, task: str, num_samples: int | None, seed: int) -> torch.Tensor:
    return torch.cat(list(unlabeled_loader(pool.test_sets[task], num_samples, 1000, seed)))


def _assert_close_moments(got, want, where: str, tol: float = 1e-4) -> None:
    for i, ((gm, gs), (wm, ws)) in enumerate(zip(got, want)):
        assert torch.allclose(gm, wm, atol=tol, rtol=tol), f"{where} site {i}: mean"
        assert torch.allclose(gs, ws, atol=tol, rtol=tol), f"{where} site {i}: std"


# ------------------------------------------------------------------ the correction, exact


@pytest.mark.parametrize(
    "backbone,sites,num_samples",
    [(SMALL, ["block"], None), (SMALL, ALL_SITES, 12), (OTHER, ALL_SITES, None)],
    ids=["small-block", "small-all-subset", "other-all"],
)
def test_corrected_moments_equal_expert_moments(tmp_path, backbone, sites, num_samples):
    pool = _pool(backbone)
    merged = _merged(pool)
    # odd batch size: moments must be accumulated across uneven batches
    surgery = StatsSurgery(sites=sites, num_samples=num_samples, batch_size=7, eps=1e-12, seed=3)
    out = surgery.apply(merged, pool, RunContext(out_dir=tmp_path))

    assert isinstance(out, CorrectedModel)
    assert len(out.sites) == backbone["layers"] * len(sites)  # depth read from the model
    names = [s.name for s in out.sites]
    for task in pool.tasks:
        x = _images(pool, task, num_samples, 3)
        got = _site_moments(out.encoder, names, partial(out.features, x, task))
        expert = pool.expert_encoder(task)
        want = _site_moments(expert, names, partial(expert, x))
        before = _site_moments(merged.encoder, names, partial(merged.encoder, x))
        gap = max((b[1] - w[1]).abs().max().item() for b, w in zip(before, want))
        assert gap > 1e-2, "the merged model should start with different moments"
        _assert_close_moments(got, want, task)


def _manual_blocks(encoder: nn.Module, x0: torch.Tensor, correct) -> list[torch.Tensor]:
    """An independent forward of open_clip ResidualAttentionBlocks from the block-0 input
    (written out from the weights: LayerNorm, multi-head attention, MLP), applying
    ``correct(site_index, activation)`` at the four sites; returns each site's corrected
    activation in forward order."""
    blocks = discover_blocks(encoder)
    assert blocks.batch_first
    acts, x, i = [], x0, 0

    def site(a):
        nonlocal i
        a = correct(i, a)
        acts.append(a)
        i += 1
        return a

    for blk in blocks.modules:
        ln1, ln2, attn = blk.ln_1, blk.ln_2, blk.attn
        h = F.layer_norm(x, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
        q, k, v = (h @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
        nh, (b, n, d) = attn.num_heads, q.shape
        q, k, v = (t.reshape(b, n, nh, d // nh).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // nh), dim=-1)
        a = (w @ v).transpose(1, 2).reshape(b, n, d)
        a = site(a @ attn.out_proj.weight.T + attn.out_proj.bias)
        x = x + a
        h = site(F.layer_norm(x, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps))
        u = site(h @ blk.mlp.c_fc.weight.T + blk.mlp.c_fc.bias)
        x = site(x + blk.mlp.gelu(u) @ blk.mlp.c_proj.weight.T + blk.mlp.c_proj.bias)
    return acts


def _block0_input(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    got = []
    h = discover_blocks(encoder).modules[0].register_forward_pre_hook(lambda m, a: got.append(a[0]))
    try:
        with torch.no_grad():
            encoder(x)
    finally:
        h.remove()
    return got[0]


def test_statistics_equal_an_independent_sequential_computation(tmp_path):
    """Every stored statistic of all four sites, against a hand-written forward: expert
    moments from the expert; merged moments of site i on the merged model corrected at sites
    0..i-1 with statistics computed here, identity from site i on."""
    eps = 1e-5
    pool = _pool(SMALL)
    merged = _merged(pool)
    out = StatsSurgery(sites=ALL_SITES, num_samples=10, batch_size=4, eps=eps, seed=1).apply(
        merged, pool, RunContext(out_dir=tmp_path)
    )
    assert [s.kind for s in out.sites] == ALL_SITES * SMALL["layers"]

    def finish(a):
        x = a.double().reshape(-1, a.shape[-1])
        mean = x.mean(0)
        return mean, (x.var(0, unbiased=False) + eps).sqrt()

    with torch.no_grad():
        for t, task in enumerate(pool.tasks):
            x = _images(pool, task, 10, 1)
            expert = pool.expert_encoder(task)
            plain = _manual_blocks(expert, _block0_input(expert, x), lambda j, a: a)
            target = [finish(a) for a in plain]
            x0 = _block0_input(merged.encoder, x)
            mine: list[tuple[torch.Tensor, torch.Tensor]] = []
            for i in range(len(out.sites)):

                def correct(j, a, i=i, mine=mine, target=target):
                    if j >= i:
                        return a
                    (mm, sm), (me, se) = mine[j], target[j]
                    return ((a.double() - mm) / sm * se + me).float()

                mine.append(finish(_manual_blocks(merged.encoder, x0, correct)[i]))
            corr = out.corrections
            for i, site in enumerate(out.sites):
                want = {
                    "mu_merged": mine[i][0],
                    "sigma_merged": mine[i][1],
                    "mu_expert": target[i][0],
                    "sigma_expert": target[i][1],
                }
                for s, w in want.items():
                    got = getattr(corr[i], s)[t].double()
                    assert torch.allclose(got, w, atol=1e-4, rtol=1e-4), f"{task} {site} {s}"


def _pooled_images(pool: ModelPool, num_samples: int | None, seed: int) -> torch.Tensor:
    return torch.cat([_images(pool, t, num_samples, seed) for t in pool.tasks])


def test_repair_corrected_moments_equal_the_pooled_expert_average(tmp_path):
    pool = _pool(SMALL, n_tasks=3, n_images=10)
    merged = _merged(pool)
    out = RepairSurgery(sites=ALL_SITES, num_samples=8, batch_size=5, eps=1e-12, seed=2).apply(
        merged, pool, RunContext(out_dir=tmp_path)
    )
    names = [s.name for s in out.sites]
    x = _pooled_images(pool, 8, 2)
    # the target: each expert's moments on the pooled data, averaged over experts (REPAIR)
    per_expert = []
    for task in pool.tasks:
        expert = pool.expert_encoder(task)
        per_expert.append(_site_moments(expert, names, partial(expert, x)))
    want = [
        (
            torch.stack([e[i][0] for e in per_expert]).mean(0),
            torch.stack([e[i][1] for e in per_expert]).mean(0),
        )
        for i in range(len(names))
    ]
    for task in pool.tasks:  # whichever task routes the pooled data: one shared correction
        got = _site_moments(out.encoder, names, partial(out.features, x, task))
        _assert_close_moments(got, want, f"routed as {task}")


def test_repair_shares_one_set_of_statistics(tmp_path):
    pool = _pool(SMALL, n_tasks=2)
    out = RepairSurgery(sites=["ln2", "block"], num_samples=None, batch_size=8).apply(
        _merged(pool), pool, RunContext(out_dir=tmp_path)
    )
    assert out.groups == [SHARED] and out.group_of == {t: SHARED for t in pool.tasks}
    assert all(c.mu_expert.shape[0] == 1 for c in out.corrections)
    assert {k.split("/")[0] for k in out.stats_state()} == {SHARED}
    x = _images(pool, "task0", 6, 0)
    with torch.no_grad():
        f0, f1 = out.features(x, "task0"), out.features(x, "task1")
        assert torch.equal(f0, f1)  # identical corrections for both tasks
        assert not torch.allclose(f0, out.merged.features(x, "task0"), atol=1e-3)
    # the per-task kind on the same data gives each task its own
    per_task = StatsSurgery(sites=["ln2", "block"], num_samples=None, batch_size=8).apply(
        _merged(pool), pool, RunContext(out_dir=tmp_path)
    )
    with torch.no_grad():
        assert not torch.allclose(per_task.features(x, "task0"), per_task.features(x, "task1"))


# --------------------------------------------------------------- hand-computed known answer


class _ScaleBlock(nn.Module):
    """y = w · x, one channel (the LayerNorm is only there for block discovery)."""

    def __init__(self):
        super().__init__()
        self.ln_2 = nn.LayerNorm(1)
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.w


class _ScaleEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_ScaleBlock()])

    def forward(self, x):  # (B, tokens=1, channels=1) -> (B, 1)
        for block in self.transformer.resblocks:
            x = block(x)
        return x.mean(1)


def _scale_pool() -> ModelPool:
    """Task a: inputs {1, 3}, expert w = 2. Task b: inputs {5, 7}, expert w = 4. θ0: w = 1."""
    theta0 = _ScaleEncoder().state_dict()

    def with_w(w):
        return {**theta0, "transformer.resblocks.0.w": torch.tensor([float(w)])}

    def data(*values):
        return TensorDataset(torch.tensor(values).reshape(-1, 1, 1))

    return ModelPool(
        family="toy",
        backbone="scale",
        tasks=["a", "b"],
        encoder_factory=_ScaleEncoder,
        pretrained=with_w(1),
        experts={"a": with_w(2), "b": with_w(4)},
        heads={"a": nn.Identity(), "b": nn.Identity()},
        test_sets={"a": data(1.0, 3.0), "b": data(5.0, 7.0)},
    )


@pytest.mark.parametrize("replay", [True, False])
def test_hand_computed_stats_and_repair(tmp_path, replay):
    pool = _scale_pool()
    merged = MultiTaskModel(pool.pretrained_encoder(), pool.heads)  # w = 1
    kw = dict(sites=["block"], num_samples=None, batch_size=1, eps=1e-12, replay=replay)
    ctx = RunContext(out_dir=tmp_path)
    x = torch.tensor([1.0, 3.0, 5.0, 7.0, -2.0]).reshape(-1, 1, 1)

    # REPAIR: pooled {1,3,5,7}: merged μ=4, σ=√5; expert a on it μ=8, σ=2√5; expert b μ=16,
    # σ=4√5; target (12, 3√5), so x̂ = (x−4)/√5·3√5 + 12 = 3x for every task.
    repair = RepairSurgery(**kw).apply(merged, pool, ctx)
    stats = {k.rsplit("/", 1)[1]: v.item() for k, v in repair.stats_state().items()}
    assert stats == pytest.approx(
        {"mu_merged": 4, "sigma_merged": 5**0.5, "mu_expert": 12, "sigma_expert": 3 * 5**0.5}
    )
    with torch.no_grad():
        for task in ("a", "b"):
            assert torch.allclose(repair.features(x, task), 3 * x.reshape(-1, 1), atol=1e-5)

    # Non-local (per task): a: merged {1,3} → (2, 1), expert {2,6} → (4, 2): x̂ = 2x.
    # b: merged {5,7} → (6, 1), expert {20,28} → (24, 4): x̂ = 4x.
    per_task = StatsSurgery(**kw).apply(merged, pool, ctx)
    with torch.no_grad():
        assert torch.allclose(per_task.features(x, "a"), 2 * x.reshape(-1, 1), atol=1e-5)
        assert torch.allclose(per_task.features(x, "b"), 4 * x.reshape(-1, 1), atol=1e-5)
        assert torch.equal(merged.features(x, "a"), x.reshape(-1, 1))  # input model untouched


# ------------------------------------------------------------------------------ identity


@pytest.mark.parametrize("kind", [StatsSurgery, RepairSurgery])
def test_correcting_a_model_toward_itself_is_the_identity(tmp_path, kind):
    # every expert IS the merged model: every correction must be the identity
    pool = _pool(SMALL, n_tasks=2)
    same = {k: v.clone() for k, v in pool.experts["task0"].items()}
    pool.experts = {t: same for t in pool.tasks}
    model = MultiTaskModel(pool.encoder(same), pool.heads)
    out = kind(sites=ALL_SITES, num_samples=None, batch_size=8, eps=1e-12).apply(
        model, pool, RunContext(out_dir=tmp_path)
    )
    for corr in out.corrections:
        assert torch.allclose(corr.mu_merged, corr.mu_expert, atol=1e-5)
        assert torch.allclose(corr.sigma_merged, corr.sigma_expert, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for task in pool.tasks:
            x = _images(pool, task, None, 0)
            assert torch.allclose(out.features(x, task), model.features(x, task), atol=1e-5)


# ------------------------------------------------------------------ samples, seed, routing


class _Counting(Dataset):
    """Records which items were read."""

    def __init__(self, base: Dataset):
        self.base, self.seen = base, set()

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.seen.add(int(i))
        return self.base[i]


@pytest.mark.parametrize("kind", [StatsSurgery, RepairSurgery])
def test_samples_per_task_and_their_seed(tmp_path, kind):
    def drawn(num_samples, seed):
        pool = _pool(SMALL, n_tasks=2, n_images=14)
        pool.test_sets = {t: _Counting(d) for t, d in pool.test_sets.items()}
        kind(sites=["block"], num_samples=num_samples, batch_size=4, seed=seed).apply(
            _merged(pool), pool, RunContext(out_dir=tmp_path)
        )
        return {t: d.seen for t, d in pool.test_sets.items()}

    a, again, other = drawn(5, 0), drawn(5, 0), drawn(5, 1)
    for t in a:
        assert len(a[t]) == 5  # exactly num_samples images of EVERY task, pooled or not
        assert a[t] == again[t]  # the seed fixes the draw
    assert any(a[t] != other[t] for t in a)  # another seed, another draw
    assert all(len(s) == 14 for s in drawn(None, 0).values())  # null = whole split
    assert all(len(s) == 14 for s in drawn(100, 0).values())  # more than there are = all


def test_seed_follows_the_run_seed(tiny_cache):
    from conftest import compose
    from hydra.utils import instantiate

    for name, cls in (("stats", StatsSurgery), ("repair", RepairSurgery)):
        cfg = compose([f"surgery={name}", "seed=7"], tiny_cache)
        surgery = instantiate(cfg.surgery)
        assert type(surgery) is cls and surgery.seed == 7
        assert surgery.sites == ALL_SITES  # the paper's four by default
        assert surgery.num_samples == 1024


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


class _PerTaskWeights(MultiTaskModel):
    """A task-conditional merged model whose ``features(x, t)`` runs the shared encoder module
    with task t's own weights (functional_call)."""

    def __init__(self, encoder, heads, states):
        super().__init__(encoder, heads)
        self.states = states

    def features(self, x, task):
        return torch.func.functional_call(self.encoder, self.states[task], (x,))


class _SwitchesWeights(MultiTaskModel):
    """A task-conditional merged model through the routing API: ``use_task(t)`` loads task t's
    weights into the encoder, which then runs them until another task's are loaded."""

    def __init__(self, encoder, heads, states):
        super().__init__(encoder, heads)
        self.states, self.loaded = states, None

    def use_task(self, task):
        if task != self.loaded:
            self.encoder.load_state_dict(self.states[task])
            self.loaded = task


@pytest.mark.parametrize("cls", [_PerTaskWeights, _SwitchesWeights])
def test_task_conditional_merged_model_is_measured_through_its_routing(tmp_path, cls):
    # each task's "merged" weights ARE its expert's: measured through the task's routing the
    # correction is the identity; measured on any other weights it would not be
    pool = _pool(SMALL, n_tasks=2)
    states = {t: dict(pool.experts[t]) for t in pool.tasks}
    model = cls(pool.pretrained_encoder(), pool.heads, states)
    x = _images(pool, "task1", None, 0)
    with torch.no_grad():  # single blocks can be re-run only when the weights follow use_task
        assert replayable(_corrected(model, ["block"], x), x, "task1") == (cls is _SwitchesWeights)
    out = StatsSurgery(sites=ALL_SITES, num_samples=None, batch_size=8, eps=1e-12).apply(
        model, pool, RunContext(out_dir=tmp_path)
    )
    with torch.no_grad():
        for task in reversed(pool.tasks):
            x = _images(pool, task, None, 0)
            want = pool.expert_encoder(task)(x)
            assert torch.allclose(out.features(x, task), want, atol=1e-4)

    # REPAIR pools every task's data, each batch under its own task's weights
    def repair(replay: bool) -> dict[str, torch.Tensor]:
        surgery = RepairSurgery(ALL_SITES, num_samples=None, batch_size=8, replay=replay)
        return surgery.apply(model, pool, RunContext(out_dir=tmp_path)).stats_state()

    fast, slow = repair(True), repair(False)
    assert all(torch.allclose(fast[k], slow[k], atol=1e-5, rtol=1e-5) for k in slow)


# ------------------------------------------------------------------------ sites and models


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


def test_correction_formula_known_answer():
    pool = _pool(SMALL, n_tasks=1)
    enc = pool.pretrained_encoder()
    sites = discover_sites(enc, ["block"])
    model = CorrectedModel(
        MultiTaskModel(enc, pool.heads), sites, [SMALL["width"]] * len(sites), eps=1e-5
    )
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


def test_unknown_site_is_a_clear_error():
    valid = ", ".join(sorted(SITE_PATHS))
    with pytest.raises(
        ConfigError, match=f"unknown statistics surgery site 'mlp'; valid sites: {valid}"
    ):
        StatsSurgery(sites=["block", "mlp"])
    with pytest.raises(ConfigError, match="at least one site"):
        RepairSurgery(sites=[])
    with pytest.raises(ConfigError, match="eps must be > 0"):
        StatsSurgery(eps=0.0)
    with pytest.raises(ConfigError, match="num_samples"):
        RepairSurgery(num_samples=0)


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
        _assert_close_moments(got, want, task)


# ----------------------------------------------------------------------- replay vs forward


def _corrected(model: MultiTaskModel, kinds, x: torch.Tensor) -> CorrectedModel:
    task = model.tasks[0]
    sites, channels = trace_sites(
        model.encoder, discover_sites(model.encoder, kinds), partial(model.features, x, task)
    )
    return CorrectedModel(model, sites, channels, 1e-5)


@pytest.mark.parametrize(
    "make,sites,kind",
    [
        (lambda: _pool(OTHER, n_images=8), ALL_SITES, StatsSurgery),
        (lambda: _pool(OTHER, n_images=8), ["block"], StatsSurgery),
        (lambda: _pool(OTHER, n_images=8), ["attn", "mlp_hidden"], StatsSurgery),  # no block
        (lambda: _pool(OTHER, n_images=8), ALL_SITES, RepairSurgery),
        (lambda: _hf_pool(), ALL_SITES, StatsSurgery),
    ],
    ids=["open_clip-all", "open_clip-block", "open_clip-inner", "open_clip-repair", "hf-all"],
)
def test_block_replay_gives_the_full_forward_statistics(tmp_path, make, sites, kind):
    pool = make()
    merged = _merged(pool)
    x = _images(pool, pool.tasks[0], 4, 0)
    with torch.no_grad():
        # the fast path is really taken
        assert replayable(_corrected(merged, sites, x), x, pool.tasks[0])

    def run(replay: bool) -> CorrectedModel:
        surgery = kind(sites, num_samples=None, batch_size=6, replay=replay, seed=1)
        return surgery.apply(merged, pool, RunContext(out_dir=tmp_path))

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
    x = _images(pool, "a", None, 0)
    with torch.no_grad():
        assert not replayable(_corrected(merged, ["ln2", "block"], x), x, "a")
    out = StatsSurgery(["ln2", "block"], num_samples=None, batch_size=4, eps=1e-12).apply(
        merged, pool, RunContext(out_dir=tmp_path)
    )
    names = [s.name for s in out.sites]
    for task in pool.tasks:
        x = _images(pool, task, None, 0)
        got = _site_moments(out.encoder, names, partial(out.features, x, task))
        expert = pool.expert_encoder(task)
        want = _site_moments(expert, names, partial(expert, x))
        _assert_close_moments(got, want, task)


# ------------------------------------------------------------------------------------ I/O


def test_statistics_are_saved(tmp_path):
    from safetensors import safe_open

    pool = _pool(SMALL)
    out = StatsSurgery(
        sites=["ln2", "block"], num_samples=8, batch_size=8, seed=4, stats_file="s.safetensors"
    ).apply(_merged(pool), pool, RunContext(out_dir=tmp_path))
    path = tmp_path / "s.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["method"] == "stats" and meta["paper"] == '"arXiv 2410.12766"'
        assert json.loads(meta["groups"]) == pool.tasks
        assert json.loads(meta["num_samples"]) == 8 and json.loads(meta["seed"]) == 4
        assert [s[0] for s in json.loads(meta["sites"])] == ["ln2", "block"] * SMALL["layers"]
        for ti, task in enumerate(pool.tasks):
            for site, corr in zip(out.sites, out.corrections):
                for stat in STATS:
                    assert torch.equal(
                        f.get_tensor(f"{task}/{site.name}/{stat}"), getattr(corr, stat)[ti]
                    )


@pytest.mark.parametrize("kind", [StatsSurgery, RepairSurgery])
def test_saved_statistics_reload_without_measuring(tmp_path, kind):
    pool = _pool(SMALL)
    sites = ["attn", "block"]
    out = kind(sites=sites, num_samples=8, batch_size=8, stats_file="s.safetensors").apply(
        _merged(pool), pool, RunContext(out_dir=tmp_path)
    )
    path = tmp_path / "s.safetensors"
    reloaded = kind(sites=sites, load_from=str(path)).apply(
        _merged(pool), pool, RunContext(out_dir=tmp_path / "second")
    )
    assert reloaded.group_of == out.group_of
    x = _images(pool, "task1", 5, 0)
    with torch.no_grad():
        assert torch.allclose(reloaded.features(x, "task1"), out.features(x, "task1"), atol=1e-6)
    with pytest.raises(CheckpointError, match="do not match"):
        kind(sites=["block"], load_from=str(path)).apply(
            _merged(pool), pool, RunContext(out_dir=tmp_path)
        )
    other_kind = RepairSurgery if kind is StatsSurgery else StatsSurgery
    with pytest.raises(CheckpointError, match=f"method {kind.name!r}, expected"):
        other_kind(sites=sites, load_from=str(path)).apply(
            _merged(pool), pool, RunContext(out_dir=tmp_path)
        )
    other = _pool(OTHER)
    with pytest.raises(CheckpointError, match="measured on backbone"):
        kind(sites=sites, load_from=str(path)).apply(
            _merged(other), other, RunContext(out_dir=tmp_path)
        )
    with pytest.raises(CheckpointError, match="file not found"):
        kind(load_from=str(tmp_path / "nope.safetensors"))


# ------------------------------------------------------------------------------ yaml, CLI


@pytest.mark.parametrize("name,cls", [("stats", StatsSurgery), ("repair", RepairSurgery)])
def test_yaml_instantiates_and_runs(tmp_path, name, cls):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert list(cfg.sites) == ALL_SITES
    surgery = instantiate(cfg, num_samples=6, batch_size=4, seed=0)
    assert type(surgery) is cls and surgery.name == name
    pool = _pool(SMALL)
    out = surgery.apply(_merged(pool), pool, RunContext(out_dir=tmp_path))
    assert (tmp_path / cfg.stats_file).is_file()
    x = _images(pool, "task1", 6, 0)
    assert torch.isfinite(out(x, "task1")).all()


def test_cli_runs_stats_and_repair_with_ties(run_cli, tmp_path):
    # one sweep process for both kinds: the CLI's start-up is paid once
    sweep = tmp_path / "sweep"
    r = run_cli(
        "merge=ties",
        "surgery=stats,repair",
        "++surgery.num_samples=64",
        run_dir=sweep,
        multirun=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    files = {"stats": "stats_surgery.safetensors", "repair": "repair_stats.safetensors"}
    seen = set()
    for path in sweep.glob("*/results.json"):
        res = json.loads(path.read_text())
        name = res["surgery"]
        seen.add(name)
        assert res["merge"] == "ties" and set(res["accuracy"]) == set(res["tasks"])
        assert (path.parent / files[name]).is_file()
        assert res["table"][-1]["method"].startswith(f"ties + surgery {name}")
    assert seen == {"stats", "repair"}
