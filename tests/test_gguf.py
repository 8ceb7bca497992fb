"""GGUF export: layout llama.cpp expects (names, types, q/k permutation, metadata), round trips through
transformers' GGUF loader for llama (the embedded SmolLM2), qwen2 and qwen3, and the Ollama Modelfile."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from lowmem_r1.core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory, base_model_dir) -> Path:
    """A 317-token byte-level BPE with ChatML specials and SmolLM2's chat template: the 49k-token vocab
    would make every GGUF read-back (pure-Python gguf reader) take seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(["What is 3 + 5? The answer is 8.", "The capital of France is Paris.",
                             "def fibonacci(n):\n    return n"] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tok.chat_template = (base_model_dir / "chat_template.jinja").read_text()
    out = tmp_path_factory.mktemp("tinytok")
    tok.save_pretrained(out)
    return out


def _tiny(path: Path, model_type: str, tokenizer_from: Path, **kw) -> Path:
    """A random 2-layer model of a real architecture (no such weights offline); vocab 320 > the tokenizer's
    317 tokens, so the padding entries are exercised too."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=320, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               initializer_range=0.2, **{"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, **kw})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_from / name, path / name)
    return path


def test_smollm2_layout_and_metadata(base_model_dir, tmp_path):
    """The embedded model's file (its transformers round trip runs in test_merge on the merged model)."""
    from lowmem_r1.export.gguf import export, read_back

    rep = export(base_model_dir, tmp_path / "model-f16.gguf", "f16", verify=False, log=lambda s: None)
    info = read_back(rep.path)
    t = info["tensors"]
    assert len(t) == 272 and "output.weight" not in t  # tied embeddings: no output layer
    assert t["token_embd.weight"] == "F16" and t["blk.0.attn_q.weight"] == "F16"
    assert t["blk.0.attn_norm.weight"] == "F32" and t["output_norm.weight"] == "F32"
    assert info["arch"] == "llama" and info["size_label"] == "135M"
    assert info["key_length"] == 64 and info["value_length"] == 64
    assert info["chat_template"] == (base_model_dir / "chat_template.jinja").read_text()
    assert info["eos"] == 2 and info["add_bos"] is False  # <|im_end|>; SmolLM2 adds no BOS
    assert info["n_tokens"] == 49152


def test_llama_qk_permutation_matches_llama_cpp_layout(tiny_tokenizer, tmp_path):
    """GGML keeps each head's rotary pairs adjacent: row 2i / 2i+1 of a head = HF rows i / i + d/2."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    from lowmem_r1.export.gguf import export

    model = _tiny(tmp_path / "llama", "llama", tiny_tokenizer)
    path = export(model, tmp_path / "f32.gguf", "f32", verify=False, log=lambda s: None).path
    r = gguf.GGUFReader(str(path))
    got = {t.name: np.asarray(t.data) for t in r.tensors if t.name in ("blk.1.attn_q.weight", "blk.1.attn_k.weight",
                                                                      "blk.1.attn_v.weight")}
    with safe_open(str(model / "model.safetensors"), "np") as f:
        hf = {k: f.get_tensor(f"model.layers.1.self_attn.{k}_proj.weight") for k in "qkv"}
    for key, n_head in (("q", 4), ("k", 2)):
        w, d = hf[key], 16
        expect = np.empty_like(w)
        for h in range(n_head):
            for i in range(d // 2):
                expect[h * d + 2 * i] = w[h * d + i]
                expect[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
        assert np.array_equal(got[f"blk.1.attn_{key}.weight"], expect), key
    assert np.array_equal(got["blk.1.attn_v.weight"], hf["v"])  # v is not permuted


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": False}),
    # transformers' GGUF loader ignores qwen3.attention.key_length and assumes Qwen3's head_dim of 128
    # (true of every released Qwen3), so the tiny model uses 128 too.
    ("qwen3", {"tie_word_embeddings": True, "head_dim": 128}),
])
def test_round_trip_through_transformers(model_type, extra, tiny_tokenizer, tmp_path):
    """F32 must reproduce the model exactly (logits, greedy tokens); Q8_0 within its tolerance."""
    from lowmem_r1.export.gguf import export, read_back

    model = _tiny(tmp_path / model_type, model_type, tiny_tokenizer, **extra)
    for qtype in ("f32", "q8_0"):
        rep = export(model, tmp_path / f"{model_type}-{qtype}.gguf", qtype, log=lambda s: None)
        assert "top-1 agreement" in rep.check
        if qtype == "f32":
            assert "greedy tokens identical" in rep.check
        t = read_back(rep.path)["tensors"]
        assert ("output.weight" in t) == (not extra["tie_word_embeddings"])
        assert t["blk.0.ffn_down.weight"] == qtype.upper()
        if model_type == "qwen2":
            assert t["blk.0.attn_q.bias"] == "F32" and t["blk.1.attn_k.bias"] == "F32"
        elif model_type == "qwen3":
            assert t["blk.0.attn_q_norm.weight"] == "F32" and t["blk.1.attn_k_norm.weight"] == "F32"
    info = read_back(rep.path)
    assert info["arch"] == model_type and info["key_length"] == extra.get("head_dim", 16)
    assert info["n_tokens"] == 320 and info["eos"] == 2


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_row_chunks_give_the_bytes_of_whole_tensors(qtype, tiny_tokenizer, tmp_path, monkeypatch):
    """Tensors are converted a few rows at a time; a chunk of one row must give the same file as one
    chunk per tensor (the llama q/k permutation included)."""
    import lowmem_r1.export.gguf_stream as stream
    from lowmem_r1.export.gguf import export

    model = _tiny(tmp_path / "llama", "llama", tiny_tokenizer, tie_word_embeddings=False)
    files = []
    for chunk in (1 << 30, 1):
        monkeypatch.setattr(stream, "CHUNK_BYTES", chunk)
        files.append(export(model, tmp_path / f"{chunk}.gguf", qtype, verify=False, log=lambda s: None).path)
    assert files[0].read_bytes() == files[1].read_bytes()


def test_tokenizer_metadata_sources(tiny_tokenizer, tmp_path):
    """Special ids fall back to config.json; tokenizer_config.json's chat template wins over the .jinja
    file; named templates in additional_chat_templates/ are written beside the default."""
    import gguf

    from lowmem_r1.export.gguf import export

    model = _tiny(tmp_path / "llama", "llama", tiny_tokenizer, pad_token_id=0)
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    del tcfg["pad_token"]
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
    (model / "additional_chat_templates").mkdir()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    r = gguf.GGUFReader(str(export(model, tmp_path / "a.gguf", "f32", verify=False, log=lambda s: None).path))
    value = lambda key: r.get_field(key).contents() if r.get_field(key) else None  # noqa: E731
    assert value("tokenizer.ggml.padding_token_id") == 0  # config.json's pad_token_id
    assert value("tokenizer.ggml.eos_token_id") == 2 and value("tokenizer.ggml.bos_token_id") == 1
    assert value("tokenizer.chat_template") == (model / "chat_template.jinja").read_text()
    assert value("tokenizer.chat_template.tool_use") == "{{ tools }}"

    tcfg["chat_template"] = "{{ messages }}"
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
    r = gguf.GGUFReader(str(export(model, tmp_path / "b.gguf", "f32", verify=False, log=lambda s: None).path))
    assert r.get_field("tokenizer.chat_template").contents() == "{{ messages }}"
    from lowmem_r1.export.gguf import read_back, verify_gguf  # the check expects what was written

    with pytest.raises(UserError, match="chat_template differs"):
        verify_gguf(tmp_path / "a.gguf", model, "f32")
    assert "tensors read back" in verify_gguf(tmp_path / "b.gguf", model, "f32")
    assert read_back(tmp_path / "b.gguf")["chat_template"] == "{{ messages }}"


def test_unknown_and_kquant_types(monkeypatch):
    from lowmem_r1.export.gguf import parse_types

    assert parse_types("f16, Q8_0") == ["f16", "q8_0"]
    assert parse_types(["f16", "bf16,f16"]) == ["f16", "bf16"]
    with pytest.raises(UserError, match="q3_xyz: unknown GGUF type"):
        parse_types("q3_xyz")
    monkeypatch.delenv("LLAMA_QUANTIZE", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(UserError, match="llama-quantize.*not on PATH"):
        parse_types("q4_k_m")


def test_unsupported_architecture(tmp_path):
    from lowmem_r1.export.gguf import export

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="GPT2LMHeadModel.*supports"):
        export(tmp_path, tmp_path / "x.gguf", "f16", log=lambda s: None)


def test_modelfile_template_renders_like_the_jinja_template(base_model_dir):
    """Expand the Go template's range loop by hand and compare with the model's own Jinja rendering."""
    from transformers import AutoTokenizer

    from lowmem_r1.export.ollama import modelfile_text

    text = modelfile_text(base_model_dir, "model-q8_0.gguf")
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    body = template.split("{{- range .Messages }}", 1)[1].split("{{ end }}", 1)[0]
    tail = template.split("{{ end }}", 1)[1]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 5?"},
                {"role": "assistant", "content": "8"}, {"role": "user", "content": "And 4 + 4?"}]
    go = "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"]) for m in messages)
    tok = AutoTokenizer.from_pretrained(base_model_dir)
    assert go + tail == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_ollama_rejects_unknown_template(base_model_dir, tmp_path):
    from lowmem_r1.export.ollama import modelfile_text

    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_model_dir / name, d / name)
    (d / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(UserError, match="neither ChatML nor Llama 3"):
        modelfile_text(d, "x.gguf")


@pytest.mark.skipif(shutil.which("llama-quantize") is None, reason="llama.cpp's llama-quantize is not on PATH")
def test_kquant_with_llama_quantize(base_model_dir, tmp_path):
    from lowmem_r1.export.gguf import export, read_back

    rep = export(base_model_dir, tmp_path / "model-q4_k_m.gguf", "q4_k_m", log=lambda s: None)
    assert "Q4_K" in set(read_back(rep.path)["tensors"].values())


@pytest.mark.skipif(not os.environ.get("LLAMA_CPP_CONVERT"),
                    reason="set LLAMA_CPP_CONVERT=/path/to/llama.cpp/convert_hf_to_gguf.py to compare with it")
@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_tensors_identical_to_llama_cpp_converter(base_model_dir, tmp_path, qtype):
    """Same tensor names, order, types, shapes and bytes as llama.cpp's own converter."""
    import subprocess
    import sys

    import gguf
    import numpy as np

    from lowmem_r1.export.gguf import export

    ref = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, os.environ["LLAMA_CPP_CONVERT"], str(base_model_dir), "--outtype", qtype,
                    "--outfile", str(ref)], check=True, capture_output=True)
    ours = export(base_model_dir, tmp_path / "ours.gguf", qtype, verify=False, log=lambda s: None).path
    a, b = gguf.GGUFReader(str(ref)), gguf.GGUFReader(str(ours))
    assert [(t.name, t.tensor_type, tuple(t.shape)) for t in a.tensors] == \
        [(t.name, t.tensor_type, tuple(t.shape)) for t in b.tensors]
    assert all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.tensors, b.tensors))


def test_ollama_model_name_from_the_run(tmp_path):
    from lowmem_r1.export.ollama import model_name

    assert model_name(tmp_path / "runs" / "demo" / "merged") == "demo"
    assert model_name(tmp_path / "My Model v2") == "my-model-v2"
    assert model_name(tmp_path / "日本") == "my-model"
