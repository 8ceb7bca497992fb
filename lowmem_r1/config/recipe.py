"""A recipe is data: a TOML file validated here, whole, before anything heavy is imported or downloaded.

Every error is one line naming the file, the key and the fix (Axolotl-style validation, torchtune-style
`key=value` overrides). Only pydantic and the standard library are imported at module level so that
`lowmem-r1 train RECIPE --dry-run` answers instantly.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lowmem_r1 import rewards
from lowmem_r1.config.stages import STAGES
from lowmem_r1.core.distributed import batch_problem
from lowmem_r1.core.errors import UserError
from lowmem_r1.data import TASKS, check_prompt, get_task
from lowmem_r1.data.sources import check_local
from lowmem_r1.models.names import BUILTINS, builtin_cache_path, check_name

BUILTIN_DEFAULT_MODEL = "builtin:smollm2-135m-instruct"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelSection(Section):
    name: str = BUILTIN_DEFAULT_MODEL
    """Hub id, local folder, .gguf file, or a builtin alias (`builtin:smollm2-135m-instruct`)."""
    backend: Literal["auto", "hf", "unsloth"] = "auto"
    """auto: unsloth when CUDA and unsloth are both present, else hf. hf: transformers + peft + TRL,
    runs everywhere (CPU too). unsloth: Unsloth's fused kernels, 4-bit and weight-sharing vLLM (GPU)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Load and compute dtype (also the trainer's bf16/fp16 flags). auto: bfloat16 on GPUs with native
    bf16, float16 on older GPUs, float32 on CPU; bfloat16 on a card without it falls back to float16."""
    load_in_4bit: bool = False
    """QLoRA: load the frozen base weights as 4-bit NF4 with bitsandbytes (about a quarter of their
    16-bit memory; the LoRA weights stay in dtype). Needs bitsandbytes."""
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] | None = None
    """How bitsandbytes stores the 4-bit weights (default uint8). ZeRO-3 and FSDP2 shard 4-bit weights only
    when stored in the compute dtype (e.g. bfloat16)."""
    fast_inference: bool = False
    """Unsloth: build a vLLM engine that shares weights with the trained model (GPU only)."""
    max_seq_length: int = Field(1024, gt=0)
    """Longest sequence in tokens (prompt + completion): Unsloth's max_seq_length, vLLM's context with
    fast_inference; for stage = "sft" SFTConfig's max_length (longer examples are dropped)."""
    max_lora_rank: int = Field(64, gt=0)
    """Unsloth with fast_inference: the largest LoRA rank its vLLM engine accepts; must be at least
    lora.r. Ignored otherwise."""
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    """Unsloth with fast_inference: share of GPU memory (0-1] its vLLM engine reserves (KV cache;
    weights shared with training). Other vLLM engines use generation.vllm_gpu_memory_utilization."""
    vllm_standby: bool = False
    """Unsloth: UNSLOTH_VLLM_STANDBY=1, vLLM and training share memory further."""
    revision: str | None = None
    """Hub branch, tag or commit of model.name (model and tokenizer); unset: the default branch."""
    trust_remote_code: bool = False
    """Run Python code shipped in the model's repository (transformers' trust_remote_code); only for
    models that need it, from a source you trust."""
    adapter: str | None = None
    """A LoRA adapter folder (or run directory) to continue training instead of a fresh LoRA: how a
    pipeline stage starts from the previous stage. Its r and target modules must match [lora]."""


