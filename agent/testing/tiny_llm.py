"""A tiny Qwen2 chat model generated on the spot (~1 MB), for launcher tests and demos.

Qwen2 architecture (vocab 2048, hidden 64, 2 layers, 4 heads, 2 KV heads, tied
embeddings), fixed seed, a byte-level BPE trained here with ``tokenizers`` on a small
built-in corpus, and the ChatML template Qwen uses. Its output is gibberish, but it loads,
generates, trains and serves through exactly the code paths a real Qwen2 model takes.
Needs the ``run`` extra (torch, transformers).

    python -m agent.testing.tiny_llm OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A peer to peer model cache shares chunks between lab workstations.",
    "Every chunk is verified with BLAKE3 before it is written to disk.",
    "Students pull models from the teacher's machine in an offline classroom.",
    "LoRA fine-tuning adapts a small number of parameters of a language model.",
    "Hello! How can I help you today? I am a tiny model for tests.",
] * 50


def make_tiny_llm(out_dir: str | Path, *, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_chat_dataset(path: str | Path, rows: int = 16) -> Path:
    """A JSONL chat dataset of the shape ms-swift (and shoal's fallback trainer) read."""
    path = Path(path)
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"What does shoal verify? ({i})"},
                {"role": "assistant", "content": "Every chunk, with BLAKE3."}]}) + "\n")
    return path


def make_chat_dataset(directory: str | Path, rows: int = 16) -> Path:
    """A dataset repository as ModelScope holds one: a README and ``train.jsonl`` of chat
    records (``rows`` of them; 2000 rows are ~140 KB, several test-sized chunks)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny chat data\n"
                                         "What shoal verifies, as chat records for a LoRA demo.\n")
    write_chat_dataset(directory / "train.jsonl", rows=rows)
    return directory


if __name__ == "__main__":
    print(make_tiny_llm(sys.argv[1]))
