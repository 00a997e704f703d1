"""Write a GGUF model (default: pdserve's packaged SmolLM2-135M-Instruct) out as a
Hugging Face directory of bf16 safetensors plus its tokenizer, for engines that
cannot read GGUF (vLLM's CPU build) and for the `transformers` floor.

    .venv/bin/python benchmarks/peers/export_bf16_safetensors.py benchmarks/peers/models/smollm2-135m-bf16

Runs in pdserve's own environment (torch, transformers, gguf). The weights are
dequantized by `transformers` (`from_pretrained(dir, gguf_file=...)`), so every
engine in the comparison serves the same numbers; the tokenizer is the one pdserve
uses (with the GGUF's chat template).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def export(out_dir: str, gguf: str | None = None, dtype: str = "bfloat16") -> str:
    """Dequantizes `gguf` into `out_dir` (config, safetensors, tokenizer); returns out_dir."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from pdserve.model.paths import resolve_model_path
    from pdserve.model.tokenizer import load_tokenizer

    transformers.logging.set_verbosity_error()
    path = resolve_model_path(gguf)
    if not path.endswith(".gguf"):
        raise ValueError(f"--gguf must be a .gguf file, got {path!r}")
    torch_dtype = getattr(torch, dtype)
    # transformers >= 5 keeps GGUF weights packed unless asked to dequantize, and
    # refuses to save a model that still carries its GGUF quantizer.
    extra = {}
    try:
        from transformers import GgufConfig

        extra["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4.x dequantizes GGUF on load anyway
        pass
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path) or ".", gguf_file=os.path.basename(path), dtype=torch_dtype, **extra
    )
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(model_path=path).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "pdserve_export.json"), "w") as f:
        json.dump(
            {"source": path, "dtype": dtype, "transformers": transformers.__version__, "torch": torch.__version__},
            f,
            indent=1,
        )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="directory to write (created if missing)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: pdserve's default model)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = export(args.out_dir, args.gguf, args.dtype)
    except (OSError, ValueError) as e:
        print(f"export_bf16_safetensors: error: {e}", file=sys.stderr)
        return 1
    files = sorted(os.listdir(out))
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
