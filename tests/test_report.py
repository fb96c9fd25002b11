"""The run report page: it parses, holds every question and answer escaped, loads nothing from the network, shows
evaluate.py's numbers, and (slow) renders and sorts in headless Chromium."""
import importlib.util
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser

import pytest

from poetry.report.__main__ import main as report_main
from poetry.report.rows import poem_form

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("evaluate_cli", ROOT / "evaluate.py")
evaluate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate)

# Breaks out of a cell, a script, an attribute or a tag, if the page did not escape it
HOSTILE = '</td></table><script>window.pwned = 1</script>"\'><img src=x onerror="window.pwned = 2">&amp;'

QUESTIONS = [
    {"idx": 3, "title": "静夜思", "author": "李白", "content": "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
     "qa_words": ["疑", "举头"], "qa_sents": ["床前明月光，疑是地上霜。"],
     "choose": {"A": "思乡之情", "B": "欢快的重逢", "C": "平静", "D": "壮志豪情"}},
    {"idx": 5, "title": f"春晓{HOSTILE}", "author": "孟浩然",
     "content": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
     "qa_words": ["晓"], "qa_sents": ["春眠不觉晓，处处闻啼鸟。", "夜来风雨声，花落知多少。"],
     "choose": {"A": "惜春之情", "B": "喜悦", "C": HOSTILE, "D": "悲伤"}},
    {"idx": 8, "title": "清平乐·村居", "author": "辛弃疾",
     "content": "茅檐低小，溪上青青草。醉里吴音相媚好，白发谁家翁媪？"
                "大儿锄豆溪东，中儿正织鸡笼。最喜小儿亡赖，溪头卧剥莲蓬。",
     "qa_words": ["茅檐", "亡赖"], "qa_sents": ["大儿锄豆溪东，中儿正织鸡笼。"],
     "choose": {"A": "闲适自得", "B": "离别的愁绪", "C": "愤慨", "D": "孤独寂寞"}},
]
GOLD = [
    {"idx": 3, "ans_qa_words": {"疑": "好像是这样", "举头": "抬起头来"},
     "ans_qa_sents": {"床前明月光，疑是地上霜。": "明亮的月光洒在床前，好像地上泛起了一层霜。"}, "choose_id": "A"},
    {"idx": 5, "ans_qa_words": {"晓": "天亮，早晨。"},
     "ans_qa_sents": {"春眠不觉晓，处处闻啼鸟。": "春夜酣睡，不知不觉天已大亮，到处都能听见鸟儿的啼叫。",
                      "夜来风雨声，花落知多少。": "想起昨夜的风雨声，不知道有多少花被打落了。"}, "choose_id": "A"},
    {"idx": 8, "ans_qa_words": {"茅檐": "茅屋的屋檐。", "亡赖": "同“无赖”，这里指顽皮、淘气。"},
     "ans_qa_sents": {"大儿锄豆溪东，中儿正织鸡笼。": "大儿子在溪东边的豆地锄草，二儿子正在编织鸡笼。"},
     "choose_id": "A"},
]


def answers(words: list[list[str]], sents: list[list[str]], choices: str) -> list[dict]:
    return [{"idx": gold["idx"], "ans_qa_words": dict(zip(gold["ans_qa_words"], w, strict=True)),
             "ans_qa_sents": dict(zip(gold["ans_qa_sents"], s, strict=True)), "choose_id": c}
            for gold, w, s, c in zip(GOLD, words, sents, choices, strict=True)]


# Fine-tuning hurts question 3 (it was perfect), helps question 5 and barely changes question 8
ZERO_SHOT = answers([["好像是这样", "抬起头来"], ["不知道"], ["茅草", HOSTILE]],
                    [["明亮的月光洒在床前，好像地上泛起了一层霜。"], ["睡觉", "下雨"], ["儿子们干活。"]], "ABC")
FINE_TUNED = answers([["怀疑", "头"], ["天亮，早晨。"], ["茅屋的屋檐。", "淘气"]],
                     [["床前有光。"], ["春夜酣睡，不知不觉天已大亮，到处都能听见鸟儿的啼叫。", f"花落{HOSTILE}"],
                      ["大儿子锄草，二儿子编鸡笼。"]], "CAD")


class Element:
    def __init__(self, tag: str, attrs: dict, parent):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)

    def find_all(self, tag: str, css: str | None = None) -> list:
        found = []
        for child in self.children:
            if isinstance(child, Element):
                if child.tag == tag and (css is None or css in child.attrs.get("class", "").split()):
                    found.append(child)
                found += child.find_all(tag, css)
        return found

    def find(self, tag: str, css: str | None = None):
        return self.find_all(tag, css)[0]


