"""Training datasets over real shards: GPT samples, splits, blending, temperatures, the cache, the sampler."""

import json

import numpy as np
import pytest

from megatron_bloom.config import load_config
from megatron_bloom.data.blending import temperature_weights
from megatron_bloom.data.builder import build_datasets, parse_blend, split_ranges
from megatron_bloom.data.gpt_dataset import GPTDataset
from megatron_bloom.data.indexed_dataset import IndexedDataset
from megatron_bloom.data.sampler import PretrainingSampler, build_data_loader
from megatron_bloom.errors import ConfigError
from tests.conftest import corpus_shards
from tests.distributed import run_distributed

LANGUAGES = ("en", "fr", "zh")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return corpus_shards(tmp_path_factory.mktemp("shards"), 800, "--split-by-lang", "--append-eod")


def config(shards, *overrides):
    return load_config([f"data.cache_dir={shards / 'cache'}", *overrides]).data


def stream(indexed, document_order):
    return np.concatenate([indexed[int(d)] for d in document_order]).astype(np.int64)


def test_samples_are_overlapping_slices_of_the_shuffled_stream(shards, tmp_path):
    indexed = IndexedDataset(shards / "ml_en")
    seq_length = 50
    epoch_tokens = indexed.num_tokens
    num_samples = 3 * epoch_tokens // seq_length  # three epochs and a bit
    dataset = GPTDataset(indexed, np.arange(len(indexed)), num_samples, seq_length, seed=3, cache_dir=tmp_path,
                         name="en")
    order = np.asarray(dataset.document_order)
    assert order.size % len(indexed) == 0 and order.size // len(indexed) >= 3
    for epoch in np.split(order, order.size // len(indexed)):  # every epoch is a permutation of the documents
        assert sorted(epoch.tolist()) == list(range(len(indexed)))
    tokens = stream(indexed, order)
    for sample in range(num_samples):
        expected = tokens[sample * seq_length: sample * seq_length + seq_length + 1]
        assert np.array_equal(dataset.unshuffled(sample), expected), sample
    assert sorted(np.asarray(dataset.sample_order).tolist()) == list(range(num_samples))
    assert np.array_equal(dataset[7], dataset.unshuffled(int(dataset.sample_order[7])))
    assert dataset[0].dtype == np.int64 and dataset[0].shape == (seq_length + 1,)


def test_splits_are_disjoint_document_ranges(shards):
    assert split_ranges(100, "969,30,1") == [(0, 97), (97, 100), (100, 100)]
    assert split_ranges(100, "8,1,1") == [(0, 80), (80, 90), (90, 100)]
    assert split_ranges(10, "1") == [(0, 10), (10, 10), (10, 10)]
    train, valid, test = build_datasets(config(shards, f"data.paths=[{shards / 'ml_fr'}]", "data.split='8,1,1'"),
                                        32, 1, (200, 50, 20))
    documents = len(IndexedDataset(shards / "ml_fr"))
    first, second = round(0.8 * documents), round(0.9 * documents)
    assert set(np.asarray(train.document_order).tolist()) == set(range(first))
    assert set(np.asarray(valid.document_order).tolist()) == set(range(first, second))
    assert set(np.asarray(test.document_order).tolist()) == set(range(second, documents))


def test_blend_proportions_within_one_percent_over_10k_samples(shards):
    paths = [0.2, str(shards / "ml_en"), 0.5, str(shards / "ml_fr"), 0.3, str(shards / "ml_zh")]
    train, _, _ = build_datasets(config(shards, f"data.paths={json.dumps(paths)}"), 64, 5, (10_000, 0, 0))
    index = np.asarray(train.dataset_index, dtype=np.int64)
    shares = np.bincount(index, minlength=3) / index.size
    assert np.all(np.abs(shares - [0.2, 0.5, 0.3]) <= 0.01), shares
    # stronger: every prefix of the blend is within one sample of its exact share
    counts = np.stack([np.cumsum(index == d) for d in range(3)], axis=1)
    targets = np.arange(1, index.size + 1)[:, None] * np.array([0.2, 0.5, 0.3])
    assert np.abs(counts - targets).max() <= 1.0
    for i in (0, 1, 2, 999, 9999):  # a blended sample is its dataset's sample
        d, k = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert np.array_equal(train[i], train.datasets[d][k])


def test_temperature_weights_match_the_formula(shards):
    sizes = [IndexedDataset(shards / f"ml_{lang}").num_tokens for lang in LANGUAGES]
    for temperature in (0.5, 1.0, 3.0):
        expected = np.array(sizes, dtype=float) ** (1 / temperature)
        np.testing.assert_allclose(temperature_weights(sizes, temperature), expected / expected.sum(), rtol=1e-12)
    np.testing.assert_allclose(temperature_weights(sizes, 1.0), np.array(sizes) / sum(sizes), rtol=1e-12)
    assert np.ptp(temperature_weights(sizes, 1e6)) < 1e-5  # a very high temperature samples uniformly
    paths = json.dumps([str(shards / f"ml_{lang}") for lang in LANGUAGES])
    train, _, _ = build_datasets(config(shards, f"data.paths={paths}", "data.temperature=2.0"), 64, 5, (5000, 0, 0))
    np.testing.assert_allclose(train.weights, temperature_weights(sizes, 2.0), rtol=1e-12)
    with pytest.raises(ConfigError, match="without weights"):
        parse_blend([0.5, "a", 0.5, "b"], temperature=2.0)


def test_cached_index_is_reused_and_rebuilt_when_an_input_changes(shards, tmp_path):
    for lang in ("en", "fr"):
        for suffix in (".bin", ".idx"):
            (tmp_path / f"ml_{lang}{suffix}").write_bytes((shards / f"ml_{lang}{suffix}").read_bytes())
    data = load_config([f"data.paths=[0.5,{tmp_path / 'ml_en'},0.5,{tmp_path / 'ml_fr'}]"]).data
    first, _, _ = build_datasets(data, 64, 1, (2000, 0, 0))
    assert first.built_index and all(d.built_index for d in first.datasets)
    cache = tmp_path / "index-cache"  # the default: next to the data
    files = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    assert len(files) == 2 + 2 * 3
    again, _, _ = build_datasets(data, 64, 1, (2000, 0, 0))
    assert not again.built_index and not any(d.built_index for d in again.datasets)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == files
    assert np.array_equal(again[1234], first[1234])
    # a new preprocessing run of one input (here: the French shard rewritten from the Chinese one)
    for suffix in (".bin", ".idx"):
        (tmp_path / f"ml_fr{suffix}").write_bytes((shards / f"ml_zh{suffix}").read_bytes())
    changed, _, _ = build_datasets(data, 64, 1, (2000, 0, 0))
    assert changed.datasets[1].built_index and not changed.datasets[0].built_index
    assert changed.built_index  # the blend's description names the shards, so it is rebuilt too


def build_in_parallel(rank, world_size, paths, cache_dir):
    data = load_config([f"data.paths={paths}", f"data.cache_dir={cache_dir}"]).data
    train, valid, _ = build_datasets(data, 64, 9, (3000, 300, 0))
    built = [train.built_index, valid.built_index] + [d.built_index for d in train.datasets]
    return built, np.asarray(train.dataset_index).copy(), train[2999], valid[17]


@pytest.mark.slow
def test_concurrent_builders_build_each_index_once(shards, tmp_path):
    """Four processes (ranks, or jobs sharing a cache dir) ask for the same new indices at the same time."""
    paths = json.dumps([0.3, str(shards / "ml_en"), 0.7, str(shards / "ml_zh")])
    results = run_distributed(build_in_parallel, 4, paths, str(tmp_path / "shared-cache"))
    built = np.array([r[0] for r in results])
    assert list(built.sum(axis=0)) == [1, 1, 1, 1]  # each index built by exactly one process
    for result in results[1:]:
        assert np.array_equal(result[1], results[0][1])
        assert np.array_equal(result[2], results[0][2]) and np.array_equal(result[3], results[0][3])
    assert not list((tmp_path / "shared-cache").glob("*.tmp-*"))


def test_sampler_resumes_with_exactly_the_next_batch(shards):
    dataset = build_datasets(config(shards, f"data.paths=[{shards / 'ml_en'}]"), 16, 2, (96, 0, 0))[0]
    micro, dp = 3, 2
    full = [list(PretrainingSampler(96, 0, micro, rank, dp)) for rank in range(dp)]
    assert full[0][0] == [0, 1, 2] and full[1][0] == [3, 4, 5] and full[0][1] == [6, 7, 8]
    consumed = 5 * micro * dp  # a checkpoint taken after 5 steps
    resumed = [list(PretrainingSampler(96, consumed, micro, rank, dp)) for rank in range(dp)]
    assert resumed == [batches[5:] for batches in full]
    loader = build_data_loader(dataset, consumed, micro, 1, dp, num_workers=0)
    first = next(iter(loader))
    assert first.shape == (micro, 17)
    assert np.array_equal(first.numpy(), np.stack([dataset[i] for i in full[1][5]]))


@pytest.mark.parametrize("paths, fragment", [
    ("[]", "data.paths is empty"),
    ("[0.5,a,b]", "must be [weight1, prefix1"),
    ("[-1,a,2,b]", "non-negative"),
    ("[/nonexistent/prefix]", "do not exist"),
])
def test_bad_data_paths(shards, paths, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        build_datasets(config(shards, f"data.paths={paths}"), 16, 1, (10, 0, 0))


def test_skipped_samples_are_stepped_over_and_positions_count_them():
    """Ranges merge; a batch takes the next positions outside them; `advance` agrees with the sampler, so
    consumed_samples is where the next batch starts; a bad range is a config error."""
    import itertools

    from megatron_bloom.data.skips import SkippedSamples

    skipped = SkippedSamples([[10, 20], [5, 12], [30, 31]])
    assert skipped.to_list() == [[5, 20], [30, 31]] and skipped.within(0, 100) == 16
    assert skipped.take(0, 8) == ([0, 1, 2, 3, 4, 20, 21, 22], 23)
    assert skipped.advance(0, 16) == 32 and SkippedSamples().advance(7, 8) == 15
    ranks = [list(itertools.islice(PretrainingSampler(100, 0, 2, rank, 2, skipped), 4)) for rank in (0, 1)]
    assert ranks == [[[0, 1], [4, 20], [23, 24], [27, 28]], [[2, 3], [21, 22], [25, 26], [29, 31]]]
    resumed = list(itertools.islice(PretrainingSampler(100, skipped.advance(0, 8), 2, 0, 2, skipped), 1))
    assert resumed == [[23, 24]]  # the third step of the uninterrupted sampler
    near_end = list(itertools.islice(PretrainingSampler(10, 6, 2, 0, 1, SkippedSamples([[7, 9]])), 3))
    assert near_end == [[6, 9], [0, 1], [2, 3]]  # past the dataset's end: from its start again
    for bad in ([3, 1], [1], [-1, 2]):
        with pytest.raises(ConfigError, match="train.skip_samples"):
            load_config([f"train.skip_samples=[{bad}]".replace(" ", "")])


def test_a_loss_spike_is_far_above_the_recent_statistics_or_a_run_of_skipped_steps():
    from megatron_bloom.config.schema import LossSpikeConfig
    from megatron_bloom.training.spikes import SpikeDetector

    detector = SpikeDetector(LossSpikeConfig(window=20, sigmas=6.0, skipped_steps=3))
    losses = [7.0 - 0.05 * step + 0.02 * (-1) ** step for step in range(20)]
    assert all(detector.check(loss, skipped=False) is None for loss in losses)
    assert detector.check(losses[-1] + 0.3, skipped=False) is None  # 0.3 is within 6 sigma of these
    reason = detector.check(9.0, skipped=False)
    assert reason is not None and "standard deviations above the mean" in reason
    assert detector.check(6.1, skipped=False) is None  # the spike did not enter the statistics
    skips = [detector.check(float("nan"), skipped=True) for _ in range(3)]
    assert skips[:2] == [None, None] and "3 non-finite steps in a row" in skips[2]
    detector.reset()
    assert detector.check(float("nan"), skipped=True) is None and len(detector.window) == 0
    assert SpikeDetector(LossSpikeConfig(policy="off")).check(float("nan"), True) is None
