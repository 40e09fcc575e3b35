"""Pretraining's optimizers (minigpt/train/optim.py): which parameters Muon trains, and both update rules against
torch's own optimizers: MuonAdamW's Muon against torch.optim.Muon (bit for bit with the iteration in bfloat16, as
torch runs it; to tolerance in float32, as it runs on CPU), its AdamW against torch.optim.AdamW."""

import copy
from types import SimpleNamespace

import pytest
import torch

from minigpt.train.optim import (
    MuonAdamW,
    apply_arguments,
    configure_optimizer,
    orthogonalize,
    set_rates,
    split_parameters,
)
from modeling_minigpt import MiniGPTConfig, MiniGPTForCausalLM

pytestmark = pytest.mark.oldest

RECIPE = dict(optimizer="muon", learning_rate=2e-3, muon_learning_rate=0.02, muon_momentum=0.95, weight_decay=0.1,
              adam_beta1=0.9, adam_beta2=0.95)  # fmt: skip


def model_of(**config) -> MiniGPTForCausalLM:
    torch.manual_seed(0)
    return MiniGPTForCausalLM(MiniGPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=64, **config))


@pytest.mark.parametrize("tied", [True, False])
def test_muon_trains_exactly_the_blocks_matrices_and_every_parameter_is_in_one_group(tied):
    model = model_of(tie_word_embeddings=tied)
    split = split_parameters(model)
    names = [n for group in split.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(names) == len(set(names))
    matrices = {f"model.layers.{i}.{m}.weight" for i in range(2)
                for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")}  # fmt: skip
    assert set(split["muon"]) == matrices
    assert set(split["adamw_decay"]) == {"model.embed_tokens.weight", "model.embed_positions.weight"} | (
        set() if tied else {"lm_head.weight"}
    )
    assert all(model.get_parameter(n).dim() == 1 for n in split["adamw"])

    optimizer = configure_optimizer(model, SimpleNamespace(**RECIPE), torch.device("cpu"))
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(held) == len({id(p) for p in held}) == len(list(model.parameters()))  # the tied weight once
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    muon = [g for g in optimizer.param_groups if g["use_muon"]]
    assert len(muon) == 1 and {id(p) for p in muon[0]["params"]} == {id(model.get_parameter(n)) for n in matrices}
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_the_adamw_recipe_keeps_its_groups_and_every_step_sets_both_rates():
    model = model_of()
    adamw = configure_optimizer(model, SimpleNamespace(**{**RECIPE, "optimizer": "adamw"}), torch.device("cpu"))
    assert isinstance(adamw, torch.optim.AdamW)
    decayed = [p for p in model.parameters() if p.dim() >= 2]  # the order checkpoints saved before Muon hold
    assert [id(p) for p in adamw.param_groups[0]["params"]] == [id(p) for p in decayed]
    muon = configure_optimizer(model, SimpleNamespace(**RECIPE), torch.device("cpu"))
    rates = set_rates(muon, 1e-3, SimpleNamespace(**RECIPE))  # half the AdamW peak: Muon's at half its own
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(0.01), 1e-3, 1e-3]
    assert rates == {"lr": 1e-3, "muon_lr": pytest.approx(0.01)}


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_a_loaded_state_continues_exactly_and_takes_this_runs_hyperparameters(optimizer):
    """load_state_dict brings back the saved groups: the state continues bit for bit, and apply_arguments puts the
    resumed run's hyperparameters back (a resume's --muon_momentum or --weight_decay must take effect)."""
    args = SimpleNamespace(**{**RECIPE, "optimizer": optimizer})
    model = model_of()
    opt = configure_optimizer(model, args, torch.device("cpu"))
    params = list(model.parameters())
    for step in range(2):
        grads_for(params, step), opt.step()
    saved, weights = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]  # as a file holds it
    grads_for(params, 2), opt.step()
    after = [p.detach().clone() for p in params]

    for p, w in zip(params, weights):
        p.data.copy_(w)
    again = configure_optimizer(model, args, torch.device("cpu"))
    again.load_state_dict(saved)
    grads_for(params, 2), again.step()
    assert all(torch.equal(p, a) for p, a in zip(params, after))

    changed = SimpleNamespace(**{**vars(args), "muon_momentum": 0.5, "weight_decay": 0.0, "adam_beta1": 0.8})
    again.load_state_dict(saved)
    apply_arguments(again, changed)
    for group in again.param_groups:
        assert group["weight_decay"] == 0.0
        assert group["momentum"] == 0.5 if group.get("use_muon") else group["betas"] == (0.8, 0.95)
    assert again.state_dict()["state"].keys() == saved["state"].keys()  # the state itself as loaded


