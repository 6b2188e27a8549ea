"""The real benchmark's formats, on miniatures built on the fly (no network): task_vectors
pickles with open_clip 2.0.x class names, FusionBench HF CLIP checkpoints, task_vectors-layout
image folders; safe loading; clear errors; and a CLI run end to end."""

from __future__ import annotations

import json
import os
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from mergelab.errors import CheckpointError, ConfigError
from mergelab.pool.checkpoints import load_checkpoint
from mergelab.pool.state import LazyStateDict
from mergelab.tasks.vit8 import TASKS, VIT8, load_test_set, resolve_tasks

try:  # tests/ as a package (relative import) or as a rootdir of plain modules
    from . import miniatures as M
except ImportError:
    import miniatures as M

TASKS2 = ["MNIST", "EuroSAT"]


def pickle_globals(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


@pytest.fixture(scope="module")
def tv(tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    ref = M.make_task_vectors_root(root / "ck", TASKS2)
    files = M.make_image_folders(root / "data", TASKS2 + ["DTD"])
    return root, ref, files


def tv_pool(root: Path, tasks=TASKS2, **kw):
    from mergelab.pool.task_vectors import build_pool

    args = dict(
        checkpoints=str(root / "ck"), data=str(root / "data"), model_cfg=M.TINY_CFG, pretrained=None
    )
    args.update(kw)
    return build_pool(list(tasks), str(root / "cache"), **args)


# --- task_vectors pickles -------------------------------------------------------------------


def test_miniature_pickle_uses_the_legacy_class_names(tv):
    root, _, _ = tv
    names = pickle_globals(root / "ck" / M.ARCH / "zeroshot.pt")
    assert {
        "open_clip.model VisualTransformer",
        "open_clip.model CLIP",
        "src.modeling ImageEncoder",
    } <= names
    assert not any(n.startswith("open_clip.transformer") for n in names)  # no modern names leak in


def test_legacy_image_encoder_loads_with_identical_weights_and_outputs(tv):
    from mergelab.pool.clip import vision_factory
    from mergelab.pool.task_vectors import vision_state

    root, ref, _ = tv
    ckpt = load_checkpoint(root / "ck" / M.ARCH / "MNIST" / "finetuned.pt")
    assert ckpt.kind == "image_encoder" and ckpt.class_name == "src.modeling.ImageEncoder"
    enc = vision_factory(M.TINY_CFG, quick_gelu=True)()
    expert = ref["experts"]["MNIST"]
    state = vision_state(ckpt.state_dict, enc.state_dict(), "expert")
    for k, v in expert.visual.state_dict().items():
        assert torch.equal(state[k], v), k
    enc.load_state_dict(state)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.eval()(x), expert.encode_image(x))


def test_pickled_head_loads_as_frozen_normalising_head(tv):
    root, ref, _ = tv
    ckpt = load_checkpoint(root / "ck" / M.ARCH / "head_EuroSAT.pt")
    assert ckpt.kind == "classification_head" and ckpt.attrs["normalize"] is True
    head, w = ckpt.head, ref["heads"]["EuroSAT"]
    assert torch.equal(head.weight, w) and torch.equal(head.bias, torch.zeros(10))
    f = torch.randn(4, 16)
    assert torch.allclose(head(f), (f / f.norm(dim=-1, keepdim=True)) @ w.t())
    assert not any(p.requires_grad for p in head.parameters())


def test_plain_state_dict_and_safetensors_load(tmp_path):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save(sd, tmp_path / "sd.pt")
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "sd.safetensors"))
    for name in ("sd.pt", "sd.safetensors"):
        c = load_checkpoint(tmp_path / name)
        assert c.kind == "state_dict" and c.head is None
        assert all(torch.equal(c.state_dict[k], v) for k, v in sd.items())


