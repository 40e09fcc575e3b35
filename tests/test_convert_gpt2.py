"""GPT-2 compatibility: a GPT2LMHeadModel converted to MiniGPT computes the same logits and generates the same
tokens, and a GPT-2-compatible MiniGPT converts to GPT2LMHeadModel and back without changing a number.

The reference is transformers' own GPT2LMHeadModel, randomly initialised here (nothing is downloaded), with every
parameter perturbed so that LayerNorm gains and biases are not the trivial 1 and 0 a swapped name could hide behind.
"""

import json
import logging
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import free_port, tiny_config
from hub_server import hub_env
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from minigpt.hub.convert_gpt2 import cli, convert_state_dict, gpt2_to_minigpt, main, minigpt_to_gpt2
from minigpt.train.tokenizer import train_tokenizer
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM

ATOL = 1e-5
TEXT = ["the quick brown fox jumps over the lazy dog and the dog sleeps in the sun"] * 20




def _perturb(model, seed: int):
    """Move every parameter off its init (LayerNorms off 1/0 too), so each name in the table matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _tiny_gpt2(attn_implementation: str, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    fields = dict(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=300, bos_token_id=1, eos_token_id=2)
    config = GPT2Config(**{**fields, **overrides}, attn_implementation=attn_implementation)
    return _perturb(GPT2LMHeadModel(config), seed=1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def converted(request, tmp_path_factory, tokenizer):
    """(GPT-2 reference, MiniGPT converted from it through the CLI entry point, the MiniGPT folder)."""
    impl = request.param
    src, dst = tmp_path_factory.mktemp(f"gpt2-{impl}"), tmp_path_factory.mktemp(f"minigpt-{impl}")
    gpt2 = _tiny_gpt2(impl)
    gpt2.save_pretrained(src)
    tokenizer.save_pretrained(src)
    main([str(src), str(dst)])
    mini = AutoModelForCausalLM.from_pretrained(dst, attn_implementation=impl).eval()
    return gpt2, mini, dst


@pytest.mark.oldest
def test_converted_folder_is_a_complete_minigpt_checkpoint(converted):
    _, mini, dst = converted
    assert type(mini) is MiniGPTForCausalLM
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "minigpt"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_minigpt.MiniGPTForCausalLM"
    for name in (
        "modeling_minigpt.py",
        "configuration_minigpt.py",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (dst / name).is_file(), name
    c = mini.config
    assert (c.position_embedding_type, c.activation_function, c.norm_position, c.bias, c.tie_word_embeddings) == (
        "learned",
        "gelu_new",
        "pre",
        True,
        True,
    )
    assert (c.intermediate_size, c.layer_norm_epsilon) == (128, 1e-5)  # n_inner may be None: 4 * n_embd
    assert mini.lm_head.weight.data_ptr() == mini.model.embed_tokens.weight.data_ptr()


@pytest.mark.oldest
def test_logits_and_greedy_tokens_match_gpt2(converted, tokenizer):
    gpt2, mini, _ = converted
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = gpt2(ids).logits, mini(ids).logits
    diff = (ref - out).abs().max().item()
    print(f"GPT-2 parity ({gpt2.config._attn_implementation}): max |logit diff| = {diff:.3e}")
    assert diff < ATOL

    prompt = tokenizer("the quick brown", return_tensors="pt")
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    a, b = gpt2.generate(**prompt, **kwargs), mini.generate(**prompt, **kwargs)
    assert a.tolist() == b.tolist()
    assert a.shape[1] == prompt.input_ids.shape[1] + 20
    assert tokenizer.decode(a[0]) == tokenizer.decode(b[0])


@pytest.mark.oldest
def test_left_padded_batch_matches_gpt2(converted):
    gpt2, mini, _ = converted
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5], mask[1, :2] = 0, 0  # left padding of 5 and 2 tokens; row 2 is full
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # GPT-2's forward does not derive them from the mask
    with torch.no_grad():
        ref = gpt2(ids, attention_mask=mask, position_ids=positions).logits
        out = mini(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    diff = (ref[real] - out[real]).abs().max().item()
    print(f"GPT-2 parity, left-padded ({gpt2.config._attn_implementation}): max |logit diff| = {diff:.3e}")
    assert diff < ATOL

    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    a = gpt2.generate(input_ids=ids, attention_mask=mask, **kwargs)
    b = mini.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert a.tolist() == b.tolist()


@pytest.mark.oldest
@pytest.mark.parametrize("tied", [True, False])
def test_minigpt_to_gpt2_round_trip(tmp_path, tied):
    torch.manual_seed(0)
    mini = _perturb(MiniGPTForCausalLM(tiny_config(tie_word_embeddings=tied)), seed=2)
    mini.save_pretrained(tmp_path / "mini")
    main([str(tmp_path / "mini"), str(tmp_path / "gpt2"), "--reverse"])
    gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    assert type(gpt2) is GPT2LMHeadModel and gpt2.config.tie_word_embeddings is tied
    # n_ctx, which GPT-2 tools such as llama.cpp's convert_hf_to_gguf.py read, is the context length
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["n_ctx"] == mini.config.n_positions == 64

    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (mini(ids).logits - gpt2(ids).logits).abs().max().item()
    print(f"MiniGPT -> GPT-2 (tied={tied}): max |logit diff| = {diff:.3e}")
    assert diff < ATOL

    back = gpt2_to_minigpt(str(tmp_path / "gpt2"), str(tmp_path / "back"))
    for name, tensor in mini.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_refuses_a_checkpoint_that_is_not_gpt2(tmp_path):
    MiniGPTConfig(n_layer=1, n_embd=32, n_head=4, vocab_size=100).save_pretrained(tmp_path / "mini")
    with pytest.raises(ValueError, match=r"'minigpt' checkpoint, not GPT-2.*--reverse"):
        gpt2_to_minigpt(str(tmp_path / "mini"), str(tmp_path / "out"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(SystemExit, match=r"'llama' checkpoint, not GPT-2"):
        cli([str(tmp_path / "llama"), str(tmp_path / "out")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        gpt2_to_minigpt(str(tmp_path / "empty"), str(tmp_path / "out"))
    GPT2Config(n_layer=1, n_embd=32, n_head=4, scale_attn_by_inverse_layer_idx=True).save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True"):
        gpt2_to_minigpt(str(tmp_path / "g"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field, value", [("position_embedding_type", "rope"), ("norm_position", "post"), ("bias", False)]
)
def test_reverse_refuses_a_config_gpt2_cannot_express(tmp_path, field, value):
    tiny_config(**{field: value}).save_pretrained(tmp_path / "mini")
    with pytest.raises(ValueError, match=rf"{field}={value!r}.*GPT-2-compatible"):
        minigpt_to_gpt2(str(tmp_path / "mini"), str(tmp_path / "out"))
    GPT2Config(n_layer=1, n_embd=32, n_head=4).save_pretrained(tmp_path / "g")
    with pytest.raises(ValueError, match=r"'gpt2' checkpoint, not MiniGPT"):
        minigpt_to_gpt2(str(tmp_path / "g"), str(tmp_path / "out"))


def test_special_ids_outside_the_vocabulary_are_dropped_with_a_warning(tmp_path):
    """GPT2Config's bos/eos default to 50256 whatever the vocabulary; GPT2LMHeadModel loads such a checkpoint with a
    warning, so the converter must too: the ids are dropped, said so, and the logits are GPT-2's."""
    torch.manual_seed(0)
    gpt2 = _perturb(GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)), 1)
    assert (gpt2.config.bos_token_id, gpt2.config.eos_token_id) == (50256, 50256)
    gpt2.save_pretrained(tmp_path / "gpt2")
    cmd = [sys.executable, "-m", "minigpt.hub.convert_gpt2", str(tmp_path / "gpt2"), str(tmp_path / "mini")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("bos_token_id", "eos_token_id"):
        assert f"{name}=50256 is outside the vocabulary of 97; dropped (set to None)" in run.stderr
    assert "pad_token_id" not in run.stderr  # None already: nothing to say

    mini = MiniGPTForCausalLM.from_pretrained(tmp_path / "mini").eval()
    config = json.loads((tmp_path / "mini" / "config.json").read_text())
    generation = json.loads((tmp_path / "mini" / "generation_config.json").read_text())
    assert config["bos_token_id"] is config["eos_token_id"] is None
    assert generation.get("bos_token_id") is generation.get("eos_token_id") is None
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (gpt2(ids).logits - mini(ids).logits).abs().max().item() < ATOL


def test_every_gpt2_config_value_minigpt_refuses_is_dropped_or_reset_with_a_warning_both_ways(tmp_path, caplog):
    """The other values GPT2LMHeadModel loads and MiniGPTConfig refuses: a pad id below 0, eos ids of which one lies
    outside, dropout 1 (nn.Dropout takes it), a LayerNorm epsilon of 0, initializer_range 5. None changes an eval
    forward, so the logits match; the way back to GPT-2 keeps the converted values."""
    torch.manual_seed(0)
    odd = dict(pad_token_id=-1, eos_token_id=[5, 50256], resid_pdrop=1.0, layer_norm_epsilon=0.0,
               initializer_range=5.0)  # fmt: skip
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, **odd))
    gpt2 = _perturb(gpt2, 1)
    gpt2.save_pretrained(tmp_path / "gpt2")
    with caplog.at_level(logging.WARNING, logger="minigpt.hub.convert_gpt2"):
        main([str(tmp_path / "gpt2"), str(tmp_path / "mini")])
    for message in (
        "bos_token_id=50256 is outside the vocabulary of 97; dropped (set to None)",
        "eos_token_id=[5, 50256] holds ids outside the vocabulary of 97; dropped (set to [5])",
        "pad_token_id=-1 is outside the vocabulary of 97; dropped (set to None)",
        "resid_pdrop=1.0 is outside MiniGPT's [0, 1); set to 0.0",
        "layer_norm_epsilon=0.0 is not > 0 as MiniGPT needs; set to 1e-12 (the logits are the same)",
        "initializer_range=5.0 is outside MiniGPT's [0, 1]; set to 0.02",
    ):
        assert message in caplog.text
    mini = MiniGPTForCausalLM.from_pretrained(tmp_path / "mini").eval()
    c = mini.config
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (None, [5], None)
    assert (c.resid_pdrop, c.layer_norm_epsilon, c.initializer_range) == (0.0, 1e-12, 0.02)

    main([str(tmp_path / "mini"), str(tmp_path / "back"), "--reverse"])
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert (back.config.eos_token_id, back.config.layer_norm_epsilon) == ([5], 1e-12)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = gpt2(ids).logits
        assert (ref - mini(ids).logits).abs().max().item() < ATOL
        assert (ref - back(ids).logits).abs().max().item() < ATOL


