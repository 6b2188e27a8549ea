"""Safe checkpoint loading: safetensors, plain torch state dicts (``weights_only``), and whole
pickled modules (task_vectors' ``ImageEncoder`` / ``ClassificationHead``, saved with open_clip
2.0.x) through a restricted unpickler.

A pickle can run arbitrary code when it is loaded, so whole-object checkpoints are never given
to ``pickle.load`` / ``torch.load(weights_only=False)``. Instead :class:`_RestrictedUnpickler`
resolves every global the stream names against an explicit allow-list:

- module classes (open_clip 2.0.x / today's open_clip, ``src.modeling``, ``torch.nn``,
  torchvision transforms) become inert :class:`PickledObject` records that only store the
  pickled attribute dict — no class from the checkpoint's world is ever imported or called;
- tensors are rebuilt by our own functions from the zip archive's raw storages;
- anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) is refused with a
  :class:`~mergelab.errors.CheckpointError` before it could be called.

The parameters are then read out of the record tree by module path, exactly as
``nn.Module.state_dict()`` would name them.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergelab.errors import CheckpointError
from mergelab.pool.heads import ClassificationHead

StateDict = dict[str, Tensor]

# --- the allow-list -----------------------------------------------------------------------

# Module classes whose pickled instances we read parameters from. Names are exactly those
# written by torch.save: open_clip 2.0.x kept everything in ``open_clip.model`` (with the old
# ``VisualTransformer`` name); today's open_clip splits it across ``transformer`` /
# ``modified_resnet``; task_vectors' classes live in ``src.modeling`` (or ``modeling`` when the
# scripts ran with ``src`` on sys.path, as the AdaMerging / Surgery repos do).
_OPEN_CLIP_CLASSES = {
    "CLIP",
    "CustomTextCLIP",
    "VisualTransformer",
    "VisionTransformer",
    "TextTransformer",
    "Transformer",
    "ResidualAttentionBlock",
    "LayerNorm",
    "LayerNormFp32",
    "QuickGELU",
    "LayerScale",
    "PatchDropout",
    "AttentionalPooler",
    "Attention",
    "ModifiedResNet",
    "Bottleneck",
    "AttentionPool2d",
}
_TASK_VECTORS_CLASSES = {
    "ImageEncoder",
    "ClassificationHead",
    "ImageClassifier",
    "MultiHeadImageClassifier",
}
_TORCH_NN = {
    "torch.nn.modules.linear": {"Linear", "Identity", "NonDynamicallyQuantizableLinear"},
    "torch.nn.modules.conv": {"Conv2d"},
    "torch.nn.modules.normalization": {"LayerNorm", "GroupNorm"},
    "torch.nn.modules.batchnorm": {"BatchNorm2d"},
    "torch.nn.modules.activation": {"MultiheadAttention", "GELU", "ReLU", "Softmax"},
    "torch.nn.modules.container": {"Sequential", "ModuleList", "ModuleDict", "ParameterList"},
    "torch.nn.modules.dropout": {"Dropout"},
    "torch.nn.modules.sparse": {"Embedding"},
    "torch.nn.modules.pooling": {"AvgPool2d", "AdaptiveAvgPool2d"},
}
MODULE_CLASSES: dict[str, set[str]] = {
    "open_clip.model": _OPEN_CLIP_CLASSES,
    "open_clip.transformer": _OPEN_CLIP_CLASSES,
    "open_clip.modified_resnet": _OPEN_CLIP_CLASSES,
    "src.modeling": _TASK_VECTORS_CLASSES,
    "modeling": _TASK_VECTORS_CLASSES,
    **_TORCH_NN,
}
# Non-module objects that ride along in an ImageEncoder (its preprocessing pipelines). They
# become inert records too; their content is never used.
OTHER_CLASSES: dict[str, set[str]] = {
    "torchvision.transforms.transforms": {
        "Compose",
        "Resize",
        "CenterCrop",
        "ToTensor",
        "Normalize",
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "Lambda",
    },
    "torchvision.transforms.functional": {"InterpolationMode"},
    "open_clip.transform": {"_convert_to_rgb", "ResizeMaxSize", "ResizeKeepRatio"},
}
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class PickledObject:
    """An inert stand-in for an allow-listed pickled object: it records the class name, the
    constructor arguments and the pickled state, and has no behaviour at all."""

    qualname = "?"
    is_module = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = {}

    def __setstate__(self, state: Any) -> None:
        # (dict, slots) pairs come from classes with __slots__; keep the dict part.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.qualname}>"


def _record_class(module: str, name: str, is_module: bool) -> type[PickledObject]:
    return type(name, (PickledObject,), {"qualname": f"{module}.{name}", "is_module": is_module})


class _Storage:
    """A storage type named in a pickle (``torch.FloatStorage`` ...): only its dtype is used."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, *_ignored: Any) -> Tensor:
    """Our replacement for ``torch._utils._rebuild_tensor_v2``: a strided view of a flat
    storage tensor, bounds-checked, so a crafted size/stride cannot read outside it."""
    if not isinstance(storage, Tensor):
        raise CheckpointError("malformed checkpoint: a tensor does not point at a storage")
    size, stride, offset = tuple(int(n) for n in size), tuple(int(n) for n in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in stride):
        raise CheckpointError("malformed checkpoint: a tensor has an invalid size or stride")
    if all(n > 0 for n in size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel():
            raise CheckpointError("malformed checkpoint: a tensor reaches outside its storage")
    return storage.as_strided(size, stride, offset)


def _rebuild_parameter(data: Tensor, requires_grad: bool = False, *_ignored: Any) -> Tensor:
    return data


_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


def allowed_globals() -> list[str]:
    """Every ``module.name`` the restricted unpickler resolves (for docs and error messages)."""
    names = [f"{m}.{n}" for m, ns in {**MODULE_CLASSES, **OTHER_CLASSES}.items() for n in ns]
    names += [f"{m}.{n}" for m, n in _FUNCTIONS]
    names += [f"torch.{s}" for s in _STORAGE_DTYPES]
    return sorted(names)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves globals only through the allow-list; storages come from the zip archive."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: dict[str, Tensor] = {}
        self._records: dict[tuple[str, str], type[PickledObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":  # protocol-2 pickles use the Python 2 module name
            module = "builtins"
        if (module, name) in _FUNCTIONS:
            return _FUNCTIONS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(_STORAGE_DTYPES[name])
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        for table, is_module in ((MODULE_CLASSES, True), (OTHER_CLASSES, False)):
            if name in table.get(module, ()):
                key = (module, name)
                if key not in self._records:
                    self._records[key] = _record_class(module, name, is_module)
                return self._records[key]
        raise CheckpointError(
            f"refusing to load {self._path}: the pickle references {module}.{name}, which is not "
            "on mergelab's allow-list of checkpoint classes (nothing from the file was run). "
            "If the file is trusted, re-save it as a plain state dict or safetensors."
        )

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"malformed checkpoint {self._path}: unknown persistent id")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _Storage):
            raise CheckpointError(f"malformed checkpoint {self._path}: unknown storage type")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._prefix}data/{key}")
            except KeyError:
                raise CheckpointError(
                    f"{self._path} is truncated: storage {key} is missing"
                ) from None
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(storage_type.dtype)
            if flat.numel() < int(numel):
                raise CheckpointError(f"{self._path} is truncated at storage {key}")
            self._storages[key] = flat
        return self._storages[key]


