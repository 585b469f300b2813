"""pipelines.scoring: each metric against answers worked out by hand, and the kind of each record."""

import pytest

from pipelines import scoring


def chat(prompt, answer, **extra):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], **extra}


MCQ = "下列哪项正确？\nA. 合同有效\nB. 合同无效\nC. 效力待定\nD. 可撤销\n答案："


@pytest.mark.parametrize("payload,kind", [
    (chat(MCQ, "B"), "choice"),
    (chat("Which is right?\n(A) yes\n(B) no", "(A)"), "choice"),
    (chat("该行为是否构成犯罪？", "正确"), "label"),
    (chat("Sentiment of: I loved it", "positive"), "label"),
    (chat("列出文中的当事人", "张三、李四、王五有限公司"), "extraction"),
    (chat("Keywords?", "contract law; tort; remedies"), "extraction"),
    (chat("What happens when a contract is void?", "A void contract has no legal effect. Neither party can "
                                                   "enforce it, and any performance may be restituted."), "free"),
    (chat("A. only one option\n", "A"), "label"),            # one option is not a choice
    (chat("Which?\nB. two\nC. three\nD. four", "C"), "choice"),   # LawBench's rows that lost option A
    ({"text": "raw text has no answer"}, None),
])
def test_record_kind(payload, kind):
    assert scoring.record_kind(payload) == kind


def test_short_answers_are_labels_only_where_they_repeat_in_their_set():
    chat_set = [chat("hello", "hi there"), chat("how are you", "fine thanks"), chat("bye", "see you")]
    labels = scoring.repeated_answers(chat_set)
    assert labels == set() and scoring.record_kind(chat_set[0], labels=labels) == "free"
    cls = [chat("I loved it", "Positive"), chat("awful", "negative"), chat("great!", "positive.")]
    labels = scoring.repeated_answers(cls)
    assert labels == {"positive"}
    assert [scoring.record_kind(p, labels=labels) for p in cls] == ["label", "free", "label"]
    assert scoring.record_kind(chat("Are you a robot?", "Yes, I am")) == "label"     # a reply, not a list
    assert scoring.record_kind(chat("Are you a robot?", "Yes, I am"), labels=set()) == "free"


def test_kind_override_per_category():
    assert scoring.record_kind(chat("Keywords?", "contract law; tort"), "free") == "free"
    assert scoring.record_kind(chat("no options here", "yes"), "choice") == "label"   # choice needs options


@pytest.mark.parametrize("pred,gold,expected", [
    ("B", "B", 1.0), ("A", "A", 1.0), ("B", "A", 0.0), ("答案：B", "B", 1.0), ("(C) 效力待定", "C", 1.0), ("A", "B", 0.0), ("", "B", 0.0),
    ("The Positive.", "positive", 1.0), ("negative", "positive", 0.0),
    ("正确\n因为行为人……", "正确", 1.0), ("正确。", "正确", 1.0), ("不正确", "正确", 0.0),
    ("positive sentiment overall", "positive", 0.0),
])
def test_exact_match(pred, gold, expected):
    assert scoring.exact_match(pred, gold) == expected


def test_token_f1_known_answers():
    # 2 shared words of 3 predicted and 4 gold: P = 2/3, R = 1/2, F1 = 4/7
    assert scoring.token_f1("contract tort crime", "contract tort lease remedy") == pytest.approx(4 / 7)
    assert scoring.token_f1("The Contract!", "contract") == pytest.approx(1.0)   # articles, case, punctuation
    # Chinese is scored per character: 张三 vs 张三李四 -> P = 1, R = 1/2, F1 = 2/3
    assert scoring.token_f1("张三", "张三、李四") == pytest.approx(2 / 3)
    assert scoring.token_f1("王五", "张三") == 0.0
    assert scoring.token_f1("", "") == 1.0 and scoring.token_f1("x", "") == 0.0
    assert scoring.token_f1("x x y", "x y y") == pytest.approx(2 / 3)           # counts, not sets


def test_rouge_l_known_answers():
    # LCS of "the cat sat on the mat" vs "the cat lay on the mat" (articles dropped): cat, on, mat = 3 of 4 and 4
    assert scoring.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.75)
    # order matters, unlike F1: LCS("y x", "x y") = 1 -> P = R = 1/2
    assert scoring.rouge_l("y x", "x y") == pytest.approx(0.5)
    assert scoring.token_f1("y x", "x y") == pytest.approx(1.0)
    # character level for Chinese: 合同无效 vs 该合同无效力: LCS 4, P = 4/4, R = 4/6 -> F1 = 0.8
    assert scoring.rouge_l("合同无效", "该合同无效力") == pytest.approx(0.8)
    assert scoring.rouge_l("完全不同", "合同") == pytest.approx(2 * (1 / 4) * (1 / 2) / (1 / 4 + 1 / 2))  # 同


def test_tokens_mix_words_and_characters():
    assert scoring.tokens("Section 3 of 《民法典》") == ["section", "3", "of", "民", "法", "典"]


def test_score_answer_dispatch_and_choice():
    assert scoring.score_answer("label", "Positive", "positive") == 1.0
    assert scoring.score_answer("extraction", "x b", "x c") == pytest.approx(0.5)
    assert scoring.score_answer("free", "x y", "x y") == 1.0
    assert scoring.choose_option({"A": -3.0, "B": -1.5, "C": -1.5}) == "B"
    with pytest.raises(ValueError, match="unknown record kind"):
        scoring.score_answer("essay", "a", "a")
