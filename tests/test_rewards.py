"""Rule rewards on hand-written strings (embedded-task and GSM8K styles), `build_reward` parsing, and the
real GSM8K test split: every gold answer scores 1 when stated and 0 when off by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minirlhf.data.formats import load_prompts
from minirlhf.rewards import AnswerReward, FormatReward, WeightedSum, build_reward

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"


def score(reward, completions: list[str], answers: list) -> list[float]:
    prompts = [[{"role": "user", "content": "q"}]] * len(completions)
    return reward.score(prompts, completions, [{"answer": a} for a in answers]).tolist()


ANSWER_CASES = [
    # (completion, answer, expected)
    ("3 + 4 = 7. 7 * 2 = 14. The answer is 14.", "14", 1.0),  # embedded task
    ("3 + 4 = 7. 7 * 2 = 14. The answer is 15.", "14", 0.0),
    ("The answer is 14", 14, 1.0),  # numeric answer in meta
    ("the answer is: 14.", "14", 1.0),  # case-insensitive, colon
    ("The answer is 5. No, wait: the answer is 6.", "6", 1.0),  # the last statement counts
    ("The answer is 5. No, wait: the answer is 6.", "5", 0.0),
    ("The answer is -3.", "-3", 1.0),
    ("The answer is 14.0", "14", 1.0),  # 14.0 == 14
    ("The answer is 1,234.", "She pays 1000 + 234 = <<1000+234=1234>>1234.\n#### 1,234", 1.0),  # GSM8K gold
    ("#### 1234", "Total: 1,234\n#### 1,234", 1.0),
    ("1234", "#### 1,234", 0.0),  # a bare number is not a stated answer
    ("The answer is 1,235.", "#### 1,234", 0.0),
    ("The answer is unknown. It might be 14.", "14", 0.0),
    ("", "14", 0.0),
    ("The answer is 14.", None, 0.0),  # no reference answer: no reward
]


def test_answer_reward_on_hand_strings():
    completions = [c for c, _, _ in ANSWER_CASES]
    answers = [a for _, a, _ in ANSWER_CASES]
    got = score(AnswerReward(), completions, answers)
    for (completion, answer, expected), value in zip(ANSWER_CASES, got):
        assert value == expected, (completion, answer)


FORMAT_CASES = [
    ("3 + 4 = 7. The answer is 7.", 1.0),
    ("The answer is 1,234", 1.0),
    ("The answer is -2.5.", 1.0),
    ("Adding them gives 18.\n#### 18", 1.0),
    ("#### 1,234  \n", 1.0),  # trailing whitespace is fine
    ("The answer is 7. Goodbye!", 0.0),  # must end with the answer
    ("The answer is seven.", 0.0),
    ("7", 0.0),
    ("", 0.0),
]


def test_format_reward_on_hand_strings():
    got = score(FormatReward(), [c for c, _ in FORMAT_CASES], [None] * len(FORMAT_CASES))
    assert got == [e for _, e in FORMAT_CASES]


def test_rewards_return_float_tensors_of_batch_shape():
    for reward in (AnswerReward(), FormatReward()):
        out = reward.score([[{"role": "user", "content": "q"}]] * 3, ["a", "b", "c"], [{"answer": "1"}] * 3)
        assert out.shape == (3,) and out.dtype == torch.float32


def test_build_reward_parses_names_and_weights():
    reward = build_reward("answer:1,format:0.2")
    assert isinstance(reward, WeightedSum)
    assert [(type(fn), w) for fn, w in reward.parts] == [(AnswerReward, 1.0), (FormatReward, 0.2)]
    assert reward.name == "1*answer+0.2*format"
    completions = ["The answer is 7.", "The answer is 8.", "I think 7", "7 is it. The answer is 7. ok"]
    got = score(reward, completions, ["7"] * 4)
    # by hand: answer ∈ {1, 0, 0, 1}, format ∈ {1, 1, 0, 0}
    assert got == pytest.approx([1 + 0.2, 0 + 0.2, 0.0, 1.0])
    parts = reward.score_parts([[{"role": "user", "content": "q"}]] * 4, completions, [{"answer": "7"}] * 4)
    assert parts["answer"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert parts["format"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert reward.combine(parts).tolist() == pytest.approx(got)
    # no weight means 1; spaces around items are fine; negative weights are allowed
    assert [w for _, w in build_reward("answer").parts] == [1.0]
    assert [w for _, w in build_reward(" answer:2 , format:-0.5").parts] == [2.0, -0.5]


def test_build_reward_uses_factories_for_other_names():
    class Constant:
        name = "rm"

        def score(self, prompts, completions, meta):
            return torch.full((len(completions),), 0.25)

    reward = build_reward("rm:2,answer:1", {"rm": Constant})
    assert score(reward, ["The answer is 3.", "no"], ["3", "3"]) == pytest.approx([0.5 + 1.0, 0.5])


def test_build_reward_errors_name_the_problem():
    available = r"reward 'judge' is not available; choose from \['answer', 'format', 'working'\]"
    with pytest.raises(ValueError, match=available):
        build_reward("answer:1,judge:0.5")
    with pytest.raises(ValueError, match="reward 'answer:abc'"):
        build_reward("answer:abc")

    def needs_a_model():
        raise ValueError("the `rm` reward needs `reward_model`")

    with pytest.raises(ValueError, match="reward 'rm:1': the `rm` reward needs"):
        build_reward("rm:1", {"rm": needs_a_model})


def gold_number(answer: str) -> str:
    """The text after the last '####' of a GSM8K answer, as written (may contain commas)."""
    return answer.rsplit("####", 1)[1].strip()


def test_gsm8k_gold_answers_score_one_and_off_by_one_scores_zero():
    if not GSM8K_TEST.exists():
        pytest.skip(f"{GSM8K_TEST} is absent")
    prompts = load_prompts(GSM8K_TEST, prompt_field="question")
    raw = [json.loads(line) for line in GSM8K_TEST.read_text().splitlines() if line.strip()]
    assert len(prompts) == len(raw) == 1319
    assert prompts[0].prompt == [{"role": "user", "content": raw[0]["question"]}]
    assert all(p.answer == r["answer"] for p, r in zip(prompts, raw))  # the raw "... #### N" text is kept

    golds = [gold_number(p.answer) for p in prompts]
    plus_one = [str(int(g.replace(",", "")) + 1) for g in golds]  # every GSM8K test answer is an integer
    meta = [{"answer": p.answer} for p in prompts]
    questions = [p.prompt for p in prompts]
    reward, fmt = AnswerReward(), FormatReward()
    right = [f"The answer is {g}." for g in golds]
    wrong = [f"The answer is {n}." for n in plus_one]
    assert reward.score(questions, right, meta).tolist() == [1.0] * len(prompts)
    assert reward.score(questions, wrong, meta).tolist() == [0.0] * len(prompts)
    assert fmt.score(questions, right, meta).tolist() == [1.0] * len(prompts)
    # the commas-free spelling of a gold with commas is also right
    with_commas = [i for i, g in enumerate(golds) if "," in g]
    assert with_commas
    plain = [f"The answer is {golds[i].replace(',', '')}." for i in with_commas]
    assert reward.score([questions[i] for i in with_commas], plain, [meta[i] for i in with_commas]).tolist() == \
        [1.0] * len(with_commas)


class _FailingJudge:
    """Stands in for a judge whose endpoint is down: every request failed and got the fallback."""

    name = "judge"

    def __init__(self, failed: int) -> None:
        self.stats = {"judge/backend_errors": float(failed), "judge/parse_failures": 0.0}


def test_a_rollout_without_one_usable_reward_is_an_error():
    from minirlhf.algorithms.online import RewardSignalError, check_reward_signal
    from minirlhf.rewards.base import WeightedSum

    with pytest.raises(RewardSignalError, match="none of its 8 samples got a usable reward .8 judge requests failed"):
        check_reward_signal(WeightedSum([(_FailingJudge(8), 1.0)]).reports(), 8, 0.0, 3, 0.2)
    with pytest.raises(RewardSignalError, match="8 non-finite scores"):
        check_reward_signal(WeightedSum([(AnswerReward(), 1.0)]).reports(), 8, 8.0, 3, 0.2)


def test_a_rollout_with_many_unusable_rewards_warns(capsys):
    from minirlhf.algorithms.online import check_reward_signal
    from minirlhf.rewards.base import WeightedSum

    check_reward_signal(WeightedSum([(_FailingJudge(3), 1.0)]).reports(), 8, 0.0, 5, 0.2)
    assert "rollout 5: 38% of the samples got no usable reward (3 judge requests failed" in capsys.readouterr().err
    check_reward_signal(WeightedSum([(_FailingJudge(1), 1.0)]).reports(), 8, 0.0, 5, 0.2)  # 12% is below the threshold
    # with a rule reward beside it, a failed judge still leaves a usable reward: a warning, not an error
    check_reward_signal(WeightedSum([(_FailingJudge(8), 1.0), (AnswerReward(), 1.0)]).reports(), 8, 0.0, 6, 0.2)
    assert capsys.readouterr().err.count("warning") == 1


@pytest.mark.parametrize("answer", ["five", "NaN", "inf", "1" * 5000, None])
def test_rl_answers_the_reward_cannot_check_are_refused_at_load(tmp_path, answer):
    from minirlhf.data.formats import DataError, load_prompts

    path = tmp_path / "rl.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "3"}) + "\n" + json.dumps({"prompt": "q", "answer": answer})
                    + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: field 'answer': .*not a number the answer reward can check"):
        load_prompts(path, numeric_answers=True)
    assert len(load_prompts(path)) == 2  # without an answer-checking reward any answer text is fine


def test_working_reward_checks_every_step():
    texts = ["First, 7 + 5 = 12. 12 - 3 = 9. The answer is 9.", "7 + 5 = 13. The answer is 13.",
             "The answer is 9.", "no idea"]
    assert build_reward("working:1").score([[]] * 4, texts, [{}] * 4).tolist() == [1.0, 0.0, 0.0, 0.0]
