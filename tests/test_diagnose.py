"""`opd diagnose`: each measurement against a naive reference or a known answer, and one
end-to-end report on a 1-step tiny run."""

import math
from types import SimpleNamespace

import pytest
import torch

from opd.batch import make_batch
from opd.diagnostics import coverage, noise, probe, variance
from opd.models.hf import completion_hidden, load_model
from opd.testbed.oracle import OracleTeacher
from opd.testbed.tasks import make_task
from opd.testbed.tokenizer import build_tokenizer

TOK = build_tokenizer()
SEP, WAIT, EOS, PAD = (TOK.convert_tokens_to_ids(w) for w in (";", "wait", "<eos>", "<pad>"))


def _ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


def _problems(task="addition", h=4, n=3, split="val"):
    probs = make_task(task, h).problems(split, n, 0)
    return probs, [_ids(p.prompt) for p in probs], [_ids(p.solution) for p in probs]


class OracleLM(torch.nn.Module):
    """The oracle as a causal LM (for ``completion_logits``): its hidden state at column
    ``P - 1 + t`` is the oracle's log p of completion token ``t``; the LM head is the identity."""

    def __init__(self, oracle, prompt_len):
        super().__init__()
        self.oracle, self.P = oracle, prompt_len

    def get_output_embeddings(self):
        return torch.nn.Identity()

    def get_decoder(self):
        def run(input_ids, attention_mask, **_):
            P, out = self.P, torch.zeros(*input_ids.shape, self.oracle.vocab_size)
            for b in range(input_ids.shape[0]):
                prompt = input_ids[b, :P][attention_mask[b, :P].bool()].tolist()
                comp = input_ids[b, P:].tolist()
                logits = self.oracle.score(make_batch([prompt], [comp], PAD), full=True).logits_BTV[0]
                out[b, P - 1 : P - 1 + len(comp)] = logits
            return SimpleNamespace(last_hidden_state=out)

        return run


def _oracle_entropy(s, n_live=21, n_dead=3):
    """Entropy of the noiseless oracle: intended word e^s, other live words 1, dead e^-30."""
    z = math.exp(s) + (n_live - 1) + n_dead * math.exp(-30.0)
    return math.log(z) - (s * math.exp(s) - 30.0 * n_dead * math.exp(-30.0)) / z, s - math.log(z)


# ------------------------------------------------------------------ coverage
def test_position_means_matches_loop():
    g = torch.Generator().manual_seed(0)
    x_BT, m_BT = torch.randn(5, 7, generator=g), torch.rand(5, 7, generator=g) > 0.4
    m_BT[:, 3] = False
    got = coverage.position_means(x_BT, m_BT)
    for t in range(7):
        vals = [float(x_BT[b, t]) for b in range(5) if m_BT[b, t]]
        assert (got[t] is None) if not vals else got[t] == pytest.approx(sum(vals) / len(vals), abs=1e-12)
    assert got[3] is None


def test_coverage_oracle_as_student_and_teacher_known_answers():
    s = 6.0
    oracle = OracleTeacher(tokenizer=TOK, sharpness=s)
    _, prompts, _ = _problems(n=3)
    comps = oracle.generate(prompts, max_new_tokens=60, temperature=0.0)
    student = OracleLM(oracle, max(len(p) for p in prompts))
    prof = coverage.coverage_profile(oracle, student, prompts, comps, PAD, topk=1)
    ent, logp = _oracle_entropy(s)
    n = max(len(c) for c in comps)
    assert prof["count"] == [sum(len(c) > t for c in comps) for t in range(n)]
    assert all(v == pytest.approx(ent, abs=1e-5) for v in prof["entropy"])
    assert all(v == pytest.approx(logp, abs=1e-5) for v in prof["logp"])
    assert prof["overlap"] == [1.0] * n and prof["agree"] == [1.0] * n
    summ = coverage.summary(prof)
    assert summ["agree/all"] == 1.0 and summ["logp/first"] == pytest.approx(logp, abs=1e-5)


