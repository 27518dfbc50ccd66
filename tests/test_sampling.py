"""The samplers against a float64 NumPy reference written from Hugging Face's logits processors, and against those
processors themselves: the kept tokens, their renormalised probabilities, the draws, seeds and log-probabilities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from zoo.inference.sampling import SamplingParams, processed_logprobs, sample, sampler_state

V = 12
# Distinct values (no ties) with both signs, so the repetition penalty's two branches both matter.
LOGITS = np.array([[2.1, -0.4, 1.3, 0.2, -1.7, 3.0, 0.9, -0.1, 1.8, -2.6, 0.5, 2.6],
                   [-0.3, 1.1, -1.2, 0.45, 2.2, -0.8, 0.05, 1.6, -2.0, 0.7, -0.55, 1.35]], np.float32)
PROMPTS = [[5, 1, 1, 9], [4, 2, 7]]  # seen ids: a positive and negative logit in each row, one id repeated

CASES = {  # name: (row of LOGITS, settings)
    "temperature 1": (0, dict(temperature=1.0)),
    "temperature 0.5": (1, dict(temperature=0.5)),
    "temperature 2.5": (0, dict(temperature=2.5)),
    "top_k 1": (0, dict(temperature=1.0, top_k=1)),
    "top_k 4": (1, dict(temperature=0.7, top_k=4)),
    "top_k above V": (0, dict(temperature=1.0, top_k=V + 5)),
    "top_p 0.5": (0, dict(temperature=1.0, top_p=0.5)),
    "top_p 0.75": (1, dict(temperature=1.0, top_p=0.75)),
    "top_p 0.95 hot": (0, dict(temperature=2.0, top_p=0.95)),
    "min_p 0.1": (0, dict(temperature=1.0, min_p=0.1)),
    "min_p 0.3 cold": (1, dict(temperature=0.6, min_p=0.3)),
    "min_p 1": (0, dict(temperature=1.0, min_p=1.0)),
    "penalty 1.8": (0, dict(temperature=1.0, repetition_penalty=1.8)),
    "penalty 0.6": (1, dict(temperature=1.0, repetition_penalty=0.6)),
    "all": (0, dict(temperature=0.8, top_k=7, top_p=0.8, min_p=0.05, repetition_penalty=1.5)),
    "all, other row": (1, dict(temperature=1.3, top_k=9, top_p=0.9, min_p=0.1, repetition_penalty=2.0)),
    "greedy": (0, dict()),
    "greedy penalised": (0, dict(repetition_penalty=3.0)),  # the raw argmax (5) is seen: 3.0 / 3 < 2.6
}
NAMES = list(CASES)


def log_softmax(x: np.ndarray) -> np.ndarray:
    finite = np.isfinite(x)
    top = x[finite].max()
    out = np.full_like(x, -np.inf)
    out[finite] = x[finite] - top - np.log(np.exp(x[finite] - top).sum())
    return out


def reference(logits: np.ndarray, prompt: list[int], temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
              repetition_penalty=1.0) -> np.ndarray:
    """Float64 log-probabilities after Hugging Face's processors, in their order; ties at a cut are kept."""
    x = logits.astype(np.float64)
    ids = np.unique(prompt)
    x[ids] = np.where(x[ids] < 0, x[ids] * repetition_penalty, x[ids] / repetition_penalty)
    if temperature == 0:
        return np.where(np.arange(len(x)) == np.argmax(x), 0.0, -np.inf)
    x = x / temperature
    if top_k:
        x = np.where(x >= np.sort(x)[::-1][min(top_k, len(x)) - 1], x, -np.inf)
    if top_p < 1:  # the smallest set of most likely tokens whose probability reaches top_p
        probs = np.exp(log_softmax(x))
        descending = np.sort(probs)[::-1]
        cumulative = np.cumsum(descending)
        assert np.abs(cumulative - top_p).min() > 1e-4, "too close to the boundary for float32"
        last = min(int(np.searchsorted(cumulative, top_p)), len(x) - 1)
        x = np.where(probs >= descending[last], x, -np.inf)
    if min_p:
        probs = np.exp(log_softmax(x))
        x = np.where(probs >= min_p * probs.max(), x, -np.inf)
    return log_softmax(x)


