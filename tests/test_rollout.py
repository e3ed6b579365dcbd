"""Multi-turn rollouts with a tiny random Qwen3 whose logits get a scripted boost toward a fixed sequence of
assistant turns (so episodes really call tools over several turns); the boost depends only on the tokens so far,
so re-scoring the finished sequence with the same model must reproduce the behaviour log-probs."""
import torch

from pact_fast.chat import trace_sequences
from pact_fast.data import parse_example
from pact_fast.envs import build_tokenizer, make_task
from pact_fast.envs.multihop import MultiHopEnv
from pact_fast.losses import NONE
from pact_fast.rollout import HFRolloutEngine, RolloutConfig
from models import tiny_causal_lm


class ScriptedLM(torch.nn.Module):
    """Adds +12 to the logit of the next token of the scripted turn that matches the current assistant turn."""

    def __init__(self, base, turns, turn_start):
        super().__init__()
        self.base, self.turns, self.turn_start = base, turns, turn_start
        self.history = None

    def _boost(self, ids):
        B, L = ids.shape
        boost = torch.zeros(B, L, self.base.config.vocab_size)
        n = len(self.turn_start)
        for b in range(B):
            row = ids[b].tolist()
            all_starts = [i for i in range(L) if row[i: i + n] == self.turn_start]
            for p in range(L):
                starts = [i for i in all_starts if i + n - 1 <= p]
                if not starts:
                    continue
                k = len(starts) - 1  # index of the current assistant turn
                gen = row[starts[-1] + n: p + 1]
                if 0 <= k < len(self.turns) and gen == self.turns[k][: len(gen)] and len(gen) < len(self.turns[k]):
                    boost[b, p, self.turns[k][len(gen)]] = 12.0
        return boost

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, use_cache=use_cache)
        self.history = input_ids.cpu() if past_key_values is None else torch.cat([self.history, input_ids.cpu()], 1)
        out.logits = out.logits + self._boost(self.history)[:, -input_ids.shape[1]:].to(out.logits.dtype)
        return out


def _script(tok, ex, malformed):
    """Token ids of each expert assistant turn (after its turn-start), optionally with a malformed first call."""
    seq = trace_sequences(tok, ex)[0]
    turns, cur = [], None
    for i, c in zip(seq.input_ids, seq.components):
        if c != NONE and c != 3:
            cur = cur if cur is not None else []
            cur.append(i)
        elif cur is not None:
            turns.append(cur)
            cur = None
    if cur:
        turns.append(cur)
    if malformed:
        bad = tok("<think> oops . </think> <tool_call> lookup ( maya ) </tool_call> <|im_end|>",
                  add_special_tokens=False)["input_ids"]
        turns = [bad] + turns
    return turns


def _scripted_task(malformed):
    """(tokenizer, example, model that follows the example's expert turns, with a malformed call first if asked)."""
    tok = build_tokenizer()
    ex = parse_example(make_task(4, hops=2))
    base = tiny_causal_lm("qwen3", vocab_size=len(tok))
    turn_start = tok("<|im_start|> assistant", add_special_tokens=False)["input_ids"]
    return tok, ex, ScriptedLM(base, _script(tok, ex, malformed=malformed), turn_start)


def test_multi_turn_episodes_are_well_formed_and_logps_match_rescoring():
    tok, ex, model = _scripted_task(malformed=True)
    engine = HFRolloutEngine(model, tok, RolloutConfig(group_size=3, max_new_tokens=40, max_turns=5, temperature=1.0),
                             seed=1)
    episodes = engine.rollout([ex], lambda e: MultiHopEnv(e, max_turns=5))[0]
    expert_calls = sum(bool(m.get("tool_calls")) for m in ex.trace)
    assert expert_calls >= 2
    for ep in episodes:
        assert len(ep.response_ids) == len(ep.response_mask) == len(ep.behavior_logp)
        assert ep.turns == expert_calls + 2 and ep.finish == "answer" and ep.reward == 1.0
        assert ep.tool_calls == expert_calls + 1 and ep.tool_errors == 1, "the malformed call is an error observation"
        text = tok.decode(ep.response_ids)
        assert "error" in text and text.count("<tool_response>") == expert_calls + 1
        # mask: 1 exactly on sampled tokens; tool blocks are 0
        ids, mask = ep.response_ids, ep.response_mask
        for i, m in enumerate(mask):
            if tok.convert_ids_to_tokens(ids[i]) in ("<tool_response>", "</tool_response>"):
                assert m == 0
        full = torch.tensor(ep.prompt_ids + ep.response_ids)[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0, :-1].float(), -1)
        P = len(ep.prompt_ids)
        rescored = logp[P - 1:].gather(-1, full[0, P:, None]).squeeze(-1)
        m = torch.tensor(mask).bool()
        assert torch.allclose(rescored[m], torch.tensor(ep.behavior_logp)[m], atol=1e-4)
        assert (torch.tensor(ep.behavior_logp)[~m] == 0).all()


