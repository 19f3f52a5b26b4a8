"""PatchCore as published: the paper's image score on raw patch distances, per-layer projection,
exact and HNSW nearest neighbours, the coreset and its coverage report, and tiled scores."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from members import FabricTrainer, create_member
from members.base import gaussian_blur, upsample_map
from members.coreset import coreset_indices, coverage_comparison, coverage_radius
from members.nearest_neighbours import NearestNeighbourIndex, brute_force_knn
from tiling import infer_tiled, tile


def exact_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def image_loader(images: torch.Tensor, batch_size: int = 4) -> DataLoader:
    return DataLoader([{"image": image} for image in images], batch_size=batch_size)


@pytest.fixture(scope="module")
def fitted():
    """A small PatchCore (random backbone) fitted on textured noise images."""
    torch.manual_seed(0)
    member = create_member("patchcore", pretrained=False, coreset_ratio=0.5, num_neighbors=4)
    train = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    member.fit(image_loader(train), None, FabricTrainer(progress=False))
    return member


def test_image_score_is_the_reweighted_raw_max_patch_distance(fitted):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    images[1, :, 20:28, 30:38] = 1.0  # a bright square
    out = fitted.predict(images)
    with torch.no_grad():
        embedding = fitted.patch_features(images)
    b, d, h, w = embedding.shape
    queries = embedding.permute(0, 2, 3, 1).reshape(b, h * w, d)
    bank = fitted.memory_bank
    raw = torch.empty(b, h * w)
    for i in range(b):
        nearest = exact_cdist(queries[i], bank).min(1)
        raw[i] = nearest.values
        s_star, patch = nearest.values.max(0)
        m_star = nearest.indices[patch]
        # The paper's eq. 7: N_b(m*) are the b nearest memory features of m* (m* first).
        support = exact_cdist(bank[m_star][None], bank)[0].topk(4, largest=False).indices
        gaps = exact_cdist(queries[i, patch][None], bank[support])[0]
        expected = (1 - torch.softmax(gaps, 0)[0]) * s_star
        assert float(out["pred_score"][i]) == pytest.approx(float(expected), rel=1e-4)
        assert float(out["pred_score"][i]) < float(s_star)
    # The map stays the upsampled raw distances smoothed with sigma 4.
    expected_map = gaussian_blur(upsample_map(raw.reshape(b, 1, h, w), (64, 64)), 4.0)
    assert torch.allclose(out["anomaly_map"], expected_map, atol=1e-3)
    raw_member = copy.deepcopy(fitted)
    raw_member.reweight = False
    assert torch.allclose(raw_member.predict(images)["pred_score"], raw.amax(1), rtol=1e-4)


def test_a_one_patch_defect_outscores_a_smooth_one_that_peaks_higher_after_blurring():
    member = create_member("patchcore", pretrained=False, reweight=False)
    member.memory_bank = torch.zeros(1, member.projection.shape[1])  # normal patches: zeros
    member.fitted.fill_(True)
    # Backbone maps given directly (layer 2: 40 channels, layer 3: 112 at half resolution).
    # Image 0: one feature-map position (a 3x3 block of patches after local averaging);
    # image 1: a broad, weaker plateau. 32 px images: the sigma-4 blur spans two patches.
    layer2, layer3 = torch.zeros(2, 40, 16, 16), torch.zeros(2, 112, 8, 8)
    layer2[0, :, 8, 8] = 18.0
    layer2[1, :, 4:12, 4:12] = 1.0
    images = torch.zeros(2, 3, 32, 32)
    out = member.predict(images, {2: layer2, 3: layer3})
    raw_sharp, raw_smooth = 18.0 / 9 * 512**0.5, 1.0 * 512**0.5  # first half of the dims
    assert out["pred_score"].tolist() == pytest.approx([raw_sharp, raw_smooth], rel=1e-4)
    blurred_max = member.compute_anomaly_score(out["anomaly_map"])  # the old image score
    assert blurred_max[0] < blurred_max[1], blurred_max
    assert out["pred_score"][0] > out["pred_score"][1]


def test_each_layer_weighs_the_same_whatever_its_width():
    member = create_member("patchcore", pretrained=False, feature_dim=64, target_dim=32)
    # The reference projection of one patch whose shallow (40) or deep (112) channels are ones:
    # each layer fills its own half of the target width with its values.
    from_shallow = member._pool([torch.ones(1, 40), torch.zeros(1, 112)])[0]
    from_deep = member._pool([torch.zeros(1, 40), torch.ones(1, 112)])[0]
    assert from_shallow.shape == (32,)
    assert torch.allclose(from_shallow[:16], torch.ones(1)) and from_shallow[16:].abs().max() == 0
    assert torch.allclose(from_deep[16:], torch.ones(1)) and from_deep[:16].abs().max() == 0


def test_compact_features_keep_every_distance_of_the_published_ones():
    """lite0's 152 channels are stored as R x (A = QR) instead of the 1024-wide A x: the
    pairwise distances of patches are the published ones."""
    member = create_member("patchcore", pretrained=False)
    assert member.projection.shape == (152, 152)
    generator = torch.Generator().manual_seed(0)
    shallow, deep = (
        torch.randn(64, 40, generator=generator),
        torch.randn(64, 112, generator=generator),
    )
    published = member._pool([shallow, deep])  # [64, 1024]
    compact = torch.cat([shallow, deep], dim=1) @ member.projection
    assert published.shape[1] == 1024 and compact.shape[1] == 152
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.allclose(
        torch.cdist(compact.double(), compact.double(), compute_mode=exact),
        torch.cdist(published.double(), published.double(), compute_mode=exact),
        atol=1e-4,
    )
    wide = create_member("patchcore", pretrained=False, target_dim=64)  # C > D: A itself
    assert torch.allclose(
        torch.cat([shallow, deep], dim=1) @ wide.projection, wide._pool([shallow, deep]), atol=1e-5
    )


@pytest.mark.parametrize(("queries", "bank", "dim", "k"), [(7, 50, 8, 1), (60, 500, 32, 5)])
def test_exact_search_equals_cdist(queries, bank, dim, k):
    generator = torch.Generator().manual_seed(queries)
    q, m = (
        torch.randn(queries, dim, generator=generator),
        torch.randn(bank, dim, generator=generator),
    )
    distances, index = NearestNeighbourIndex("exact").search(m, q, k)
    expected = exact_cdist(q, m).topk(k, largest=False)
    assert torch.allclose(distances, expected.values, atol=1e-4)
    assert torch.equal(index, expected.indices)
    assert distances.dtype == torch.float32 and index.dtype == torch.int64


@pytest.mark.parametrize("k", [1, 3])
def test_brute_force_knn_matches_cdist_across_chunks(k):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(50, 8, generator=generator) + 3  # norms far from zero
    bank = torch.randn(300, 8, generator=generator) + 3
    distances, index = brute_force_knn(queries, bank, k=k, query_chunk=7, bank_chunk=64)
    expected = exact_cdist(queries, bank).topk(k, largest=False)
    assert torch.allclose(distances, expected.values, atol=1e-4)
    assert torch.equal(index, expected.indices)


def test_hnsw_search_finds_the_nearest_neighbour_almost_always():
    # Measured: recall@1 0.998 on this set (M=32, efSearch=64); 0.93 with efSearch=16.
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(2000, 64, generator=generator)
    queries = torch.randn(500, 64, generator=generator)
    hnsw = NearestNeighbourIndex("hnsw", hnsw_m=32, hnsw_ef_search=64)
    distances, index = hnsw.search(bank, queries, 3)
    expected = exact_cdist(queries, bank).topk(3, largest=False)
    recall = (index[:, 0] == expected.indices[:, 0]).float().mean()
    assert recall >= 0.97, recall
    # Whatever it finds, it reports that neighbour's true distance, never below the nearest.
    true = exact_cdist(queries, bank).gather(1, index)
    assert torch.allclose(distances, true, atol=1e-4)
    assert (distances[:, 0] >= expected.values[:, 0] - 1e-4).all()


def test_a_rebuilt_hnsw_graph_answers_as_the_first_at_any_thread_count():
    # A saved PatchCore rebuilds its graph on load: it must be the same graph. faiss 1.9.0 to
    # 1.15.0, building at two threads, agreed on 72-82 % of these answers between two builds.
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(6000, 64, generator=generator)
    queries = torch.randn(2000, 64, generator=generator)
    threads = torch.get_num_threads()
    answers = []
    try:
        for build_threads in (2, 1, 2):
            torch.set_num_threads(build_threads)  # the search gives faiss torch's thread count
            answers.append(NearestNeighbourIndex("hnsw", hnsw_ef_search=16).search(bank, queries))
    finally:
        torch.set_num_threads(threads)
    for distances, index in answers[1:]:
        assert torch.equal(index, answers[0][1]) and torch.equal(distances, answers[0][0])


def test_index_is_rebuilt_when_the_bank_changes(fitted):
    member = copy.deepcopy(fitted)  # the faiss index is not copied: rebuilt on first search
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    before = member.predict(images)["anomaly_map"]
    state = member.state_dict()
    state["memory_bank"] = state["memory_bank"] * 2  # load_state_dict copies in place
    member.load_state_dict(state)
    after_load = member.predict(images)["anomaly_map"]
    member.memory_bank = member.memory_bank[: len(member.memory_bank) // 2].clone()  # refit-like
    after_assign = member.predict(images)["anomaly_map"]
    for anomaly_map, bank in (
        (before, fitted.memory_bank),
        (after_load, fitted.memory_bank * 2),
        (after_assign, (fitted.memory_bank * 2)[: len(fitted.memory_bank) // 2]),
    ):
        with torch.no_grad():
            embedding = member.patch_features(images)
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
        raw = exact_cdist(queries, bank).amin(1).reshape(2, 1, *embedding.shape[-2:])
        expected = gaussian_blur(upsample_map(raw, (64, 64)), 4.0)
        assert torch.allclose(anomaly_map, expected, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_search_on_cuda_uses_the_torch_path():
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(300, 16, generator=generator)
    queries = torch.randn(40, 16, generator=generator)
    distances, index = NearestNeighbourIndex("exact").search(bank.cuda(), queries.cuda(), 2)
    expected = exact_cdist(queries, bank).topk(2, largest=False)
    assert distances.is_cuda and torch.equal(index.cpu(), expected.indices)
    # Exact greedy stays on the GPU; it covers the points as the CPU run does (the picks
    # themselves may differ where float rounding breaks a near-tie differently).
    on_gpu = coreset_indices(bank.cuda(), 0.1, "greedy")
    on_cpu = coreset_indices(bank, 0.1, "greedy")
    assert on_gpu.is_cuda and len(set(on_gpu.tolist())) == len(on_cpu) == 30
    gpu_radius = coverage_radius(bank, bank[on_gpu.cpu()])
    assert gpu_radius == pytest.approx(coverage_radius(bank, bank[on_cpu]), rel=0.05)


def test_coreset_covers_the_features_better_than_random_sampling():
    # Clustered data with one small, far cluster: farthest-point selection must reach it.
    generator = torch.Generator().manual_seed(0)
    main = torch.randn(3000, 16, generator=generator)
    rare = torch.randn(30, 16, generator=generator) * 0.1 + 12.0
    points = torch.cat([main, rare])
    for method in ("greedy", "chunked"):
        index = coreset_indices(points, 0.02, method, projection_dim=8, chunk_size=1024)
        assert len(index) == pytest.approx(0.02 * len(points), abs=3)
        assert len(set(index.tolist())) == len(index)
        coverage = torch.cdist(points, points[index]).min(1).values.max()
        random_index = torch.randperm(len(points), generator=generator)[: len(index)]
        random_coverage = torch.cdist(points, points[random_index]).min(1).values.max()
        assert coverage < 0.5 * random_coverage, (method, coverage, random_coverage)


def test_coreset_rejects_bad_options():
    with pytest.raises(ValueError, match="ratio"):
        coreset_indices(torch.randn(10, 4), 0.0)
    with pytest.raises(ValueError, match="method"):
        coreset_indices(torch.randn(10, 4), 0.5, method="kmeans")
    with pytest.raises(ValueError, match="search"):
        create_member("patchcore", pretrained=False, search="annoy")


def test_coverage_comparison_picks_both_coresets_from_one_pool_of_two_chunks():
    generator = torch.Generator().manual_seed(0)
    points = torch.cat(
        [torch.randn(5000, 16, generator=generator), torch.randn(20, 16, generator=generator) + 9]
    )
    report = coverage_comparison(points, 0.05, projection_dim=8, chunk_size=1000, sample=800)
    assert report["coverage_chunks"] == 6 and report["coverage_pool_chunks"] == 2
    assert report["coverage_pool"] == 2 * 837  # two chunks of the full run's size
    # Both reach the far cluster; exact greedy covers at least about as well.
    assert 0 < report["coverage_radius_greedy"] <= 1.05 * report["coverage_radius_chunked"] < 9
    one_chunk = coverage_comparison(points[:900], 0.05, projection_dim=8, chunk_size=1000)
    assert one_chunk["coverage_radius_chunked"] == one_chunk["coverage_radius_greedy"]


def test_fit_reports_coverage_and_keeps_the_bank_a_buffer(fitted):
    stats = fitted.fit_stats
    assert stats["memory_bank"] == pytest.approx(0.5 * stats["patches"], abs=1)
    assert stats["coverage_radius_chunked"] > 0 and stats["coverage_radius_greedy"] > 0
    assert "memory_bank" in fitted.state_dict()
    assert fitted.memory_bank.shape[1] == fitted.projection.shape[1]


def test_tiled_score_is_the_max_of_the_reweighted_tile_scores(fitted):
    from members.member_set import MemberSet

    image = torch.rand(3, 112, 160, generator=torch.Generator().manual_seed(4))
    image[:, 70:80, 100:110] = 1.0
    tiles, _ = tile(image, 64, 48)
    per_tile = fitted.predict(tiles)["pred_score"]
    out = infer_tiled(fitted, image, tile_size=64, stride=48, batch_size=4)
    assert out["pred_score"] == pytest.approx(float(per_tile.max()), rel=1e-5)
    raw = copy.deepcopy(fitted)
    raw.reweight = False
    raw_score = infer_tiled(raw, image, tile_size=64, stride=48, batch_size=4)["pred_score"]
    assert out["pred_score"] < raw_score  # the reweighting is kept
    # In a member set, each channel is scored as its member alone would be.
    by_map = copy.deepcopy(fitted)
    by_map.score_aggregation = "topk"
    member_set = MemberSet({"patchcore": fitted, "by_map": by_map})
    assert member_set.score_from_tiles == ("max", "map")
    together = infer_tiled(member_set, image, tile_size=64, stride=48, batch_size=4)
    alone = infer_tiled(by_map, image, tile_size=64, stride=48, batch_size=4)
    assert together["pred_score"][0] == pytest.approx(out["pred_score"], rel=1e-5)
    assert together["pred_score"][1] == pytest.approx(alone["pred_score"], rel=1e-5)
    assert np.allclose(together["anomaly_map"][1], alone["anomaly_map"][0], atol=1e-5)
