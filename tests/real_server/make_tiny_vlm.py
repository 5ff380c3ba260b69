"""Generate a tiny vision-language model folder with seeded random weights (run in the vLLM venv).

    python make_tiny_vlm.py idefics3 SMOLLM2_HF_DIR OUT_DIR

No trained VLM weights can be had offline here, but a real server does not need trained
ones to run the image path that chartqa exercises: decode the data URL, run the model's own
image processor, expand the image placeholder into image tokens, run a vision tower and a
connector, and count it all in usage.prompt_tokens. So this writes an Idefics3 (the
SmolVLM architecture) model that is small enough for 2 CPU cores:

- tokenizer: the SmolLM2 one (from the folder setup_vllm.sh made from the pinned GGUF),
  plus Idefics3's 40 added tokens: <fake_token_around_image>, <image>, <end_of_utterance>,
  <global-img> and <row_i_col_j> for i, j in 1..6;
- text model: Llama, hidden 64, 2 layers, 2 heads of size 32 (vLLM's CPU attention takes
  head sizes 32, 64, 80, ... only: 16 starts and then kills the engine on the first request);
- vision tower: SigLIP-like, hidden 64, 2 layers, 2 heads of 32, 512x512 tiles of 16x16
  patches; connector pixel-shuffle scale factor 4, so each tile is (512/16)^2 / 4^2 = 64
  image tokens (the same geometry as SmolVLM-256M's);
- processor: images resized to a longest edge of 2048, split into ceil(h/512) x ceil(w/512)
  tiles plus one global 512x512 image;
- weights: drawn once with torch.manual_seed(SEED) by transformers' own initializers, with a
  larger init range than a trained model's so that logits are not near-uniform, and saved
  as safetensors. (vLLM's --load-format dummy is no substitute: its outputs do not depend on
  the input at all, so it cannot show that the pixels reach the model.)

The output is random text, but it is a deterministic function of the prompt and the image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SEED = 1234
TILE = 512           # vision image_size: one tile
PATCH = 16
SCALE_FACTOR = 4     # pixel shuffle: (TILE/PATCH)^2 / SCALE_FACTOR^2 = 64 tokens per tile
LONGEST_EDGE = 4 * TILE
INIT_RANGE = 0.2     # transformers' default 0.02 makes every logit ~0 for a random model

# The same structure as SmolVLM's template, written for this test: the image parts become
# <image> (which the processor expands), text parts are copied, a plain-string content works too.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] in ('image', 'image_url') -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def idefics3(base: Path, out: Path) -> None:
    import torch
    from transformers import (AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig)
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    tokenizer = AutoTokenizer.from_pretrained(base)
    base_vocab = len(tokenizer)
    added = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    added += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    assert len(tokenizer) == base_vocab + 40, (base_vocab, len(tokenizer))
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    eou_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")

    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, initializer_range=INIT_RANGE,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eou_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = Idefics3VisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=TILE, patch_size=PATCH, initializer_range=INIT_RANGE,
    )
    config = Idefics3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), scale_factor=SCALE_FACTOR,
        image_token_id=image_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config.architectures = ["Idefics3ForConditionalGeneration"]

    torch.manual_seed(SEED)
    model = Idefics3ForConditionalGeneration(config).to(torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)

    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=True, size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": TILE},
    )
    image_seq_len = (TILE // PATCH) ** 2 // SCALE_FACTOR ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(out)
    # the tokenizer's own template too, for servers that read only tokenizer files
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    generation = {"bos_token_id": text.bos_token_id, "eos_token_id": eou_id, "pad_token_id": text.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    n = sum(p.numel() for p in model.parameters())
    print(f"saved {out}: Idefics3ForConditionalGeneration, {n} parameters (seed {SEED}), "
          f"vocab {len(tokenizer)}, <image> id {image_token_id}, {image_seq_len} tokens per tile",
          file=sys.stderr)


def main() -> None:
    kind, base, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    if kind != "idefics3":
        sys.exit(f"unknown model kind {kind!r} (idefics3)")
    idefics3(base, out)


if __name__ == "__main__":
    main()