def _unpickle_restricted(path: Path) -> Any:
    """Read a torch zip checkpoint with the restricted unpickler."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (legacy pre-1.6 torch format or a raw pickle); "
            "mergelab only reads the zip format safely. Re-save it from a trusted environment."
        )
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in archive.namelist() and archive.read(order).strip() != b"little":
            raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
        with archive.open(pkl[0]) as f:
            try:
                return _RestrictedUnpickler(f, archive, prefix, path).load()
            except CheckpointError:
                raise
            except Exception as e:  # a malformed stream: name the file, never half-load
                raise CheckpointError(
                    f"cannot read checkpoint {path}: {type(e).__name__}: {e}"
                ) from e


def module_state(obj: PickledObject, prefix: str = "") -> StateDict:
    """The ``state_dict()`` of a pickled module record: persistent parameters and buffers,
    keyed by module path exactly as ``nn.Module.state_dict`` names them."""
    out: StateDict = {}
    st = obj.state if isinstance(obj.state, Mapping) else {}
    skip = set(st.get("_non_persistent_buffers_set", ()) or ())
    for name, t in (st.get("_parameters") or {}).items():
        if t is not None:
            out[prefix + name] = t
    for name, t in (st.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            out[prefix + name] = t
    for name, child in (st.get("_modules") or {}).items():
        if isinstance(child, PickledObject) and child.is_module:
            out.update(module_state(child, f"{prefix}{name}."))
    return out


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` read.

    - ``state_dict``: tensors by name (for a pickled module, its ``state_dict()``);
    - ``kind``: ``"state_dict"`` (plain dict / safetensors), ``"image_encoder"``,
      ``"classification_head"`` or ``"module"`` (another allow-listed module);
    - ``class_name``: the pickled root class (``src.modeling.ImageEncoder`` ...), if any;
    - ``head``: a frozen :class:`ClassificationHead` for head files, else ``None``.
    """

    state_dict: StateDict
    kind: str
    path: Path
    class_name: str | None = None
    head: ClassificationHead | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values())


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load any supported checkpoint safely (no pickled code ever runs).

    ``.safetensors`` files and plain torch state dicts go through safetensors /
    ``torch.load(weights_only=True)``; whole pickled modules (task_vectors' ``ImageEncoder``,
    ``ClassificationHead``) through the restricted unpickler. A missing file, a refused global
    or a malformed archive raise :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return Checkpoint(dict(load_file(str(path))), "state_dict", path)

    obj: Any = None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        obj = None  # not a plain state dict (or legacy): fall through to the restricted reader
    if obj is not None:
        # open_clip training checkpoints wrap the weights as {"state_dict": ..., "epoch": ...}
        if isinstance(obj, Mapping) and _is_tensor_dict(obj.get("state_dict")):
            obj = obj["state_dict"]
        if _is_tensor_dict(obj):
            return Checkpoint(dict(obj), "state_dict", path)

    root = _unpickle_restricted(path)
    if _is_tensor_dict(root):
        return Checkpoint(dict(root), "state_dict", path)
    if not (isinstance(root, PickledObject) and root.is_module):
        raise CheckpointError(
            f"{path}: expected a state dict or a pickled module, got {type(root).__name__}"
        )
    state = module_state(root)
    name = root.qualname
    attrs = {k: v for k, v in root.state.items() if isinstance(v, (bool, int, float, str))}
    if name.endswith(".ClassificationHead"):
        if "weight" not in state:
            raise CheckpointError(f"{path}: classification head without a 'weight' tensor")
        head = ClassificationHead(
            state["weight"].float(),
            state["bias"].float() if "bias" in state else None,
            normalize=bool(attrs.get("normalize", True)),
        )
        return Checkpoint(state, "classification_head", path, name, head, attrs)
    kind = "image_encoder" if name.endswith(".ImageEncoder") else "module"
    return Checkpoint(state, kind, path, name, None, attrs)
