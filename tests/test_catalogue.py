"""The task catalogue: `tasks.get(name, tokenizer, n, seed)` builds the classic circuit tasks as circuits.Task."""

from __future__ import annotations

import random
import re

import pytest

import circuits
from circuits import tasks
from circuits.testing import VOCAB, tiny_hf

NAMES = ["ioi", "greater_than", "induction", "docstring", "sva", "capitals", "gendered_pronoun"]


class WordTokenizer:
    """A GPT-2-like stand-in: a word with its leading space is one token, and numbers go two digits a token."""

    PATTERN = re.compile(r" ?[A-Za-z]+| ?\d{1,2}| ?[^\sA-Za-z\d]+|\s+")

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.vocab.setdefault(piece, len(self.vocab)) for piece in self.PATTERN.findall(text)]}

    def convert_ids_to_tokens(self, ids):
        inverse = {i: piece for piece, i in self.vocab.items()}
        return [inverse[i] for i in ids]

    def decode(self, ids):
        return "".join(self.convert_ids_to_tokens(ids))


class CharacterTokenizer(WordTokenizer):
    """Every character a token: no name or word is a single token."""

    PATTERN = re.compile(r".", re.DOTALL)


def examples(task: circuits.Task) -> list[tuple]:
    if task.token_ids:
        return list(zip(*task.token_ids.values(), strict=True))
    return list(zip(task.clean, task.corrupted, task.answers, task.wrong_answers, strict=True))


# --- the catalogue ------------------------------------------------------------------------------


def test_available_lists_all_seven_tasks_with_a_description():
    catalogue = tasks.available()
    assert sorted(catalogue) == sorted(NAMES)
    assert all(isinstance(text, str) and text.strip() and "\n" not in text for text in catalogue.values())


@pytest.mark.parametrize("name", NAMES)
def test_every_task_has_exactly_n_examples(name):
    task = tasks.get(name, n=17)
    assert isinstance(task, circuits.Task)
    assert len(task) == 17
    assert task.name == name


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_gives_the_same_task(name):
    assert examples(tasks.get(name, n=20, seed=3)) == examples(tasks.get(name, n=20, seed=3))


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_give_different_tasks(name):
    assert examples(tasks.get(name, n=20, seed=0)) != examples(tasks.get(name, n=20, seed=1))


@pytest.mark.parametrize("name", NAMES)
def test_a_few_hundred_examples_can_be_drawn(name):
    assert len(tasks.get(name, n=300)) == 300


def test_generators_leave_the_global_random_state_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    for name in NAMES:
        tasks.get(name, n=8, seed=5)
    assert random.random() == expected


def test_an_unknown_name_is_an_error_listing_the_available_tasks():
    with pytest.raises(ValueError, match="unknown task 'nope'") as error:
        tasks.get("nope")
    assert all(name in str(error.value) for name in NAMES)


@pytest.mark.parametrize("n", [0, -3])
def test_n_below_one_is_an_error(n):
    with pytest.raises(ValueError, match="n must be"):
        tasks.get("ioi", n=n)


@pytest.mark.parametrize("name", NAMES)
def test_with_a_tokenizer_every_task_tokenizes_into_equal_length_pairs(name):
    tokenizer = WordTokenizer()
    tokenized = tasks.get(name, tokenizer, n=16).tokenize(tokenizer)
    assert len(tokenized) == 16


@pytest.mark.parametrize("name", [name for name in NAMES if name != "greater_than"])  # digits are single tokens
def test_a_tokenizer_that_leaves_too_few_single_tokens_is_an_error(name):
    with pytest.raises(ValueError, match="single tokens"):
        tasks.get(name, CharacterTokenizer(), n=4)


# --- what each task asks ------------------------------------------------------------------------


def test_ioi_answers_the_indirect_object_and_corrupts_with_three_new_names():
    orders = set()
    for clean, corrupted, answer, wrong in examples(tasks.get("ioi", n=100)):
        io, subject = answer.strip(), wrong.strip()
        clean_words, corrupted_words = re.findall(r"\w+", clean), re.findall(r"\w+", corrupted)
        assert clean_words.count(io) == 1 and clean_words.count(subject) == 2
        orders.add(clean_words.index(io) < clean_words.index(subject))  # ABBA or BABA
        changed = [c for w, c in zip(clean_words, corrupted_words, strict=True) if w != c]
        assert len(changed) == 3 and len(set(changed)) == 3
        assert io not in corrupted_words and subject not in corrupted_words
    assert orders == {True, False}


