"""Load a trained (or any) model for generation and generate from it: the one path `chat`, `eval` and
`scripts/bench_generate.py` share.

A MODEL is a run directory (base + LoRA adapter), a merged folder, a .gguf file, a hub id or a builtin
alias. On CPU generation is plain transformers `generate` (an adapter is merged into the weights: same
logits, no LoRA matmuls per token). On a GPU, vLLM serves batched eval and Unsloth's inference mode
serves chat, when installed.
"""

from __future__ import annotations

import gc
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.generation.shared_prefill import generate_sharing_prompts
from lowmem_r1.models import vllm_cpu
from lowmem_r1.models.backends import unsloth as unsloth_backend
from lowmem_r1.models.names import load_tokenizer as _load_tokenizer
from lowmem_r1.models.names import resolve_model
from lowmem_r1.models.precision import nf4_config, torch_dtype
from lowmem_r1.runs.rundir import find_trained

ENGINES = ("auto", "hf", "unsloth", "vllm")


@dataclass(frozen=True)
class ModelRef:
    """What to load: a base model (folder or hub id) and optionally a LoRA adapter on top."""

    base: str
    adapter: Path | None = None
    run_dir: Path | None = None
    label: str = ""
    load_in_4bit: bool = False

    def base_only(self) -> ModelRef:
        return ModelRef(self.base, None, None, f"{self.base} (base)", self.load_in_4bit)


