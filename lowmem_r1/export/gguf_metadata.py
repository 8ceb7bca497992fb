"""GGUF metadata, as llama.cpp's converter writes it: architecture hyperparameters, RoPE scaling,
general.size_label, key/value length, file type, and the tokenizer (BPE vocab, merges, token types,
special ids, add_bos/add_eos, pre-tokenizer id, the chat template - transformers 5 keeps it in
chat_template.jinja). Read from config.json and tokenizer.json alone: no transformers import here.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from lowmem_r1.core.errors import UserError
from lowmem_r1.export.gguf_plan import FILE_TYPES, ModelSpec

# llama.cpp names the BPE pre-tokenizer by hashing the token ids of this text (its
# convert_hf_to_gguf_update.py); the hashes of the tokenizers this toolkit trains are listed here.
_CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
_PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# Special tokens llama.cpp has a key for (tokenizer.ggml.<type>_token_id).
SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")
_SPACE = {ord(" "): ord(" ") + 256}


# --------------------------------------------------------------------------------------------------
# the model


def rope_metadata(writer, gguf, cfg: dict) -> list:
    """RoPE scaling keys; llama3-type scaling becomes a rope_freqs tensor (as llama.cpp writes it),
    returned as (gguf name, tensor) for the plan."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta"))
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    rtype = (rope.get("rope_type") or rope.get("type") or "default").lower()
    if rtype in ("default", "none"):
        return []
    if rtype == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return []
    if rtype == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return []
    if rtype == "llama3":
        return [("rope_freqs.weight", _llama3_rope_factors(cfg, rope, float(theta)))]
    raise UserError(f"config.json rope type {rtype!r}: not supported by this GGUF exporter "
                    "(default, linear, yarn, llama3 are)")


def _llama3_rope_factors(cfg: dict, rope: dict, theta: float):
    import torch

    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            factors.append(1.0)
        elif wavelen > old / lo:
            factors.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def model_metadata(writer, gguf, cfg: dict, spec: ModelSpec, n_params: int, qtype: str, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(n_params, 0, 0, 0))
    writer.add_block_count(spec.n_layers)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_kv)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[qtype]))
    if spec.is_llama:
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(spec.head_dim)


# --------------------------------------------------------------------------------------------------
# the tokenizer


def vocab_metadata(writer, gguf, model_dir: Path, cfg: dict, is_llama: bool, log) -> dict:
    """Tokens, token types, merges, special ids, add_bos/add_eos and the chat template, from
    tokenizer.json parsed once (no transformers import on this path). Not gguf's SpecialVocab: it parses
    tokenizer.json a second time, converts merges a character at a time (~0.3 s together for a 49k
    vocabulary, more than writing the model's tensors) and guesses add_bos from the post-processor
    template, where this reads what the tokenizer really does."""
    from tokenizers import Tokenizer

    tok_json = model_dir / "tokenizer.json"
    text = tok_json.read_text(encoding="utf-8") if tok_json.is_file() else ""
    data = json.loads(text) if text else {}
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"{model_dir}: GGUF export supports byte-level BPE tokenizers (tokenizer.json, as "
                        "SmolLM2, Llama 3 and Qwen use); this model's tokenizer is not one")
    tok = Tokenizer.from_str(text)
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    vocab = {**model["vocab"], **{a["content"]: i for i, a in added.items()}}
    tokens, types = _token_table(gguf, model_dir, vocab, added, cfg["vocab_size"])
    pre = _pre_tokenizer(tok, log)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    tcfg_file = model_dir / "tokenizer_config.json"
    tcfg = json.loads(tcfg_file.read_text(encoding="utf-8")) if tcfg_file.is_file() else {}
    if is_llama and tcfg.get("add_prefix_space") is not None:  # llama.cpp's llama converter writes it
        writer.add_add_space_prefix(bool(tcfg["add_prefix_space"]))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = bpe_merges(model)
    if merges:
        writer.add_token_merges(merges)
    else:
        log("  warning: tokenizer.json has no BPE merges; llama.cpp will tokenize character by character")
    ids = _special_ids(writer, tok, vocab, tcfg, cfg)
    template = chat_template(model_dir, tcfg)
    if template is None:
        log("  warning: no chat template found; llama.cpp and Ollama will fall back to a guess")
    else:
        writer.add_chat_template(template)
    return {"pre": pre, "chat_template": template, "eos": ids.get("eos")}