def grads_for(params, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_in_bfloat16_is_torch_optim_muon_bit_for_bit(nesterov):
    torch.manual_seed(0)
    shapes = [(96, 32), (32, 32), (32, 128)]  # tall, square and wide, as qkv_proj, o_proj and down_proj
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hyper = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov)
    mine = MuonAdamW([{"params": ours, "use_muon": True, "ns_steps": 5, **hyper}], ns_dtype=torch.bfloat16)
    reference = torch.optim.Muon(theirs, adjust_lr_fn="original", **hyper)
    for step in range(4):
        grads_for(ours, step), grads_for(theirs, step)
        mine.step(), reference.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), step
    assert all(torch.equal(mine.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"])
               for a, b in zip(ours, theirs))  # fmt: skip


def test_float32_orthogonalisation_matches_torchs_bfloat16_to_its_precision():
    """On CPU the iteration runs in float32: the same map, without bfloat16's rounding (8 bits of mantissa)."""
    torch.manual_seed(0)
    for shape in [(96, 32), (32, 32), (32, 128), (512, 128)]:
        update = torch.randn(shape)
        fp32, bf16 = orthogonalize(update, dtype=torch.float32), orthogonalize(update, dtype=torch.bfloat16)
        assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16 and fp32.shape == shape
        assert (fp32 - bf16.float()).norm() / fp32.norm() < 0.03, shape
        # an orthogonalisation: the singular values, all ~1 (the quintic leaves them in about [0.7, 1.2])
        s = torch.linalg.svdvals(fp32.double())
        assert 0.6 < s.min() and s.max() < 1.25, (shape, s.min(), s.max())
    # and it is what a step applies: one float32 step equals torch.optim.Muon's to bfloat16's precision
    p32, p_torch = torch.nn.Parameter(torch.zeros(96, 32)), torch.nn.Parameter(torch.zeros(96, 32))
    grads_for([p32], 0), grads_for([p_torch], 0)
    MuonAdamW([{"params": [p32], "use_muon": True, "lr": 0.02, "weight_decay": 0.0, "momentum": 0.95,
                "nesterov": True, "ns_steps": 5}]).step()  # fmt: skip
    torch.optim.Muon([p_torch], lr=0.02, weight_decay=0.0).step()
    assert (p32 - p_torch).norm() / p_torch.norm() < 0.03


def test_adamw_groups_are_torch_optim_adamw():
    model_a, model_b = model_of(), model_of()
    embeddings = lambda m: [m.model.embed_tokens.weight, m.model.embed_positions.weight]  # noqa: E731
    norms = lambda m: [p for p in m.parameters() if p.dim() == 1]  # noqa: E731
    hyper = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8)
    mine = MuonAdamW([{"params": embeddings(model_a), "use_muon": False, "weight_decay": 0.1, **hyper},
                      {"params": norms(model_a), "use_muon": False, "weight_decay": 0.0, **hyper}], fused=True)  # fmt: skip
    reference = torch.optim.AdamW([{"params": embeddings(model_b), "weight_decay": 0.1},
                                   {"params": norms(model_b), "weight_decay": 0.0}], fused=True, **hyper)  # fmt: skip
    for step in range(3):
        grads_for(embeddings(model_a) + norms(model_a), step), grads_for(embeddings(model_b) + norms(model_b), step)
        mine.step(), reference.step()
    for a, b in zip(embeddings(model_a) + norms(model_a), embeddings(model_b) + norms(model_b)):
        assert torch.equal(a, b)
        assert all(torch.equal(mine.state[a][k], reference.state[b][k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_a_flattened_parameter_is_refused_with_the_way_out():
    flat = torch.nn.Parameter(torch.zeros(64))
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [flat], "use_muon": True, "lr": 0.02, "weight_decay": 0.0, "momentum": 0.95,
                    "nesterov": True, "ns_steps": 5}])  # fmt: skip
