"""RegMean and Fisher merging: known answers against independent computations.

- RegMean's closed form equals a least-squares solve (numpy lstsq on stacked, augmented
  rows), identical Grams give the plain average, one expert comes back, and every Gram the
  hooks collect equals one computed from the model's own activations by another route.
- Fisher's Fisher equals the hand-derived p(1−p)·x² of a linear softmax model and a brute-force
  per-example, per-class loop on an open_clip ViT; equal Fishers give the average, one expert
  comes back, and the merged weights equal Σ(F+ε)θ / Σ(F+ε) computed by hand.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mergelab.context import RunContext
from mergelab.errors import ConfigError
from mergelab.merge.fisher import FisherMerging, compute_fisher, fisher_average
from mergelab.merge.regmean import RegMean, collect_grams, linear_sites, regmean_weight
from mergelab.pool.base import ModelPool
from mergelab.zoo.synthetic import synthetic_pool


@pytest.fixture
def ctx(tmp_path) -> RunContext:
    return RunContext(out_dir=tmp_path)


def images_loader(x: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(
        TensorDataset(x), batch_size=batch_size, collate_fn=lambda b: torch.stack([i[0] for i in b])
    )


def linear_pool(
    experts: list[nn.Linear], inputs: list[torch.Tensor], n_classes: int | None = None
) -> ModelPool:
    """A pool whose encoder is ONE nn.Linear (a linear softmax model with an identity head):
    the setting where both methods have closed forms."""
    d_out, d_in = experts[0].weight.shape
    tasks = [f"t{i}" for i in range(len(experts))]
    return ModelPool(
        family="linear",
        backbone="linear",
        tasks=tasks,
        encoder_factory=lambda: nn.Linear(d_in, d_out),
        pretrained={k: v.detach().clone() for k, v in nn.Linear(d_in, d_out).state_dict().items()},
        experts={
            t: {k: v.detach().clone() for k, v in e.state_dict().items()}
            for t, e in zip(tasks, experts)
        },
        heads={t: nn.Identity() for t in tasks},
        test_sets={
            t: TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
            for t, x in zip(tasks, inputs)
        },
    )


def random_linears(n: int, d_in: int, d_out: int, seed: int = 0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(d_in, d_out) for _ in range(n)]


def hf_clip_encoder() -> nn.Module:
    pytest.importorskip("transformers")
    from miniatures import tiny_hf_configs

    from mergelab.pool.hf import HFCLIPImageEncoder

    _, vision = tiny_hf_configs()
    torch.manual_seed(0)
    return HFCLIPImageEncoder(vision, torch.randn(16, vision.hidden_size)).eval()


def lstsq_merge(xs: list[np.ndarray], ws: list[np.ndarray], alpha: float) -> np.ndarray:
    """Independent RegMean: min_W Σt ‖√α Xt'(W − Wt)ᵀ‖² + (1−α)‖diag(Gt)^½ (W − Wt)ᵀ‖² with
    Xt' = Xt/√nt, solved by numpy lstsq on stacked rows. Its normal equations are
    Σt G̃t Wᵀ = Σt G̃t Wtᵀ with Gt = XtᵀXt/nt — RegMean's definition."""
    rows, targets = [], []
    for x, w in zip(xs, ws):
        xn = x / np.sqrt(len(x))
        g = xn.T @ xn
        aug = np.vstack([np.sqrt(alpha) * xn, np.sqrt(1 - alpha) * np.diag(np.sqrt(np.diag(g)))])
        rows.append(aug)
        targets.append(aug @ w.T)
    sol, *_ = np.linalg.lstsq(np.vstack(rows), np.vstack(targets), rcond=None)
    return sol.T