def test_name_table_counts_every_tensor():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16))
    state = gpt2.state_dict()
    converted = convert_state_dict(state, n_layer=2)
    assert len(converted) == len(state) == len(MiniGPTForCausalLM(tiny_config()).state_dict())
    assert converted["model.layers.0.self_attn.qkv_proj.weight"].shape == (96, 32)  # Conv1D (32, 96) transposed
    with pytest.raises(ValueError, match="tensors the conversion doesn't know.*extra"):
        convert_state_dict({**state, "transformer.extra": torch.zeros(1)}, n_layer=2)
    with pytest.raises(KeyError, match="no tensor 'transformer.h.1.ln_1.weight'"):
        convert_state_dict({k: v for k, v in state.items() if k != "transformer.h.1.ln_1.weight"}, n_layer=2)


def test_converts_a_hub_id(hub, tmp_path, tokenizer):
    """`python -m minigpt.hub.convert_gpt2 OWNER/NAME DST` downloads from the Hub (here the local test Hub) and converts.
    The repo is laid out like openai-community/gpt2: GPT2Model-style names without the `transformer.` prefix, the
    old causal-mask buffers `h.N.attn.bias`, no `lm_head.weight` (tied), and a tokenizer."""
    gpt2 = _tiny_gpt2("sdpa")
    gpt2.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    n = gpt2.config.n_positions
    state = {k.removeprefix("transformer."): v for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    state.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, n, n)) for i in range(gpt2.config.n_layer)})
    save_file(state, tmp_path / "gpt2" / "model.safetensors", metadata={"format": "pt"})
    files = {p.name: p.read_bytes() for p in (tmp_path / "gpt2").iterdir()}
    hub.create_repo("openai-community/tiny-gpt2", files=files)

    cmd = [sys.executable, "-m", "minigpt.hub.convert_gpt2", "openai-community/tiny-gpt2", str(tmp_path / "mini")]
    run = subprocess.run(cmd, env=hub_env(hub, token=None), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote MiniGPTForCausalLM" in run.stdout
    mini = MiniGPTForCausalLM.from_pretrained(tmp_path / "mini").eval()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (gpt2(ids).logits - mini(ids).logits).abs().max().item() < ATOL
    assert (tmp_path / "mini" / "tokenizer.json").is_file()
    downloads = [path for method, path, status in hub.requests if method == "GET" and status == 200]
    assert any(path.endswith("/model.safetensors") for path in downloads), hub.requests


@pytest.mark.parametrize("typo", ["./gtp2", "models/gtp2", "{tmp}/gtp2"])
def test_a_misspelled_local_path_fails_at_once_without_asking_the_hub(tmp_path, monkeypatch, typo):
    """A path that looks local and does not exist is a typo: "no such folder" at once, not a minute of Hub retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    start = time.perf_counter()
    for reverse in ([], ["--reverse"]):
        with pytest.raises(SystemExit, match="no such folder"):
            cli([typo.format(tmp=tmp_path), str(tmp_path / "out"), *reverse])
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("reverse", [False, True])
def test_a_bare_name_that_is_no_folder_fails_at_once_offline(tmp_path, monkeypatch, reverse):
    """gpt2-folderr: no "/", no such folder. Offline (as the tests run) it is not looked for on the Hub at all."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r"no such folder gpt2-folderr \(and gpt2-folderr is not a Hub id of the "
                                         r"form owner/name\).*HF_HUB_OFFLINE is set.*openai-community/gpt2"):
        cli(["gpt2-folderr", str(tmp_path / "out"), *(["--reverse"] if reverse else [])])
    assert time.perf_counter() - start < 10
    assert not (tmp_path / "out").exists()


def test_a_bare_name_fails_at_once_when_the_hub_cannot_be_reached_or_has_no_such_model(hub, tmp_path, monkeypatch):
    """Online, the bare name is asked of the Hub once: an unreachable Hub or a missing model ends at once, with the
    reason, instead of minutes of retries ending in "couldn't connect to huggingface.co"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r"no such folder gpt2-folderr \(and gpt2-folderr is not a Hub id of the "
                                         r"form owner/name\).*huggingface.co could not be reached"):
        cli(["gpt2-folderr", str(tmp_path / "out")])
    assert time.perf_counter() - start < 30

    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", hub.url)  # a Hub that answers: no such model
    with pytest.raises(SystemExit, match=r"no such folder gpt2-folderr .*huggingface.co has no model of that name"):
        cli(["gpt2-folderr", str(tmp_path / "out")])
    assert [path for _, path, _ in hub.requests if "gpt2-folderr" in path] == ["/api/models/gpt2-folderr"]
    assert not (tmp_path / "out").exists()


def test_a_converted_folder_without_a_tokenizer_gets_a_warning_that_says_how_to_add_one(tmp_path, caplog):
    _tiny_gpt2("sdpa").save_pretrained(tmp_path / "gpt2")  # no tokenizer saved next to it
    with caplog.at_level(logging.WARNING, logger="minigpt.hub.convert_gpt2"):
        main([str(tmp_path / "gpt2"), str(tmp_path / "mini")])
    dst = str(tmp_path / "mini")
    assert f"{tmp_path / 'gpt2'} has no tokenizer, so the converted folder {dst} has none either" in caplog.text
    assert f"AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained({dst!r})" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minigpt.hub.convert_gpt2"):
        main([dst, str(tmp_path / "back"), "--reverse"])
    assert "has no tokenizer, so the converted folder" in caplog.text


def test_no_tokenizer_warning_when_the_source_has_one(converted, caplog, tmp_path):
    _, _, dst = converted  # converted with its tokenizer
    with caplog.at_level(logging.WARNING, logger="minigpt.hub.convert_gpt2"):
        main([str(dst), str(tmp_path / "gpt2"), "--reverse"])
    assert "has no tokenizer" not in caplog.text
    assert (tmp_path / "gpt2" / "tokenizer.json").is_file()


def test_an_unreachable_hub_id_is_one_line_and_exit_status_1(tmp_path):
    """openai-community/gpt2 with no Hub to ask (offline, an empty cache, an endpoint nobody listens on): one line
    `convert_gpt2: error: ...`, not transformers' OSError traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    cmd = [sys.executable, "-m", "minigpt.hub.convert_gpt2", "openai-community/gpt2", str(tmp_path / "out")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().startswith("convert_gpt2: error: ") and "openai-community/gpt2" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
