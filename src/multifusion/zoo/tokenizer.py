"""A small CLIP BPE tokenizer written from a word list: the zoo's shared tokenizer and the tiny
test pipelines' are made with it (no tokenizer download)."""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "a an the of in on and with at left right centre center red blue green yellow purple orange "
    "pink grey white black circle square triangle diamond star striped dotted checkered plain "
    "snowy field desert forest night sky sea cartoon photo cat dog tree house"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from byte values to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def write_clip_tokenizer(folder: str | Path, words: tuple[str, ...] | list[str] = WORDS) -> Path:
    """Write `vocab.json` and `merges.txt` of a small CLIP BPE tokenizer and save it with
    `CLIPTokenizer.save_pretrained` into `folder`. Whole words in `words` become single tokens;
    anything else falls back to byte symbols, so every string is encodable."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        # Merge left to right: ((w o) r) d</w>, adding each intermediate symbol to the vocabulary.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges.append((current, piece))
            current = current + piece
            if current not in vocab_list:
                vocab_list.append(current)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=16)
    tokenizer.save_pretrained(folder)
    return folder
