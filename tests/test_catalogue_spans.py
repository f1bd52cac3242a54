"""The catalogue's spans: every task names, per example, the token positions that play each role (circuits.spans)."""

from __future__ import annotations

import re

import pytest
from test_catalogue import NAMES, BosWordTokenizer, WordTokenizer

import circuits
from circuits import tasks
from circuits.spans import layout
from circuits.task import TokenizedTask

# --- what each task's spans other than END mark, from an example (clean, corrupted, answer, wrong) ---------------


def ioi_words(clean, corrupted, answer, wrong):
    subject = wrong.strip()
    after = re.search(rf"\b{subject}\b\W*(\w+)", clean)[1]
    return {"IO": answer.strip(), "S1": subject, "S1+1": after, "S2": subject}


def greater_than_words(clean, corrupted, answer, wrong):
    century, digits = re.search(r"from the year (\d\d)(\d\d) ", clean).groups()
    return {"XX": century, "YY": digits}


def induction_words(clean, corrupted, answer, wrong):
    return {"A": clean.split()[-1], "B": answer.strip()}


def docstring_words(clean, corrupted, answer, wrong):
    documented = re.findall(r":param (\w+):", clean)[-1]
    return {"B_DEF": documented, "C_DEF": answer.strip(), "B_DOC": documented}


def sva_words(clean, corrupted, answer, wrong):
    return {"SUBJ": changed_word(clean, corrupted)}


def capitals_words(clean, corrupted, answer, wrong):
    return {"COUNTRY": next(country for country, capital in tasks.capitals.CAPITALS.items() if " " + capital == answer)}


def gendered_pronoun_words(clean, corrupted, answer, wrong):
    return {"NAME": changed_word(clean, corrupted)}


def changed_word(clean: str, corrupted: str) -> str:
    (word,) = [a for a, b in zip(re.findall(r"\w+", clean), re.findall(r"\w+", corrupted), strict=True) if a != b]
    return word


EXPECTED = {
    "ioi": ioi_words,
    "greater_than": greater_than_words,
    "induction": induction_words,
    "docstring": docstring_words,
    "sva": sva_words,
    "capitals": capitals_words,
    "gendered_pronoun": gendered_pronoun_words,
}


def rows(task: circuits.Task) -> list[tuple]:
    return list(zip(task.clean, task.corrupted, task.answers, task.wrong_answers, strict=True))


def prompt_key(task: circuits.Task, i: int):
    """Example ``i``'s clean prompt, to find it in another task."""
    return tuple(task.token_ids["clean_ids"][i]) if task.token_ids else task.clean[i]


def span_texts(tokenizer, tokenized: TokenizedTask, i: int) -> dict[str, str]:
    """Example ``i``'s spans as the text of their tokens."""
    ids = tokenized.clean_ids[i]
    return {
        name: tokenizer.decode(ids[tokenized.span_ids[i] == s].tolist()).strip()
        for s, name in enumerate(tokenized.span_names)
    }


def read_at(tokenized: TokenizedTask) -> list[str]:
    """The spans the logits are read at."""
    spans, _ = layout(tokenized)
    return [span for span, read in zip(spans.names, spans.readout.tolist(), strict=True) if read]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer from the bundled model's local directory; the tests that need it skip without it."""
    try:
        from transformers import AutoTokenizer

        from circuits.model import bundled_directory

        return AutoTokenizer.from_pretrained(bundled_directory("smollm2-135m"))
    except (ImportError, OSError, circuits.CircuitsError) as error:
        pytest.skip(f"the SmolLM2 tokenizer does not load offline: {error}")


TOKENIZERS = ["word", "bos", pytest.param("smollm2", marks=pytest.mark.slow)]


@pytest.fixture
def tokenizer(request):
    if request.param == "smollm2":
        return request.getfixturevalue("smollm2_tokenizer")
    return {"word": WordTokenizer, "bos": BosWordTokenizer}[request.param]()


# --- every task, under each tokenizer -----------------------------------------------------------


@pytest.mark.parametrize("tokenizer", TOKENIZERS, indirect=True)
@pytest.mark.parametrize("name", NAMES)
def test_every_task_declares_its_spans_and_end(tokenizer, name):
    task = tasks.get(name, tokenizer, n=32)
    assert task.spans is not None and len(task.spans) == 32
    for spans, example in zip(task.spans, rows(task), strict=True):
        assert list(spans) == [*EXPECTED[name](*example), "END"]


