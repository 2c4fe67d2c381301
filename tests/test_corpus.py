import numpy as np
import pandas as pd
import pytest
import torch

from bench.core.errors import UserError
from bench.data.corpus import KINDS, CorpusCollate, MixedBatchSampler, Pool, PretrainCorpus, batch_composition
from bench.data.image_datasets import ImagePreprocessor
from bench.data.images import ImageCache
from bench.modeling.towers import Tokenizer


def test_unpaired_rows_come_on_top_of_a_full_batch_of_paired_rows():
    mix = {"image_only": 0.5, "text_only": 0.25}
    assert batch_composition(32, mix, {"paired": 100, "image_only": 50, "text_only": 50}) == \
        {"paired": 32, "image_only": 16, "text_only": 8}
    assert batch_composition(32, mix, {"paired": 100, "image_only": 50}) == \
        {"paired": 32, "image_only": 16, "text_only": 0}
    assert batch_composition(16, mix, {"paired": 100}) == {"paired": 16, "image_only": 0, "text_only": 0}
    assert batch_composition(3, {"image_only": 0.01}, {"paired": 9, "image_only": 9})["image_only"] == 1
    # no paired pool: the largest kind leads with the batch size and the others keep their ratio to it
    assert batch_composition(8, mix, {"image_only": 50, "text_only": 10}) == \
        {"paired": 0, "image_only": 8, "text_only": 4}
    with pytest.raises(UserError, match="unknown kind"):
        batch_composition(16, {"images": 1}, {"paired": 100})
    with pytest.raises(UserError, match="unknown kind.*paired"):
        batch_composition(16, {"paired": 1}, {"paired": 100})


def test_mixed_batches_have_a_fixed_composition_and_cover_the_paired_pool_once():
    sizes = {"paired": 50, "image_only": 7, "text_only": 30}
    per_batch = {"paired": 8, "image_only": 4, "text_only": 4}
    sampler = MixedBatchSampler(sizes, per_batch, seed=3)
    batches = sampler.batches()
    assert len(batches) == len(sampler) == 6
    paired = [i for b in batches for i in b if i < 50]
    assert len(paired) == len(set(paired)) == 48
    for b in batches:
        assert sum(i < 50 for i in b) == 8
        assert sum(50 <= i < 57 for i in b) == 4 and sum(i >= 57 for i in b) == 4
    image_only = [i for b in batches for i in b if 50 <= i < 57]
    assert set(image_only) == set(range(50, 57))  # a small pool is cycled, reshuffled each pass
    assert MixedBatchSampler(sizes, per_batch, seed=3).batches() == batches
    sampler.set_epoch(1)
    assert sampler.batches() != batches
    sampler.set_epoch(1, skip=2)
    assert list(sampler) == sampler.batches()[2:] and len(sampler) == 4


def test_collate_orders_rows_links_images_to_text_and_groups_equal_prompts(tmp_path):
    rng = np.random.default_rng(0)
    squares = []
    for i in range(4):
        path = tmp_path / f"{i}.png"
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(path)
        squares.append(str(path))
    pools = {"paired": Pool("paired", ["a"], ["p0", "p1"], squares[:2], ["Right effusion.", "Small nodule."]),
             "image_only": Pool("image_only", ["b"], ["i0", "i1"], squares[2:], None,
                                pd.DataFrame({"Edema": [1.0, 1.0]})),
             "text_only": Pool("text_only", ["c"], ["t0"], None, ["No pneumothorax."])}
    corpus = PretrainCorpus(pools, ImagePreprocessor(32, 0.5, 0.25, False), ImageCache(None, 32), seed=0,
                            prompt=lambda labels: "Edema." if labels["Edema"] == 1 else "Normal.")
    assert [corpus.locate(i)[0] for i in range(len(corpus))] == ["paired"] * 2 + ["image_only"] * 2 + ["text_only"]
    batch = CorpusCollate(Tokenizer("bundled-minilm", 16))([corpus[i] for i in (4, 2, 0, 3, 1)])
    assert batch.sample_ids == ["p0", "p1", "i0", "i1", "t0"]
    assert batch.images.shape == (4, 3, 32, 32) and len(batch.text) == 5
    assert batch.image_text.tolist() == [0, 1, 2, 3]
    assert batch.text_image().tolist() == [0, 1, 2, 3, -1]
    g = batch.text_groups.tolist()
    assert g[0] == g[1] == g[4] == -1 and g[2] == g[3] >= 0
    assert KINDS == ("paired", "image_only", "text_only")
    no_prompt = PretrainCorpus(pools, ImagePreprocessor(32, 0.5, 0.25, False), ImageCache(None, 32), seed=0)
    batch = CorpusCollate(Tokenizer("bundled-minilm", 16))([no_prompt[i] for i in range(5)])
    assert batch.image_text.tolist() == [0, 1, -1, -1] and len(batch.text) == 3
    assert torch.equal(batch.text_image(), torch.tensor([0, 1, -1]))
