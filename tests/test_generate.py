"""Generation (``longnet_ref.generate``): incremental logits equal the full forward's at every position."""

import numpy as np
import pytest
from scipy.stats import chisquare

from longnet_ref import model as lm
from longnet_ref.checkpoint import load_checkpoint
from longnet_ref.cli import main
from longnet_ref.generate import Decoder, generate, new_caches, sample
from longnet_ref.validation import InputTypeError

from .tolerances import CHI_SQUARE_P_VALUE, DECODE_LOGITS
from .cli_runs import TINY_TRAIN

CASES = {
    # ragged segments (N = 23 is no multiple of any w), r > w, more heads than dilation and fewer
    "dilated": {"attention": "dilated", "segment_lengths": (4, 8, 3), "dilation_rates": (1, 2, 5)},
    "dilated-torchscale": {"attention": "dilated", "segment_lengths": (6, 12), "dilation_rates": (2, 4), "offsets": "torchscale"},
    "dilated-no-rope": {"attention": "dilated", "segment_lengths": (4, 16), "dilation_rates": (1, 4), "rope": False},
    "dense": {"attention": "dense"},
    "window": {"attention": "window", "window": 5},
}


def config_for(case, dtype="float64"):
    return lm.LongNetConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=4, dtype=dtype, seed=4, **CASES[case])


def perturbed_params(config, seed=0):
    """Off the init (zero biases, unit gains) so every term of every layer matters."""
    rng = np.random.default_rng(seed)
    return {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in lm.init_params(config).items()}


@pytest.mark.parametrize("prompt_length", [1, 9])
@pytest.mark.parametrize("case", list(CASES))
def test_incremental_logits_equal_the_full_forward_at_every_position(case, prompt_length):
    """Prefill ``T`` tokens, then feed the rest one by one: the logits of every position are the
    full causal forward's. float64; both paths compute the same softmax rows with different
    groupings (a cached row vs a segment), so they agree to rounding: 1e-10 relative to the
    logits' scale is ~1e5 eps_64, far below any real difference (which would be O(1))."""
    config = config_for(case)
    params = perturbed_params(config)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 23))  # (B, N)
    full, _ = lm.forward(config, params, tokens)  # (B, N, V)

    decoder = Decoder(config, params, batch=2)
    logits = [decoder.prefill(tokens[:, :prompt_length])]  # (B, T, V)
    for t in range(prompt_length, tokens.shape[1]):
        logits.append(decoder.step(tokens[:, t])[:, None])  # (B, 1, V)
    incremental = np.concatenate(logits, axis=1)
    np.testing.assert_allclose(incremental, full, rtol=0, atol=DECODE_LOGITS[np.dtype(np.float64)] * np.abs(full).max())


@pytest.mark.parametrize("case", ["dilated", "dense"])  # both cache kinds keep the model's dtype
def test_float32_incremental_logits_agree_to_float32_rounding(case):
    config = config_for(case, dtype="float32")
    params = perturbed_params(config)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (1, 17))
    full, _ = lm.forward(config, params, tokens)
    decoder = Decoder(config, params, batch=1)
    incremental = np.concatenate([decoder.prefill(tokens[:, :5])] + [decoder.step(tokens[:, t])[:, None] for t in range(5, 17)], 1)
    assert incremental.dtype == np.float32
    # float32: a few hundred rounding steps through 2 layers (tests/tolerances.py DECODE_LOGITS)
    np.testing.assert_allclose(incremental, full, rtol=0, atol=DECODE_LOGITS[np.dtype(np.float32)] * np.abs(full).max())


@pytest.mark.parametrize("case", ["dilated", "dense", "window"])
def test_greedy_generation_extends_the_prompt_with_the_forwards_arg_max(case):
    """Temperature 0: each new token is the arg-max of the full forward on the sequence so far.
    Four prompts, so that some row's continuation changes token (a decoder that stopped stepping,
    or stepped the wrong token, repeats one)."""
    config = config_for(case)
    params = perturbed_params(config)
    prompt = np.random.default_rng(3).integers(0, config.vocab_size, (4, 5))
    out = generate(config, params, prompt, 8, temperature=0)
    assert out.shape == (4, 13) and (out[:, :5] == prompt).all()
    assert len(set(out[:, 5:].ravel())) > 2  # the continuations are not one repeated token
    for t in range(5, 13):
        logits, _ = lm.forward(config, params, out[:, :t])
        np.testing.assert_array_equal(out[:, t], logits[:, -1].argmax(-1))
    one = generate(config, params, prompt[0], 8, temperature=0)
    np.testing.assert_array_equal(one, out[0])  # a 1-D prompt gives the same row, 1-D


