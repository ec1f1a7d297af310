"""The baseline: the same training as a plain Unsloth script (no launcher, no recipe layer).

python bench/bare_unsloth.py MODEL_FOLDER DATA.jsonl 16bit|4bit STEPS RESULT.json
"""

import time

STARTED = time.time()

import json  # noqa: E402
import sys  # noqa: E402

import datasets  # noqa: E402
import settings  # noqa: E402
import torch  # noqa: E402
import unsloth  # noqa: E402, F401
from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from trainer import progress  # noqa: E402

model_dir, data_file, load, steps, result_file = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=model_dir, max_seq_length=settings.SEQ_LEN, dtype=torch.bfloat16, load_in_4bit=load == "4bit"
)
model = FastLanguageModel.get_peft_model(
    model,
    r=settings.LORA_R,
    lora_alpha=settings.LORA_ALPHA,
    lora_dropout=0.0,
    target_modules=settings.TARGET_MODULES,
    use_gradient_checkpointing="unsloth",
    random_state=settings.SEED,
)
dataset = datasets.load_dataset("json", data_files=data_file, split="train")
recorder = progress.Recorder()
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=dataset,
    callbacks=[recorder],
    args=SFTConfig(**settings.sft_config_kwargs("/tmp/bench-bare-unsloth", steps)),
)
recorder.counter = progress.count_tokens(trainer)
trainer.train()
result = {"stack": "unsloth", **recorder.summary(STARTED), "peak_memory_gib": progress.peak_memory_gib()}
with open(result_file, "w") as handle:
    json.dump(result, handle, indent=2)
