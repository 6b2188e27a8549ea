"""The Hugging Face code paths of the real-benchmark loaders, offline on miniatures:
zero-shot heads from the base CLIP text tower (mergelab.pool.hf, ``heads: null``) and test sets
read from Hugging Face datasets already on disk (mergelab.tasks.vit8, ``source="hf"``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mergelab.errors import CheckpointError, ConfigError
from mergelab.tasks.vit8 import TASKS, load_test_set

try:  # tests/ as a package (relative import) or as a rootdir of plain modules
    from . import miniatures as M
except ImportError:
    import miniatures as M

TASKS2 = ["MNIST", "EuroSAT"]

# --- zero-shot heads from the HF CLIP text tower --------------------------------------------


def zs_pool(root: Path, **kw):
    from mergelab.pool.hf import build_pool

    args = dict(checkpoints=str(root / "ck"), heads=None, data=str(root / "data"))
    args.update(kw)
    return build_pool(TASKS2, str(root / "cache"), **args)


def hand_zero_shot(base, tokenizer, task: str) -> torch.Tensor:
    """CLIP's zero-shot head by hand, one unpadded prompt at a time: the end-of-text token's
    final hidden state (the last token), projected; per class L2-normalise each template's
    embedding, average, re-normalise; × exp(logit_scale)."""
    spec = TASKS[task]
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    rows = []
    with torch.no_grad():
        for c in spec.classnames:
            embs = []
            for prompt in spec.prompts(c):
                ids = torch.tensor([tokenizer(prompt)["input_ids"]])
                # The miniature must be meaningful: every character known (no unknown token,
                # which CLIP spells as end-of-text), exactly one end-of-text, at the end, and
                # no truncation.
                assert (ids[0, :-1] != eos).all() and ids[0, -1] == eos, prompt
                assert ids.shape[1] <= base.config.text_config.max_position_embeddings
                hidden = base.text_model(input_ids=ids).last_hidden_state[0, -1]
                e = base.text_projection(hidden)
                embs.append(e / e.norm())
            mean = torch.stack(embs).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows) * base.logit_scale.exp()


def test_zero_shot_heads_equal_the_hand_computation(fb):
    from transformers import AutoTokenizer

    root, ref = fb
    pool = zs_pool(root)
    tokenizer = AutoTokenizer.from_pretrained(root / "ck" / "clip-vit-base-patch32")
    for t in TASKS2:
        want = hand_zero_shot(ref["base"], tokenizer, t)
        got = pool.heads[t].weight
        assert got.shape == (len(TASKS[t].classnames), 16)
        # EuroSAT's 3 templates batch prompts of different lengths (padding) together.
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), t
        assert "zero-shot from" in pool.meta["checkpoints"]["heads"][t]
    # The head classifies the merged features: logits = scaled cosine with each class row.
    x = torch.stack([pool.test_sets["EuroSAT"][i][0] for i in range(2)])
    with torch.no_grad():
        f = pool.pretrained_encoder()(x)
        logits = pool.heads["EuroSAT"](f)
    f = f / f.norm(dim=-1, keepdim=True)
    assert torch.allclose(
        logits, f @ hand_zero_shot(ref["base"], tokenizer, "EuroSAT").t(), atol=1e-4
    )


def test_cached_zero_shot_heads_are_reused_without_the_text_tower(fb, monkeypatch):
    import transformers

    root, _ = fb
    first = zs_pool(root)
    cached = sorted((root / "cache").rglob("heads/*.safetensors"))
    assert len(cached) == len(TASKS2)
    stamps = {p: p.stat().st_mtime_ns for p in cached}

    def refuse(*a, **k):
        raise AssertionError("the text tower was loaded although every head is cached")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    again = zs_pool(root)
    for t in TASKS2:
        assert torch.equal(again.heads[t].weight, first.heads[t].weight)
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # read, not rewritten


def test_zero_shot_heads_without_tokenizer_files_is_one_clear_error(tmp_path):
    pytest.importorskip("transformers")
    M.make_fusionbench_root(tmp_path / "ck", ["MNIST"], tokenizer=False)
    M.make_image_folders(tmp_path / "data", ["MNIST"])
    from mergelab.pool.hf import build_pool

    with pytest.raises(CheckpointError) as e:
        build_pool(
            ["MNIST"],
            str(tmp_path / "cache"),
            checkpoints=str(tmp_path / "ck"),
            data=str(tmp_path / "data"),
        )
    msg = str(e.value)
    assert str(tmp_path / "ck" / "clip-vit-base-patch32") in msg and "model.heads=" in msg


# --- Hugging Face datasets on disk ----------------------------------------------------------


def pixels(ds) -> list[tuple[np.ndarray, int]]:
    return [(np.asarray(img), label) for img, label in (ds[i] for i in range(len(ds)))]


def expected(ds) -> list[tuple[np.ndarray, int]]:
    return [(np.asarray(r["image"].convert("RGB")), r["label"]) for r in ds]


def assert_same(got, want):
    assert len(got) == len(want)
    for (a, la), (b, lb) in zip(got, want):
        assert la == lb and a.shape == b.shape and (a == b).all()


@pytest.fixture
def offline_datasets_cache(tmp_path, monkeypatch):
    """Keep everything `datasets` writes inside tmp_path (never the user's cache)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds-cache")
    return datasets


def test_hf_dataset_saved_to_disk_under_the_data_root(tmp_path, offline_datasets_cache):
    datasets = offline_datasets_cache
    test = M.tiny_hf_dataset(10, 7, seed=1)
    # a DatasetDict under <root>/<owner>/<name> and a bare Dataset under <root>/<name>
    datasets.DatasetDict({"train": M.tiny_hf_dataset(10, 3), "test": test}).save_to_disk(
        str(tmp_path / "data" / "tanganke" / "eurosat")
    )
    mnist = M.tiny_hf_dataset(10, 5, seed=2, mode="L")
    mnist.save_to_disk(str(tmp_path / "data" / "mnist"))
    got = load_test_set(TASKS["EuroSAT"], tmp_path / "data", None, source="hf")
    assert_same(pixels(got), expected(test))
    got = load_test_set(TASKS["MNIST"], tmp_path / "data", None, source="hf")
    assert_same(pixels(got), expected(mnist))  # grayscale comes back as RGB
    # auto: no image folder there, so the HF copy is used; the CLIP transform is applied
    from mergelab.pool.clip import clip_transform

    tf = clip_transform({"vision_cfg": {"image_size": 16}})
    got = load_test_set(TASKS["EuroSAT"], tmp_path / "data", tf, source="auto", max_items=3)
    assert len(got) == 3 and got[0][0].shape == (3, 16, 16)


def test_hf_dataset_repository_copy_with_a_config(tmp_path, offline_datasets_cache):
    test = M.tiny_hf_dataset(10, 6, seed=3)
    M.write_hf_dataset_repo(
        tmp_path / "data" / "svhn",
        {"train": M.tiny_hf_dataset(10, 2), "test": test},
        config="cropped_digits",  # SVHN's HF dataset needs its config name
    )
    got = load_test_set(TASKS["SVHN"], tmp_path / "data", None, source="hf")
    assert_same(pixels(got), expected(test))


def test_hf_dataset_split_missing_is_one_clear_error(tmp_path, offline_datasets_cache):
    datasets = offline_datasets_cache
    datasets.DatasetDict({"train": M.tiny_hf_dataset(10, 2)}).save_to_disk(
        str(tmp_path / "data" / "eurosat")
    )
    with pytest.raises(ConfigError, match=r"EuroSAT: .* has splits \['train'\], expected 'test'"):
        load_test_set(TASKS["EuroSAT"], tmp_path / "data", None, source="hf")


HUB_SCRIPT = """
import json, sys
import numpy as np
from mergelab.errors import ConfigError
from mergelab.tasks.vit8 import TASKS, load_test_set
try:
    ds = load_test_set(TASKS[sys.argv[1]], None, None, source="hf")
    print(json.dumps([[np.asarray(x).tolist(), y] for x, y in (ds[i] for i in range(len(ds)))]))
except ConfigError as e:
    print(json.dumps({"error": str(e)}))
"""


def run_offline(task: str, home: Path):
    """load_test_set in a fresh process whose HF caches live under ``home``, offline, as a
    user's would after downloading on a machine with network."""
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("MERGELAB_DATA", None)
    out = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, task],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_hf_dataset_from_the_hub_cache_offline(tmp_path):
    pytest.importorskip("datasets")
    test = M.tiny_hf_dataset(10, 5, seed=4)
    M.write_hub_cache_snapshot(
        tmp_path / "hf" / "hub",
        "tanganke/eurosat",
        {"train": M.tiny_hf_dataset(10, 2), "test": test},
    )
    got = run_offline("EuroSAT", tmp_path / "hf")
    assert_same([(np.asarray(x, dtype=np.uint8), y) for x, y in got], expected(test))
    # nothing cached for DTD: one clear error naming the dataset and how to fetch it
    err = run_offline("DTD", tmp_path / "hf")["error"]
    assert "tanganke/dtd" in err and "huggingface-cli download --repo-type dataset" in err
