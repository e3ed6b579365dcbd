"""A word-level tokenizer with a tool-use chat template, built in code (no download).

Words split on whitespace, punctuation is isolated and digits are single tokens, so every text
the built-in environment produces maps to known ids. The chat template renders tools, reasoning
(``<think> ... </think>``), tool calls as ``<tool_call> name ( key = value , ... ) </tool_call>``
and tool responses; it is prefix-preserving across turns.
"""
from .multihop import vocabulary

SPECIAL = ["<|pad|>", "<|unk|>", "<|im_start|>", "<|im_end|>"]
MARKUP = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "system",
          "user", "assistant", "tool", "tools", ":", ";", "(", ")", ",", "=", "-", "?", ".", "[", "]", "trace",
          "expert", "privileged", "end", "call", "result", "reasoning"]
DIGITS = [str(d) for d in range(10)]

CHAT_TEMPLATE = (
    "{%- if tools -%}"
    "<|im_start|> system {% for m in messages if m.role == 'system' %}{{ m.content }} {% endfor %}tools : "
    "{% for t in tools %}{{ t.function.name }} ( {{ t.function.parameters.properties | list | join(' , ') }} ) ; "
    "{% endfor %}<|im_end|>\n"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{%- if not tools %}<|im_start|> system {{ m.content }} <|im_end|>\n{% endif -%}"
    "{%- elif m.role == 'user' %}<|im_start|> user {{ m.content }} <|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|> assistant "
    "{%- if m.reasoning_content %} <think> {{ m.reasoning_content }} </think>{% endif -%}"
    "{%- if m.content %} {{ m.content }}{% endif -%}"
    "{%- for c in m.tool_calls or [] %} <tool_call> {{ c.function.name }} ("
    "{%- for k, v in c.function.arguments.items() %} {{ k }} = {{ v }}{% if not loop.last %} ,{% endif %}{% endfor %}"
    " ) </tool_call>{% endfor %} <|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|> tool <tool_response> {{ m.content }} </tool_response> <|im_end|>\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}<|im_start|> assistant{% endif -%}"
)


def build_tokenizer(extra_words=()):
    """A ``PreTrainedTokenizerFast`` over the environment's vocabulary, with the chat template above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + MARKUP + DIGITS + [w for w in vocabulary() + list(extra_words)
                                         if w not in SPECIAL + MARKUP + DIGITS]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(r"<\|?/?[a-z_]+\|?>", behavior="isolated"),  # markup tokens stay whole
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(r"[^\w<>|/]", behavior="isolated"),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", unk_token="<|unk|>",
                                   eos_token="<|im_end|>", bos_token=None, chat_template=CHAT_TEMPLATE)
