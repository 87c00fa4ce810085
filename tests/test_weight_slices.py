"""Reading a DiT's weights by rows (:mod:`editrl.policy.weight_slices`) gives the weights
``from_pretrained`` gives, from one file or the shards of an index, and refuses a checkpoint
that does not match the model. The sharded case (two gloo ranks, FSDP2) is in
``test_learner_sharded.py``."""
import json
import shutil

import pytest
import torch
from conftest import CORPUS, tiny_policy_config
from diffusers import WanTransformer3DModel

from editrl.policy.model import build_tiny_components
from editrl.policy.weight_slices import INDEX_NAME, WeightFiles, defer_weights, load_weight_slices, placeholder_transformer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny t2v DiT saved in fp32 as shards of about 8 KB with their index."""
    path = tmp_path_factory.mktemp("dit")
    transformer = build_tiny_components(tiny_policy_config().tiny, CORPUS, kind="t2v").transformer
    transformer.save_pretrained(path, max_shard_size="8KB")
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_read_into_a_deferred_model_equal_from_pretrained(saved, dtype):
    files = WeightFiles.of(saved)
    assert len(set(files.files.values())) > 3  # the index names several shards
    expected = WanTransformer3DModel.from_pretrained(saved, torch_dtype=dtype)
    model = placeholder_transformer(saved, WanTransformer3DModel, dtype)
    assert all(p.untyped_storage().nbytes() <= 4 for p in model.parameters())  # placeholders hold nothing
    assert defer_weights(model, files) == len(list(model.parameters())) and all(p.is_meta for p in model.parameters())
    read = load_weight_slices(model, files, rank=0, world_size=1, device=torch.device("cpu"))
    # every stored fp32 byte is read once: the rows of one rank of one are all of them
    assert read == sum(p.numel() * 4 for p in expected.parameters())
    got = dict(model.named_parameters())
    for name, value in expected.named_parameters():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    for name, value in expected.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], value), name


def test_a_checkpoint_that_does_not_match_the_model_is_refused_by_key(saved, tmp_path):
    files = WeightFiles.of(saved)
    extra = WeightFiles({**files.files, "blocks.9.ffn.weight": next(iter(files.files.values()))})
    model = placeholder_transformer(saved, WanTransformer3DModel, torch.float32)
    defer_weights(model, files)
    with pytest.raises(KeyError, match=r"unexpected \['blocks.9.ffn.weight'\]"):
        load_weight_slices(model, extra, 0, 1, torch.device("cpu"))
    fewer = WeightFiles({k: v for k, v in files.files.items() if k != "proj_out.weight"})
    with pytest.raises(KeyError, match=r"missing \['proj_out.weight'\]"):
        load_weight_slices(model, fewer, 0, 1, torch.device("cpu"))


def test_an_index_naming_a_missing_shard_or_no_weights_at_all_is_refused(saved, tmp_path):
    for shard in saved.glob("*.safetensors"):
        shutil.copy(shard, tmp_path)
    index = json.loads((saved / INDEX_NAME).read_text())
    index["weight_map"]["proj_out.weight"] = "gone.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        WeightFiles.of(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        WeightFiles.of(tmp_path / "nothing")
