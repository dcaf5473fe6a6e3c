"""The memory planner against numbers worked out by hand, and `hybrid-ppo plan` on every preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybrid_ppo.cli import main
from hybrid_ppo.config import load_config
from hybrid_ppo.memory.plan import PHASE_PLAN
from hybrid_ppo.memory.estimate import GIB, PROCESS_HOST_BYTES, ZERO3_PREFETCH_BUCKET, ZERO_REDUCE_BUCKET, estimate, pinned_block_bytes
from hybrid_ppo.memory.shapes import ModelKind, model_shape

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# A small Llama whose sizes are easy to add up: hidden 64, 2 layers, 2 heads of 32, 1 KV head,
# MLP 128, vocabulary 1000, untied head.
SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
         "vocab_size": 1000, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# embedding 1000*64 = 64,000; per layer q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12,288, MLP 3 * 64*128 = 24,576,
# two norms 128 -> 36,992; final norm 64; lm_head 64,000.   64,000 + 2 * 36,992 + 64 + 64,000 = 202,048
PSI = 202_048
# tokens of a micro-batch: micro 4 x (P 32 + R 16) = 192. Per layer and token, elements kept for backward:
# attention 3h + q + 2kv = 192 + 64 + 64 = 320, MLP 2h + 4I = 128 + 512 = 640 -> 960.
TOKENS, PER_LAYER = 4 * 48, 960


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("small")
    (path / "config.json").write_text(json.dumps(SMALL))
    return str(path)


def _cfg(model: str, *overrides: str):
    return load_config(None, [f"model.actor={model}", "model.dtype=bf16", "placement.num_gpus=2",
                              "data.max_prompt_tokens=32", "rollout.max_new_tokens=16", "train.micro_batch_size=4",
                              "train.mini_batch_size=32", *overrides])


def test_meta_model_counts_parameters_exactly(small_model):
    assert model_shape(small_model, ModelKind.CAUSAL_LM).params == PSI
    assert model_shape(small_model, ModelKind.VALUE).params == PSI - 64_000 + 65  # no lm_head; a 64 + 1 value head
    assert model_shape(small_model, ModelKind.CAUSAL_LM).largest_block == 64_000  # the embedding beats a layer


def test_zero2_states_and_activations_by_hand(small_model):
    plan = estimate(_cfg(small_model, "train.zero_stage=2", "model.gradient_checkpointing=false"))
    actor = plan.states["actor"]
    assert actor["weights"] == {"lp_params": PSI * 2}  # bf16, replicated under ZeRO-2
    assert actor["train_state"] == {"hp_params": PSI // 2 * 4, "optim_states": PSI // 2 * 8}  # 1/2 each
    terms = plan.phases["train_actor"].roles["actor"]
    assert terms["activations"] == 2 * PER_LAYER * TOKENS * 2  # L x per-layer x tokens x 2 bytes = 737,280
    # The fused LM head over the 4 x 16 = 64 response rows: 3 fp32 per row (768), one [64, V] bf16 gradient
    # chunk (128,000), the fp32 grad_W accumulator + its bf16 cast 1000 x 64 x 6 (384,000), a chunk's fp32
    # grad_h 64 x 64 x 4 (16,384): 529,152. No [b, R, V] logits term.
    assert terms["fused_lm_head"] == 768 + 128_000 + 384_000 + 16_384 and "logits" not in terms
    assert terms["lp_grads"] == PSI // 2 * 2 and terms["reduce_bucket"] == PSI * 2  # the bucket is capped at the model
    assert "zero3_gather" not in terms
    expected = PSI * 2 + PSI // 2 * 12 + 737_280 + 529_152 + PSI + PSI * 2 + (512 << 20) + (256 << 20)
    assert sum(terms.values()) == expected


def test_lm_head_path_by_model(small_model, tmp_path, capsys):
    """A head with a logit soft-cap materializes its [b, R, V] logits (as roles/lm_head.py refuses it
    the fused op); any other takes the fused path under ZeRO-3 too, and `hybrid-ppo plan` says which."""
    capped = tmp_path / "capped"
    capped.mkdir()
    (capped / "config.json").write_text(json.dumps({**SMALL, "final_logit_softcapping": 30.0}))
    plan = estimate(_cfg(str(capped), "train.zero_stage=3"))
    assert plan.phases["train_actor"].roles["actor"]["logits"] == 4 * 16 * (1000 * 2 + 8)  # response rows only
    assert "fused_lm_head" not in plan.phases["train_actor"].roles["actor"]
    assert "materialized" in plan.lm_head["actor"] and "final_logit_softcapping=30.0" in plan.lm_head["actor"]
    fused = estimate(_cfg(small_model, "train.zero_stage=3"))
    assert fused.phases["score_actor"].roles["actor"]["fused_lm_head"] == 3 * 4 * 64  # forward: 3 fp32 per row
    assert fused.lm_head["actor"].startswith("fused") and fused.as_dict()["lm_head"] == fused.lm_head
    assert main(["plan", f"model.actor={capped}", "placement.num_gpus=2"]) == 0
    out = capsys.readouterr().out
    assert "LM head (actor): materialized [b, R, V]" in out and "final_logit_softcapping=30.0" in out
    assert main(["plan", f"model.actor={small_model}", "placement.num_gpus=2"]) == 0
    assert "LM head (actor): fused (no [b, R, V] logits)" in capsys.readouterr().out


def test_zero3_states_and_checkpointed_activations_by_hand(small_model):
    plan = estimate(_cfg(small_model, "train.zero_stage=3", "model.gradient_checkpointing=true"))
    actor = plan.states["actor"]
    assert actor["weights"] == {"lp_params": PSI // 2 * 2}  # partitioned: 1/2 of the bf16 weights
    assert actor["train_state"] == {"hp_params": PSI // 2 * 4, "optim_states": PSI // 2 * 8,
                                    "lp_grads": PSI // 2 * 2, "contiguous_grad_buffer": ZERO_REDUCE_BUCKET * 2}
    terms = plan.phases["train_actor"].roles["actor"]
    assert terms["activations"] == (2 * 64 + PER_LAYER) * TOKENS * 2  # layer inputs + one layer recomputed: 417,792
    assert terms["zero3_gather"] == (64_000 + ZERO3_PREFETCH_BUCKET) * 2
    # Scoring gathers too, without backward's activations.
    score = plan.phases["score_actor"].roles["actor"]
    assert score["activations"] == TOKENS * (2 * 64 + 3 * 128) * 2 and "train_state.hp_params" not in score


def test_generate_holds_only_the_engine_and_contexts(small_model):
    plan = estimate(_cfg(small_model, "rollout.engine=vllm", "rollout.gpu_memory_utilization=0.5",
                         "placement.gpu_memory_gib=10"))
    generate = plan.phases["generate"].roles
    for role in ("actor", "critic", "reference"):
        assert set(generate[role]) == {"cuda_context", "nccl"}
    engine = generate["rollout"]
    # weights + KV cache + decode activations = gpu_memory_utilization x the GPU
    assert engine["weights.weights"] + engine["kv_cache.kv_cache"] + engine["activations"] == int(0.5 * 10 * GIB)
    # The rest of the GPU holds 4 CUDA contexts (512 MiB) and 3 role communicators (256 MiB):
    # (10240 - 4 * 512 - 3 * 256) / 10240 = 0.725 -> 0.72 in steps of 0.01.
    assert plan.max_gpu_memory_utilization == 0.72


def test_host_memory_counts_a_pinned_copy_per_rank(small_model):
    plan = estimate(_cfg(small_model, "train.zero_stage=2"))
    # The reference keeps a full bf16 copy (parameters + two rotary tables of 16) on each of 2 ranks,
    # in one pinned block, which torch's host allocator rounds up to a power of two.
    assert plan.phases["generate"].host["reference"] == 2 * pinned_block_bytes((PSI + 32) * 2)
    assert pinned_block_bytes((PSI + 32) * 2) >= (PSI + 32) * 2
    assert plan.phases["score_reference"].host["reference"] == 0
    # pageable: a process per role rank, 4 roles (actor, critic, reference, rollout) x 2 ranks
    assert plan.phases["generate"].host_pageable == 8 * PROCESS_HOST_BYTES


def test_two_nodes_shard_over_every_gpu_and_count_host_memory_per_node(small_model):
    one, two = (estimate(_cfg(small_model, "train.zero_stage=2", f"placement.num_nodes={n}")) for n in (1, 2))
    # ZeRO-2 shards the optimizer over all 4 ranks on two nodes, over 2 on one: half the Adam moments per GPU.
    adam = lambda plan: plan.states["actor"]["train_state"]["optim_states"]  # noqa: E731
    assert adam(two) * 2 == pytest.approx(adam(one), abs=64)
    # Each node's host memory holds its own 2 ranks' copies, whatever the number of nodes.
    assert two.phases["generate"].host["reference"] == one.phases["generate"].host["reference"]
    assert two.phases["generate"].host_pageable == 8 * PROCESS_HOST_BYTES
    assert (two.as_dict()["ranks_per_role"], two.as_dict()["ranks_per_node"]) == (4, 2)


def test_verdict_and_the_largest_settings_that_fit(small_model):
    tight = estimate(_cfg(small_model, "placement.gpu_memory_gib=1"))
    assert not tight.fits and tight.verdict().startswith(f"does not fit: phase {tight.peak_phase} needs")
    roomy = estimate(_cfg(small_model))
    assert roomy.fits and roomy.verdict().startswith(f"fits: peak {roomy.peak_bytes / GIB:.1f} GiB of 79.6 GiB")
    assert roomy.max_micro_batch_size == 16  # the largest micro with 16 x 2 GPUs dividing mini 32


def test_phases_and_roles_come_from_the_plan_and_placement(small_model):
    plan = estimate(_cfg(small_model), roles=["actor", "reference", "rollout"])  # a critic-free run
    assert "critic" not in plan.states  # and no critic phases: the plan is the roles' (memory/plan.py)
    assert list(plan.phases) == [p.value for p in PHASE_PLAN if p.value not in ("score_critic", "train_critic",
                                                                                  "checkpoint_critic")]


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_plan_every_preset(preset, capsys):
    # A preset whose weights are fetched by a script (smollm2) is planned from the same
    # architecture's config-only directory, as on a fresh clone that has not fetched them.
    args = [str(CONFIGS / preset)]
    actor = load_config(CONFIGS / preset).model.actor
    if not actor.startswith("builtin:") and not (CONFIGS.parent / actor).exists():
        args.append("model.actor=configs/models/smollm2-135m-instruct")
    assert main(["plan", *args]) == 0
    out = capsys.readouterr().out
    assert "estimated memory per GPU by phase" in out and "fits: peak" in out
    assert main(["plan", *args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    from hybrid_ppo.launch import memory_plan

    assert result["fits"] and set(result["phases"]) == {p.value for p in memory_plan(load_config(CONFIGS / preset))}
    if "8gpu" in preset:  # the goal: 7B on 8 x 80 GB with the engine at >= 0.8 of each GPU
        assert result["max_gpu_memory_utilization"] >= 0.8
        assert load_config(CONFIGS / preset).rollout.gpu_memory_utilization >= 0.8


def test_plan_names_a_missing_model(capsys):
    assert main(["plan", "model.actor=/nonexistent/model"]) == 1  # errors.EXIT_ERROR: bad input, not config
    assert "/nonexistent/model" in capsys.readouterr().err


def test_capacity_keys_are_checked():
    from hybrid_ppo.config import ConfigError

    with pytest.raises(ConfigError, match="placement.gpu_memory_gib"):
        load_config(None, ["placement.gpu_memory_gib=0"])
    with pytest.raises(ConfigError, match="placement.host_memory_gib"):
        load_config(None, ["placement.host_memory_gib=-1"])


def test_gpu_peaks_compare_without_contexts(small_model):
    """The GPU-only comparison: measured per-phase peaks against the plan less the CUDA contexts
    and communicators, which the allocator never sees."""
    from hybrid_ppo.profile_run import _peak_comparison

    plan = estimate(_cfg(small_model))
    planned = sum(v for terms in plan.phases["train_actor"].roles.values() for k, v in terms.items()
                  if k not in ("cuda_context", "nccl")) / GIB
    peaks = _peak_comparison({"train_actor": 2 * planned, "startup": 1.0}, plan)  # startup is not a plan phase
    assert peaks == {"train_actor": {"measured": 2 * planned, "planned": planned, "error": pytest.approx(1.0)}}


def test_token_budget_sizes_activations_and_logits_and_the_largest_budget(small_model):
    budget = ["train.packing=true", "train.max_tokens_per_micro_batch=96", "model.gradient_checkpointing=false"]
    plan = estimate(_cfg(small_model, "train.zero_stage=2", *budget))
    terms = plan.phases["train_actor"].roles["actor"]
    assert terms["activations"] == 2 * PER_LAYER * 96 * 2  # L x per-layer x the budget's tokens x 2 bytes
    # The fused LM head over at most the budget's 96 positions as response rows: 3 fp32 per row, one
    # [96, V] bf16 gradient chunk, fp32 grad_W + its bf16 cast (1000 x 64 x 6), a chunk's fp32 grad_h.
    assert terms["fused_lm_head"] == 96 * 12 + 96 * 1000 * 2 + 1000 * 64 * 6 + 96 * 64 * 4 and "logits" not in terms
    assert plan.phases["score_actor"].roles["actor"]["activations"] == 96 * (2 * 64 + 3 * 128) * 2
    assert plan.max_micro_batch_size is None and plan.max_tokens_per_micro_batch == 16 * 48  # a rank's mini share, full length
    assert "largest train.max_tokens_per_micro_batch that fits: 768" in plan.table()
    # a GPU the size of the peak at a budget of 400: the bisection stops where one more token would not fit
    at_400 = estimate(_cfg(small_model, "train.zero_stage=2", "train.packing=true", "model.gradient_checkpointing=false",
                           "train.max_tokens_per_micro_batch=400"))
    gib = at_400.peak_bytes / GIB

    def fits(value: int) -> bool:
        return estimate(_cfg(small_model, "train.zero_stage=2", "train.packing=true", "model.gradient_checkpointing=false",
                             f"train.max_tokens_per_micro_batch={value}", f"placement.gpu_memory_gib={gib}")).fits

    largest = estimate(_cfg(small_model, "train.zero_stage=2", *budget, f"placement.gpu_memory_gib={gib}")).max_tokens_per_micro_batch
    assert largest is not None and largest >= 400 and fits(largest)
    assert largest == 768 or not fits(largest + 1)
