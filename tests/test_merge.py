"""`lowmem-r1 merge`: streaming merge vs peft, the merged folder, GGUF + Modelfile end to end, error paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lowmem_r1.core.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def merged(lora_run_dir, tmp_path_factory):
    """One verified bf16 merge with F16 + Q8_0 GGUF and a Modelfile, shared by the tests below."""
    import torch

    torch.set_num_threads(1)
    from lowmem_r1.export.command import merge

    out = tmp_path_factory.mktemp("merge") / "merged"
    lines: list[str] = []
    result = merge(lora_run_dir, out=out, dtype="bf16", gguf="f16,q8_0", ollama=True, log=lines.append)
    return result, lines


def test_merge_matches_peft(merged, lora_run_dir):
    from lowmem_r1.export.parity import LOGIT_TOL

    result, lines = merged
    p = result.parity
    assert p is not None and p.ok
    assert p.max_diff <= LOGIT_TOL["bfloat16"]
    # the adapter really changes the model, and the merge reproduces that change, not the base
    assert p.adapter_effect > 0.05
    assert p.peft_diff < p.adapter_effect / 5
    assert any(line.startswith("parity") for line in lines)
    assert result.merge.merged == 120  # 30 layers x q/k/v/o


def test_merged_folder_is_a_normal_hf_model(merged, base_model_dir):
    import torch
    from safetensors.torch import load_file

    result, _ = merged
    out = result.out
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
                 "model.safetensors", "merge_info.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".merged.tmp-*"))  # renamed into place
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    # the library's own reader accepts our streamed file; LoRA targets changed, the rest did not
    ours = load_file(str(out / "model.safetensors"))
    base = load_file(str(base_model_dir / "model.safetensors"))
    assert set(ours) == set(base) and all(t.dtype == torch.bfloat16 for t in ours.values())
    q = "model.layers.3.self_attn.q_proj.weight"
    mlp = "model.layers.3.mlp.up_proj.weight"
    assert not torch.equal(ours[q], base[q].to(torch.bfloat16))
    assert torch.equal(ours[mlp], base[mlp].to(torch.bfloat16))


def test_merge_weights_equal_peft_merge_and_unload(lora_run_dir, base_model_dir, tmp_path):
    """fp32 merge, tensor by tensor against peft's merge_and_unload (the reference implementation)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowmem_r1.export.merge_lora import merge_weights, read_adapter

    merge_weights(base_model_dir, read_adapter(lora_run_dir / "adapter"), tmp_path, "float32")
    ours = load_file(str(tmp_path / "model.safetensors"))
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir),
                                    str(lora_run_dir / "adapter")).merge_and_unload().state_dict()
    worst = max(float((ours[k] - ref[k]).abs().max()) for k in ours)
    assert worst < 1e-6


def test_gguf_and_modelfile_written_and_checked(merged):
    result, _ = merged
    out = result.out
    assert [g.qtype for g in result.ggufs] == ["f16", "q8_0"]
    for g in result.ggufs:
        assert (out / g.path.name).is_file()
        assert "greedy tokens" in g.check and "top-1 agreement" in g.check
    assert result.ggufs[1].types == {"Q8_0": 211, "F32": 61}
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    info = json.loads((out / "merge_info.json").read_text())
    assert info["dtype"] == "bfloat16" and info["parity"]["ok"] is True


def test_existing_output_is_kept_without_force(merged, lora_run_dir):
    from lowmem_r1.export.command import merge

    result, _ = merged
    before = (result.out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match="already exists.*--force"):
        merge(lora_run_dir, out=result.out, log=lambda s: None)
    assert (result.out / "model.safetensors").stat().st_mtime_ns == before


def test_missing_adapter(tmp_path, lora_run_dir):
    from lowmem_r1.export.command import merge

    run = tmp_path / "empty-run"
    run.mkdir()
    shutil.copy(lora_run_dir / "run.json", run / "run.json")
    with pytest.raises(UserError, match="no adapter"):
        merge(run, log=lambda s: None)
    with pytest.raises(UserError, match="neither a run directory"):
        merge(tmp_path, log=lambda s: None)
    with pytest.raises(UserError, match="no such"):
        merge(tmp_path / "nope", log=lambda s: None)


def test_unknown_quant_type_fails_before_any_work(lora_run_dir, tmp_path):
    from lowmem_r1.export.command import merge

    with pytest.raises(UserError, match="q9_x: unknown GGUF type"):
        merge(lora_run_dir, out=tmp_path / "m", gguf="f16,q9_x", log=lambda s: None)
    with pytest.raises(UserError, match="--dtype int4"):
        merge(lora_run_dir, out=tmp_path / "m", dtype="int4", log=lambda s: None)
    assert not (tmp_path / "m").exists()


def _tiny_model(path: Path, model_type: str, tokenizer_from: Path, **kw) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=49152, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **kw)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_from / name, path / name)
    return path