class _Payload:
    """A pickle that runs ``func(arg)`` when loaded naively."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


@pytest.mark.parametrize("how", ["os.system", "builtins.eval"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = _Payload(os.system, f"touch {marker}")
    else:
        payload = _Payload(eval, f"open({str(marker)!r}, 'w').write('x')")
    # Hidden inside an otherwise ordinary checkpoint, next to real tensors.
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2), "extra": payload}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "refusing" in str(e.value) and str(path) in str(e.value)
    assert ("system" in str(e.value)) if how == "os.system" else ("eval" in str(e.value))
    assert not marker.exists()
    # Control: the same file does run its payload under an unrestricted load.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_object_inside_an_image_encoder_is_refused(tmp_path):
    with M.legacy_modules() as (_, modeling):
        enc = modeling.ImageEncoder()
        enc.model = torch.nn.Linear(2, 2)
        enc.hook = _Payload(os.system, f"touch {tmp_path / 'pwned'}")
        torch.save(enc, tmp_path / "enc.pt")
    with pytest.raises(CheckpointError, match="allow-list"):
        load_checkpoint(tmp_path / "enc.pt")
    assert not (tmp_path / "pwned").exists()


def test_missing_and_malformed_files_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=str(tmp_path / "nope.pt")):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


# --- experts against θ0 -----------------------------------------------------------------------


class _HeaderOnly(LazyStateDict):
    """A lazy expert whose tensors must not be read (check_experts answers from headers)."""

    def __getitem__(self, key):
        raise AssertionError(f"check_experts read tensor {key!r}")


def test_check_experts_names_expert_key_and_shapes_or_dtypes(tmp_path):
    from mergelab.merge.base import check_experts
    from mergelab.merge.dare import Dare
    from mergelab.merge.task_arithmetic import TaskArithmetic
    from mergelab.merge.ties import Ties
    from mergelab.pool.state import save_state_dict

    theta0 = {"w": torch.zeros(4, 3), "b": torch.zeros(4), "step": torch.tensor(2)}
    good = {k: v + 1 if v.is_floating_point() else v.clone() for k, v in theta0.items()}
    wide = {**good, "w": torch.ones(4, 5)}
    for name, sd in {"theta0": theta0, "good": good, "wide": wide}.items():
        save_state_dict(sd, tmp_path / f"{name}.safetensors")
    lazy = {n: _HeaderOnly(tmp_path / f"{n}.safetensors") for n in ("theta0", "good", "wide")}

    check_experts(lazy["theta0"], {"a": lazy["good"], "b": lazy["good"]})  # headers only
    want = r"expert 'b': key 'w' has shape \(4, 5\), expected \(4, 3\)"
    with pytest.raises(CheckpointError, match=want):
        check_experts(lazy["theta0"], {"a": lazy["good"], "b": lazy["wide"]})
    # every merge checks before it computes: one clear error, not a bare torch shape error
    experts = {"a": good, "b": wide}
    for method in (TaskArithmetic(0.3), Ties(k=0.5), Dare(p=0.5, base="ties", ties_k=0.5)):
        with pytest.raises(CheckpointError, match=want):
            method.merge(theta0, experts)

    # dtypes: an integer buffer stored as float, or a float weight stored as integer, fails;
    # another float precision is accepted (merges compute in float32, return θ0's dtype)
    with pytest.raises(
        CheckpointError,
        match=r"expert 'a': key 'step' has dtype torch.float32, "
        r"expected torch.int64",
    ):
        check_experts(theta0, {"a": {**good, "step": torch.tensor(2.0)}})
    with pytest.raises(CheckpointError, match=r"key 'b' has dtype torch.int64, expected"):
        check_experts(theta0, {"a": {**good, "b": torch.zeros(4, dtype=torch.int64)}})
    with pytest.raises(CheckpointError, match=r"key 'step' has dtype torch.int32, expected"):
        check_experts(theta0, {"a": {**good, "step": torch.tensor(2, dtype=torch.int32)}})
    half = {**good, "w": good["w"].half()}
    check_experts(theta0, {"a": half})
    out = TaskArithmetic(1.0).merge(theta0, {"a": half})
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], good["w"])


# --- the task_vectors pool ------------------------------------------------------------------


def test_task_vectors_pool_provenance_lazy_experts_and_outputs(tv):
    root, ref, files = tv
    pool = tv_pool(root)
    assert pool.family == "task_vectors" and pool.backbone == M.ARCH and pool.tasks == TASKS2
    ck = pool.meta["checkpoints"]
    assert ck["pretrained"] == str(root / "ck" / M.ARCH / "zeroshot.pt")
    assert ck["experts"]["MNIST"] == str(root / "ck" / M.ARCH / "MNIST" / "finetuned.pt")
    assert ck["heads"]["EuroSAT"] == str(root / "ck" / M.ARCH / "head_EuroSAT.pt")
    assert all(isinstance(sd, LazyStateDict) for sd in pool.experts.values())
    for k, v in ref["clip"].visual.state_dict().items():
        assert torch.equal(pool.pretrained[k], v)
    x = torch.stack([pool.test_sets["MNIST"][i][0] for i in range(4)])
    with torch.no_grad():
        for t in TASKS2:
            assert torch.equal(pool.expert_encoder(t)(x), ref["experts"][t].encode_image(x))
        assert torch.equal(pool.heads["MNIST"].weight, ref["heads"]["MNIST"])
    # Labels follow the class order of the heads (EuroSAT: folder names in sorted order).
    assert [pool.test_sets["EuroSAT"][i][1] for i in range(10)] == [
        lab for _, lab in files["EuroSAT"]
    ]
    assert len(pool.test_sets["MNIST"]) == 10
    # The conversion is cached: a second build reuses the same safetensors files.
    again = tv_pool(root)
    assert again.experts["MNIST"].path == pool.experts["MNIST"].path


def test_merges_and_block_discovery_work_on_the_task_vectors_pool(tv):
    from mergelab.merge.weight_average import WeightAverage
    from mergelab.surgery.blocks import discover_blocks

    root, ref, _ = tv
    pool = tv_pool(root)
    merged = WeightAverage().merge(pool.pretrained, pool.experts)
    k = "transformer.resblocks.0.mlp.c_fc.weight"
    want = sum(e.visual.state_dict()[k] for e in ref["experts"].values()) / 2
    assert torch.allclose(merged[k], want, atol=1e-6)
    blocks = discover_blocks(pool.encoder(merged))
    assert len(blocks) == 2 and blocks.width == 32


def test_zero_shot_heads_from_the_text_tower_are_cached(tmp_path):
    import open_clip

    M.make_task_vectors_root(tmp_path / "ck", ["MNIST"], heads=False)
    M.make_image_folders(tmp_path / "data", ["MNIST"])
    clip = M.tiny_clip(seed=0)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    pool = tv_pool(tmp_path, tasks=["MNIST"], pretrained=str(tmp_path / "clip.pt"))
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    rows = []
    with torch.no_grad():
        for c in TASKS["MNIST"].classnames:
            e = clip.encode_text(tok([f'a photo of the number: "{c}".']))[0]
            rows.append(e / e.norm())  # one template: mean of one normalised embedding
    want = torch.stack(rows) * clip.logit_scale.exp()
    assert torch.allclose(pool.heads["MNIST"].weight, want, atol=1e-5)
    assert "zero-shot" in pool.meta["checkpoints"]["heads"]["MNIST"]
    cached = list((tmp_path / "cache").rglob("heads/MNIST-*.safetensors"))
    assert len(cached) == 1
    # A second build reads the cached head instead of running the text tower again.
    from mergelab.pool.state import save_state_dict

    save_state_dict({"weight": torch.full_like(want, 0.5)}, cached[0])
    again = tv_pool(tmp_path, tasks=["MNIST"], pretrained=str(tmp_path / "clip.pt"))
    assert torch.equal(again.heads["MNIST"].weight, torch.full_like(want, 0.5))


def test_bad_task_and_missing_files_give_one_clear_error(tv, tmp_path, monkeypatch):
    root, _, _ = tv
    with pytest.raises(ConfigError, match="valid tasks are: SUN397, Cars"):
        tv_pool(root, tasks=["MNIST", "ImageNet"])
    with pytest.raises(CheckpointError) as e:
        tv_pool(root, tasks=["MNIST", "DTD"])
    assert str(root / "ck" / M.ARCH / "DTD" / "finetuned.pt") in str(e.value)
    assert "task_vectors" in str(e.value)  # says how to obtain them
    monkeypatch.delenv("MERGELAB_CHECKPOINTS", raising=False)
    with pytest.raises(ConfigError, match="MERGELAB_CHECKPOINTS"):
        tv_pool(root, checkpoints=None)
    with pytest.raises(ConfigError) as e:
        tv_pool(root, data=str(tmp_path / "empty"), data_source="local")
    assert str(tmp_path / "empty" / "MNIST" / "test") in str(e.value)
    assert str(tmp_path / "empty" / "MNIST" / "raw") in str(e.value)


def test_env_vars_supply_the_roots(tv, monkeypatch):
    root, _, _ = tv
    monkeypatch.setenv("MERGELAB_CHECKPOINTS", str(root / "ck"))
    monkeypatch.setenv("MERGELAB_DATA", str(root / "data"))
    pool = tv_pool(root, checkpoints=None, data=None)
    assert pool.meta["checkpoints"]["experts"]["EuroSAT"].startswith(str(root / "ck"))


# --- data -----------------------------------------------------------------------------------


def test_vit8_registry_matches_the_benchmark():
    counts = {
        "Cars": 8,
        "DTD": 8,
        "EuroSAT": 3,
        "GTSRB": 3,
        "MNIST": 1,
        "RESISC45": 18,
        "SUN397": 2,
        "SVHN": 1,
    }
    classes = {
        "SUN397": 397,
        "Cars": 196,
        "RESISC45": 45,
        "EuroSAT": 10,
        "SVHN": 10,
        "GTSRB": 43,
        "MNIST": 10,
        "DTD": 47,
    }
    assert list(VIT8) == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
    for t in VIT8:
        assert len(TASKS[t].templates) == counts[t] and len(TASKS[t].classnames) == classes[t]
        assert (
            len(set(TASKS[t].templates)) == counts[t]
            and len(set(TASKS[t].classnames)) == classes[t]
        )
    assert [s.name for s in resolve_tasks(["mnist", "dtd"])] == ["MNIST", "DTD"]


def test_image_folders_resisc45_and_gtsrb_layouts(tmp_path):
    from PIL import Image

    files = M.make_image_folders(tmp_path, ["DTD"], per_class=1, max_classes=47)
    ds = load_test_set(TASKS["DTD"], tmp_path, None)
    assert [ds[i][1] for i in range(len(ds))] == [lab for _, lab in files["DTD"]]
    # RESISC45: class folders + the split file selects the test images.
    base = tmp_path / "resisc45" / "NWPU-RESISC45"
    for c in TASKS["RESISC45"].classnames[:3]:
        d = base / c.replace(" ", "_")
        d.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (8, 8)).save(d / f"{c.replace(' ', '_')}_{k}.jpg")
    (tmp_path / "resisc45" / "resisc45-test.txt").write_text("airport_1.jpg\nairplane_0.jpg\n")
    ds = load_test_set(TASKS["RESISC45"], tmp_path, None)
    assert sorted(ds[i][1] for i in range(len(ds))) == [0, 1]
    # GTSRB: images + the ground-truth table.
    images = tmp_path / "gtsrb" / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    for name in ("00000.ppm", "00001.ppm"):
        Image.new("RGB", (8, 8)).save(images / name)
    (tmp_path / "gtsrb" / "GT-final_test.csv").write_text(
        "Filename;Width;Height;ClassId\n00000.ppm;8;8;14\n00001.ppm;8;8;42\n"
    )
    ds = load_test_set(TASKS["GTSRB"], tmp_path, None)
    assert [ds[0][1], ds[1][1]] == [14, 42]


# --- FusionBench (HF CLIP) ------------------------------------------------------------------


def hf_pool(root: Path, tasks=TASKS2, **kw):
    from mergelab.pool.hf import build_pool

    args = dict(
        checkpoints=str(root / "ck"), heads=str(root / "ck" / "heads"), data=str(root / "data")
    )
    args.update(kw)
    return build_pool(list(tasks), str(root / "cache"), **args)


def test_fusionbench_pool_loads_hf_experts_with_identical_outputs(fb):
    from mergelab.surgery.blocks import discover_blocks

    root, ref = fb
    pool = hf_pool(root)
    assert pool.family == "fusionbench" and pool.backbone == "clip-vit-base-patch32"
    assert pool.meta["checkpoints"]["experts"]["EuroSAT"] == str(
        root / "ck" / "clip-vit-base-patch32_eurosat"
    )
    assert all(isinstance(sd, LazyStateDict) for sd in pool.experts.values())
    proj = ref["base"].visual_projection.weight
    x = torch.stack([pool.test_sets["MNIST"][i][0] for i in range(3)])
    with torch.no_grad():
        for t in TASKS2:
            want = ref["experts"][t](pixel_values=x).pooler_output @ proj.t()
            assert torch.allclose(pool.expert_encoder(t)(x), want, atol=1e-6)
        base_want = ref["base"].get_image_features(pixel_values=x)
        base_want = getattr(base_want, "pooler_output", base_want)
        assert torch.allclose(pool.pretrained_encoder()(x), base_want, atol=1e-5)
    assert torch.equal(pool.heads["MNIST"].weight, ref["heads"]["MNIST"])
    blocks = discover_blocks(pool.pretrained_encoder())
    assert (
        len(blocks) == 2
        and blocks.width == 32
        and blocks.names[0] == "vision_model.encoder.layers.0"
    )
    assert "visual_projection.weight" not in pool.pretrained  # shared, never merged


def test_fusionbench_missing_expert_names_path_and_how_to_get_it(fb, tmp_path):
    root, _ = fb
    with pytest.raises(CheckpointError) as e:
        hf_pool(root, tasks=["MNIST", "DTD"])
    assert str(root / "ck" / "clip-vit-base-patch32_dtd") in str(e.value)
    assert "huggingface-cli download tanganke/clip-vit-base-patch32_dtd" in str(e.value)


# --- the CLI, end to end --------------------------------------------------------------------

TINY_OVERRIDE = "model.model_cfg=" + json.dumps(M.TINY_CFG).replace('"', "").replace(" ", "")


def run_cli(*overrides, cache: Path, run_dir: Path):
    pytest.importorskip("mergelab.cli")
    args = [
        sys.executable,
        "-m",
        "mergelab",
        "logger=none",
        f"paths.cache_dir={cache}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def test_cli_runs_the_task_vectors_miniature_end_to_end(tv, tmp_path):
    root, _, _ = tv
    out = tmp_path / "run"
    r = run_cli(
        "model=clip-vit-b32",
        "tasks=vit8",
        f"tasks.names=[{','.join(TASKS2)}]",
        f"model.checkpoints={root / 'ck'}",
        f"model.data={root / 'data'}",
        "model.pretrained=null",
        TINY_OVERRIDE,
        "merge=task_arithmetic",
        cache=tmp_path / "cache",
        run_dir=out,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["family"] == "task_vectors" and res["backbone"] == "ViT-B-32"
    assert set(res["accuracy"]) == set(TASKS2)


def test_cli_runs_the_fusionbench_miniature_end_to_end(fb, tmp_path):
    root, _ = fb
    out = tmp_path / "run"
    r = run_cli(
        "model=hf-clip-vit-b32",
        f"tasks.names=[{','.join(TASKS2)}]",
        f"model.checkpoints={root / 'ck'}",
        f"model.heads={root / 'ck' / 'heads'}",
        f"model.data={root / 'data'}",
        "merge=ties",
        cache=tmp_path / "cache",
        run_dir=out,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["family"] == "fusionbench"


def test_cli_missing_checkpoint_is_one_clear_error(tmp_path):
    r = run_cli(
        "model=clip-vit-b32",
        "tasks=vit8",
        f"model.checkpoints={tmp_path / 'none'}",
        f"model.data={tmp_path}",
        cache=tmp_path / "cache",
        run_dir=tmp_path / "run",
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert str(tmp_path / "none" / "ViT-B-32" / "SUN397" / "finetuned.pt") in r.stderr
    assert not (tmp_path / "run" / "results.json").exists()
