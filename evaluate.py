"""
Evaluation: a client's greedy answers on its own test set, its test loss, and the metrics that
score them, as the official evaluation scripts score (hand-written, nothing to download):

    captioning          CIDEr-D (the COCO caption evaluation: PTB tokenisation, then CIDEr-D), x100
    VQA, text reading   VQA accuracy (the official VQA v2 evaluation, vqaEval.py as GT-Vision-Lab
                        fixed it in 2021: its normalisation, and with several human answers the
                        mean over the 10 leave-one-out subsets of min(1, matches / 3))
    grounding           accuracy at IoU >= 0.5 of the first [x1, y1, x2, y2] in the answer

Scores are in percent units, per client, then averaged per task and over tasks (report.py).
"""
import math
import re
from collections import Counter

import torch

import backbone as bbmod
import client
import pilot
from config import Config, is_tiny

METRICS = {"caption": "cider", "vqa": "vqa_acc", "grounding": "acc_iou50", "ocr": "vqa_acc"}
MAX_NEW_TOKENS = {"caption": 24, "vqa": 4, "grounding": 32, "ocr": 6}   # the tiny backbone's answers, EOS included


# ----------------------------------------------------------------------------- VQA accuracy
# The official VQA v2 evaluation's normalisation (GT-Vision-Lab/VQA, vqaEval.py), rule for rule.
_VQA_PUNCT = ";/[]\"{}()=+\\_-><@`,?!"
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")   # sic: as written there, a period not followed by a digit
_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# Its contractions table, by the form each spelling is mapped to ("somebody'd" -> "somebodyd" is
# the official table's own entry; the capitalised spellings can never match a lower-cased word).
_CANONICAL = """
ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt |
couldn't've: couldn'tve couldnt've | didn't: didnt | doesn't: doesnt | don't: dont | hadn't: hadnt |
hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent | he'd: hed | he'd've: hed've he'dve |
he's: hes | how'd: howd | how'll: howll | how's: hows | I'd've: Id've I'dve | I'm: Im | I've: Ive |
isn't: isnt | it'd: itd | it'd've: itd've it'dve | it'll: itll | let's: let's | ma'am: maam |
mightn't: mightnt | mightn't've: mightnt've mightn'tve | might've: mightve | mustn't: mustnt |
must've: mustve | needn't: neednt | not've: notve | o'clock: oclock | oughtn't: oughtnt |
'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant | she'd've: shed've she'dve | she's: she's |
should've: shouldve | shouldn't: shouldnt | shouldn't've: shouldnt've shouldn'tve | somebodyd: somebody'd |
somebody'd've: somebodyd've somebody'dve | somebody'll: somebodyll | somebody's: somebodys |
someone'd: someoned | someone'd've: someoned've someone'dve | someone'll: someonell | someone's: someones |
something'd: somethingd | something'd've: somethingd've something'dve | something'll: somethingll |
that's: thats | there'd: thered | there'd've: thered've there'dve | there're: therere | there's: theres |
they'd: theyd | they'd've: theyd've they'dve | they'll: theyll | they're: theyre | they've: theyve |
'twas: twas | wasn't: wasnt | we'd've: wed've we'dve | we've: weve | weren't: werent | what'll: whatll |
what're: whatre | what's: whats | what've: whatve | when's: whens | where'd: whered | where's: wheres |
where've: whereve | who'd: whod | who'd've: whod've who'dve | who'll: wholl | who's: whos | who've: whove |
why'll: whyll | why're: whyre | why's: whys | won't: wont | would've: wouldve | wouldn't: wouldnt |
wouldn't've: wouldnt've wouldn'tve | y'all: yall | y'all'll: yall'll y'allll | y'all'd've: yall'd've y'alld've y'all'dve |
you'd: youd | you'd've: youd've you'dve | you'll: youll | you're: youre | you've: youve
"""
_CONTRACTIONS = {spelling: form.strip() for entry in _CANONICAL.split("|")
                 for form, _, spellings in [entry.partition(":")] for spelling in spellings.split()}