@dataclass
class Decoding:
    """How one generate call decodes (eval, chat, sample); temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int | None = None


@dataclass
class Completion:
    text: str
    tokens: int
    """Generated tokens, the end-of-turn token included (as TRL counts completions/mean_length)."""
    clipped: bool
    """Stopped by max_new_tokens rather than by an end-of-turn token."""
    ids: list[int] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Which model


def resolve_ref(name: str | Path | None, root: Path = Path("runs")) -> ModelRef:
    """A ModelRef for a run dir, an adapter folder, a merged folder, a .gguf, a hub id or an alias;
    None means the newest run or merged model under `root`."""
    if name is None:
        name = newest_model(root)
    trained = find_trained(name)
    if trained is None:
        return ModelRef(resolve_model(str(name)), None, None, str(name))
    if not trained.base:
        raise UserError(f"{trained.adapter}/adapter_config.json: no base_model_name_or_path; pass the run directory")
    return ModelRef(resolve_model(trained.base), trained.adapter, trained.run_dir, str(name), trained.load_in_4bit)


def newest_model(root: Path = Path("runs")) -> Path:
    """The most recently written run directory or merged model folder under `root` (two levels deep)."""
    root = Path(root)
    found = []
    if root.is_dir():
        for marker in ("*/run.json", "*/config.json", "*/*/config.json"):
            found += [p for p in root.glob(marker) if not p.parent.name.startswith(".")]
    if not found:
        raise UserError(
            f"no trained model found in {root}/; train one (lowmem-r1 train recipes/demo.toml) or name a MODEL"
        )
    return max(found, key=lambda p: p.stat().st_mtime).parent


# --------------------------------------------------------------------------------------------------
# Which engine


def choose_engine(requested: str, *, cuda: bool, has_vllm: bool, has_unsloth: bool, streaming: bool,
                  vllm_cpu_problem: str | None = "not checked") -> str:
    """vLLM for batched generation on a GPU (it cannot stream token by token through its offline API),
    Unsloth's inference mode on a GPU otherwise, transformers everywhere else. On a CPU, vLLM's CPU build
    only when asked for (--engine vllm: its ~40 s start pays off for long evals), whole replies in chat."""
    if requested not in ENGINES:
        raise UserError(f"--engine {requested}: unknown; use one of {', '.join(ENGINES)}")
    if requested == "hf":
        return "hf"
    if requested == "vllm" and not cuda:
        if has_vllm and vllm_cpu_problem is None:
            return "vllm"
        raise UserError(f"--engine vllm: needs a CUDA GPU (none found) or vLLM's CPU build "
                        f"({vllm_cpu_problem or 'not installed'}); use --engine hf (or auto)")
    if requested in ("vllm", "unsloth"):
        if not cuda:
            raise UserError(f"--engine {requested}: needs a CUDA GPU; none found. Use --engine hf (or auto)")
        if not (has_vllm if requested == "vllm" else has_unsloth):
            raise UserError(f"--engine {requested}: the package is not installed; pip install {requested}")
        if requested == "vllm" and streaming:
            raise UserError("--engine vllm: chat streams tokens, which vLLM's offline API cannot; use unsloth or hf")
        return requested
    if cuda and has_vllm and not streaming:
        return "vllm"
    if cuda and has_unsloth:
        return "unsloth"
    return "hf"


def select_engine(requested: str = "auto", streaming: bool = False) -> str:
    import torch

    return choose_engine(
        requested,
        cuda=torch.cuda.is_available(),
        has_vllm=importlib.util.find_spec("vllm") is not None,
        has_unsloth=importlib.util.find_spec("unsloth") is not None,
        streaming=streaming,
        vllm_cpu_problem=vllm_cpu.usable(),
    )


# --------------------------------------------------------------------------------------------------
# Loading


@dataclass
class Generator:
    """A loaded model + tokenizer behind one `generate` / `stream` interface."""

    ref: ModelRef
    tokenizer: object
    model: object = None
    engine: str = "hf"
    llm: object = None  # vLLM engine
    lora: object = None  # vLLM LoRARequest
    extra: dict = field(default_factory=dict)

    # -- prompts ---------------------------------------------------------------------------------
    def encode(self, prompt) -> list[int]:
        """Token ids exactly as TRL's GRPOTrainer builds them: a conversation gets the chat template and
        a generation prompt; a plain string (already rendered, e.g. with an assistant prefix) is tokenized."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            return list(tok(text=prompt)["input_ids"])
        if getattr(tok, "chat_template", None) is None:
            raise UserError(f"{self.ref.label}: the tokenizer has no chat template; pass a chat/instruct model")
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return list(ids)

    @property
    def stop_ids(self) -> set[int]:
        ids = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            tid = getattr(src, "eos_token_id", None) if src is not None else None
            if tid is not None:
                ids.update(tid if isinstance(tid, (list, tuple)) else [tid])
        return ids

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: Decoding, n: int = 1) -> list[list[Completion]]:
        """n completions for each tokenized prompt (one batch: the caller chooses the batch size)."""
        if self.engine == "vllm":
            return self._generate_vllm(prompts, sampling, n)
        import torch

        inputs = self._left_pad([p for p in prompts for _ in range(n)])  # as num_return_sequences lays them out
        kwargs = self._hf_kwargs(sampling)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            if self.engine == "hf":
                out = generate_sharing_prompts(self.model.generate, self.model, **inputs, **kwargs)
            else:
                out = self.model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        done = [self._completion(row) for row in new]
        return [done[i * n:(i + 1) * n] for i in range(len(prompts))]

    def stream(self, prompt: list[int], sampling: Decoding, on_text: Callable[[str], None]) -> Completion:
        """Generate one completion, calling `on_text` with each piece of text as soon as it decodes to
        whole characters; returns the completion.

        Generation runs in the calling thread, not a helper thread with a queue: torch's OpenMP runtime
        gives every thread that computes its own team of workers, and once two teams exist on a machine
        with no spare cores, libgomp stops spin-waiting at its barriers - decoding ran 2x slower on 2 cores,
        and stayed slow in the main thread afterwards. Ctrl-C raises KeyboardInterrupt out of generate."""
        import torch
        from transformers import TextStreamer

        if self.engine == "vllm":  # not reached through select_engine(streaming=True); kept total anyway
            completion = self.generate([prompt], sampling)[0][0]
            on_text(completion.text)
            return completion

        class Streamer(TextStreamer):  # transformers' incremental decoding; the text goes to on_text
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    on_text(text)

        streamer = Streamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True,
                            clean_up_tokenization_spaces=False)
        inputs = self._left_pad([prompt])
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **self._hf_kwargs(sampling), streamer=streamer)
        completion = self._completion(out[0, inputs["input_ids"].shape[1]:].tolist())
        self.extra["last_completion"] = completion
        return completion

    def _left_pad(self, prompts: list[list[int]]) -> dict:
        import torch

        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = next(iter(self.stop_ids), 0)
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        device = getattr(self.model, "device", None)
        if device is not None:
            ids, mask = ids.to(device), mask.to(device)
        return {"input_ids": ids, "attention_mask": mask}

    def _hf_kwargs(self, s: Decoding) -> dict:
        from transformers import GenerationConfig

        pad = self.tokenizer.pad_token_id
        cfg = GenerationConfig(
            max_new_tokens=s.max_new_tokens,
            do_sample=s.temperature > 0,
            temperature=s.temperature if s.temperature > 0 else None,
            top_p=s.top_p if s.temperature > 0 else None,
            top_k=None,
            eos_token_id=sorted(self.stop_ids) or None,
            pad_token_id=pad if pad is not None else next(iter(self.stop_ids), None),
        )
        return {"generation_config": cfg}

    def _completion(self, ids: list[int]) -> Completion:
        stops = self.stop_ids
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        kept = ids if end is None else ids[: end + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return Completion(text=text, tokens=len(kept), clipped=end is None, ids=kept)

    def _generate_vllm(self, prompts, sampling: Decoding, n: int) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens, seed=sampling.seed,
        )
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=self.lora
        )
        return [
            [Completion(o.text, len(o.token_ids), o.finish_reason == "length", list(o.token_ids)) for o in req.outputs] for req in outs
        ]

    # -- lifetime --------------------------------------------------------------------------------
    def for_base(self) -> Generator:
        """The same model without its adapter: vLLM keeps its engine (no LoRA request); the others
        free this model first and load the base."""
        base = self.ref.base_only()
        if self.engine == "vllm":
            return replace(self, ref=base, lora=None)
        engine = self.engine
        self.close()
        return load_generator(base, engine)

    def close(self) -> None:
        self.model = None
        self.extra.clear()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def load_generator(ref: ModelRef, engine: str = "auto", streaming: bool = False, tokenizer=None) -> Generator:
    """Load `ref` for generation on the chosen engine, in eval mode (`tokenizer`: load_tokenizer(ref)
    when the caller already has it)."""
    engine = select_engine(engine, streaming=streaming) if engine == "auto" else engine
    if engine == "unsloth":  # before transformers is imported (by the tokenizer), or its patches miss
        unsloth_backend.prepare()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(ref)
    if engine == "vllm":
        return _load_vllm(ref, tokenizer)
    if engine == "unsloth":
        return _load_unsloth(ref, tokenizer)
    return Generator(ref, tokenizer, _load_hf(ref), "hf")


