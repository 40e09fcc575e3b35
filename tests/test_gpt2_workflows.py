"""Workflows users run on a model, each run on transformers' GPT2LMHeadModel and on MiniGPT holding the same weights
(converted with minigpt/hub/convert_gpt2.py), so the two compute the same function. Where GPT-2 gets it right, MiniGPT must
give the same result:
- generate after the head's weights are changed in place (`.data` writes, new-token rows, a merged LoRA);
- training with gradient checkpointing and `use_cache=True`.
"""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from minigpt.hub.convert_gpt2 import config_from_gpt2, convert_state_dict
from modeling_minigpt import MiniGPTForCausalLM
from modeling_minigpt.modeling_minigpt import CACHE_NAME

pytestmark = pytest.mark.oldest
VOCAB = 120


def gpt2_and_minigpt(attn: str = "sdpa") -> tuple[GPT2LMHeadModel, MiniGPTForCausalLM]:
    """A GPT-2 with every parameter moved off its init, and MiniGPT with the same weights."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=1,
                        eos_token_id=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,  # training-mode tests compare gradients
                        attn_implementation=attn)  # fmt: skip
    gpt2 = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in gpt2.parameters():
            p.add_(0.05 * torch.randn_like(p))
        gpt2.transformer.wte.weight.mul_(10)  # peaked next-token distributions: no greedy near-ties
    mini = MiniGPTForCausalLM(config_from_gpt2(gpt2.config))
    mini.config._attn_implementation = attn
    mini.load_state_dict(convert_state_dict(gpt2.state_dict(), config.n_layer))
    return gpt2.eval(), mini.eval()


def greedy(model, ids: torch.Tensor, n: int = 12):
    """(tokens, the logits of every generated step) of greedy generation with the KV cache."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)  # fmt: skip
    return out.sequences, torch.stack(out.logits, dim=1)  # (B, T + n), (B, n, V)


def assert_decode_steps_use_the_current_weights(model, sequences, step_logits):
    """Each cached decode step's logits equal a full forward over the same tokens with the weights as they are."""
    with torch.no_grad():
        full = model(sequences).logits[:, -step_logits.shape[1] - 1 : -1]  # the positions that predicted each step
    diff = (full - step_logits).abs().max().item()
    assert diff < 1e-4, f"decode-step logits differ from a full forward by {diff:.3g}: stale weights"


def update_lm_head_data(model, new_rows: torch.Tensor):
    model.lm_head.weight.data.copy_(new_rows)


def update_new_token_rows(model, new_rows: torch.Tensor):
    # the usual way to initialise added tokens; the head is tied, so it changes too
    model.get_input_embeddings().weight.data[-8:] = new_rows[-8:]


@pytest.mark.parametrize("update", [update_lm_head_data, update_new_token_rows])
def test_generate_after_an_in_place_weight_update_uses_the_new_weights(update):
    gpt2, mini = gpt2_and_minigpt()
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    for model in (gpt2, mini):
        greedy(model, ids)  # a first generate: anything cached from the old weights would be made now
    new_rows = torch.randn(VOCAB, 32, generator=torch.Generator().manual_seed(2))
    results = {}
    for name, model in (("gpt2", gpt2), ("minigpt", mini)):
        update(model, new_rows * 3)
        results[name] = greedy(model, ids)
        assert_decode_steps_use_the_current_weights(model, *results[name])
    assert results["minigpt"][0].tolist() == results["gpt2"][0].tolist()
    torch.testing.assert_close(results["minigpt"][1], results["gpt2"][1], atol=1e-4, rtol=1e-4)


def test_generate_after_merging_a_lora_on_the_lm_head_matches_gpt2():
    """peft's merge_and_unload writes the LoRA product into the head's weight through `.data`."""
    gpt2, mini = gpt2_and_minigpt()
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    lora = dict(r=4, lora_alpha=32, target_modules=["lm_head"], init_lora_weights=False)
    merged = {}
    for name, model in (("gpt2", gpt2), ("minigpt", mini)):
        greedy(model, ids)
        torch.manual_seed(3)  # the same LoRA matrices for both: the head has the same shape and name in each
        merged[name] = get_peft_model(model, LoraConfig(**lora)).merge_and_unload().eval()
    assert not torch.equal(merged["gpt2"].lm_head.weight, gpt2_and_minigpt()[0].lm_head.weight)  # it did merge
    results = {name: greedy(model, ids) for name, model in merged.items()}
    assert_decode_steps_use_the_current_weights(merged["minigpt"], *results["minigpt"])
    assert results["minigpt"][0].tolist() == results["gpt2"][0].tolist()
    torch.testing.assert_close(results["minigpt"][1], results["gpt2"][1], atol=1e-4, rtol=1e-4)