# ---------------------------------------------------------------------------------------------
# RegMean: the closed form
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.95, 0.5])
def test_regmean_closed_form_equals_least_squares(alpha):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(40 + 5 * t, 6, generator=g) * (t + 1) for t in range(3)]
    ws = [torch.randn(4, 6, generator=g) for _ in range(3)]
    grams = [x.T @ x / len(x) for x in xs]
    got = regmean_weight(ws, grams, alpha)
    want = lstsq_merge([x.double().numpy() for x in xs], [w.double().numpy() for w in ws], alpha)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    # the x·W convention (open_clip's proj) is the same merge, transposed
    got_t = regmean_weight([w.T for w in ws], grams, alpha, transposed=False)
    np.testing.assert_allclose(got_t.numpy(), want.T, rtol=1e-4, atol=1e-5)


def test_regmean_identical_grams_is_average():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g)
    gram = x.T @ x / 30
    ws = [torch.randn(3, 5, generator=g) for _ in range(4)]
    for alpha in (1.0, 0.95, 0.0):
        got = regmean_weight(ws, [gram] * 4, alpha)
        torch.testing.assert_close(got, torch.stack(ws).mean(0), rtol=1e-4, atol=1e-5)


def test_regmean_dead_input_dims_keep_the_average():
    """An input dimension that is 0 in every task's data leaves the regression free there:
    those columns are the experts' mean, the rest is the least-squares merge of the others."""
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(20, 5, generator=g) for _ in range(2)]
    for x in xs:
        x[:, 3] = 0
    ws = [torch.randn(2, 5, generator=g) for _ in range(2)]
    got = regmean_weight(ws, [x.T @ x / 20 for x in xs], 1.0)
    live = [0, 1, 2, 4]
    want = lstsq_merge(
        [x[:, live].double().numpy() for x in xs], [w[:, live].double().numpy() for w in ws], 1.0
    )
    np.testing.assert_allclose(got[:, live].numpy(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[:, 3], (ws[0][:, 3] + ws[1][:, 3]) / 2)


# ---------------------------------------------------------------------------------------------
# RegMean: end to end through the Lightning Gram pass
# ---------------------------------------------------------------------------------------------


def test_regmean_fit_on_one_linear_layer_equals_least_squares(ctx):
    experts = random_linears(3, 6, 4)
    g = torch.Generator().manual_seed(3)
    inputs = [torch.randn(24, 6, generator=g) * (1 + t) + t for t in range(3)]
    pool = linear_pool(experts, inputs)
    out = RegMean(alpha=1.0, num_samples=None, batch_size=5, seed=0).fit(pool, ctx)
    want = lstsq_merge(
        [x.double().numpy() for x in inputs],
        [e.weight.detach().double().numpy() for e in experts],
        1.0,
    )
    np.testing.assert_allclose(out["weight"].numpy(), want, rtol=1e-4, atol=1e-5)
    # the bias is not a linear map's weight: averaged
    torch.testing.assert_close(out["bias"], torch.stack([e.bias.detach() for e in experts]).mean(0))


def test_regmean_fit_identical_inputs_is_average(ctx):
    """One linear layer sees the raw inputs, so identical test sets give identical Grams."""
    experts = random_linears(3, 6, 4, seed=4)
    x = torch.randn(32, 6)
    out = RegMean(num_samples=None, batch_size=8).fit(linear_pool(experts, [x] * 3), ctx)
    torch.testing.assert_close(
        out["weight"],
        torch.stack([e.weight.detach() for e in experts]).mean(0),
        rtol=1e-4,
        atol=1e-5,
    )


def test_regmean_one_expert_returns_it(ctx):
    pool = synthetic_pool(n_tasks=1, seed=5)
    method = RegMean(num_samples=16, batch_size=8)
    out = method.fit(pool, ctx)
    expert = pool.experts["task0"]
    assert method.regmean_keys_ and method.averaged_keys_
    for key, value in out.items():
        torch.testing.assert_close(value, expert[key], rtol=1e-4, atol=2e-5, msg=key)


def test_regmean_finds_the_open_clip_linear_maps():
    enc = synthetic_pool(n_tasks=1).pretrained_encoder()
    blocks = [f"transformer.resblocks.{i}" for i in range(len(enc.transformer.resblocks))]
    sites = {s.key: s for s in linear_sites(enc)}
    want = {
        f"{b}.{n}"
        for b in blocks
        for n in (
            "attn.in_proj_weight",
            "attn.out_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        )
    }
    assert set(sites) == want | {"proj"}
    assert not sites["proj"].transposed and sites["proj"].in_dim == enc.proj.shape[0]
    assert "proj" not in {s.key for s in linear_sites(enc, output_projection="average")}


def test_regmean_grams_equal_independent_activations(ctx):
    """Every Gram the hooks collect equals one built from activations taken another way:
    in_proj ← ln_1 output; out_proj ← the attention's output with out_proj set to the
    identity; c_fc ← ln_2 output; c_proj ← the GELU output; proj ← the class token after
    ln_post (open_clip's 'tok' pooling), and projᵀ·G·proj = the features' own Gram."""
    pool = synthetic_pool(n_tasks=1, seed=6)
    enc = pool.expert_encoder("task0")
    x = pool.test_sets["task0"].tensors[0][:12]
    grams = collect_grams(copy.deepcopy(enc), linear_sites(enc), images_loader(x, 5), ctx)

    ref = copy.deepcopy(enc)
    acts: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            acts.setdefault(name, []).append(out.detach().reshape(-1, out.shape[-1]))

        return hook

    def attention_values(name, attn):
        # a copy of the block's own attention module with an identity output projection,
        # run on the block's attention input: its output is what out_proj multiplies
        ident = copy.deepcopy(attn)
        with torch.no_grad():
            ident.out_proj.weight.copy_(torch.eye(attn.embed_dim))
            ident.out_proj.bias.zero_()

        def hook(module, args, output):
            z = ident(output, output, output, need_weights=False)[0]
            acts.setdefault(name, []).append(z.detach().reshape(-1, z.shape[-1]))

        return hook

    for i, block in enumerate(ref.transformer.resblocks):
        b = f"transformer.resblocks.{i}"
        block.ln_1.register_forward_hook(keep(f"{b}.attn.in_proj_weight"))
        block.ln_1.register_forward_hook(attention_values(f"{b}.attn.out_proj.weight", block.attn))
        block.ln_2.register_forward_hook(keep(f"{b}.mlp.c_fc.weight"))
        block.mlp.gelu.register_forward_hook(keep(f"{b}.mlp.c_proj.weight"))
    cls = []
    ref.ln_post.register_forward_hook(lambda m, a, o: cls.append(o[:, 0].detach()))
    with torch.no_grad():
        feats = torch.cat([enc(x[i : i + 5]) for i in range(0, 12, 5)])
        for i in range(0, 12, 5):
            ref(x[i : i + 5])
    acts["proj"] = cls
    assert set(acts) == set(grams)
    for key, parts in acts.items():
        a = torch.cat(parts)
        torch.testing.assert_close(grams[key], a.T @ a / len(a), rtol=1e-4, atol=1e-6, msg=key)
    p = enc.proj.detach()
    torch.testing.assert_close(p.T @ grams["proj"] @ p, feats.T @ feats / 12, rtol=1e-4, atol=1e-6)


def test_regmean_finds_every_hf_clip_linear_layer(ctx):
    enc = hf_clip_encoder()
    vision = enc.vision_model.config
    sites = linear_sites(enc)
    layers = enc.vision_model.encoder.layers
    names = (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    )
    want = {
        f"vision_model.encoder.layers.{i}.{n}.weight" for i in range(len(layers)) for n in names
    }
    assert {s.key for s in sites} == want  # the projection is a frozen buffer, not a site
    x = torch.randn(6, 3, vision.image_size, vision.image_size)
    grams = collect_grams(enc, sites, images_loader(x, 4), ctx)  # raises if a hook never fires
    q = grams["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(q, grams["vision_model.encoder.layers.0.self_attn.k_proj.weight"])
    assert torch.linalg.eigvalsh(q.double()).min() > -1e-5  # a Gram matrix: PSD


def test_regmean_rejects_bad_hyperparameters():
    with pytest.raises(ConfigError, match="alpha"):
        RegMean(alpha=1.5)
    with pytest.raises(ConfigError, match="output_projection"):
        RegMean(output_projection="drop")
    with pytest.raises(ConfigError, match="num_samples"):
        RegMean(num_samples=0)


# ---------------------------------------------------------------------------------------------
# Fisher
# ---------------------------------------------------------------------------------------------


def softmax_fisher(w: np.ndarray, b: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hand-derived Fisher of p = softmax(Wx + b) under y ~ p: ∇_W log p_y = (e_y − p) xᵀ, so
    E_y[(∇_W)²]_cj = Σy p_y (δ_cy − p_c)² x_j² = p_c (1 − p_c) x_j²; likewise for b."""
    z = x @ w.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    v = p * (1 - p)
    return (v[:, :, None] * (x**2)[:, None, :]).mean(0), v.mean(0)


def test_fisher_of_a_linear_softmax_model_is_hand_computed(ctx):
    (lin,) = random_linears(1, 5, 3, seed=7)
    x = torch.randn(20, 5) * 2
    fisher = compute_fisher(lin, nn.Identity(), images_loader(x, 6), ctx)
    fw, fb = softmax_fisher(
        lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy(), x.double().numpy()
    )
    np.testing.assert_allclose(fisher["weight"].numpy(), fw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fisher["bias"].numpy(), fb, rtol=1e-5, atol=1e-7)
    # Monte Carlo labels y ~ p estimate the same expectation
    sampled = compute_fisher(
        lin,
        nn.Identity(),
        images_loader(x, 6),
        ctx,
        estimator="sample",
        samples_per_example=3000,
        seed=1,
    )
    np.testing.assert_allclose(sampled["weight"].numpy(), fw, rtol=0.1, atol=1e-3)


@pytest.mark.parametrize("arch", ["open_clip", "hf_clip"])
def test_fisher_per_example_vjps_equal_a_brute_force_loop(ctx, arch):
    """Σ_x Σ_y p(y|x)(∇ log p(y|x))² by one backward per (example, class), against the
    batched one-hot VJPs — on open_clip's fused attention and on HF CLIP's."""
    from mergelab.pool.heads import ClassificationHead

    if arch == "open_clip":
        pool = synthetic_pool(n_tasks=1, seed=8, n_classes=3)
        enc, head = pool.expert_encoder("task0"), pool.heads["task0"]
        x = pool.test_sets["task0"].tensors[0][:4]
    else:
        enc = hf_clip_encoder()
        head = ClassificationHead(torch.randn(3, 16))
        x = torch.randn(3, 3, 32, 32)
    got = compute_fisher(copy.deepcopy(enc), head, images_loader(x, 4), ctx, grad_memory_mb=0.5)
    params = dict(enc.named_parameters())
    want = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        logp = torch.log_softmax(head(enc(x[i : i + 1])), -1)[0]
        for y in range(len(logp)):
            grads = torch.autograd.grad(
                logp[y], list(params.values()), retain_graph=True, allow_unused=True
            )
            for n, g in zip(params, grads):
                if g is not None:
                    want[n] += logp[y].exp().detach() * g**2 / len(x)
    assert set(got) == set(want)
    for n in params:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-9, msg=n)


def test_fisher_falls_back_to_one_vjp_at_a_time(ctx, monkeypatch):
    """Where an op has no vmap rule for its backward, the VJPs run one by one: same Fisher."""
    (lin,) = random_linears(1, 5, 3, seed=12)
    x = torch.randn(6, 5)
    want = compute_fisher(lin, nn.Identity(), images_loader(x, 3), ctx)
    grad = torch.autograd.grad

    def no_vmap(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("Batching rule not implemented")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_vmap)
    got = compute_fisher(lin, nn.Identity(), images_loader(x, 3), ctx)
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n)


def test_fisher_merge_of_linear_models_is_hand_computed(ctx):
    experts = random_linears(2, 4, 3, seed=9)
    g = torch.Generator().manual_seed(9)
    inputs = [torch.randn(16, 4, generator=g) * (1 + 2 * t) for t in range(2)]
    weights = [0.3, 0.7]
    out = FisherMerging(num_samples=None, batch_size=5, weights=weights, eps=1e-6).fit(
        linear_pool(experts, inputs), ctx
    )
    fs = [
        softmax_fisher(
            e.weight.detach().double().numpy(), e.bias.detach().double().numpy(), x.double().numpy()
        )
        for e, x in zip(experts, inputs)
    ]
    for i, key in enumerate(("weight", "bias")):
        num = sum(
            lam * (f[i] + 1e-6) * getattr(e, key).detach().double().numpy()
            for lam, f, e in zip(weights, fs, experts)
        )
        den = sum(lam * (f[i] + 1e-6) for lam, f in zip(weights, fs))
        np.testing.assert_allclose(out[key].numpy(), num / den, rtol=1e-5, atol=1e-6)


def test_fisher_equal_fishers_is_average():
    g = torch.Generator().manual_seed(10)
    values = [torch.randn(7, 3, generator=g) for _ in range(3)]
    fisher = torch.rand(7, 3, generator=g)
    torch.testing.assert_close(fisher_average(values, [fisher] * 3), torch.stack(values).mean(0))
    # and where every Fisher vanishes, ε makes it the λ-weighted average (not 0)
    zeros = [torch.zeros(7, 3)] * 3
    torch.testing.assert_close(
        fisher_average(values, zeros, [1.0, 2.0, 1.0]), (values[0] + 2 * values[1] + values[2]) / 4
    )


@pytest.mark.parametrize("estimator", ["exact", "sample"])
def test_fisher_one_expert_returns_it(ctx, estimator):
    pool = synthetic_pool(n_tasks=1, seed=11)
    out = FisherMerging(estimator=estimator, num_samples=8, batch_size=4, normalize=True).fit(
        pool, ctx
    )
    for key, value in out.items():
        torch.testing.assert_close(value, pool.experts["task0"][key], rtol=1e-6, atol=1e-7, msg=key)


def test_fisher_rejects_bad_hyperparameters(ctx):
    with pytest.raises(ConfigError, match="estimator"):
        FisherMerging(estimator="empirical")
    with pytest.raises(ConfigError, match="weights"):
        FisherMerging(weights=[-1.0, 1.0])
    with pytest.raises(ConfigError, match="one per task"):
        FisherMerging(weights=[1.0], num_samples=4).fit(synthetic_pool(n_tasks=2), ctx)


@pytest.mark.parametrize("which", ["regmean", "fisher"])
def test_statistics_pass_releases_the_expert(ctx, which):
    """After a Gram / Fisher pass the expert encoder is freed as soon as the caller drops
    it: the pass's Trainer ↔ LightningModule reference cycle, which holds the encoder, is
    collected inside the pass. The automatic collector is off, so only that can free it."""
    import gc
    import weakref

    x = torch.randn(6, 5)
    enc = nn.Linear(5, 3)
    ref = weakref.ref(enc)
    gc.disable()
    try:
        if which == "regmean":
            stats = collect_grams(enc, linear_sites(enc), images_loader(x, 3), ctx)
        else:
            stats = compute_fisher(enc, nn.Identity(), images_loader(x, 3), ctx)
        del enc
        assert ref() is None
    finally:
        gc.enable()
    assert set(stats) >= {"weight"}
