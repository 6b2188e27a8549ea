"""The embedded zoos: captions, zero-shot heads from the text tower, foundations shared between
zoos, the non-local pool's bases, and the regime measured at build time."""

from __future__ import annotations

import json

import pytest
import torch

from mergelab.errors import ConfigError
from mergelab.zoo import data as zdata
from mergelab.zoo.embedded import EmbeddedZoo
from mergelab.zoo.text import CaptionSet, TextTower, caption

TINY = dict(
    name="embedded-vit-mini",
    vision=dict(image_size=16, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2.0),
    embed_dim=16,
    data=dict(image_size=16, n_train=64, n_test=32, seed=0),
    pretrain=dict(
        steps=6,
        batch_size=32,
        lr=1e-3,
        weight_decay=0.05,
        warmup=2,
        caption_rate=0.5,
        orientations=4,
        grayscale=True,
        text_width=16,
    ),
    finetune=dict(steps=4, batch_size=32, lr=1e-3, weight_decay=0.1, warmup=1),
    logit_scale=100.0,
    mixture=["mnist", "digits", "gtsrb"],
    seed=0,
    progress=False,
)


def test_caption_set_indexes_the_right_caption():
    classes = {"mnist": [str(i) for i in range(10)], "gtsrb": zdata.GTSRB_CLASSES}
    cs = CaptionSet(["mnist", "gtsrb"], classes, orientations=4)
    assert len(cs.captions) == 4 * (11 + 13)
    ids = cs.index(torch.tensor([0, 1, 1]), torch.tensor([2, 0, 3]), torch.tensor([7, 4, -1]))
    assert cs.captions[ids[0]] == ["<mnist>", "rot180", "7"]
    assert cs.captions[ids[1]] == ["<gtsrb>", "upright", *zdata.GTSRB_CLASSES[4].split()]
    assert cs.captions[ids[2]] == ["<gtsrb>", "rot270"]  # −1: the caption names no class
    # words are shared across tasks: the digit 7 of every digit task is one word
    assert "7" in cs.vocab and cs.vocab.count("7") == 1


def test_text_tower_is_a_bag_of_words():
    tower = TextTower(["a", "b", "c"], embed_dim=8, width=4)
    e = tower([["a", "b"], ["b", "a"], ["a", "c"]])
    assert torch.allclose(e.norm(dim=-1), torch.ones(3))
    assert torch.allclose(e[0], e[1])  # order-free, like the mean of word embeddings
    assert not torch.allclose(e[0], e[2])


def test_gtsrb_sign_shapes_are_distinct_classes():
    assert len(set(zdata.GTSRB_CLASSES)) == 12
    assert not any("hexagon" in c for c in zdata.GTSRB_CLASSES + zdata.OBJECT_CLASSES)


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def test_local_zoo_heads_regime_and_cache(zoo_cache):
    zoo = EmbeddedZoo(cache_dir=zoo_cache, regime_targets={"experts_min": 0}, **TINY)
    pool = zoo.pool(["mnist", "gtsrb"])
    f = zoo.foundations[0]
    # zero-shot heads are the text tower's prompt embeddings × the logit scale
    text = TextTower(
        CaptionSet(TINY["mixture"], {t: zdata.TASKS[t].classes for t in TINY["mixture"]}, 4).vocab,
        TINY["embed_dim"],
        TINY["pretrain"]["text_width"],
    )
    from mergelab.pool.state import LazyStateDict

    text.load_state_dict(dict(LazyStateDict(f.dir / "text.safetensors").items()))
    with torch.no_grad():
        want = text([caption("gtsrb", 0, c) for c in zdata.GTSRB_CLASSES])
    assert torch.allclose(pool.heads["gtsrb"].weight, 100.0 * want, atol=1e-5)
    # experts moved away from θ0 (they were fine-tuned), heads stayed frozen
    k = "transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(pool.experts["mnist"][k], pool.pretrained[k])
    # the regime was measured, stored in the zoo's json and in the pool's meta
    r = pool.meta["regime"]
    for key in ("experts", "pretrained", "weight_averaging", "tau_ratio_median", "cosine_mean"):
        assert key in r
    assert r["checks"] == {"experts_min": True}
    assert json.loads((zoo.root / "regime.json").read_text())["mnist,gtsrb"] == r
    assert set(r["per_task"]) == {"mnist", "gtsrb"}
    # a second zoo with the same foundation but another fine-tuning recipe reuses θ0
    stamp = f.theta0_path.stat().st_mtime_ns
    far = EmbeddedZoo(cache_dir=zoo_cache, **{**TINY, "finetune": {**TINY["finetune"], "lr": 5e-3}})
    assert far.foundations[0].dir == f.dir and far.root != zoo.root
    far.pool(["mnist"])
    assert f.theta0_path.stat().st_mtime_ns == stamp


