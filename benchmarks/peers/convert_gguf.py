"""llama.cpp's own converter (convert_hf_to_gguf.py of the llama-cpp-python source), run on a
checkpoint whose byte-level BPE tokenizer it does not know: the benchmark's tokenizers are trained
locally, so their pre-tokenizer hash is in no table of the converter, which then refuses. The
workload is token ids, so pre-tokenization never runs: the converter is told "default".

    python convert_gguf.py LLAMA_CPP_DIR MODEL_DIR --outtype f32|q8_0 --outfile OUT.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

llama_cpp = Path(sys.argv.pop(1)).resolve()
sys.path.insert(0, str(llama_cpp))
sys.argv[0] = str(llama_cpp / "convert_hf_to_gguf.py")

import convert_hf_to_gguf  # noqa: E402
from conversion.base import TextModel  # noqa: E402

TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
convert_hf_to_gguf.main()
