"""The supervised member: it learns what a defect looks like from labeled and injected defects,
reads the shared backbone's features, trains its decision head alone on images without masks,
and is trained, under cross-validation, only on what each fold may see."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from data.datasets import get_dataset
from data.validation import injected_validation_samples
from evaluation.supervision import SupervisedFolds
from members import FabricTrainer, MemberSet, create_member, load_member
from members.supervised import SupervisedHead, cache_features, train_head


def resized(image: np.ndarray | torch.Tensor, size: int = 128) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    tensor = tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor.expand(3, -1, -1)
    return torch.nn.functional.interpolate(tensor[None], size=(size, size), mode="bilinear")


@pytest.fixture(scope="module")
def trained(panels_dir):
    """A head trained on the panels' defect-free training images and injected copies of them,
    and the panels' test split (which it never saw)."""
    train = get_dataset("mvtec", data_dir=panels_dir, categories=["panel"], split="train")
    test = get_dataset("mvtec", data_dir=panels_dir, categories=["panel"], split="test")
    template = create_member("supervised", backbone="efficientnet_lite0")
    images = [train[i]["image"] for i in range(len(train))]
    samples = injected_validation_samples(images, injections_per_image=1, seed=0)
    base = cache_features(
        template,
        (
            (resized(s["image"]), s["mask"] if s["label"] else np.zeros((1, 1)), s["label"])
            for s in samples
        ),
    )
    trainer = FabricTrainer(max_epochs=25, progress=False, seed=0)
    head = train_head(template, base, trainer, batch_size=8)
    return head, template, base, test


def test_the_head_finds_real_defects_it_was_never_shown(trained):
    head, _, _, test = trained
    scores, labels, pixel_scores, pixel_truth = [], [], [], []
    for i in range(len(test)):
        sample = test[i]
        out = head.predict(resized(sample["image"].permute(1, 2, 0)))
        scores.append(float(out["pred_score"][0]))
        labels.append(sample["label"])
        pixel_scores.append(out["anomaly_map"][0, 0].flatten().numpy())
        pixel_truth.append(sample["mask"][0].flatten().numpy() > 0.5)
    # Trained on injected defects only, the test panels' defects are new to it; it still
    # separates them (the unsupervised members reach 0.85 to 1.0 on these panels).
    assert roc_auc_score(labels, scores) > 0.8, scores
    assert roc_auc_score(np.concatenate(pixel_truth), np.concatenate(pixel_scores)) > 0.85
    # A random head does not.
    fresh = SupervisedHead(pretrained=False)
    fresh.fitted.fill_(True)
    random_scores = [
        float(fresh.predict(resized(test[i]["image"].permute(1, 2, 0)))["pred_score"][0])
        for i in range(len(test))
    ]
    assert abs(roc_auc_score(labels, random_scores) - 0.5) < abs(
        roc_auc_score(labels, scores) - 0.5
    )


