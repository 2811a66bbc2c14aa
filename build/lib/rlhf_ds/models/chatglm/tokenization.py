"""The ChatGLM-6B tokenizer: the ice_text.model SentencePiece model of a chatglm-6b folder, loaded without remote code.

Encoding as published: "\\n" becomes the piece <n>, a tab <|tab|>, a run of 2..80 spaces <|blank_N|> (longest runs
first), then SentencePiece (with its dummy prefix) encodes the text; decoding reverses it. Ids are the
SentencePiece ids plus `num_image_tokens` (0 in the published tokenizer_config.json; the older 150528-token
checkpoints had 20000 image tokens <image_0>.. in front, which is still the class default as published).

Where the pieces sit in the published ice_text.model (130344 pieces):

    0 <unk>   1 <s>   2 </s>   3 <pad>   4 <n>   5 ▁   ... text pieces up to 129999
    130000 [MASK]  130001 [gMASK]  130002 [sMASK]  130003 <unused_0>  130004 <sop>  130005 <eop>  130006 <ENC>
    130007 <dBLOCK>  130008 <|tab|>  130009..130087 <|blank_2|>..<|blank_80|>  130088..130343 <0x00>..<0xFF>

`tokenizer(text)` appends [gMASK] <sop> (build_inputs_with_special_tokens: `A [gMASK] <sop>`, or for a pair
`A [gMASK] <sop> B <eop>`); eos is <eop>, bos <sop>, pad <pad> (distinct from eos), padding on the left. The special
tokens are also recognised in text, so the chat template can write them and `add_special_tokens=False` keeps them.

Deliberate differences from the published class: padding returns the standard 2-D attention mask (the model builds
the prefix-LM mask and 2-D position ids itself) rather than a 3-D mask and position ids; ids outside the
vocabulary (the model's 130528 rows exceed the tokenizer's 130344 pieces) decode to nothing instead of raising;
and it has a chat template (the published `chat()` prompt format).
"""
from __future__ import annotations

import os
import shutil

from transformers import PreTrainedTokenizer

MAX_BLANK_LENGTH = 80

# The prompt of the published `chat()`: the bare query when there is no history; otherwise every earlier turn as
# "[Round i]\n问：{query}\n答：{response}\n" (i from 0) and the new one as "[Round n]\n问：{query}\n答：". The model
# then reads [gMASK] <sop> and answers; an answer ends with <eop>. ChatGLM-6B has no system role: a system message
# is written first, followed by a newline.
CHAT_TEMPLATE = r"""{%- set ns = namespace(system='', users=[], answers=[]) -%}
{%- for m in messages -%}
{%- if m['role'] == 'system' -%}{%- set ns.system = ns.system + m['content'] + '\n' -%}
{%- elif m['role'] == 'user' -%}{%- set ns.users = ns.users + [m['content']] -%}
{%- elif m['role'] == 'assistant' -%}{%- set ns.answers = ns.answers + [m['content']] -%}
{%- else -%}{{- raise_exception('ChatGLM-6B has the roles system, user and assistant, not ' + m['role']) -}}
{%- endif -%}
{%- endfor -%}
{%- set closed = messages|length > 0 and messages[-1]['role'] == 'assistant' -%}
{%- set rounds = ns.users|length - 1 -%}
{{- ns.system -}}
{%- if rounds <= 0 -%}{{- ns.users[0] if ns.users else '' -}}
{%- else -%}
{%- for i in range(rounds) -%}
{{- '[Round ' ~ i ~ ']\n问：' ~ ns.users[i] ~ '\n答：' ~ ns.answers[i] ~ '\n' -}}
{%- endfor -%}
{{- '[Round ' ~ rounds ~ ']\n问：' ~ ns.users[-1] ~ '\n答：' -}}
{%- endif -%}
{%- if add_generation_prompt or closed -%}{{- '[gMASK]<sop>' -}}{%- endif -%}
{%- if closed -%}{{- ns.answers[-1] ~ '<eop>' -}}{%- endif -%}"""


def blank_token(length: int) -> str:
    return f"<|blank_{length}|>"


TAB_TOKEN = "<|tab|>"
LINEBREAK_TOKEN = "<n>"


