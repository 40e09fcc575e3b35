"""torch.compile(fullgraph=True) readiness: zero graph breaks in the training forward + loss, in the static-cache
decode step that generate() compiles on GPU, and in the fast decode loop's step; and no per-step mask in decode.

`torch._dynamo.explain` traces with Dynamo only (no Inductor code generation), so these run in seconds on a CPU
and say exactly which line breaks the graph when one does.
"""

import pytest
import torch
from conftest import tiny_config
from transformers import CompileConfig, StaticCache

from modeling_minigpt import MiniGPTForCausalLM
from modeling_minigpt.fast_decode import FastDecoder

pytestmark = pytest.mark.oldest  # the GPU machine runs the oldest declared transformers


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def build(**overrides) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    return MiniGPTForCausalLM(tiny_config(**overrides))


def assert_no_graph_breaks(fn, *args, **kwargs):
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = "\n".join(str(r) for r in explanation.break_reasons)
    assert explanation.graph_break_count == 0, f"{explanation.graph_break_count} graph breaks:\n{reasons}"
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    "pos, skip_logits", [("learned", False), ("learned", True), ("rope", True), ("sinusoidal", False)]
)
def test_training_forward_and_loss_has_no_graph_breaks(pos, skip_logits):
    model = build(position_embedding_type=pos).train()
    ids = torch.randint(3, 100, (2, 16))

    def loss(ids):
        return model(input_ids=ids, labels=ids, skip_logits=skip_logits).loss

    assert_no_graph_breaks(loss, ids)


def test_training_with_num_items_in_batch_has_no_graph_breaks():
    # what Trainer and minigpt/train/pretrain.py pass under gradient accumulation
    model = build().train()
    ids = torch.randint(3, 100, (2, 16))
    n = torch.tensor(40)

    def loss(ids):
        return model(input_ids=ids, labels=ids, skip_logits=True, num_items_in_batch=n).loss

    assert_no_graph_breaks(loss, ids)


def test_compiled_training_step_gives_the_eager_loss_and_gradients():
    """The fused loss is an autograd.Function: AOTAutograd must turn its forward and backward into one graph.
    The aot_eager backend runs that joint graph without Inductor's code generation, so this stays quick."""
    ids = torch.randint(3, 100, (2, 16))
    results = []
    for compiled in (False, True):
        model = build().train()
        forward = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
        out = forward(input_ids=ids, labels=ids, skip_logits=True)
        out.loss.backward()
        grads = (model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad)
        results.append((out.loss.detach(), *grads))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_static_cache_decode_step_has_no_graph_breaks(pos):
    """The step generate(cache_implementation="static") compiles on GPU: one new token against a prefilled
    StaticCache, with the 2-D attention mask and position ids that generate() passes."""
    model = build(position_embedding_type=pos).eval()
    prompt = torch.randint(3, 100, (2, 8))
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        model(input_ids=prompt, cache=cache, use_cache=True)
        token = torch.randint(3, 100, (2, 1))
        mask = torch.ones(2, 9, dtype=torch.long)
        positions = torch.full((2, 1), 8)

        def decode_step(token, mask, positions):
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1)
            return out.logits

        assert_no_graph_breaks(decode_step, token, mask, positions)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_the_forward_generate_compiles_never_recompiles_across_decode_steps(pos):
    """transformers' common test_generate_compile_model_forward_fullgraph: generate(cache_implementation="static")
    compiles the decode step (on CUDA by itself; on CPU when asked to, as here) with fullgraph=True. Any guard that
    changes from one step to the next (a cached tensor's type, a Python attribute the forward mutates) recompiles
    it. A warm-up compiles the first decode step; from then on the stance makes any recompile an error."""
    model = build(position_embedding_type=pos).eval()
    compile_config = CompileConfig(backend="eager", fullgraph=True)  # Dynamo's guards without Inductor's codegen
    compile_config._compile_all_devices = True  # the switch transformers' own generation tests use on CPU
    kwargs = dict(do_sample=False, max_new_tokens=8, cache_implementation="static", compile_config=compile_config)
    prompt = torch.randint(3, 100, (2, 6))
    eager = model.generate(prompt, do_sample=False, max_new_tokens=8, cache_implementation="static")
    model.generate(prompt, **{**kwargs, "max_new_tokens": 2})  # warm-up: the prefill and one compiled decode step
    with torch.compiler.set_stance("fail_on_recompile"):
        again = model.generate(prompt, **kwargs)
        other = torch.randint(3, 100, (2, 6))
        model.generate(other, **kwargs)  # another prompt of the same shape: the same graph
    assert torch.equal(again, eager)


def test_fast_decode_step_has_no_graph_breaks():
    model = build().eval()
    decoder = FastDecoder(model, batch_size=2, max_length=16)
    decoder.generate(torch.randint(3, 100, (2, 6)), max_new_tokens=2)  # prefill: the cache holds its tensors now
    assert_no_graph_breaks(decoder._step)


def test_decode_without_padding_builds_no_mask():
    """sdpa's is_causal path in the prefill and no mask at all for one-token steps: nothing is materialised per
    step unless a row is padded (then a (B, 1, 1, S) mask, the least that padding needs)."""
    model = build().eval()
    seen = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(None if kwargs["attention_mask"] is None else tuple(kwargs["attention_mask"].shape)),
        with_kwargs=True,
    )
    ids = torch.randint(3, 100, (2, 6))
    model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert seen == [None, None, None]
    seen.clear()
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert seen[1:] == [(2, 1, 1, 7), (2, 1, 1, 8)]
