"""Write `sharegpt-filtered.json`: a small ShareGPT-shaped set of chats written for this project.

The benchmark needs prompts and answers whose token lengths look like ShareGPT's (mean
about 160 in, 340 out, a long tail, most turns short) without shipping anyone's real chats.
Each chat is assembled from the sentence banks of `sharegpt_sample_banks.json` (one set of banks
per topic, plus pasted stories, code and itineraries) with a fixed seed, so reruns write the same
bytes. Its handwritten chats cover the shapes a loader must survive: a reply before the first
question, no question at all, an empty list.

Run from the repo root: `python tools/make_sharegpt_sample.py`. The demo tokenizer is trained
on this file, so run `tools/make_demo_tokenizer.py` after it; lengths were tuned with that
tokenizer (CHARS_PER_TOKEN), and tests/test_data.py checks them and that a rerun writes the
committed file byte for byte.
"""
from __future__ import annotations

import json
import math
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sharegpt-filtered.json"
BANKS = json.loads((Path(__file__).resolve().parent / "sharegpt_sample_banks.json").read_text(encoding="utf-8"))
SEED = 20230912
NUM_GENERATED = 600
PROMPT_MEAN_TOKENS, ANSWER_MEAN_TOKENS = 160, 340
# The long tail, in tokens: a few pasted documents and a few very long answers.
PROMPT_TAIL = [1150, 1500, 1900, 2300, 2600]
ANSWER_TAIL = [1600, 1900, 2200, 2450, 2700]
# Characters per token of the demo tokenizer on this text (measured; English prose, some code).
CHARS_PER_TOKEN = 4.6


@dataclass(frozen=True)
class Topic:
    """Sentence banks for one subject; `{slot}` fields are filled once per chat so it stays coherent."""

    name: str
    slots: dict[str, list[str]]
    asks: list[str]
    context: list[str]
    openers: list[str]
    points: list[str]
    headings: list[str]
    closers: list[str]
    followups: list[str]
    # Extra points that only fit one value of the first slot (facts about one science concept).
    keyed_points: dict[str, list[str]] = field(default_factory=dict)


TOPICS = {name: Topic(name, **banks) for name, banks in BANKS["topics"].items()}
STORY = BANKS["story"]  # a story's worth of sentences for pasted drafts ("please proofread my story")
CODE_FUNCS = BANKS["code_funcs"]  # building blocks for pasted code ("why is my script slow?")
SNIPPETS = BANKS["snippets"]  # pieces of long answers (see `Chat.series`)
MORNINGS, AFTERNOONS, EVENINGS = BANKS["mornings"], BANKS["afternoons"], BANKS["evenings"]
STRENGTH, CARDIO, WEEK_NOTES, MEALS = BANKS["strength"], BANKS["cardio"], BANKS["week_notes"], BANKS["meals"]
NOTES_HEADS = BANKS["notes_heads"]
PASTE_OPENERS = BANKS["paste_openers"]  # how a reply to a pasted document begins, by what was pasted
MIXED_NOTES_HEAD = BANKS["mixed_notes_head"]
FOLLOWUP_OPENERS = BANKS["followup_openers"]
WORD_NUMBERS = {"three": 3, "four": 4, "five": 5, "seven": 7, "ten": 10}


def fill(template: str, vals: dict[str, str]) -> str:
    """Fill slots, capitalising a value that starts a sentence (`{dish} is ...`)."""
    def value(match: re.Match) -> str:
        text = vals[match[2]]
        return match[1] + text[0].upper() + text[1:] if match[1] is not None else text

    return re.sub(r"(^|[.!?] )?\{(\w+)\}", value, template)


class Deck:
    """Draws sentences without repeats until the bank is used up, then reshuffles."""

    def __init__(self, rng: random.Random, items: list[str], vals: dict[str, str]):
        self.rng, self.items, self.vals, self.pending = rng, items, vals, []

    def draw(self) -> str:
        if not self.pending:
            self.pending = self.items[:]
            self.rng.shuffle(self.pending)
        return fill(self.pending.pop(), self.vals)


def target_lengths(rng: random.Random, count: int, mean: float, tail: list[int], sigma: float) -> list[int]:
    """Log-normal token counts (clipped below the tail), a fixed long tail, scaled to `mean`."""
    body = [min(rng.lognormvariate(0.0, sigma), 12.0) for _ in range(count - len(tail))]
    scale = (mean * count - sum(tail)) / sum(body)
    lengths = [max(4, round(x * scale)) for x in body] + tail
    rng.shuffle(lengths)
    return lengths


