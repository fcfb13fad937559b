"""The sizes and FLOPs of an MoE model that the planner and the simulator cost: MoEShapes, built from
a checkpoint's ModelSpec (`MoEShapes.from_spec`) or one of the papers' models, kept as keyword
presets. A leaf module (numpy-free, no torch), so plan, sim and the benchmarks share one description
without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shunter.errors import ShunterError

if TYPE_CHECKING:  # shunter.model imports torch; MoEShapes.from_spec only reads a spec's fields
    from shunter.model.spec import ModelSpec


@dataclass(frozen=True, kw_only=True)
class MoEShapes:
    """The sizes that set an MoE model's costs (element counts; bytes per element separately).

    Attention is grouped-query: num_heads query heads and num_kv_heads key/value heads of head_dim.
    Experts are SwiGLU (gated: 3 matrices hidden x intermediate) or a plain two-matrix MLP.
    Keyword-only, like the presets below; `from_spec` reads them from a model's config.json.
    """

    name: str
    hidden_size: int
    expert_intermediate_size: int
    num_experts: int
    top_k: int
    num_layers: int  # MoE layers
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_experts: bool = True
    expert_bias: bool = False  # biases on each expert's projections (gpt-oss): 2I + H more elements
    bytes_per_param: int = 2
    bytes_per_activation: int = 2

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        bytes_per_param: int | None = None,
        bytes_per_activation: int | None = None,
        name: str | None = None,
    ) -> MoEShapes:
        """The simulator's shapes of a model read from its config.json (`shunter.model.spec`).

        Bytes per parameter and per activation default to the checkpoint dtype's. num_layers counts
        the MoE layers only: the simulator has no dense layers, norms, embeddings or LM head, and
        no attention biases or sliding window. ShunterError for what the shapes cannot hold:
        multi-head latent attention (DeepSeek), linear attention (Qwen3-Next) and shared experts
        (Qwen2-MoE).
        """
        if spec.attention != "gqa":
            raise ShunterError(
                f"{spec.name}: {spec.attention} attention has no MoEShapes (the simulator models "
                "grouped-query attention only)"
            )
        if spec.linear_attention_layers and any(spec.linear_attention_layers):
            raise ShunterError(
                f"{spec.name}: linear attention layers (Gated DeltaNet) have no MoEShapes (the simulator "
                "models grouped-query attention only)"
            )
        if spec.shared_intermediate_size:
            raise ShunterError(
                f"{spec.name}: shared experts (intermediate size {spec.shared_intermediate_size}) have "
                "no MoEShapes (the simulator models routed experts only)"
            )
        element = spec.dtype_bytes
        return cls(
            name=spec.name if name is None else name,
            hidden_size=spec.hidden_size,
            expert_intermediate_size=spec.expert_intermediate_size,
            num_experts=spec.num_experts,
            top_k=spec.top_k,
            num_layers=spec.num_moe_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            gated_experts=True,  # every family shunter.model reads has SwiGLU experts
            expert_bias=spec.expert_bias,
            bytes_per_param=element if bytes_per_param is None else bytes_per_param,
            bytes_per_activation=element if bytes_per_activation is None else bytes_per_activation,
        )

    @property
    def expert_params(self) -> int:
        H, eI = self.hidden_size, self.expert_intermediate_size
        return (3 if self.gated_experts else 2) * H * eI + (
            (1 + self.gated_experts) * eI + H
        ) * self.expert_bias

    @property
    def expert_bytes(self) -> int:
        return self.expert_params * self.bytes_per_param

    @property
    def expert_flops_per_token(self) -> float:
        return 2.0 * self.expert_params

    @property
    def attention_params(self) -> int:
        """q and o: hidden x (heads * head_dim); k and v: hidden x (kv_heads * head_dim)."""
        return 2 * self.hidden_size * self.head_dim * (self.num_heads + self.num_kv_heads)

    @property
    def attention_bytes(self) -> int:
        return self.attention_params * self.bytes_per_param

    def attention_flops_per_token(self, context_tokens: float) -> float:
        """Projections, plus q.k and attention-weighted v over `context_tokens` earlier positions."""
        return 2.0 * self.attention_params + 4.0 * self.num_heads * self.head_dim * context_tokens

    @property
    def gate_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def gate_bytes(self) -> int:
        return self.gate_params * self.bytes_per_param

    @property
    def gate_flops_per_token(self) -> float:
        return 2.0 * self.gate_params

    @property
    def aggregation_flops_per_token(self) -> float:
        """Weighted sum of the k expert outputs."""
        return 2.0 * self.top_k * self.hidden_size

    @property
    def token_bytes(self) -> int:
        """One token's hidden state on the wire."""
        return self.hidden_size * self.bytes_per_activation

    @property
    def kv_bytes_per_token(self) -> int:
        """Keys and values of one token at one layer (ModelSpec.kv_bytes_per_token for the same model)."""
        return 2 * self.num_kv_heads * self.head_dim * self.bytes_per_activation

    @property
    def weight_bytes(self) -> int:
        """Every MoE layer's attention, gate and experts: all the weights the simulator knows of
        (what an offloaded step streams). Not the whole checkpoint: shunter.offload.model_bytes
        sums a checkpoint's tensors, embeddings, norms and dense layers included."""
        per_layer = self.attention_bytes + self.gate_bytes + self.num_experts * self.expert_bytes
        return self.num_layers * per_layer


# The papers' models. Mixtral-8x7B-v0.1's config.json gives the same (tests/sim/test_cost.py).
MIXTRAL_8X7B = MoEShapes(
    name="Mixtral-8x7B",
    hidden_size=4096,
    expert_intermediate_size=14336,
    num_experts=8,
    top_k=2,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
)
# LIMoE-B (Aurora's models): ViT-B width, plain MLP experts, top-1 routing, 4 MoE layers as Aurora uses.
LIMOE_B = MoEShapes(
    name="LIMoE-B",
    hidden_size=768,
    expert_intermediate_size=3072,
    num_experts=8,
    top_k=1,
    num_layers=4,
    num_heads=12,
    num_kv_heads=12,
    head_dim=64,
    gated_experts=False,
)
# Lina's models are GPT-2 / BERT-Large sized MoE transformers: width 1024, 4x MLP experts, top-2.
LINA_MOE = MoEShapes(
    name="GPT-2-medium MoE (Lina)",
    hidden_size=1024,
    expert_intermediate_size=4096,
    num_experts=16,
    top_k=2,
    num_layers=12,
    num_heads=16,
    num_kv_heads=16,
    head_dim=64,
    gated_experts=False,
)
