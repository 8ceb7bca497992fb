"""Will this recipe fit on the card? Peak GPU memory from the model's config alone, before any download.

Every figure is an estimate in GiB (2**30 bytes) built from the config (hidden size h, MLP width I, L
layers, attention / KV heads, head_dim d, vocabulary V) and the recipe (B = per_device_train_batch_size
completions per micro-batch, P = data.max_prompt_length, C = generation.max_completion_length,
S = P + C, G = num_generations, GA = gradient_accumulation_steps):

  base weights    16-bit: 2 bytes x parameters. 4-bit NF4 (bitsandbytes, double quantization): 4.127 bits
                  per parameter of the decoder's Linear layers (4 bits + 8-bit absmax per 64 weights +
                  fp32 per 256 absmax: QLoRA, Dettmers et al. 2023, section 3); embeddings and lm_head
                  stay 16-bit (Unsloth and transformers skip them).
  LoRA            r x (in + out) per targeted Linear per layer; fp32 weights (4) + fp32 grads (4) +
                  AdamW states: 8 bytes fp32, 2 bytes with bitsandbytes 8-bit AdamW.
  activations     with gradient checkpointing, the layer inputs B x S x h x 2 bytes per layer, plus one
                  layer recomputed at a time: B x S x (10h + 4I) x 2 bytes (Korthikanti et al. 2022,
                  "Reducing Activation Recomputation", adapted to SwiGLU and fused SDPA / flash attention,
                  which never materialise the S x S scores). Unsloth's checkpointing offloads the layer
                  inputs to host RAM (unsloth.ai/blog/grpo: "shaves 372GB"), so only about two stay on the
                  card. Without checkpointing every layer keeps its activations.
  loss logits     A plain GRPO loss would materialise 2 tensors of B x C x V in 16-bit ("78.3GB" for
                  Llama 8B at 20K tokens, unsloth.ai/blog/grpo, 2025-02-20), but TRL 1.15 always scores
                  through a fused, chunked LM head (trl/kernels/chunked_logprob.py): one 4096-token x
                  32768-vocabulary tile in 16-bit, plus the fp32 gradient of the N = B x C scored hidden
                  states. Unsloth's memory-efficient GRPO loss works on one row at a time in fp32:
                  C x V x 4 bytes (the post's "GRPO Memory Cost 9.8GB"; the tests reproduce it and the
                  post's 2.5GB KV cache for 20K tokens). On a CPU, TRL's Triton kernel is replaced by
                  compat.TorchChunkedLogProb, whose autograd keeps fp32 N x V tensors (CPU_LOGIT_COPIES).
  generation      vLLM reserves gpu_memory_utilization x card for its weights + KV cache (TRL's
                  vllm_gpu_memory_utilization; Unsloth's fast_inference engine shares the training weights,
                  so they are counted once: "Inference Cost 0GB vs 16GB" in the same post). The KV cache is
                  2 x L x kv_heads x d x 2 bytes per token; it must hold at least one whole S-token sequence.
                  Unsloth standby (UNSLOTH_VLLM_STANDBY=1) frees the KV cache while training and raises the
                  share to its own tiers (unsloth_zoo/vllm_utils.py: 0.925 ... 0.75 of the card by size,
                  x 0.95 for vLLM >= 0.11), so the peak is the larger of generation and training.
                  Without vLLM, transformers' generate() keeps a KV cache for the B x GA completions TRL
                  generates at once (generation_batch_size).
  CUDA context    a fixed 1.0 GiB for the CUDA context, cuBLAS workspaces and allocator fragmentation
                  (an assumption: typically 0.5-1 GiB).

Several GPUs (`plan --gpus N --strategy S`, defaults from [distributed]): every figure is per GPU. Each data-
parallel process trains its own micro-batch, so activations, logits and generation are per GPU whatever the
strategy; what a strategy shards over the N GPUs (ZeRO, Rajbhandari et al. 2020; FSDP):
  ddp     nothing: a whole copy on every GPU.
  zero2   optimizer state and gradients (DeepSpeed ZeRO stage 2). With LoRA these are the adapter's: small.
  zero3   also the weights, base included (DeepSpeed ZeRO stage 3); a layer is gathered whole while it
          computes (two layers counted: the one computing and the one prefetched).
  fsdp2   as zero3 (PyTorch FSDP2, full sharding).
With generation.vllm_mode = "server" the trainer's GPUs hold no vLLM engine; the server's GPUs (its tensor-
parallel size) hold vLLM's share (serve.SERVER_GPU_MEMORY_UTILIZATION of each card): 1/tp of the 16-bit
weights each, the rest of the share is KV cache (KV heads split over tp, replicated when tp exceeds them).

A CPU plan (no CUDA here, no --gpu-memory, a recipe that needs no GPU) counts what a CPU run holds in RAM:
fp32 weights and activations, the CPU logits above, and the process's own footprint (CPU_RUNTIME: python,
torch, transformers, TRL) in place of the CUDA context. Those two constants were measured with
`plan --measure` (training/measure.py), which runs two real steps on random weights; GPU figures have no such
calibration yet (scripts/gpu_smoke.py measures them on a card).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

from lowmem_r1.core.errors import UserError
from lowmem_r1.generation.serve import SERVER_GPU_MEMORY_UTILIZATION
from lowmem_r1.models import backends
from lowmem_r1.models.names import is_hub_id

GiB = 1024**3
CUDA_CONTEXT = 1.0 * GiB
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # QLoRA double quantization: 4.127 bits per weight
DEFAULT_CARD_GIB = 24.0
# TRL 1.15's fused LM head (trl/kernels/chunked_logprob.py): [TOKEN_CHUNK_SIZE, chunk] tiles, chunk from
# trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE.
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768
# A CPU run (measured with `plan --measure` on the embedded model, see README): the process before the model
# loads, and the fp32 N x V copies compat.TorchChunkedLogProb keeps for backward (logits, softmax, grads).
CPU_RUNTIME = 0.75 * GiB
CPU_LOGIT_COPIES = 3  # the card this toolkit is built for (RTX 3090 / 4090, A5000, L4 class)


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only config that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0
    source: str = "config"

    @property
    def d(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder Linear, by its usual module name."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.d, self.kv_heads * self.d
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def params(self) -> int:
        norms = self.layers * 2 * self.hidden + self.hidden
        return self.linear_params() + self.embedding_params() + norms

    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.d * 2


def _shape(h, i, layers, heads, kv, vocab, tied, head_dim=0, source="built-in table") -> ModelShape:
    return ModelShape(h, i, layers, heads, kv, vocab, tied, head_dim, source)


# The bundled recipes' models, from their config.json on the hub, so `plan` needs no network for them.
BUILTIN_SHAPES = {
    "Qwen/Qwen2.5-0.5B-Instruct": _shape(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _shape(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-3B-Instruct": _shape(2048, 11008, 36, 16, 2, 151936, True),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B": _shape(1536, 8960, 28, 12, 2, 151936, False),
    "builtin:smollm2-135m-instruct": _shape(576, 1536, 30, 9, 3, 49152, True, 64),
}
# Unsloth's pre-quantized uploads have the same shapes.
for _name, _s in list(BUILTIN_SHAPES.items()):
    if _name.startswith("Qwen/"):
        _base = _name.split("/")[1]
        BUILTIN_SHAPES[f"unsloth/{_base}"] = _s
        BUILTIN_SHAPES[f"unsloth/{_base}-bnb-4bit"] = _s
        BUILTIN_SHAPES[f"unsloth/{_base}-unsloth-bnb-4bit"] = _s


def shape_from_config(cfg: dict, source: str) -> ModelShape:
    cfg = cfg.get("text_config") or cfg
    try:
        h = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        return ModelShape(
            hidden=h,
            intermediate=int(cfg.get("intermediate_size") or 4 * h),
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=int(cfg.get("head_dim") or 0),
            source=source,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: not a decoder config plan understands (missing {e}); plan cannot estimate it") from None


def model_shape(name: str, revision: str | None = None) -> ModelShape:
    """From the built-in table, a local folder's config.json, or the hub's config.json (never weights)."""
    if name in BUILTIN_SHAPES:
        return BUILTIN_SHAPES[name]
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        raise UserError(f"model {name}: plan reads config.json, not GGUF; pass the Hugging Face model it came from")
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise UserError(f"model {name}: folder has no config.json; pass a Hugging Face model folder")
        return shape_from_config(json.loads(cfg.read_text(encoding="utf-8")), str(cfg))
    if not is_hub_id(name):
        raise UserError(f"model {name!r}: not a local folder, hub id or builtin alias plan knows")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise UserError(
            f"model {name}: its config.json is not in plan's built-in table and HF_HUB_OFFLINE is set; "
            f"go online once, or pass a local model folder"
        )
    try:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(name, "config.json", revision=revision)
    except Exception as e:
        raise UserError(
            f"model {name}: cannot fetch config.json from the hub ({type(e).__name__}); check the name and the "
            f"network, or pass a local model folder"
        ) from None
    return shape_from_config(json.loads(Path(local).read_text(encoding="utf-8")), f"{name} (hub config.json)")


# --------------------------------------------------------------------------------------------------
# The estimate


@dataclass
class Knobs:
    """The recipe numbers memory depends on (varied to find what fits)."""

    backend: str
    load_in_4bit: bool
    weight_bytes: int  # 2 (16-bit) or 4 (float32)
    fast_inference: bool
    use_vllm: bool
    standby: bool
    vllm_share: float
    max_seq_length: int
    lora_r: int
    lora_targets: list[str]
    optim_8bit: bool
    checkpointing: bool
    batch: int
    accumulation: int
    generations: int
    prompt: int
    completion: int
    device: str = "cuda"  # "cpu": a run on this machine's CPU (fp32, RAM, the CPU log-prob fallback)
    world: int = 1  # training processes (GPUs); every figure is per GPU
    strategy: str = "ddp"  # ddp | zero2 | zero3 | fsdp2: what is sharded over `world` (SHARDED)
    server: bool = False  # generation.vllm_mode = "server": no vLLM engine on the trainer's GPUs

    def sharded(self, what: str) -> int:
        """How many ways `what` ("weights", "grads", "optimizer") is split: world or 1. Unsloth's shared vLLM
        engine (fast_inference) reads the whole weights in place, so they are never sharded under it."""
        if what == "weights" and self.fast_inference:
            return 1
        return self.world if what in SHARDED[self.strategy] else 1


SHARDED = {"ddp": (), "zero2": ("grads", "optimizer"), "zero3": ("weights", "grads", "optimizer"),
           "fsdp2": ("weights", "grads", "optimizer")}
STRATEGIES = tuple(SHARDED)


@dataclass
class Plan:
    name: str
    shape: ModelShape
    knobs: Knobs
    card: float  # bytes (RAM for a CPU plan)
    card_source: str
    breakdown: Breakdown
    notes: list[str] = field(default_factory=list)
    max_generations: int | None = None
    max_completion: int | None = None
    server: ServerPlan | None = None  # generation.vllm_mode = "server": the server's GPUs

    @property
    def rows(self) -> list[Term]:
        return self.breakdown.rows

    @property
    def total(self) -> float:
        return self.breakdown.total

    @property
    def fits(self) -> bool:
        b = self.breakdown
        processes = self.knobs.world if self.knobs.device == "cpu" else 1  # CPU processes share one RAM
        trainer = b.total * processes <= self.card and (b.kv_room is None or b.kv_room >= b.kv_needed)
        return trainer and (self.server is None or self.server.fits)

    def gib(self, value: float) -> float:
        return round(value / GiB, 2)


def plan_backend(recipe) -> str:
    """The backend the run would use on a CUDA machine: auto means unsloth when it is installed or when
    planning from a machine without a GPU (the fast path assumes `pip install "lowmem-r1[gpu]"`)."""
    if recipe.model.backend != "auto":
        return recipe.model.backend
    return "unsloth" if backends.unsloth_installed() or not backends.cuda_available() else "hf"


def plan_device(recipe, gpu_memory: float | None) -> str:
    """"cpu" when the run would happen on this machine's CPU (no CUDA, no --gpu-memory, and nothing in the
    recipe needs a GPU), else "cuda": a GPU recipe planned from a laptop is planned for its card."""
    needs_gpu = recipe.model.fast_inference or recipe.generation.use_vllm
    return "cpu" if gpu_memory is None and not backends.cuda_available() and not needs_gpu else "cuda"


def knobs_from_recipe(recipe, backend: str, device: str = "cuda", world: int | None = None,
                      strategy: str | None = None) -> Knobs:
    m, t, g, lora = recipe.model, recipe.training, recipe.generation, recipe.lora
    targets = list(ModelShape(1, 1, 1, 1, 1, 1, True).linear_shapes()) if lora.target_modules == "all-linear" \
        else list(lora.target_modules)
    unsloth = backend == "unsloth"
    return Knobs(
        backend=backend,
        load_in_4bit=m.load_in_4bit,
        weight_bytes=4 if m.dtype == "float32" or (device == "cpu" and m.dtype == "auto") else 2,
        fast_inference=m.fast_inference and unsloth,
        use_vllm=g.use_vllm or m.fast_inference,
        standby=m.vllm_standby and unsloth and m.fast_inference,
        vllm_share=m.gpu_memory_utilization if (m.fast_inference and unsloth) else g.vllm_gpu_memory_utilization,
        max_seq_length=m.max_seq_length,
        lora_r=lora.r,
        lora_targets=targets,
        optim_8bit="8bit" in t.optim,
        checkpointing=unsloth or t.gradient_checkpointing,
        batch=t.per_device_train_batch_size,
        accumulation=t.gradient_accumulation_steps,
        generations=t.num_generations,
        prompt=recipe.data.max_prompt_length,
        completion=g.max_completion_length,
        device=device,
        world=world or recipe.distributed.nproc,
        strategy=strategy or recipe.distributed.strategy,
        server=g.use_vllm and g.vllm_mode == "server" and not (m.fast_inference and unsloth),
    )


def standby_share(card: float, vllm_at_least_011: bool = True) -> float:
    """Unsloth's standby utilisation for a card of this size (unsloth_zoo/vllm_utils.py, 2026.10)."""
    tenth = card / GiB * 0.1
    tiers = [(4.0, 0.925), (2.5, 0.9), (2.0, 0.825), (1.4, 0.8), (1.0, 0.775), (0.0, 0.75)]
    share = next(u for lo, u in tiers if tenth >= lo)
    return share * 0.95 if vllm_at_least_011 else share