def test_nonlocal_zoo_has_its_bases(zoo_cache):
    zoo = EmbeddedZoo(cache_dir=zoo_cache, **{**TINY, "foundations": [0, 1]})
    pool = zoo.pool(["mnist", "digits", "gtsrb"])
    assert pool.nonlocal_
    # task i of the mixture is fine-tuned from foundation i mod 2
    assert pool.expert_base == {"mnist": "seed0", "digits": "seed1", "gtsrb": "seed0"}
    b0, b1 = pool.bases["seed0"], pool.bases["seed1"]
    k = "transformer.resblocks.1.attn.in_proj_weight"
    assert not torch.equal(b0[k], b1[k])  # different foundations
    assert torch.allclose(pool.pretrained[k], (b0[k] + b1[k]) / 2)  # the reference θ0
    # foundation seed0 is the local zoo's: same files (the experts of its tasks too)
    local = EmbeddedZoo(cache_dir=zoo_cache, **TINY)
    assert local.foundations[0].expert_path("mnist") == zoo.foundations[0].expert_path("mnist")
    # each expert's head comes from its own foundation's text tower
    assert not torch.equal(pool.heads["mnist"].weight[:1], pool.heads["digits"].weight[:1])
    r = pool.meta["regime"]
    assert "finetune_ratio_median" in r
    # experts sit far from the averaged reference, close to their own foundation
    assert r["tau_ratio_median"] > r["finetune_ratio_median"]


def test_nonlocal_zero_shot_row_uses_each_task_own_foundation(zoo_cache, tmp_path):
    from mergelab.context import RunContext
    from mergelab.eval.baselines import baselines
    from mergelab.eval.evaluator import evaluate
    from mergelab.pool.base import MultiTaskModel

    pool = EmbeddedZoo(cache_dir=zoo_cache, **{**TINY, "foundations": [0, 1]}).pool(
        ["mnist", "digits"]
    )
    ctx = RunContext(out_dir=tmp_path)
    row = baselines(pool, ctx, tmp_path)["pretrained"]
    for t in ("mnist", "digits"):
        own = MultiTaskModel(pool.encoder(pool.base_of(t)), pool.heads)
        assert row[t] == evaluate(own, pool.test_sets, pool.heads, ctx, [t])[t]
    # and the regime's zero-shot figure is that row
    assert pool.meta["regime"]["per_task"]["digits"]["pretrained"] == round(row["digits"], 2)


@pytest.mark.parametrize("grayscale", [True, False])
def test_pretraining_sees_the_images_without_colour_when_grayscale(
    tmp_path, monkeypatch, grayscale
):
    """``pretrain.grayscale``: the foundation's images have their channels averaged (the
    domain shift of the local zoo); the experts still fine-tune on the colour images."""
    from mergelab.zoo import train

    seen = []
    real = train.batch_loader
    monkeypatch.setattr(
        train, "batch_loader", lambda data, *a: seen.append(data[0]) or real(data, *a)
    )
    cfg = {**TINY, "pretrain": {**TINY["pretrain"], "grayscale": grayscale}}
    zoo = EmbeddedZoo(cache_dir=tmp_path, **{**cfg, "mixture": ["gtsrb"]})
    zoo.pool(["gtsrb"])
    pre, ft = seen[0], seen[1]  # pretraining images, then the gtsrb expert's
    colour = zoo.splits("gtsrb")[0]
    assert torch.equal(ft, colour)
    assert not torch.equal(colour[:, 0], colour[:, 1])  # gtsrb has colour to lose
    if grayscale:
        assert torch.allclose(pre, colour.mean(1, keepdim=True).expand_as(colour))
    else:
        assert torch.equal(pre, colour)


def test_zoo_recipe_with_a_missing_or_unknown_key_is_one_clear_error(tmp_path):
    pre = {k: v for k, v in TINY["pretrain"].items() if k != "grayscale"}
    with pytest.raises(ConfigError, match="pretrain recipe: missing grayscale"):
        EmbeddedZoo(cache_dir=tmp_path, **{**TINY, "pretrain": pre})
    ft = {**TINY["finetune"], "epochs": 3}
    with pytest.raises(ConfigError, match="finetune recipe: unknown epochs"):
        EmbeddedZoo(cache_dir=tmp_path, **{**TINY, "finetune": ft})


def test_zoo_trains_with_its_own_thread_count_whatever_the_run_uses(tmp_path, monkeypatch):
    """Kernels split reductions by thread count, so the zoo trains with ``build_threads``
    (part of its cache key) whatever the run's ``num_threads``, and restores the run's."""
    from mergelab.zoo import train

    seen, fit = [], train.fit

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit(*args, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        zoo = EmbeddedZoo(cache_dir=tmp_path, **{**TINY, "build_threads": 3})
        zoo.pool(["mnist"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen == [3, 3]  # the foundation's pretraining, then the expert's fine-tuning
    other = EmbeddedZoo(cache_dir=tmp_path, **{**TINY, "build_threads": 1})
    assert other.foundations[0].dir != zoo.foundations[0].dir and other.root != zoo.root
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="build_threads must be a positive integer"):
            EmbeddedZoo(cache_dir=tmp_path, **{**TINY, "build_threads": bad})
