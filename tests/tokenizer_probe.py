"""Print, as JSON, what the installed transformers makes of tokenizer folders (run by
test_bundled_tokenizer_compat.py with transformers 4.x and 5.x)."""

import json
import sys

import transformers
from transformers import AutoTokenizer
texts = ["def fibonacci(n):\n    return n", "  héllo wörld 🙂 <s></s>", "import os"]
messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
out = {}
for folder in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(folder)
    out[folder] = {
        "class": type(tok).__name__,
        "ids": [tok.encode(t) for t in texts],
        "decoded": [tok.decode(tok.encode(t), skip_special_tokens=True) for t in texts],
        "chat": tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
        "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
        "len": len(tok),
    }
print(json.dumps({"transformers": transformers.__version__, "tokenizers": out}))