def test_greedy_rollouts_are_deterministic_and_length_capped():
    tok = build_tokenizer()
    ex = parse_example(make_task(2, hops=1))
    model = tiny_causal_lm("qwen3", vocab_size=len(tok))
    cfg = RolloutConfig(group_size=2, max_new_tokens=7, max_turns=2, greedy=True)
    a = HFRolloutEngine(model, tok, cfg).rollout([ex], lambda e: MultiHopEnv(e))[0]
    b = HFRolloutEngine(model, tok, cfg, seed=5).rollout([ex], lambda e: MultiHopEnv(e))[0]
    assert [e.response_ids for e in a] == [e.response_ids for e in b]
    assert all(len(e.response_ids) <= 7 and e.reward == 0.0 for e in a)
    assert a[0].finish in ("length", "answer")


def test_the_environment_turn_limit_ends_episodes():
    tok, ex, model = _scripted_task(malformed=False)
    engine = HFRolloutEngine(model, tok, RolloutConfig(group_size=1, max_new_tokens=40, max_turns=5))
    ep = engine.rollout([ex], lambda e: MultiHopEnv(e, max_turns=1))[0][0]
    assert ep.turns == 1 and ep.finish == "turn_limit" and ep.reward == 0.0


def test_rollout_continues_with_the_environments_next_user_turn():
    tok = build_tokenizer()
    ex = parse_example(make_task(1, hops=1))
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    turns = [ids("<think> first . </think> maya <|im_end|>"), ids("<think> then . </think> omar <|im_end|>")]
    model = ScriptedLM(tiny_causal_lm("qwen3", vocab_size=len(tok)), turns, ids("<|im_start|> assistant"))

    class TwoUserTurns(MultiHopEnv):
        """Like BFCL: a second user turn arrives when the assistant ends its first turn."""

        def __init__(self, example):
            super().__init__(example, max_turns=4)
            self.pending = ["what is the age of omar ?"]

        def next_user_turn(self):
            return self.pending.pop() if self.pending else None

    engine = HFRolloutEngine(model, tok, RolloutConfig(group_size=1, max_new_tokens=20, max_turns=4))
    ep = engine.rollout([ex], TwoUserTurns)[0][0]
    assert ep.turns == 2 and ep.finish == "answer" and ep.final_text.strip().endswith("omar")  # the end token is not the answer
    tokens = tok.convert_ids_to_tokens(ep.response_ids)
    start = tokens.index("user")
    assert tokens[start:start + 8] == "user what is the age of omar ?".split()
    assert all(m == 0 for m in ep.response_mask[start - 1:start + 9]), "the user turn is context"
    assert ep.response_mask[:len(turns[0])] == [1] * len(turns[0])


class _BFCLStyleErrors(MultiHopEnv):
    """Every call fails the way BFCL's back-ends fail: "Error during execution: ..." (capital E)."""

    def run_call(self, name, arguments):
        return "Error during execution: no such file", False


class _NoTally:
    """A duck-typed environment without ``errors``: only its response texts tell errors apart."""

    max_turns = 3

    def step(self, calls):
        return ["ERROR : refused" for _ in calls]

    def next_user_turn(self):
        return None

    def reward(self, final_text):
        return 0.0