def test_sampling_is_deterministic_from_the_seed_and_respects_top_k():
    config = config_for("window")
    params = perturbed_params(config)
    prompt = np.zeros((3, 4), np.int64)
    a = generate(config, params, prompt, 8, temperature=1.0, seed=5)
    b = generate(config, params, prompt, 8, temperature=1.0, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, generate(config, params, prompt, 8, temperature=1.0, seed=6))  # the seed is used
    top1 = generate(config, params, prompt, 8, temperature=1.0, top_k=1, seed=6)
    np.testing.assert_array_equal(top1, generate(config, params, prompt, 8, temperature=0))


def softmax_with_temperature(logits, temperature):
    """``softmax(z / T)`` of one row, in float64, written out."""
    z = np.asarray(logits, np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def frequencies_fit(counts, probabilities):
    """Pearson's chi-square goodness of fit at ``CHI_SQUARE_P_VALUE`` (tests/tolerances.py). Bins
    expected below 5 draws are pooled (the chi-square approximation needs >= 5 per bin)."""
    expected = probabilities * counts.sum()
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    return chisquare(observed, expected).pvalue > CHI_SQUARE_P_VALUE


@pytest.mark.parametrize("temperature", [0.5, 2.0, 0.8])
def test_sampling_draws_from_the_softmax_of_the_logits_over_the_temperature(temperature):
    logits = np.array([0.0, 1.0, 2.0, 3.0, -1.0, 2.5])
    draws = sample(np.tile(logits, (6000, 1)), np.random.default_rng(11), temperature)  # (B,) one token per row
    assert draws.shape == (6000,)
    counts = np.bincount(draws, minlength=6)
    assert frequencies_fit(counts, softmax_with_temperature(logits, temperature))
    assert not frequencies_fit(counts, softmax_with_temperature(logits, 1.0))  # the test tells temperatures apart


def test_top_k_sampling_draws_from_the_k_largest_renormalised():
    logits = np.array([0.0, 1.0, 2.0, 3.0, -1.0, 2.5])
    draws = sample(np.tile(logits, (6000, 1)), np.random.default_rng(12), 0.7, top_k=3)
    counts = np.bincount(draws, minlength=6)
    assert counts[[0, 1, 4]].sum() == 0  # only tokens 2, 5, 3 (the three largest)
    kept = np.where(np.isin(np.arange(6), [2, 3, 5]), logits, -np.inf)
    assert frequencies_fit(counts, softmax_with_temperature(kept, 0.7))
    # top_k = V - 1 drops only the smallest logit (token 4, probability 0.0018 without top-k: ~11 of 6000)
    counts = np.bincount(sample(np.tile(logits, (6000, 1)), np.random.default_rng(13), 0.7, top_k=5), minlength=6)
    assert counts[4] == 0
    assert frequencies_fit(counts, softmax_with_temperature(np.where(np.arange(6) == 4, -np.inf, logits), 0.7))


def test_sampling_is_stable_for_huge_logits():
    """``exp`` of logits ~1e3 / T overflows unless the row max is subtracted first."""
    logits = np.array([[1000.0, 0.0, -1000.0], [-1000.0, 0.0, 999.0]])
    for temperature in (1.0, 0.5):
        np.testing.assert_array_equal(sample(logits, np.random.default_rng(0), temperature), [0, 2])


def test_greedy_sampling_is_the_arg_max_of_each_row():
    logits = np.random.default_rng(0).standard_normal((50, 9))
    np.testing.assert_array_equal(sample(logits, np.random.default_rng(0), 0), logits.argmax(-1))


@pytest.mark.parametrize("max_new_tokens", [0, 1, 4])
def test_generate_emits_exactly_max_new_tokens_after_the_prompt(max_new_tokens):
    config = config_for("dilated")
    params = perturbed_params(config)
    prompt = np.array([[3, 1, 4], [1, 5, 9]])
    streamed = []
    out = generate(config, params, prompt, max_new_tokens, temperature=0.9, seed=1, on_token=streamed.append)
    assert out.shape == (2, 3 + max_new_tokens)
    np.testing.assert_array_equal(out[:, :3], prompt)
    assert len(streamed) == max_new_tokens
    for i, token in enumerate(streamed):
        np.testing.assert_array_equal(token, out[:, 3 + i])
    assert generate(config, params, prompt[0], max_new_tokens, seed=1).shape == (3 + max_new_tokens,)


@pytest.mark.parametrize("temperature, top_k", [(0.6, None), (1.7, 4)])
def test_generated_tokens_follow_the_forwards_softmax_over_the_temperature(temperature, top_k):
    """3000 copies of one prompt, one new token each: their frequencies are ``softmax(z / T)`` of the
    full forward's last logits (restricted to the ``top_k`` largest)."""
    config = config_for("window")
    params = perturbed_params(config)
    prompt = np.array([2, 7, 1, 8])
    logits, _ = lm.forward(config, params, prompt[None])
    z = logits[0, -1]
    if top_k is not None:
        z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
    out = generate(config, params, np.tile(prompt, (3000, 1)), 1, temperature=temperature, top_k=top_k, seed=3)
    counts = np.bincount(out[:, -1], minlength=config.vocab_size)
    assert frequencies_fit(counts, softmax_with_temperature(z, temperature))


def test_generate_uses_the_params_given_with_a_longnet_lm():
    """``generate(LongNetLM, params, ...)``: the params given replace the module's (its own are the
    init); greedy decoding then extends the prompt with the arg-max of the full forward with them."""
    config = config_for("dilated")
    params = perturbed_params(config)
    tokens = generate(lm.LongNetLM(config), params, [3, 1, 4], 4, temperature=0)
    expected = [3, 1, 4]
    for _ in range(4):
        logits, _ = lm.forward(config, params, np.array([expected]))
        expected.append(int(logits[0, -1].argmax()))
    assert tokens.tolist() == expected


def test_the_dilated_caches_stay_bounded_while_generating():
    config = config_for("dilated")
    params = perturbed_params(config)
    decoder = Decoder(config, params, batch=1)
    decoder.prefill(np.array([[1, 2]]))
    sizes = {cache.nbytes for cache in decoder.caches}
    for t in range(40):
        decoder.step(np.array([t % 13]))
    assert {cache.nbytes for cache in decoder.caches} == sizes
    rows = sum(-(-w // r) for w, r in zip(config.segment_lengths, config.dilation_rates))  # sum ceil(w / r)
    assert all(cache.allocated_rows == rows for cache in decoder.caches)


def test_bad_generation_input_is_rejected():
    config = config_for("dilated")
    params = perturbed_params(config)
    with pytest.raises(ValueError, match="prompt_tokens must lie in"):
        generate(config, params, [1, 99], 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(config, params, [1, 2], -1)
    with pytest.raises(ValueError, match="temperature"):
        generate(config, params, [1, 2], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(config, params, [1, 2], 2, top_k=0)
    with pytest.raises(ValueError, match="causal"):
        new_caches(lm.LongNetConfig(causal=False), 1)


@pytest.mark.parametrize("new_tokens", [0, 1, 5])
def test_generate_returns_the_prompt_and_exactly_max_new_tokens_more(new_tokens):
    config = config_for("dilated")
    params = perturbed_params(config)
    tokens = generate(config, params, [3, 1, 4], new_tokens, temperature=0.7, seed=1)
    assert tokens.shape == (3 + new_tokens,) and tokens[:3].tolist() == [3, 1, 4]


def test_generate_command_streams_exactly_max_new_tokens_bytes_after_the_prompt(tmp_path, capfdbinary):
    text = tmp_path / "t.txt"
    text.write_text("abcabcabcabc " * 30)
    small = [*TINY_TRAIN, "--steps", "3", "--dtype", "float64"]
    assert main(["train", *small, "--text", str(text), "--out", str(tmp_path / "run")]) == 0
    capfdbinary.readouterr()
    checkpoint = tmp_path / "run" / "checkpoint.npz"
    state, _ = load_checkpoint(checkpoint)
    for new_tokens in (0, 7):
        code = main(["generate", "--checkpoint", str(checkpoint), "--prompt", "abc", "--max-new-tokens", str(new_tokens), "--temperature", "0"])
        assert code == 0
        printed = capfdbinary.readouterr().out
        assert printed.startswith(b"abc") and printed.endswith(b"\n")
        continuation = printed[3:-1]
        assert len(continuation) == new_tokens  # exactly --max-new-tokens bytes, streamed
        # greedy: the bytes the library's generate chooses for the same prompt
        expected = generate(state.config, state.params, list(b"abc"), new_tokens, temperature=0)[3:]
        assert list(continuation) == expected.tolist()


def test_generate_command_on_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "none.npz"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_generate_command_samples_with_its_seed_and_top_k(tmp_path, capfdbinary):
    """``--seed`` seeds the sampling (two seeds give two continuations at temperature 1, each the
    library's for that seed) and ``--top-k 1`` at temperature 1 keeps only the arg-max: greedy."""
    text = tmp_path / "t.txt"
    text.write_text("abcabcabcabc " * 30)
    small = [*TINY_TRAIN, "--steps", "1", "--dtype", "float64", "--eval-every", "0"]  # the last --eval-every wins
    assert main(["train", *small, "--text", str(text), "--out", str(tmp_path / "run")]) == 0
    checkpoint = str(tmp_path / "run" / "checkpoint.npz")
    state, _ = load_checkpoint(checkpoint)
    capfdbinary.readouterr()

    def continuation(*options):
        assert main(["generate", "--checkpoint", checkpoint, "--prompt", "abc", "--max-new-tokens", "12", *options]) == 0
        return list(capfdbinary.readouterr().out[3:-1])

    sampled = {seed: continuation("--temperature", "1", "--seed", str(seed)) for seed in (3, 4)}
    assert sampled[3] != sampled[4]  # 12 draws from a near-uniform 256-way softmax: equal with probability ~1e-29
    for seed, tokens in sampled.items():
        assert tokens == generate(state.config, state.params, list(b"abc"), 12, temperature=1.0, seed=seed)[3:].tolist()
    greedy = generate(state.config, state.params, list(b"abc"), 12, temperature=0)[3:].tolist()
    assert continuation("--temperature", "1", "--top-k", "1", "--seed", "3") == greedy


# ---- the edges of the checks (found by injected bugs) -----------------------------------------------


@pytest.mark.parametrize("prompt", [np.zeros(0, np.int64), np.zeros((2, 0), np.int64)], ids=["(0,)", "(2, 0)"])
def test_an_empty_prompt_is_refused(prompt):
    """The first sampled token is drawn from the logits at the prompt's last position: there must be one."""
    config = config_for("dilated")
    with pytest.raises(ValueError, match=r"prompt_tokens must have shape \(\d+, T >= 1\)"):
        generate(config, perturbed_params(config), prompt, 2)


def test_one_nan_logit_is_refused_in_any_row():
    """A single NaN makes its row's softmax NaN: refused as the all-NaN row is (not sampled)."""
    logits = np.zeros((3, 5))
    logits[1, 2] = np.nan
    with pytest.raises(ValueError, match="logits must not contain NaN"):
        sample(logits, np.random.default_rng(0))


def test_top_k_one_is_greedy_and_top_k_of_the_vocabulary_is_no_restriction():
    """``top_k = 1`` keeps only the arg-max (any temperature); ``top_k = V`` keeps every token."""
    logits = np.random.default_rng(1).standard_normal((40, 6))
    np.testing.assert_array_equal(sample(logits, np.random.default_rng(0), 1.3, top_k=1), logits.argmax(-1))
    # uniform logits, top_k = V: all 6 tokens drawn (600 draws miss one with probability 6 (5/6)^600 ~ 1e-47)
    assert set(sample(np.zeros((600, 6)), np.random.default_rng(5), 1.3, top_k=6).tolist()) == set(range(6))


def test_a_decoder_prefills_once_and_steps_one_token_per_sequence():
    """A second prompt would be read as rows after the first (a one-token prompt silently as a step);
    a step takes one token per sequence of the batch."""
    config = config_for("dilated")
    decoder = Decoder(config, perturbed_params(config), batch=2)
    decoder.prefill(np.array([[1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="prefill needs a fresh Decoder"):
        decoder.prefill(np.array([[5], [6]]))
    for token in (np.array([1, 2, 3]), np.array([1])):
        with pytest.raises(ValueError, match=r"token must have shape \(B,\) = \(2,\)"):
            decoder.step(token)
    assert decoder.position == 2


def test_generate_takes_a_config_or_a_module_only():
    config = config_for("dilated")
    with pytest.raises(InputTypeError, match="config must be a LongNetConfig or a LongNetLM, got dict"):
        generate(config.to_dict(), perturbed_params(config), [1, 2], 1)
