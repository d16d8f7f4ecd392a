"""DeiT's distillation loss, and the teacher a config names."""

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DistillConfig, load_config
from pipeline.errors import MissingInput, WrongInput
from pipeline.train.distill import check_same_teacher, distillation_loss, teacher_identity, teacher_spec


def test_hard_distillation_trains_the_second_head_on_the_teachers_argmax():
    torch.manual_seed(0)
    cls, dist, teacher = torch.randn(3, 8, 10).unbind(0)
    labels = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    loss, base, term = distillation_loss((cls, dist), labels, teacher, DistillConfig(type="hard", teacher="t",
                                                                                     alpha=0.5))
    torch.testing.assert_close(base, F.cross_entropy(cls, labels))
    torch.testing.assert_close(term, F.cross_entropy(dist, teacher.argmax(-1)))
    torch.testing.assert_close(loss, 0.5 * base + 0.5 * term)


def test_soft_distillation_is_tau_squared_kl_from_the_teacher():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 5).unbind(0)
    labels = torch.tensor([0, 1, 2, 3])
    d = DistillConfig(type="soft", teacher="t", alpha=0.1, tau=3.0)
    loss, base, term = distillation_loss(student, labels, teacher, d)  # one head: the usual distillation
    p_teacher = (teacher / 3).softmax(-1)
    kl = (p_teacher * (p_teacher.log() - (student / 3).log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(term, kl * 9)
    torch.testing.assert_close(loss, 0.9 * F.cross_entropy(student, labels) + 0.1 * kl * 9)
    assert distillation_loss(teacher, labels, teacher, d)[2].abs() < 1e-6  # nothing to learn from itself


def test_without_a_teacher_both_heads_learn_the_labels():
    torch.manual_seed(0)
    cls, dist = torch.randn(2, 4, 5).unbind(0)
    labels = torch.tensor([0, 1, 2, 3])
    loss, base, term = distillation_loss((cls, dist), labels, None, DistillConfig(alpha=0.5))
    torch.testing.assert_close(term, F.cross_entropy(dist, labels))
    plain, base, _ = distillation_loss(cls, labels, None, DistillConfig(alpha=0.5))
    torch.testing.assert_close(plain, F.cross_entropy(cls, labels))  # an undistilled model: its loss as ever


def test_the_teacher_a_config_names(tmp_path):
    checkpoint = tmp_path / "teacher/checkpoints/step00000004"
    checkpoint.mkdir(parents=True)
    model = {"variant": "pico/2", "image_size": 8, "num_classes": 10}
    (checkpoint / "complete.json").write_text(json.dumps({"step": 4, "world_size": 2, "model": model}))
    student = ["model.variant=mu/2", "model.distilled=true", "distill.type=hard"]
    spec = teacher_spec(load_config("demo/pretrain", [*student, f"distill.teacher={tmp_path}/teacher"]))
    assert spec.checkpoint == checkpoint and spec.model.variant == "pico/2" and spec.model.image_size == 8
    weights, ema = teacher_identity(spec), teacher_identity(spec, ema=True)  # its EMA is another teacher
    assert weights["path"] == str(checkpoint.resolve()) and weights["digest"] != ema["digest"]
    spec = teacher_spec(load_config("demo/pretrain", [*student, f"distill.teacher={tmp_path}/teacher",
                                                      "model.image_size=16", "distill.teacher_resolution=student"]))
    assert spec.model.image_size == 16  # its pos_embed resampled to the student's grid
    with pytest.raises(WrongInput, match="distill.teacher_model differs"):
        teacher_spec(load_config("demo/pretrain", [*student, f"distill.teacher={tmp_path}/teacher",
                                                   "distill.teacher_model.variant=pico/4"]))
    with pytest.raises(WrongInput, match="has 10 classes, the student .* 100"):
        teacher_spec(load_config("demo/pretrain", [*student, f"distill.teacher={tmp_path}/teacher",
                                                   "model.num_classes=100"]))
    weights = tmp_path / "t.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(WrongInput, match="set distill.teacher_model"):
        teacher_spec(load_config("demo/pretrain", [*student, f"distill.teacher={weights}"]))
    with pytest.raises(MissingInput, match="distill.teacher"):
        teacher_spec(load_config("demo/pretrain", [*student, f"distill.teacher={tmp_path}/nowhere"]))


def test_a_resume_with_another_teacher_is_refused(tmp_path):
    ours = {"path": "/runs/h14", "digest": "aaaa"}
    check_same_teacher(ours, dict(ours), tmp_path)
    check_same_teacher(None, None, tmp_path)
    with pytest.raises(WrongInput, match="was trained with teacher /runs/h14 .* names /runs/other"):
        check_same_teacher(ours, {"path": "/runs/other", "digest": "bbbb"}, tmp_path)
    with pytest.raises(WrongInput, match="trained without a teacher"):
        check_same_teacher(None, ours, tmp_path)
    with pytest.raises(WrongInput, match="was trained with teacher"):
        check_same_teacher(ours, None, tmp_path)