class LoraSection(Section):
    r: int = Field(16, gt=0)
    """LoRA rank (peft's r): the adapter's width and trainable size; 8-64 is usual, at most the
    model's hidden size (and model.max_lora_rank with fast_inference)."""
    alpha: int = Field(32, gt=0)
    """LoRA scale numerator (peft's lora_alpha): updates are scaled by alpha / r (alpha / sqrt(r) with
    use_rslora); r to 2 x r is usual."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA path's input (peft's lora_dropout), 0 to below 1; 0 is usual for RL and is
    Unsloth's fast path."""
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Layers that get an adapter (peft's target_modules): module names (default: attention and MLP
    projections), or "all-linear" for every linear layer but the output head."""
    use_rslora: bool = False
    """Rank-stabilized LoRA (peft's use_rslora): scale by alpha / sqrt(r) instead of alpha / r, so
    high ranks still learn."""


class DataSection(Section):
    source: str = "builtin:arithmetic"
    """Hub id, local file or folder (jsonl/json/parquet/csv), or a generator: builtin:arithmetic,
    builtin:countdown."""
    task: Literal[tuple(TASKS)] = "arithmetic"  # type: ignore[valid-type]
    """A name in lowmem_r1.data.tasks.TASKS (one class per task)."""
    config: str | None = None
    """Configuration (subset) of a hub dataset, e.g. "main" for openai/gsm8k; local files, folders
    and builtin generators ignore it."""
    split: str = "train"
    """Split to train on, for hub ids and folders (a single local file is one split; a builtin
    generator ignores it)."""
    eval_split: str | None = None
    """Named split of the source (or a second local file) held out for evaluation."""
    eval_size: int = Field(0, ge=0)
    """Rows held out of the training split for evaluation (with eval_split: caps its size)."""
    limit: int | None = Field(None, gt=0)
    """At most this many training rows (after shuffling and the eval hold-out)."""
    shuffle: bool = True
    """Shuffle the rows (with data.seed) before the eval hold-out and data.limit."""
    seed: int = 0
    """Seed of the row shuffle and of the builtin generators (unless data.generator sets its own seed)."""
    max_prompt_length: int = Field(256, gt=0)
    """Prompts longer than this (in tokens, chat template applied) are dropped and counted."""
    columns: dict[str, str] = Field(default_factory=dict)
    """Task `generic`: reward column name -> dataset column name (e.g. answer = "label")."""
    generator: dict[str, Any] = Field(default_factory=dict)
    """Parameters of a builtin generator (n, seed, min/max numbers ...)."""


class PromptSection(Section):
    system: str = "none"
    """Preset (`r1`, `xml`, `boxed`, `none`) or any custom system prompt."""
    user: str | None = None
    """Template with {field} placeholders; default: the task's own."""
    assistant_prefix: str = ""
    """Text the assistant turn starts with (e.g. "Let me solve this step by step.\\n<think>")."""
    answer_format: Literal["auto", "r1", "xml", "boxed", "think_boxed", "plain"] = "auto"
    """How a correct completion writes its answer (gold answers, `data preview`); auto: from the system
    preset, else from the tags or \\boxed the prompt mentions. think_boxed: R1-distilled models' form,
    <think>...</think> then a \\boxed{} answer."""


class RewardEntry(BaseModel):
    """One `[[rewards]]` table: a registry name (or `module:function` / `file.py:function`),
    a weight, what to do when it raises, and the reward's own parameters as extra keys."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)
    name: str
    """A reward in the registry (`lowmem-r1 rewards list`, docs/rewards.md), or your own function as
    `module:function` or `file.py:function`."""
    weight: float = 1.0
    """Multiplier of this reward in the weighted total the advantages come from (TRL's
    reward_weights); 0 records the reward without training on it."""
    on_error: Literal["raise", "skip"] = "raise"
    """When the reward raises or returns bad values: raise stops the run, naming the reward and the
    completion; skip scores that call None (not applicable) and counts it as reward_errors/<name>."""

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TrainingSection(Section):
    max_steps: int = Field(100, gt=0)
    """Optimizer steps to train (TRL's max_steps); the prompts are cycled through as often as needed."""
    learning_rate: float = Field(5e-6, gt=0)
    """Peak learning rate (TRL's learning_rate). GRPO on LoRA: about 5e-6 to 2e-5; LoRA SFT and the
    tiny CPU demos use 1e-4 and above."""
    per_device_train_batch_size: int = Field(8, gt=0)
    """Completions per device per micro-batch (TRL counts completions, not prompts)."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches per optimizer step (TRL's gradient_accumulation_steps): prompts per step =
    per_device_train_batch_size x this x processes / num_generations."""
    num_generations: int = Field(8, ge=2)
    """Completions per prompt, the group whose rewards are compared (TRL's num_generations); at
    least 2, and per_device_train_batch_size x gradient_accumulation_steps x processes must be a multiple."""
    beta: float = Field(0.0, ge=0)
    """KL penalty towards the starting model (TRL's beta); 0 drops the KL term and its reference
    forward pass. DeepSeek-R1 used 0.001; TRL's default was once 0.04."""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo"] = "dapo"
    """The policy loss (TRL's loss_type). dapo: token losses averaged over the whole batch's tokens;
    dr_grpo: over a constant; grpo: per sequence (length-biased); bnpo, cispo, sapo, luspo, vespo:
    variants."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling (TRL's scale_rewards): group divides by each group's reward standard
    deviation, batch by the whole batch's, none does not divide (Dr. GRPO)."""
    epsilon: float = Field(0.2, gt=0, lt=1)
    """Lower clip range of the policy ratio (1 - epsilon)."""
    epsilon_high: float | None = Field(None, gt=0)
    """Upper clip range (1 + epsilon_high); DAPO's clip-higher uses 0.28. Default: epsilon."""
    delta: float | None = Field(None, gt=1)
    """Two-sided clipping (INTELLECT-2): cap the ratio at delta for negative advantages too."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """"sequence" is GSPO: one importance ratio per completion."""
    top_entropy_quantile: float = Field(1.0, ge=0, le=1)
    """Train only on the top share of tokens by entropy (0.2 in "Beyond the 80/20 rule"); 1 keeps all."""
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize"
    """normalize_then_sum (GDPO): normalise each reward within its group before the weighted sum."""
    num_iterations: int = Field(1, gt=0)
    """Optimizer updates per generation batch (TRL's num_iterations, GRPO's mu); above 1 reuses
    completions off-policy, where the epsilon clip matters."""
    mask_truncated_completions: bool = False
    """Overlong filtering (DAPO): completions cut at max_completion_length do not enter the loss."""
    dynamic_sampling: Literal["off", "skip", "refill"] = "off"
    """Groups whose rewards all agree teach nothing. skip: leave them out of the update; refill: also
    generate for further prompts until the step has its full number of groups with signal."""
    max_refill_draws: int = Field(4, ge=1)
    """refill: at most this many extra generation rounds per step (each at most one batch of prompts)."""
    dynamic_sampling_reward: str | None = None
    """The reward whose scores decide whether a group has signal (DAPO: accuracy), so a length or
    partial-credit reward alone does not keep a group; default: the weighted total's advantages."""
    lr_scheduler_type: str = "constant"
    """Learning-rate schedule (TRL's lr_scheduler_type): constant, constant_with_warmup, linear,
    cosine, ...; constant ignores warmup_ratio."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Share of max_steps (0 to below 1) over which the learning rate rises from 0 (passed as TRL's
    warmup_steps, which reads a float below 1 as a ratio)."""
    weight_decay: float = Field(0.0, ge=0)
    """Optimizer weight decay (TRL's weight_decay); 0 to 0.1 is usual."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradients are clipped to this global norm (TRL's max_grad_norm); 1.0 is usual, 0.1 is
    Unsloth's GRPO notebook."""
    optim: str = "adamw_torch"
    """Optimizer (TRL's optim): adamw_torch, adamw_torch_fused, adamw_8bit (needs bitsandbytes; the
    GPU recipes use it), paged_adamw_8bit, adafactor, ..."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (TRL's
    gradient_checkpointing): less memory, slower steps. Unsloth on a GPU always uses its offloaded kind."""
    seed: int = 42
    """Random seed of the run (TRL's seed): LoRA's initial weights, sampling and prompt order."""
    save_steps: int = Field(50, gt=0)
    """A checkpoint every N optimizer steps in the run directory's checkpoints/ (TRL's save_steps);
    `train --resume` continues from the newest complete one."""
    save_total_limit: int | None = Field(2, gt=0)
    """Checkpoints kept, oldest deleted first (TRL's save_total_limit); the newest complete one is
    never deleted."""


class GenerationSection(Section):
    max_completion_length: int = Field(256, gt=0)
    """Tokens per generated completion at most (TRL's max_completion_length); longer ones are cut
    (see training.mask_truncated_completions). Also eval's default."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (TRL's temperature): 1.0 samples the model's own distribution, lower is
    less diverse. `eval --samples` above 1 uses it too."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling (TRL's top_p): sample from the most likely tokens whose probabilities add up
    to top_p; 1.0 keeps all."""
    top_k: int = Field(0, ge=0)
    """Sample only from the k most likely tokens (TRL's top_k); 0 turns it off."""
    repetition_penalty: float = Field(1.0, gt=0)
    """Penalty on tokens already in the prompt or completion (TRL's repetition_penalty); 1.0 is off,
    above 1 repeats less."""
    continuous_batching: Literal["auto", "on", "off"] = "off"
    """Generation without vLLM through transformers' continuous batching (TRL's
    use_transformers_continuous_batching). auto: on where it measured faster than the padded-batch
    generate - nowhere yet (0.47x on an idle CPU) - so off."""
    use_vllm: bool = False
    """Generate with vLLM instead of transformers' generate (TRL's use_vllm): on a CUDA GPU, or with
    vLLM's CPU build. Unsloth's own shared engine is model.fast_inference."""
    vllm_mode: Literal["colocate", "server"] = "colocate"
    """TRL's vllm_mode. colocate: a vLLM engine in the training process, sharing its GPU. server:
    a separate `lowmem-r1 serve` on other GPUs, at vllm_server_host:vllm_server_port."""
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Share of GPU memory (0-1] the colocated vLLM engine reserves for weights and KV cache (TRL's
    vllm_gpu_memory_utilization); Unsloth's fast_inference uses model.gpu_memory_utilization."""
    vllm_server_host: str = "127.0.0.1"
    """Where `lowmem-r1 serve` (TRL's vllm-serve) listens, for vllm_mode = "server"."""
    vllm_server_port: int = Field(8000, gt=0, lt=65536)
    """Port of the vLLM server for vllm_mode = "server" (TRL's vllm_server_port); `lowmem-r1 serve`
    listens there."""
    vllm_server_timeout: float = Field(240.0, gt=0)
    """Seconds training waits for the server before step 1, then stops with one line (never hangs)."""
    vllm_tensor_parallel_size: int = Field(1, gt=0)
    """GPUs the server shards the model over (`serve --tp`)."""
    vllm_importance_sampling_correction: bool = True
    """Correct for vLLM's sampling probabilities differing from the trainer's (TRL's default: on)."""
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        "sequence_mask")
    """With vLLM: how the ratio of the trainer's to vLLM's probabilities weights the loss (TRL's
    vllm_importance_sampling_mode): token_* per token, sequence_* per completion; *_truncate clips it to
    [clip_min, clip_max], *_mask drops what falls outside."""
    vllm_importance_sampling_clip_min: float | None = Field(None, ge=0)
    """Lower bound of the vLLM importance-sampling ratio (TRL's vllm_importance_sampling_clip_min); unset:
    none. See vllm_importance_sampling_mode."""
    vllm_importance_sampling_clip_max: float | None = Field(3.0, gt=0)
    """Upper bound of the vLLM importance-sampling ratio (TRL's vllm_importance_sampling_clip_max); unset:
    none. See vllm_importance_sampling_mode."""


class DistributedSection(Section):
    """How several processes share the work. One process needs none of this."""

    strategy: Literal["ddp", "zero2", "zero3", "fsdp2"] = "ddp"
    """ddp: a full copy per GPU (default). zero2: DeepSpeed shards optimizer state and gradients.
    zero3: DeepSpeed also shards the weights. fsdp2: PyTorch's fully-sharded data parallel."""
    nproc: int = Field(1, gt=0)
    """Processes (GPUs) on this node when `lowmem-r1 train` launches itself (`--nproc` overrides)."""


class OutputSection(Section):
    dir: str | None = None
    """Run directory; default runs/<recipe name>."""
    completions_fraction: float = Field(1.0, ge=0, le=1)
    """Share of generated samples written to completions.jsonl."""


class LoggingSection(Section):
    report_to: list[Literal["tensorboard", "wandb", "swanlab", "trackio"]] = Field(default_factory=list)
    """Trackers that get the metrics too (TRL's report_to): tensorboard, wandb, swanlab, trackio;
    empty: none (metrics.jsonl is always written)."""
    logging_steps: int = Field(1, gt=0)
    """Metrics are logged (metrics.jsonl, the live display, report_to) every N optimizer steps
    (TRL's logging_steps)."""
    sample_every: int = Field(5, ge=0)
    """Show one sample completion in the live display every N steps (0: never)."""


class EvalSection(Section):
    size: int = Field(50, ge=0)
    """Held-out prompts scored by `lowmem-r1 eval` (taken from data.eval_split/eval_size)."""
    max_new_tokens: int | None = None
    """Tokens per completion at most in `lowmem-r1 eval` (`--max-new-tokens` overrides); unset:
    generation.max_completion_length."""
    batch_size: int = Field(16, gt=0)
    """Completions per generation batch in `lowmem-r1 eval` (`--batch-size` overrides); prompts per
    batch = batch_size / --samples."""


class Recipe(Section):
    name: str = "run"
    """Run name: the run directory is runs/<name> unless output.dir is set. A recipe file's default:
    its file name without .toml."""
    description: str = ""
    """Free text about the recipe, shown by `train --dry-run`; changing it does not block --resume."""
    stage: str = "grpo"
    """What `train` runs, a kind in config/stages.py: `grpo` (reasoning RL with [[rewards]]) or `sft`
    (supervised fine-tuning on traces: cold start, rejection-sampled or distilled data). Multi-stage recipes
    ([[stages]]) chain them."""
    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    prompt: PromptSection = Field(default_factory=PromptSection)
    rewards: list[RewardEntry] = Field(default_factory=list)
    training: TrainingSection = Field(default_factory=TrainingSection)
    generation: GenerationSection = Field(default_factory=GenerationSection)
    output: OutputSection = Field(default_factory=OutputSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    distributed: DistributedSection = Field(default_factory=DistributedSection)

    @model_validator(mode="after")
    def _combinations(self) -> "Recipe":
        t, g = self.training, self.generation
        if self.stage not in STAGES:
            raise _Combination("stage", f"stage = {self.stage!r} is not a kind of stage; use one of: "
                                        f"{', '.join(STAGES)}")
        kind = STAGES[self.stage]
        uneven = batch_problem(t, self.distributed.nproc)  # the world size a launcher gives wins: launch.check
        if kind.rewarded and uneven:
            raise _Combination("training.num_generations", uneven)
        if self.model.fast_inference and self.lora.r > self.model.max_lora_rank:
            raise _Combination(
                "lora.r",
                f"lora.r = {self.lora.r} is above model.max_lora_rank = {self.model.max_lora_rank}; "
                f"vLLM cannot serve it: raise model.max_lora_rank or lower lora.r",
            )
        if self.data.generator and not self.data.source.startswith("builtin:"):
            raise _Combination(
                "data.generator",
                f"only builtin:arithmetic and builtin:countdown take generator parameters, not "
                f"data.source = {self.data.source!r}; remove data.generator or use a builtin source",
            )
        if self.model.fast_inference and self.data.max_prompt_length + g.max_completion_length > self.model.max_seq_length:
            raise _Combination(  # vLLM's max_model_len is max_seq_length: a longer sequence is refused there
                "generation.max_completion_length",
                f"data.max_prompt_length {self.data.max_prompt_length} + generation.max_completion_length "
                f"{g.max_completion_length} is longer than model.max_seq_length = {self.model.max_seq_length}, "
                f"vLLM's limit with fast_inference; lower one of them or raise model.max_seq_length",
            )
        if not self.rewards and kind.rewarded:
            raise _Combination("rewards", "the recipe has no [[rewards]]: add at least one reward table")
        if g.vllm_mode == "server" and not g.use_vllm:
            raise _Combination("generation.vllm_mode", "vllm_mode = 'server' needs generation.use_vllm = true")
        _check_grpo_controls(self)
        return self

    # Numbers the run will use, shown by --dry-run and the live display.
    def prompts_per_step(self) -> int:
        """Across all processes (distributed.nproc): TRL's generation batch is per-device x accumulation x world."""
        t = self.training
        return t.per_device_train_batch_size * t.gradient_accumulation_steps * self.distributed.nproc // t.num_generations

    def run_dir(self) -> Path:
        return Path(self.output.dir) if self.output.dir else Path("runs") / self.name


def _check_grpo_controls(recipe: "Recipe") -> None:
    """The combinations TRL 1.15's GRPOConfig/GRPOTrainer refuse, refused here first (so --dry-run does)."""
    t, g = recipe.training, recipe.generation
    if t.loss_type == "luspo" and t.importance_sampling_level != "sequence":
        raise _Combination("training.loss_type", "loss_type = 'luspo' needs training.importance_sampling_level = "
                                                 "'sequence' (it is a GSPO variant)")
    lo, hi = g.vllm_importance_sampling_clip_min, g.vllm_importance_sampling_clip_max
    if lo is not None and hi is not None and lo >= hi:
        raise _Combination("generation.vllm_importance_sampling_clip_min",
                           f"vllm_importance_sampling_clip_min = {lo} must be below clip_max = {hi}")
    truncate = g.vllm_importance_sampling_mode.endswith("_truncate")
    if g.vllm_importance_sampling_correction and truncate and lo is None and hi is None:
        raise _Combination("generation.vllm_importance_sampling_clip_max",
                           f"vllm_importance_sampling_mode = '{g.vllm_importance_sampling_mode}' needs "
                           f"vllm_importance_sampling_clip_max or _clip_min")
    if (t.loss_type == "vespo" and g.use_vllm and g.vllm_importance_sampling_correction
            and not g.vllm_importance_sampling_mode.startswith("token_")):
        raise _Combination("generation.vllm_importance_sampling_mode",
                           "loss_type = 'vespo' with vLLM needs vllm_importance_sampling_mode = 'token_truncate' "
                           "or 'token_mask'")
    if t.dynamic_sampling_reward is not None:
        names = [e.name for e in recipe.rewards]
        if t.dynamic_sampling == "off":
            raise _Combination("training.dynamic_sampling_reward", "dynamic_sampling_reward needs "
                                                                   "training.dynamic_sampling = 'skip' or 'refill'")
        if t.dynamic_sampling_reward not in names:
            raise _Combination("training.dynamic_sampling_reward",
                               f"dynamic_sampling_reward = {t.dynamic_sampling_reward!r} is not one of this "
                               f"recipe's rewards ({', '.join(names)})")
    if t.delta is not None and t.delta <= 1 + (t.epsilon_high or t.epsilon):
        raise _Combination("training.delta", f"delta = {t.delta} must be above 1 + epsilon_high "
                                             f"({1 + (t.epsilon_high or t.epsilon):g}), or it clips every update")


class _Combination(ValueError):
    """An impossible combination of settings, carrying the key to blame."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message


# --------------------------------------------------------------------------------------------------
# Loading, overrides and one-line errors


def load_recipe(path: str | Path, overrides: list[str] | None = None, check_rewards: bool = True) -> Recipe:
    """Read a TOML recipe, apply `section.key=value` overrides, validate everything."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a recipe; pass the path of a .toml file (see recipes/)")
    if not path.is_file():
        raise UserError(f"{path}: recipe not found; pass the path of a .toml file (see recipes/)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e}); fix the syntax at that line") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass a TOML recipe") from None
    if "stages" in raw:
        raise UserError(f"{path}: a multi-stage recipe ([[stages]]): `lowmem-r1 train` runs it; other commands take "
                        f"a single-stage recipe or a stage's run directory (runs/<name>/<stage>)")
    raw.setdefault("name", path.stem)
    return recipe_from_dict(raw, source=str(path), overrides=overrides, check_rewards=check_rewards)


def recipe_from_dict(
    raw: dict, source: str = "<recipe>", overrides: list[str] | None = None, check_rewards: bool = True
) -> Recipe:
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    _check_int64(raw, source)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(_one_line(e, source, raw)) from None
    except _Combination as e:  # raised directly when pydantic does not wrap it
        raise UserError(f"{source}: {e.key}: {e.message}") from None
    try:
        check_name(recipe.model.name)
    except UserError as e:
        raise UserError(f"{source}: model.name: {e}") from None
    check_model_sizes(recipe, source)
    try:
        check_local(recipe.data)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    if check_rewards:
        check_recipe_rewards(recipe, source)
    check_prompt(recipe, source)
    STAGES[recipe.stage].check_data(recipe, source)
    return recipe


INT64_MAX = 2**63 - 1


def _check_int64(node: Any, source: str, key: str = "") -> None:
    """A count beyond int64 overflows torch and numpy later; say so now, naming the key."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_int64(v, source, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_int64(v, source, f"{key}.{i}")
    elif isinstance(node, int) and not isinstance(node, bool) and abs(node) > INT64_MAX:
        raise UserError(f"{source}: {key} = {node}: too large (above 2^63-1); use a realistic value")


def check_model_sizes(recipe: Recipe, source: str) -> None:
    """Settings that cannot work with this model, from its config.json when it is a local folder (or the
    builtin's cached one): a LoRA rank above the hidden size, a sequence longer than its positions."""
    name = recipe.model.name
    folder = builtin_cache_path(name) if name in BUILTINS else Path(name).expanduser()
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        cfg = cfg.get("text_config") or cfg
    except (OSError, ValueError, AttributeError):
        return  # a hub id, or not converted yet: the load says it
    hidden, positions = cfg.get("hidden_size"), cfg.get("max_position_embeddings")
    if isinstance(hidden, int) and recipe.lora.r > hidden:
        raise UserError(f"{source}: lora.r = {recipe.lora.r} is above {name}'s hidden size {hidden}; a LoRA rank "
                        f"cannot exceed it: lower lora.r (8-64 is usual)")
    longest = recipe.data.max_prompt_length + recipe.generation.max_completion_length
    if isinstance(positions, int) and longest > positions:
        raise UserError(f"{source}: generation.max_completion_length: data.max_prompt_length "
                        f"{recipe.data.max_prompt_length} + max_completion_length "
                        f"{recipe.generation.max_completion_length} = {longest} tokens is longer than {name} can "
                        f"read (max_position_embeddings {positions}); lower them")


def check_recipe_rewards(recipe: Recipe, source: str) -> None:
    """Unknown reward names, bad parameters and missing dataset columns fail here, not at step 1."""
    available = get_task(recipe.data).reward_columns(recipe.data)
    for i, entry in enumerate(recipe.rewards):
        key = f"rewards[{i}] ({entry.name})"
        try:
            spec = rewards.check(entry.name, entry.params)
        except UserError as e:
            raise UserError(f"{source}: {key}: {e}") from None
        if available is not None:
            missing = [c for c in spec.columns if c not in available]
            if missing:
                raise UserError(
                    f"{source}: {key}: needs dataset column(s) {missing}, but task '{recipe.data.task}' gives "
                    f"{sorted(available)}; choose another reward or map the columns in data.columns"
                )


def apply_override(raw: dict, item: str) -> None:
    """`training.learning_rate=1e-5`, `rewards.0.weight=2`, `model.name=Qwen/Qwen2.5-0.5B-Instruct`."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value, e.g. --set training.max_steps=10")
    dotted, text = item.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise UserError(f"--set {item!r}: empty key; expected section.key=value")
    value = _parse_value(text.strip())
    node: Any = raw
    for depth, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, k, item)
        else:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, (dict, list)):
                raise UserError(f"--set {item!r}: {'.'.join(keys[: depth + 1])} is a value, not a section")
            node = nxt
    last = keys[-1]
    if isinstance(node, list):
        idx = _index(last, node, item)
        node[idx] = value
    else:
        node[last] = value


def _list_item(node: list, k: str, item: str):
    return node[_index(k, node, item)]


def _index(k: str, node: list, item: str) -> int:
    if not k.isdigit() or int(k) >= len(node):
        raise UserError(f"--set {item!r}: {k!r} is not an index of a list with {len(node)} entries")
    return int(k)


def _parse_value(text: str) -> Any:
    """TOML literal when it parses as one (numbers, booleans, arrays, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


_FIXES = {
    "extra_forbidden": "remove it or check its spelling",
    "missing": "add it",
    "literal_error": "use one of the allowed values",
}


def _one_line(err: ValidationError, source: str, raw: dict) -> str:
    e = err.errors()[0]
    loc = e.get("loc", ())
    key = _format_loc(loc, raw)
    msg = e.get("msg", "invalid")
    ctx = e.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, _Combination):
        return f"{source}: {inner.key}: {inner.message}"
    if e.get("type") == "extra_forbidden":
        return f"{source}: {key}: unknown key; {_FIXES['extra_forbidden']}{_suggest(loc)}"
    value = e.get("input")
    shown = "" if isinstance(value, dict) or value is None else f" (got {value!r})"
    fix = _FIXES.get(e.get("type", ""), "fix the value")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{shown}; {fix}{more}"


def _format_loc(loc: tuple, raw: dict) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        else:
            parts.append(str(p))
    return ".".join(parts) or "<top level>"


def _suggest(loc: tuple) -> str:
    """Name the closest known key, so `learning_rat` points at `learning_rate`."""
    import difflib

    model: Any = Recipe
    for p in loc[:-1]:
        if isinstance(p, int):
            continue
        field = getattr(model, "model_fields", {}).get(p)
        if field is None:
            return ""
        model = field.annotation
        model = getattr(model, "__args__", (model,))[0] if not hasattr(model, "model_fields") else model
    names = list(getattr(model, "model_fields", {}))
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(names)})"


def recipe_to_toml(recipe: Recipe) -> str:
    """The resolved recipe, as it will be saved in the run directory."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    return _dump_toml(data)


def _dump_toml(data: dict) -> str:
    import json

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{_key(k)} = {val(x)}" for k, x in v.items()) + " }"
        raise TypeError(type(v))

    lines: list[str] = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in data.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    for k, v in data.items():
        if k not in tables and k not in arrays:
            lines.append(f"{_key(k)} = {val(v)}")
    for k, v in tables.items():
        lines.append(f"\n[{k}]")
        lines.extend(f"{_key(kk)} = {val(vv)}" for kk, vv in v.items())
    for k, v in arrays.items():
        for item in v:
            lines.append(f"\n[[{k}]]")
            lines.extend(f"{_key(kk)} = {val(vv)}" for kk, vv in item.items())
    return "\n".join(lines) + "\n"


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else f'"{k}"'