def preprocess(text: str) -> str:
    """Newlines, tabs and runs of spaces as ChatGLM's pieces, before SentencePiece sees the text."""
    text = text.replace("\n", LINEBREAK_TOKEN).replace("\t", TAB_TOKEN)
    for n in range(MAX_BLANK_LENGTH, 1, -1):
        text = text.replace(" " * n, blank_token(n))
    return text


def postprocess(text: str) -> str:
    text = text.replace(LINEBREAK_TOKEN, "\n").replace(TAB_TOKEN, "\t")
    for n in range(2, MAX_BLANK_LENGTH + 1):
        text = text.replace(blank_token(n), " " * n)
    return text


class IceText:
    """ice_text.model with ChatGLM's id offset (image tokens in front) and whitespace pieces."""

    def __init__(self, path: str, num_image_tokens: int = 0):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(path)
        self.num_image_tokens = num_image_tokens
        self.num_text_tokens = self.sp.GetPieceSize()

    def __len__(self) -> int:
        return self.num_image_tokens + self.num_text_tokens

    def pieces(self, text: str) -> list[str]:
        return self.sp.EncodeAsPieces(preprocess(text))

    def piece_to_id(self, piece: str) -> int:
        if piece.startswith("<image_") and piece.endswith(">") and piece[7:-1].isdigit():
            return int(piece[7:-1])
        return self.sp.PieceToId(piece) + self.num_image_tokens

    def id_to_piece(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.IdToPiece(index - self.num_image_tokens)

    def decode_pieces(self, pieces: list[str]) -> str:
        return postprocess(self.sp.DecodePieces(pieces))


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file: str | None = None, do_lower_case: bool = False, remove_space: bool = False,
                 bos_token: str = "<sop>", eos_token: str = "<eop>", end_token: str = "</s>",
                 mask_token: str = "[MASK]", gmask_token: str = "[gMASK]", padding_side: str = "left",
                 pad_token: str = "<pad>", unk_token: str = "<unk>", num_image_tokens: int = 20000,
                 clean_up_tokenization_spaces: bool = True, **kwargs):
        if not vocab_file or not os.path.isfile(vocab_file):
            from rlhf_ds.errors import UserError

            raise UserError(f"chatglm: the tokenizer needs ice_text.model (ChatGLM-6B's SentencePiece model) beside "
                            f"config.json, and there is none ({vocab_file}); ChatGLM2/3 folders, which ship "
                            f"tokenizer.model instead, are not supported")
        self.vocab_file = vocab_file
        self.do_lower_case = do_lower_case
        self.remove_space = remove_space
        self.num_image_tokens = num_image_tokens
        self.ice = IceText(vocab_file, num_image_tokens)
        if kwargs.get("chat_template") is None:
            kwargs["chat_template"] = CHAT_TEMPLATE
        kwargs.pop("auto_map", None)  # the published remote code; a folder rlhf_ds saves never points at it
        super().__init__(do_lower_case=do_lower_case, remove_space=remove_space, bos_token=bos_token,
                         eos_token=eos_token, end_token=end_token, mask_token=mask_token, gmask_token=gmask_token,
                         padding_side=padding_side, pad_token=pad_token, unk_token=unk_token,
                         num_image_tokens=num_image_tokens,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # ----------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self.ice)

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.ice.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self.ice.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.ice.id_to_piece(index) if 0 <= index < self.vocab_size else ""

    # -------------------------------------------------------------------------------------- text <-> ids
    def _tokenize(self, text: str, **kwargs) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.ice.pieces(text)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self.ice.decode_pieces([t for t in tokens if t])

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        token_ids = [int(i) for i in token_ids if int(i) != self.pad_token_id and 0 <= int(i) < self.vocab_size]
        if not token_ids:
            return ""
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # --------------------------------------------------------------------------------- special tokens
    @property
    def gmask_id(self) -> int:
        return self.ice.piece_to_id(str(self.gmask_token))

    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        ids = token_ids_0 + [self.gmask_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids) | {self.gmask_id}
            return [int(i in special) for i in token_ids_0 + (token_ids_1 or [])]
        mask = [0] * len(token_ids_0) + [1, 1]
        if token_ids_1 is not None:
            mask += [0] * len(token_ids_1) + [1]
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int],
                                             token_ids_1: list[int] | None = None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        out = os.path.join(save_directory, name) if os.path.isdir(save_directory) else save_directory
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
