"""Model names: builtin alias -> cached plain HF folder (eos fixed), hub ids pass through, bad names fail clearly."""

import json

import pytest

from lowmem_r1.core.errors import UserError
from lowmem_r1.models.names import builtin_gguf_path, is_hub_id, resolve_model


def test_builtin_alias_is_a_plain_trainable_folder(base_model_dir):
    assert (base_model_dir / "config.json").is_file() and (base_model_dir / "model.safetensors").is_file()
    config = json.loads((base_model_dir / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF quantizer that refuses training is gone
    tok = json.loads((base_model_dir / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>"  # transformers' GGUF loader names <|im_start|>: generation never stops
    assert (base_model_dir / "chat_template.jinja").read_text().count("<|im_start|>") >= 1
    # cached: a second resolve is the same folder and does not reconvert
    mtime = (base_model_dir / "model.safetensors").stat().st_mtime
    assert resolve_model("builtin:smollm2-135m-instruct") == str(base_model_dir)
    assert (base_model_dir / "model.safetensors").stat().st_mtime == mtime


def test_builtin_gguf_is_found_without_importing_the_package(base_model_dir):
    path = builtin_gguf_path("builtin:smollm2-135m-instruct")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


def test_names(tmp_path, monkeypatch):
    assert resolve_model("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert is_hub_id("openai/gsm8k") and not is_hub_id("./local/model") and not is_hub_id("x.gguf")
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("runs/typo")
    (tmp_path / "runs").mkdir()
    assert not is_hub_id("runs/typo")  # a missing folder under a local one, not a hub repo
    with pytest.raises(UserError, match="not a local folder"):
        resolve_model("runs/typo")
    with pytest.raises(UserError, match="unknown builtin alias"):
        resolve_model("builtin:gpt-5")
    with pytest.raises(UserError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not a local folder"):
        resolve_model("no/such/thing/here")


def test_bitsandbytes_kernel_hub_warning_is_silenced():
    """peft imports bitsandbytes, whose CPU backend warns about a hub kernel it could not fetch."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import lowmem_r1, peft"], capture_output=True, text=True,
                          check=True, timeout=300)
    assert "kernels-community" not in proc.stderr
