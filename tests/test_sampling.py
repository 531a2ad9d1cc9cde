"""The sampler (xorl_jax.sampling) against full forward passes without a cache, on tiny random Qwen3, Qwen3-MoE and
Qwen3.5 (Gated DeltaNet + gated attention) models: greedy tokens and the logprobs of sampled tokens equal the
forward's, batches of different prompt lengths equal each prompt alone, stops cut where they match, seeds repeat,
and a 2-device mesh gives the 1-device tokens. One sampler per family, so each compiles once (same buckets)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xorl_jax.models.common import ModelOptions
from xorl_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeForCausalLM
from xorl_jax.models.qwen3_5 import Qwen3_5Config, Qwen3_5ForCausalLM
from xorl_jax.parallel.mesh import build_mesh
from xorl_jax.sampling import Sampler, SamplingParams

V = 96
REF_LEN = 40  # the no-cache reference runs every sequence in one fixed buffer (causal: the tail is never seen)
PROMPTS = [[5, 17, 3, 9, 22, 41, 8], [60, 2], list(range(30, 43))]  # 7, 2 and 13 tokens in one batch

REF_ROWS = 8
FAMILIES = {
    "qwen3": (Qwen3ForCausalLM, Qwen3Config(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96)),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3Config(
        vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
        ModelOptions(scan_layers=False)),  # one family decodes with its layers unrolled
    "qwen3_5": (Qwen3_5ForCausalLM, Qwen3_5Config(
        vocab_size=V, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        layer_types=("linear_attention", "full_attention") * 2, intermediate_size=64, partial_rotary_factor=0.5,
        linear_key_head_dim=8, linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4)),
}


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """fp32 products in full precision on every backend: a GPU's default rounds fp32 matmul inputs to TF32, and the
    cached decode and the full forward (other shapes) round differently (logprobs ~1e-3 apart on an H100)."""
    with jax.default_matmul_precision("highest"):
        yield


def random_model(cls, cfg, options=ModelOptions(), *, seed):
    """The model's structure (traced, not run: eager init is slow on a busy CPU) with random numpy weights; 1-D
    (norm) weights near 1."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(cfg, options, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    flat = nnx.to_flat_state(state)
    for path, var in flat:
        norm = path[-1] == "weight"  # RMSNorm weights (the rest are projections, conv, A_log, dt_bias)
        value = rng.normal(0.0, 0.1, var.shape) + (1.0 if norm else 0.0)
        var.set_value(jnp.asarray(value, var.dtype))
    return graphdef, nnx.from_flat_state(flat)


@functools.lru_cache(maxsize=None)
def family(name):
    """(sampler, reference log-probabilities: token lists -> [n, REF_LEN, V] log_softmax of the full forward)."""
    graphdef, params = random_model(*FAMILIES[name], seed=sorted(FAMILIES).index(name))
    forward = jax.jit(lambda p, ids: jax.nn.log_softmax(nnx.merge(graphdef, p)(ids).logits, axis=-1))

    def reference(seqs):
        assert len(seqs) <= REF_ROWS
        buf = np.zeros((REF_ROWS, REF_LEN), np.int32)
        for r, s in enumerate(seqs):
            buf[r, :len(s)] = s
        return np.asarray(forward(params, jnp.asarray(buf)))[:len(seqs)]

    return Sampler(graphdef, params), reference


