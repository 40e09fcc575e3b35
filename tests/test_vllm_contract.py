"""What vLLM's Transformers backend needs from a custom model, checked without vLLM (its docs, "Writing custom
models"): the base model comes from `auto_map.AutoModel` and declares `_supports_attention_backend`; attention goes
through `ALL_ATTENTION_FUNCTIONS`, with the forward's kwargs passed down to it; `base_model_tp_plan` names real
modules; and the fused QKV is a three-way `.split` of `qkv_proj`'s output, which vLLM finds by tracing the attention
with torch.fx and rewrites to per-rank widths when it shards the heads. The tests imitate each step on CPU.

This is a contract test, not vLLM support: nobody has run MiniGPT in vLLM yet.
"""

import ast
import inspect
import json
import re
import textwrap
import types

import pytest
import torch
from conftest import tiny_config
from torch import fx, nn
from transformers import AutoConfig, AutoModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from modeling_minigpt import MiniGPTForCausalLM, MiniGPTModel
from modeling_minigpt.modeling_minigpt import MiniGPTAttention, MiniGPTRotaryEmbedding

pytestmark = pytest.mark.oldest


def test_auto_map_automodel_builds_the_base_model_from_the_folder(tmp_path):
    """vLLM loads the config, builds `auto_map.AutoModel` on the meta device and checks is_backend_compatible()."""
    MiniGPTForCausalLM(tiny_config()).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_minigpt.MiniGPTModel"

    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config, trust_remote_code=True)
    assert type(model).__name__ == "MiniGPTModel"
    assert type(model).is_backend_compatible()  # _supports_attention_backend = True
    assert all(layer.self_attn.is_causal for layer in model.layers)  # decoder attention, not encoder-only


def test_attention_goes_through_the_registry_and_gets_the_forward_kwargs():
    """vLLM sets `_attn_implementation = "vllm"`, registers its function and calls the base model with batch 1,
    `use_cache=False`, `return_dict=False` and `attention_instances=...`, which must reach the function untouched."""
    calls = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append((module.layer_idx, kwargs.get("attention_instances"), attention_mask, query.shape))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    name = "minigpt_vllm_contract"
    AttentionInterface.register(name, recording_attention)
    try:
        torch.manual_seed(0)
        model = MiniGPTModel(tiny_config(position_embedding_type="rope")).eval()
        ids, positions = torch.randint(3, 100, (1, 7)), torch.arange(7)[None]
        with torch.no_grad():
            expected = model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
            model.config._attn_implementation = name
            instances = {0: "attn 0", 1: "attn 1"}  # stands for vLLM's Attention objects, one per layer
            outputs = model(
                input_ids=ids, position_ids=positions, use_cache=False, return_dict=False, attention_instances=instances
            )
    finally:
        del ALL_ATTENTION_FUNCTIONS._global_mapping[name]

    assert [(idx, inst) for idx, inst, _, _ in calls] == [(0, instances), (1, instances)]
    # no mask for a backend transformers has no mask function for: the backend itself owns causality
    assert all(mask is None and shape == (1, 4, 7, 8) for _, _, mask, shape in calls)
    torch.testing.assert_close(outputs[0], expected)


def test_tp_plan_names_real_linear_modules_and_leaves_out_the_fused_qkv():
    """vLLM reads `model.tp_plan` of the base model. Each pattern matches a module in every layer; every Linear is
    either planned or the fused qkv_proj, which vLLM shards by heads itself (a "colwise" cut of [q | k | v] would
    split across q, k and v, not across heads)."""
    model = MiniGPTModel(tiny_config())
    modules = dict(model.named_modules())
    linears = {name for name, module in modules.items() if isinstance(module, nn.Linear)}
    planned = set()
    for pattern, style in model.tp_plan.items():
        if pattern == "embed_tokens":  # added by transformers itself; vLLM swaps in its VocabParallelEmbedding
            assert modules[pattern] is model.get_input_embeddings()
            continue
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+"))
        matched = {name for name in modules if regex.fullmatch(name)}
        assert style in ("colwise", "rowwise"), (pattern, style)  # the two styles vLLM documents
        assert len(matched) == model.config.n_layer and matched <= linears, (pattern, matched)
        planned |= matched
    assert linears - planned == {f"layers.{i}.self_attn.qkv_proj" for i in range(model.config.n_layer)}


# ----------------------------------------------------------------------------------------- the fused QKV, as vLLM sees it


class _LeafTracer(fx.Tracer):
    """Like vLLM's tracer: every child module is one node, the `B, T, C = hidden_states.shape` unpack traces (vLLM
    feeds 3-D hidden states), and whatever cannot trace (the optional rotary and cache branches) ends the trace,
    which leaves a partial graph to match."""

    def is_leaf_module(self, m, qualname):
        return True

    def iter(self, obj):
        node = obj.node
        if node.op == "call_function" and node.args[1:] == ("shape",) and node.args[0].target == "hidden_states":
            return iter([obj[i] for i in range(3)])
        return super().iter(obj)


def _partial_graph(module: nn.Module) -> fx.Graph:
    tracer = _LeafTracer()
    try:
        return tracer.trace(module)
    except Exception:  # noqa: BLE001  (as vLLM does: the graph up to the first untraceable line is enough)
        return tracer.graph


