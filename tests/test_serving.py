"""The evaluated model as an MLflow pyfunc model: saved with a signature and an input example,
loaded back by ``mlflow.pyfunc.load_model`` in a fresh process, it predicts what the model does
on the evaluation's own preprocessing, from bytes, paths and uint8 arrays."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.data import EvalTransform, Normalize
from pipeline.model import vit_from_config
from pipeline.serving import CLASSIFIER, Classifier, save_pyfunc, write_model_folder

from tests.helpers import ROOT


def encoded(array: np.ndarray, fmt: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt)
    return out.getvalue()


def data_folder(saved):
    """The data folder inside the saved MLflow model (MLflow copies it under data/)."""
    return next(saved["path"].rglob(CLASSIFIER)).parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    config = load_config(ROOT / "configs/demo/evaluate.yaml")
    torch.manual_seed(0)
    model = vit_from_config(config.model)
    model.init_weights()
    classes = [f"digit-{i}" for i in range(config.model.num_classes)]
    folder = write_model_folder(tmp / "data", model.state_dict(), config, classes)
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 24), (16, 16), (30, 18), (8, 8))]
    images = [encoded(a, "PNG") for a in arrays[:2]] + [encoded(a, "JPEG") for a in arrays[2:]]
    # the model as evaluation runs it: its transform, normalisation and precision
    with torch.no_grad():
        expected = model.to(torch.bfloat16).eval()(Normalize(config.data.mean, config.data.std)(
        torch.stack([EvalTransform(config.model.image_size, config.data.crop_pct)(b) for b in images])
        ).bfloat16()).float().softmax(-1)
    path = save_pyfunc(tmp / "pyfunc", folder, images[:2])
    return {"tmp": tmp, "path": path, "images": images, "arrays": arrays, "expected": expected, "classes": classes}


def test_the_classifier_predicts_the_evaluated_model(saved):
    out = Classifier(data_folder(saved)).predict(__import__("pandas").DataFrame({"image": saved["images"]}))
    best, ids = saved["expected"].max(-1)
    assert out["class_id"].tolist() == ids.tolist()
    assert out["class_name"].tolist() == [saved["classes"][i] for i in ids.tolist()]
    np.testing.assert_allclose(out["probability"], best.numpy(), rtol=1e-6)


def test_the_saved_model_carries_signature_example_and_no_pickle(saved):
    mlmodel = (saved["path"] / "MLmodel").read_text()
    assert "loader_module: pipeline.serving" in mlmodel and "signature:" in mlmodel
    assert '"name": "image"' in mlmodel and '"type": "binary"' in mlmodel and '"name": "path"' in mlmodel
    assert (saved["path"] / "input_example.json").is_file()
    assert not list(saved["path"].rglob("*.pkl"))
    pinned = (saved["path"] / "requirements.txt").read_text()
    assert "torch==" in pinned and "safetensors==" in pinned and "pytest" not in pinned  # no test extra
    assert {p.name for p in data_folder(saved).iterdir()} == {"model.safetensors", "model.json", CLASSIFIER}
    spec = json.loads((data_folder(saved) / CLASSIFIER).read_text())
    assert spec["dtype"] == "bfloat16" and spec["classes"][3] == "digit-3" and spec["preprocess"]["image_size"] == 16


def test_pyfunc_load_in_a_fresh_process_takes_bytes_paths_and_arrays(saved):
    tmp = saved["tmp"]
    paths = []
    for i, data in enumerate(saved["images"]):
        paths.append(tmp / f"img{i}")
        paths[-1].write_bytes(data)
    np.save(tmp / "arrays.npy", np.stack([saved["arrays"][1]] * 2))  # uint8 (N, H, W, 3)
    script = f"""
import json, mlflow, numpy as np, pandas as pd
from pathlib import Path
model = mlflow.pyfunc.load_model({str(saved['path'])!r})
images = [Path(p).read_bytes() for p in {[str(p) for p in paths]!r}]
by_bytes = model.predict(pd.DataFrame({{"image": images}}))
by_path = model.predict(pd.DataFrame({{"path": {[str(p) for p in paths]!r}}}))
by_array = model.get_raw_model().predict(np.load({str(tmp / 'arrays.npy')!r}))
print(json.dumps([by_bytes["class_id"].tolist(), by_path["class_id"].tolist(), by_array["class_id"].tolist()]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    by_bytes, by_path, by_array = json.loads(result.stdout.strip().splitlines()[-1])
    ids = saved["expected"].argmax(-1).tolist()
    assert by_bytes == by_path == ids
    assert by_array == [ids[1]] * 2  # the PNG of an array holds its pixels exactly


def test_bad_input_is_named(saved):
    import pandas as pd

    model = Classifier(data_folder(saved))
    with pytest.raises(ValueError, match="'image' .* or 'path' column"):
        model.predict(pd.DataFrame({"pixels": [b"x"]}))
    with pytest.raises(ValueError, match=r"rows \[1\] have neither"):
        model.predict(pd.DataFrame({"image": [saved["images"][0], None]}))
    with pytest.raises(ValueError, match="must be uint8"):
        model.predict(np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_a_pre_logits_model_keeps_its_head_and_has_no_timm_arguments(tmp_path):
    config = load_config(ROOT / "configs/demo/evaluate.yaml", ["model.pre_logits=32"])
    model = vit_from_config(config.model)
    model.init_weights()
    folder = write_model_folder(tmp_path / "data", model.state_dict(), config, [])
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", CLASSIFIER}  # timm has no pre-logits layer
    out = Classifier(folder).predict([encoded(np.zeros((16, 16, 3), dtype=np.uint8), "PNG")])
    assert out["class_name"].tolist() == [str(out["class_id"][0])]  # no class names: the ids