def greedy_without_cache(reference, prompts, n):
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        logp = reference(seqs)
        for r, s in enumerate(seqs):
            s.append(int(np.argmax(logp[r, len(s) - 1])))
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def assert_logprobs_match(reference, prompts, seqs):
    logp = reference([list(p) + s.tokens for p, s in zip(prompts, seqs)])
    for r, (p, s) in enumerate(zip(prompts, seqs)):
        want = [logp[r, len(p) - 1 + i, t] for i, t in enumerate(s.tokens)]
        np.testing.assert_allclose(s.logprobs, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_with_cache_equals_full_forward(name):
    sampler, reference = family(name)
    with_prompt = name == "qwen3_moe"  # one family compiles the prompt-logprob variant
    got = sampler.sample(PROMPTS, SamplingParams(max_tokens=9, temperature=0, stop=[]), prompt_logprobs=with_prompt)
    seqs = [r.sequences[0] for r in got]
    assert [s.tokens for s in seqs] == greedy_without_cache(reference, PROMPTS, 9)
    assert all(s.stop_reason == "length" for s in seqs)
    assert_logprobs_match(reference, PROMPTS, seqs)
    if with_prompt:
        logp = reference(PROMPTS)
        for r, (p, res) in enumerate(zip(PROMPTS, got)):
            assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(p)
            want = [logp[r, i - 1, p[i]] for i in range(1, len(p))]
            np.testing.assert_allclose(res.prompt_logprobs[1:], want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_5"])
def test_sampled_logprobs_are_the_forward_logprobs(name):
    sampler, reference = family(name)
    got = sampler.sample(PROMPTS, SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, stop=[], seed=3),
                         num_samples=2)
    seqs = [s for r in got for s in r.sequences]
    prompts = [p for p in PROMPTS for _ in range(2)]
    assert all(len(s.tokens) == 12 for s in seqs)
    assert len({tuple(s.tokens) for s in seqs}) > 1  # really sampled
    assert_logprobs_match(reference, prompts, seqs)


def test_batch_equals_each_prompt_alone():
    sampler, _ = family("qwen3_5")
    params = SamplingParams(max_tokens=10, temperature=1.0, stop=[], seed=11)
    together = sampler.sample(PROMPTS, params)
    alone = [sampler.sample([p], params)[0] for p in PROMPTS]
    for a, b in zip(together, alone):
        assert a.sequences[0].tokens == b.sequences[0].tokens
        np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=2e-5)


def test_seeds_repeat_and_samples_differ():
    sampler, _ = family("qwen3")
    params = SamplingParams(max_tokens=12, temperature=1.0, stop=[], seed=7)
    first = sampler.sample(PROMPTS[:1], params, num_samples=3)[0].sequences
    again = sampler.sample(PROMPTS[:1], params, num_samples=3)[0].sequences
    assert [s.tokens for s in first] == [s.tokens for s in again]
    assert len({tuple(s.tokens) for s in first}) == 3
    other = sampler.sample(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=1.0, stop=[], seed=8))
    assert other[0].sequences[0].tokens != first[0].tokens


def test_top_k_1_and_tiny_top_p_are_greedy():
    sampler, _ = family("qwen3")
    greedy = sampler.sample(PROMPTS, SamplingParams(max_tokens=8, temperature=0, stop=[]))
    for params in (SamplingParams(max_tokens=8, temperature=1.5, top_k=1, stop=[], seed=1),
                   SamplingParams(max_tokens=8, temperature=1.5, top_p=1e-6, stop=[], seed=1)):
        got = sampler.sample(PROMPTS, params)
        assert [r.sequences[0].tokens for r in got] == [r.sequences[0].tokens for r in greedy]