@pytest.mark.parametrize("tokenizer", TOKENIZERS, indirect=True)
@pytest.mark.parametrize("name", NAMES)
def test_each_span_marks_the_tokens_of_its_word(tokenizer, name):
    task = tasks.get(name, tokenizer, n=32)
    tokenized = task.tokenize(tokenizer)
    for i, example in enumerate(rows(task)):
        texts = span_texts(tokenizer, tokenized, i)
        assert {span: texts[span] for span in EXPECTED[name](*example)} == EXPECTED[name](*example)


@pytest.mark.parametrize("tokenizer", TOKENIZERS, indirect=True)
@pytest.mark.parametrize("name", NAMES)
def test_end_is_the_last_real_position_and_ends_the_prompt(tokenizer, name):
    task = tasks.get(name, tokenizer, n=32)
    tokenized = task.tokenize(tokenizer)
    end = tokenized.span_names.index("END")
    for i, clean in enumerate(task.clean):
        last = int(tokenized.attention_mask[i].sum()) - 1
        marked = (tokenized.span_ids[i] == end).nonzero().flatten().tolist()
        if not marked:  # sva's "The old keys": the subject ends the prompt, and there is no END
            assert name == "sva" and tokenized.span_names[int(tokenized.span_ids[i, last])] == "SUBJ"
            continue
        assert marked == list(range(marked[0], last + 1))
        assert clean.endswith(span_texts(tokenizer, tokenized, i)["END"])


@pytest.mark.parametrize("tokenizer", TOKENIZERS, indirect=True)
@pytest.mark.parametrize("name", NAMES)
def test_the_logits_are_read_only_at_end(tokenizer, name):
    read = read_at(tasks.get(name, tokenizer, n=32).tokenize(tokenizer))
    assert read == (["SUBJ", "END"] if name == "sva" else ["END"])  # sva: also SUBJ, in "The old keys"


@pytest.mark.parametrize("name", [name for name in NAMES if name != "induction"])  # induction: token ids
def test_without_a_tokenizer_each_character_range_holds_its_word_and_end_ends_the_prompt(name):
    task = tasks.get(name, n=32)
    for spans, example in zip(task.spans, rows(task), strict=True):
        clean = example[0]
        assert {span: clean[slice(*spans[span])].strip() for span in EXPECTED[name](*example)} == EXPECTED[name](
            *example
        )
        if not spans["END"]:  # sva's "The old keys"
            assert name == "sva" and spans["SUBJ"][1] == len(clean)
        else:
            assert spans["END"][1] == len(clean)


# --- induction without a tokenizer: token positions ---------------------------------------------


def test_induction_token_ids_mark_the_repeated_token_the_next_and_the_last():
    task = tasks.get("induction", n=32)
    tokenized = task.tokenize()
    ids = task.token_ids
    for i, (clean, answer) in enumerate(zip(ids["clean_ids"], ids["answer_ids"], strict=True)):
        positions = {name: task.spans[i][name] for name in ("A", "B", "END")}
        assert positions["END"] == [len(clean) - 1]
        assert clean[positions["A"][0]] == clean[-1] and clean[positions["B"][0]] == answer
        assert [tokenized.span_names[s] for s in tokenized.span_ids[i, positions["A"] + positions["B"]].tolist()] == [
            "A",
            "B",
        ]


def test_induction_token_ids_read_the_logits_only_at_end():
    assert read_at(tasks.get("induction", n=32).tokenize()) == ["END"]


# --- the spans travel with the task --------------------------------------------------------------

KINDS = ["ioi", "induction"]  # without a tokenizer: text, token ids


@pytest.mark.parametrize("name", KINDS)
def test_subset_keeps_the_spans(name):
    task = tasks.get(name, n=12)
    assert task.subset(5).spans == task.spans[:5]


@pytest.mark.parametrize("name", KINDS)
def test_split_keeps_each_examples_spans(name):
    task = tasks.get(name, n=12)
    spans_of = {prompt_key(task, i): spans for i, spans in enumerate(task.spans)}
    for side in task.split(0.5, seed=1):
        assert side.spans == [spans_of[prompt_key(side, i)] for i in range(len(side))]


@pytest.mark.parametrize("name", KINDS)
def test_to_dict_and_from_dict_keep_the_spans(name):
    task = tasks.get(name, n=12)
    assert circuits.Task.from_dict(task.to_dict()).spans == task.spans


@pytest.mark.parametrize("name", KINDS)
def test_to_jsonl_and_from_jsonl_keep_the_spans(name, tmp_path):
    task = tasks.get(name, n=12)
    assert circuits.Task.from_jsonl(task.to_jsonl(tmp_path / "task.jsonl")).spans == task.spans