def chars(tokens: int) -> int:
    return round(tokens * CHARS_PER_TOKEN)


def capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


class Chat:
    """One generated conversation: a topic, its slot values, and decks shared by all its turns."""

    def __init__(self, rng: random.Random, topic: Topic):
        self.rng, self.topic = rng, topic
        self.vals = {slot: rng.choice(options) for slot, options in topic.slots.items()}
        keyed = topic.keyed_points.get(next(iter(self.vals.values())), [])
        self.points = Deck(rng, topic.points + keyed, self.vals)
        self.headings = Deck(rng, topic.headings, self.vals)
        self.pasted: str | None = None  # what the first prompt pasted, if anything
        self._decks: dict[int, Deck] = {}

    def draw(self, bank: list[str]) -> str:
        """The next sentence from `bank` for this chat, so a long answer repeats as little as it can."""
        if id(bank) not in self._decks:
            self._decks[id(bank)] = Deck(self.rng, bank, self.vals)
        return self._decks[id(bank)].draw()

    def fill(self, template: str) -> str:
        return fill(template, self.vals)

    def prompt(self, tokens: int) -> str:
        """A question, padded with background about the asker; longer ones paste a document."""
        ask = self.fill(self.rng.choice(self.topic.asks))
        budget = chars(tokens)
        if budget > len(ask) + sum(map(len, self.topic.context)):
            return self.paste(budget)
        context = Deck(self.rng, self.topic.context, self.vals)
        lines: list[str] = []
        while len(" ".join(lines)) + len(ask) < budget:
            lines.append(context.draw())
        if not lines:
            return ask
        if self.rng.random() < 0.5:
            return " ".join(lines) + "\n\n" + ask
        return ask + " " + " ".join(lines)

    def paste(self, budget: int) -> str:
        """A long prompt: code to review, a story to proofread, or notes to summarise."""
        if self.topic.name == "programming":
            self.pasted = "code"
            head = (f"Here is my script. It works, but {self.vals['bug']}. "
                    "Can you review it and tell me what to fix?\n\n```python\n")
            parts: list[str] = []
            nouns = self.topic.slots["noun"]
            while len(head) + sum(map(len, parts)) < budget:
                i = len(parts)
                noun = nouns[(i // len(CODE_FUNCS)) % len(nouns)]
                parts.append(CODE_FUNCS[i % len(CODE_FUNCS)].format(n=noun, N=noun.capitalize()) + "\n")
            return head + "\n".join(parts).rstrip() + "\n```"
        if self.topic.name == "writing":
            self.pasted = "story"
            head = (f"Could you proofread this short story and tell me whether the pacing works? "
                    f"My friend {self.vals['name']} says the middle drags.\n\n")
            bank, tail = STORY, "\n\nBe honest, I can take it!"
        else:
            self.pasted = "notes"
            head, bank, tail = self.rng.choice(NOTES_HEADS) + "\n\n", self.points.items, "\n\nThanks in advance!"
        if budget > sum(map(len, bank)):  # the bank would repeat itself: paste a notebook on everything
            self.pasted, head, bank = "notes", MIXED_NOTES_HEAD + "\n\n", self.mixed_notes()
        deck, paragraphs = Deck(self.rng, bank, self.vals), []
        while len(head) + sum(map(len, paragraphs)) < budget:
            paragraphs.append(" ".join(deck.draw() for _ in range(self.rng.randint(3, 6))))
        return head + "\n\n".join(paragraphs) + tail

    def mixed_notes(self) -> list[str]:
        """Every topic's points, each topic with slot values of its own."""
        notes = []
        for topic in TOPICS.values():
            vals = {slot: self.rng.choice(options) for slot, options in topic.slots.items()}
            notes += [fill(point, vals) for point in topic.points]
        return notes

    def series(self, k: int) -> str | None:
        """The k-th piece of a long answer's running example: code, a day, a week, a meal, a scene."""
        rng, topic = self.rng, self.topic
        if topic.name == "programming":
            intro = f"Here is a sketch in Python (the same idea carries over to {self.vals['lang']}):"
            return intro + "\n\n```python\n" + SNIPPETS[k % len(SNIPPETS)] + "```"
        if topic.name == "travel":
            morning, afternoon, evening = (self.draw(bank) for bank in (MORNINGS, AFTERNOONS, EVENINGS))
            trip_days = WORD_NUMBERS[self.vals["days"]]
            day = f"Day {k % trip_days + 1}" + (", plan B" if k >= trip_days else "")
            return (f"**{day}.** Morning: {capitalised(morning)}. Afternoon: {capitalised(afternoon)}. "
                    f"Evening: {capitalised(evening)}.")
        if topic.name == "fitness":
            s1, s2, s3 = (self.draw(STRENGTH) for _ in range(3))
            return (f"**Week {k + 1}.** On strength days, do {s1}, {s2} and {s3}. On cardio days, "
                    f"{self.draw(CARDIO)}. {self.draw(WEEK_NOTES)}")
        if topic.name == "cooking":
            day = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()[k % 7]
            day += f" (week {k // 7 + 1})" if k >= 7 else ""
            intro = "Since you're cooking a lot, here is a sample week that reuses ingredients:\n\n" if k == 0 else ""
            return f"{intro}**{day}:** {capitalised(self.draw(MEALS))}."
        if topic.name == "writing":
            intro = "Here is a draft you can adapt:\n\n" if k == 0 else ""
            return intro + " ".join(self.draw(STORY) for _ in range(rng.randint(3, 5)))
        return None

    def answer(self, tokens: int, opener: str) -> str:
        """An assistant-style reply: opener, paragraphs and lists, headed sections when long, closer."""
        rng, budget = self.rng, chars(tokens)
        blocks, closer = [opener], self.fill(rng.choice(self.topic.closers))
        long = budget > 4000 and self.series(0) is not None
        k = 0
        while (size := sum(map(len, blocks)) + len(closer)) < budget:
            if budget - size < 250:
                blocks.append(self.points.draw())
            elif long and rng.random() < 0.5:
                blocks.append(self.series(k))
                k += 1
            elif budget > 2500 and rng.random() < 0.35:
                body = " ".join(self.points.draw() for _ in range(rng.randint(2, 3)))
                blocks.append(f"### {self.headings.draw()}\n\n{body}")
            elif rng.random() < 0.45:
                items = [self.points.draw() for _ in range(rng.randint(3, 5))]
                blocks.append("\n".join(f"{i}. {item}" for i, item in enumerate(items, 1)))
            else:
                blocks.append(" ".join(self.points.draw() for _ in range(rng.randint(2, 4))))
        return "\n\n".join(blocks + [closer])

    def turns(self, prompt_tokens: int, answer_tokens: int) -> list[dict[str, str]]:
        rng = self.rng
        prompt = self.prompt(prompt_tokens)
        opener = PASTE_OPENERS[self.pasted] if self.pasted else self.fill(rng.choice(self.topic.openers))
        turns = [turn("human", prompt), turn("gpt", self.answer(answer_tokens, opener))]
        rounds = rng.choices([0, 1, 2], weights=[15, 4, 1])[0]
        for followup in rng.sample(self.topic.followups, rounds):
            tokens = round(rng.lognormvariate(math.log(150), 0.6))
            reply = self.answer(tokens, rng.choice(FOLLOWUP_OPENERS))
            turns += [turn("human", self.fill(followup)), turn("gpt", reply)]
        return turns


def pick_topic(rng: random.Random, prompt_tokens: int, answer_tokens: int) -> Topic:
    """Very long turns go to topics with long material, so they repeat themselves less."""
    if prompt_tokens > 800:
        names = ["programming", "writing", "science", "history"]
    elif answer_tokens > 500:
        names = ["programming", "travel", "fitness", "writing", "cooking"]
    else:
        return rng.choice(list(TOPICS.values()))
    return TOPICS[rng.choice(names)]


def chat_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(7))


def turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def build() -> list[dict]:
    rng = random.Random(SEED)
    prompts = target_lengths(rng, NUM_GENERATED, PROMPT_MEAN_TOKENS, PROMPT_TAIL, sigma=1.0)
    answers = target_lengths(rng, NUM_GENERATED, ANSWER_MEAN_TOKENS, ANSWER_TAIL, sigma=0.9)
    chats = [Chat(rng, pick_topic(rng, p, a)).turns(p, a) for p, a in zip(prompts, answers)]
    for chat in BANKS["handwritten_chats"]:  # the odd shapes real exports contain, and text beyond ASCII
        chats.insert(rng.randrange(len(chats) + 1), chat)
    return [{"id": chat_id(rng), "conversations": chat} for chat in chats]


def render() -> str:
    """The file's exact text (one key per line, so diffs of a regenerated file stay readable)."""
    return json.dumps(build(), ensure_ascii=False, indent=1) + "\n"


def main() -> None:
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
