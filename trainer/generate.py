"""Try a run: the model it trained answers a prompt, or a short chat on the terminal.

    python -m trainer.generate --run OUTPUT_FOLDER [--prompt TEXT] [--image FILE] [--max-new-tokens N]

The launcher's `generate` command checks the request and starts it (entrypoint/cli.py). It uses
the run's merged model when there is one (merged_16bit/, or model/ after full fine-tuning), else
the base model with the adapter; a GPU when one is visible, else the CPU. Prompts of chat recipes
(the chat formats of recipes/formats.py: messages, instruction, and GRPO's prompt) go through the
tokenizer's chat template, as in training;
text recipes continue the prompt as written. A vision run (data.format vision) loads its processor,
and --image puts an image before the prompt, as in training. Decoding is greedy unless
--temperature is given.
Without --prompt it reads one message per line from stdin until an empty line or the end, and
keeps the conversation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import PeftModel

from recipes.errors import EXIT_BAD_INPUT, BadInput
from recipes.runs import Run
from trainer.export import auto_classes


def load(run: Run):
    """(model, tokenizer, or a vision run's processor) ready to generate."""
    model_class, tokenizer_class = auto_classes(run.vision)
    merged = run.whole_model
    trust = run.trust_remote_code
    placement = {"device_map": "auto"} if torch.cuda.is_available() else {"device_map": "cpu"}
    if merged is not None:
        model = model_class.from_pretrained(str(merged), dtype="auto", trust_remote_code=trust, **placement)
        tokenizer_folder = merged
    else:
        base = model_class.from_pretrained(run.base_model(), dtype="auto", trust_remote_code=trust, **placement)
        adapter = run.trained or run.checkpoint
        assert adapter is not None  # the launcher refused a run with neither
        model = PeftModel.from_pretrained(base, str(adapter))
        tokenizer_folder = adapter
    tokenizer = tokenizer_class.from_pretrained(str(tokenizer_folder), trust_remote_code=trust)
    return model.eval(), tokenizer


def reply(model, tokenizer, history: list[dict], chat: bool, max_new_tokens: int, temperature: float) -> str:
    if chat:
        ids = tokenizer.apply_chat_template(
            history, add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True
        )
    else:
        ids = tokenizer(history[-1]["content"], return_tensors="pt")
    ids = {k: v.to(model.device) for k, v in ids.items()}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    pad = getattr(tokenizer, "tokenizer", tokenizer).pad_token_id  # a processor holds its tokenizer
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def vision_turn(prompt: str, image: str | None) -> dict:
    """A user turn of a vision run: the image (loaded by the processor's chat template) before the text."""
    parts = [{"type": "image", "path": image}] if image else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trainer.generate", description=__doc__)
    parser.add_argument("--run", required=True, help="the run's output folder")
    parser.add_argument("--prompt", help="one prompt; without it, a chat on stdin")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--image", help="a vision run: an image file, placed before the first prompt")
    args = parser.parse_args(argv)
    try:
        run = Run.read(Path(args.run))
    except BadInput as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    model, tokenizer = load(run)
    chat = (run.recipe.chats or run.vision) and bool(getattr(tokenizer, "chat_template", None))
    history: list[dict] = []
    prompts = [args.prompt] if args.prompt is not None else iter(lambda: input("you: ").strip(), "")
    try:
        for prompt in prompts:
            if run.vision:
                history.append(vision_turn(prompt, args.image if not history else None))
            else:
                history.append({"role": "user", "content": prompt})
            context = history if chat else history[-1:]
            answer = reply(model, tokenizer, context, chat, args.max_new_tokens, args.temperature)
            history.append({"role": "assistant", "content": answer})
            print(answer if args.prompt is not None else f"model: {answer}", flush=True)
    except EOFError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
