"""A tiny Qwen2-shaped chat model for the tiny profile: the real architecture, random weights.

It is saved exactly as a Hub checkpoint is (config, generation config, safetensors weights,
`tokenizer.json` with a ChatML chat template) and loads through `AutoModelForCausalLM` and
`AutoTokenizer`, so the enhance stage runs its real loading, templating, batching and decoding
code on it. Its answers are noise, which is what the answer parser's fallback must survive.

The tokenizer is a byte-level BPE trained here on a short built-in text: the trainer is
deterministic, and weights come from a fixed torch seed, so every machine builds the same files.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2.5-Instruct's special tokens and roles: `<|endoftext|>` pads, `<|im_end|>` ends a turn.
PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

VOCAB_SIZE = 512

# ChatML, as Qwen2.5 writes it (without its tool-calling branches): one block per message, then
# the opening of the assistant's turn when a generation prompt is asked for.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Enough English to give the BPE merges something to learn: product copy and photography terms.
TRAINING_TEXT = """\
A stoneware coffee mug in sand glaze sits on a walnut table by the window. Soft morning light
falls from the left and leaves a long gentle shadow. The photograph is sharp, clean and warm,
with a shallow depth of field and a plain background in muted beige tones.
Studio product photography of a leather backpack, brown, full grain leather, brass buckles.
Three point lighting, white seamless backdrop, high detail, crisp focus, realistic texture.
A ceramic vase with a matte white finish holds dried flowers. Minimalist Scandinavian style,
natural daylight, pastel colors, editorial magazine look, centered composition.
Running shoes in bright orange mesh with a white sole, floating against a gradient of blue.
Dynamic angle, dramatic rim light, vivid colors, commercial advertising photo, ultra detailed.
A wooden cutting board with olive oil, bread and fresh herbs on a rustic kitchen counter.
Warm tungsten light, cozy mood, food photography, rich browns and greens, film grain.
Positive prompt: the subject, its material and colour, the style, the lighting and the details.
Negative prompt: blurry, low quality, distorted, watermark, text, cropped, oversaturated.
The product stays in focus; the scene around it sets the mood without hiding the object.
"""


def _train_tokenizer():
    """Byte-level BPE over `TRAINING_TEXT`, with the chat special tokens first in the vocabulary.

    The normalizer and pre-tokenizer are Qwen2's own, because `AutoTokenizer` loads this folder as a
    `Qwen2Tokenizer` (the config says qwen2), which installs them over whatever the file holds.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    return tokenizer


def _chat_tokenizer():
    """The trained tokenizer wrapped for transformers, with Qwen's roles for the special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=4096,
    )


def _config(tokenizer):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )


def _generation_config(tokenizer):
    """Qwen2.5-Instruct's shipped defaults (which sample), so callers must choose greedy themselves."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
        repetition_penalty=1.05,
        eos_token_id=[tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD_TOKEN)],
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )


def build_llm(folder: Path, cache_dir: Path) -> None:
    """Build the tiny chat model into `folder` (`cache_dir` is unused: it derives from no other model)."""
    import torch
    from transformers import Qwen2ForCausalLM

    tokenizer = _chat_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(_config(tokenizer))
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
