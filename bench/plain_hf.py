"""The reference: the same training with plain transformers + PEFT + TRL (SDPA attention,
gradient checkpointing), no Unsloth.

    python bench/plain_hf.py MODEL_FOLDER DATA.jsonl 16bit|4bit STEPS RESULT.json
"""

import time

STARTED = time.time()

import json  # noqa: E402
import sys  # noqa: E402

import datasets  # noqa: E402
import settings  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from trainer import progress  # noqa: E402

model_dir, data_file, load, steps, result_file = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
quantization = None
if load == "4bit":
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
model = AutoModelForCausalLM.from_pretrained(
    model_dir, dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0}, quantization_config=quantization
)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
if quantization is not None:
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
model = get_peft_model(
    model,
    LoraConfig(
        r=settings.LORA_R,
        lora_alpha=settings.LORA_ALPHA,
        lora_dropout=0.0,
        target_modules=settings.TARGET_MODULES,
        task_type="CAUSAL_LM",
    ),
)
dataset = datasets.load_dataset("json", data_files=data_file, split="train")
recorder = progress.Recorder()
config = SFTConfig(
    **settings.sft_config_kwargs("/tmp/bench-plain-hf", steps),
    gradient_checkpointing=True,
    gradient_checkpointing_kwargs={"use_reentrant": False},
)
trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, callbacks=[recorder], args=config)
recorder.counter = progress.count_tokens(trainer)
trainer.train()
result = {"stack": "hf", **recorder.summary(STARTED), "peak_memory_gib": progress.peak_memory_gib()}
with open(result_file, "w") as handle:
    json.dump(result, handle, indent=2)