def _token_table(gguf, model_dir: Path, vocab: dict, added: dict, vocab_size: int) -> tuple[list, list]:
    """(token strings, token types) for every id below vocab_size; unused ids become [PAD<i>]."""
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"{model_dir}: tokenizer has ids up to {max(vocab.values())} but the model's vocab_size "
                        f"is {vocab_size}; the embedding was not resized to the tokenizer")
    TT = gguf.TokenType
    tokens: list = [None] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    types = [TT.NORMAL] * vocab_size
    for i in [i for i, t in enumerate(tokens) if t is None]:
        tokens[i], types[i] = f"[PAD{i}]", TT.UNUSED
    for i, a in added.items():  # like llama.cpp: special, or looks like <|...|>, is a control token
        t = a["content"]
        types[i] = TT.CONTROL if a.get("special") or (t.startswith("<|") and t.endswith("|>")) else TT.USER_DEFINED
    return tokens, types


def _pre_tokenizer(tok, log) -> str:
    chkhsh = hashlib.sha256(str(tok.encode(_CHKTXT).ids).encode()).hexdigest()
    pre = _PRE_BY_HASH.get(chkhsh)
    if pre is None:
        pre = "default"
        log(f"  warning: pre-tokenizer not recognised (hash {chkhsh[:12]}); wrote 'default' - llama.cpp may "
            "split some text differently from transformers")
    return pre


def _special(cfg: dict, key: str):
    v = cfg.get(key)
    return v.get("content") if isinstance(v, dict) else v


def _special_ids(writer, tok, vocab: dict, tcfg: dict, cfg: dict) -> dict[str, int]:
    """Special ids: the tokenizer's own (tokenizer_config.json), else config.json's. The tokenizer's eos is
    the end-of-turn token of chat models, which is what generation must stop at."""
    vocab_size = cfg["vocab_size"]
    ids = {}
    for typ in SPECIAL_TYPES:
        tid = vocab.get(_special(tcfg, f"{typ}_token"))
        if tid is None and isinstance(cfg.get(f"{typ}_token_id"), int):
            tid = cfg[f"{typ}_token_id"]
        if tid is not None and 0 <= tid < vocab_size:
            ids[typ] = tid
            getattr(writer, f"add_{typ}_token_id")(tid)
    enc = tok.encode("a").ids  # whether BOS/EOS are added: what the tokenizer does, not a guess
    writer.add_add_bos_token("bos" in ids and enc[:1] == [ids["bos"]])
    writer.add_add_eos_token("eos" in ids and enc[-1:] == [ids["eos"]])
    return ids


def chat_template(model_dir: Path, tcfg: dict):
    """tokenizer_config.json's template, else chat_template.jinja (transformers 5; with any named
    templates in additional_chat_templates/), else chat_template.json. A list means named templates."""
    if isinstance(tcfg.get("chat_template"), (str, list)):
        return tcfg["chat_template"]
    jinja, as_json = model_dir / "chat_template.jinja", model_dir / "chat_template.json"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
        named = sorted((model_dir / "additional_chat_templates").glob("*.jinja"))
        if named:
            return [{"name": "default", "template": template}] + [
                {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in named]
        return template
    if as_json.is_file():
        return json.loads(as_json.read_text(encoding="utf-8")).get("chat_template")
    return None


def bpe_merges(model: dict) -> list[str] | None:
    """The BPE merges as llama.cpp stores them, "left right". tokenizer.json has them as such strings or
    (since tokenizers 0.20) as [left, right] pairs; a space inside a part is written as chr(32 + 256),
    as llama.cpp's converter does."""
    merges = model.get("merges")
    if not isinstance(merges, list) or not merges:
        return None
    if isinstance(merges[0], str):
        return merges
    if any(" " in a or " " in b for a, b in merges):
        return [f"{a.translate(_SPACE)} {b.translate(_SPACE)}" for a, b in merges]
    return [f"{a} {b}" for a, b in merges]
