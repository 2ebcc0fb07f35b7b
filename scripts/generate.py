"""Generate text with a quantized checkpoint or a full-precision model, greedily.

    # a quantized checkpoint, asked about an image (chat template + image processor, as in calibration)
    python scripts/generate.py --checkpoint runs/qwen2.5-vl-mini-splitq-w4a4 --image cat.png \\
        --prompt "What is in this picture?"

    # a text-only model by name (converted once into the cache), plain completion of the prompt
    python scripts/generate.py --model qwen2.5-coder-0.5b --prompt "def fib(n):"

    # the same through the model's chat template
    python scripts/generate.py --model qwen2.5-coder-0.5b --chat --prompt "Write a Python fib function."

    # the full-precision model a checkpoint was calibrated from, for comparison
    python scripts/generate.py --checkpoint runs/demo --fp --image cat.png --prompt "What shape is this?"

Without ``--image`` the prompt is text only: tokenized as is (a completion), or with ``--chat``
wrapped in the tokenizer's chat template with a generation prompt. ``--model`` takes anything
``splitq_jax.models.converters.checkpoints.load_model`` does (named model, HF directory, converted checkpoint).
Decoding is greedy; the reply is printed token by token as it is generated. A chat reply (an
image prompt, or ``--chat``) stops at the end of the turn (the model's EOS, the tokenizer's EOS,
``<|im_end|>``), a completion at the model's EOS or ``<|endoftext|>``. A prompt that leaves no room
for ``--max-new-tokens`` in the model's context (``max_position_embeddings`` of its source
config.json) is refused. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitq_jax import evaluate as ev  # noqa: E402
from splitq_jax import preprocess as pp  # noqa: E402
from splitq_jax.errors import SplitqError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="directory written by scripts/calibrate.py (a quantized model)")
    which.add_argument("--model", help="a full-precision model: named model (e.g. qwen2.5-coder-0.5b), HF "
                                       "checkpoint directory or converted checkpoint")
    ap.add_argument("--image", help="image file (PNG, JPEG, ...); omit for a text-only prompt")
    ap.add_argument("--prompt", required=True, help="the question, instruction or text to continue")
    ap.add_argument("--chat", action="store_true",
                    help="text only: wrap the prompt in the tokenizer's chat template (default: plain completion)")
    ap.add_argument("--fp", action="store_true",
                    help="with --checkpoint: answer with the full-precision model it was calibrated from")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="longest reply in tokens (default 32)")
    return ap.parse_args(argv)


def max_context(model_dir: str | None) -> int | None:
    """``max_position_embeddings`` of the model's HF config.json (nested text config first), or None."""
    path = Path(model_dir) / "config.json" if model_dir else None
    if path is None or not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    n = (cfg.get("text_config") or {}).get("max_position_embeddings") or cfg.get("max_position_embeddings")
    return int(n) if n else None


class Streamer:
    """Prints a reply as its tokens arrive: the decoded text so far, less what was printed."""

    def __init__(self, tokenizer, stop: tuple[int, ...]):
        self.tokenizer, self.stop, self.ids, self.shown, self.done = tokenizer, set(stop), [], "", False

    def __call__(self, tokens) -> None:
        token = int(tokens[0])
        if self.done or token in self.stop:
            self.done = True
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):  # wait for whole characters
            print(text[len(self.shown):], end="", flush=True)
            self.shown = text


def stop_tokens(config, tokenizer) -> tuple[int, ...]:
    """The model's EOS ids plus ``<|endoftext|>`` where the vocabulary has it (a completion's end)."""
    eos = list(config.eos_token_id or ())
    extra = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else None
    if extra is not None and extra not in eos:
        eos.append(int(extra))
    return tuple(eos)


def text_prompt_ids(tokenizer, prompt: str, *, chat: bool) -> np.ndarray:
    """``(1, N)`` token ids of a text prompt: plain, or through the chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise SplitqError("--chat: this model's tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise SplitqError("the prompt is empty after tokenization")
    return np.asarray([ids], np.int64)


def generate_text_only(model, config, tokenizer, prompt: str, *, chat: bool, max_new_tokens: int,
                       on_token=None, context: int | None = None) -> str:
    """Greedy continuation of a text prompt by any model with ``generate(ids, max_new_tokens=...)``;
    a chat reply stops at the end of the turn, a completion at EOS / ``<|endoftext|>``."""
    ids = text_prompt_ids(tokenizer, prompt, chat=chat)
    ev.check_context(ids.shape[1], max_new_tokens, context)
    eos = ev.end_of_turn_ids(config, tokenizer) if chat else stop_tokens(config, tokenizer)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
    kw = {} if on_token is None else {"on_token": on_token}
    tokens = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos or None, pad_token_id=pad, **kw)
    return ev.decode_generated(tokens, tokenizer, eos or None)[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.max_new_tokens < 1:
            raise SplitqError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
        image = None
        if args.image is not None:
            if not Path(args.image).is_file():
                raise SplitqError(f"image {args.image!r} does not exist or is not a file")
            image = pp.load_image(args.image)
            if args.chat:
                raise SplitqError("--chat applies to text-only prompts; image prompts always use the chat template")
        if args.fp and args.checkpoint is None:
            raise SplitqError("--fp answers with the full-precision model of a --checkpoint; with --model the "
                              "model is already full precision")
        if args.checkpoint is not None:
            from splitq_jax.runtime import load_quantized

            model = load_quantized(args.checkpoint)
            family, config = model.family, model.config
            tokenizer, image_cfg = ev.processor_for(model.manifest)
            model_dir = model.manifest.get("source_dir")
            if args.fp:
                model = ev.load_reference(model).model  # checked to be the checkpoint's own fp model
        else:
            from splitq_jax.models.converters.checkpoints import load_model

            model, config, family, model_dir = load_model(args.model)
            tokenizer, image_cfg = pp.load_tokenizer(model_dir), None
        context = max_context(model_dir)
        chat = args.chat or image is not None
        stream = Streamer(tokenizer, ev.end_of_turn_ids(config, tokenizer) if chat else stop_tokens(config, tokenizer))
        if image is None:
            text = generate_text_only(model, config, tokenizer, args.prompt, chat=args.chat,
                                      max_new_tokens=args.max_new_tokens, on_token=stream, context=context)
        else:
            if getattr(config, "vision", True) is None:
                raise SplitqError("this model is text only (no vision tower); drop --image")
            text = ev.generate_text(model, image, args.prompt, family=family, tokenizer=tokenizer,
                                    image_cfg=image_cfg, max_new_tokens=args.max_new_tokens, on_token=stream,
                                    max_context=context)
    except SplitqError as e:  # user-fixable; a bug keeps its traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The reply was streamed; what decoding as a whole adds (a character still incomplete) ends it.
    print(text[len(stream.shown):] if text.startswith(stream.shown) else "", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