@pytest.fixture(scope="module")
def batch():
    """All cases as the rows of one batch, so each row is processed with its own settings."""
    rows = [CASES[n][0] for n in NAMES]
    state = sampler_state([SamplingParams(**CASES[n][1]) for n in NAMES], [PROMPTS[r] for r in rows], V)
    return jnp.asarray(LOGITS[rows]), state


@pytest.mark.parametrize("name", NAMES)
def test_processed_distribution_matches_the_reference(batch, name):
    """In the batch (which sorts), and alone (which skips the sort unless the row has top-k or top-p)."""
    row, settings = CASES[name]
    expected = reference(LOGITS[row], PROMPTS[row], **settings)
    together = np.asarray(jax.jit(processed_logprobs)(*batch))[NAMES.index(name)]
    alone = jax.jit(processed_logprobs)(LOGITS[row:row + 1], sampler_state([SamplingParams(**settings)],
                                                                            [PROMPTS[row]], V))[0]
    for got in (together, np.asarray(alone)):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected), err_msg="the kept tokens differ")
        np.testing.assert_allclose(np.exp(got), np.exp(expected), atol=2e-6, rtol=1e-5)


def test_the_reference_cases_are_not_vacuous():
    kept = {n: int(np.isfinite(reference(LOGITS[r], PROMPTS[r], **s)).sum()) for n, (r, s) in CASES.items()}
    assert kept["top_k 4"] == 4 and kept["top_k 1"] == kept["min_p 1"] == 1 and kept["top_k above V"] == V
    assert 1 < kept["top_p 0.5"] < kept["top_p 0.95 hot"] < V and 1 < kept["min_p 0.1"] < V
    assert 1 < kept["all"] < 7 and 1 < kept["all, other row"] < 9
    assert np.argmax(reference(LOGITS[0], PROMPTS[0], repetition_penalty=3.0)) == 11 != np.argmax(LOGITS[0])


