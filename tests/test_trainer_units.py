"""Trainer units: config validation, task levels, prompt cursor, rewards (exact match, math-verify)."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("transformers")

from hadw_trainer.cli import main as cli_main  # noqa: E402
from hadw_trainer.config import ConfigError, apply_overrides  # noqa: E402
from hadw_trainer.data.rewards import (  # noqa: E402
    exact_match,
    last_boxed,
    last_value,
    math_verify_reward,
    overlong_penalty,
)
from hadw_trainer.data.tasks import (  # noqa: E402
    ARITH_LEVELS,
    ArithTask,
    PromptSource,
    load_jsonl,
    shipped_math_sample,
)
from hadw_trainer.recipes import RECIPES, get_recipe  # noqa: E402


# -- config ------------------------------------------------------------------------------------------------------
def test_every_recipe_builds_and_tiny_validates():
    for name in RECIPES:
        cfg = get_recipe(name)
        assert cfg.recipe == name
    get_recipe("tiny-arith").validate()
    get_recipe("smoke").validate()
    assert "qwen3-4b-base-grpo-hadw" in RECIPES and "llama3.2-3b-instruct-dapo" in RECIPES


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(ConfigError, match="tiny-arith"):
        get_recipe("tiny-arithmetic")


def test_overrides_parse_types():
    cfg = apply_overrides(get_recipe("tiny-arith"), ["algo.loss.lambda_scale=1.5", "algo.loss.hadw=false",
                                                     "task.levels=1,3", "model.path=none", "algo.loss.clip_high=0.28",
                                                     "algo.loss.clip_ratio_c=3", "algo.loss.norm_len=none",
                                                     "algo.anchor.mode=ema", "algo.anchor.init=0.4"])
    assert cfg.algo.loss == {"lambda_scale": 1.5, "hadw": False, "clip_high": 0.28, "clip_ratio_c": 3.0,
                             "norm_len": None}
    assert cfg.task.levels == (1, 3) and cfg.model.path is None
    loss = cfg.algo.loss_config()
    assert (loss.lambda_scale, loss.hadw, loss.clip_high, loss.clip_ratio_c) == (1.5, False, 0.28, 3.0)
    anchor = cfg.algo.build_anchor()
    assert (anchor.mode, anchor.init, anchor.window) == ("ema", 0.4, 10)


def test_loss_and_anchor_come_from_the_library():
    """Every LossConfig field and DifficultyAnchor argument is a --set key, and an empty override gives the library's
    own defaults (no default is restated in the trainer)."""
    import dataclasses
    import inspect

    from hadw_kernels import DifficultyAnchor, LossConfig
    from hadw_trainer.config import AlgoConfig, valid_keys

    keys = set(valid_keys())
    assert {f"algo.loss.{f.name}" for f in dataclasses.fields(LossConfig)} <= keys
    args = [n for n in inspect.signature(DifficultyAnchor).parameters if n != "process_group"]
    assert {f"algo.anchor.{n}" for n in args} <= keys
    algo = AlgoConfig()
    assert algo.loss_config() == LossConfig.grpo() and algo.backend == "auto"
    assert algo.build_anchor().state_dict() == DifficultyAnchor().state_dict()
    for preset in ("grpo", "dapo", "gspo"):
        assert AlgoConfig(preset=preset).loss_config() == LossConfig.preset(preset)


@pytest.mark.parametrize("item, match", [
    ("algo.loss.lamda_scale=1.5", r"unknown key 'algo.loss.lamda_scale' \(did you mean 'algo.loss.lambda_scale'\?\)"),
    ("algo.lambda_scale=1.5", r"did you mean 'algo.loss.lambda_scale'"),
    ("algo.anchor.windw=3", r"did you mean 'algo.anchor.window'"),
    ("algo.loss=dapo", "unknown key 'algo.loss'"),
    ("nosection.x=1", "unknown key"),
    ("algo.loss.lambda_scale=big", "expected float"),
    ("train.max_steps=1.5", "expected int"),
    ("algo.loss.hadw=maybe", "expected bool"),
    ("algo.anchor.window=2.5", "expected int"),
    ("algo.preset", "section.field=value"),
])
def test_bad_overrides(item, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_recipe("tiny-arith"), [item])


@pytest.mark.parametrize("items, match", [
    (["rollout.group_size=1"], "group_size=1 must be >= 2"),
    (["algo.mini_batch_prompts=7"], "not divisible by algo.mini_batch_prompts=7"),
    (["algo.micro_batch_prompts=3"], "not divisible by algo.micro_batch_prompts=3"),
    (["algo.preset=ppo"], "algo.preset='ppo' is not valid; choose one of grpo, dapo, gspo, dr_grpo"),
    (["algo.anchor.mode=median"], "algo.anchor: DifficultyAnchor: unknown mode 'median'"),
    (["algo.anchor.window=0"], "window must be an int >= 1"),
    (["algo.loss.clip_ratio_c=0.5"], "clip_ratio_c"),
    (["algo.preset=dr_grpo"], "set algo.loss.norm_len"),
    (["algo.backend=cuda"], "algo.backend='cuda' is not valid"),
    (["task.name=jsonl"], "task.path"),
    (["task.levels=0,6"], "subset of 1,2,3,4,5"),
    (["task.reward=math_verify"], "last running total"),
    (["algo.loss.clip_low=1.5"], "clip_low"),
    (["model.path=/some/model"], "sft.steps > 0"),
    (["optim.lr=0"], "optim.lr=0.0 must be > 0"),
])
def test_incompatible_options(items, match):
    cfg = apply_overrides(get_recipe("tiny-arith"), items)
    with pytest.raises(ConfigError, match=match):
        cfg.validate()


def test_world_size_divisibility():
    cfg = apply_overrides(get_recipe("tiny-arith"), ["rollout.prompts_per_step=6", "algo.mini_batch_prompts=6",
                                                     "algo.micro_batch_prompts=1"])
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="world_size=4"):
        cfg.validate(world_size=4)


def test_cli_reports_config_errors(capsys):
    assert cli_main(["--recipe", "nope", "--output-dir", "/tmp/x"]) == 2
    assert "valid recipes" in capsys.readouterr().err
    assert cli_main(["show", "--recipe", "tiny-arith", "--set", "algo.loss.lambda_scale=x"]) == 2
    assert "expected float" in capsys.readouterr().err
    assert cli_main(["show", "--recipe", "tiny-arith", "--set", "rollout.group_size=1"]) == 2
    assert "group_size" in capsys.readouterr().err


# -- tasks -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("level", ARITH_LEVELS)
def test_arith_levels(level):
    """Level L: L + 1 one-digit operations; the solution is the running total after each, all within 0-9, and
    the answer is the last one (checked by evaluating the prefixes of the question)."""
    rng = random.Random(level)
    for _ in range(200):
        p = ArithTask.problem(rng, level)
        assert p.level == level
        ops = [i for i, ch in enumerate(p.question) if ch in "+-"]
        assert len(ops) == level + 1 and all(len(t) == 1 for t in p.question.replace("-", "+").split("+"))
        totals = [str(eval(p.question[:i])) for i in ops[1:]] + [str(eval(p.question))]
        assert p.solution == ",".join(totals) and p.answer == totals[-1]
        assert all(0 <= int(t) <= 9 for t in totals)


@pytest.mark.parametrize("level", ARITH_LEVELS)
def test_slipped_solution(level):
    """One total off by one, the totals after it computed from the wrong value, every total within 0-9: the answer
    is wrong and the slip sits at various positions."""
    rng = random.Random(level)
    positions = set()
    for _ in range(200):
        p = ArithTask.problem(rng, level)
        got = [int(t) for t in ArithTask.slipped_solution(p, rng).split(",")]
        right = [int(t) for t in p.solution.split(",")]
        assert len(got) == len(right) and all(0 <= t <= 9 for t in got)
        k = next(i for i in range(len(right)) if got[i] != right[i])  # the slip
        delta = got[k] - right[k]
        assert abs(delta) == 1 and all(g - r == delta for g, r in zip(got[k:], right[k:], strict=True))
        positions.add(k)
    assert len(positions) == level + 1  # every step can slip


@pytest.mark.parametrize("slip", [-0.1, 1.5, float("nan")])
def test_bad_slip_is_refused(slip):
    with pytest.raises(ConfigError, match="sft.slip"):
        apply_overrides(get_recipe("tiny-arith"), [f"sft.slip={slip}"]).validate()


def test_warmup_batch_slips():
    """The warm-up imitates slipped solutions at the configured rate (and never with slip 0)."""
    from hadw_trainer.model import char_tokenizer
    from hadw_trainer.sft import _batch

    tok, task = char_tokenizer(), ArithTask()

    def wrong_frac(slip):
        rng = random.Random(0)
        probs = task.sample(random.Random(0), 400)  # the problems _batch draws first with the same rng state
        ids, mask = _batch(tok, task, rng, 400, "{question}=", slip)
        texts = [tok.decode(r[m.bool()][:-1]) for r, m in zip(ids, mask, strict=True)]
        return sum(t != p.solution for t, p in zip(texts, probs, strict=True)) / len(texts)

    assert wrong_frac(0.0) == 0.0
    assert 0.2 < wrong_frac(0.3) < 0.4


def test_eval_set_fixed_distinct_and_held_out():
    task = ArithTask()
    a, b = task.eval_set(50, seed=7), task.eval_set(50, seed=7)
    assert a == b and len(a) == 250
    for lv in ARITH_LEVELS:
        qs = [p.question for p in a if p.level == lv]
        assert len(qs) == len(set(qs)) == 50
    assert task.eval_set(50, seed=8) != a
    # training draws (RL prompts and the warm-up's examples) never include an eval problem; level 1 has 810
    # distinct problems, so 50 of them held out shows up within 2000 draws
    held = {p.question for p in a}
    drawn = ArithTask(levels=(1,)).holding_out(a).sample(random.Random(0), 2000)
    assert not held & {p.question for p in drawn}
    assert held & {p.question for p in ArithTask(levels=(1,)).sample(random.Random(0), 2000)}


def test_prompt_source_cursor_resumes():
    src = PromptSource(3, task=ArithTask())
    src.draw(8)
    state = src.state_dict()
    nxt = src.draw(8)
    other = PromptSource(3, task=ArithTask())
    other.load_state_dict(state)
    assert other.draw(8) == nxt
    with pytest.raises(ValueError, match="seed"):
        PromptSource(4, task=ArithTask()).load_state_dict(state)


def test_jsonl_source_epochs():
    problems = load_jsonl(shipped_math_sample())
    assert len(problems) == 16 and {p.level for p in problems} == {1, 2, 3, 4, 5}
    src = PromptSource(0, problems=problems)
    first = src.draw(16)
    assert sorted(p.question for p in first) == sorted(p.question for p in problems)  # one epoch = a permutation
    assert src.epoch == 1.0


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs fields"):
        load_jsonl(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_jsonl(str(bad))


# -- rewards -----------------------------------------------------------------------------------------------------
def test_last_value():
    assert last_value("5,0,7,3", "3") == 1.0
    assert last_value(" 5,0,7,3\n", "3") == 1.0
    assert last_value("3", "3") == 1.0  # no working: the answer alone
    assert last_value("5,0,7", "3") == 0.0  # stopped early: the last value is an intermediate total
    assert last_value("5,0,7,3,", "3") == 0.0  # a trailing comma leaves an empty last value
    assert last_value("5,0,7,13", "3") == 0.0
    assert last_value("", "0") == 0.0


def test_exact_match():
    assert exact_match("42", "42") == 1.0
    assert exact_match(" 42\n", "42") == 1.0
    assert exact_match("042", "42") == 0.0
    assert exact_match("-3", "3") == 0.0
    assert exact_match("", "0") == 0.0


def test_math_verify_on_shipped_sample():
    pytest.importorskip("math_verify")
    for p in load_jsonl(shipped_math_sample()):
        assert math_verify_reward(f"Let's think. The answer is $\\boxed{{{p.answer}}}$.", p.answer) == 1.0, p
        assert math_verify_reward("The answer is \\boxed{1000001}.", p.answer) == 0.0, p


@pytest.mark.parametrize("response, answer, expected", [
    ("so \\boxed{0.5}", "\\frac{1}{2}", 1.0),          # equal values, different forms
    ("\\boxed{\\frac{10}{12}}", "\\frac{5}{6}", 1.0),
    ("\\boxed{3} then \\boxed{7}", "7", 1.0),          # the last box counts
    ("\\boxed{7} then \\boxed{3}", "7", 0.0),
    ("The answer is 11", "11", 0.0),                   # no box: not an answer
    ("\\boxed{11", "11", 0.0),                         # unclosed box
    ("\\boxed{}", "11", 0.0),                          # empty box
    ("\\boxed{\\frac{1}{", "\\frac{1}{2}", 0.0),       # malformed LaTeX
    ("\\boxed{)(*&^%}", "11", 0.0),                     # garbage
    ("\\boxed{(-2, 2)}", "(-2, 2)", 1.0),              # intervals
    ("\\boxed{[-2, 2]}", "(-2, 2)", 0.0),
])
def test_math_verify_cases(response, answer, expected):
    pytest.importorskip("math_verify")
    assert math_verify_reward(response, answer) == expected


def test_last_boxed_balances_braces():
    assert last_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert last_boxed("\\boxed{a") is None
    assert last_boxed("nothing") is None


def test_overlong_penalty():
    import torch

    pen = overlong_penalty(torch.tensor([4, 6, 7, 8]), max_len=8, buffer=4, penalty=1.0)
    assert pen.tolist() == [0.0, -0.5, -0.75, -1.0]
    assert overlong_penalty(torch.tensor([8]), 8, 0, 1.0).tolist() == [0.0]


def test_step_sums_reduce_weighted_means_and_totals():
    """StepSums: value = sum of numerators / sum of weights (here on one process, where the reduction is the
    identity): a token mean over calls of different sizes, a total, and NaN for a name whose weights are all 0."""
    from hadw_trainer.observe.logger import StepSums

    s = StepSums()
    s.add("clipfrac", 0.5 * 10, 10)  # a call with 10 tokens at 0.5 and one with 30 at 0.1
    s.add("clipfrac", 0.1 * 30, 30)
    s.add("tokens", 40, 1.0)
    s.add("empty", 0.0, 0.0)
    got = s.reduce()
    assert got["clipfrac"] == pytest.approx((5 + 3) / 40) and got["tokens"] == 40
    assert got["empty"] != got["empty"] and list(got) == ["clipfrac", "empty", "tokens"]


def test_compare_summary_pairs_by_seed():
    """The comparison table: mean ± sd [min, max] per label, the gain over the base and the degenerate fraction, and
    each label's differences to the first one paired by seed (hand-computed numbers)."""
    from hadw_trainer.observe.plots import summary

    def run(seed, finals, base=0.4, degen=(0.2, 0.4), step=120):
        ev = {"overall": finals[-1], "level_1": finals[0]}
        return {"config": {"train": {"seed": seed}}, "metrics": [{"degenerate_group_frac": d} for d in degen],
                "eval": {"base": {"avg@8": {"overall": base}}, "final": {"step": step, "avg@8": ev}}, "dir": f"s{seed}"}

    groups = {"GRPO": [run(0, (0.5, 0.5)), run(1, (0.7, 0.6))],
              "HA-DW": [run(1, (0.6, 0.7)), run(0, (0.5, 0.6), degen=(0.1, 0.1))]}
    lines = summary(groups, "avg@8", ["level_1", "overall"])
    assert [c.strip() for c in lines[1].split("|")[1:]] == ["GRPO (n=2)", "HA-DW (n=2)"]
    table = {ln.split("|")[0].strip(): [c.split() for c in ln.split("|")[1:]] for ln in lines[2:7]}
    assert table["L1"][0] == ["0.600", "±", "0.141", "[0.500,0.700]"]  # GRPO L1: 0.5, 0.7
    assert table["gain"][0] == ["0.150", "±", "0.071", "[0.100,0.200]"]  # 0.1, 0.2
    assert table["degenerate"] == [["0.300", "±", "0.000", "[0.300,0.300]"], ["0.200", "±", "0.141", "[0.100,0.300]"]]
    assert table["base"][1] == ["0.400", "±", "0.000", "[0.400,0.400]"]
    # HA-DW - GRPO by seed: seed 1 (L1 -0.1, overall +0.1), seed 0 (L1 0, overall +0.1)
    assert "HA-DW - GRPO (2 pairs)" in lines[8]
    assert lines[9].split("|")[1].split() == ["-0.050", "±", "0.071"]  # L1
    assert lines[10].split("|")[1].split() == ["+0.100", "±", "0.000"]  # overall
    assert lines[11].endswith("overall by seed: 1: +0.100, 0: +0.100")
    # two runs of one label with the same seed cannot be paired; an unfinished run is pointed out
    groups["HA-DW"].append(run(0, (0.5, 0.5), step=90))
    lines = summary(groups, "avg@8", ["level_1", "overall"])
    assert lines[-1] == "HA-DW - GRPO: not paired (a label has two runs with the same seed)"
    assert lines[-2] == "note: the runs end at different steps [90, 120] (unfinished runs?)"