def test_tool_errors_count_what_the_environment_calls_an_error():
    tok, ex, model = _scripted_task(malformed=False)
    engine = HFRolloutEngine(model, tok, RolloutConfig(group_size=1, max_new_tokens=40, max_turns=2))
    ep = engine.rollout([ex], _BFCLStyleErrors)[0][0]
    assert ep.tool_calls == 2 and ep.tool_errors == 2, "BFCL's 'Error during execution' is an error"
    tok, ex, model = _scripted_task(malformed=False)
    engine = HFRolloutEngine(model, tok, RolloutConfig(group_size=1, max_new_tokens=40, max_turns=2))
    ep = engine.rollout([ex], lambda e: _NoTally())[0][0]
    assert ep.tool_calls == 2 and ep.tool_errors == 2


def test_greedy_can_be_asked_per_call_as_evaluation_does():
    tok = build_tokenizer()
    ex = parse_example(make_task(2, hops=1))
    model = tiny_causal_lm("qwen3", vocab_size=len(tok))
    sampling = RolloutConfig(group_size=2, max_new_tokens=7, max_turns=2, greedy=False, temperature=5.0)
    a = HFRolloutEngine(model, tok, sampling, seed=1).rollout([ex], MultiHopEnv, group_size=1, greedy=True)[0]
    b = HFRolloutEngine(model, tok, sampling, seed=2).rollout([ex], MultiHopEnv, group_size=1, greedy=True)[0]
    c = HFRolloutEngine(model, tok, RolloutConfig(**{**sampling.__dict__, "greedy": True})).rollout(
        [ex], MultiHopEnv, group_size=1)[0]
    assert len(a) == 1 and a[0].response_ids == b[0].response_ids == c[0].response_ids
    sampled = [HFRolloutEngine(model, tok, sampling, seed=s).rollout([ex], MultiHopEnv, group_size=1)[0][0]
               for s in range(4)]
    assert len({tuple(e.response_ids) for e in sampled}) > 1, "greedy=None keeps the configured sampling"


def test_rollout_closes_every_environment_after_its_reward():
    tok, ex, model = _scripted_task(malformed=False)
    made = []

    class Tracked(MultiHopEnv):
        closed_after_reward = False

        def reward(self, final_text):
            self.rewarded = True
            return super().reward(final_text)

        def close(self):
            self.closed_after_reward = getattr(self, "rewarded", False)

    def make_env(example):
        made.append(Tracked(example))
        return made[-1]

    HFRolloutEngine(model, tok, RolloutConfig(group_size=2, max_new_tokens=40, max_turns=4)).rollout([ex], make_env)
    assert len(made) == 2 and all(env.closed_after_reward for env in made)


def test_rollouts_use_the_models_own_cache_argument_without_deprecation_warnings():
    import warnings

    tok = build_tokenizer()
    model = tiny_causal_lm("qwen3", vocab_size=len(tok))
    ex = parse_example(make_task(3, hops=1))
    engine = HFRolloutEngine(model, tok, RolloutConfig(group_size=2, max_new_tokens=6, max_turns=2), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers warns on every call with past_key_values
        episodes = engine.rollout([ex], lambda e: MultiHopEnv(e, max_turns=2))[0]
    assert all(len(ep.response_ids) > 0 for ep in episodes)


def test_top_p_never_samples_outside_the_nucleus():
    """probs 0.5, 0.3, 0.15, 0.05 with top_p=0.7: the nucleus is the smallest top set whose mass reaches 0.7,
    tokens 0 and 1; tokens 2 and 3 are never drawn, and the behaviour log-prob stays the untruncated one."""
    from pact_fast.rollout import _sample

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().float().repeat(4000, 1)  # [N, V]
    gen = torch.Generator().manual_seed(0)
    tokens, logp = _sample(logits, 1.0, 0.7, False, gen)
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).double().mean().item() - 0.5 / 0.8) < 0.03  # renormalised within the nucleus
    assert torch.allclose(logp.double(), probs.log()[tokens], atol=1e-6)
    everything, _ = _sample(logits, 1.0, 1.0, False, gen)
    assert set(everything.tolist()) == {0, 1, 2, 3}
    assert set(_sample(logits, 1.0, 0.4, False, gen)[0].tolist()) == {0}