def test_hugging_face_processors_agree_with_the_reference():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    for name, (row, s) in CASES.items():
        if not s.get("temperature"):
            continue
        ids = torch.tensor([PROMPTS[row]])
        x = torch.tensor(LOGITS[row:row + 1], dtype=torch.float64)
        steps = [RepetitionPenaltyLogitsProcessor(s.get("repetition_penalty", 1.0)),
                 TemperatureLogitsWarper(s["temperature"])]
        steps += [TopKLogitsWarper(s["top_k"])] if s.get("top_k") else []
        steps += [TopPLogitsWarper(s["top_p"])] if s.get("top_p", 1) < 1 else []
        steps += [MinPLogitsWarper(s["min_p"])] if s.get("min_p") else []
        for step in steps:
            x = step(ids, x)
        hf = torch.log_softmax(x, dim=-1)[0].numpy()
        np.testing.assert_allclose(np.exp(hf), np.exp(reference(LOGITS[row], PROMPTS[row], **s)), atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("name", ["all", "all, other row", "temperature 2.5"])
def test_draws_follow_the_processed_distribution(name):
    n = 4000
    row, settings = CASES[name]
    state = sampler_state([SamplingParams(**settings, seed=11)] * n, [PROMPTS[row]] * n, V)
    state = state._replace(count=jnp.arange(n, dtype=jnp.int32))  # one row's first n draws
    tokens = np.asarray(jax.jit(sample)(jnp.asarray(np.repeat(LOGITS[row:row + 1], n, 0)), state)[0].tokens)
    expected = np.exp(reference(LOGITS[row], PROMPTS[row], **settings))
    observed = np.bincount(tokens, minlength=V)
    assert observed[expected == 0].sum() == 0, "drew a removed token"
    kept = expected > 0
    chi2 = (((observed - n * expected)[kept]) ** 2 / (n * expected[kept])).sum()
    assert chi2 < stats.chi2.ppf(0.999, kept.sum() - 1), (observed, n * expected)


def test_greedy_rows_take_the_argmax_of_the_penalised_logits_on_both_paths():
    greedy = [SamplingParams(), SamplingParams(repetition_penalty=3.0), SamplingParams(repetition_penalty=0.5)]
    logits = jnp.asarray(LOGITS[[0, 0, 1]])
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    expected = [int(np.argmax(reference(LOGITS[r], PROMPTS[r], repetition_penalty=p.repetition_penalty)))
                for r, p in zip([0, 0, 1], greedy)]
    assert expected == [5, 11, 4]
    fast = jax.jit(sample)(logits, sampler_state(greedy, prompts, V))[0].tokens  # every row greedy: no sort
    hot = SamplingParams(temperature=1.0)
    full = jax.jit(sample)(jnp.concatenate([logits, logits[:1]]), sampler_state(greedy + [hot], prompts + [[]], V))
    assert fast.tolist() == expected == full[0].tokens[:3].tolist()


def primitives(jaxpr) -> set[str]:
    """The primitives of ``jaxpr`` and of every jaxpr nested in it (cond branches, inner jits)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                names |= primitives(sub) if hasattr(sub, "eqns") else set()
    return names


def test_the_sort_runs_only_when_a_sampled_row_has_top_k_or_top_p():
    state = sampler_state([SamplingParams()], [[1]], V)
    jaxpr = jax.make_jaxpr(sample)(jnp.asarray(LOGITS[:1]), state).jaxpr
    (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
    draw, greedy = cond.params["branches"]  # (false, true)
    assert "sort" not in primitives(greedy.jaxpr)  # it returns the argmax taken before the cond
    (inner,) = [e for e in draw.jaxpr.eqns if e.primitive.name == "cond"]
    skip, sort = (primitives(branch.jaxpr) for branch in inner.params["branches"])
    assert "sort" in sort and "sort" not in skip


def run(settings: list[SamplingParams], rows: list[int], steps: int = 12) -> np.ndarray:
    """Tokens ``(B, steps)`` drawn from fixed logits, feeding the state forward as the decode loop does."""
    state = sampler_state(settings, [PROMPTS[r] for r in rows], V)
    logits, step, out = jnp.asarray(LOGITS[rows]), jax.jit(sample), []
    for _ in range(steps):
        drawn, state = step(logits, state)
        out.append(drawn.tokens)
    assert state.count.tolist() == [steps] * len(rows)
    return np.stack(out, axis=1)


def test_a_seeded_row_draws_the_same_tokens_whatever_shares_its_batch():
    mine = SamplingParams(temperature=1.5, top_p=0.95, seed=1234)
    alone = run([mine], [0])[0]
    others = [SamplingParams(temperature=0.7, top_k=3, seed=1), SamplingParams(),
              SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=1.4, seed=1234)]
    assert (run([others[0], mine, others[1], others[2]], [1, 0, 0, 0])[1] == alone).all()
    assert (run([mine, others[2], others[1]], [0, 1, 0])[0] == alone).all()
    assert len(set(alone.tolist())) > 3  # the draws move on with the count
    other_seed = run([SamplingParams(temperature=1.5, top_p=0.95, seed=1235)], [0])[0]
    assert (other_seed != alone).any()


def test_seen_tokens_grow_with_the_draws():
    state = sampler_state([SamplingParams(temperature=1.0, repetition_penalty=2.0)], [[3]], V)
    drawn, after = jax.jit(sample)(jnp.asarray(LOGITS[:1]), state)
    assert np.flatnonzero(np.asarray(after.seen[0])).tolist() == sorted({3, int(drawn.tokens[0])})


def test_logprobs_are_those_of_the_raw_logits():
    settings = [SamplingParams(temperature=0.9, top_k=3, repetition_penalty=1.7, seed=2),
                SamplingParams(repetition_penalty=3.0)]  # greedy penalised: the chosen token is not the raw top
    state = sampler_state(settings, [PROMPTS[1], PROMPTS[0]], V)
    drawn, _ = jax.jit(sample, static_argnums=2)(jnp.asarray(LOGITS[[1, 0]]), state, 5)
    raw = np.stack([log_softmax(LOGITS[r].astype(np.float64)) for r in (1, 0)])
    tokens = np.asarray(drawn.tokens)
    assert tokens[1] == 11
    np.testing.assert_allclose(drawn.logprob, raw[[0, 1], tokens], rtol=1e-6)
    np.testing.assert_array_equal(drawn.top_ids, np.argsort(-raw, axis=1)[:, :5])
    np.testing.assert_allclose(drawn.top_logprobs, np.sort(raw, axis=1)[:, ::-1][:, :5], rtol=1e-6)
    assert sample(jnp.asarray(LOGITS), sampler_state([SamplingParams()] * 2, [[], []], V))[0].top_ids.shape == (2, 0)


def test_ties_at_a_cut_are_kept():
    logits = jnp.asarray([[2.0, 1.0, 1.0, 1.0, 0.0]])
    k = processed_logprobs(logits, sampler_state([SamplingParams(temperature=1.0, top_k=2)], [[]], 5))
    p = processed_logprobs(logits, sampler_state([SamplingParams(temperature=1.0, top_p=0.6)], [[]], 5))
    for got in (k, p):
        np.testing.assert_allclose(np.exp(got[0]), np.r_[np.exp([2.0, 1, 1, 1]), 0] / np.exp([2.0, 1, 1, 1]).sum(),
                                   rtol=1e-6)


@pytest.mark.parametrize("field, value, error", [
    ("temperature", -0.5, "temperature must be a finite number >= 0 (0 is greedy), got -0.5"),
    ("temperature", float("nan"), "temperature must be a finite number >= 0"),
    ("temperature", float("inf"), "temperature must be a finite number >= 0"),
    ("top_k", -1, "top_k must be >= 0, got -1"),
    ("top_p", 0.0, "top_p must be in (0, 1], got 0.0"),
    ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
    ("top_p", float("nan"), "top_p must be in (0, 1], got nan"),
    ("min_p", -0.1, "min_p must be in [0, 1], got -0.1"),
    ("min_p", 1.01, "min_p must be in [0, 1], got 1.01"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0 (1 is no penalty), got 0.0"),
    ("repetition_penalty", float("inf"), "repetition_penalty must be a finite number > 0"),
    ("seed", -1, "seed must be in [0, 2**32), got -1"),
    ("seed", 2**32, "seed must be in [0, 2**32), got 4294967296"),
    ("logprobs", 21, "logprobs must be in [0, 21), got 21"),
    ("logprobs", -1, "logprobs must be in [0, 21), got -1"),
])
def test_bad_settings_are_refused_by_name(field, value, error):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert str(info.value).startswith(error) and "\n" not in str(info.value)


@pytest.mark.parametrize("field, value", [("top_k", 1.5), ("temperature", "1"), ("top_p", True), ("seed", None)])
def test_settings_of_the_wrong_type_are_refused_by_name(field, value):
    with pytest.raises(TypeError, match=f"^{field} must be"):
        SamplingParams(**{field: value})


def test_bad_state_inputs_are_refused():
    with pytest.raises(ValueError, match="2 given for 1 prompts"):
        sampler_state([SamplingParams()] * 2, [[1]], V)
    with pytest.raises(ValueError, match=r"prompt 1: token id 12 is outside the vocabulary \[0, 12\)"):
        sampler_state([SamplingParams()] * 2, [[1], [3, 12]], V)
    state = sampler_state([SamplingParams()], [[1]], V)
    with pytest.raises(ValueError, match=r"num_logprobs must be in \[0, 13\), got 13"):
        sample(jnp.asarray(LOGITS[:1]), state, 13)
    with pytest.raises(ValueError, match="do not match the sampler state"):
        sample(jnp.asarray(LOGITS), state)