class Term(NamedTuple):
    """One line of the breakdown: what, bytes, how it was computed."""

    what: str
    bytes: float
    how: str


@dataclass
class Breakdown:
    """The estimate, term by term (`plan --measure` prints the measured figures beside these)."""

    weights: Term
    lora: Term
    activations: Term
    logits: Term
    generation: Term
    runtime: Term
    kv_needed: float = 0.0  # one whole sequence in vLLM's KV cache
    kv_room: float | None = None  # what vLLM's share leaves for its KV cache; None without vLLM

    @property
    def rows(self) -> list[Term]:
        return [self.weights, self.lora, self.activations, self.logits, self.generation, self.runtime]

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.rows)

    @property
    def training(self) -> float:
        """What the training step holds (everything but generation and the runtime)."""
        return self.weights.bytes + self.lora.bytes + self.activations.bytes + self.logits.bytes


def weights_term(shape: ModelShape, k: Knobs) -> Term:
    if k.load_in_4bit:
        linear = shape.linear_params()
        whole = linear * NF4_BITS / 8 + (shape.params() - linear) * 2
        what, how = "base weights (4-bit)", \
            f"{shape.params() / 1e9:.2f}B params, Linear layers NF4 ({NF4_BITS:.3f} bits), embeddings 16-bit"
    else:
        whole = shape.params() * k.weight_bytes
        what, how = f"base weights ({8 * k.weight_bytes}-bit)", f"{shape.params() / 1e9:.2f}B params x {k.weight_bytes} bytes"
    n = k.sharded("weights")
    if n == 1:
        return Term(what, whole, how)
    gathered = min(whole, 2 * whole / shape.layers)  # the layer computing and the one prefetched, whole
    return Term(f"{what}, 1/{n} shard", min(whole, whole / n + gathered),
                f"{how}; {k.strategy} over {n} GPUs: 1/{n} each + 2 layers gathered whole")