def _three_way_splits(funcdef: ast.FunctionDef) -> list[ast.Call]:
    """Calls written `self.qkv_proj(...)....split((a, b, c), ...)`: the one vLLM rewrites."""
    return [
        node
        for node in ast.walk(funcdef)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "split"
        and node.args
        and isinstance(node.args[0], (ast.Tuple, ast.List))
        and len(node.args[0].elts) == 3
        and any(isinstance(n, ast.Attribute) and n.attr == "qkv_proj" for n in ast.walk(node.func.value))
    ]


def test_the_fused_qkv_is_a_three_way_split_of_qkv_proj_in_the_traced_graph():
    attention = MiniGPTModel(tiny_config()).layers[0].self_attn
    C = attention.config.n_embd
    splits = [n for n in _partial_graph(attention).nodes if n.op == "call_method" and n.target == "split"]
    assert len(splits) == 1, splits
    (split,) = splits
    assert split.args[0].op == "call_module" and split.args[0].target == "qkv_proj"  # straight from the Linear
    assert split.args[1] == (C, C, C)  # (q, k, v) as plain ints: q >= kv and k == v, summing to out_features
    assert split.kwargs.get("dim", -1) == -1 and attention.qkv_proj.out_features == sum(split.args[1])
    funcdef = ast.parse(textwrap.dedent(inspect.getsource(MiniGPTAttention.forward))).body[0]
    assert len(_three_way_splits(funcdef)) == 1  # exactly one source call to rewrite


def _forward_with_split_sizes_divided_by(tp: int):
    """MiniGPTAttention.forward with the split sizes rewritten to one rank's widths, as vLLM rewrites the source."""
    fn = MiniGPTAttention.forward
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    (split,) = _three_way_splits(tree.body[0])
    split.args[0] = ast.parse(f"[s // {tp} for s in (self.q_size, self.kv_size, self.kv_size)]", mode="eval").body
    namespace = {}
    code = compile(ast.fix_missing_locations(tree), inspect.getsourcefile(fn), "exec")
    exec(code, fn.__globals__, namespace)  # noqa: S102  (our own source, rewritten as vLLM rewrites it)
    return namespace["forward"]


def _rank_shard(attention: MiniGPTAttention, rank: int, tp: int) -> MiniGPTAttention:
    """What QKVParallelLinear and RowParallelLinear hold on one rank: the rows of this rank's heads in each of q, k
    and v, and the matching input columns of o_proj (its bias added once, after the all-reduce: here on rank 0)."""
    C = attention.config.n_embd
    width = C // tp
    rows = torch.cat([torch.arange(part * C + rank * width, part * C + (rank + 1) * width) for part in range(3)])
    shard = MiniGPTAttention(attention.config, attention.layer_idx).eval()
    with torch.no_grad():
        shard.qkv_proj = nn.Linear(C, 3 * width)
        shard.qkv_proj.weight.copy_(attention.qkv_proj.weight[rows])
        shard.qkv_proj.bias.copy_(attention.qkv_proj.bias[rows])
        shard.o_proj = nn.Linear(width, C)
        shard.o_proj.weight.copy_(attention.o_proj.weight[:, rank * width : (rank + 1) * width])
        shard.o_proj.bias.copy_(attention.o_proj.bias if rank == 0 else torch.zeros(C))
    shard.forward = types.MethodType(_forward_with_split_sizes_divided_by(tp), shard)
    return shard


@pytest.mark.parametrize("position_embedding_type", ["learned", "rope"])
@pytest.mark.parametrize("tp", [2, 4])
def test_head_sharded_ranks_sum_to_the_whole_attention(tp, position_embedding_type):
    """Tensor parallelism as vLLM would run it, simulated in one process: each rank computes its heads with the
    rewritten split, and the sum of the rowwise o_proj outputs (the all-reduce) equals the unsharded attention."""
    torch.manual_seed(0)
    config = tiny_config(position_embedding_type=position_embedding_type)
    attention = MiniGPTModel(config).layers[0].self_attn.eval()
    hidden = torch.randn(1, 9, config.n_embd)
    rotary = None
    if position_embedding_type == "rope":
        rotary = MiniGPTRotaryEmbedding(config)(hidden, torch.arange(9)[None])
    with torch.no_grad():
        expected, _ = attention(hidden, position_embeddings=rotary)
        ranks = [_rank_shard(attention, rank, tp)(hidden, position_embeddings=rotary)[0] for rank in range(tp)]
    assert all(out.shape == expected.shape for out in ranks)
    torch.testing.assert_close(sum(ranks), expected, rtol=1e-5, atol=1e-6)


def test_tied_weights_are_sharded_together():
    """transformers' common test of that name: a tensor-parallel plan shards a tied pair both or neither, the same
    way, or each rank would hold a different slice of one matrix. MiniGPT's head is tied to the token embeddings, and
    both are sharded on the vocabulary (dim 0 of each weight)."""
    model = MiniGPTForCausalLM(tiny_config())
    plan = model.tp_plan

    def style_of(module: str) -> str | None:
        return next((s for p, s in plan.items() if re.fullmatch(re.escape(p).replace(r"\*", r"\d+"), module)), None)

    assert model._tied_weights_keys
    for tied, source in model._tied_weights_keys.items():
        styles = style_of(tied.rsplit(".", 1)[0]), style_of(source.rsplit(".", 1)[0])
        assert (styles[0] is None) == (styles[1] is None), (tied, source, styles)
    assert style_of("lm_head") == "colwise_gather_output"  # vocabulary-sharded, each rank's logits gathered
    assert style_of("model.embed_tokens") == "embedding_rowwise"  # vocabulary-sharded
