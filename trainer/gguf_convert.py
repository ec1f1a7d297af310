"""llama.cpp's convert_hf_to_gguf.py, run from a built llama.cpp folder, with one addition.

    python -m trainer.gguf_convert LLAMA_CPP_FOLDER MODEL_FOLDER --outfile F.gguf --outtype f16

The converter names a byte-level BPE tokenizer's pre-tokenizer by hashing how it splits a test
text, and refuses a hash it does not list. The random-init models this project builds offline
(trainer/random_model.py) have such a tokenizer with GPT-2's own pre-tokenizer (ByteLevel with
GPT-2's regex), which llama.cpp implements as "gpt-2"; they, and any tokenizer declared that way,
convert as "gpt-2". Every tokenizer the converter knows converts exactly as it would without this.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

CONVERTER = "convert_hf_to_gguf.py"


def gpt2_pre_tokenizer(model_folder: Path) -> bool:
    try:
        pre = json.loads((model_folder / "tokenizer.json").read_text()).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return False
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def main() -> None:
    folder = Path(sys.argv[1])
    sys.argv = [str(folder / CONVERTER), *sys.argv[2:]]
    sys.path[:0] = [str(folder), str(folder / "gguf-py")]
    from conversion import base  # llama.cpp's, from the folder just put first on the path

    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            if gpt2_pre_tokenizer(Path(self.dir_model)):
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    runpy.run_path(str(folder / CONVERTER), run_name="__main__")


if __name__ == "__main__":
    main()
