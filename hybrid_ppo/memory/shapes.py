"""What the planner needs to know about a model, read from its `config.json` alone.

`model_shape(path, kind)` builds the model on the meta device (no weights are read, no memory is
allocated), so parameter counts are exact: tied embeddings count once, a value head or a
classifier head is included. The builtin tiny Llama is described by the code that builds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path

from hybrid_ppo.config import BUILTIN_PREFIX
from hybrid_ppo.errors import InputError

REPO = Path(__file__).resolve().parents[2]


class ModelKind(str, Enum):
    CAUSAL_LM = "causal_lm"  # actor, reference, rollout engine
    VALUE = "value"  # critic: backbone + a scalar head (roles/models.py::ValueModel)
    CLASSIFIER = "classifier"  # reward model: sequence classifier with num_labels = 1


@dataclass(frozen=True)
class ModelShape:
    params: int  # distinct parameter elements
    buffer_elems: int  # non-parameter tensors (rotary tables), moved with a frozen module
    largest_block: int  # parameters of the biggest unit ZeRO-3 gathers at once (a layer, or the embedding)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    logit_transforms: tuple[str, ...] = ()  # `attr=value` the head applies after its matmul (ops.logit_transforms)

    @property
    def fused_head(self) -> bool:
        """Whether the roles take the fused LM-head path (roles/lm_head.py: lm_head_path) for this model."""
        return not self.logit_transforms


def resolve_model_dir(spec: str) -> Path:
    """A model directory as given, or relative to the repository (the presets' configs/models/...)."""
    for candidate in (Path(spec), REPO / spec):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"model {spec!r}: no config.json there (nor under {REPO}); the planner needs "
                            f"only that file, e.g. configs/models/llama-3.1-8b")


def model_config(spec: str):
    """The transformers config of a model spec: a directory, or a builtin model."""
    if spec.startswith(BUILTIN_PREFIX):
        from hybrid_ppo.tasks.tiny_model import tiny_llama_config
        from hybrid_ppo.tasks.tokenizer import build_tokenizer

        if spec != f"{BUILTIN_PREFIX}tiny-llama":
            raise InputError(f"unknown builtin model {spec!r}; known: {BUILTIN_PREFIX}tiny-llama")
        return tiny_llama_config(build_tokenizer())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_dir(spec))


@lru_cache(maxsize=16)
def model_shape(spec: str, kind: ModelKind) -> ModelShape:
    """Exact parameter counts and the dimensions the activation and KV formulas use."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from hybrid_ppo.ops import logit_transforms

    config = model_config(spec)
    with torch.device("meta"):
        if kind == ModelKind.CAUSAL_LM:
            model = AutoModelForCausalLM.from_config(config)
        elif kind == ModelKind.VALUE:
            model = AutoModel.from_config(config)
        else:
            config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    if kind == ModelKind.VALUE:
        params += config.hidden_size + 1  # the value head: Linear(hidden, 1) with bias
    layer_params = max((sum(p.numel() for p in m.parameters()) for m in model.modules()
                        if type(m).__name__.endswith("DecoderLayer")), default=0)
    largest_param = max(p.numel() for p in model.parameters())
    heads = config.num_attention_heads
    return ModelShape(
        params=params,
        buffer_elems=sum(b.numel() for b in model.buffers()),
        largest_block=max(layer_params, largest_param),
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        logit_transforms=tuple(logit_transforms(config)),
    )