def lora_term(shape: ModelShape, k: Knobs) -> Term:
    dims = shape.linear_shapes()
    unknown = [t for t in k.lora_targets if t not in dims]
    params = shape.layers * sum(k.lora_r * sum(dims[t]) for t in k.lora_targets if t in dims)
    optim = 2 if k.optim_8bit else 8
    per_param = 4 / k.sharded("weights") + 4 / k.sharded("grads") + optim / k.sharded("optimizer")
    split = [w for w in ("weights", "grads", "optimizer") if k.sharded(w) > 1]
    return Term("LoRA weights + grads + optimizer", params * per_param,
                f"{params / 1e6:.1f}M params x {per_param:.3g} bytes ({'8-bit AdamW' if k.optim_8bit else 'AdamW'}"
                + (f"; {', '.join(split)} 1/{k.world} each" if split else "") + ")"
                + (f"; not counted: {unknown}" if unknown else ""))


def activations_term(shape: ModelShape, k: Knobs) -> Term:
    h, L = shape.hidden, shape.layers
    B, S = k.batch, k.prompt + k.completion
    e = 4 if k.device == "cpu" and k.weight_bytes == 4 else 2  # bytes per activation: fp32 on a CPU run
    layer = B * S * (10 * h + 4 * shape.intermediate) * e
    if k.checkpointing and k.backend == "unsloth":
        act, how = layer + 2 * B * S * h * e, "Unsloth checkpointing: layer inputs offloaded to RAM, one layer recomputed"
    elif k.checkpointing:
        act, how = layer + L * B * S * h * e, f"checkpointing: {L} layer inputs kept + one layer recomputed"
    else:
        act, how = L * layer, f"no gradient checkpointing: all {L} layers' activations kept"
    return Term(f"activations (B={B} x S={S} tokens)", act, how)