GPT2_NAME = {"model.embed_tokens.weight": "transformer.wte.weight", "model.layers.0.self_attn.qkv_proj.weight":
             "transformer.h.0.attn.c_attn.weight", "model.layers.1.mlp.down_proj.weight": "transformer.h.1.mlp.c_proj.weight"}  # fmt: skip


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_with_use_cache_gives_gpt2s_gradients(attn, use_reentrant):
    """GPT-2 warns, drops the cache and gives exact gradients; MiniGPT once gave gradients off by 0.1 (sdpa,
    reentrant), a cache of 16 positions for 8 tokens, or a size error in backward (eager)."""
    gpt2, mini = gpt2_and_minigpt(attn)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    for model in (gpt2, mini):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        out = model(ids, labels=ids, use_cache=True)
        out.loss.backward()
    assert getattr(out, CACHE_NAME) is None  # MiniGPT's output: no half-filled cache handed back
    grads = dict(mini.named_parameters())
    for mini_name, gpt2_name in GPT2_NAME.items():
        expected = gpt2.get_parameter(gpt2_name).grad
        got = grads[mini_name].grad
        got = got.t() if "c_attn" in gpt2_name or "c_proj" in gpt2_name else got  # Conv1D stores (in, out)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=mini_name)


# ------------------------------------------------------------------------- label smoothing, through Trainer
def smoothed_causal_loss(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Label-smoothed cross-entropy written out: position t predicts labels[t + 1], and the loss is
    (1 - eps) * mean NLL + eps * mean over targets of the mean over the vocabulary of -log p (Trainer's LabelSmoother)."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    targets = labels[:, 1:]
    keep = targets != -100
    nll = -logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep]
    uniform = -logprobs.mean(-1)[keep]
    return (1 - epsilon) * nll.mean() + epsilon * uniform.mean()


def trainer_loss(model, batch: dict, tmp_path, epsilon: float = 0.1):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), label_smoothing_factor=epsilon, use_cpu=True, report_to="none")
    return Trainer(model=model, args=args).compute_loss(model, dict(batch))


def test_trainer_label_smoothing_shifts_the_labels_as_for_gpt2(tmp_path):
    """Trainer shifts the labels for label smoothing only for class names in transformers' causal-LM table; MiniGPT
    was once smoothed against its unshifted labels (4.219 where GPT-2 gave 4.607): a copy task."""
    gpt2, mini = gpt2_and_minigpt()
    ids = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100  # a masked prompt, as a supervised fine-tune has
    batch = {"input_ids": ids, "labels": labels}
    losses, grads = {}, {}
    for name, model in (("gpt2", gpt2), ("minigpt", mini)):
        model.train()
        model.zero_grad()
        loss = trainer_loss(model, batch, tmp_path)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = model.get_input_embeddings().weight.grad
    with torch.no_grad():
        expected = smoothed_causal_loss(mini(ids).logits, labels, 0.1).item()
    assert losses["minigpt"] == pytest.approx(losses["gpt2"], rel=1e-5)
    assert losses["minigpt"] == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(grads["minigpt"], grads["gpt2"], atol=1e-5, rtol=1e-4)


def test_every_head_is_in_transformers_name_tables():
    """What Trainer, pipelines and the model card look up by class name (see modeling_minigpt.py)."""
    from transformers.models.auto import modeling_auto

    assert modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["minigpt"] == "MiniGPTForCausalLM"
    assert modeling_auto.MODEL_MAPPING_NAMES["minigpt"] == "MiniGPTModel"
    assert modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES["minigpt"] == "MiniGPTForSequenceClassification"
    # the lazy Auto mappings over these tables still list only what they did (no transformers.models.minigpt to import)
    assert "MiniGPTForCausalLM" in [c.__name__ for c in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING.values()]


# ------------------------------------------------------------------------------ PEFT prefix tuning, generate
def test_prefix_tuning_generate_uses_the_prefix(tmp_path):
    """peft passes its prefix as `past_key_values=` while transformers >= 5.24's generate passes its own empty
    `cache=`: MiniGPT raised "both cache names", GPT-2 silently drops the prefix. Each step's logits must be those
    of PeftModel.forward over the same tokens at the positions generate gives them (0, 1, ...), prefix included."""
    from peft import PrefixTuningConfig

    _, mini = gpt2_and_minigpt()
    torch.manual_seed(2)
    peft_model = get_peft_model(mini, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.copy_(3 * torch.randn_like(p))  # a prefix that changes the answers
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    sequences, step_logits = greedy(peft_model, ids, n=6)
    _, without_prefix = greedy(mini, ids, n=6)
    with torch.no_grad():
        T = sequences.shape[1] - 1
        full = peft_model(input_ids=sequences[:, :-1], attention_mask=torch.ones(2, T, dtype=torch.long),
                          position_ids=torch.arange(T).expand(2, T)).logits[:, ids.shape[1] - 1 :]  # fmt: skip
    torch.testing.assert_close(step_logits, full, atol=1e-4, rtol=1e-4)
    assert (step_logits - without_prefix).abs().max() > 1.0  # the prefix is used