def test_greater_than_answers_are_the_digits_above_the_start_years_tens_digit():
    for clean, corrupted, answers, wrong in examples(tasks.get("greater_than", n=50)):
        start = re.search(r"from the year \d\d(\d\d)", clean).group(1)
        century = clean[-2:]
        assert clean.startswith("The ") and corrupted == clean.replace(century + start, century + "01", 1)
        assert answers == [str(d) for d in range(int(start[0]) + 1, 10)]
        assert wrong == [str(d) for d in range(int(start[0]))]
        assert answers and wrong


def test_greater_than_uses_two_digit_answers_when_the_tokenizer_writes_years_two_digits_a_token():
    for clean, _, answers, wrong in examples(tasks.get("greater_than", WordTokenizer(), n=20)):
        start = int(re.search(r"from the year \d\d(\d\d)", clean).group(1))
        assert answers == [f"{y:02d}" for y in range(start + 1, 100)]
        assert wrong == [f"{y:02d}" for y in range(start)]


def test_induction_without_a_tokenizer_is_token_ids_of_the_tiny_vocabulary():
    task = tasks.get("induction", n=30)
    assert task.token_ids is not None
    half = tasks.induction.FIRST_HALF
    for clean, corrupted, answer, wrong in examples(task):
        repeat = clean[half:]
        assert clean[: len(repeat)] == repeat and answer == clean[len(repeat)]
        assert corrupted[half:] == repeat and not set(corrupted[:half]) & set(clean[:half])
        assert answer not in corrupted and wrong not in clean + corrupted
        assert all(1 <= t < VOCAB for t in clean + corrupted + [answer, wrong])


def test_induction_runs_on_a_tiny_model():
    model = circuits.Model.from_hf(tiny_hf("llama"))
    baseline = tasks.get("induction", n=12).baseline(model)
    assert len(baseline.per_example) == 12
    assert 0 <= baseline.accuracy <= 1


def test_docstring_answers_the_next_parameter_and_corrupts_every_parameter_name():
    for clean, corrupted, answer, wrong in examples(tasks.get("docstring", n=50)):
        parameters = re.search(r"\(self, (.*)\):", clean).group(1).split(", ")
        documented = re.findall(r":param (\w+):", clean)
        assert documented == parameters[: len(documented)]
        assert (answer, wrong) == (" " + parameters[len(documented)], " " + parameters[len(documented) + 1])
        assert clean.endswith(":param") and corrupted.endswith(":param")
        assert not set(re.findall(r"\w+", corrupted)) & set(parameters)


def test_sva_corrupts_the_subjects_number_and_answers_the_agreeing_verb():
    plural_of = dict(tasks.sva.NOUNS)
    for clean, corrupted, answer, wrong in examples(tasks.get("sva", n=50)):
        differing = [(a, b) for a, b in zip(clean.split(), corrupted.split(), strict=True) if a != b]
        assert len(differing) == 1
        subject, other = differing[0]
        assert {subject, other} in [{singular, plural} for singular, plural in tasks.sva.NOUNS]
        agreeing = (
            [(" are", " is"), (" were", " was")]
            if subject in plural_of.values()
            else [(" is", " are"), (" was", " were")]
        )
        assert (answer, wrong) in agreeing


def test_capitals_wrong_answer_is_the_corrupted_countrys_capital():
    from circuits.tasks.capitals import CAPITALS

    for clean, corrupted, answer, wrong in examples(tasks.get("capitals", n=50)):
        country = next(c for c in CAPITALS if c in clean)
        other = next(c for c in CAPITALS if c in corrupted)
        assert (answer, wrong) == (" " + CAPITALS[country], " " + CAPITALS[other]) and country != other


def test_gendered_pronoun_answers_the_clean_names_pronoun():
    from circuits.tasks._names import FEMALE, MALE

    for clean, corrupted, answer, wrong in examples(tasks.get("gendered_pronoun", n=50)):
        name = next(w for w in re.findall(r"\w+", clean) if w not in re.findall(r"\w+", corrupted))
        assert (answer, wrong) == ((" he", " she") if name in MALE else (" she", " he"))
        assert name in MALE + FEMALE


# --- with the real tokenizer and model (SmolLM2-135M) ---------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    return circuits.load_model("smollm2-135m", device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_task_fits_the_smollm2_tokenizer(smollm2, name):
    task = tasks.get(name, smollm2.tokenizer, n=128)
    tokenized = task.tokenize(smollm2.tokenizer)  # raises on unequal pairs or multi-token answers
    assert len(tokenized) == 128


@pytest.mark.slow
def test_induction_words_are_one_smollm2_token_each(smollm2):
    task = tasks.get("induction", smollm2.tokenizer, n=32)
    for prompt in task.clean + task.corrupted:
        assert len(smollm2.tokenizer(prompt)["input_ids"]) == len(prompt.split())


