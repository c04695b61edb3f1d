"""LM decoding helpers: fairseq-kd-lexicon (the lexicon decode_kenlm reads) and fairseq-kd-infer's
check for flashlight's decoder (flashlight-text is an optional extra, so CI may not have it)."""

from __future__ import annotations

from pathlib import Path

import math
import re
import sys
from collections import Counter

import pytest
import torch
from fairseq.data import Dictionary
from omegaconf import OmegaConf

from fairseq_kd.cli import infer
from fairseq_kd.cli.lexicon import main

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"


def read_lexicon(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        word, spelling = line.split("\t")
        assert word not in entries, f"{word} listed twice"
        entries[word] = spelling
    return entries


def test_bundled_train_words_spell_like_their_letter_labels(tmp_path: Path) -> None:
    out = tmp_path / "lexicon.txt"
    args = ["--dict", str(MANIFESTS / "dict.ltr.txt"), "--out", str(out)]
    assert main(args + [str(MANIFESTS / "train.wrd")]) == 0
    lexicon = read_lexicon(out)
    words = MANIFESTS.joinpath("train.wrd").read_text().splitlines()
    letters = MANIFESTS.joinpath("train.ltr").read_text().splitlines()
    assert set(lexicon) == {w for line in words for w in line.split()}
    assert list(lexicon) == sorted(lexicon)
    # every word's spelling is exactly its piece of the .ltr label the model was trained on
    for wrd, ltr in zip(words, letters, strict=True):
        pieces = [p.strip() + " |" for p in ltr.split("|")[:-1]]
        assert [lexicon[w] for w in wrd.split()] == pieces
    assert lexicon["SHE'S"] == "S H E ' S |"


def exit_message(main_fn, argv) -> str:
    """The message of a console script's clean error exit (code 2, fairseq_kd/cli/errors.py)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main_fn(argv)
    assert code == 2, err.getvalue()
    return err.getvalue()


def test_vocabulary_file_keeps_case_and_reports_unspellable_words(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("hello\nB52\nworld hello\n")
    out = tmp_path / "lexicon.txt"
    args = ["--dict", str(MANIFESTS / "dict.ltr.txt"), "--out", str(out), str(vocab)]
    message = exit_message(main, args)
    assert f"{vocab}:2: word 'B52' has units ['2', '5']" in message
    assert "--skip-unspellable" in message and not out.exists()

    assert main(args + ["--skip-unspellable"]) == 0
    # words kept as written (they must match the LM's words), spellings in the dictionary's units
    assert read_lexicon(out) == {"hello": "H E L L O |", "world": "W O R L D |"}


def test_existing_lexicon_is_kept_without_overwrite(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("CAT\n")
    out = tmp_path / "lexicon.txt"
    out.write_text("mine\n")
    args = ["--dict", str(MANIFESTS / "dict.ltr.txt"), "--out", str(out), str(vocab)]
    assert re.search("(?s)already exist.*--overwrite", exit_message(main, args))
    assert out.read_text() == "mine\n"
    assert main(args + ["--overwrite"]) == 0
    assert out.read_text() == "CAT\tC A T |\n"


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    out = str(tmp_path / "lexicon.txt")
    assert re.search("word file .*nope.wrd does not exist",
                     exit_message(main, ["--dict", str(MANIFESTS / "dict.ltr.txt"), "--out", out, str(tmp_path / "nope.wrd")]))
    assert re.search("--dict .*nodict.txt does not exist",
                     exit_message(main, ["--dict", str(tmp_path / "nodict.txt"), "--out", out, str(MANIFESTS / "train.wrd")]))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--config-name", "decode_kenlm", "task.data=m"], True),
        (["--config-name=decode_kenlm"], True),
        (["--config-name", "decode_viterbi", "decoding.type=kenlm"], True),
        (["--config-name", "decode_kenlm", "decoding.type=viterbi"], False),
        (["--config-name", "decode_viterbi", "common_eval.path=decode_kenlm"], False),
    ],
)
def test_which_command_lines_need_flashlight(argv: list[str], expected: bool) -> None:
    assert infer.uses_flashlight(argv) is expected


def test_kenlm_decoding_without_flashlight_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # as if flashlight-text were not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "flashlight.lib.text.decoder", None)
    monkeypatch.setattr(sys, "argv", ["fairseq-kd-infer", "--config-name", "decode_kenlm", "common.cpu=true"])
    with pytest.raises(SystemExit, match="pip install flashlight-text"):
        infer.main()


# -- decode_kenlm's beam search on a misspelled emission ------------------------------------------
def unigram_arpa(path: Path, words: Path) -> None:
    """Word-count unigram probabilities as an order-2 ARPA file with no bigrams (KenLM refuses
    order 1; its lmplz is a C++ build that CI does not have)."""
    lines = words.read_text().splitlines()
    counts = Counter(w for line in lines for w in line.split())
    counts["</s>"] = len(lines)
    total = sum(counts.values()) + 1  # + 1 for <unk>
    probs = {"<unk>": 1 / total, **{w: c / total for w, c in counts.items()}}
    unigrams = [f"{math.log10(p):.6f}\t{w}\t0" for w, p in probs.items()] + ["-99\t<s>\t0"]
    header = f"\\data\\\nngram 1={len(unigrams)}\nngram 2=0\n\n\\1-grams:\n"
    path.write_text(header + "\n".join(unigrams) + "\n\n\\2-grams:\n\n\\end\\\n")


def letter_emissions(text: str, tgt_dict: Dictionary, confusions: dict[int, str]) -> torch.Tensor:
    """CTC log-probabilities (1, T, V) spelling ``text``: each unit for one frame, then a blank frame.

    At unit position ``i`` in ``confusions`` the given wrong letter wins (0.5) over the right one (0.4).
    """
    units = list(" ".join(text.split()).replace(" ", "|")) + ["|"]
    probs = torch.full((2 * len(units), len(tgt_dict)), 1e-4)
    for i, unit in enumerate(units):
        probs[2 * i, tgt_dict.index(unit)] = 0.4 if i in confusions else 0.9
        if i in confusions:
            probs[2 * i, tgt_dict.index(confusions[i])] = 0.5
        probs[2 * i + 1, tgt_dict.bos()] = 0.9  # fairseq's CTC blank is <s>
    return (probs / probs.sum(-1, keepdim=True)).log().unsqueeze(0).contiguous()


def test_decode_kenlm_settings_correct_a_misspelling_that_viterbi_keeps(tmp_path: Path) -> None:
    """fairseq's own KenLMDecoder with decode_kenlm.yaml's decoding section, our lexicon, a word LM."""
    infer.alias_fairseq_examples()
    from examples.speech_recognition.new.decoders.decoder import Decoder
    from examples.speech_recognition.new.infer import DecodingConfig

    lexicon, arpa = tmp_path / "lexicon.txt", tmp_path / "lm.arpa"
    words = MANIFESTS / "train.wrd"
    assert main(["--dict", str(MANIFESTS / "dict.ltr.txt"), "--out", str(lexicon), str(words)]) == 0
    unigram_arpa(arpa, words)
    recipe = OmegaConf.load(REPO / "fairseq_kd" / "config" / "decode_kenlm.yaml").decoding
    cfg = OmegaConf.merge(  # infer.py's decoding group, as hydra composes it for decode_kenlm
        OmegaConf.structured(DecodingConfig),
        recipe,
        {"lmpath": str(arpa), "lexicon": str(lexicon), "results_path": str(tmp_path)},
    )
    tgt_dict = Dictionary.load(str(MANIFESTS / "dict.ltr.txt"))
    # "JOLLY RADIO" with the D of RADIO heard as a T: "RATIO" is not a word of the training set
    emissions = letter_emissions("JOLLY RADIO", tgt_dict, confusions={8: "T"})

    def words_of(decoder) -> str:
        tokens = decoder.decode(emissions)[0][0]["tokens"]
        return tgt_dict.string(tokens).replace(" ", "").replace("|", " ").strip()

    assert "RATIO" not in lexicon.read_text().split()
    assert words_of(Decoder(OmegaConf.create({"type": "viterbi"}), tgt_dict)) == "JOLLY RATIO"
    assert words_of(Decoder(cfg, tgt_dict)) == "JOLLY RADIO"