def test_coverage_summary_weights_by_count():
    prof = {"logp": [-1.0, -3.0, None], "count": [3, 1, 0]}
    out = coverage.summary(prof)
    assert out["logp/all"] == pytest.approx(-1.5) and out["logp/first"] == pytest.approx(-1.5)
    assert "entropy/all" not in out


# ------------------------------------------------------------------ noise
def test_entropy_stats_matches_reference():
    x = torch.rand(101, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    st = noise.entropy_stats(x, high=1.0)
    srt = sorted(x.tolist())
    assert st["mean"] == pytest.approx(sum(srt) / 101, abs=1e-12)
    assert st["q50"] == pytest.approx(srt[50], abs=1e-12) and st["q10"] == pytest.approx(srt[10], abs=1e-12)
    assert st["share>1"] == pytest.approx(sum(v > 1 for v in srt) / 101)
    assert noise.entropy_stats(torch.zeros(0)) == {}


def _wrong_rollouts(n=3, k=2):
    """Reference prefixes with step k's result planted wrong, continued as if right."""
    recovering = OracleTeacher(tokenizer=TOK)
    continuing = OracleTeacher(tokenizer=TOK, recovers=False)
    _, prompts, sols = _problems(n=n)
    g = torch.Generator().manual_seed(0)
    planted = [probe.plant_wrong_step(recovering, x, y, SEP, k, g) for x, y in zip(prompts, sols)]
    rest = continuing.generate(prompts, max_new_tokens=60, temperature=0.0, prefix_ids_list=[p.prefix for p in planted])
    return recovering, continuing, prompts, planted, [p.prefix + r for p, r in zip(planted, rest)]


def test_wrong_prefix_positions_span_from_the_planted_word_to_the_answer_end():
    recovering, continuing, prompts, planted, comps = _wrong_rollouts()
    for x, p, c in zip(prompts, planted, comps):
        assert c[-1] == EOS
        pos = noise.wrong_prefix_positions(recovering, continuing, x, c)
        assert [t for t, _ in pos] == list(range(p.position + 1, len(c) - 1))  # <eos> slot excluded
        assert all(cont == c[t] for t, cont in pos)  # the rollout continued the wrong prefix
    _, ref_prompts, sols = _problems(n=3)
    assert all(not noise.wrong_prefix_positions(recovering, continuing, x, y + [EOS]) for x, y in zip(ref_prompts, sols))


def test_after_wrong_step_classifies_recovering_and_continuing_teachers():
    recovering, continuing, prompts, _, comps = _wrong_rollouts()
    fixes = noise.after_wrong_step(OracleTeacher(tokenizer=TOK), recovering, continuing, prompts, comps, PAD)
    conts = noise.after_wrong_step(OracleTeacher(tokenizer=TOK, recovers=False), recovering, continuing, prompts, comps, PAD)
    n = sum(len(c) for c in comps) - sum(len(p.prefix) + 1 for p in _wrong_rollouts()[3])
    assert fixes["positions"] == conts["positions"] == n > 0 and fixes["rollouts"] == 3
    assert (fixes["corrects"], fixes["continues"], fixes["other"]) == (1.0, 0.0, 0.0)
    assert (conts["corrects"], conts["continues"], conts["other"]) == (0.0, 1.0, 0.0)
    assert noise.classify_argmax(5, WAIT, 6) == "other"


# ------------------------------------------------------------------ variance
def test_trace_cov_matches_torch_cov():
    g_RP = torch.randn(6, 11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    acc = variance.TraceCov()
    for g in g_RP:
        acc.add(g)
    assert acc.value() == pytest.approx(float(torch.cov(g_RP.T).trace()), rel=1e-10)
    one = variance.TraceCov()
    one.add(g_RP[0])
    assert math.isnan(one.value())
    assert variance.total_variance([list(g_RP[:3]), list(g_RP[3:])]) == pytest.approx(
        0.5 * float(torch.cov(g_RP[:3].T).trace() + torch.cov(g_RP[3:].T).trace()), rel=1e-10)


def test_loglog_slope_recovers_exponent():
    xs = [10.0, 20.0, 40.0, 80.0]
    assert variance.loglog_slope(xs, [3.0 * x**2.5 for x in xs]) == pytest.approx(2.5, abs=1e-12)
    g = torch.Generator().manual_seed(3)
    noisy = [0.7 * x**1.3 * math.exp(0.01 * float(torch.randn(1, generator=g))) for x in xs]
    assert variance.loglog_slope(xs, noisy) == pytest.approx(1.3, abs=0.05)
    assert math.isnan(variance.loglog_slope([5.0, 5.0], [1.0, 2.0]))
    assert math.isnan(variance.loglog_slope([1.0, 2.0], [0.0, float("nan")]))


def _returns(r, gamma):
    out, acc = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        acc = r[t] + gamma * acc
        out[t] = acc
    return out


def test_rollout_gradients_match_naive_per_row_gradient(tiny_student_dir):
    model = load_model(tiny_student_dir)
    _, prompts, sols = _problems(n=3)
    comps = [sols[0][:5], sols[1][:9] + [EOS], sols[2][:2]]
    batch = make_batch(prompts, comps, PAD)
    teacher_logp_BT = -torch.rand(batch.completion_mask_BT.shape, generator=torch.Generator().manual_seed(4)) * 3
    got = variance.rollout_gradients(model, batch, teacher_logp_BT, (0.0, 1.0))
    W = model.get_output_embeddings().weight
    assert model.get_output_embeddings().bias is None
    for b, c in enumerate(comps):
        one = make_batch([prompts[b]], [c], PAD)
        with torch.no_grad():  # the head's role only (the testbed ties it to the input embedding)
            h_TH = completion_hidden(model, one)[0]
        logp_T = torch.log_softmax(h_TH @ W.T, -1)[torch.arange(len(c)), torch.tensor(c)]
        r = [-(float(logp_T[t].detach()) - float(teacher_logp_BT[b, t])) for t in range(len(c))]
        for gamma in (0.0, 1.0):
            adv = _returns(r, gamma)
            (ref,) = torch.autograd.grad(sum(a * lp for a, lp in zip(adv, logp_T)), W, retain_graph=True)
            torch.testing.assert_close(got[gamma][b], ref.reshape(-1), rtol=1e-4, atol=1e-5)


def test_horizon_point_on_tiny_student(tiny_student_dir):
    from opd.models.sampler import sample

    model, oracle = load_model(tiny_student_dir), OracleTeacher(tokenizer=TOK)
    _, prompts, _ = _problems(h=2, n=2)
    g = torch.Generator().manual_seed(0)

    def sample_fn(rows):
        s = sample(model, rows, max_new_tokens=12, eos_id=EOS, pad_id=PAD, generator=g)
        return s.batch, s.sampler_logp_BT

    pt = variance.horizon_point(model, oracle, sample_fn, prompts, repeats=3)
    assert 0 < pt["length"] <= 12 and all(math.isfinite(pt[k]) and pt[k] >= 0 for k in ("var@0", "var@1"))


# ------------------------------------------------------------------ probe
@pytest.mark.parametrize("task", ["addition", "modchain"])
def test_planted_wrong_step_is_found_by_the_oracle_trace(task):
    oracle = OracleTeacher(tokenizer=TOK)
    h = 4
    _, prompts, sols = _problems(task, h, n=4)
    g = torch.Generator().manual_seed(5)
    for x, y in zip(prompts, sols):
        assert probe.first_deviation(oracle, x, y + [EOS]) is None
        for k in (1, 2, h):
            p = probe.plant_wrong_step(oracle, x, y, SEP, k, g)
            assert p.prefix.count(SEP) == k - 1 and p.clean == y[: len(p.clean)] and len(p.prefix) == len(p.clean)
            assert p.prefix[:-1] == p.clean[:-1] and p.prefix[-1] != p.clean[-1]
            assert probe.first_deviation(oracle, x, p.prefix) == p.position == len(p.prefix) - 1
            assert oracle.next_logprobs(x, p.prefix).argmax() == WAIT  # the correction onset
    with pytest.raises(ValueError):
        probe.cut_after_step(sols[0], SEP, h + 1)


def test_next_token_logp_matches_single_row_forward(tiny_student_dir):
    model = load_model(tiny_student_dir)
    _, prompts, sols = _problems(n=3)
    prefixes = [sols[0][:3], sols[1][:10], []]
    got = probe.next_token_logp(model, prompts, prefixes, WAIT, PAD)
    for b in range(3):
        ids = torch.tensor([prompts[b] + prefixes[b]])
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[WAIT]
        assert float(got[b]) == pytest.approx(float(ref), abs=1e-5)


def test_recovery_rate_and_probe_depth(tiny_student_dir):
    probs, prompts, sols = _problems(n=3)
    verify = lambda i, c: make_task("addition", 4).verify(probs[i], TOK.decode(c, skip_special_tokens=True))
    assert probe.recovery_rate([y[:4] for y in sols], [y[4:] + [EOS] for y in sols], verify) == 1.0
    assert probe.recovery_rate([y[:4] for y in sols], [[EOS]] * 3, verify) == 0.0
    oracle, g = OracleTeacher(tokenizer=TOK), torch.Generator().manual_seed(0)
    planted = [probe.plant_wrong_step(oracle, x, y, SEP, 2, g) for x, y in zip(prompts, sols)]
    out = probe.probe_depth(load_model(tiny_student_dir), planted, verify, wait_id=WAIT, eos_id=EOS, pad_id=PAD,
                            max_new_tokens=30)
    keys = ("p_wait", "onset", "recovery", "clean_recovery", "wait_redo", "false_wait", "false_onset")
    assert out["n"] == 3 and all(0.0 <= out[k] <= 1.0 for k in keys)


@pytest.mark.parametrize("task", ["addition", "modchain"])
def test_correction_shares_on_oracle_continuations(task):
    """The recovering oracle waits and redoes step k exactly, and never waits on a clean
    prefix; the continuing oracle never waits; a wrong redo counts as an onset only."""
    recovering, continuing = OracleTeacher(tokenizer=TOK), OracleTeacher(tokenizer=TOK, recovers=False)
    _, prompts, sols = _problems(task, 4, n=4)
    g = torch.Generator().manual_seed(1)
    planted = [probe.plant_wrong_step(recovering, x, y, SEP, 3, g) for x, y in zip(prompts, sols)]
    go = lambda oracle, prefixes: oracle.generate(prompts, max_new_tokens=60, temperature=0.0, prefix_ids_list=prefixes)  # noqa: E731
    wrong, clean = [p.prefix for p in planted], [p.clean for p in planted]
    for p, y in zip(planted, sols):
        assert p.redo[-1] == SEP and p.redo == y[len(p.clean) - len(p.redo) + 1: len(p.clean) + 1]
    shares = probe.correction_shares(planted, go(recovering, wrong), go(recovering, clean), WAIT)
    assert shares == {"onset": 1.0, "wait_redo": 1.0, "redo_given_wait": 1.0, "false_onset": 0.0}
    none = probe.correction_shares(planted, go(continuing, wrong), go(continuing, clean), WAIT)
    assert none["onset"] == none["wait_redo"] == 0.0 and math.isnan(none["redo_given_wait"])
    bad = [[WAIT] + p.prefix[len(p.clean) - len(p.redo) + 1:] + [SEP] for p in planted]  # redoes the wrong result
    half = probe.correction_shares(planted, bad[:2] + go(recovering, wrong)[2:], go(recovering, clean), WAIT)
    assert half == {"onset": 1.0, "wait_redo": 0.5, "redo_given_wait": 0.5, "false_onset": 0.0}


def test_first_mistake_step_counts_the_steps_before_the_first_deviation():
    from opd.diagnostics.mistakes import first_mistake_shares, first_mistake_step

    probs, prompts, sols = _problems("modchain", 4, n=4)
    oracle = OracleTeacher(tokenizer=TOK, recovers=False)
    m = probs[0].meta["spec"].m

    def wrong_at(ids, k):  # step k's result (its 5th word) replaced by another value mod m
        words = TOK.convert_ids_to_tokens(ids)
        i = 6 * k + 4
        words[i] = str((int(words[i]) + 1) % m)
        return TOK.convert_tokens_to_ids(words)

    wrong_answer = sols[3][:-1] + [TOK.convert_tokens_to_ids(str((int(probs[3].answer) + 1) % 5))]
    comps = [sols[0], wrong_at(sols[1], 2), wrong_at(sols[2], 0), wrong_answer]
    assert [first_mistake_step(oracle, x, y, SEP) for x, y in zip(prompts, comps)] == [None, 2, 0, 4]
    shares = first_mistake_shares(oracle, prompts, comps, SEP, horizon=4)
    assert shares["by_step"] == [0.25, 0.0, 0.25, 0.0]
    assert (shares["answer"], shares["none"], shares["n"]) == (0.25, 0.25, 4)
    assert shares["mode_step"] == 0 and shares["mode_share"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------ end to end
def test_dataset_runs_skip_testbed_sections():
    from opd.diagnostics.diagnose import probe_section, variance_section

    cfg = SimpleNamespace(dataset="data.jsonl")
    assert "testbed" in variance_section(cfg, None, None, (2,), 2, 1, None)["skipped"]
    assert "testbed" in probe_section(cfg, None, None, [], None)["skipped"]


def test_opd_diagnose_end_to_end(tiny_cfg, tmp_path, capsys):
    from opd.run.checkpoint import latest_checkpoint
    from opd.cli import main
    from opd.run.runner import train

    cfg = tiny_cfg(steps=1)
    train(cfg)
    assert main(["diagnose", cfg.run_dir, "--prompts", "4", "--seed", "1"]) == 0
    out = tmp_path / "run" / "diagnose"
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    for title in ("First mistakes", "Coverage decay", "Local noise", "Gradient variance", "Correction path probe", "growth exponent"):
        assert title in text
    for png in ("coverage.png", "noise.png", "variance.png", "probe.png"):
        assert (out / png).stat().st_size > 1000 and f"({png})" in text
    ckpt = latest_checkpoint(cfg.run_dir)
    assert main(["diagnose", str(ckpt), "--out", str(tmp_path / "d2"), "--prompts", "2"]) == 0
    assert (tmp_path / "d2" / "results.json").exists()
    assert main(["diagnose", str(tmp_path)]) == 2  # neither a run nor a checkpoint


def test_opd_diagnose_on_a_dataset_run_skips_testbed_sections(tmp_path):
    """Real-model path: HF student and teacher on a JSONL dataset (as tests/test_real_models.py)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from opd.cli import main

    words = ["<pad>", "<eos>", "<unk>", "what", "is", "plus", "answer:"] + [str(i) for i in range(10)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    paths = []
    for name, hidden in (("student", 16), ("teacher", 32)):
        cfg = Qwen2Config(vocab_size=len(words), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)
    rows = [{"prompt": f"what is {a} plus {b}", "answer": str(a + b)} for a in range(3) for b in range(3)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    assert main(["train", "method=opd", f"student={paths[0]}", f"teacher={paths[1]}", f"dataset={tmp_path / 'd.jsonl'}",
                 "steps=1", "prompts_per_step=2", "group_size=2", "max_new_tokens=6", "eval_size=4", "eval_k=1",
                 "progress=false", f"run_dir={run}"]) == 0
    assert main(["diagnose", str(run), "--prompts", "3"]) == 0
    text = (run / "diagnose" / "report.md").read_text()
    assert text.count("testbed runs only") == 4 and (run / "diagnose" / "coverage.png").exists()
    assert "![teacher entropy](noise.png)" in text and "variance.png" not in text and "probe.png" not in text

