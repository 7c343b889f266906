"""The text-to-image foundations (issue 32): the local CLIP tokenizer and the tiny Stable-Diffusion stack of stock
classes, saved and loaded as a StableDiffusionPipeline folder, and the check of a user's base folder."""

import json
import shutil
import socket

import pytest
import torch
from transformers import CLIPTokenizer

from dataward.captions import caption_words, captioned_shapes
from dataward.errors import DatawardError
from dataward.text.basecheck import check_base
from dataward.text.stack import StackConfig, build_stack, load_stack, save_stack
from dataward.text.tokenizer import build_tokenizer, write_vocabulary


@pytest.fixture(scope="module")
def saved_stack(tmp_path_factory):
    """An untrained tiny stack saved as a pipeline folder; copy it before changing it."""
    root = tmp_path_factory.mktemp("stack")
    return save_stack(build_stack(StackConfig(), seed=0, tokenizer_folder=root / "vocabulary"), root / "pipe")


def test_the_tokenizer_is_built_without_network_and_round_trips_captions(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    tokenizer = build_tokenizer(tmp_path)
    assert isinstance(tokenizer, CLIPTokenizer)
    captions = [text for split in ("public", "private0", "private1", "private2", "private3") for text in captioned_shapes(split, 20)[2]]
    for text in captions:
        ids = tokenizer(text).input_ids
        assert len(ids) == len(text.split()) + 2  # one token a word, between <|startoftext|> and <|endoftext|>
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_an_unseen_word_tokenizes_byte_by_byte(tmp_path):
    tokenizer = build_tokenizer(tmp_path)
    ids = tokenizer("a zebra").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "z", "e", "b", "r", "a</w>", "<|endoftext|>"]
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra"


def test_the_vocabulary_files_are_the_same_bytes_every_time(tmp_path):
    words = caption_words()
    first, second = write_vocabulary(tmp_path / "a"), write_vocabulary(tmp_path / "b", words=list(reversed(words)) + list(words))
    for name in ("vocab.json", "merges.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    vocab = json.loads((first / "vocab.json").read_text())
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|endoftext|>"] == len(vocab) - 1  # CLIP's layout
    assert all(f"{word}</w>" in vocab for word in words)
    saved = []
    for name in ("x", "y"):
        build_tokenizer(tmp_path / f"vocabulary-{name}").save_pretrained(str(tmp_path / name))
        saved.append({f.name: f.read_bytes() for f in sorted((tmp_path / name).iterdir())})
    assert saved[0] == saved[1] and "tokenizer.json" in saved[0]


def _images(pipe, prompt="a large red circle on the left on a black background"):
    return pipe(prompt, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(5), output_type="pt").images


def test_the_stack_saves_and_loads_back_to_equal_outputs(saved_stack, tmp_path):
    built = build_stack(StackConfig(), seed=0, tokenizer_folder=tmp_path / "vocabulary")
    built.set_progress_bar_config(disable=True)
    loaded = load_stack(saved_stack)
    assert [type(loaded.components[n]).__name__ for n in ("vae", "unet", "text_encoder", "tokenizer", "scheduler")] == [
        "AutoencoderKL", "UNet2DConditionModel", "CLIPTextModel", "CLIPTokenizer", "DDIMScheduler"]
    assert loaded.safety_checker is None and loaded.feature_extractor is None
    images = _images(built)
    assert images.shape == (1, 3, 32, 32) and torch.equal(images, _images(loaded))
    assert not torch.equal(images, _images(loaded, "a small blue square at the top on a white background"))  # the prompt matters


def test_the_description_records_configs_parameters_and_a_hash(saved_stack, tmp_path):
    description = check_base(saved_stack)
    pipe = load_stack(saved_stack)
    for name in ("vae", "unet", "text_encoder"):
        assert description.components[name].parameters == sum(p.numel() for p in pipe.components[name].state_dict().values())
    assert description.components["unet"].config["cross_attention_dim"] == StackConfig().text_width
    copy = shutil.copytree(saved_stack, tmp_path / "copy")
    assert check_base(copy).sha256 == description.sha256
    (copy / "scheduler" / "scheduler_config.json").write_text(
        (copy / "scheduler" / "scheduler_config.json").read_text().replace('"steps_offset": 1', '"steps_offset": 0'))
    assert check_base(copy).sha256 != description.sha256


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


REFUSED = {
    "wrong class": (lambda d: _edit_json(d / "model_index.json", lambda m: m.update(unet=["diffusers", "UNet2DModel"])),
                    r"base component 'unet' is a UNet2DModel: dataward takes UNet2DConditionModel"),
    "missing component": (lambda d: _edit_json(d / "model_index.json", lambda m: m.pop("text_encoder")),
                          r"has no 'text_encoder' component"),
    "pickle file": (lambda d: (d / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not loaded"),
                    r"holds pickle-format file\(s\) vae/diffusion_pytorch_model.bin: dataward never loads pickles"),
    "wrong pipeline": (lambda d: _edit_json(d / "model_index.json", lambda m: m.update(_class_name="StableDiffusionXLPipeline")),
                       r"holds a StableDiffusionXLPipeline: dataward takes a StableDiffusionPipeline folder"),
    "wrong shape": (lambda d: _edit_json(d / "unet" / "config.json", lambda c: c.update(cross_attention_dim=48)),
                    r"the unet's cross_attention_dim 48 is not the text_encoder's hidden_size 32"),
    "safety checker": (lambda d: _edit_json(d / "model_index.json", lambda m: m.update(safety_checker=["x", "StableDiffusionSafetyChecker"])),
                       r"has a 'safety_checker' component: dataward loads none"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_base_that_does_not_fit_is_refused_by_name(saved_stack, tmp_path, case):
    edit, message = REFUSED[case]
    folder = shutil.copytree(saved_stack, tmp_path / "base")
    edit(folder)
    with pytest.raises(DatawardError, match=message):
        load_stack(folder)


def _pretrained(tmp_path, seed, name):
    from dataward.config import TrainConfig
    from dataward.data import load_source
    from dataward.text.pretrain import PretrainConfig, pretrain_stack

    quick = PretrainConfig(autoencoder=TrainConfig(steps=3, batch_size=8), denoiser=TrainConfig(steps=3, batch_size=8))
    data = load_source("captioned-shapes:split=public,count=16,seed=1")
    return pretrain_stack(data, StackConfig(), quick, seed, tmp_path / name)


def test_pretraining_is_deterministic_from_its_seed(tmp_path):
    first, again, other = _pretrained(tmp_path, 0, "a"), _pretrained(tmp_path, 0, "b"), _pretrained(tmp_path, 1, "c")
    for name in ("vae", "unet", "text_encoder"):
        state, same, different = (p.components[name].state_dict() for p in (first, again, other))
        assert all(torch.equal(state[k], same[k]) for k in state)
        assert not all(torch.equal(state[k], different[k]) for k in state)
    assert first.vae.config.scaling_factor != 0.18215  # measured on the public latents, not diffusers' default
    assert torch.equal(_images(first), _images(again))


def test_pretraining_refuses_data_without_captions(tmp_path):
    from dataward.data import load_source
    from dataward.text.pretrain import PretrainConfig, pretrain_stack

    with pytest.raises(DatawardError, match="needs captioned data"):
        pretrain_stack(load_source("shapes:count=8"), StackConfig(), PretrainConfig(), 0, tmp_path)
