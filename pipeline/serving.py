"""The evaluated model as an MLflow pyfunc model: what the evaluation stage logs and registers,
and what ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run.

Its data folder holds ``model.safetensors`` (the evaluated weights under timm's names),
``model.json`` (timm's arguments) and ``classifier.json`` (the model settings, the evaluation
preprocessing, the precision and the class names). MLflow loads it through this module's
:func:`_load_pyfunc` (the ``loader_module`` flavor): nothing in the model is unpickled, and the
code that runs is the installed pipeline's (serve with ``--env-manager local`` in its
environment).

``predict`` takes a DataFrame with an ``image`` column (encoded image bytes; base64 in a REST
request) or a ``path`` column (image files); the raw model (``get_raw_model()``) also takes a
uint8 array (N, H, W, 3) or a list of images. It returns one row per image: ``class_id``,
``class_name`` and ``probability``. Images go through the evaluation's own resize and center
crop, so predictions are the evaluation's.
"""

from __future__ import annotations

import io
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

CLASSIFIER = "classifier.json"
WEIGHTS = "model.safetensors"
BATCH = 64


def write_model_folder(folder: Path, state: dict[str, torch.Tensor], config, classes: list[str]) -> Path:
    """The pyfunc model's data folder for the weights ``state`` of the model ``config``
    describes, as the stage ``config`` evaluates it: the weights (timm's names), timm's arguments
    where timm can rebuild the model (no pre-logits layer), and ``classifier.json``."""
    from pipeline.model import vit_from_config
    from pipeline.model.weights import export_safetensors
    from pipeline.train.ds_config import compute_dtype

    c = config
    with torch.device("meta"):
        model = vit_from_config(c.model)
    _, timm_json = export_safetensors(state, model, folder / WEIGHTS, keep_pre_logits=True)
    if c.model.pre_logits:
        timm_json.unlink()
    (folder / CLASSIFIER).write_text(json.dumps({
        "model": c.model.model_dump(mode="json"),
        "preprocess": {"image_size": c.model.image_size, "crop_pct": c.data.crop_pct, "mean": list(c.data.mean),
                       "std": list(c.data.std)},
        "dtype": str(compute_dtype(c)).removeprefix("torch."),
        "classes": [classes[i] if i < len(classes) else str(i) for i in range(c.model.num_classes)],
    }, indent=1) + "\n")
    return folder


class Classifier:
    """The model of a data folder (:func:`write_model_folder`), on the CPU, in eval mode."""

    def __init__(self, folder: str | Path):
        from safetensors.torch import load_file

        from pipeline.config import ModelConfig
        from pipeline.data import EvalTransform, Normalize
        from pipeline.model import vit_from_config

        folder = Path(folder)
        spec = json.loads((folder / CLASSIFIER).read_text())
        self.classes, pre = spec["classes"], spec["preprocess"]
        self.dtype = getattr(torch, spec["dtype"])
        self.model = vit_from_config(ModelConfig.model_validate(spec["model"]))
        self.model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
        self.model.to(self.dtype).eval()
        self.transform = EvalTransform(pre["image_size"], pre["crop_pct"])
        self.normalize = Normalize(pre["mean"], pre["std"])

    def get_raw_model(self) -> "Classifier":
        """What ``PyFuncModel.get_raw_model()`` returns: this object, whose ``predict`` takes
        uint8 arrays without the DataFrame signature's check."""
        return self

    def predict(self, model_input, params: dict | None = None):
        import pandas as pd

        images = [self._encoded(item) for item in _items(model_input)]
        ids, probabilities = [], []
        with torch.no_grad():
            for start in range(0, len(images), BATCH):
                batch = torch.stack([self.transform(data) for data in images[start:start + BATCH]])
                probs = self.model(self.normalize(batch).to(self.dtype)).float().softmax(-1)
                best, index = probs.max(-1)
                ids += index.tolist()
                probabilities += best.tolist()
        return pd.DataFrame({"class_id": ids, "class_name": [self.classes[i] for i in ids],
                             "probability": probabilities})

    @staticmethod
    def _encoded(item) -> bytes:
        """Encoded bytes of one image: bytes as given, a file's bytes, or a uint8 array as PNG."""
        if isinstance(item, (bytes, bytearray, memoryview)):
            return bytes(item)
        if isinstance(item, (str, Path)):
            return Path(item).read_bytes()
        from PIL import Image

        array = np.asarray(item)
        if array.dtype != np.uint8 or array.ndim not in (2, 3):
            raise ValueError(f"an image array must be uint8 (H, W) or (H, W, 3), not {array.dtype} {array.shape}")
        out = io.BytesIO()
        Image.fromarray(array).save(out, format="PNG")  # lossless: the same pixels through the same crop
        return out.getvalue()


def _items(model_input) -> list:
    """The images of a predict call, one item each."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "image" not in model_input and "path" not in model_input:
            raise ValueError(f"expected an 'image' (encoded bytes) or 'path' column, got {list(model_input.columns)}")
        images = model_input["image"] if "image" in model_input else [None] * len(model_input)
        paths = model_input["path"] if "path" in model_input else [None] * len(model_input)
        items = [image if isinstance(image, (bytes, bytearray)) else path for image, path in zip(images, paths)]
        missing = [i for i, item in enumerate(items) if not isinstance(item, (bytes, bytearray, str))]
        if missing:
            raise ValueError(f"rows {missing[:10]} have neither image bytes nor a path")
        return items
    if isinstance(model_input, np.ndarray):
        return list(model_input) if model_input.ndim == 4 else [model_input]
    return list(model_input)


def _load_pyfunc(data_path: str) -> Classifier:
    """MLflow's entry point for the ``loader_module`` flavor."""
    return Classifier(data_path)


def requirements() -> list[str]:
    """The pipeline's own requirements (its ``pyproject.toml`` dependencies, as the installed
    distribution declares them), pinned at their installed versions: the model runs in the
    pipeline's environment."""
    from packaging.requirements import Requirement

    try:
        declared = [Requirement(r) for r in metadata.requires("vit-pipeline") or []]
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return []
    found = []
    for requirement in declared:
        if requirement.marker is not None:  # an extra (test, demo, bench)
            continue
        try:
            found.append(f"{requirement.name}=={metadata.version(requirement.name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return found


def save_pyfunc(path: Path, folder: Path, examples: list[bytes]) -> Path:
    """An MLflow model at ``path`` over the data ``folder``, with its signature and ``examples``
    (a few encoded images) as the input example."""
    import mlflow
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    example = pd.DataFrame({"image": examples})
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]),
        outputs=Schema([ColSpec("long", "class_id"), ColSpec("string", "class_name"),
                        ColSpec("double", "probability")]))
    mlflow.pyfunc.save_model(str(path), loader_module=__name__, data_path=str(folder), signature=signature,
                             input_example=example, pip_requirements=requirements())
    return path