class CharTokenizer:
    """Token t <-> the character chr(65 + t)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - 65 for c in text]

    def decode(self, tokens, **_):
        return "".join(chr(65 + t) for t in tokens)


class OtherSpelling(CharTokenizer):
    def encode(self, text, add_special_tokens=False):
        return [-5]  # never sampled


def test_stop_sequences_cut_where_they_match():
    sampler, _ = family("qwen3")
    free = sampler.sample(PROMPTS, SamplingParams(max_tokens=12, temperature=0, stop=[]))
    tokens = free[0].sequences[0].tokens
    # the first place where a 2-token sequence occurs: a stop must end the sequence right after it, kept
    i = next(i for i in range(2, 11) if tokens[i:i + 2] not in [tokens[j:j + 2] for j in range(i)])
    pair = tokens[i:i + 2]
    first = tokens.index(tokens[4])
    cases = [
        ([pair], tokens[:i + 2], "stop"),  # multi-token stop
        ([tokens[4]], tokens[:first + 1], "stop"),  # one-token stop (as an end-of-turn id)
        ([[99, 98]], tokens, "length"),  # never produced
    ]
    for stop, want, reason in cases:
        got = sampler.sample(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0, stop=stop))[0].sequences[0]
        assert (got.tokens, got.stop_reason) == (want, reason), stop
        assert len(got.logprobs) == len(want)
    # per-prompt params in one batch: each row keeps its own stops and max_tokens
    got = sampler.sample(PROMPTS[:2], [SamplingParams(max_tokens=12, temperature=0, stop=[pair]),
                                       SamplingParams(max_tokens=3, temperature=0, stop=[])])
    assert got[0].sequences[0].tokens == tokens[:i + 2]
    assert got[1].sequences[0].tokens == free[1].sequences[0].tokens[:3]
    assert got[1].sequences[0].stop_reason == "length"
    # the default stop (None) is the sampler's end-of-sequence tokens; strings need and use a tokenizer
    eos = Sampler(sampler.graphdef, sampler.params, eos_token_ids=[tokens[4]])
    assert eos.sample(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0))[0].sequences[0].tokens == \
        tokens[:first + 1]
    with pytest.raises(ValueError, match="tokenizer"):
        sampler.sample(PROMPTS[:1], SamplingParams(stop=["AB"]))
    texts = Sampler(sampler.graphdef, sampler.params, tokenizer=CharTokenizer())
    text = CharTokenizer().decode(pair)
    got = texts.sample(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0, stop=text))[0].sequences[0]
    assert (got.tokens, got.stop_reason) == (tokens[:i + 2], "stop")
    # a string the model spells with other tokens than its encoding: the device runs on, the host cuts at its text
    other = Sampler(sampler.graphdef, sampler.params, tokenizer=OtherSpelling())
    got = other.sample(PROMPTS[:1], SamplingParams(max_tokens=12, temperature=0, stop=[text]))[0].sequences[0]
    assert (got.tokens, got.stop_reason) == (tokens[:i + 2], "stop")


@pytest.mark.parametrize("name,devices,sizes", [
    ("qwen3_5", 2, {"data_parallel_shard_size": 2}),
    # context-parallel training meshes (xorl's server configs have Ulysses 4-8): the sampler splits rows only, and
    # in multiples of every axis the experts take tokens from (expert 2 x ulysses 2 here: 4 rows for one prompt)
    ("qwen3_5", 2, {"data_parallel_shard_size": 1, "ulysses_parallel_size": 2}),
    ("qwen3_moe", 4, {"data_parallel_shard_size": 2, "ulysses_parallel_size": 2, "expert_parallel_size": 2})])
def test_meshes_give_the_one_device_tokens(name, devices, sizes, monkeypatch):
    monkeypatch.setattr("xorl_jax.sampling.sampler.MIN_ROWS", 1)  # row counts as small as the mesh allows
    sampler, _ = family(name)
    mesh = build_mesh(devices=jax.devices()[:devices], **sizes)
    sharded = Sampler(sampler.graphdef, sampler.params, mesh=mesh)
    params = SamplingParams(max_tokens=9, temperature=0.9, stop=[], seed=5)
    for prompts in (PROMPTS, PROMPTS[:1]):
        one, two = sampler.sample(prompts, params), sharded.sample(prompts, params)
        for a, b in zip(one, two):
            assert a.sequences[0].tokens == b.sequences[0].tokens
            np.testing.assert_allclose(a.sequences[0].logprobs, b.sequences[0].logprobs, atol=5e-5)


def test_bad_requests_say_what_is_wrong():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    sampler, _ = family("qwen3")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampler.sample([[1], []], SamplingParams())


def test_a_cache_that_cannot_fit_is_refused_before_any_work(monkeypatch):
    sampler, _ = family("qwen3")
    # Qwen3 tiny: 2 layers x (k + v) x 2 kv heads x 16 dims x 4 bytes per row and position
    assert sampler.cache_bytes(rows=8, length=32) == 8 * 32 * 2 * 2 * 2 * 16 * 4
    hybrid, _ = family("qwen3_5")  # 2 attention layers per position; 2 DeltaNet states + conv windows per row
    channels = 2 * 2 * 8 + 4 * 12
    assert hybrid.cache_bytes(rows=1, length=10) == 10 * 2 * 2 * 2 * 16 * 4 + 2 * (4 * 8 * 12 * 4 + 3 * channels * 4)
    monkeypatch.setattr("xorl_jax.sampling.sampler._free_device_bytes", lambda mesh: 1000)
    with pytest.raises(ValueError, match="lower max_tokens"):
        sampler.sample(PROMPTS, SamplingParams(max_tokens=500))


class EndsAt:
    """The demo tokenizer with another end-of-sequence token."""

    def __init__(self, tokenizer, eos):
        self._tokenizer, self.eos_token_id = tokenizer, eos

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_greedy_generate_answers_are_the_no_cache_greedy_replies():
    from transformers import AutoTokenizer

    from xorl_jax.data.demo import DEMO_DIR
    from xorl_jax.generate import greedy_generate

    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    graphdef, params = random_model(Qwen3ForCausalLM, Qwen3Config(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96), seed=5)
    forward = jax.jit(lambda ids: nnx.merge(graphdef, params)(ids).logits)
    convs = [[{"role": "user", "content": q}] for q in ("What is 85 - 40?", "Compute 6 * 7.")]
    prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    replies = [list(x) for x in ids]
    for _ in range(6):
        buf = np.zeros((len(ids), 64), np.int32)
        for r, s in enumerate(replies):
            buf[r, :len(s)] = s
        logits = np.asarray(forward(jnp.asarray(buf)))
        for r, s in enumerate(replies):
            s.append(int(np.argmax(logits[r, len(s) - 1])))
    replies = [s[len(x):] for s, x in zip(replies, ids)]
    eos = replies[0][3]  # the first reply ends before this token's first occurrence (the token itself dropped)
    model = nnx.merge(graphdef, params)
    got = greedy_generate(model, EndsAt(tok, eos), convs, max_new_tokens=6)
    stops = {eos, tok.convert_tokens_to_ids("<|im_end|>")}
    ends = [next((i for i, t in enumerate(r) if t in stops), len(r)) for r in replies]
    assert ends[0] <= 3
    assert got == [tok.decode(r[:n], skip_special_tokens=True).strip() for r, n in zip(replies, ends)]


def test_draws_follow_the_tempered_truncated_distribution():
    from xorl_jax.sampling.choose import choose_tokens

    logits = jnp.asarray([2.0, 1.5, 1.0, 0.0, -1.0, -3.0], jnp.float32)
    n = 20000
    rows = jnp.broadcast_to(logits, (n, 6))
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    for temperature, top_p, top_k in ((0.7, 1.0, -1), (1.3, 0.8, -1), (1.0, 1.0, 2)):
        tokens, logprobs = jax.jit(choose_tokens)(rows, jnp.full((n,), temperature), jnp.full((n,), top_p),
                                                  jnp.full((n,), top_k, jnp.int32), keys)
        p = np.asarray(jax.nn.softmax(logits / temperature))
        kept = np.argsort(-p)[: top_k if top_k > 0 else 6]
        kept = kept[(np.cumsum(p[kept]) - p[kept]) < top_p]  # nucleus: mass of the tokens ranked above < top_p
        want = np.zeros(6)
        want[kept] = p[kept] / p[kept].sum()
        freq = np.bincount(np.asarray(tokens), minlength=6) / n
        np.testing.assert_allclose(freq, want, atol=0.015)
        # the reported logprob is the temperature-1, untruncated one
        np.testing.assert_allclose(np.asarray(logprobs), np.asarray(jax.nn.log_softmax(logits))[np.asarray(tokens)],
                                   atol=1e-6)
