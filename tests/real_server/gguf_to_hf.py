"""Dequantize a GGUF checkpoint into a float32 Hugging Face folder (run in the vLLM venv).

    python gguf_to_hf.py MODEL.gguf OUT_DIR

transformers (with the `gguf` package) loads the GGUF and dequantizes every tensor to
float32; the folder it saves (config.json, model.safetensors, tokenizer files and the
GGUF's own chat template) is what vLLM serves, and what llama.cpp's convert_hf_to_gguf.py
turns back into a float32 GGUF, so that both backends run the SAME weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    gguf_path, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    kwargs = {"gguf_file": gguf_path.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)

    # save_pretrained refuses a model loaded from GGUF while it carries its quantization
    # config. Drop it only once every tensor is known to be a plain float32 tensor, so the
    # saved folder cannot hold anything still quantized.
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    bad = {name: (type(t).__name__, str(t.dtype)) for name, t in tensors.items()
           if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.dtype != torch.float32}
    if bad:
        sys.exit(f"not plain float32 tensors after loading the GGUF: {bad}")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    template = tokenizer.chat_template
    if not template:
        sys.exit("the GGUF has no chat template")
    saved = out / "chat_template.jinja"
    if not saved.is_file():  # older transformers keep it in tokenizer_config.json only
        saved.write_text(template, encoding="utf-8")
    config = json.loads((out / "config.json").read_text())
    if "quantization_config" in config:
        sys.exit("config.json still has a quantization_config")
    n = sum(t.numel() for t in model.parameters())
    print(f"saved {out}: {config.get('architectures')} {n} parameters, float32, "
          f"vocab {len(tokenizer)}", file=sys.stderr)


if __name__ == "__main__":
    main()
