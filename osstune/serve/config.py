"""Engine options: one frozen dataclass with serving defaults.

Names follow the options users know from other servers (`--max-num-seqs`,
`--max-num-batched-tokens`, `--gpu-memory-utilization`, `--kv-cache-gb`, `--block-size`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def _option(default, help: str):
    """A field whose `help` is also its command-line help (osstune.serve.flags)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = _option(16, "tokens per KV block")
    max_num_seqs: int = _option(256, "requests in one step at most")
    max_num_batched_tokens: int = _option(
        2048, "token budget of one step: decodes take one each, prefills fill the rest in chunks"
    )
    max_model_len: int | None = _option(None, "prompt + output of one request (default: the model's context)")
    # The KV cache's size: `kv_cache_gb` when given, else this share of the GPU's memory left after
    # the weights and a profiled step; on a CPU, 1 GiB unless `kv_cache_gb` says otherwise.
    gpu_memory_utilization: float = _option(
        0.90, "share of the GPU's memory the weights and the KV cache may take, unless --kv-cache-gb is given"
    )
    kv_cache_gb: float | None = _option(None, "KV cache size in GiB (default: from --gpu-memory-utilization; 1 on a CPU)")
    num_kv_blocks: int | None = _option(None, "exact KV block count (tests); overrides --kv-cache-gb and --gpu-memory-utilization")
    enable_prefix_caching: bool = _option(True, "share the KV blocks of identical prompt prefixes")
    cuda_graph_max_batch: int = _option(512, "CUDA graphs for decode-only steps of up to this many sequences (0: off)")
    kernels: str = _option(
        "auto",
        "auto: our Triton kernels on CUDA, plain PyTorch elsewhere; reference: plain PyTorch everywhere; "
        "kernels: the kernel path wherever Triton runs (on a CPU under TRITON_INTERPRET=1: tests)",
    )

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"EngineConfig.{name}={getattr(self, name)!r}: must be {expected}")

        if self.block_size not in (4, 8, 16, 32, 64, 128):
            raise bad("block_size", "one of 4, 8, 16, 32, 64, 128")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise bad("max_model_len", ">= 2")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "in (0, 1]")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise bad("kv_cache_gb", "> 0")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise bad("num_kv_blocks", ">= 2 (block 0 is reserved)")
        if self.cuda_graph_max_batch < 0:
            raise bad("cuda_graph_max_batch", ">= 0")
        if self.kernels not in ("auto", "reference", "kernels"):
            raise bad("kernels", "'auto', 'reference' or 'kernels'")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