def test_the_head_reads_the_shared_backbone_and_saves_whole(trained, tmp_path):
    head, template, _, test = trained
    padim = create_member("padim", backbone="efficientnet_lite0")
    assert head.shared_backbone_key() == padim.shared_backbone_key()
    padim.fit(
        torch.utils.data.DataLoader(
            [{"image": resized(test[i]["image"].permute(1, 2, 0))[0]} for i in range(2)],
            batch_size=2,
        ),
        trainer=FabricTrainer(progress=False),
    )
    together = MemberSet({"padim": padim, "supervised": head})
    assert len(together.extractors) == 1  # one backbone pass for both
    images = torch.cat([resized(test[i]["image"].permute(1, 2, 0)) for i in range(3)])
    scores, maps = together(images)
    alone = head.predict(images)
    torch.testing.assert_close(scores[:, 1], alone["pred_score"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(maps[:, 1], alone["anomaly_map"][:, 0], atol=1e-4, rtol=1e-4)
    loaded = load_member(head.save(tmp_path / "head"))
    again = loaded.predict(images)
    torch.testing.assert_close(again["pred_score"], alone["pred_score"])
    torch.testing.assert_close(again["anomaly_map"], alone["anomaly_map"])


def test_images_without_masks_train_the_decision_head_alone(trained):
    head, _, base, _ = trained
    defective = [s for s in base if s["label"]][:4]
    batch = torch.utils.data.default_collate(
        [{**s, "has_mask": False} for s in defective] + [s for s in base if not s["label"]][:4]
    )
    head.train()
    head.steps_done.fill_(int(head.steps_planned) // 2)  # both losses weigh
    head.zero_grad()
    # Normal images with known masks train the segmentation; take them out to see what the
    # image labels alone reach.
    only_weak = {
        k: [layer[:4] for layer in v] if isinstance(v, list) else v[:4] for k, v in batch.items()
    }
    head.training_step(only_weak)["loss"].backward()
    segmentation = [p.grad for p in head.segmentation.parameters()]
    decision = [p.grad for p in head.decision_logit.parameters()]
    assert all(g is None or not g.any() for g in segmentation)
    assert any(g is not None and g.abs().sum() > 0 for g in decision)
    head.zero_grad()
    head.training_step(batch)["loss"].backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in head.segmentation.parameters()
    )
    head.eval()


def test_it_refuses_to_train_on_images_without_both_labels(trained):
    _, template, base, _ = trained
    normal = [s for s in base if not s["label"]]
    with pytest.raises(ValueError, match="defective and defect-free"):
        train_head(template, normal, FabricTrainer(max_epochs=1, progress=False))


def test_nested_heads_never_see_the_fold_they_answer(trained, monkeypatch):
    _, template, base, test = trained
    seen: list[set[int]] = []

    def recording_train(template_, samples, trainer, batch_size=16, seed=0):
        seen.append({id(s) for s in samples})
        return template_

    monkeypatch.setattr("evaluation.supervision.train_head", recording_train)
    labeled = [
        {
            "image": test[i]["image"].permute(1, 2, 0).numpy(),
            "mask": test[i]["mask"][0].numpy(),
            "label": test[i]["label"],
        }
        for i in range(8)
    ]
    folds = SupervisedFolds(
        template, lambda: None, lambda images: [resized(image) for image in images]
    )
    # The base is every head's: not under test here.
    folds.base_samples = lambda images, bar=None: base[:4]
    fold_of = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    folds.fit([], labeled, fold_of, labeled[:2], nested=True)
    # Every set of left-out folds a nested cross-validation reads: none, one, or two folds.
    assert set(folds.heads) == {
        frozenset(),
        *({frozenset({f}) for f in range(3)}),
        *({frozenset(p) for p in ((0, 1), (0, 2), (1, 2))}),
    }
    cached = {id(s): f for s, f in zip(folds.labeled_, fold_of)}
    for excluded, ids in zip(folds.heads, seen):
        learned_folds = {cached[i] for i in ids if i in cached}
        assert not learned_folds & excluded, (excluded, learned_folds)
        assert learned_folds == set(range(3)) - excluded


def test_heads_trained_side_by_side_equal_heads_trained_one_after_another(trained):
    _, template, base, test = trained
    labeled = [
        {
            "image": test[i]["image"].permute(1, 2, 0).numpy(),
            "mask": test[i]["mask"][0].numpy(),
            "label": test[i]["label"],
        }
        for i in range(6)
    ]
    heads = []
    for workers in (1, 2):
        folds = SupervisedFolds(
            template,
            lambda: FabricTrainer(max_epochs=2, progress=False, seed=0),
            lambda images: [resized(image) for image in images],
            workers=workers,
        )
        folds.base_samples = lambda images, bar=None: base
        folds.fit([], labeled, np.array([0, 1, 0, 1, 0, 1]), labeled[:1], nested=False)
        heads.append(folds.heads)
    assert set(heads[0]) == set(heads[1]) == {frozenset(), frozenset({0}), frozenset({1})}
    images = torch.cat([resized(sample["image"]) for sample in labeled])
    for excluded, head in heads[0].items():
        other = heads[1][excluded]
        assert other.feature_extractor is template.feature_extractor
        one, two = head.predict(images), other.predict(images)
        torch.testing.assert_close(one["pred_score"], two["pred_score"], rtol=0, atol=0)
        torch.testing.assert_close(one["anomaly_map"], two["anomaly_map"], rtol=0, atol=0)
