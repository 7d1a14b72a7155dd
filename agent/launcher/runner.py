"""The job process for chatting with a model and for the fallback LoRA trainer.

    python -m agent.launcher.runner chat  --model DIR [--adapter DIR] [--prompt TEXT]
                                          [--engine swift|vllm|lmdeploy|transformers] [--device D]
    python -m agent.launcher.runner train --model DIR --dataset FILE --output DIR [--rank R ...]

``chat`` with ``--prompt`` prints the reply and exits; without it, it reads one message a
line from stdin and streams each reply (Ctrl-D ends). ms-swift's engines are used when
installed; otherwise transformers (+ peft for an adapter), with the same chat template.

``train`` is the fallback when ms-swift is absent: LoRA with peft on a JSONL chat dataset,
writing ``logging.jsonl`` in ms-swift's format (one JSON object per step with ``loss``,
``learning_rate`` and ``global_step/max_steps``) and the adapter in the same PEFT format.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path


def _device_map(device: str) -> str:
    return {"cuda": "cuda:0", "npu": "npu:0", "mps": "mps", "cpu": "cpu"}.get(device, device)


class SwiftChat:
    def __init__(self, model: str, adapter: str | None, engine: str, device: str,
                 model_type: str | None = None, template: str | None = None):
        from swift.infer_engine import InferRequest, RequestConfig
        self._request, self._config = InferRequest, RequestConfig
        if engine == "vllm":
            from swift.infer_engine import VllmEngine
            self.engine = VllmEngine(model, model_type=model_type, enable_lora=bool(adapter))
        elif engine == "lmdeploy":
            from swift.infer_engine import LmdeployEngine
            self.engine = LmdeployEngine(model)
        else:
            from swift.infer_engine import TransformersEngine
            kwargs = {"adapters": [adapter] if adapter else None, "device_map": _device_map(device)}
            if model_type:
                kwargs.update(model_type=model_type, template_type=template)
            try:
                self.engine = TransformersEngine(model, **kwargs)
            except ValueError as e:
                # ms-swift cannot always tell a local folder's type from its architecture (e.g.
                # qwen2 vs qwen2_gte): fall back to the type the model's config.json states.
                if "model_type" not in str(e) or model_type:
                    raise
                self.engine = TransformersEngine(model, model_type=_config_type(model), **kwargs)

    def reply(self, messages: list[dict], max_new_tokens: int, stream: bool):
        config = self._config(max_tokens=max_new_tokens, temperature=0, stream=stream)
        result = self.engine.infer([self._request(messages=messages)], config)
        if not stream:
            yield result[0].choices[0].message.content or ""
            return
        for chunk in result[0]:
            if chunk and chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


class TransformersChat:
    def __init__(self, model: str, adapter: str | None, device: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model).to(device if device != "cuda" else "cuda:0")
        if adapter:
            from peft import PeftModel
            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.eval()

    def reply(self, messages: list[dict], max_new_tokens: int, stream: bool):
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        ids = {k: v.to(self.model.device) for k, v in ids.items()}
        with self.torch.no_grad():
            out = self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        yield self.tokenizer.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)


def _config_type(model: str) -> str | None:
    try:
        return json.loads((Path(model) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def chat(args) -> int:
    if args.engine == "transformers":
        bot = TransformersChat(args.model, args.adapter, args.device)
    else:
        bot = SwiftChat(args.model, args.adapter, args.engine, args.device, args.model_type, args.template)
    if args.prompt is not None:
        text = "".join(bot.reply([{"role": "user", "content": args.prompt}], args.max_new_tokens, False))
        print(json.dumps({"reply": text}), flush=True)
        return 0
    if args.jsonl:
        return chat_jsonl(bot, args)
    history: list[dict] = []
    print("shoal chat: type a message, Enter to send, Ctrl-D to quit", file=sys.stderr, flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        history.append({"role": "user", "content": line})
        parts = []
        for piece in bot.reply(history, args.max_new_tokens, args.engine != "transformers"):
            parts.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(parts)})
    return 0


def chat_jsonl(bot, args) -> int:
    """The agent's chat sessions: ``{"content": ...}`` a line in; ``{"delta": ...}`` pieces and
    ``{"done": true, "reply": ...}`` out; ``{"ready": true}`` once the model is loaded."""
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    history: list[dict] = []
    for line in sys.stdin:
        try:
            content = json.loads(line)["content"]
        except (ValueError, KeyError, TypeError):
            print(json.dumps({"error": "expected {\"content\": ...}"}), file=out, flush=True)
            continue
        history.append({"role": "user", "content": str(content)})
        parts = []
        for piece in bot.reply(history, args.max_new_tokens, args.engine != "transformers"):
            parts.append(piece)
            print(json.dumps({"delta": piece}), file=out, flush=True)
        history.append({"role": "assistant", "content": "".join(parts)})
        print(json.dumps({"done": True, "reply": "".join(parts)}), file=out, flush=True)
    return 0


def train(args) -> int:
    """LoRA with transformers + peft, logging like ms-swift (see module docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    targets = "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=targets,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line.strip()]
    examples = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        ids = tokenizer(full, return_tensors="pt")["input_ids"][0][:512]
        labels = ids.clone()
        labels[:len(tokenizer(prompt)["input_ids"])] = -100  # learn the answer, not the question
        examples.append((ids, labels))
    steps = args.max_steps or math.ceil(len(examples) * args.epochs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(out / "logging.jsonl", "a") as log:
        model.train()
        for step in range(1, steps + 1):
            ids, labels = examples[(step - 1) % len(examples)]
            lr = args.lr * (1 - (step - 1) / steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = model(input_ids=ids[None], labels=labels[None]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            elapsed = time.monotonic() - started
            log.write(json.dumps({"loss": round(loss.item(), 6), "learning_rate": lr, "epoch": step / len(examples),
                                  "global_step/max_steps": f"{step}/{steps}",
                                  "elapsed_time": f"{elapsed:.0f}s",
                                  "remaining_time": f"{elapsed / step * (steps - step):.0f}s"}) + "\n")
            log.flush()
    checkpoint = out / f"checkpoint-{steps}"
    model.save_pretrained(checkpoint)
    with open(out / "logging.jsonl", "a") as log:
        log.write(json.dumps({"last_model_checkpoint": str(checkpoint), "global_step": steps}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.launcher.runner")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("chat")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter")
    p.add_argument("--prompt")
    p.add_argument("--engine", default="swift", choices=["swift", "vllm", "lmdeploy", "transformers"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--model-type")
    p.add_argument("--template")
    p.add_argument("--jsonl", action="store_true", help="JSON lines on stdin/stdout (the agent's chat sessions)")
    p.set_defaults(func=chat)
    p = sub.add_parser("train")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--epochs", type=float, default=1.0)
    p.set_defaults(func=train)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        if "Please specify" not in str(e):
            raise
        # ms-swift could not tell what this folder holds; say which flags settle it.
        print(f"shoal: ms-swift cannot tell the model type or chat template of {args.model}: "
              f"{str(e).split(' See documentation')[0]} Pass them to shoal: --model-type TYPE --template NAME "
              "(e.g. --model-type qwen2 --template qwen)", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
