"""The tiny target's tokenizer: byte-level BPE with ChatML special tokens and a masking chat template.

The chat template wraps each assistant message's content and its ``<|im_end|>`` in
``{% generation %}...{% endgeneration %}``, so ``apply_chat_template(...,
return_assistant_tokens_mask=True, return_dict=True)`` gives the loss mask directly
(transformers 5.x returns it as ``assistant_masks``: exactly the assistant text plus the
end-of-turn token inside the tags). Saved as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eaglecache.tiny_target.spec import EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on ``texts``; special tokens get ids 0..3 in SPECIAL_TOKENS order."""
    tokenizer = Tokenizer(models.BPE())
    # "\n" is always a token of its own: otherwise "\n" + leading spaces merge across the
    # "<|im_start|>assistant\n" header into the content and the loss mask would cover the header.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, output: Path) -> None:
    """save_pretrained, plus the chat template and a portable class name in tokenizer_config.json.

    transformers 5 writes the template to chat_template.jinja and names its own class; older
    readers (transformers 4.x) look in tokenizer_config.json and know PreTrainedTokenizerFast.
    """
    tokenizer.save_pretrained(output)
    config_path = output / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