def test_prefill_computes_the_last_positions_logits_only_and_episodes_stay_the_same():
    """A prefill asks the model for its last position's logits only (``logits_to_keep=1``, [N, 1, V] rather
    than [N, L, V]); a model whose forward has no such option gets every position's, and both sample the same
    episodes from the same seed."""
    tok = build_tokenizer()
    ex = parse_example(make_task(4, hops=1))
    model = tiny_causal_lm("qwen3", vocab_size=len(tok))
    shapes = []
    hook = model.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.logits.shape)))
    cfg = RolloutConfig(group_size=2, max_new_tokens=8, max_turns=2, temperature=1.0)
    kept = HFRolloutEngine(model, tok, cfg, seed=3).rollout([ex], lambda e: MultiHopEnv(e, max_turns=2))[0]
    hook.remove()
    assert shapes and all(s[1] == 1 for s in shapes)  # prefills and decode steps alike: one position

    class EveryPosition(torch.nn.Module):  # a forward without logits_to_keep
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, use_cache, **cache):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=use_cache, **cache)
            shapes.append(tuple(out.logits.shape))
            return out

    shapes.clear()
    wrapped = EveryPosition(model)
    every = HFRolloutEngine(wrapped, tok, cfg, seed=3).rollout([ex], lambda e: MultiHopEnv(e, max_turns=2))[0]
    assert max(s[1] for s in shapes) > 1  # the prefills' every position
    assert [e.response_ids for e in every] == [e.response_ids for e in kept]
    for a, b in zip(every, kept):
        assert torch.allclose(torch.tensor(a.behavior_logp), torch.tensor(b.behavior_logp), atol=1e-5)


def test_episodes_stop_at_the_models_positions():
    """An episode never grows past the model's max_position_embeddings: a turn samples at most the positions
    left, and an episode with none left ends as "length" (it sampled on past them, quietly, before)."""
    tok = build_tokenizer()
    ex = parse_example(make_task(3, hops=2))
    prompt = HFRolloutEngine(tiny_causal_lm("qwen3", vocab_size=len(tok)), tok).rollout(
        [ex], MultiHopEnv, group_size=1, greedy=True)[0][0].prompt_ids
    for room in (5, 0):
        model = tiny_causal_lm("qwen3", vocab_size=len(tok), max_position_embeddings=len(prompt) + room)
        engine = HFRolloutEngine(model, tok, RolloutConfig(group_size=4, max_new_tokens=40, max_turns=3,
                                                           temperature=1.0))
        episodes = engine.rollout([ex], MultiHopEnv)[0]
        assert all(len(ep.prompt_ids) + len(ep.response_ids) <= len(prompt) + room for ep in episodes)
        assert any(ep.finish == "length" and len(ep.response_ids) == room for ep in episodes)
        assert all(len(ep.behavior_logp) == len(ep.response_mask) == len(ep.response_ids) for ep in episodes)


class _OneTurnEngine(HFRolloutEngine):
    """Every episode's turn is ``text`` followed by the tokenizer's end-of-turn token (no model runs)."""

    def __init__(self, tokenizer, text, **cfg):
        stub = torch.nn.Linear(1, 1)
        stub.config = type("C", (), {"max_position_embeddings": 100_000})()
        super().__init__(stub, tokenizer, RolloutConfig(**cfg))
        self.text = text

    def _generate_turn(self, contexts, greedy, budgets):
        ids = self.tokenizer(self.text, add_special_tokens=False)["input_ids"] + [self.eos]
        return [list(ids) for _ in contexts], [[0.0] * len(ids) for _ in contexts], [True] * len(contexts)


