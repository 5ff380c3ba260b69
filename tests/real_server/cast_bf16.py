"""Cast a float32 Hugging Face folder to bfloat16 (run in the vLLM venv).

    python cast_bf16.py F32_DIR OUT_DIR

Every float32 tensor of the safetensors file(s) becomes bfloat16, rounded to nearest even
(torch's `.to(torch.bfloat16)`, checked here against an integer reference of that rounding);
every other file is copied as it is, and config.json says `"torch_dtype": "bfloat16"` (and
`"dtype"`, the key newer transformers write). vLLM serves the folder with `--dtype bfloat16`,
and llama.cpp's convert_hf_to_gguf.py turns it into a BF16 GGUF holding the same values
(its own float32 -> bf16 rounding is the identity on values already on the bf16 grid).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def rne_bf16_bits(t: torch.Tensor) -> np.ndarray:
    """The bf16 bit patterns of float32 `t` rounded to nearest, ties to even (no NaN here)."""
    u = t.contiguous().numpy().view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    changed = total = 0
    for path in sorted(src.iterdir()):
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
            cast = {}
            for name, t in tensors.items():
                if t.dtype != torch.float32:
                    sys.exit(f"{path.name}: {name} is {t.dtype}, not float32")
                if not torch.isfinite(t).all():
                    sys.exit(f"{path.name}: {name} has a non-finite value")
                b = t.to(torch.bfloat16)
                if not np.array_equal(b.view(torch.int16).numpy().view(np.uint16), rne_bf16_bits(t)):
                    sys.exit(f"{name}: torch's bfloat16 cast is not round-to-nearest-even here")
                changed += int((b.float() != t).sum())
                total += t.numel()
                cast[name] = b.contiguous()
            save_file(cast, str(out / path.name), metadata={"format": "pt"})
        elif path.name == "config.json":
            config = json.loads(path.read_text())
            config["torch_dtype"] = "bfloat16"
            if "dtype" in config:
                config["dtype"] = "bfloat16"
            (out / path.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif path.is_file():
            shutil.copy2(path, out / path.name)
    if not total:
        sys.exit(f"no safetensors file in {src}")
    print(f"saved {out}: {total} values cast to bfloat16 (round to nearest even), "
          f"{changed / total:.1%} of them changed", file=sys.stderr)


if __name__ == "__main__":
    main()