def vqa_punctuation(text: str) -> str:
    """The official processPunctuation: each mark is deleted where it touches a space (or anywhere,
    when the text holds a comma between digits), else replaced by a space; then periods not before
    a digit are deleted (at most 32 of them: the official call passes re.UNICODE, 32, as the count)."""
    out = text
    for p in _VQA_PUNCT:
        joined = p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text) is not None
        out = out.replace(p, "" if joined else " ")
    return _PERIOD.sub("", out, count=32)


def vqa_digits_articles(text: str) -> str:
    """The official processDigitArticle: lower case, number words to digits, articles out, then
    apostrophe-less contractions to their usual spelling."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean(s: str) -> str:
    """What the official evaluation does to every answer first: newlines and tabs to spaces, stripped."""
    return s.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(s: str) -> str:
    """An answer with the official evaluation's whole processing (punctuation, then number words,
    articles and contractions)."""
    return vqa_digits_articles(vqa_punctuation(_clean(s)))


def vqa_accuracy(pred: str, answers) -> float:
    """The official VQA accuracy of one prediction, as the current vqaEval.py scores it (the
    GT-Vision-Lab commit "Fixed processing answers bug", 2021). Every answer and the prediction are
    cleaned (newlines, tabs, outer spaces); when the human answers are not all the same, the answers
    and the prediction all get the whole processing (normalize_answer), and when they are, nothing
    more is done to either. The accuracy is the mean over leaving each answer out of min(1, matches
    among the others / 3): 3 matching answers of 10 score 0.9, 4 or more 1.0. [reading] With one
    reference answer (the synthetic benchmark), leaving it out would leave nothing: the prediction
    scores 1 when it equals the answer, both processed as a whole."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if len(answers) == 1:
        return float(normalize_answer(pred) == normalize_answer(answers[0]))
    refs, p = [_clean(a) for a in answers], _clean(pred)
    if len(set(refs)) > 1:
        refs, p = [normalize_answer(a) for a in refs], normalize_answer(p)
    hits = [a == p for a in refs]
    return sum(min(1.0, (sum(hits) - h) / 3) for h in hits) / len(refs)


