"""Convert one of compare.py's random-weight checkpoints to GGUF with llama.cpp's own converter.

    python benchmarks/llamacpp_convert.py LLAMA_CPP_SRC CHECKPOINT OUT.gguf [--outtype f16]

LLAMA_CPP_SRC is a llama.cpp source tree (e.g. llama-cpp-python's sdist, vendor/llama.cpp): its
convert_hf_to_gguf.py, conversion/ and gguf-py/ are used as they are, so tensor layouts (DeepSeek-V3's MLA
k_b/v_b split, merged experts, router bias) are exactly llama.cpp's. The interpreter needs torch, numpy,
safetensors and transformers (the converter reads config.json through it).

The checkpoints have no tokenizer files (save_pretrained of a random model), so every converter's set_vocab
is replaced by a "no vocab" one: tokenizer.ggml.model = "none" plus <arch>.vocab_size, which llama.cpp loads
as LLAMA_VOCAB_TYPE_NONE with vocab_size dummy tokens. That is enough for llama-batched-bench and llama-bench,
which feed token ids and never tokenize text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="llama.cpp source folder (holds convert_hf_to_gguf.py)")
    ap.add_argument("model", type=Path, help="HF checkpoint folder (config.json + safetensors)")
    ap.add_argument("outfile", type=Path)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    args = ap.parse_args()

    sys.path.insert(0, str(args.src))  # convert_hf_to_gguf puts src/gguf-py on the path itself
    import convert_hf_to_gguf as convert

    def set_vocab_none(self) -> None:
        self.gguf_writer.add_tokenizer_model("none")
        self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

    get_model_class = convert.get_model_class

    def get_model_class_without_vocab(*a, **kw):
        cls = get_model_class(*a, **kw)
        cls.set_vocab = set_vocab_none
        cls.set_gguf_parameters = _with_q_lora_rank(cls.set_gguf_parameters)
        return cls

    convert.get_model_class = get_model_class_without_vocab
    sys.argv = [convert.__file__, str(args.model), "--outfile", str(args.outfile), "--outtype", args.outtype]
    convert.main()


def _with_q_lora_rank(set_gguf_parameters):
    """An MLA model without a query LoRA (DeepSeek-V2-Lite) gets q_lora_rank 0 written out: llama.cpp knows such a
    model by its layer count (26 or 27) and otherwise requires the key, so a checkpoint cut by --layers would not
    load. With 0 it creates the plain query projection, as for the whole model."""

    def set_parameters(self) -> None:
        set_gguf_parameters(self)
        if "kv_lora_rank" in self.hparams and self.hparams.get("q_lora_rank") is None:
            self.gguf_writer.add_q_lora_rank(0)

    return set_parameters


if __name__ == "__main__":
    main()