def load_tokenizer(ref: ModelRef):
    """The adapter folder's tokenizer when training saved one (it may carry a changed chat template)."""
    src = ref.adapter if ref.adapter and (Path(ref.adapter) / "tokenizer_config.json").is_file() else ref.base
    return _load_tokenizer(str(src), label=ref.label)


def _load_hf(ref: ModelRef):
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    kwargs: dict = {"dtype": torch_dtype("auto", cuda)}
    if ref.load_in_4bit and importlib.util.find_spec("bitsandbytes") is not None:
        # The adapter was trained against the 4-bit base: generate from the same weights (training's config).
        kwargs["quantization_config"] = nf4_config(kwargs["dtype"])
    if cuda:
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(ref.base, **kwargs)
    except OSError as e:
        raise UserError(f"model {ref.label}: cannot load {ref.base} ({e})") from None
    if ref.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ref.adapter))
        if "quantization_config" not in kwargs:
            model = model.merge_and_unload()  # same logits (to ~1e-4), no LoRA work per token
    model.eval()
    return model


def _load_unsloth(ref: ModelRef, tokenizer) -> Generator:
    import unsloth  # noqa: F401  (must come before transformers' models are built)
    from unsloth import FastLanguageModel

    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(ref.adapter or ref.base), load_in_4bit=ref.load_in_4bit
    )
    FastLanguageModel.for_inference(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return Generator(ref, tok, model, "unsloth")


def _load_vllm(ref: ModelRef, tokenizer) -> Generator:
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:
        vllm_cpu.configure()  # before vllm is imported
    from vllm import LLM

    kwargs: dict = {"model": ref.base, "tokenizer": ref.base, "gpu_memory_utilization": 0.8}
    if cpu:
        # The dtype transformers loads on a CPU (fp32), not vLLM's "auto" (the checkpoint's bf16): --engine
        # vllm then gives transformers' answers at temperature 0, only faster. A GPU keeps "auto" (bf16 on both).
        kwargs.update(enforce_eager=vllm_cpu.enforce_eager(), seed=0, dtype=torch_dtype("auto", cuda=False))
    lora = None
    if ref.adapter is not None:
        from vllm.lora.request import LoRARequest

        rank = int(json.loads((Path(ref.adapter) / "adapter_config.json").read_text()).get("r", 16))
        kwargs.update(enable_lora=True, max_lora_rank=1 << max(3, (rank - 1).bit_length()))  # vLLM: 8, 16, 32 ...
        lora = LoRARequest("adapter", 1, str(ref.adapter))
    return Generator(ref, tokenizer, None, "vllm", llm=LLM(**kwargs), lora=lora)