# ----------------------------------------------------------------------------- CIDEr-D
_PTB_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# Abbreviations whose period the Stanford PTB tokenizer keeps on the word ("Mr." stays "mr."): its
# lists of titles, months, days and company words, which it matches capitalised as written in the
# text, and the Latin ones it matches in lower case too.
_ABBREVIATIONS = set("""Mr Mrs Ms Dr Drs Prof Sen Rep Lt Col Gen Gov Adm Rev Maj Sgt Capt St Ste Ave Pres Hon Jr Sr
Mt Ft Rd Blvd Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec Mon Tue Tues Wed Thu Thurs Fri Inc Co Cos Corp Ltd
Plc Dept Univ""".split())
_ABBREVIATIONS_ANY_CASE = {"etc", "vs"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_TOKEN = re.compile(r"""
      \d+(?:[.,]\d+)+                 # a number with decimals or thousands: 3.5, 1,000
    | (?:[a-z]\.){2,}                 # an acronym: u.s.
    | \.\.\.|--                       # ellipsis, dash
    | [a-z]+\.(?=\s|$)                # a word and its period: an abbreviation's is kept (ptb_tokenize)
    | [a-z]+(?=n't\b)                 # do|n't, ca|n't, wo|n't
    | n't\b | '(?:s|m|d|ll|re|ve)\b   # clitics, split off
    | [a-z0-9]+(?:[-/][a-z0-9]+)*     # a word, hyphenated words kept whole
    | \S                              # any other character alone
""", re.VERBOSE | re.IGNORECASE)


def ptb_tokenize(text: str) -> list:
    """The COCO caption evaluation's tokenisation in Python: the Stanford PTB tokenizer with
    -lowerCase (clitics such as 's and n't split off, brackets written -lrb- ... -rcb-, a known
    abbreviation keeping its period: "mr." stays "mr."), then its filter, which drops quotes and
    . ? ! , : ; - -- ... tokens. Written for what captions hold."""
    tokens = []
    for t in _PTB_TOKEN.findall(text.replace("\n", " ")):       # the case as written decides an abbreviation
        word = t[:-1]
        if t.endswith(".") and word.isalpha() and not (word[0].isupper() and word.capitalize() in _ABBREVIATIONS
                                                       or word.lower() in _ABBREVIATIONS_ANY_CASE):
            tokens += [word.lower(), "."]   # an ordinary word before a period: the period is a token of its own
        else:
            tokens.append(t.lower())
    return [_BRACKETS.get(t, t) for t in tokens if t not in _PTB_DROP and t != '"']


def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider_d(candidates, references, n_max=4, sigma=6.0):
    """Corpus CIDEr-D (Vedantam et al. 2015, the coco-caption variant): TF-IDF n-gram vectors
    (n = 1..4, document frequency over the references of this corpus), clipped candidate counts, a
    Gaussian length penalty, x10. Returns the mean over images (raw scale; x100 for percent units).

    candidates: list of strings; references: list of lists of strings, one list per candidate."""
    scores = cider_d_items(candidates, references, n_max, sigma)
    return sum(scores) / len(scores)


def cider_d_items(candidates, references, n_max=4, sigma=6.0):
    """cider_d's score of each image (raw scale). An image's score depends on the others only
    through the document frequencies, which come from the references alone."""
    assert len(candidates) == len(references) and candidates
    refs = [[ptb_tokenize(r) for r in rs] for rs in references]
    df = Counter()
    for rs in refs:
        df.update({g for r in rs for n in range(1, n_max + 1) for g in _ngrams(r, n)})
    log_n = math.log(float(len(refs)))

    def vec(words):
        v, norm = [], []
        for n in range(1, n_max + 1):
            counts = _ngrams(words, n)
            vn = {g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in counts.items()}
            v.append(vn)
            norm.append(math.sqrt(sum(x * x for x in vn.values())))
        return v, norm, len(words)

    scores = []
    for cand, rs in zip(candidates, refs):
        vc, nc, lc = vec(ptb_tokenize(cand))
        total = 0.0
        for r in rs:
            vr, nr, lr = vec(r)
            sim = 0.0
            for n in range(n_max):
                val = sum(min(x, vr[n][g]) * vr[n][g] for g, x in vc[n].items() if g in vr[n])
                if nc[n] != 0 and nr[n] != 0:
                    val /= nc[n] * nr[n]
                sim += val * math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            total += sim / n_max
        scores.append(10.0 * total / len(rs))
    return scores


# ----------------------------------------------------------------------------- grounding
_NUM = r"(-?\d+(?:\.\d+)?)"
_BOX = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")


def parse_box(text: str):
    """The first '[x1, y1, x2, y2]' in text (spaces anywhere), or None when there is none."""
    m = _BOX.search(re.sub(r"(?<=\d)\s+(?=[\d.])|(?<=\.)\s+(?=\d)", "", text))
    return [float(v) for v in m.groups()] if m else None


def iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_accuracy(pred: str, answer: str) -> float:
    p, t = parse_box(pred), parse_box(answer)
    if t is None:
        raise ValueError(f"reference answer {answer!r} holds no box")
    return float(p is not None and p[2] > p[0] and p[3] > p[1] and iou(p, t) >= 0.5)


def item_scores(task, predictions, samples) -> list:
    """Each test sample's score, in percent units; a client's score is their mean. A sample's
    references are its extra["answers"] when it has them (VQAv2's ten answers, a caption's five),
    else its one answer."""
    answers = [s.extra.get("answers", [s.answer]) for s in samples]
    if METRICS[task] == "cider":
        return [100.0 * x for x in cider_d_items(predictions, answers)]
    if METRICS[task] == "vqa_acc":
        return [100.0 * vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    if METRICS[task] == "acc_iou50":
        return [100.0 * grounding_accuracy(p, s.answer) for p, s in zip(predictions, samples)]
    raise ValueError(task)


# ----------------------------------------------------------------------------- a client's evaluation
def client_model(bb, task, download, private, stage, tasks, cfg: Config):
    """A client's model as it is evaluated: the downloaded Θ^l in the LLM and the connector of
    `stage` built from its download and private state (returns the connector, in eval mode)."""
    client.load_text_adapter(bb.model, download)
    return client.build_connector(bb, stage, tasks, task, download, private, 0, cfg).to(bb.model.device).eval()


@torch.no_grad()
def answer(bb, conn, task, h_v, prompts, cfg: Config):
    """Greedy answers to encoded prompts about images with features h_v, eval_batch_size at a
    time, with the model client_model() set up."""
    preds = []
    for i in range(0, len(prompts), cfg.eval_batch_size):
        batch = prompts[i:i + cfg.eval_batch_size]
        x_img, _ = conn(h_v[i:i + len(batch)].to(bb.model.device).float())
        ids, mask = bbmod.collate_prompts(batch, bb.pad_id)
        # the tiny backbone's answers have known lengths (a named box: up to 29 tokens), also when its
        # data come from files (--data); a real model's answers stop at EOS within 64
        limit = MAX_NEW_TOKENS[task] if is_tiny(cfg.backbone) else 64
        out = pilot.generate(bb.model, x_img, ids.to(bb.model.device), mask.to(bb.model.device), limit,
                             bb.tokenizer.eos_token_id, bb.pad_id)
        preds += bb.tokenizer.batch_decode(out, skip_special_tokens=True)
    return [p.strip() for p in preds]


@torch.no_grad()
def test_loss(bb, conn, h_v, items, cfg: Config):
    """Mean answer-token cross-entropy of encoded items, teacher-forced."""
    ce_sum, n_tokens = 0.0, 0
    dev = bb.model.device
    for i in range(0, len(items), cfg.eval_batch_size):
        batch = items[i:i + cfg.eval_batch_size]
        x_img, _ = conn(h_v[i:i + len(batch)].to(dev).float())
        ids, mask, labels = bbmod.collate(batch, bb.pad_id)
        ce_sum += float(pilot.lm_loss(bb.model, x_img, ids.to(dev), mask.to(dev), labels.to(dev), reduction="sum"))
        n_tokens += int((labels[:, 1:] != -100).sum())
    return ce_sum / max(1, n_tokens)


def evaluate_client(bb, ct, download, private, stage, tasks, cfg: Config, scores=True) -> dict:
    """One client's line of the results, with what it downloaded plus its private tensors: its test
    loss (mean answer-token cross-entropy, teacher-forced: a smooth measure beside the generated
    answers' score, which moves only when a whole answer changes) and, with scores, its greedy
    answers' score, three examples, and every prediction with its score (written to
    OUT/predictions_client_<id>.jsonl, not to results.json)."""
    conn = client_model(bb, ct.task, download, private, stage, tasks, cfg)
    row = {"id": ct.id, "task": ct.task, "n_train": len(ct.items_train), "n_test": len(ct.test)}
    if scores:
        preds = answer(bb, conn, ct.task, ct.h_test, [item[0] for item in ct.items_test], cfg)
        items = item_scores(ct.task, preds, ct.test)
        every = [{"id": t.id, "question": t.question, "answer": t.answer, "prediction": p, "score": round(x, 4)}
                 for t, p, x in zip(ct.test, preds, items)]
        row.update(metric=METRICS[ct.task], score=round(sum(items) / len(items), 2))
    row["test_ce"] = round(test_loss(bb, conn, ct.h_test, ct.items_test, cfg), 5)
    if scores:
        row.update(examples=every[:3], predictions=every)
    return row