def logits_term(shape: ModelShape, k: Knobs) -> Term:
    h, V, C = shape.hidden, shape.vocab, k.completion
    N = k.batch * C  # completion tokens scored per micro-batch
    if k.backend == "unsloth":
        return Term("loss logits", C * V * 4, f"Unsloth chunked loss: one fp32 row at a time, C={C} x V={V} x 4 bytes")
    if k.device == "cpu":  # compat.TorchChunkedLogProb: autograd keeps each chunk's fp32 logits and softmax
        return Term("loss logits", CPU_LOGIT_COPIES * N * V * 4,
                    f"CPU log-probs (training/grpo/compat.py): {CPU_LOGIT_COPIES} fp32 copies of N={N} x V={V} kept for backward")
    tile = min(N, TRL_TOKEN_CHUNK) * min(V, TRL_VOCAB_CHUNK) * 2
    return Term("loss logits", tile + N * h * 4,
                f"TRL 1.15 fused LM head: one {min(N, TRL_TOKEN_CHUNK)} x {min(V, TRL_VOCAB_CHUNK)} 16-bit tile "
                f"+ fp32 grad of N={N} hidden states")


def generation_term(shape: ModelShape, k: Knobs, card: float, weights: float, lora: float,
                    training: float) -> tuple[Term, float, float | None]:
    """(term, KV bytes one sequence needs, KV room in vLLM's share or None)."""
    S = k.prompt + k.completion
    kv_token = shape.kv_bytes_per_token() * (2 if k.device == "cpu" and k.weight_bytes == 4 else 1)
    kv_needed = kv_token * (k.max_seq_length if k.fast_inference else S)
    if k.server:
        return Term("generation", 0.0, "vllm_mode = server: no vLLM engine on the trainer's GPUs (server below)"), \
            kv_needed, None
    if not k.use_vllm:
        gen_batch = k.batch * k.accumulation
        return Term(f"generation KV cache ({gen_batch} x {S} tokens)", gen_batch * S * kv_token + gen_batch * shape.vocab * 4,
                    f"transformers generate(), {kv_token / 1024:.0f} KiB per token"), kv_needed, None
    share = standby_share(card) if k.standby else k.vllm_share
    reserved = share * card
    if k.fast_inference:  # shares the training weights: they sit inside vLLM's reservation
        kv_room = reserved - weights
        row = max(kv_room, 0.0)
        what = f"vLLM share beyond the shared weights ({share:.2f} x card{', standby' if k.standby else ''})"
    else:  # TRL's colocated engine loads its own copy
        kv_room = reserved - weights
        row = reserved
        what = f"vLLM share ({share:.2f} x card, its own weights + KV cache)"
    if k.standby:  # KV cache asleep while training: the peak is the larger phase
        peak = max(reserved + lora, training)
        return Term(what, max(0.0, peak - training), "standby: only what generation needs beyond training"), kv_needed, kv_room
    return Term(what, row, f"KV cache {kv_token / 1024:.0f} KiB per token"), kv_needed, kv_room


