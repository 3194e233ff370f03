"""Helpers shared by the source, workflow and command-line tests."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch

from quantaware.cli import main


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with its output captured (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def save_photo(array: np.ndarray, path: Path, side: int = 64) -> None:
    """A real photo, shrunk to ``side`` x ``side``, written where the test wants it."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).resize((side, side)).save(path)


class Exploit:
    """Unpickling this writes a file: the side effect a crafted weights file would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def write_bert_folder(folder: Path, vocab: list[str], layers: int = 2, seed: int = 0,
                      transformers_extras: bool = False):
    """A tiny BERT model folder (config.json, model.safetensors and a WordPiece
    tokenizer.json over ``vocab``); returns the MiniLM whose weights it holds.

    ``transformers_extras`` adds the ``position_ids`` and pooler entries that files
    saved by transformers carry (the loader drops them)."""
    from safetensors import torch as safetensors_torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from quantaware.zoo.minilm import MiniLM, MiniLMConfig

    folder.mkdir(parents=True)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "bert", "hidden_act": "gelu", "vocab_size": len(vocab),
        "hidden_size": 32, "num_hidden_layers": layers, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 16, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12}))
    torch.manual_seed(seed)
    model = MiniLM(MiniLMConfig(vocab_size=len(vocab), hidden_size=32, num_layers=layers,
                                num_heads=4, intermediate_size=64, max_positions=16)).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if transformers_extras:
        state["embeddings.position_ids"] = torch.arange(16)[None]
        state["pooler.dense.weight"] = torch.zeros(32, 32)
    safetensors_torch.save_file(state, str(folder / "model.safetensors"))
    return model
