"""minigpt/hub/export_gguf.py: GGUF export, read back with gguf.GGUFReader, and (marker `gguf`, `make test-gguf`)
run in llama.cpp through llama-cpp-python, whose greedy tokens must equal generate()'s.

For each position type a tiny model with a trained byte-level BPE is exported once: learned (gpt2 arch, tied head),
sinusoidal (gpt2 arch, untied head, so output.weight is written) and rope (gptneox arch, bias=False, so the biases
llama.cpp requires are written as zeros). The read-back tensors must equal the state dict bit for bit: the export
permutes nothing.
"""

import re

import numpy as np
import pytest
import torch
from conftest import tiny_config

from minigpt.hub import export_gguf  # imports gguf only when it exports
from minigpt.train.tokenizer import train_tokenizer
from modeling_minigpt import MiniGPTForCausalLM

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install -e '.[dev]'")

TEXT = ["the quick brown fox jumps over the lazy dog and the dog sleeps in the sun"] * 20
VOCAB = 320  # the tokenizer has fewer: the ids past it are written as unused [PAD{id}] tokens
VARIANTS = {
    "learned": dict(position_embedding_type="learned"),
    "sinusoidal": dict(position_embedding_type="sinusoidal", tie_word_embeddings=False),
    "rope": dict(position_embedding_type="rope", bias=False, rope_theta=500.0),
}
PROMPT = "the lazy fox jumps over the dog"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, vocab_size=300, min_frequency=1)


def _perturb(model, seed: int = 1):
    """Move every parameter off its init (LayerNorms off 1/0 too), so that each name in the table matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _tiny_model(**overrides):
    torch.manual_seed(0)
    # a wide init: greedy tokens then vary, where the default init repeats one token
    return _perturb(MiniGPTForCausalLM(tiny_config(vocab_size=VOCAB, initializer_range=0.5, **overrides)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory, tokenizer):
    """(position type, model, tokenizer, path of the .gguf): a tiny model saved with its tokenizer and exported."""
    folder = tmp_path_factory.mktemp(f"gguf-{request.param}")
    model = _tiny_model(**VARIANTS[request.param])
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    path = folder / "model.gguf"
    if request.param == "learned":  # one goes through the command line's main(), the others through export()
        result = export_gguf.main([str(folder / "model"), str(path)])
    else:
        result = export_gguf.export(folder / "model", path)
    assert result["arch"] == export_gguf.ARCH[request.param]
    return request.param, model, tokenizer, path


def _fields(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def _expected_tensors(kind: str, model) -> dict[str, torch.Tensor]:
    """The GGUF tensors llama.cpp's graph reads, written out from the state dict by hand (not through the table)."""
    config, state = model.config, model.state_dict()
    out = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output_norm.bias": state.get("model.norm.bias"),
    }
    if kind == "learned":
        out["position_embd.weight"] = state["model.embed_positions.weight"]
    if kind == "sinusoidal":
        with torch.no_grad():
            out["position_embd.weight"] = model.model.embed_positions(torch.arange(config.n_positions)[None])[0]
    if not (kind != "rope" and config.tie_word_embeddings):  # gpt2 reuses token_embd for a tied head
        out["output.weight"] = state["lm_head.weight"]
    for i in range(config.n_layer):
        layer = f"model.layers.{i}."
        for gguf_name, mini_name in [("attn_norm", "input_layernorm"), ("attn_qkv", "self_attn.qkv_proj"),
                                     ("attn_output", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
                                     ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")]:  # fmt: skip
            out[f"blk.{i}.{gguf_name}.weight"] = state[layer + mini_name + ".weight"]
            out[f"blk.{i}.{gguf_name}.bias"] = state.get(layer + mini_name + ".bias")
    # bias=False: llama.cpp's gpt2 and gptneox graphs require biases, written as zeros
    return {k: torch.zeros(out[k.replace(".bias", ".weight")].shape[0]) if v is None else v for k, v in out.items()}


@pytest.mark.oldest
def test_tensors_read_back_equal_the_state_dict(exported):
    kind, model, _, path = exported
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    expected = _expected_tensors(kind, model)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        # GGUF stores ggml's ne = (in, out), the reverse of PyTorch's (out, in); the reader gives back numpy order
        assert got[name].tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(got[name].data).reshape(tensor.shape), tensor.numpy(), err_msg=name)
        assert list(got[name].shape) == list(reversed(tensor.shape)), name
    # every name is one llama.cpp knows for this architecture
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == export_gguf.ARCH[kind])
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    assert {re.sub(r"^blk\.\d+\.", "blk.{bid}.", n.rsplit(".", 1)[0]) for n in got} <= known