class Page(HTMLParser):
    """The standard library's parser, building a tree and failing on any tag closed out of order."""

    VOID = {"meta", "br", "input", "img", "hr", "link", "col", "wbr", "source"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self.open = self.root
        self.feed(html)
        self.close()
        assert self.open is self.root, f"<{self.open.tag}> is never closed"

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs), self.open)
        self.open.children.append(element)
        if tag not in self.VOID:
            self.open = element

    def handle_startendtag(self, tag, attrs):
        self.open.children.append(Element(tag, dict(attrs), self.open))

    def handle_endtag(self, tag):
        assert tag == self.open.tag, f"</{tag}> closes <{self.open.tag}>"
        self.open = self.open.parent

    def handle_data(self, data):
        self.open.children.append(data)


def write(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def metrics_records(at_start: bool) -> list[dict]:
    records = [{"step": step, "train/loss": 3.0 - step / 10, "train/lr": 1e-3} for step in range(1, 5)]
    evaluations = [{"step": step, "val/acc": 0.25 + step / 20, "val/proxy_total": 0.2 + step / 40}
                   for step in ((0, 4) if at_start else (4,))]
    return sorted(records + evaluations, key=lambda r: r["step"])


def write_metrics(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    """A run directory laid out as make demo lays it out, before evaluate.py runs."""
    run = tmp_path / "run"
    (run / "heldout").mkdir(parents=True)
    return {"run": run, "questions": write(run / "heldout" / "questions.json", QUESTIONS),
            "gold": write(run / "heldout" / "gold.json", GOLD), "zero": write(run / "zero_shot.json", ZERO_SHOT),
            "tuned": write(run / "finetuned.json", FINE_TUNED),
            "metrics": write_metrics(run / "metrics.jsonl", metrics_records(at_start=True))}


def run_evaluate(capsys, files, *extra):
    code = evaluate.main([str(a) for a in ("--gold", files["gold"], "--pred", files["zero"], "--label", "zero-shot",
                                           "--pred", files["tuned"], "--label", "fine-tuned", *extra)])
    return code, capsys.readouterr()


@pytest.fixture
def page(files, capsys):
    """(page text, parsed page, report.json) of evaluate.py --html and --report on the files."""
    out = files["run"] / "report.html"
    code, printed = run_evaluate(capsys, files, "--questions", files["questions"], "--metrics", files["metrics"],
                                 "--html", out, "--report", files["run"] / "report.json")
    assert code == 0, printed.err
    assert f"page written to {out}" in printed.out
    text = out.read_text(encoding="utf-8")
    return text, Page(text).root, json.loads((files["run"] / "report.json").read_text(encoding="utf-8"))


def rows(root) -> list:
    return root.find_all("article", "q")


def test_page_holds_every_question_and_answer_as_text(page):
    _, root, _ = page
    articles = rows(root)
    assert [a.attrs["id"] for a in articles] == ["q-3", "q-5", "q-8"]
    for article, question, gold, zero, tuned in zip(articles, QUESTIONS, GOLD, ZERO_SHOT, FINE_TUNED, strict=True):
        shown = article.text()
        assert question["title"] in article.find("h3").text() and question["author"] in shown
        assert re.sub("([。？])", "\\1\n", question["content"]).strip() == article.find("div", "poem").text()
        options = [li.text() for li in article.find("ol", "opts").find_all("li")]
        assert [text.split(" ", 1)[1].startswith(option) for text, option in
                zip(options, question["choose"].values(), strict=True)] == [True] * 4
        cells = [[cell.text() for cell in tr.children if isinstance(cell, Element)]
                 for tr in article.find("table", "ans").find("tbody").find_all("tr")]
        keys = [*gold["ans_qa_words"], *gold["ans_qa_sents"]]
        assert [row[0] for row in cells] == keys
        for row, key in zip(cells, keys, strict=True):
            part = "ans_qa_words" if key in gold["ans_qa_words"] else "ans_qa_sents"
            assert row[1] == gold[part][key]
            assert row[2].startswith(zero[part][key] + " ") and row[3].startswith(tuned[part][key] + " ")


def test_hostile_text_is_escaped_and_never_runs(page):
    text, root, _ = page
    assert len(root.find_all("script")) == 1 and "window.pwned" not in root.find("script").text()
    assert not root.find_all("img")
    assert HOSTILE not in text  # never verbatim: every occurrence is escaped
    question_8, question_5 = rows(root)[2], rows(root)[1]
    assert any(td.text().startswith(HOSTILE + " ") for td in question_8.find_all("td"))  # a word's answer
    assert any(td.text().startswith(f"花落{HOSTILE} ") for td in question_5.find_all("td"))  # a sentence's
    assert any(li.text() == f"C {HOSTILE}" for li in question_5.find_all("li"))  # an option
    assert HOSTILE in question_5.find("h3").text()  # the title


def test_page_references_no_network_resource(page):
    text, root, _ = page
    assert not re.search(r"https?:|//[a-z]", text.replace("</", "")), "the page names a network location"
    assert not root.find_all("link") and not root.find_all("iframe") and "url(" not in text and "@import" not in text
    for element in [root, *root.find_all("a"), *root.find_all("img"), *root.find_all("script")]:
        assert not element.attrs.get("src") and element.attrs.get("href", "#").startswith("#")


def test_score_table_shows_evaluate_numbers(page):
    _, root, report = page
    table = root.find("table", "scores")
    lines = {tr.find_all("th")[0].text(): [td.text() for td in tr.find_all("td")] for tr in table.find_all("tr")[1:]}
    assert list(lines)[0] == "total"  # the official total first
    assert lines["total"][:2] == ["incomplete", "incomplete"] and lines["bertscore_words"][:2] == ["off", "off"]
    names = {"accuracy": "acc", "bleu_words": "bleu_words", "bleu_sents": "bleu_sents",
             "bleu_words_reweighed": "bleu_words_reweighed", "bleu_sents_reweighed": "bleu_sents_reweighed",
             "proxy_total (no BERTScore)": "proxy_total",
             **{f"{k}_{p} (F, characters)": f"{k}_{p}" for p in ("words", "sents")
                for k in ("rouge1", "rouge2", "rougeL")}}
    for shown, key in names.items():
        zero, tuned = report["zero-shot"][key], report["fine-tuned"][key]
        assert lines[shown] == [f"{zero:.4f}", f"{tuned:.4f}", f"{tuned - zero:+.4f}"], shown


def item_total(item: dict) -> float:
    """0.5·correct + 0.5·mean(mean word BLEU, mean sentence BLEU): derived here from report.json, not the page's."""
    def mean(values):
        return sum(values) / len(values)

    return 0.5 * item["correct"] + 0.5 * mean([mean([w["bleu"] for w in item["words"]]),
                                               mean([s["bleu"] for s in item["sents"]])])


def test_each_question_shows_its_scores_and_change(page):
    _, root, report = page
    for article, zero, tuned in zip(rows(root), report["zero-shot"]["items"], report["fine-tuned"]["items"],
                                    strict=True):
        change = item_total(tuned) - item_total(zero)
        assert float(article.attrs["data-change"]) == pytest.approx(change, abs=1e-6)
        assert article.find("span", "chg").text() == f"{change:+.3f}"
        chips = [span.text() for span in article.find("table", "ans").find_all("span", "sc")]
        expected = [f"{value:.2f}" for item in (zero, tuned) for answer in item["words"] + item["sents"]
                    for value in (answer["bleu"], answer["rouge"]["rougeL"])]
        assert sorted(chips) == sorted(expected)
        wrong = [str(i) for i, item in enumerate((zero, tuned)) if not item["correct"]]
        assert article.attrs["data-wrong"].split() == wrong
        picks = {li.find("b").text(): [s.text() for s in li.find_all("span", "pick")]
                 for li in article.find("ol", "opts").find_all("li")}
        assert picks[zero["choose_id"]][:1] == ["zero-shot"] and "fine-tuned" in picks[tuned["choose_id"]]
    hurt = root.find("div", "changes").find("ol")
    assert hurt.find("a").attrs["href"] == "#q-3"  # the largest loss, listed first


def test_forms_and_emotion_confusion(page):
    _, root, _ = page
    assert [a.attrs["data-form"] for a in rows(root)] == ["五言绝句", "五言绝句", "词/杂言"]
    zero_shot_table = root.find_all("table", "confusion")[0]
    positive = next(tr for tr in zero_shot_table.find_all("tr") if tr.find_all("th")[0].text() == "positive")
    # gold 闲适自得 (positive) picked 愤慨 (negative) by zero-shot: a positive poem read as negative
    assert [td.text() for td in positive.find_all("td")] == ["0", "1", "0", "0", "0/1"]


@pytest.mark.parametrize("content, form", [
    ("床前明月光，疑是地上霜。举头望明月，低头思故乡。", "五言绝句"),
    ("泪湿罗巾梦不成，夜深前殿按歌声。(湿 一作：尽)红颜未老恩先断，斜倚薰笼坐到明。", "七言绝句"),
    ("太乙近天都，连山接海隅。白云回望合，青霭入看无。分野中峰变，阴晴众壑殊。欲投人处宿，隔水问樵夫。", "五言律诗"),
    ("慈母手中线，游子身上衣。临行密密缝，意恐迟迟归。谁言寸草心，报得三春晖。", "五言古诗"),
    ("明月几时有？把酒问青天。不知天上宫阙，今夕是何年。", "词/杂言"),
])
def test_poem_form_from_its_lines(content, form):
    assert poem_form(content) == form


def test_curves_mark_the_step_zero_evaluation(page, files, capsys):
    _, root, _ = page
    assert len(root.find_all("svg", "chart")) == 3 and len(root.find_all("circle", "start")) == 2  # acc, proxy
    write_metrics(files["metrics"], metrics_records(at_start=False))
    out = files["run"] / "again.html"
    run_evaluate(capsys, files, "--questions", files["questions"], "--metrics", files["metrics"], "--html", out)
    again = Page(out.read_text(encoding="utf-8")).root
    assert not again.find_all("circle", "start") and any("No evaluation at step 0" in p.text()
                                                         for p in again.find_all("p", "note"))


def test_report_of_a_run_directory_matches_evaluate(page, files, capsys):
    _, root, _ = page
    assert report_main([str(files["run"]), "--out", str(files["run"] / "from-run.html")]) == 0
    assert capsys.readouterr().out.strip() == str(files["run"] / "from-run.html")
    again = Page((files["run"] / "from-run.html").read_text(encoding="utf-8")).root
    assert again.find("table", "scores").text() == root.find("table", "scores").text()
    assert [a.text() for a in rows(again)] == [a.text() for a in rows(root)]
    assert report_main([str(files["run"])]) == 0 and (files["run"] / "report.html").is_file()


def test_one_submission_is_shown_without_comparison(files, capsys):
    out = files["run"] / "report.html"
    arguments = ("--gold", files["gold"], "--pred", files["zero"], "--questions", files["questions"], "--html", out,
                 "--report", files["run"] / "report.json")
    assert evaluate.main([str(a) for a in arguments]) == 0
    root = Page(out.read_text(encoding="utf-8")).root
    assert [th.text() for th in root.find("table", "scores").find("thead").find_all("th")] == ["metric", "zero_shot"]
    assert not root.find_all("div", "changes") and not root.find_all("span", "chg")
    assert [option.attrs["value"] for option in root.find_all("option")] == ["order asc", "total0 asc"]
    capsys.readouterr()
    assert report_main([str(files["run"])]) == 0  # a report of one submission has no labels
    again = Page((files["run"] / "report.html").read_text(encoding="utf-8")).root
    assert [th.text() for th in again.find("table", "scores").find("thead").find_all("th")] == ["metric", "submission"]


def test_html_needs_the_questions(files, capsys):
    code, printed = run_evaluate(capsys, files, "--html", files["run"] / "report.html")
    assert code == 2 and printed.err.count("\n") == 1 and printed.err.startswith("error: --html needs --questions")
    assert not (files["run"] / "report.html").exists()


@pytest.mark.parametrize("questions, expected", [
    (QUESTIONS[:2], "{questions}: 2 questions, but {gold} has 3 answers"),
    ([QUESTIONS[0], dict(QUESTIONS[1], idx=6), QUESTIONS[2]], "{gold}:record 1: field 'idx': is 5, but question 1 "
                                                              "has idx 6"),
    ([QUESTIONS[0], QUESTIONS[1], dict(QUESTIONS[2], qa_words=["亡赖", "茅檐"])],
     "{gold}:record 2: field 'ans_qa_words'"),
], ids=["count", "idx", "word-order"])
def test_questions_that_are_not_the_gold_ones_are_one_error_line(files, capsys, questions, expected):
    write(files["questions"], questions)
    code, printed = run_evaluate(capsys, files, "--questions", files["questions"], "--html", files["run"] / "r.html")
    assert code == 2 and printed.out == "" and printed.err.count("\n") == 1
    assert printed.err.startswith("error: " + expected.format(questions=files["questions"], gold=files["gold"]))


def test_bad_metrics_file_is_one_error_line(files, capsys):
    files["metrics"].write_text('{"step": 1, "train/loss": 2.0}\n{"step": \n', encoding="utf-8")
    code, printed = run_evaluate(capsys, files, "--questions", files["questions"], "--metrics", files["metrics"],
                                 "--html", files["run"] / "r.html")
    assert code == 2
    assert printed.err == f"error: {files['metrics']}:line 2: invalid JSON at column 10: Expecting value\n"


def _edit_report(files, edit) -> None:
    path = files["run"] / "report.json"
    report = json.loads(path.read_text(encoding="utf-8"))
    edit(report)
    write(path, report)


@pytest.mark.parametrize("edit, expected", [
    (None, "{run}/report.json: no such file"),
    (lambda r: r["fine-tuned"]["items"][1]["words"][0].pop("pred"),
     "{run}/report.json:item 1: submission 'fine-tuned': missing 'pred'"),
    (lambda r: r["zero-shot"]["items"][2].update(choose_id=["A"]),
     "{run}/report.json:item 2: submission 'zero-shot': 'choose_id' is [\"A\"]"),
    (lambda r: r["zero-shot"].update(acc=0.99), "{run}/report.json: field 'acc': submission 'zero-shot': is 0.99"),
], ids=["missing", "missing-field", "wrong-type", "edited-aggregate"])
def test_bad_run_directory_is_one_error_line(files, capsys, edit, expected):
    if edit is not None:
        assert run_evaluate(capsys, files, "--report", files["run"] / "report.json")[0] == 0
        _edit_report(files, edit)
    assert report_main([str(files["run"])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: " + expected.format(run=files["run"]))


def test_run_questions_must_match_its_report(files, capsys):
    assert run_evaluate(capsys, files, "--report", files["run"] / "report.json")[0] == 0
    write(files["questions"], QUESTIONS[1:])
    assert report_main([str(files["run"])]) == 2
    assert capsys.readouterr().err == (f"error: {files['questions']}: 2 questions, but {files['run']}/report.json "
                                       f"has 3 answers\n")


@pytest.mark.slow
def test_page_renders_and_sorts_in_headless_chromium(page, files):
    from PIL import Image

    from poetry.report.chromium import Chromium, find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium here: make test-slow installs Debian's chromium package (apt-get, as root)")
    _, _, report = page
    changes = [item_total(t) - item_total(z) for z, t in zip(report["zero-shot"]["items"],
                                                            report["fine-tuned"]["items"], strict=True)]
    worst_first = [f"q-{QUESTIONS[i]['idx']}" for i in sorted(range(3), key=lambda i: changes[i])]
    assert worst_first != ["q-3", "q-5", "q-8"]  # else sorting would leave the order as it was
    order = "Array.from(document.querySelectorAll('article.q')).filter(a => !a.hidden).map(a => a.id)"
    with Chromium(width=1400, height=1000) as browser:
        seconds = browser.open(files["run"] / "report.html")
        assert seconds < 10 and browser.evaluate(order) == ["q-3", "q-5", "q-8"]
        screenshot = Image.open(io.BytesIO(browser.screenshot())).convert("L")
        histogram = screenshot.histogram()
        assert max(histogram) < 0.95 * sum(histogram), "the screenshot is (almost) one colour: a blank page"
        assert len([n for n in histogram if n]) > 20
        assert browser.evaluate("typeof window.pwned") == "undefined"  # the hostile answers never ran
        browser.evaluate("(() => { const sort = document.getElementById('sort'); sort.value = 'change asc';"
                         " sort.dispatchEvent(new Event('change')); })()")
        assert browser.evaluate(order) == worst_first
        browser.evaluate("document.querySelector('input[data-filter=wrong][value=\"1\"]').click()")
        wrong_after = [f"q-{q['idx']}" for q, item in zip(QUESTIONS, report["fine-tuned"]["items"], strict=True)
                       if not item["correct"]]
        assert browser.evaluate(order) == [row for row in worst_first if row in wrong_after]
        assert browser.evaluate("document.getElementById('shown').textContent") == f"{len(wrong_after)} of 3 questions"


@pytest.mark.slow
def test_bench_script_measures_a_page_of_synthetic_questions(tmp_path):
    from poetry.report.chromium import find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium here: make test-slow installs Debian's chromium package (apt-get, as root)")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--items", "30", "--repeats", "1",
                             "--out", str(tmp_path / "run"), "--results-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    [saved] = tmp_path.glob("report-*.json")
    results = json.loads(saved.read_text(encoding="utf-8"))
    assert results["rows"] == 30 and results["page_bytes"] == (tmp_path / "run" / "report.html").stat().st_size
    assert len(results["open_s"]) == 1 and results["sort_ms"] > 0 and results["machine"]["logical_cores"]
    questions = json.loads((tmp_path / "run" / "questions.json").read_text(encoding="utf-8"))
    assert [q["idx"] for q in questions] == list(range(30))