def estimate(shape: ModelShape, k: Knobs, card: float) -> Breakdown:
    weights, lora = weights_term(shape, k), lora_term(shape, k)
    act, logits = activations_term(shape, k), logits_term(shape, k)
    training = weights.bytes + lora.bytes + act.bytes + logits.bytes
    gen, kv_needed, kv_room = generation_term(shape, k, card, weights.bytes, lora.bytes, training)
    if k.device == "cpu":
        runtime = Term("runtime (CPU process)", CPU_RUNTIME, "python + torch + transformers + trl, measured once")
    else:
        runtime = Term("CUDA context + allocator", CUDA_CONTEXT, "fixed assumption")
    return Breakdown(weights, lora, act, logits, gen, runtime, kv_needed, kv_room)


@dataclass
class ServerPlan:
    """Each of the vLLM server's GPUs (`lowmem-r1 serve`, tensor parallel over `tp`): vLLM reserves `share` of
    the card for 1/tp of the weights and a KV cache in the rest."""

    tp: int
    share: float
    card: float
    weights: float  # per GPU
    kv_token: float  # KV bytes per token per GPU
    sequence: int  # tokens of one whole sequence

    @property
    def reserved(self) -> float:
        return self.share * self.card

    @property
    def kv_room(self) -> float:
        return self.reserved - self.weights

    @property
    def sequences(self) -> int:
        return max(0, int(self.kv_room // (self.kv_token * self.sequence)))

    @property
    def fits(self) -> bool:
        return self.sequences >= 1


def server_plan(shape: ModelShape, k: Knobs, card: float, tp: int,
                share: float = SERVER_GPU_MEMORY_UTILIZATION) -> ServerPlan:
    """The server loads the base model in 16-bit (fp32 when model.dtype says so), not the trainer's 4-bit."""
    per_gpu_kv_heads = max(1, shape.kv_heads // tp)  # vLLM replicates KV heads when tp exceeds them
    kv_token = 2 * shape.layers * per_gpu_kv_heads * shape.d * k.weight_bytes
    return ServerPlan(tp, share, card, shape.params() * k.weight_bytes / tp, kv_token, k.prompt + k.completion)


def _fits(shape, k, card) -> bool:
    b = estimate(shape, k, card)
    return b.total <= card and (b.kv_room is None or b.kv_room >= b.kv_needed)


GENERATIONS_LIMIT, COMPLETION_LIMIT = 256, 131072  # searched up to here


def largest_generations(shape: ModelShape, k: Knobs, card: float, limit: int = GENERATIONS_LIMIT) -> int | None:
    """Largest num_generations that fits, keeping the prompts per micro-batch (B scales with it)."""
    per = max(1, k.batch // k.generations)
    best = None
    for n in range(2, limit + 1):
        if not _fits(shape, replace(k, generations=n, batch=per * n), card):
            break
        best = n
    return best


def largest_completion(shape: ModelShape, k: Knobs, card: float, limit: int = COMPLETION_LIMIT) -> int | None:
    """Largest max_completion_length that fits (model.max_seq_length raised with it when vLLM uses it)."""
    def ok(c):
        seq = max(k.max_seq_length, k.prompt + c) if k.fast_inference else k.max_seq_length
        return _fits(shape, replace(k, completion=c, max_seq_length=seq), card)

    if not ok(1):
        return None
    lo, hi = 1, limit
    if ok(hi):
        return hi
    while hi - lo > 1:  # memory grows with the length: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def card_memory(gpu_memory: float | None) -> tuple[float, str]:
    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise UserError(f"--gpu-memory {gpu_memory}: must be a positive number of GiB, e.g. --gpu-memory 24")
        return gpu_memory * GiB, "--gpu-memory"
    if backends.cuda_available():
        import torch

        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"{props.name} (detected)"
    return DEFAULT_CARD_GIB * GiB, f"no GPU here: assuming a {DEFAULT_CARD_GIB:.0f} GiB card (--gpu-memory to change)"


def ram() -> tuple[float, str]:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(total), "this machine's RAM (CPU run)"


def make_plan(recipe, gpu_memory: float | None = None, search: bool = True, gpus: int | None = None,
              strategy: str | None = None) -> Plan:
    """The estimate for one GPU of `gpus` training processes (default: distributed.nproc) sharded by `strategy`
    (default: distributed.strategy), and for the server's GPUs in server mode."""
    if gpus is not None and gpus < 1:
        raise UserError(f"--gpus {gpus}: must be at least 1 (the number of training processes)")
    if strategy is not None and strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: unknown; use one of {', '.join(STRATEGIES)}")
    shape = model_shape(recipe.model.name, recipe.model.revision)
    device = plan_device(recipe, gpu_memory)
    if device == "cpu":  # Unsloth's CPU backend is plain transformers + PEFT: the hf terms apply
        card, source = ram()
        k = knobs_from_recipe(recipe, "hf", device, gpus, strategy)
    else:
        card, source = card_memory(gpu_memory)
        k = knobs_from_recipe(recipe, plan_backend(recipe), device, gpus, strategy)
    b = estimate(shape, k, card)
    plan = Plan(recipe.name, shape, k, card, source, b)
    if k.server:
        plan.server = server_plan(shape, k, card, recipe.generation.vllm_tensor_parallel_size)
    distributed_notes(plan)
    if b.kv_room is not None:
        need, room = b.kv_needed, b.kv_room
        plan.notes.append(
            f"vLLM KV cache: one {k.max_seq_length if k.fast_inference else k.prompt + k.completion}-token sequence "
            f"needs {plan.gib(need)} GiB, its share leaves {plan.gib(max(room, 0))} GiB "
            f"(~{max(0, int(room // need)) if need else 0} sequences at once)"
        )
    if recipe.model.backend == "auto" and device == "cuda":
        plan.notes.append(f"backend auto: planned as {k.backend} on a CUDA card")
    if device == "cpu":
        plan.notes.append("no GPU here and the recipe needs none: planned for this CPU (RAM); --gpu-memory N plans a card")
    if k.fast_inference and k.prompt + k.completion > k.max_seq_length:
        plan.notes.append(
            f"data.max_prompt_length + max_completion_length = {k.prompt + k.completion} exceeds "
            f"model.max_seq_length = {k.max_seq_length}: raise model.max_seq_length"
        )
    if search:
        plan.max_generations = largest_generations(shape, k, card)
        plan.max_completion = largest_completion(shape, k, card)
    return plan


def distributed_notes(plan: Plan) -> None:
    """What sharding does and does not split for this recipe, said plainly."""
    k = plan.knobs
    if k.world > 1 or k.strategy != "ddp":
        plan.notes.append(f"per GPU of {k.world} training process(es), {k.strategy}: each trains its own "
                          f"micro-batch of {k.batch} completions (the global batch is {k.world} x that); "
                          f"activations, logits and generation are not sharded")
    if k.strategy == "zero2":
        whole = lora_term(plan.shape, replace(k, world=1)).bytes
        plan.notes.append(f"zero2 shards only the optimizer state and gradients: with LoRA those are in the "
                          f"{plan.gib(whole)} GiB LoRA term, the frozen base weights stay whole on every GPU; "
                          f"zero3 / fsdp2 shard them too")
    if k.fast_inference and k.world > 1 and k.strategy in ("zero3", "fsdp2"):
        plan.notes.append(f"model.fast_inference: Unsloth's vLLM engine shares the whole weights in place, so "
                          f"{k.strategy} cannot shard them (planned whole on every GPU)")
    if k.device == "cpu" and k.world > 1:
        plan.notes.append(f"{k.world} CPU processes share this RAM: {k.world} x the peak must fit")
    if k.use_vllm and not k.server and k.world > 1:
        plan.notes.append("colocated vLLM: every training GPU runs its own engine with the whole weights "
                          "(its share is not sharded)")


def warn_if_not_fit(recipe) -> str | None:
    """For train on a GPU: the warning to show before step 1 when the plan says it will not fit, else None.
    Never blocks training: an unknown config (offline hub id) just gives no warning."""
    if not backends.cuda_available():
        return None
    try:
        plan = make_plan(recipe)
    except UserError:
        return None
    if plan.fits:
        return None
    return (
        f"estimated peak {plan.gib(plan.total)} GiB on a {plan.gib(plan.card)} GiB card: this recipe probably "
        f"does not fit; largest that fits: num_generations {plan.max_generations or 'none'}, "
        f"max_completion_length {plan.max_completion or 'none'} (lowmem-r1 plan RECIPE for the breakdown)"
    )


def print_plan(plan: Plan, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(highlight=False)
    k = plan.knobs
    gpus = f", per GPU: {k.world} x {k.strategy}" if k.world > 1 or k.strategy != "ddp" else ""
    table = Table(title=f"plan: {plan.name} ({k.backend}, {plan.shape.source}{gpus})")
    table.add_column("memory", style="cyan")
    table.add_column("GiB", justify="right")
    table.add_column("how")
    for what, value, how in plan.rows:
        table.add_row(escape(what), f"{value / GiB:.2f}", escape(how))
    card = escape(f"card: {plan.card / GiB:.1f} GiB, {plan.card_source}")
    table.add_row("[bold]peak (estimate)", f"[bold]{plan.total / GiB:.2f}", card)
    console.print(table)
    for note in plan.notes:
        console.print(f"  {escape(note)}")
    if plan.server is not None:
        print_server(plan, console)
    verdict = "[green]fits[/]" if plan.fits else "[red]does not fit[/]"
    console.print(f"verdict: {verdict} (estimate from config; not measured)")
    if plan.max_generations is not None or plan.max_completion is not None:
        per = max(1, k.batch // k.generations)
        gens = _bound(plan.max_generations, GENERATIONS_LIMIT)
        console.print(
            f"largest that fits: num_generations = {gens} (per_device_train_batch_size = {per} x num_generations), "
            f"max_completion_length = {_bound(plan.max_completion, COMPLETION_LIMIT)} (others as in the recipe)"
        )
    elif not plan.fits:
        console.print("even num_generations = 2 and 1-token completions do not fit: a smaller model or 4-bit")


def print_server(plan: Plan, console) -> None:
    sv, gib = plan.server, plan.gib
    console.print(
        f"vLLM server (`lowmem-r1 serve`, {sv.tp} GPU(s) of its own besides the {plan.knobs.world} training GPU(s)), "
        f"per GPU: {gib(sv.reserved)} GiB reserved ({sv.share} x card) = weights {gib(sv.weights)} GiB (1/{sv.tp}) + "
        f"KV cache {gib(max(sv.kv_room, 0))} GiB, ~{sv.sequences} sequences of {sv.sequence} tokens at once "
        + ("[green]fits[/]" if sv.fits else "[red]does not fit: more --tp or a larger card[/]"))


def _bound(value: int | None, limit: int) -> str:
    if value is None:
        return "none"
    return f"{value}+" if value >= limit else str(value)


__all__ = ["make_plan", "print_plan", "warn_if_not_fit", "model_shape", "ModelShape", "Plan", "GiB"]