def test_the_right_answer_is_paid_whatever_the_tokenizers_end_of_turn_token(smollm2_dir):
    """The final turn reached the reward with its end token; the multi-hop answer check removed <|im_end|> only, so
    a tokenizer ending turns with <|endoftext|> (or Llama's <|eot_id|>, Mistral's </s>) was never paid."""
    from transformers import AutoTokenizer

    from pact_fast.chat import resolve_chat_template

    ex = parse_example(make_task(1, hops=1, n_distractors=3))
    for eos in ("<|im_end|>", "<|endoftext|>"):
        tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
        tok.eos_token = eos
        resolve_chat_template(tok, "builtin", "compact", log=None)
        for text in (ex.answer, f"<think>\nfound it\n</think>\n{ex.answer}"):
            (ep,) = _OneTurnEngine(tok, text, group_size=1).rollout([ex], MultiHopEnv)[0]
            assert (ep.finish, ep.reward, ep.final_text) == ("answer", 1.0, text), (eos, text)


def test_a_tool_result_the_tokenizer_cannot_encode_is_an_observation_not_a_crash(smollm2_dir):
    """A tool name written as "look\\ud800up" in a call's JSON is a lone surrogate the environment echoes back in
    its error; the tokenizer refused the text and the run stopped."""
    from transformers import AutoTokenizer

    from pact_fast.chat import resolve_chat_template

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    resolve_chat_template(tok, "builtin", "hermes", log=None)
    ex = parse_example(make_task(1, hops=1, n_distractors=3))
    call = '<tool_call>\n{"name": "look\\ud800up", "arguments": {}}\n</tool_call>'
    (ep,) = _OneTurnEngine(tok, call, group_size=1, tool_call_format="hermes", max_turns=2).rollout(
        [ex], MultiHopEnv)[0]
    assert ep.turns == 2 and ep.tool_calls == ep.tool_errors == 2  # the same call each turn, an error each time
    assert "look?up" in tok.decode(ep.response_ids)


class _ReplayEngine(HFRolloutEngine):
    """Each turn is the next of ``texts`` followed by the tokenizer's end-of-turn token (no model runs)."""

    def __init__(self, tokenizer, texts, **cfg):
        stub = torch.nn.Linear(1, 1)
        stub.config = type("C", (), {"max_position_embeddings": 100_000})()
        super().__init__(stub, tokenizer, RolloutConfig(**cfg))
        self.texts = list(texts)

    def _generate_turn(self, contexts, greedy, budgets):
        ids = self.tokenizer(self.texts.pop(0), add_special_tokens=False)["input_ids"] + [self.eos]
        return [list(ids) for _ in contexts], [[0.0] * len(ids) for _ in contexts], [True] * len(contexts)


class _FixedResults:
    """Every call returns ``ruth``; the episode ends on its answer."""

    def __init__(self, example):
        pass

    def step(self, calls):
        return ["ruth"] * len(calls)

    def next_user_turn(self):
        return None

    def reward(self, text):
        return 1.0


# a ChatML template of hermes calls, a newline after each turn's end token as most ChatML templates write it
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}<|im_start|>system\n{{ m.content }} tools: {{ tools | tojson }}<|im_end|>\n"
    "{% elif m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>tool\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_an_episode_is_the_templates_rendering_of_its_conversation(smollm2_dir):
    """The context block after a sampled turn started after the template's rendering of that turn, whose newline
    after <|im_end|> the model never samples: every turn of every episode (the built-in format's too) ran on
    "<|im_end|><|im_start|>tool" where prompts and SFT traces have "<|im_end|>\\n<|im_start|>tool"."""
    from transformers import AutoTokenizer

    from pact_fast.chat import builtin_chat_template, render

    ex = parse_example(make_task(1, hops=1, n_distractors=3))
    call = '<tool_call>\n{"name": "lookup", "arguments": {"entity": "maya", "relation": "mother"}}\n</tool_call>'
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for template in (CHATML_TEMPLATE, builtin_chat_template("hermes", turn_end=tok.eos_token)):
        tok.chat_template = template
        texts = [call, "ruth"]
        (ep,) = _ReplayEngine(tok, texts, group_size=1, tool_call_format="hermes").rollout([ex], _FixedResults)[0]
        assert (ep.finish, ep.turns, ep.tool_calls) == ("answer", 2, 1)
        conv = list(ex.messages) + [{"role": "assistant", "content": call},
                                    {"role": "tool", "tool_call_id": "call0", "content": "ruth"},
                                    {"role": "assistant", "content": "ruth"}]
        text = render(tok, conv, ex.tools)
        text = text[: text.rindex(tok.eos_token) + len(tok.eos_token)]  # the episode ends on its end token
        assert ep.prompt_ids + ep.response_ids == tok(text, add_special_tokens=False)["input_ids"]
        sampled = [t for t, m in zip(ep.response_ids, ep.response_mask) if m]
        assert tok.decode(sampled) == f"{call}{tok.eos_token}ruth{tok.eos_token}"


