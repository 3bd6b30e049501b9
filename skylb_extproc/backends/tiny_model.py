"""Write a tiny Llama model folder for vLLM: config, tokenizer, chat template — no weights.

Run by the vLLM venv's interpreter as a plain script (`python tiny_model.py OUT CORPUS`): it needs
only the standard library and `tokenizers` (a vLLM dependency), not skylb_extproc, so it works
in a venv where our package is not installed. vLLM serves the folder with `--load-format dummy`,
which fills the weights with random values: no model hub, no weight files.

The tokenizer is a byte-level BPE trained on CORPUS (text the caller generated from the
workloads we replay) with tokens capped at 7 characters: 4.1 characters per token on the chat
workload, so a prompt costs about as many tokens here as in the simulated replica, which counts
4 characters per token. The vocabulary is filled to exactly VOCAB ids: the random model samples
any id below the config's vocab_size, and every one of them must decode.
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 4096
MAX_POSITIONS = 4096
MAX_TOKEN_CHARS = 7
SPECIAL = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
# Roles become special tokens and each message ends with a newline; add_generation_prompt opens
# the assistant's turn. Both backends render chat roles differently; prefix matching does not care.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

LLAMA_CONFIG: dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _filler_words(count: int, seed: int = 0) -> list[str]:
    """Random lowercase words: material for merges beyond what the corpus alone yields."""
    rng = random.Random(seed)
    return [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
        for _ in range(count)
    ]


def train_tokenizer(corpus: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=list(SPECIAL),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=MAX_TOKEN_CHARS,
        show_progress=False,
    )
    tok.train_from_iterator([*corpus, " ".join(_filler_words(200_000))], trainer=trainer)
    if tok.get_vocab_size() != VOCAB:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} ids, wanted {VOCAB}")
    return tok


def tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }


def write_model(out: Path, corpus: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2))
    (out / "config.json").write_text(json.dumps(LLAMA_CONFIG, indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: tiny_model.py OUT_DIR CORPUS_FILE", file=sys.stderr)
        return 2
    corpus = Path(argv[2]).read_text(encoding="utf-8").splitlines()
    write_model(Path(argv[1]), corpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