def test_compare_plots_runs_and_leaves_out_one_without_an_evaluation(tmp_path):
    """`hadw-train compare` end to end on run directories; a run stopped before its first evaluation (metrics, no
    eval.json) is left out of the plot as of the table, instead of failing."""
    pytest.importorskip("matplotlib")
    from hadw_trainer.observe.plots import compare

    def write_run(name, seed, final, with_eval=True):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"algo": {"preset": "grpo"}, "train": {"seed": seed}}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "degenerate_group_frac": 0.25}) + "\n")
        if with_eval:
            ev = {"overall": final, "level_1": final}
            (d / "eval.json").write_text(json.dumps({
                "base": {"greedy": {"overall": 0.5, "level_1": 0.5}},
                "final": {"step": 2, "greedy": ev},
                "history": [{"step": 0, "greedy": {"overall": 0.5}}, {"step": 2, "greedy": ev}]}))
        return str(d)

    dirs = [write_run("a", 0, 0.6), write_run("b", 1, 0.8), write_run("c", 2, 0.0, with_eval=False)]
    text = compare(dirs, str(tmp_path / "cmp.png"), mode="greedy")
    assert (tmp_path / "cmp.png").stat().st_size > 0
    assert "GRPO+HA-DW (n=2)" in text.splitlines()[1]
    gain = next(ln for ln in text.splitlines() if ln.strip().startswith("gain"))
    assert gain.split("|")[1].split()[:3] == ["0.200", "±", "0.141"]  # 0.1 and 0.3 over the base 0.5


def test_compare_groups_runs_by_label_and_learning_rate():
    """Default labels: the preset, +HA-DW when on, and the learning rate where runs of one label differ in it."""
    from hadw_trainer.observe.plots import group_runs

    def run(hadw, lr, seed):
        return {"config": {"algo": {"preset": "grpo", "loss": {"hadw": hadw}}, "optim": {"lr": lr},
                           "train": {"seed": seed}}, "dir": f"r{seed}"}

    runs = [run(False, 1e-4, 0), run(True, 1e-4, 0), run(False, 1.3e-4, 0), run(False, 1e-4, 1), run(True, 1e-4, 1)]
    groups = group_runs(runs)
    assert {k: [r["config"]["train"]["seed"] for r in v] for k, v in groups.items()} == {
        "GRPO, lr 0.0001": [0, 1], "GRPO+HA-DW": [0, 1], "GRPO, lr 0.00013": [0]}
    assert list(group_runs(runs, ["a", "b", "a", "a", "b"])) == ["a", "b"]
    assert list(group_runs(runs[:2])) == ["GRPO", "GRPO+HA-DW"]
