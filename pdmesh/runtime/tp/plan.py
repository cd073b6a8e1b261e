"""Which slice of every Llama-family weight a tensor-parallel rank holds (Megatron style).

Column-parallel (output features split, i.e. rows of the [out, in] weight): q/k/v and
gate/up. Row-parallel (input features split, columns of the weight): o_proj and
down_proj, whose partial outputs are summed by an all-reduce. Vocab-parallel: the
embedding and the LM head hold a ceil-divided range of vocab rows, zero-padded to the
same count on every rank so the logits all-gather has equal parts. Norms are replicated.

KV heads: with tp <= Hkv each rank holds Hkv/tp of them; with tp > Hkv each rank holds
one, replicated over tp/Hkv ranks (vLLM's rule), chosen so that it is the KV head of
every query head the rank holds.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import ModelConfig

_REPLICATED = ("layernorm.weight", "model.norm.weight", "q_norm.weight", "k_norm.weight")


@dataclass(frozen=True)
class Shard:
    """Rows or columns [start, end) of a weight along `dim` (0 rows, 1 columns); `rows`
    pads dim 0 to that many with zeros (vocab-parallel tensors), else None."""

    dim: int
    start: int
    end: int
    rows: int | None = None


@dataclass(frozen=True)
class TPPlan:
    """Rank `rank` of `size` for a model config; properties give its head/feature ranges."""

    cfg: ModelConfig
    size: int
    rank: int

    def __post_init__(self) -> None:
        check_tp(self.cfg, self.size)
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.size})")

    @property
    def heads(self) -> tuple[int, int]:
        """This rank's query heads [start, end)."""
        n = self.cfg.num_heads // self.size
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_heads(self) -> tuple[int, int]:
        """This rank's KV heads [start, end): one replicated head when size > Hkv."""
        hkv = self.cfg.num_kv_heads
        if self.size > hkv:
            k = self.rank // (self.size // hkv)
            return k, k + 1
        n = hkv // self.size
        return self.rank * n, (self.rank + 1) * n

    @property
    def kv_replicas(self) -> int:
        """How many ranks hold a copy of each KV head (1 unless size > Hkv)."""
        return max(1, self.size // self.cfg.num_kv_heads)

    @property
    def inter(self) -> tuple[int, int]:
        """This rank's MLP intermediate features [start, end)."""
        n = self.cfg.intermediate_size // self.size
        return self.rank * n, (self.rank + 1) * n

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.cfg.vocab_size // self.size)

    @property
    def vocab(self) -> tuple[int, int]:
        """This rank's vocab rows [start, end) (the last rank's range may be short or empty)."""
        n, v = self.vocab_per_rank, self.cfg.vocab_size
        return min(v, self.rank * n), min(v, (self.rank + 1) * n)

    def local_counts(self) -> tuple[int, int, int]:
        """(query heads, KV heads, intermediate features) held by this rank."""
        return (self.heads[1] - self.heads[0], self.kv_heads[1] - self.kv_heads[0],
                self.inter[1] - self.inter[0])

    def shard(self, name: str) -> Shard | None:
        """The slice of HF-named weight `name` this rank holds; None = replicated.
        Raises ValueError for a name outside the Llama family's."""
        dh = self.cfg.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return Shard(0, *self.vocab, rows=self.vocab_per_rank)
        if name.endswith(_REPLICATED):
            return None
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return Shard(0, self.heads[0] * dh, self.heads[1] * dh)
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            return Shard(0, self.kv_heads[0] * dh, self.kv_heads[1] * dh)
        if name.endswith("o_proj.weight"):
            return Shard(1, self.heads[0] * dh, self.heads[1] * dh)
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            return Shard(0, *self.inter)
        if name.endswith("down_proj.weight"):
            return Shard(1, *self.inter)
        raise ValueError(f"no tensor-parallel rule for weight {name!r}")


def check_tp(cfg: ModelConfig, size: int) -> None:
    """Raise ValueError, naming the numbers, when `size` cannot shard `cfg` evenly."""
    if size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {size}")
    h, hkv = cfg.num_heads, cfg.num_kv_heads
    if h % size:
        raise ValueError(f"tp {size} does not divide the {h} attention heads")
    if size <= hkv and hkv % size:
        raise ValueError(f"tp {size} does not divide the {hkv} KV heads")
    if size > hkv and size % hkv:
        raise ValueError(f"tp {size} exceeds the {hkv} KV heads but is not a multiple of them "
                         "(each KV head is replicated over tp / Hkv ranks)")
    if cfg.intermediate_size % size:
        raise ValueError(f"tp {size} does not divide intermediate_size {cfg.intermediate_size}")


__all__ = ["Shard", "TPPlan", "check_tp"]