@pytest.mark.slow
def test_smollm2_does_ioi(smollm2):
    baseline = tasks.get("ioi", smollm2.tokenizer, n=64).baseline(smollm2)
    assert baseline.clean > 3.5 and baseline.corrupted < 1
    assert baseline.accuracy > 0.9


# --- per-tokenizer assumptions: clear one-line errors that name the task and the tokenizer ----------------------


class BosWordTokenizer(WordTokenizer):
    """The word stand-in with a beginning-of-sequence token in front of every prompt, as Gemma's tokenizer does."""

    def __init__(self):
        super().__init__()
        self.vocab["<bos>"] = 0

    def __call__(self, text, add_special_tokens=True):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": [0] + ids if add_special_tokens else ids}


class ThreeDigitTokenizer(WordTokenizer):
    """Numbers three digits a token: ' 1745' is ' 174', '5'."""

    PATTERN = re.compile(r" ?[A-Za-z]+| ?\d{1,3}| ?[^\sA-Za-z\d]+|\s+")


class SplitSheTokenizer(WordTokenizer):
    """' she' is two tokens."""

    PATTERN = re.compile(r" sh(?=e\b)| ?[A-Za-z]+| ?\d{1,2}| ?[^\sA-Za-z\d]+|\s+")


class WordPairTokenizer(WordTokenizer):
    """Two words in a row make one token: every word is one token alone, but not in a sequence."""

    PATTERN = re.compile(r"(?: ?[A-Za-z]+){1,2}| ?\d{1,2}| ?[^\sA-Za-z\d]+|\s+")


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", NAMES)
def test_every_task_fits_a_tokenizer_that_adds_a_bos_token(name):
    tokenizer = BosWordTokenizer()
    assert len(tasks.get(name, tokenizer, n=16).tokenize(tokenizer)) == 16


def test_induction_counts_words_without_the_bos_token():
    tokenizer = BosWordTokenizer()
    for prompt in tasks.get("induction", tokenizer, n=16).clean:
        assert len(tokenizer(prompt)["input_ids"]) == len(prompt.split()) + 1


def test_greater_than_under_a_tokenizer_with_other_year_pieces_names_the_task_tokenizer_and_pieces():
    with pytest.raises(circuits.CircuitsError) as error:
        tasks.get("greater_than", ThreeDigitTokenizer(), n=4)
    message = one_line(error)
    assert message.startswith("task 'greater_than' under ThreeDigitTokenizer: ")
    assert "one digit a token or two digits a token" in message and "' 1745' is ['174', '5']" in message


def test_an_answer_that_is_several_tokens_is_named_with_its_pieces():
    with pytest.raises(circuits.CircuitsError) as error:
        tasks.get("gendered_pronoun", SplitSheTokenizer(), n=4)
    message = one_line(error)
    assert message.startswith("task 'gendered_pronoun' under SplitSheTokenizer: only 0 of the 4 examples")
    assert "an answer is not one token, e.g. ' she' -> [' sh', 'e']" in message


def test_induction_under_a_tokenizer_that_merges_words_says_so():
    with pytest.raises(circuits.CircuitsError) as error:
        tasks.get("induction", WordPairTokenizer(), n=4)
    message = one_line(error)
    assert message.startswith("task 'induction' under WordPairTokenizer: ")
    assert "the words do not tokenize one token a word in sequence" in message


@pytest.mark.parametrize("name", [name for name in NAMES if name != "greater_than"])
def test_too_few_single_tokens_names_the_task_and_the_tokenizer(name):
    with pytest.raises(circuits.CircuitsError) as error:
        tasks.get(name, CharacterTokenizer(), n=4)
    assert one_line(error).startswith(f"task {name!r} under CharacterTokenizer: only ")


def test_pairs_of_different_lengths_are_named_with_an_example():
    from circuits.tasks._common import Example, Tokens, build

    with pytest.raises(circuits.CircuitsError) as error:
        build("demo", 3, 0, Tokens(WordTokenizer()), lambda rng: Example("a b c", "a bc", " x", " y"))
    message = one_line(error)
    assert message.startswith("task 'demo' under WordTokenizer: only 0 of the 3 examples")
    assert "tokenize to different lengths, e.g. 'a b c' (3 tokens) vs 'a bc' (2)" in message


def test_the_tokenizer_is_named_with_where_it_was_loaded_from():
    from circuits.tasks._common import describe

    tokenizer = CharacterTokenizer()
    tokenizer.name_or_path = "/cache/gemma3-270m"
    assert describe(tokenizer) == "CharacterTokenizer('/cache/gemma3-270m')"
    assert describe(None) == "no tokenizer"