def test_a_context_block_never_repeats_the_sampled_turn_when_the_template_ends_it_without_eos():
    """The block after a sampled turn started after the last end-of-turn token of the whole rendering: a template
    that renders a conversation's last assistant turn without it (the end token written only between turns) made
    that an earlier turn's, and the sampled turn's text came again in the context."""
    from pact_fast.envs.tokenizer import CHAT_TEMPLATE

    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE.replace(" ) </tool_call>{% endfor %} <|im_end|>\n",
                                              " ) </tool_call>{% endfor %}{% if not loop.last %} <|im_end|>\n"
                                              "{% endif %}")
    ex = parse_example(make_task(0, hops=1, ops=False))
    call = ex.trace[0]["tool_calls"][0]["function"]
    text = f"<tool_call> {call['name']} ( " + " , ".join(f"{k} = {v}" for k, v in call["arguments"].items()) + " ) " \
           "</tool_call>"
    (ep,) = _OneTurnEngine(tok, text, group_size=1, max_turns=2).rollout([ex], MultiHopEnv)[0]
    decoded = tok.decode(ep.response_ids)
    assert ep.turns == 2 and decoded.count("<tool_call>") == 2, decoded
    assert decoded.count("<tool_response>") == 1


def test_a_context_block_is_encoded_as_in_the_whole_text_with_a_sentencepiece_tokenizer():
    """A block encoded alone started with a "▁" of the tokenizer's own (Metaspace pre-tokenizers prepend one to a
    text's start, as Llama 2's and Mistral's do): the episode's context differed from the conversation's encoding by
    that token at every turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pact_fast.chat import builtin_chat_template, render

    sp = Tokenizer(models.BPE(unk_token="<unk>"))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    sp.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    corpus = ['<|im_start|>user\nhello tools\n<tool_call>\n{"name": "lookup"}\n</tool_call>\n<tool_response>\nruth\n'
              '</tool_response>\nassistant user tool'] * 20
    sp.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                        initial_alphabet=list('abcdefghijklmnopqrstuvwxyz<>|_/{}":,\n ▁')))
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = builtin_chat_template("hermes", turn_end="</s>")
    ex = parse_example(make_task(0, hops=1, ops=False))
    engine = _OneTurnEngine(tok, "ruth")
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "ruth"}]
    new = [{"role": "user", "content": "tools"}]
    before, after = render(tok, conv, ex.tools), render(tok, conv + new, ex.tools, True)
    head = before[:before.rindex("</s>") + len("</s>")]
    whole, prefix = (tok(t, add_special_tokens=False)["input_ids"] for t in (after, head))
    assert whole[:len(prefix)] == prefix
    assert engine._context_block(ex, conv, new) == whole[len(prefix):]
    assert tok(after[len(head):], add_special_tokens=False)["input_ids"] != whole[len(prefix):], "alone it differs"


def test_a_raised_rollout_max_call_chars_lets_longer_calls_run():
    """The parser capped a call's text at 10,000 characters whatever rollout.max_call_chars said: raised to let a
    long call run (a file's content written by a tool), every such call was still an error observation."""
    tok = build_tokenizer()
    ex = parse_example(make_task(1, hops=1, n_distractors=3))
    call = "<tool_call> length ( word = " + "maya " * 3000 + ") </tool_call>"  # 15,000 characters
    for limit, errors in ((20_000, 0), (10_000, 1)):
        (ep,) = _OneTurnEngine(tok, call, group_size=1, max_turns=2, max_call_chars=limit).rollout(
            [ex], lambda e: MultiHopEnv(e, max_call_chars=limit))[0]
        assert (ep.tool_calls, ep.tool_errors) == (2, 2 * errors), limit  # the same call in both turns