@pytest.mark.oldest
def test_metadata_describes_the_model_and_its_tokenizer(exported):
    kind, model, tokenizer, path = exported
    config, arch = model.config, export_gguf.ARCH[kind]
    fields = _fields(gguf.GGUFReader(path))
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.context_length"] == config.n_positions == 64
    assert fields[f"{arch}.embedding_length"] == config.n_embd == 32
    assert fields[f"{arch}.block_count"] == config.n_layer == 2
    assert fields[f"{arch}.feed_forward_length"] == config.intermediate_size == 128
    assert fields[f"{arch}.attention.head_count"] == config.n_head == 4
    assert fields[f"{arch}.attention.layer_norm_epsilon"] == pytest.approx(config.layer_norm_epsilon)
    if kind == "rope":
        assert fields["gptneox.rope.freq_base"] == 500.0
        assert fields["gptneox.rope.dimension_count"] == config.head_dim == 8
        assert fields["gptneox.use_parallel_residual"] is False
    else:
        assert not any(".rope." in name for name in fields)

    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == VOCAB
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == token for token, i in vocab.items())
    assert tokens[len(tokenizer)] == f"[PAD{len(tokenizer)}]" and types[-1] == gguf.TokenType.UNUSED
    assert [types[i] for i in tokenizer.all_special_ids] == [gguf.TokenType.CONTROL] * 3
    assert types[vocab["the"]] == gguf.TokenType.NORMAL
    merges = fields["tokenizer.ggml.merges"]
    assert len(merges) == len(tokenizer) - 256 - 3 and all(len(m.split(" ")) == 2 for m in merges)
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id == 1
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == 2
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id == 0
    assert fields["tokenizer.ggml.add_bos_token"] is False  # train_tokenizer adds nothing around the text


def test_f16_halves_the_matrices_and_keeps_norms_and_biases_f32(tmp_path, tokenizer):
    model = _tiny_model()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    export_gguf.main([str(tmp_path / "model"), str(tmp_path / "f16.gguf"), "--outtype", "f16"])
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "f16.gguf").tensors}
    assert tensors["blk.0.attn_qkv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["blk.0.attn_qkv.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    qkv = model.state_dict()["model.layers.0.self_attn.qkv_proj.weight"]
    np.testing.assert_array_equal(
        np.asarray(tensors["blk.0.attn_qkv.weight"].data).reshape(qkv.shape), qkv.numpy().astype(np.float16)
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(norm_position="post"), "norm_position='post' \\(post-LN\\) has no llama.cpp equivalent"),
        (dict(activation_function="gelu"), "activation_function='gelu' has no llama.cpp equivalent.*tanh-GELU"),
        (dict(activation_function="relu"), "activation_function='relu' has no llama.cpp equivalent"),
    ],
)
def test_what_llama_cpp_cannot_compute_is_refused_with_a_clear_error(tmp_path, tokenizer, overrides, message):
    MiniGPTForCausalLM(tiny_config(vocab_size=VOCAB, **overrides)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=message):
        export_gguf.export(tmp_path / "model", tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_the_command_line_reports_errors_without_a_traceback(tmp_path, tokenizer, capsys):
    MiniGPTForCausalLM(tiny_config(vocab_size=VOCAB, norm_position="post")).save_pretrained(tmp_path / "post")
    tokenizer.save_pretrained(tmp_path / "post")
    with pytest.raises(SystemExit) as exit_:
        export_gguf.cli([str(tmp_path / "post"), str(tmp_path / "out.gguf")])
    assert exit_.value.code == 2 and "post-LN" in capsys.readouterr().err

    MiniGPTForCausalLM(tiny_config(vocab_size=VOCAB)).save_pretrained(tmp_path / "bare")  # no tokenizer saved
    with pytest.raises(SystemExit):
        export_gguf.cli([str(tmp_path / "bare"), str(tmp_path / "out.gguf")])
    err = capsys.readouterr().err
    assert "has no tokenizer.json" in err and "--tokenizer DIR" in err
    # --tokenizer points at the one the model was trained with
    export_gguf.main([str(tmp_path / "bare"), str(tmp_path / "out.gguf"), "--tokenizer", str(tmp_path / "post")])
    assert (tmp_path / "out.gguf").is_file()

    with pytest.raises(SystemExit):
        export_gguf.cli([str(tmp_path / "missing"), str(tmp_path / "out2.gguf")])
    assert "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out2.gguf").exists()


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path, tokenizer):
    MiniGPTForCausalLM(tiny_config(vocab_size=280)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match=f"tokenizer has {len(tokenizer)} tokens but the model embeds 280"):
        export_gguf.export(tmp_path / "model", tmp_path / "model.gguf")


# ------------------------------------------------------------------------------------- llama.cpp runtime parity
@pytest.mark.gguf
def test_llama_cpp_gives_the_tokens_of_generate(exported):
    """llama.cpp (through llama-cpp-python) tokenizes the prompt as the HF tokenizer does, and its greedy tokens equal
    generate(do_sample=False)'s. `make test-gguf` installs llama-cpp-python (it builds llama.cpp from source)."""
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed; `make test-gguf` installs it (builds llama.cpp)"
    )
    kind, model, tokenizer, path = exported
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.n_positions, n_threads=1, n_batch=64,
                          logits_all=True, verbose=False)  # fmt: skip
    prompt = tokenizer.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == prompt
    assert llm.detokenize(prompt).decode() == tokenizer.decode(prompt)

    n_new = 24
    expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=n_new)[0, len(prompt):].tolist()  # fmt: skip
    got = []
    for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(token)
        if len(got) == n_new:
            break
    # generate() stops at EOS; llama-cpp-python's generator does not
    assert len(expected) == n_new or expected[-1] == model.config.eos_token_id
    print(f"{kind}: generate {expected}\n{kind}: llama.cpp {got[: len(expected)]}")
    assert got[: len(expected)] == expected

    # the logits of the whole sequence, to a tolerance: llama.cpp's GELU goes through an fp16 table
    ids = prompt + expected
    llm.reset()
    llm.eval(ids)
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    diff = np.abs(np.asarray(llm.scores[: len(ids)]) - reference).max()
    print(f"{kind}: max |logit difference| {diff:.2e} (logits span {np.ptp(reference):.1f})")
    assert diff < 1e-2 * np.ptp(reference)
