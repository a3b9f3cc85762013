"""Tiny Hugging Face model folders built in the test with `transformers` (no network): GPT-2, Llama,
Qwen2 and Qwen3 shapes with random weights and a byte-level BPE tokenizer trained on a few lines.

Every parameter is perturbed (norm gains and biases too), so a weight that lands in the wrong place,
or a permutation left out, changes the logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
) * 8
VOCAB = 300  # embedding rows; the tokenizer uses fewer
KINDS = ("gpt2", "llama", "qwen2", "qwen3", "llama3")  # llama3: Llama 3.1's RoPE scaling


def byte_level_bpe(specials: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 20,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    return tokenizer


def hf_model(kind: str, *, seed: int = 0, **config):
    """A random tiny transformers model of `kind` (GPT-2 shaped, Llama, Qwen2 or Qwen3)."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        settings = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(**{**settings, **config}))
    else:
        settings = dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=128,
            rope_theta=1000.0,
            bos_token_id=0,
            eos_token_id=1,
        )
        llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
        llama3.update(original_max_position_embeddings=64, rope_theta=1000.0)  # scales 2 of 4 frequencies
        settings.update(
            {
                "qwen2": {"tie_word_embeddings": True},
                "qwen3": {"head_dim": 12},
                "llama3": {"rope_parameters": llama3},
            }.get(kind, {})
        )
        classes = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "llama3": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        }
        config_class, model_class = classes[kind]
        model = model_class(config_class(**{**settings, **config}))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * (0.3 if param.dim() > 1 else 0.2))
    return model.eval()


def save_hf_folder(kind: str, folder: Path, **config) -> Path:
    """Write a tiny `kind` model and its tokenizer to `folder` as save_pretrained does; return it."""
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>"] if kind == "gpt2" else ["<s>", "</s>"]
    tokenizer = byte_level_bpe(specials)
    if kind == "gpt2":
        end = tokenizer.token_to_id("<|endoftext|>")
        config = {"bos_token_id": end, "eos_token_id": end, **config}
        names = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    else:
        names = {"bos_token": "<s>", "eos_token": "</s>"}
    hf_model(kind, **config).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **names).save_pretrained(folder)
    return folder
