"""A deterministic generator of labeled movie-review-style text, for the demo and for tests.

The project ships no third-party data: the demo trains on ``maas_tasks/data/sample_reviews.csv``,
which this module writes (``python -m maas_tasks.sample_data``), and tests call
:func:`generate_reviews` for small frames. The reviews are built from our own templates and word
lists and look like the real input (raw HTML ``<br />`` breaks and entities, several reviews per
movie, sentiment-free filler, negations such as "not good" or "never boring", mixed opinions and a
few flipped labels), so the task is learnable but not trivial.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

SAMPLE_CSV = Path(__file__).resolve().parent / "data" / "sample_reviews.csv"
SAMPLE_ROWS = 400
SAMPLE_SEED = 7
REVIEWS_PER_MOVIE = 10
LABEL_NOISE = 0.05

_TITLE_FIRST = ["Midnight", "Silent", "Broken", "Golden", "Last", "Crimson", "Distant", "Hidden", "Wild", "Paper",
                "Iron", "Winter", "Electric", "Lonely", "Burning", "Secret"]
_TITLE_SECOND = ["Harbor", "Garden", "Letters", "Frontier", "Orchard", "Signal", "Kingdom", "Voyage", "Mirror",
                 "Station", "Summer", "River", "Empire", "Promise", "Carnival", "Tide"]
_ASPECTS = ["acting", "script", "story", "direction", "soundtrack", "cinematography", "pacing", "dialogue", "ending",
            "cast", "plot", "editing", "score", "lead performance", "screenplay"]
_POSITIVE = ["wonderful", "superb", "gripping", "moving", "brilliant", "charming", "delightful", "memorable", "clever",
             "beautiful", "excellent", "touching", "thrilling", "funny", "powerful", "fresh", "stunning", "great"]
_NEGATIVE = ["dull", "clumsy", "tedious", "boring", "awful", "forgettable", "bland", "messy", "lifeless",
             "predictable", "weak", "silly", "terrible", "flat", "painful", "confusing", "poor", "bad"]
_INTENSIFIERS = ["", "", "really ", "truly ", "quite ", "very ", "absolutely ", "surprisingly "]
_PEOPLE = ["my sister", "a friend", "my parents", "the whole family", "a colleague", "my roommate"]

_OPINION = {
    "positive": [
        "The {aspect} was {intens}{pos}.",
        "I found the {aspect} {intens}{pos}.",
        "What a {pos} film; the {aspect} alone is worth the ticket.",
        "{Title} is {intens}{pos} from start to finish.",
        "I would happily watch it again with {people}.",
        "Easily one of the most {pos} films I have seen this year.",
        "The {aspect} was never {neg}.",
        "It is not {neg} at all, and the {aspect} is {pos}.",
        "I loved the {aspect}; {people} loved it too.",
        "Highly recommended.",
    ],
    "negative": [
        "The {aspect} was {intens}{neg}.",
        "I found the {aspect} {intens}{neg}.",
        "What a {neg} film; even the {aspect} could not save it.",
        "{Title} is {intens}{neg} from start to finish.",
        "I would not watch it again, and neither would {people}.",
        "Easily one of the most {neg} films I have seen this year.",
        "The {aspect} was not {pos}.",
        "It is never {pos}, and the {aspect} is {neg}.",
        "I hated the {aspect}; {people} walked out.",
        "Save your money.",
    ],
}
# A sentence of the other polarity, so a review is sometimes mixed and single words do not decide it.
_CONCESSION = {
    "positive": ["The {aspect} was a bit {neg}, but that hardly matters.", "Sure, the {aspect} is {neg} at times."],
    "negative": ["The {aspect} was {pos}, but that is all it has.", "Sure, the {aspect} is {pos} at times."],
}
_FILLER = [
    "I saw it on a rainy Sunday afternoon.",
    "It runs a little over two hours.",
    "The film is set in a small coastal town.",
    "I went in knowing nothing about the story.",
    "It is based on a novel I have not read.",
    "The theater was half empty.",
    "It was released last spring.",
    "There are three main characters.",
    "I watched it with {people}.",
    "Most of it was shot on location.",
    "It&#39;s the director&#39;s second feature.",
    "The trailer gives away very little.",
]


def _movie_title(rng: random.Random) -> str:
    title = f"{rng.choice(_TITLE_FIRST)} {rng.choice(_TITLE_SECOND)}"
    if rng.random() < 0.15:
        title = f"{title} &amp; {rng.choice(_TITLE_SECOND)}"
    return f"&quot;{title}&quot;" if rng.random() < 0.3 else title


def _fill(template: str, rng: random.Random, title: str) -> str:
    return template.format(
        aspect=rng.choice(_ASPECTS),
        pos=rng.choice(_POSITIVE),
        neg=rng.choice(_NEGATIVE),
        intens=rng.choice(_INTENSIFIERS),
        people=rng.choice(_PEOPLE),
        Title=title,
    )


def _review(rng: random.Random, label: str, title: str) -> str:
    sentences = [_fill(rng.choice(_OPINION[label]), rng, title) for _ in range(rng.randint(1, 3))]
    sentences += [_fill(rng.choice(_FILLER), rng, title) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.35:
        sentences.append(_fill(rng.choice(_CONCESSION[label]), rng, title))
    rng.shuffle(sentences)
    text = sentences[0]
    for sentence in sentences[1:]:
        # Raw reviews separate paragraphs with HTML line breaks and sometimes leave double spaces.
        text += rng.choice([" ", " ", " ", "  ", "<br /><br />", "<br />"]) + sentence
    return text


def sample_data_path() -> Path:
    """The packaged demo CSV (what the pipeline trains on when no data is given)."""
    return SAMPLE_CSV


def generate_reviews(n: int, *, seed: int) -> pd.DataFrame:
    """Generate ``n`` labeled reviews, the same ones for the same ``n`` and ``seed``.

    Returns:
        Columns ``review_id`` (``r00001``...), ``movie_id`` (about 10 reviews per movie), ``text``
        (raw, with HTML breaks and entities) and ``label`` (``"positive"``/``"negative"``, balanced,
        about 5% deliberately flipped).
    """
    import pandas as pd  # here, not at the top: the DAG file imports sample_data_path while parsing

    if n < 1:
        raise ValueError(f"n={n}: ask for at least one review")
    rng = random.Random(seed)
    n_movies = max(1, round(n / REVIEWS_PER_MOVIE))
    titles = [_movie_title(rng) for _ in range(n_movies)]
    rows = []
    for i in range(n):
        movie = rng.randrange(n_movies)
        label = "positive" if i % 2 == 0 else "negative"
        text = _review(rng, label, titles[movie])
        if rng.random() < LABEL_NOISE:
            label = "negative" if label == "positive" else "positive"
        rows.append({"review_id": f"r{i + 1:05d}", "movie_id": f"m{movie + 1:04d}", "text": text, "label": label})
    return pd.DataFrame(rows, columns=["review_id", "movie_id", "text", "label"])


def write_sample_csv(path: Path = SAMPLE_CSV, *, n: int = SAMPLE_ROWS, seed: int = SAMPLE_SEED) -> Path:
    """Write the demo dataset as CSV (UTF-8, header row) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    generate_reviews(n, seed=seed).to_csv(path, index=False)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the demo dataset of labeled movie reviews.")
    parser.add_argument("--out", type=Path, default=SAMPLE_CSV, help="CSV to write (default: the packaged sample)")
    parser.add_argument("--rows", type=int, default=SAMPLE_ROWS)
    parser.add_argument("--seed", type=int, default=SAMPLE_SEED)
    args = parser.parse_args(argv)
    print(write_sample_csv(args.out, n=args.rows, seed=args.seed))


if __name__ == "__main__":
    main()