def test_wrong_base_is_refused(lora_run_dir, base_model_dir, tmp_path):
    """An adapter for SmolLM2 (30 layers, hidden 576) against a 2-layer Qwen2 with hidden 64."""
    from lowmem_r1.export.command import merge

    qwen = _tiny_model(tmp_path / "qwen2", "qwen2", base_model_dir)
    with pytest.raises(UserError, match="--base"):
        merge(lora_run_dir, base=str(qwen), out=tmp_path / "m", log=lambda s: None)
    assert not (tmp_path / "m").exists()


def test_prequantized_base_and_dora_are_refused(lora_run_dir, base_model_dir, tmp_path):
    from lowmem_r1.export.merge_lora import read_adapter
    from lowmem_r1.export.source import check_base

    q = tmp_path / "Qwen2.5-0.5B-Instruct-bnb-4bit"
    q.mkdir()
    (q / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(UserError, match="16-bit original.*Qwen2.5-0.5B-Instruct"):
        check_base(q)
    dora = tmp_path / "dora"
    shutil.copytree(lora_run_dir / "adapter", dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora.*DoRA"):
        read_adapter(dora)


def test_rslora_scaling(lora_run_dir, tmp_path):
    from lowmem_r1.export.merge_lora import read_adapter

    plain = read_adapter(lora_run_dir / "adapter")
    rs = tmp_path / "rs"
    shutil.copytree(lora_run_dir / "adapter", rs)
    cfg = json.loads((rs / "adapter_config.json").read_text())
    (rs / "adapter_config.json").write_text(json.dumps({**cfg, "use_rslora": True}))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert plain.deltas[key][2] == pytest.approx(16 / 8)
    assert read_adapter(rs).deltas[key][2] == pytest.approx(16 / 8 ** 0.5)


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "merge", str(tmp_path), "--gguf", "q9"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --gguf q9: unknown GGUF type") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_merge_end_to_end(lora_run_dir, tmp_path):
    """The command as a user runs it: fp32 merge + every pure-Python GGUF type + Modelfile."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "lowmem_r1.cli", "merge", str(lora_run_dir), "--out", str(out),
                           "--gguf", "f32,f16,bf16,q8_0", "--ollama"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "parity" in proc.stdout and proc.stdout.count("GGUF check") == 4
    assert (out / "Modelfile").read_text().startswith("FROM ./model-q8_0.gguf")


def test_sharded_base_streams_shard_by_shard(base_model_dir, tmp_path):
    """A base saved in several shards: each output shard mirrors one input shard, the index is rewritten,
    and the merge (LoRA + a modules_to_save output layer) still matches peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lowmem_r1.export.command import merge

    base = tmp_path / "base"
    _tiny_model(base, "llama", base_model_dir)
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(base, max_shard_size="1MB")
    assert (base / "model.safetensors.index.json").is_file()
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      modules_to_save=["lm_head"], init_lora_weights=False, task_type="CAUSAL_LM"))
    with torch.no_grad():  # a trained full copy of the output layer (modules_to_save)
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.mul_(1.5)
    model.save_pretrained(tmp_path / "adapter")
    result = merge(tmp_path / "adapter", base=str(base), out=tmp_path / "merged", dtype="fp32", log=lambda s: None)
    assert result.parity.ok and result.merge.merged == 6 and result.parity.adapter_effect > 0.1
    shards_in = sorted(p.name for p in base.glob("model-*.safetensors"))
    assert len(shards_in) > 1 and sorted(p.name for p in result.out.glob("model-*.safetensors")) == shards_in
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards_in)


def test_next_steps_name_the_outputs_and_the_ollama_model(tmp_path):
    from lowmem_r1.export.command import MergeResult
    from lowmem_r1.export.gguf import GGUFReport

    out = tmp_path / "runs" / "demo" / "merged"
    result = MergeResult(out, None, None, [GGUFReport(out / "model-f16.gguf", "f16", 1, 1, 0.1)], out / "Modelfile")
    lines = result.next_steps()
    assert lines[0] == f"merged model: {out}"
    assert f"llama-cli -m {out / 'model-f16.gguf'} --jinja" in lines[1]
    assert "ollama create demo -f Modelfile && ollama run demo" in lines[2]


def test_alpha_pattern_scaling_matches_peft(lora_run_dir, base_model_dir, tmp_path):
    """alpha_pattern keys (a module name suffix, or a regex) give each module the scaling peft gives it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lowmem_r1.export.merge_lora import read_adapter

    ad = tmp_path / "ad"
    shutil.copytree(lora_run_dir / "adapter", ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["alpha_pattern"] = {"q_proj": 4, r"layers\.1\.self_attn\.v_proj": 40}
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    ours = read_adapter(ad).deltas
    layers = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model_dir), str(ad)).base_model.model.model.layers
    for i, proj in ((0, "q_proj"), (1, "v_proj"), (2, "v_proj"), (1, "k_proj")):
        theirs = getattr(layers[i].self_attn, proj).scaling["default"]
        assert ours[f"model.layers.{i}.self_attn.{proj}.weight"].scaling == pytest.approx(theirs)
    assert ours["model.layers.1.self_attn.v_proj.weight"].scaling == pytest.approx(40 / 8)
