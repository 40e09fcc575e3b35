"""minigpt/hub/export_onnx.py: ONNX export with a KV cache, checked against PyTorch through onnxruntime.

For each position type, a tiny model is exported once (prefill + decode graphs); onnxruntime must give the logits of
PyTorch to 1e-4 on a left-padded batch, through the cache too, and greedy_onnx the same tokens as generate().
"""

import sys

import numpy as np
import pytest
import torch
from conftest import tiny_config

from modeling_minigpt import MiniGPTForCausalLM

pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript: pip install -e '.[dev]'")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install -e '.[dev]'")

from minigpt.hub import export_onnx

PAD, EOS = 0, 2


@pytest.fixture(scope="module", params=["learned", "sinusoidal", "rope"])
def exported(request, tmp_path_factory):
    """(model, sessions, seconds): a tiny model of one position type, saved, exported and loaded in onnxruntime."""
    folder = tmp_path_factory.mktemp(f"onnx-{request.param}")
    torch.manual_seed(0)
    # a wide init: greedy tokens then vary (and [learned] reaches EOS), where the default init repeats one token
    model = MiniGPTForCausalLM(tiny_config(position_embedding_type=request.param, initializer_range=0.5)).eval()
    model.save_pretrained(folder / "model")
    # one position type goes through the command line's main(), the others through export()
    if request.param == "learned":
        seconds = export_onnx.main([str(folder / "model"), str(folder / "onnx"), "--opset", "18"])
    else:
        seconds = export_onnx.export(folder / "model", folder / "onnx")
    return model, export_onnx.load_sessions(folder / "onnx"), seconds


def left_padded_batch():
    """Two prompts of lengths 6 and 3, the short one padded on the left: (2, 6) ids and mask."""
    ids = torch.tensor([[5, 17, 42, 8, 63, 21], [PAD, PAD, PAD, 11, 73, 36]])
    return ids, (ids != PAD).long()


def test_prefill_and_decode_logits_match_pytorch_on_a_left_padded_batch(exported):
    model, (prefill, decode), _ = exported
    ids, mask = left_padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    logits, *present = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    real = mask.bool().numpy()  # padded positions' logits are meaningless on both sides
    np.testing.assert_allclose(logits[real], expected.numpy()[real], atol=1e-4, rtol=0)
    assert len(present) == 2 * model.config.n_layer and present[0].shape == (2, 4, 6, 8)  # (B, nh, T, hs)

    # one decode step through the cache equals the full forward over prompt + token
    nxt = torch.tensor([[7], [9]])
    full_ids, full_mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        expected = model(input_ids=full_ids, attention_mask=full_mask).logits[:, -1:]  # (B, 1, V)
    feed = {"input_ids": nxt.numpy(), "attention_mask": full_mask.numpy()}
    feed.update(zip(export_onnx.past_names(model.config.n_layer, "past"), present))
    logits, *present = decode.run(None, feed)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
    assert present[0].shape == (2, 4, 7, 8)

    # dynamic batch and length: another shape than the traced examples
    ids = torch.randint(3, 100, (3, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    logits = prefill.run(None, {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 11), dtype=np.int64)})[0]
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)


def test_greedy_onnx_gives_the_tokens_of_generate(exported):
    model, sessions, _ = exported
    ids, mask = left_padded_batch()
    expected = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                              eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip
    got = export_onnx.greedy_onnx(sessions, ids, mask, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
    assert got.tolist() == expected.tolist()
    # one row at a time: the same tokens as in the batch (left padding changes nothing)
    alone = export_onnx.greedy_onnx(sessions, ids[1:, 3:], mask[1:, 3:], max_new_tokens=12, eos_token_id=EOS,
                                    pad_token_id=PAD)  # fmt: skip
    assert alone[0].tolist() == got[1, 3 : 3 + alone.shape[1]].tolist()


def test_export_timings_are_reported(exported):
    _, _, seconds = exported
    assert set(seconds) == {"model.onnx", "model_with_past.onnx"} and all(s > 0 for s in seconds.values())
    print("export seconds:", {k: round(v, 1) for k, v in seconds.items()})


def test_both_graphs_have_the_documented_names(exported):
    model, (prefill, decode), _ = exported  # [learned] was written by the command line's main()
    names = export_onnx.past_names(model.config.n_layer, "present")
    assert [i.name for i in prefill.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in prefill.get_outputs()] == ["logits", *names]
    assert [i.name for i in decode.get_inputs()] == ["input_ids", "attention_mask",
                                                     *export_onnx.past_names(model.config.n_layer, "past")]
    assert [o.name for o in decode.get_outputs()] == ["logits", *names]


def test_the_command_line_reports_a_bad_folder_without_a_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_onnx.cli([str(tmp_path), str(tmp_path / "onnx")])
    assert exit_.value.code == 2 and "has no config.json" in capsys.readouterr().err


def test_a_folder_without_config_json_is_refused_with_the_fix(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match="no config.json.*save_pretrained"):
        export_onnx.export(tmp_path, tmp_path / "onnx")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        export_onnx.export(tmp_path / "missing", tmp_path / "onnx")
    with pytest.raises(FileNotFoundError, match="python -m minigpt.hub.export_onnx"):
        export_onnx.load_sessions(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="not MiniGPT.*minigpt.hub.convert_gpt2"):
        export_onnx.export(tmp_path, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("missing", ["onnxscript", "onnx"])
def test_a_missing_optional_package_is_one_line_that_says_how_to_install_it(tmp_path, capsys, monkeypatch, missing):
    """A wheel installed without the dev extra has no onnx/onnxscript/onnxruntime: one line naming the pip command,
    before any model loads (here the folder does not even exist)."""
    monkeypatch.setitem(sys.modules, missing, None)  # what find_spec reports for a package that is not installed
    with pytest.raises(SystemExit) as exit_:
        export_onnx.cli([str(tmp_path / "missing"), str(tmp_path / "onnx")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert f"error: the ONNX export needs {missing}, which is not installed; install them with pip install onnx " \
           "onnxscript onnxruntime (or the dev extra: pip install 'minigpt[dev]')" in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="needs onnxruntime"):
        export_onnx.load_sessions(tmp_path)
